"""Benchmarks of the kv_cache family: append_kv and copy_pages.

Every case first checks kvcore's result bit-for-bit against a numpy reference, so a wrong kernel is
never timed. Peers: numpy fancy indexing and torch index_copy_/index_put_ (CPU); torch indexing and
plain contiguous copies of the same bytes (CUDA). CPU goal: append_kv of >= 4096 tokens at >= 70% of
the measured copy bandwidth.
"""

from __future__ import annotations

import numpy as np

import kvcore

from ._harness import Device, Row, copy_bandwidth

APPEND_GOAL_PCT = 70.0     # CPU: append_kv GB/s (read + write) as % of the measured copy bandwidth
APPEND_GOAL_TOKENS = 4096  # ... for calls moving at least this many tokens (32 MiB at H=8, D=128)


def _bits(x) -> np.ndarray:
    """Raw bits of a numpy or torch array as a numpy array (bfloat16 safe)."""
    if isinstance(x, np.ndarray):
        return x.view(np.uint8 if x.dtype.itemsize == 1 else f"u{x.dtype.itemsize}")
    t = x.detach().cpu()
    import torch

    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()


def _to_device(dev: Device, x: np.ndarray, dtype: str | None = None):
    """numpy array -> array on `dev` (torch on CUDA, numpy on CPU); bfloat16 needs torch."""
    if not dev.is_cuda and dtype is None:
        return x
    torch = dev.torch
    t = torch.from_numpy(x)
    if dtype is not None:
        t = t.to(getattr(torch, dtype))
    return t.to("cuda") if dev.is_cuda else t


def _best_peer(dev: Device, peers: dict) -> tuple[str, float]:
    best = ("", float("inf"))
    for name, fn in peers.items():
        t = dev.time(fn)
        if t < best[1]:
            best = (name, t)
    return best


def bench_append_kv(dev: Device, quick: bool = False) -> list[Row]:
    rng = np.random.default_rng()
    heads, head_dim, page_size = 8, 128, 16
    dtype = "bfloat16" if dev.is_cuda else None  # numpy float16 on the CPU
    rows = []
    copy_gbps = None
    for tokens in ([256] if quick else [16, 256, 4096, 32768]):
        num_pages = 2 * tokens // page_size + 4
        slots_np = rng.permutation(num_pages * page_size)[:tokens].astype(np.int64)
        k_np = rng.standard_normal((tokens, heads, head_dim)).astype(np.float32)
        v_np = rng.standard_normal((tokens, heads, head_dim)).astype(np.float32)
        if dtype is None:
            k_np, v_np = k_np.astype(np.float16), v_np.astype(np.float16)
        k, v = _to_device(dev, k_np, dtype), _to_device(dev, v_np, dtype)
        slots = _to_device(dev, slots_np)
        cache_shape = (num_pages, page_size, heads, head_dim)
        if dtype is not None:  # torch bfloat16
            kc = dev.torch.full(cache_shape, -3.0, dtype=k.dtype, device=k.device)
        else:
            kc = np.full(cache_shape, -3.0, k_np.dtype)
        vc = kc.clone() if dtype is not None else kc.copy()

        expected = _bits(kc).reshape(-1, heads, head_dim).copy()
        expected[slots_np] = _bits(k).reshape(tokens, heads, head_dim)
        kvcore.append_kv(k, v, kc, vc, slots)
        if not np.array_equal(_bits(kc).reshape(-1, heads, head_dim), expected):
            raise AssertionError(f"append_kv produced a wrong cache on {dev.kind} (tokens={tokens})")

        t = dev.time(lambda: kvcore.append_kv(k, v, kc, vc, slots))
        nbytes = 4 * tokens * heads * head_dim * 2 + slots_np.nbytes  # read k, v; write both; slots
        peers = {}
        if dev.torch is not None and not isinstance(kc, np.ndarray):
            kf, vf = kc.view(-1, heads, head_dim), vc.view(-1, heads, head_dim)
            peers["torch.index_copy_"] = lambda: (kf.index_copy_(0, slots, k), vf.index_copy_(0, slots, v))
        else:
            kf, vf = kc.reshape(-1, heads, head_dim), vc.reshape(-1, heads, head_dim)

            def numpy_peer():
                kf[slots_np] = k_np
                vf[slots_np] = v_np

            peers["numpy fancy index"] = numpy_peer
            if dev.torch is not None:
                torch = dev.torch
                kt, vt = torch.from_numpy(kf), torch.from_numpy(vf)
                kin, vin, st = torch.from_numpy(k_np), torch.from_numpy(v_np), torch.from_numpy(slots_np)
                peers["torch.index_copy_"] = lambda: (kt.index_copy_(0, st, kin), vt.index_copy_(0, st, vin))
        peer, peer_t = _best_peer(dev, peers)
        extra: dict = {}
        if not dev.is_cuda and tokens >= APPEND_GOAL_TOKENS:  # big enough to be a bandwidth figure
            copy = copy_gbps or copy_bandwidth(dev)
            copy_gbps = copy
            pct = 100 * nbytes / t / 1e9 / copy
            extra.update(goal=f">= {APPEND_GOAL_PCT:g}% of the copy bandwidth (got {pct:.0f}%)",
                         goal_met=bool(pct >= APPEND_GOAL_PCT), pct_copy=round(pct, 1))
        rows.append(Row("append_kv", f"T={tokens} H={heads} D={head_dim} ps={page_size} {dtype or 'float16'}",
                        dev.kind, t * 1e6, nbytes / t / 1e9, peer, peer_t * 1e6, nbytes / peer_t / 1e9, extra))
    return rows


def _copy_cases(dev: Device, quick: bool) -> list[tuple[str, int, int]]:
    """(direction, page_bytes, pages) cases; 64 KiB = one 16-token page of K+V at H=8, D=128, bf16."""
    sizes = [(64 << 10, 256)] if quick else [(64 << 10, 256), (64 << 10, 4096), (2 << 20, 128)]
    directions = ["d2d", "d2d-kernel", "d2h", "h2d"] if dev.is_cuda else ["h2h"]
    return [(d, pb, n) for d in directions for pb, n in sizes]


def bench_copy_pages(dev: Device, quick: bool = False) -> list[Row]:
    rng = np.random.default_rng()
    rows = []
    for direction, page_bytes, pages in _copy_cases(dev, quick):
        words = page_bytes // 4
        total_pages = 2 * pages
        src_np = rng.integers(1, 2**31, size=(total_pages, words), dtype=np.int32)
        sp_np = rng.permutation(total_pages)[:pages].astype(np.int64)
        dp_np = rng.permutation(total_pages)[:pages].astype(np.int64)
        if dev.is_cuda:
            torch = dev.torch
            host_src, host_dst = direction == "h2d", direction == "d2h"
            src = torch.from_numpy(src_np)
            src = src.pin_memory() if host_src else src.cuda()
            dst = torch.full((total_pages, words), -1, dtype=torch.int32)
            dst = dst.pin_memory() if host_dst else dst.cuda()
            if direction == "d2d-kernel":
                sp, dp = torch.from_numpy(sp_np).cuda(), torch.from_numpy(dp_np).cuda()
            else:
                sp, dp = sp_np, dp_np
        else:
            src, sp, dp = src_np, sp_np, dp_np
            dst = np.full((total_pages, words), -1, np.int32)

        kvcore.copy_pages(src, dst, sp, dp)
        if dev.is_cuda:
            dev.torch.cuda.synchronize()
        expected = np.full((total_pages, words), -1, np.int32)
        expected[dp_np] = src_np[sp_np]
        if not np.array_equal(_bits(dst), expected.view(np.uint32)):
            raise AssertionError(f"copy_pages produced wrong pages ({direction}, {page_bytes} B x {pages})")

        t = dev.time(lambda: kvcore.copy_pages(src, dst, sp, dp))
        moved = pages * page_bytes
        nbytes = 2 * moved if direction in ("d2d", "d2d-kernel", "h2h") else moved  # PCIe: one side
        peers = {}
        if dev.is_cuda:
            torch = dev.torch
            if direction.startswith("d2d"):
                spt, dpt = torch.as_tensor(sp_np, device="cuda"), torch.as_tensor(dp_np, device="cuda")
                peers["torch dst[dp] = src[sp]"] = lambda: dst.index_copy_(0, dpt, src.index_select(0, spt))
                flat_src, flat_dst = src[:pages], dst[:pages]
                peers["contiguous memcpy"] = lambda: flat_dst.copy_(flat_src)
            else:
                flat_src, flat_dst = src[:pages], dst[:pages]
                peers["contiguous pinned memcpy"] = lambda: flat_dst.copy_(flat_src, non_blocking=True)
        else:
            def numpy_peer():
                dst[dp_np] = src_np[sp_np]

            peers["numpy fancy index"] = numpy_peer
            if dev.torch is not None:
                torch = dev.torch
                st, dt_ = torch.from_numpy(src_np), torch.from_numpy(dst)
                spt, dpt = torch.from_numpy(sp_np), torch.from_numpy(dp_np)
                peers["torch.index_copy_"] = lambda: dt_.index_copy_(0, dpt, st.index_select(0, spt))
        peer, peer_t = _best_peer(dev, peers)
        size = f"{page_bytes >> 10}KiB" if page_bytes < (1 << 20) else f"{page_bytes >> 20}MiB"
        rows.append(Row("copy_pages", f"{direction} {size} x {pages}", dev.kind, t * 1e6, nbytes / t / 1e9,
                        peer, peer_t * 1e6, nbytes / peer_t / 1e9))
    return rows
