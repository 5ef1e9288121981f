"""The CUDA VMM backend on both executors (a real GPU, or the SIMT harness's emulated driver, whose
VMM calls are real virtual memory and can be made to fail): what the pool reports about the zero
page under unmapped ranges."""

from __future__ import annotations

import pytest

MiB = 1 << 20


def test_zero_page_access_is_reported(dev):
    pool = dev.kv.PagePool("cuda", 8 * MiB)
    vt = dev.kv.VirtualTensor(pool, (4 * MiB,), "uint8")
    mode = pool.stats()["zero_page_access"]
    assert mode in ("read-only", "read-write")
    if dev.name == "simt":
        assert mode == "read-only"  # the emulated driver grants read-only mappings
    del vt


@pytest.mark.simt
def test_zero_page_falls_back_to_read_write_visibly(simt_dev):
    """A driver that refuses a read-only zero page gets a read-write one, and stats() says so."""
    dev = simt_dev
    pool = dev.kv.PagePool("cuda", 8 * MiB)
    dev.control.fail_next_call("cuMemSetAccess", 1)
    vt = dev.kv.VirtualTensor(pool, (4 * MiB,), "uint8")
    assert pool.stats()["zero_page_access"] == "read-write"
    del vt
