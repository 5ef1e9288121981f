"""PagePool / VirtualTensor on CUDA (cuMem* VMM): torch round trips through DLPack, growth keeping
contents, offload/prefetch on torch streams, zero reads, CUDA-graph replay after more pages are
mapped, driver-call accounting, and ordered (never device-wide) release on unmap."""

from __future__ import annotations

import time

import numpy as np
import pytest

import kvcore
from arrays import bits

pytestmark = pytest.mark.cuda

MiB = 1 << 20


@pytest.fixture
def torch():
    import torch

    return torch


def make_pool(pages: int, host_pages: int = 0) -> kvcore.PagePool:
    """A pool of `pages` pages of the device granularity (page_bytes=None picks it)."""
    probe = kvcore.PagePool("cuda", 0)
    g = probe.granularity
    return kvcore.PagePool("cuda", pages * g, host_pages * g)


def random_like(torch, rng, n: int, dtype):
    """n random elements on the GPU, never zero."""
    data = torch.from_numpy(rng.standard_normal(n).astype(np.float32) + 0.25)
    data[data == 0] = 1.0
    return data.to(dtype).cuda()


def page_elems(vt, torch_dtype, torch) -> int:
    return vt.page_bytes // torch.empty((), dtype=torch_dtype).element_size()


def test_cuda_granularity_and_driver_calls(torch):
    pool = make_pool(4)
    assert pool.device == "cuda:0"
    assert pool.granularity == 2 * MiB
    assert pool.page_bytes == pool.granularity
    assert pool.capacity_pages == 4 and pool.free_pages == 4
    vt = kvcore.VirtualTensor(pool, [4 * pool.page_bytes], "uint8")
    vt.map(0, 3)
    vt.unmap(0, 2)
    torch.cuda.synchronize()
    s = pool.stats()
    assert s["granularity"] == 2 * MiB and s["page_bytes"] == 2 * MiB
    for name in ("map", "set_access", "unmap", "create", "reserve"):
        assert s["driver_calls"][name]["count"] > 0, name
        assert s["driver_calls"][name]["mean_us"] > 0, name
    assert s["pages_free"] + s["pages_mapped"] + s["pages_releasing"] == s["pages_total"] == 4
    assert pool.free_pages == 3
    vt.free()
    assert pool.free_pages == 4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_round_trip_through_torch(rng, torch, dtype):
    pool = make_pool(4)
    tdt = getattr(torch, dtype)
    vt = kvcore.VirtualTensor(pool, [3, pool.page_bytes // torch.empty((), dtype=tdt).element_size()], dtype)
    assert vt.device == "cuda:0"
    assert vt.__dlpack_device__() == (2, 0)
    t = torch.from_dlpack(vt)
    assert t.device.type == "cuda" and t.dtype == tdt and tuple(t.shape) == vt.shape
    assert t.data_ptr() == vt.data_ptr
    torch.cuda.synchronize()
    assert int(torch.count_nonzero(t)) == 0  # nothing mapped: the zero page everywhere

    vt.map(0, 2)
    data = random_like(torch, rng, 2 * t.shape[1], tdt).view(2, -1)
    t[:2].copy_(data)
    torch.cuda.synchronize()
    assert np.array_equal(bits(t[:2]), bits(data))
    assert int(torch.count_nonzero(t[2])) == 0  # page 2 still unmapped
    # A fresh DLPack view sees the same bytes.
    assert np.array_equal(bits(torch.from_dlpack(vt)[:2]), bits(data))
    del t
    vt.free()
    assert pool.free_pages == 4


def test_cuda_growth_keeps_contents(rng, torch):
    pool = make_pool(6)
    vt = kvcore.VirtualTensor(pool, [6 * pool.page_bytes // 2], "bfloat16")
    base = vt.data_ptr
    t = torch.from_dlpack(vt)
    n = page_elems(vt, torch.bfloat16, torch)
    vt.map(0, 1)
    first = random_like(torch, rng, n, torch.bfloat16)
    t[:n].copy_(first)
    for grown in range(2, 7):
        vt.map(grown - 1, 1)  # grow by one page
        assert vt.data_ptr == base and t.data_ptr() == base
        more = random_like(torch, rng, n, torch.bfloat16)
        t[(grown - 1) * n:grown * n].copy_(more)
        torch.cuda.synchronize()
        assert np.array_equal(bits(t[:n]), bits(first)), f"page 0 changed after growing to {grown} pages"
        assert np.array_equal(bits(t[(grown - 1) * n:grown * n]), bits(more))
    assert pool.free_pages == 0
    # ensure() is a no-op once everything is mapped.
    vt.ensure(vt.nbytes)
    assert pool.free_pages == 0


def test_cuda_unmapped_pages_read_zero(rng, torch):
    pool = make_pool(3)
    vt = kvcore.VirtualTensor(pool, [3 * pool.page_bytes // 4], "float32")
    t = torch.from_dlpack(vt)
    n = page_elems(vt, torch.float32, torch)
    vt.map(0, 3)
    data = random_like(torch, rng, 3 * n, torch.float32)
    t.copy_(data)
    vt.unmap(1, 1, stream=torch.cuda.current_stream())
    torch.cuda.synchronize()
    assert pool.free_pages == 1  # the ordered release has completed (and is processed here)
    assert int(torch.count_nonzero(t[n:2 * n])) == 0
    assert np.array_equal(bits(t[:n]), bits(data[:n]))
    assert np.array_equal(bits(t[2 * n:]), bits(data[2 * n:]))


def test_cuda_alias_shares_pages(rng, torch):
    pool = make_pool(3)
    a = kvcore.VirtualTensor(pool, [pool.page_bytes // 2], "float16")
    b = kvcore.VirtualTensor(pool, [2, pool.page_bytes // 2], "float16")
    a.map(0, 1)
    b.alias(1, a, 0)
    assert b.physical_page(1) == a.physical_page(0)
    data = random_like(torch, rng, pool.page_bytes // 2, torch.float16)
    torch.from_dlpack(a).copy_(data)
    torch.cuda.synchronize()
    assert np.array_equal(bits(torch.from_dlpack(b)[1]), bits(data))
    assert pool.free_pages == 2 and pool.stats()["pages_shared"] == 1
    a.unmap(0, 1)
    torch.cuda.synchronize()
    assert pool.free_pages == 2  # b still maps it
    assert np.array_equal(bits(torch.from_dlpack(b)[1]), bits(data))
    b.unmap(1, 1)
    torch.cuda.synchronize()
    assert pool.free_pages == 3


def test_cuda_offload_prefetch_on_current_stream(rng, torch):
    pool = make_pool(4, host_pages=2)
    vt = kvcore.VirtualTensor(pool, [4 * pool.page_bytes // 2], "bfloat16")
    base = vt.data_ptr
    t = torch.from_dlpack(vt)
    n = page_elems(vt, torch.bfloat16, torch)
    vt.map(0, 4)
    data = random_like(torch, rng, 4 * n, torch.bfloat16)
    t.copy_(data)
    stream = torch.cuda.current_stream()

    tr = vt.offload(1, 2, stream=stream)
    assert tr.bytes == 2 * vt.page_bytes
    stream.synchronize()
    assert tr.done()
    tr.wait()
    assert vt.data_ptr == base
    assert vt.is_offloaded(1) and vt.is_offloaded(2) and vt.mapped_pages() == [0, 3]
    assert pool.free_pages == 2 and pool.host_free_pages == 0
    assert int(torch.count_nonzero(t[n:3 * n])) == 0  # offloaded pages read zeros
    # Reuse the freed pages and scribble over them: the contents live in the host tier.
    scratch = kvcore.VirtualTensor(pool, [2 * pool.page_bytes], "uint8")
    scratch.map(0, 2)
    torch.from_dlpack(scratch).fill_(0xA5)
    scratch.free(stream=stream)
    stream.synchronize()

    tr = vt.prefetch(1, 2, stream=stream)
    stream.synchronize()
    assert tr.done()
    assert vt.data_ptr == base and t.data_ptr() == base
    assert vt.mapped_pages() == [0, 1, 2, 3]
    assert pool.free_pages == 0 and pool.host_free_pages == 2
    assert np.array_equal(bits(t), bits(data))


def test_cuda_offload_prefetch_on_side_stream_is_asynchronous(rng, torch):
    pool = make_pool(2, host_pages=1)
    vt = kvcore.VirtualTensor(pool, [pool.page_bytes // 4], "float32")
    t = torch.from_dlpack(vt)
    vt.map(0, 1)
    data = random_like(torch, rng, t.numel(), torch.float32)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        t.copy_(data)
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued before the copy-out
    tr = vt.offload(0, 1, stream=s)
    assert not tr.done()  # queued behind the sleep, not performed synchronously
    assert pool.free_pages == 1  # the page is released only after the copy
    tr.wait()
    assert tr.done()
    assert pool.free_pages == 2
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
    tr = vt.prefetch(0, 1, stream=s)
    assert not tr.done()
    with torch.cuda.stream(s):
        out = t.clone()  # ordered after the prefetch on s
    s.synchronize()
    assert tr.done()
    assert np.array_equal(bits(out), bits(data))


def test_cuda_graph_replays_after_more_pages_are_mapped(rng, torch):
    pool = make_pool(4)
    vt = kvcore.VirtualTensor(pool, [4 * pool.page_bytes // 4], "float32")
    view = torch.from_dlpack(vt)
    n = page_elems(vt, torch.float32, torch)
    vt.map(0, 1)
    first = random_like(torch, rng, n, torch.float32)
    view[:n].copy_(first)
    out_first = torch.empty(n, device="cuda")
    out_all = torch.empty(4 * n, device="cuda")

    # Warm up on a side stream, then capture reads of the first page and of the whole range (of
    # which only page 0 is mapped now).
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out_first.copy_(view[:n])
        out_all.copy_(view)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_first.copy_(view[:n])
        out_all.copy_(view)
    graph.replay()
    torch.cuda.synchronize()
    assert np.array_equal(bits(out_first), bits(first))
    assert np.array_equal(bits(out_all[:n]), bits(first))
    assert int(torch.count_nonzero(out_all[n:])) == 0

    vt.map(1, 3)  # grow while the graph holds the address
    new_first = random_like(torch, rng, n, torch.float32)
    rest = random_like(torch, rng, 3 * n, torch.float32)
    view[:n].copy_(new_first)
    view[n:].copy_(rest)
    graph.replay()
    torch.cuda.synchronize()
    assert np.array_equal(bits(out_first), bits(new_first))
    assert np.array_equal(bits(out_all[:n]), bits(new_first))
    assert np.array_equal(bits(out_all[n:]), bits(rest))
    assert vt.data_ptr == view.data_ptr()


def test_cuda_unmap_orders_release_without_synchronizing(torch):
    pool = make_pool(3)
    vt = kvcore.VirtualTensor(pool, [3 * pool.page_bytes], "uint8")
    vt.map(0, 2)
    assert pool.free_pages == 1
    x = torch.zeros(4, device="cuda")  # allocated up front: no allocation while the sleep runs
    torch.cuda.synchronize()
    s = torch.cuda.Stream()  # a non-blocking stream from torch's pool
    with torch.cuda.stream(s):
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time
    start = time.perf_counter()
    vt.unmap(0, 2, stream=s)
    elapsed = time.perf_counter() - start
    # unmap returned while the kernel it is ordered behind still runs: no device, context or
    # stream synchronization on the way.
    assert not s.query(), "the stream finished before unmap returned: unmap synchronized"
    assert elapsed < 0.25, f"unmap took {elapsed:.3f} s"
    assert vt.mapped_pages() == [] and not vt.is_mapped(0)
    assert pool.free_pages == 1  # not free until the work queued before the unmap completes
    assert pool.stats()["pages_releasing"] == 2
    # Other streams are not held up by the pending release either.
    x.add_(1)
    torch.cuda.current_stream().synchronize()
    assert not s.query()
    assert pool.free_pages == 1
    s.synchronize()
    assert pool.free_pages == 3
    st = pool.stats()
    assert st["pages_releasing"] == 0 and st["pages_mapped"] == 0
    assert int(x.sum()) == 4


def test_cuda_free_refused_while_viewed_and_use_after_free(torch):
    pool = make_pool(2)
    vt = kvcore.VirtualTensor(pool, [pool.page_bytes // 2], "bfloat16")
    vt.map(0, 1)
    t = torch.from_dlpack(vt)
    with pytest.raises(kvcore.KVCoreError):
        vt.free()
    del t
    vt.free()
    assert pool.free_pages == 2
    with pytest.raises(kvcore.KVCoreError):
        vt.map(0, 1)
    with pytest.raises(kvcore.KVCoreError):
        torch.from_dlpack(vt)


def test_cuda_pool_exhaustion_and_errors(torch):
    pool = make_pool(2, host_pages=1)
    vt = kvcore.VirtualTensor(pool, [3 * pool.page_bytes], "uint8")
    with pytest.raises(MemoryError):
        vt.map(0, 3)
    assert pool.free_pages == 2 and vt.mapped_pages() == []
    vt.map(0, 2)
    with pytest.raises(MemoryError):
        vt.offload(0, 2)  # one host slot
    with pytest.raises(ValueError):
        vt.map(1, 1)
    with pytest.raises(IndexError):
        vt.unmap(2, 2)
    with pytest.raises(ValueError, match="granularity"):
        kvcore.PagePool("cuda", 4 * MiB, page_bytes=MiB)
    assert vt.mapped_pages() == [0, 1] and pool.host_free_pages == 1
