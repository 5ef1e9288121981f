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


@pytest.mark.simt
def test_destroyed_tensor_releases_behind_the_streams_it_was_used_on(simt_dev):
    """A VirtualTensor dropped without free() once recorded its release event on the legacy default
    stream, which does not order against non-blocking streams: pages could be reused while kernels
    on those streams still read them. The release now follows every stream the tensor was used on."""
    dev = simt_dev
    c = dev.kv._C
    s1, s2 = c.cuda_stream_create(0), c.cuda_stream_create(0)
    pool = dev.kv.PagePool("cuda", 8 * MiB)
    vt = dev.kv.VirtualTensor(pool, (4 * MiB,), "uint8")
    vt.map(0, 1)
    vt.use_stream(s1)
    vt.__dlpack__(stream=s2)  # a consumer on s2
    dev.control.take_trace()
    del vt
    trace = dev.control.take_trace()
    records = [(a, b) for name, a, b, _ in trace if name == "cudaEventRecord"]
    waits = [(a, b) for name, a, b, _ in trace if name == "cudaStreamWaitEvent"]
    assert {stream for _, stream in records} == {s1, s2}, trace
    assert any(stream == s1 for stream, _ in waits)  # s1 waits for s2's work, then releases
    assert pool.stats()["pages_free"] == pool.stats()["pages_total"]
    c.cuda_stream_destroy(s1)
    c.cuda_stream_destroy(s2)


@pytest.mark.simt
def test_failed_map_leaves_the_page_readable(simt_dev):
    """A cuMemMap failure once put the zero page back without access, so reads of the page faulted."""
    dev = simt_dev
    pool = dev.kv.PagePool("cuda", 8 * MiB)
    vt = dev.kv.VirtualTensor(pool, (8 * MiB,), "uint8")
    page = pool.stats()["page_bytes"]
    dev.control.fail_next_call("cuMemMap", 2)
    with pytest.raises(MemoryError):
        vt.map(1, 1)
    assert dev.control.access_flags(vt.data_ptr + page) == 1  # CU_MEM_ACCESS_FLAGS_PROT_READ
    vt.map(1, 1)  # and the pool is intact
    assert dev.control.access_flags(vt.data_ptr + page) == 3


@pytest.mark.simt
def test_map_gives_each_page_access_right_after_mapping_it_and_waits_for_readers(simt_dev):
    """Each page gets access as soon as its real page is mapped (not after the whole run), and only
    after the work queued on the tensor's streams, which may be reading the zero page, has finished."""
    dev = simt_dev
    s1 = dev.kv._C.cuda_stream_create(0)
    pool = dev.kv.PagePool("cuda", 8 * MiB)
    vt = dev.kv.VirtualTensor(pool, (8 * MiB,), "uint8")
    vt.use_stream(s1)
    dev.control.take_trace()
    vt.map(0, 3)
    calls = [(name, a, b) for name, a, b, _ in dev.control.take_trace()
             if name in ("cuMemUnmap", "cuMemMap", "cuMemSetAccess", "cudaEventRecord", "cudaEventSynchronize")]
    names = [n for n, _, _ in calls]
    assert names[:2] == ["cudaEventRecord", "cudaEventSynchronize"] and calls[0][2] == s1
    assert names[2:] == ["cuMemUnmap", "cuMemMap", "cuMemSetAccess"] * 3
    dev.kv._C.cuda_stream_destroy(s1)
