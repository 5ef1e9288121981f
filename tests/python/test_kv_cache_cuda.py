"""append_kv and copy_pages on the device, run on a real GPU (cuda) and on the SIMT harness (simt):
bit-identical to the CPU backend on fresh random inputs, with poisoned outputs; debug-mode index
reports; streams and CUDA-graph capture (torch, on the GPU)."""

from __future__ import annotations

import numpy as np
import pytest

import kvcore
from arrays import POISON, bits, random_array

@pytest.fixture
def torch():
    import torch

    return torch


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("heads,head_dim", [(8, 128), (1, 64), (3, 7), (2, 256)])
@pytest.mark.parametrize("page_size", [1, 16, 33])
def test_append_kv_cuda_equals_cpu(dev, rng, torch, dtype, heads, head_dim, page_size):
    tokens = int(rng.integers(1, 300))
    num_pages = tokens // page_size + 2
    slots = rng.permutation(num_pages * page_size)[:tokens]
    slots[rng.random(tokens) < 0.1] = -1
    slots = torch.from_numpy(slots.astype(rng.choice([np.int32, np.int64])))
    # A fused-QKV-like source (token stride > heads * head_dim) and an interleaved [P, 2, S, H, D] cache.
    qkv = random_array(rng, (tokens, 3 * heads, head_dim), dtype, "torch")
    k, v = qkv[:, heads:2 * heads], qkv[:, 2 * heads:]
    cpu_buf = torch.full((num_pages, 2, page_size, heads, head_dim), POISON, dtype=getattr(torch, dtype))
    gpu_buf = dev.put(cpu_buf)
    gqkv = dev.put(qkv)

    kvcore.append_kv(k, v, cpu_buf[:, 0], cpu_buf[:, 1], slots)
    dev.kv.append_kv(gqkv[:, heads:2 * heads], gqkv[:, 2 * heads:], gpu_buf[:, 0], gpu_buf[:, 1], dev.put(slots))
    dev.sync()

    assert np.array_equal(bits(dev.host(gpu_buf)), bits(cpu_buf))


def test_append_kv_cuda_misaligned_views(dev, rng, torch):
    """An odd element offset forces the 2-byte path; still identical to the CPU."""
    tokens, heads, head_dim = 37, 2, 64
    flat = random_array(rng, (tokens * heads * head_dim + 1,), "float16", "torch")
    k = flat[1:].view(tokens, heads, head_dim)
    cache_flat = torch.full((5 * 16 * heads * head_dim + 1,), POISON, dtype=torch.float16)
    cpu_cache = cache_flat[1:].view(5, 16, heads, head_dim)
    gpu_flat = dev.put(cache_flat)
    gpu_cache = gpu_flat[1:].view(5, 16, heads, head_dim)
    gk = dev.put(flat)[1:].view(tokens, heads, head_dim)
    slots = torch.from_numpy(rng.permutation(80)[:tokens].astype(np.int64))
    kvcore.append_kv(k, k, cpu_cache, cpu_cache.clone(), slots)
    dev.kv.append_kv(gk, gk, gpu_cache, dev.put(cache_flat)[1:].view(5, 16, heads, head_dim), dev.put(slots))
    dev.sync()
    assert np.array_equal(bits(dev.host(gpu_cache)), bits(cpu_cache))


def test_append_kv_cuda_bad_slots(dev, rng, torch):
    host_k = random_array(rng, (4, 2, 64), "bfloat16", "torch")
    k = dev.put(host_k)
    cache = dev.full((2, 4, 2, 64), POISON, torch.bfloat16)
    slots = dev.put(torch.tensor([0, 9, 3, 1], dtype=torch.int32))  # 9 >= 8 slots
    dev.kv.set_debug_checks(True)
    try:
        with pytest.raises(IndexError, match=r"slot_mapping\[1\] = 9 is out of range"):
            dev.kv.append_kv(k, k, cache, cache.clone(), slots)
    finally:
        dev.kv.set_debug_checks(False)
    # Without debug checks the bad token is skipped and the others land.
    dev.kv.append_kv(k, k, cache, cache.clone(), slots)
    dev.sync()
    flat = dev.host(cache).view(-1, 2, 64)
    assert torch.equal(flat[torch.tensor([0, 3, 1])], host_k[torch.tensor([0, 2, 3])])


def test_append_kv_cuda_mixed_devices_rejected(dev, torch):
    k = dev.put(torch.randn(4, 2, 64))
    cache = dev.put(torch.zeros(2, 4, 2, 64) + 1)
    with pytest.raises(ValueError, match="slot_mapping is on cpu but k is on cuda:0"):
        dev.kv.append_kv(k, k, cache, cache.clone(), torch.arange(4, dtype=torch.int32))


@pytest.mark.cuda
def test_append_kv_cuda_uses_the_given_stream(rng, torch):
    tokens, heads, head_dim = 64, 8, 128
    k = random_array(rng, (tokens, heads, head_dim), "bfloat16", "torch").cuda()
    cache = torch.full((8, 16, heads, head_dim), POISON, device="cuda", dtype=torch.bfloat16)
    v_cache = cache.clone()
    slots = torch.randperm(128, device="cuda")[:tokens]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # default: torch's current stream
        kvcore.append_kv(k, k, cache, v_cache, slots)
    kvcore.append_kv(k, k, cache, v_cache, slots, stream=stream)
    kvcore.append_kv(k, k, cache, v_cache, slots, stream=stream.cuda_stream)
    stream.synchronize()
    assert torch.equal(cache.view(-1, heads, head_dim)[slots], k)


@pytest.mark.parametrize("direction", ["d2d", "d2h", "h2d"])
@pytest.mark.parametrize("lists_on", ["cpu", "cuda"])
@pytest.mark.parametrize("page_shape", [(16, 8, 128), (3, 5), (1,)])
def test_copy_pages_cuda_equals_cpu(dev, rng, torch, direction, lists_on, page_shape):
    total = int(rng.integers(2, 40))
    n = int(rng.integers(1, total + 1))
    src_host = random_array(rng, (total, *page_shape), "bfloat16", "torch")
    dst_host = torch.full((total, *page_shape), POISON, dtype=torch.bfloat16)
    sp = torch.from_numpy(rng.integers(0, total, n))
    # Runs of consecutive pages exercise the merged DMA path.
    dp = torch.from_numpy(np.sort(rng.permutation(total)[:n]) if rng.random() < 0.5 else rng.permutation(total)[:n])
    expected = dst_host.clone()
    kvcore.copy_pages(src_host, expected, sp, dp)

    src = dev.put(src_host) if direction in ("d2d", "d2h") else dev.pinned(src_host)
    dst = dev.put(dst_host) if direction in ("d2d", "h2d") else dev.pinned(dst_host)
    if lists_on == "cuda":
        sp, dp = dev.put(sp), dev.put(dp)
    dev.kv.copy_pages(src, dst, sp, dp)
    dev.sync()
    assert np.array_equal(bits(dev.host(dst)), bits(expected))


def test_copy_pages_cuda_device_lists_need_pinned_host_memory(dev, torch):
    src = dev.put(torch.randn(4, 256))
    dst = torch.zeros(4, 256) + 1  # pageable
    lists = dev.put(torch.arange(4))
    with pytest.raises(ValueError, match="pageable host memory"):
        dev.kv.copy_pages(src, dst, lists, lists)
    dev.kv.copy_pages(src, dst, torch.arange(4), torch.arange(4))  # host lists: DMA from pageable memory works
    dev.sync()
    assert torch.equal(dst, dev.host(src))


def test_copy_pages_cuda_debug_reports_bad_device_lists(dev, torch):
    src = dev.put(torch.randn(4, 64))
    dst = dev.full((3, 64), POISON, torch.float32)
    dev.kv.set_debug_checks(True)
    try:
        with pytest.raises(IndexError, match=r"dst_pages\[1\] = 3 is out of range \[0, 3\)"):
            dev.kv.copy_pages(src, dst, dev.put(torch.tensor([0, 1])), dev.put(torch.tensor([0, 3])))
    finally:
        dev.kv.set_debug_checks(False)


@pytest.mark.cuda
def test_copy_pages_cuda_graph_capture(rng, torch):
    """With page lists on the device, copy_pages is captured once and replayed with new lists."""
    src = random_array(rng, (64, 4096), "float16", "torch").cuda()
    dst = torch.full((64, 4096), POISON, device="cuda", dtype=torch.float16)
    sp = torch.randperm(64, device="cuda")[:16]
    dp = torch.randperm(64, device="cuda")[:16]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        kvcore.copy_pages(src, dst, sp, dp)  # warm-up outside the capture
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        kvcore.copy_pages(src, dst, sp, dp)
    sp.copy_(torch.randperm(64, device="cuda")[:16])
    dp.copy_(torch.randperm(64, device="cuda")[:16])
    dst.fill_(POISON)
    graph.replay()
    torch.cuda.synchronize()
    expected = torch.full_like(dst, POISON)
    expected[dp] = src[sp]
    assert torch.equal(dst, expected)
