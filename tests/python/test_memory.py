"""PagePool / VirtualTensor / Arena on the CPU backend (memfd pages mapped into a fixed reservation):
properties, fixed addresses, zero reads, exact contents through numpy and torch DLPack views,
sharing, offload/prefetch, resize with reclaim, accounting, argument checks, and a multi-threaded
stress run. Random sequences against a model are in test_memory_state_machine.py; CUDA versions
are in test_memory_cuda.py."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import weakref

import numpy as np
import pytest

import kvcore
from arrays import bits, random_array

PB = 4096  # the CPU granularity (the OS page size on x86-64 Linux), used as page_bytes throughout


def make_pool(pages: int = 8, host_pages: int = 0, page_bytes: int = PB) -> kvcore.PagePool:
    return kvcore.PagePool("cpu", pages * page_bytes, host_pages * page_bytes, page_bytes=page_bytes)


def page_view(vt: kvcore.VirtualTensor, page: int) -> np.ndarray:
    """A writable zero-copy uint8 numpy view of one page of `vt`."""
    return np.from_dlpack(vt.view(page * vt.page_bytes, [vt.page_bytes], "uint8"))


def read_page(vt: kvcore.VirtualTensor, page: int) -> bytes:
    return page_view(vt, page).tobytes()


def random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random bytes, none of them zero (so they can never be mistaken for an unmapped page)."""
    return rng.integers(1, 256, n, dtype=np.uint8)


def write_page(vt: kvcore.VirtualTensor, page: int, data: np.ndarray) -> None:
    page_view(vt, page)[:] = data


def fill_pages(vt, pages, rng) -> dict[int, bytes]:
    """Writes fresh random bytes into each of `pages`; returns what each page should now hold."""
    out = {}
    for p in pages:
        data = random_bytes(rng, vt.page_bytes)
        write_page(vt, p, data)
        out[p] = data.tobytes()
    return out


def assert_pages(vt, expected: dict[int, bytes]) -> None:
    for p, data in expected.items():
        assert read_page(vt, p) == data, f"page {p} changed"


def assert_zero(vt, pages) -> None:
    for p in pages:
        assert not page_view(vt, p).any(), f"page {p} does not read as zeros"


def check_accounting(pool: kvcore.PagePool) -> dict:
    """The pool's counters agree with each other; returns the stats."""
    s = pool.stats()
    assert s["pages_total"] == pool.capacity_pages
    assert s["pages_free"] == pool.free_pages
    assert s["pages_free"] + s["pages_mapped"] + s["pages_releasing"] == s["pages_total"]
    assert s["pages_releasing"] == 0  # CPU releases complete at once
    assert 0 <= s["pages_shared"] <= s["pages_mapped"]
    assert s["host_pages_total"] == pool.host_capacity_pages
    assert s["host_pages_free"] == pool.host_free_pages
    assert s["pages_offloaded"] == s["host_pages_total"] - s["host_pages_free"]
    assert s["page_bytes"] == pool.page_bytes
    return s


def expect_unchanged(pool, vt, before_free, before_mapped, before_host=None):
    assert pool.free_pages == before_free
    assert vt.mapped_pages() == before_mapped
    if before_host is not None:
        assert pool.host_free_pages == before_host
    check_accounting(pool)


# --- Pool and tensor properties ----------------------------------------------------------------


def test_pool_properties():
    pool = kvcore.PagePool("cpu", 3 * PB + 1, 2 * PB - 7, page_bytes=PB)  # both round up
    assert pool.device == "cpu"
    assert pool.granularity == os.sysconf("SC_PAGESIZE") == PB
    assert pool.page_bytes == PB
    assert pool.capacity_pages == 4
    assert pool.free_pages == 4
    assert pool.host_capacity_pages == 2
    assert pool.host_free_pages == 2
    s = check_accounting(pool)
    assert (s["pages_total"], s["pages_free"], s["pages_mapped"], s["pages_shared"]) == (4, 4, 0, 0)
    assert (s["host_pages_total"], s["host_pages_free"], s["pages_offloaded"]) == (2, 2, 0)
    assert (s["tensors"], s["reserved_bytes"], s["granularity"]) == (0, 0, PB)
    assert s["driver_calls"]["create"]["count"] == 4
    assert "PagePool(" in repr(pool) and "capacity_pages=4" in repr(pool)


def test_pool_defaults_and_multiple_page_sizes():
    pool = kvcore.PagePool("cpu", 1)
    assert pool.page_bytes == 2 << 20  # CPU default
    assert pool.capacity_pages == 1
    assert pool.host_capacity_pages == 0
    pool = kvcore.PagePool("cpu", 0, page_bytes=3 * PB)
    assert (pool.page_bytes, pool.capacity_pages, pool.free_pages) == (3 * PB, 0, 0)
    pool = kvcore.PagePool(capacity_bytes=2 * PB, page_bytes=PB)  # device defaults to the CPU
    assert pool.device == "cpu" and pool.capacity_pages == 2


def test_pool_accepts_torch_device():
    torch = pytest.importorskip("torch")
    pool = kvcore.PagePool(torch.device("cpu"), 2 * PB, page_bytes=PB)
    assert pool.device == "cpu" and pool.capacity_pages == 2


DTYPE_SPECS = [
    ("bfloat16", "bfloat16", 2),
    ("float16", "float16", 2),
    ("float32", "float32", 4),
    ("int32", "int32", 4),
    ("int64", "int64", 8),
    ("uint8", "uint8", 1),
    (np.float16, "float16", 2),
    (np.dtype("float32"), "float32", 4),
    (np.int64, "int64", 8),
    (np.dtype("uint8"), "uint8", 1),
    ("torch.bfloat16", "bfloat16", 2),
    ("torch.float16", "float16", 2),
    ("torch.int32", "int32", 4),
]


def _resolve_dtype(spec):
    if isinstance(spec, str) and spec.startswith("torch."):
        torch = pytest.importorskip("torch")
        return getattr(torch, spec[6:])
    return spec


@pytest.mark.parametrize("spec,name,itemsize", DTYPE_SPECS)
def test_tensor_properties(rng, spec, name, itemsize):
    pool = make_pool(4)
    rows, cols = int(rng.integers(1, 6)), int(rng.integers(1, 3000))
    vt = kvcore.VirtualTensor(pool, [rows, cols], _resolve_dtype(spec))
    nbytes = rows * cols * itemsize
    pages = -(-nbytes // PB)
    assert vt.shape == (rows, cols)
    assert vt.dtype == name
    assert vt.device == "cpu"
    assert vt.nbytes == nbytes
    assert vt.num_pages == pages
    assert vt.page_bytes == PB
    assert vt.data_ptr != 0 and vt.data_ptr % PB == 0
    assert not vt.is_freed
    # Reserving maps nothing: the pool is untouched.
    assert vt.mapped_pages() == []
    assert [vt.is_mapped(i) for i in range(pages)] == [False] * pages
    assert [vt.is_offloaded(i) for i in range(pages)] == [False] * pages
    assert [vt.physical_page(i) for i in range(pages)] == [-1] * pages
    assert pool.free_pages == 4
    s = check_accounting(pool)
    assert (s["tensors"], s["reserved_bytes"]) == (1, pages * PB)
    assert vt.__dlpack_device__() == (1, 0)
    assert "VirtualTensor(" in repr(vt) and f"0/{pages} mapped" in repr(vt)


@pytest.mark.parametrize("spec,name,itemsize", DTYPE_SPECS)
def test_dlpack_full_shape_zero_copy(rng, spec, name, itemsize):
    torch = pytest.importorskip("torch")
    pool = make_pool(4)
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 2000)))
    vt = kvcore.VirtualTensor(pool, shape, _resolve_dtype(spec))
    t = torch.from_dlpack(vt)
    assert tuple(t.shape) == shape
    assert t.dtype == getattr(torch, name)
    assert t.data_ptr() == vt.data_ptr
    assert t.device.type == "cpu"
    assert t.is_contiguous()
    assert not bits(t).any()  # fresh: all zeros
    if name != "bfloat16":  # numpy has no bfloat16
        a = np.from_dlpack(vt)
        assert a.shape == shape
        assert a.dtype == np.dtype(name)
        assert a.__array_interface__["data"][0] == vt.data_ptr
        assert a.flags.c_contiguous and a.flags.writeable
        assert not a.any()


def test_multiple_tensors_get_distinct_ranges():
    pool = make_pool(2)
    vts = [kvcore.VirtualTensor(pool, [3 * PB], "uint8") for _ in range(5)]
    ranges = sorted((v.data_ptr, v.data_ptr + v.num_pages * PB) for v in vts)
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end <= start
    s = check_accounting(pool)
    assert (s["tensors"], s["reserved_bytes"]) == (5, 5 * 3 * PB)


# --- Contents through numpy and torch ----------------------------------------------------------


NUMPY_DTYPES = ["float32", "float16", "int32", "int64", "uint8"]


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_contents_exact_numpy_and_torch(rng, dtype):
    torch = pytest.importorskip("torch")
    pool = make_pool(6)
    itemsize = np.dtype(dtype).itemsize
    vt = kvcore.VirtualTensor(pool, [5, PB // itemsize], dtype)  # 5 pages, one row per page
    vt.map(0, 5)
    a = np.from_dlpack(vt)
    t = torch.from_dlpack(vt)
    if dtype.startswith("float"):
        data = random_array(rng, (5, PB // itemsize), dtype)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(max(info.min, -(2**62)), min(info.max, 2**62), (5, PB // itemsize), dtype=dtype)
        data[data == 0] = 1
    a[...] = data  # write through numpy, read through torch
    assert np.array_equal(bits(t), bits(data))
    assert np.array_equal(bits(np.from_dlpack(vt)), bits(data))  # and a fresh view
    other = torch.from_numpy(random_bytes(rng, 5 * PB)).view(getattr(torch, dtype)).view(5, -1)
    t.copy_(other)  # write through torch, read through numpy
    assert np.array_equal(bits(a), bits(other))
    assert t.data_ptr() == a.__array_interface__["data"][0] == vt.data_ptr


def test_contents_bfloat16_through_torch(rng):
    torch = pytest.importorskip("torch")
    pool = make_pool(4)
    vt = kvcore.VirtualTensor(pool, [3, PB // 2], "bfloat16")
    vt.map(0, 3)
    data = random_array(rng, (3, PB // 2), "bfloat16", "torch")
    torch.from_dlpack(vt).copy_(data)
    assert np.array_equal(bits(torch.from_dlpack(vt)), bits(data))
    # The same bytes seen as raw pages.
    raw = b"".join(read_page(vt, p) for p in range(3))
    assert raw == bits(data).tobytes()


def test_partial_last_page_and_mapped_prefix(rng):
    """nbytes not a page multiple: the last page is partly used; only mapped pages keep writes."""
    pool = make_pool(4)
    vt = kvcore.VirtualTensor(pool, [3, 1000], "float32")  # 12000 bytes -> 3 pages
    assert vt.num_pages == 3
    vt.map(0, 1)
    a = np.from_dlpack(vt)
    data = random_array(rng, (3, 1000), "float32")
    a[0, :] = data[0]
    a[1, :24] = data[1, :24]  # bytes [4000, 4096) still lie on page 0
    assert np.array_equal(bits(a[0]), bits(data[0]))
    assert np.array_equal(bits(a[1, :24]), bits(data[1, :24]))
    assert not a[1, 24:].any() and not a[2].any()  # unmapped pages read zeros


# --- Fixed address ----------------------------------------------------------------------------


def test_data_ptr_fixed_for_the_tensor_lifetime(rng):
    torch = pytest.importorskip("torch")
    pool = make_pool(6, host_pages=4)
    vt = kvcore.VirtualTensor(pool, [4 * PB], "uint8")
    other = kvcore.VirtualTensor(pool, [PB], "uint8")
    base = vt.data_ptr
    seen = []

    def record():
        seen.append((vt.data_ptr, torch.from_dlpack(vt).data_ptr(), np.from_dlpack(vt).ctypes.data))

    record()
    vt.map(0, 2)
    record()
    want = fill_pages(vt, [0, 1], rng)
    vt.offload(0, 2).wait()
    record()
    vt.prefetch(0, 2).wait()
    record()
    assert_pages(vt, want)
    vt.unmap(1, 1)
    record()
    vt.ensure(4 * PB)
    record()
    other.map(0, 1)
    vt.unmap(3, 1)
    vt.alias(3, other, 0)
    record()
    pool.resize(10)
    record()
    vt.unmap(2, 2)
    pool.resize(4)
    record()
    assert seen == [(base, base, base)] * len(seen)
    assert_pages(vt, {0: want[0]})


# --- Zero reads and stray writes ---------------------------------------------------------------


def test_unmapped_pages_read_zero_after_unmap(rng):
    pool = make_pool(4)
    vt = kvcore.VirtualTensor(pool, [4 * PB], "uint8")
    vt.map(0, 4)
    want = fill_pages(vt, range(4), rng)
    vt.unmap(1, 2)
    assert_zero(vt, [1, 2])
    assert_pages(vt, {0: want[0], 3: want[3]})
    assert vt.mapped_pages() == [0, 3]
    assert pool.free_pages == 2
    # A remapped page holds arbitrary contents, but a write to it is kept exactly.
    vt.map(1, 1)
    again = fill_pages(vt, [1], rng)
    assert_pages(vt, {**again, 0: want[0], 3: want[3]})
    assert_zero(vt, [2])


def test_stray_write_to_unmapped_page_is_harmless(rng):
    pool = make_pool(3)
    owner = kvcore.VirtualTensor(pool, [3 * PB], "uint8")
    owner.map(0, 2)
    want = fill_pages(owner, [0, 1], rng)
    vt = kvcore.VirtualTensor(pool, [3 * PB], "uint8")
    view = np.from_dlpack(vt)
    view[:] = random_bytes(rng, 3 * PB)  # nothing mapped: every byte is a stray write
    view[PB:2 * PB] = random_bytes(rng, PB)
    assert_pages(owner, want)  # no pool page was touched
    assert pool.free_pages == 1
    check_accounting(pool)
    # Mapping the last free page and then unmapping it again gives a clean zero page.
    vt.map(1, 1)
    fill_pages(vt, [1], rng)
    vt.unmap(1, 1)
    assert not view[PB:2 * PB].any()
    assert_pages(owner, want)
    del view


def test_offloaded_page_reads_zero(rng):
    pool = make_pool(4, host_pages=2)
    vt = kvcore.VirtualTensor(pool, [2, PB // 4], "float32")
    vt.map(0, 2)
    want = fill_pages(vt, [0, 1], rng)
    vt.offload(1, 1)
    assert_zero(vt, [1])
    assert_pages(vt, {0: want[0]})
    assert not np.from_dlpack(vt)[1].any()


# --- Sharing ----------------------------------------------------------------------------------


def test_alias_shares_memory_and_is_refcounted(rng):
    torch = pytest.importorskip("torch")
    pool = make_pool(4)
    a = kvcore.VirtualTensor(pool, [3, PB // 2], "float16")
    b = kvcore.VirtualTensor(pool, [4 * PB], "uint8")
    a.map(0, 2)
    b.alias(3, a, 1)
    assert b.physical_page(3) == a.physical_page(1) != a.physical_page(0)
    assert b.mapped_pages() == [3] and b.is_mapped(3)
    assert pool.free_pages == 2
    s = check_accounting(pool)
    assert (s["pages_mapped"], s["pages_shared"]) == (2, 1)

    # A write through a's torch view shows in b's numpy view, and back.
    data = random_array(rng, (PB // 2,), "float16", "torch")
    torch.from_dlpack(a)[1].copy_(data)
    assert read_page(b, 3) == bits(data).tobytes()
    back = random_bytes(rng, PB)
    write_page(b, 3, back)
    assert np.array_equal(bits(np.from_dlpack(a)[1]), back.view(np.uint16))

    # A third mapping of the same physical page.
    c = kvcore.VirtualTensor(pool, [PB], "uint8")
    c.alias(0, b, 3)
    assert c.physical_page(0) == a.physical_page(1)
    assert read_page(c, 0) == back.tobytes()
    assert pool.stats()["pages_shared"] == 1

    # The physical page returns to the pool only after its last mapping goes.
    a.unmap(1, 1)
    assert_zero(a, [1])
    assert pool.free_pages == 2
    assert read_page(b, 3) == back.tobytes()
    b.unmap(3, 1)
    assert pool.free_pages == 2
    assert read_page(c, 0) == back.tobytes()
    assert pool.stats()["pages_shared"] == 0
    c.unmap(0, 1)
    assert pool.free_pages == 3
    s = check_accounting(pool)
    assert (s["pages_mapped"], s["pages_shared"]) == (1, 0)


def test_alias_within_one_tensor(rng):
    pool = make_pool(2)
    vt = kvcore.VirtualTensor(pool, [4 * PB], "uint8")
    vt.map(0, 1)
    vt.alias(2, vt, 0)
    vt.alias(3, vt, 2)
    want = fill_pages(vt, [3], rng)
    assert read_page(vt, 0) == read_page(vt, 2) == want[3]
    assert pool.free_pages == 1
    vt.unmap(0, 1)
    vt.unmap(2, 1)
    assert pool.free_pages == 1
    assert_pages(vt, want)
    vt.unmap(3, 1)
    assert pool.free_pages == 2


def test_alias_errors(rng):
    pool = make_pool(4, host_pages=1)
    a = kvcore.VirtualTensor(pool, [3 * PB], "uint8")
    b = kvcore.VirtualTensor(pool, [3 * PB], "uint8")
    a.map(0, 2)
    b.map(0, 1)
    a.offload(1, 1)
    before = (pool.free_pages, a.mapped_pages(), b.mapped_pages(), pool.host_free_pages)
    with pytest.raises(ValueError, match="different pools"):
        b.alias(1, kvcore.VirtualTensor(make_pool(1), [PB], "uint8"), 0)
    with pytest.raises(ValueError, match="already mapped"):
        b.alias(0, a, 0)  # onto a mapped page
    with pytest.raises(ValueError, match="not mapped"):
        b.alias(1, a, 2)  # from an unmapped page
    with pytest.raises(ValueError, match="not mapped"):
        b.alias(1, a, 1)  # from an offloaded page
    a.map(2, 1)
    with pytest.raises(ValueError, match="already mapped or offloaded"):
        a.alias(1, b, 0)  # onto an offloaded page
    with pytest.raises(IndexError):
        b.alias(3, a, 0)
    with pytest.raises(IndexError):
        b.alias(-1, a, 0)
    with pytest.raises(IndexError):
        b.alias(1, a, 3)
    with pytest.raises(TypeError):
        b.alias(1, np.zeros(4), 0)
    a.unmap(2, 1)
    assert (pool.free_pages, a.mapped_pages(), b.mapped_pages(), pool.host_free_pages) == before
    assert [b.physical_page(i) for i in (1, 2)] == [-1, -1]


# --- Offload and prefetch ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "int64", "uint8"])
def test_offload_prefetch_round_trip(rng, dtype):
    pool = make_pool(6, host_pages=4)
    itemsize = np.dtype(dtype).itemsize
    vt = kvcore.VirtualTensor(pool, [4, PB // itemsize], dtype)
    base = vt.data_ptr
    vt.map(0, 4)
    want = fill_pages(vt, range(4), rng)
    assert pool.free_pages == 2

    tr = vt.offload(1, 2)
    assert tr.done() and tr.bytes == 2 * PB
    tr.wait()
    assert vt.data_ptr == base
    assert [vt.is_offloaded(i) for i in range(4)] == [False, True, True, False]
    assert [vt.is_mapped(i) for i in range(4)] == [True, False, False, True]
    assert vt.physical_page(1) == vt.physical_page(2) == -1
    assert vt.mapped_pages() == [0, 3]
    assert pool.free_pages == 4
    assert pool.host_free_pages == 2
    s = check_accounting(pool)
    assert (s["pages_offloaded"], s["pages_mapped"]) == (2, 2)
    assert_zero(vt, [1, 2])
    assert_pages(vt, {0: want[0], 3: want[3]})

    # Reuse every freed physical page elsewhere and scribble on it: the contents live on the host.
    scratch = kvcore.VirtualTensor(pool, [4 * PB], "uint8")
    scratch.map(0, 4)
    fill_pages(scratch, range(4), rng)
    scratch.unmap(0, 4)

    tr = vt.prefetch(1, 2)
    assert tr.done() and tr.bytes == 2 * PB
    tr.wait()
    assert vt.data_ptr == base
    assert vt.mapped_pages() == [0, 1, 2, 3]
    assert not any(vt.is_offloaded(i) for i in range(4))
    assert pool.free_pages == 2
    assert pool.host_free_pages == 4
    assert check_accounting(pool)["pages_offloaded"] == 0
    assert_pages(vt, want)


def test_offload_prefetch_many_cycles_bit_exact(rng):
    pool = make_pool(3, host_pages=3)
    vt = kvcore.VirtualTensor(pool, [3 * PB], "uint8")
    vt.map(0, 3)
    want = fill_pages(vt, range(3), rng)
    for _ in range(6):
        first = int(rng.integers(0, 3))
        count = int(rng.integers(1, 4 - first))
        vt.offload(first, count)
        assert pool.free_pages == count and pool.host_free_pages == 3 - count
        vt.prefetch(first, count)
        assert pool.free_pages == 0 and pool.host_free_pages == 3
        assert_pages(vt, want)
        page = int(rng.integers(0, 3))
        want.update(fill_pages(vt, [page], rng))


def test_offload_of_aliased_page_keeps_the_other_mapping(rng):
    pool = make_pool(4, host_pages=1)
    a = kvcore.VirtualTensor(pool, [PB], "uint8")
    b = kvcore.VirtualTensor(pool, [PB], "uint8")
    a.map(0, 1)
    b.alias(0, a, 0)
    want = fill_pages(a, [0], rng)
    b.offload(0, 1)
    assert pool.free_pages == 3  # a still maps the physical page
    assert read_page(a, 0) == want[0]
    assert_zero(b, [0])
    later = fill_pages(a, [0], rng)  # does not reach b's host copy
    b.prefetch(0, 1)
    assert read_page(b, 0) == want[0]
    assert read_page(a, 0) == later[0]
    assert a.physical_page(0) != b.physical_page(0)  # a private copy now
    assert pool.free_pages == 2
    assert pool.stats()["pages_shared"] == 0


def test_unmap_of_offloaded_page_discards_its_slot(rng):
    pool = make_pool(2, host_pages=2)
    vt = kvcore.VirtualTensor(pool, [2 * PB], "uint8")
    vt.map(0, 2)
    fill_pages(vt, [0, 1], rng)
    vt.offload(0, 2)
    assert pool.host_free_pages == 0
    vt.unmap(0, 1)
    assert pool.host_free_pages == 1
    assert not vt.is_offloaded(0) and vt.is_offloaded(1)
    assert_zero(vt, [0])
    with pytest.raises(ValueError, match="not offloaded"):
        vt.prefetch(0, 1)
    vt.unmap(1, 1)
    assert (pool.host_free_pages, pool.free_pages) == (2, 2)
    check_accounting(pool)


def test_offload_prefetch_errors_change_nothing(rng):
    pool = make_pool(3, host_pages=2)
    vt = kvcore.VirtualTensor(pool, [4 * PB], "uint8")
    vt.map(0, 3)
    want = fill_pages(vt, range(3), rng)
    with pytest.raises(ValueError, match="not mapped"):
        vt.offload(2, 2)  # page 3 is unmapped
    with pytest.raises(MemoryError, match="host tier is full"):
        vt.offload(0, 3)  # 2 host slots only
    expect_unchanged(pool, vt, 0, [0, 1, 2], 2)
    assert_pages(vt, want)
    with pytest.raises(ValueError, match="not offloaded"):
        vt.prefetch(0, 1)
    vt.offload(1, 1)
    with pytest.raises(ValueError, match="not mapped"):
        vt.offload(1, 1)  # already offloaded
    with pytest.raises(ValueError, match="offloaded"):
        vt.map(1, 1)
    with pytest.raises(ValueError, match="not offloaded"):
        vt.prefetch(1, 2)  # page 2 is mapped
    # Prefetch with an exhausted pool: MemoryError, the page stays offloaded with its slot.
    hog = kvcore.VirtualTensor(pool, [PB], "uint8")
    hog.map(0, 1)
    assert pool.free_pages == 0
    with pytest.raises(MemoryError, match="exhausted"):
        vt.prefetch(1, 1)
    assert vt.is_offloaded(1) and not vt.is_mapped(1)
    assert pool.host_free_pages == 1
    check_accounting(pool)
    hog.unmap(0, 1)
    vt.prefetch(1, 1)
    assert_pages(vt, want)
    assert pool.host_free_pages == 2


def test_offload_without_host_tier_raises_memory_error(rng):
    pool = make_pool(2)
    vt = kvcore.VirtualTensor(pool, [PB], "uint8")
    vt.map(0, 1)
    want = fill_pages(vt, [0], rng)
    with pytest.raises(MemoryError):
        vt.offload(0, 1)
    assert vt.is_mapped(0) and pool.free_pages == 1
    assert_pages(vt, want)


def test_zero_count_operations_are_no_ops():
    pool = make_pool(2, host_pages=1)
    vt = kvcore.VirtualTensor(pool, [2 * PB], "uint8")
    vt.map(0, 0)
    vt.map(2, 0)
    vt.unmap(1, 0)
    assert vt.offload(0, 0).bytes == 0
    assert vt.prefetch(0, 0).bytes == 0
    vt.ensure(0)
    assert vt.mapped_pages() == [] and pool.free_pages == 2 and pool.host_free_pages == 1


# --- ensure -----------------------------------------------------------------------------------


def test_ensure_maps_only_missing_pages(rng):
    pool = make_pool(8, host_pages=1)
    vt = kvcore.VirtualTensor(pool, [6 * PB], "uint8")
    vt.ensure(1)
    assert vt.mapped_pages() == [0] and pool.free_pages == 7
    vt.ensure(PB)
    assert vt.mapped_pages() == [0] and pool.free_pages == 7
    want = fill_pages(vt, [0], rng)
    vt.ensure(PB + 1)
    assert vt.mapped_pages() == [0, 1]
    vt.map(3, 1)
    want.update(fill_pages(vt, [1, 3], rng))
    vt.ensure(5 * PB - 100)
    assert vt.mapped_pages() == [0, 1, 2, 3, 4] and pool.free_pages == 3
    assert_pages(vt, want)  # already-mapped pages are left as they were
    vt.ensure(6 * PB)  # the whole reservation
    assert vt.mapped_pages() == list(range(6))
    assert_pages(vt, want)


def test_ensure_is_all_or_nothing(rng):
    pool = make_pool(3, host_pages=1)
    vt = kvcore.VirtualTensor(pool, [5 * PB], "uint8")
    vt.map(1, 1)
    with pytest.raises(MemoryError):
        vt.ensure(5 * PB)  # needs 4, 2 free
    expect_unchanged(pool, vt, 2, [1])
    vt.offload(1, 1)
    with pytest.raises(ValueError, match="offloaded"):
        vt.ensure(2 * PB)
    expect_unchanged(pool, vt, 3, [], 0)
    with pytest.raises(IndexError):
        vt.ensure(5 * PB + 1)
    with pytest.raises(IndexError):
        vt.ensure(-1)
    expect_unchanged(pool, vt, 3, [], 0)


# --- Arena ------------------------------------------------------------------------------------


def test_arena_alloc_mark_release_reset(rng):
    pool = make_pool(6)
    arena = kvcore.Arena(pool, 4 * PB)
    assert (arena.capacity, arena.used_bytes, arena.mapped_bytes) == (4 * PB, 0, 0)
    x = np.from_dlpack(arena.alloc((10,), "float32"))
    assert x.shape == (10,) and x.dtype == np.float32
    assert arena.used_bytes == 40
    assert arena.mapped_bytes == PB and pool.free_pages == 5  # pages borrowed on demand
    y = np.from_dlpack(arena.alloc((3, 700), np.float16))
    y_off = y.ctypes.data - x.ctypes.data
    assert y_off == 256  # aligned to 256 bytes
    assert arena.used_bytes == 256 + 4200
    assert arena.mapped_bytes == 2 * PB and pool.free_pages == 4
    xd, yd = random_array(rng, x.shape, "float32"), random_array(rng, y.shape, "float16")
    x[:] = xd
    y[:] = yd
    assert np.array_equal(bits(x), bits(xd)) and np.array_equal(bits(y), bits(yd))

    mark = arena.mark()
    z = np.from_dlpack(arena.alloc((PB,), "uint8"))
    zd = random_bytes(rng, PB)
    z[:] = zd
    assert np.array_equal(z, zd)
    assert np.array_equal(bits(x), bits(xd)) and np.array_equal(bits(y), bits(yd))
    assert arena.mapped_bytes == 3 * PB
    arena.release(mark)
    assert arena.used_bytes == mark
    assert arena.mapped_bytes == 3 * PB  # release keeps pages mapped
    z2 = np.from_dlpack(arena.alloc((PB,), "uint8"))
    assert z2.ctypes.data == z.ctypes.data  # the same bytes handed out again
    assert pool.free_pages == 3
    del x, y, z, z2

    arena.reset()
    assert (arena.used_bytes, arena.mapped_bytes) == (0, 0)
    assert pool.free_pages == 6
    w = np.from_dlpack(arena.alloc((2, PB), "uint8"))
    wd = random_bytes(rng, 2 * PB).reshape(2, PB)
    w[:] = wd
    assert np.array_equal(w, wd)
    assert arena.mapped_bytes == 2 * PB and pool.free_pages == 4
    del w
    arena.free()
    assert pool.free_pages == 6 and pool.stats()["tensors"] == 0


def test_arena_errors_leave_it_unchanged(rng):
    pool = make_pool(2)
    arena = kvcore.Arena(pool, 4 * PB, alignment=64)
    a = arena.alloc((100,), "uint8")
    used = arena.used_bytes
    with pytest.raises(MemoryError, match="exceed"):
        arena.alloc((4 * PB,), "uint8")
    with pytest.raises(MemoryError):
        arena.alloc((3 * PB,), "uint8")  # fits the arena, not the pool
    assert arena.used_bytes == used and arena.mapped_bytes == PB and pool.free_pages == 1
    with pytest.raises(ValueError):
        arena.alloc((-1, 4), "uint8")
    with pytest.raises(TypeError):
        arena.alloc((4,), "float64")
    with pytest.raises(ValueError):
        arena.release(used + 1)
    with pytest.raises(ValueError):
        arena.release(-1)
    assert arena.used_bytes == used
    b = np.from_dlpack(arena.alloc((PB,), "uint8"))  # still usable
    assert b.ctypes.data % 64 == 0
    with pytest.raises(ValueError, match="power of two"):
        kvcore.Arena(pool, PB, alignment=48)
    with pytest.raises(ValueError, match="power of two"):
        kvcore.Arena(pool, PB, alignment=0)
    del a, b


# --- resize and reclaim -----------------------------------------------------------------------


def test_resize_grow_and_shrink_free_pages(rng):
    pool = make_pool(2)
    vt = kvcore.VirtualTensor(pool, [6 * PB], "uint8")
    vt.map(0, 2)
    want = fill_pages(vt, [0, 1], rng)
    base = vt.data_ptr
    pool.resize(6)
    assert (pool.capacity_pages, pool.free_pages) == (6, 4)
    vt.map(2, 4)
    want.update(fill_pages(vt, range(2, 6), rng))
    assert pool.free_pages == 0
    vt.unmap(1, 3)
    pool.resize(3)  # takes free pages only
    assert (pool.capacity_pages, pool.free_pages) == (3, 0)
    assert vt.mapped_pages() == [0, 4, 5]
    assert_pages(vt, {p: want[p] for p in (0, 4, 5)})
    assert vt.data_ptr == base
    pool.resize(3)  # no change
    assert (pool.capacity_pages, pool.free_pages) == (3, 0)
    s = check_accounting(pool)
    assert s["pages_total"] == 3 and s["pages_mapped"] == 3
    vt.free()
    pool.resize(0)
    assert (pool.capacity_pages, pool.free_pages) == (0, 0)
    pool.resize(1)
    assert (pool.capacity_pages, pool.free_pages) == (1, 1)


def test_resize_calls_reclaim_with_the_shortfall(rng):
    pool = make_pool(6)
    vt = kvcore.VirtualTensor(pool, [6 * PB], "uint8")
    vt.map(0, 5)
    want = fill_pages(vt, range(5), rng)
    calls = []

    def reclaim(n):
        calls.append(n)
        mapped = vt.mapped_pages()
        for p in mapped[-n:]:  # the coldest pages: the last ones
            vt.unmap(p, 1)
        return min(n, len(mapped))

    pool.on_reclaim(reclaim)
    pool.resize(4)  # need 2, 1 free: short by 1
    assert calls == [1]
    assert (pool.capacity_pages, pool.free_pages) == (4, 0)
    assert vt.mapped_pages() == [0, 1, 2, 3]
    assert_pages(vt, {p: want[p] for p in range(4)})
    pool.resize(5)  # growing never reclaims
    pool.resize(4)  # one free page: enough
    assert calls == [1]
    pool.resize(1)
    assert calls == [1, 3]
    assert pool.capacity_pages == 1 and vt.mapped_pages() == [0]
    assert read_page(vt, 0) == want[0]
    check_accounting(pool)


def test_reclaim_newest_first_and_stops_when_enough(rng):
    pool = make_pool(4)
    vt = kvcore.VirtualTensor(pool, [4 * PB], "uint8")
    vt.map(0, 4)
    order = []

    def old(n):
        order.append(("old", n))
        vt.unmap(0, 1)
        return 1

    def new(n):
        order.append(("new", n))
        vt.unmap(3, 1)
        return 1

    pool.on_reclaim(old)
    new_id = pool.on_reclaim(new)
    pool.resize(3)
    assert order == [("new", 1)]
    assert vt.mapped_pages() == [0, 1, 2]
    pool.remove_reclaim(new_id)
    pool.resize(2)
    assert order == [("new", 1), ("old", 1)]
    assert vt.mapped_pages() == [1, 2] and pool.capacity_pages == 2
    with pytest.raises(ValueError):
        pool.remove_reclaim(new_id)
    with pytest.raises(TypeError):
        pool.on_reclaim(42)


def test_resize_raises_memory_error_with_capacity_unchanged(rng):
    pool = make_pool(5)
    vt = kvcore.VirtualTensor(pool, [5 * PB], "uint8")
    vt.map(0, 4)
    want = fill_pages(vt, range(4), rng)
    calls = []
    pool.on_reclaim(lambda n: calls.append(n))  # frees nothing (returns None)
    with pytest.raises(MemoryError, match="capacity unchanged"):
        pool.resize(2)
    assert calls == [2]
    assert (pool.capacity_pages, pool.free_pages) == (5, 1)
    assert vt.mapped_pages() == [0, 1, 2, 3]
    assert_pages(vt, want)
    check_accounting(pool)

    # A callback that gives back less than asked: still short, still unchanged (but what it
    # unmapped stays unmapped).
    def partial(n):
        calls.append(("partial", n))
        vt.unmap(3, 1)
        return 1

    pool.on_reclaim(partial)
    with pytest.raises(MemoryError):
        pool.resize(1)
    assert calls[-2:] == [("partial", 3), 2]  # newest first, the older one with the new shortfall
    assert (pool.capacity_pages, pool.free_pages) == (5, 2)
    assert_pages(vt, {p: want[p] for p in range(3)})
    with pytest.raises(ValueError):
        pool.resize(-1)
    assert pool.capacity_pages == 5


def test_reclaim_callback_exception_propagates(rng):
    pool = make_pool(2)
    vt = kvcore.VirtualTensor(pool, [2 * PB], "uint8")
    vt.map(0, 2)

    def boom(n):
        raise RuntimeError(f"cannot give back {n}")

    pool.on_reclaim(boom)
    with pytest.raises(RuntimeError, match="cannot give back 1"):
        pool.resize(1)
    assert (pool.capacity_pages, pool.free_pages) == (2, 0)
    check_accounting(pool)


def test_reclaim_callback_referencing_pool_is_collected():
    """A callback that holds its own pool forms a Python cycle that the GC can collect."""

    class Consumer:
        def __init__(self, pool):
            self.pool = pool

        def reclaim(self, n):
            return min(n, self.pool.free_pages)

    pool = make_pool(1)
    pool.on_reclaim(Consumer(pool).reclaim)
    ref = weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is None


# --- stats ------------------------------------------------------------------------------------


def test_stats_accounting(rng):
    pool = make_pool(8, host_pages=3)
    a = kvcore.VirtualTensor(pool, [4 * PB], "uint8")
    b = kvcore.VirtualTensor(pool, [2, PB // 2], "float16")
    a.map(0, 4)
    b.alias(0, a, 0)
    b.alias(1, a, 0)
    fill_pages(a, range(4), rng)
    a.offload(2, 2)
    s = check_accounting(pool)
    assert s["pages_total"] == 8
    assert s["pages_mapped"] == 2  # a's pages 0 and 1
    assert s["pages_shared"] == 1  # page 0: three mappings
    assert s["pages_free"] == 6
    assert s["pages_offloaded"] == 2 and s["host_pages_free"] == 1 and s["host_pages_total"] == 3
    assert s["tensors"] == 2 and s["reserved_bytes"] == 6 * PB
    a.unmap(0, 4)
    b.unmap(0, 2)
    s = check_accounting(pool)
    assert (s["pages_free"], s["pages_mapped"], s["pages_shared"], s["pages_offloaded"]) == (8, 0, 0, 0)
    calls = s["driver_calls"]
    for name in ("map", "unmap", "create", "reserve", "copy"):
        assert calls[name]["count"] > 0, name
        assert calls[name]["mean_us"] > 0, name
    assert calls["create"]["count"] == 8
    assert calls["reserve"]["count"] == 2
    assert calls["map"]["count"] >= 6  # 4 fresh pages + 2 aliases
    assert calls["unmap"]["count"] >= 6  # 2 offloaded, 4 unmapped
    a.free()
    s = pool.stats()
    assert s["tensors"] == 1 and s["reserved_bytes"] == 2 * PB
    assert s["driver_calls"]["release_reservation"]["count"] == 1


# --- free and lifetime ------------------------------------------------------------------------


def test_free_refused_while_a_view_lives(rng):
    torch = pytest.importorskip("torch")
    pool = make_pool(2, host_pages=1)
    vt = kvcore.VirtualTensor(pool, [2 * PB], "uint8")
    vt.map(0, 2)
    fill_pages(vt, [0, 1], rng)
    vt.offload(1, 1)
    for make in (lambda: np.from_dlpack(vt), lambda: torch.from_dlpack(vt), lambda: vt.view(PB, [4], "int32")):
        view = make()
        with pytest.raises(kvcore.KVCoreError, match="view"):
            vt.free()
        assert not vt.is_freed and vt.mapped_pages() == [0]
        del view
    vt.free()
    assert vt.is_freed
    assert pool.free_pages == 2 and pool.host_free_pages == 1
    s = check_accounting(pool)
    assert (s["tensors"], s["reserved_bytes"], s["pages_offloaded"]) == (0, 0, 0)
    assert repr(vt) == "VirtualTensor(freed)"


def test_use_after_free_raises_kvcore_error():
    pool = make_pool(2, host_pages=1)
    vt = kvcore.VirtualTensor(pool, [2 * PB], "uint8")
    other = kvcore.VirtualTensor(pool, [PB], "uint8")
    other.map(0, 1)
    vt.map(0, 1)
    vt.free()
    uses = [
        lambda: vt.map(1, 1),
        lambda: vt.unmap(0, 1),
        lambda: vt.ensure(PB),
        lambda: vt.alias(1, other, 0),
        lambda: other.alias(0, vt, 0),
        lambda: vt.offload(0, 1),
        lambda: vt.prefetch(0, 1),
        lambda: vt.is_mapped(0),
        lambda: vt.is_offloaded(0),
        lambda: vt.mapped_pages(),
        lambda: vt.physical_page(0),
        lambda: vt.view(0, [4], "uint8"),
        lambda: vt.__dlpack__(),
        lambda: np.from_dlpack(vt),
        lambda: vt.free(),
        lambda: vt.map(99, 1),  # freed is reported before the range
    ]
    for use in uses:
        with pytest.raises(kvcore.KVCoreError):
            use()
    assert issubclass(kvcore.KVCoreError, RuntimeError)
    assert pool.free_pages == 1 and other.is_mapped(0)


def test_context_manager_and_garbage_collection_return_pages(rng):
    pool = make_pool(3)
    with kvcore.VirtualTensor(pool, [2 * PB], "uint8") as vt:
        vt.map(0, 2)
        assert pool.free_pages == 1
    assert vt.is_freed and pool.free_pages == 3

    vt = kvcore.VirtualTensor(pool, [3 * PB], "uint8")
    vt.map(0, 3)
    want = fill_pages(vt, range(3), rng)
    view = np.from_dlpack(vt)  # keeps the native tensor alive after the Python object goes
    del vt
    gc.collect()
    assert pool.free_pages == 0
    assert view.tobytes() == b"".join(want[p] for p in range(3))
    del view
    gc.collect()
    assert pool.free_pages == 3
    s = check_accounting(pool)
    assert (s["tensors"], s["reserved_bytes"]) == (0, 0)


def test_view_keeps_tensor_and_pool_alive(rng):
    pool = make_pool(2)
    vt = kvcore.VirtualTensor(pool, [2 * PB], "uint8")
    vt.map(0, 2)
    want = fill_pages(vt, [0, 1], rng)
    view = np.from_dlpack(vt)
    pool_ref = weakref.ref(pool)
    del vt, pool
    gc.collect()
    assert pool_ref() is None  # the Python pool went; the native one lives on behind the view
    assert view.tobytes() == want[0] + want[1]
    view[:PB] = random_bytes(rng, PB)  # still mapped and writable
    del view
    gc.collect()


# --- Argument checks --------------------------------------------------------------------------


def test_out_of_range_pages_raise_index_error():
    pool = make_pool(4, host_pages=2)
    vt = kvcore.VirtualTensor(pool, [3 * PB], "uint8")
    vt.map(0, 1)
    for op in (vt.map, vt.unmap, vt.offload, vt.prefetch):
        for first, count in [(-1, 1), (0, -1), (2, 2), (3, 1), (4, 0), (0, 4)]:
            with pytest.raises(IndexError, match="out of range"):
                op(first, count)
    for op in (vt.is_mapped, vt.is_offloaded, vt.physical_page):
        for page in (-1, 3, 100):
            with pytest.raises(IndexError):
                op(page)
    with pytest.raises(IndexError):
        vt.view(2 * PB, [PB + 1], "uint8")
    with pytest.raises(IndexError):
        vt.view(-4, [1], "uint8")
    with pytest.raises(ValueError):
        vt.view(2, [1], "int32")  # misaligned
    assert vt.mapped_pages() == [0] and pool.free_pages == 3 and pool.host_free_pages == 2


def test_double_map_and_double_unmap_raise_value_error(rng):
    pool = make_pool(4)
    vt = kvcore.VirtualTensor(pool, [4 * PB], "uint8")
    vt.map(1, 1)
    want = fill_pages(vt, [1], rng)
    with pytest.raises(ValueError, match="already mapped"):
        vt.map(1, 1)
    with pytest.raises(ValueError, match="already mapped"):
        vt.map(0, 3)  # partly mapped: nothing changes
    expect_unchanged(pool, vt, 3, [1])
    vt.unmap(1, 1)
    with pytest.raises(ValueError, match="not mapped"):
        vt.unmap(1, 1)
    vt.map(2, 1)
    with pytest.raises(ValueError, match="not mapped"):
        vt.unmap(1, 2)  # partly unmapped: nothing changes
    expect_unchanged(pool, vt, 3, [2])
    del want


def test_exhausted_pool_raises_memory_error_without_partial_mapping(rng):
    pool = make_pool(4)
    a = kvcore.VirtualTensor(pool, [2 * PB], "uint8")
    a.map(0, 2)
    want = fill_pages(a, [0, 1], rng)
    vt = kvcore.VirtualTensor(pool, [5 * PB], "uint8")
    with pytest.raises(MemoryError, match="exhausted"):
        vt.map(0, 3)
    expect_unchanged(pool, vt, 2, [])
    assert_zero(vt, range(5))
    vt.map(1, 2)  # the pool is intact: its two free pages still map
    fill_pages(vt, [1, 2], rng)
    with pytest.raises(MemoryError):
        vt.map(3, 1)
    assert vt.mapped_pages() == [1, 2] and pool.free_pages == 0
    assert_pages(a, want)
    check_accounting(pool)


def test_bad_pool_arguments():
    with pytest.raises(ValueError, match="granularity"):
        kvcore.PagePool("cpu", PB, page_bytes=6000)
    with pytest.raises(ValueError, match="granularity"):
        kvcore.PagePool("cpu", PB, page_bytes=PB // 2)
    for device in ("gpu", "cuda:x", "cpu:0", "", "CUDA"):
        with pytest.raises(ValueError, match="device"):
            kvcore.PagePool(device, PB, page_bytes=PB)
    with pytest.raises(TypeError):
        kvcore.PagePool(0, PB, page_bytes=PB)
    with pytest.raises(ValueError):
        kvcore.PagePool("cpu", -1, page_bytes=PB)
    with pytest.raises(ValueError):
        kvcore.PagePool("cpu", PB, -PB, page_bytes=PB)
    with pytest.raises(ValueError):
        kvcore.PagePool("cpu", PB, page_bytes=-PB)


@pytest.mark.skipif(kvcore.cuda_status()[0], reason="CUDA is usable here")
def test_cuda_pool_without_cuda_raises_kvcore_error():
    with pytest.raises(kvcore.KVCoreError):
        kvcore.PagePool("cuda", 2 << 20)


def test_bad_tensor_arguments():
    pool = make_pool(2)
    unsupported = ["float64", "int8", "bool", np.float64, np.dtype("complex64"), "torch.float64"]
    for dtype in unsupported:
        with pytest.raises(TypeError, match="unsupported dtype"):
            kvcore.VirtualTensor(pool, [16], _resolve_dtype(dtype))
    for shape in ([-1], [4, -2], [0], [3, 0], [], [1] * 9):
        with pytest.raises(ValueError):
            kvcore.VirtualTensor(pool, shape, "uint8")
    with pytest.raises(TypeError, match="PagePool"):
        kvcore.VirtualTensor(pool._native, [4], "uint8")
    assert pool.stats()["tensors"] == 0


# --- Huge arguments (each check runs in a child process: an overflowing check corrupts memory) ---


_CHILD_PRELUDE = """\
import kvcore
pool = kvcore.PagePool("cpu", 4 * 4096, 4096, page_bytes=4096)
vt = kvcore.VirtualTensor(pool, [4 * 4096], "uint8")
vt.map(0, 2)
"""


def _child_outcome(body: str) -> str:
    """Runs `body` after _CHILD_PRELUDE in a fresh interpreter; returns the name of the exception it
    raised, 'no error', or 'crashed: <rc>'."""
    code = (_CHILD_PRELUDE + "try:\n" + textwrap.indent(body.strip(), "    ")
            + "\n    print('no error')\nexcept Exception as e:\n    print(type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"crashed: {r.returncode}"
    return r.stdout.strip().splitlines()[-1]


I64_MAX = 2**63 - 1


@pytest.mark.parametrize("call", [
    f"vt.unmap(0, {I64_MAX})",
    f"vt.map(0, {I64_MAX})",
    f"vt.offload(0, {I64_MAX})",
    f"vt.prefetch(0, {I64_MAX})",
    f"vt.ensure({I64_MAX})",
])
def test_huge_counts_raise_index_error(call):
    assert _child_outcome(call + "\nassert vt.mapped_pages() == [0, 1], vt.mapped_pages()") == "IndexError"


@pytest.mark.parametrize("call", [
    f"vt.unmap(1, {I64_MAX})",
    f"vt.map({I64_MAX}, 1)",
    f"vt.is_mapped({I64_MAX})",
    f"vt.physical_page({I64_MAX})",
    f"vt.offload({I64_MAX}, 1)",
])
def test_huge_page_ranges_raise_index_error(call):
    assert _child_outcome(call) == "IndexError"


@pytest.mark.parametrize("call", [
    "vt.view(0, [2**62, 4], 'uint8')",
    f"vt.view({I64_MAX}, [1], 'uint8')",
])
def test_overflowing_view_is_refused(call):
    assert _child_outcome(call) in ("IndexError", "ValueError")


def test_huge_capacity_is_refused():
    # File-size limit of 1 MiB: a correct pool fails its first large allocation instead of filling RAM.
    body = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        p = kvcore.PagePool("cpu", {I64_MAX}, page_bytes=4096)
        assert p.capacity_pages >= 0, p.capacity_pages
    """)
    assert _child_outcome(body) in ("MemoryError", "ValueError", "KVCoreError")


# --- Threads ----------------------------------------------------------------------------------


def test_threads_share_one_pool(rng):
    threads, rounds, pages = 8, 40, 4
    pool = make_pool(threads * pages + 2, host_pages=threads * 2)
    shared = kvcore.VirtualTensor(pool, [2 * PB], "uint8")
    shared.map(0, 2)
    shared_want = fill_pages(shared, [0, 1], rng)
    seeds = rng.integers(0, 2**32, threads)
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)

    def worker(seed):
        r = np.random.default_rng(seed)
        try:
            start.wait()
            for _ in range(rounds):
                vt = kvcore.VirtualTensor(pool, [pages + 1, PB], "uint8")
                n = int(r.integers(1, pages + 1))
                vt.map(0, n)
                want = fill_pages(vt, range(n), r)
                vt.alias(pages, shared, int(r.integers(0, 2)))
                assert read_page(vt, pages) in shared_want.values()
                assert_pages(vt, want)
                try:
                    vt.offload(0, 1)  # the host tier is shared: it may be momentarily full
                except MemoryError:
                    pass
                else:
                    assert_zero(vt, [0])
                    vt.prefetch(0, 1)  # this thread's own page came back to the pool: room enough
                assert_pages(vt, want)
                k = int(r.integers(0, n))
                vt.unmap(k, 1)
                assert_zero(vt, [k])
                if r.random() < 0.5:
                    vt.unmap(pages, 1)
                vt.free()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def resizer():
        start.wait()
        for i in range(rounds):
            try:
                pool.resize(threads * pages + 2 + (i % 3))
            except MemoryError:
                pass

    ts = [threading.Thread(target=worker, args=(int(s),)) for s in seeds]
    ts.append(threading.Thread(target=resizer))
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    assert not errors, errors[0]
    assert_pages(shared, shared_want)
    s = check_accounting(pool)
    assert s["pages_mapped"] == 2 and s["pages_shared"] == 0
    assert s["pages_free"] == pool.capacity_pages - 2
    assert s["host_pages_free"] == threads * 2 and s["pages_offloaded"] == 0
    assert s["tensors"] == 1 and s["reserved_bytes"] == 2 * PB
    shared.free()
    pool.resize(0)
    assert pool.capacity_pages == 0


def test_host_zero_page_access_is_reported():
    pool = kvcore.PagePool("cpu", 4 << 20)
    assert pool.stats()["zero_page_access"] == "private"
