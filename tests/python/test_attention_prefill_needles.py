"""Needle tests of the tensor-core prefill kernel: a key lost or counted twice at a split boundary,
a key-tile boundary or the causal diagonal changes the output and LSE far beyond 1e-5.

Background keys are tiny; "needle" keys sit at every split and key-tile boundary (both sides) the
kernel's plan produces and on the causal diagonal of each warp's rows. Needle n is 8 e_c(n) with
its own coordinate c(n); a query row is 8 e_c(target) (+ 8 e_c(decoy)), where the target is a
visible needle and the decoy the nearest needle just outside the row's visibility (past the
diagonal or before the window). So the target's logit is 64 and every other logit is below 1: the
output is the target's value row to within e^-60 and the LSE is 64 + ~0. A dropped target, a
doubled one or a decoy leaking in moves the LSE by >= ln 2. Compared with the float64 reference
at 1e-5 relative; outputs poisoned with NaN first; fresh random inputs each run."""

from __future__ import annotations

import numpy as np
import pytest

from arrays import to_numpy_f32
from attention_reference import paged_attention_reference
from devices import on_device
from test_attention import paged_case

torch = pytest.importorskip("torch")

NAN = float("nan")
ROWS = 64  # query rows per CTA (tc::kRows)


def sm_count(dev) -> int:
    if dev.name == "cuda":
        return torch.cuda.get_device_properties(0).multi_processor_count
    return int(dev.control.sm_count())


def plan(seq_lens, q_lens, hq, hkv, d, capacity, sms, causal, window):
    """The kernel's split and tile plan (attention.cu plan_paged / choose_splits, prefill_tc.cuh):
    per CTA, its query positions and the key ranges of its splits and tiles."""
    group = hq // hkv
    tpt = max(1, ROWS // group)
    tiles = -(-int(np.sum(q_lens)) // tpt) + len(seq_lens)
    ctas = tiles * hkv
    want = -(-2 * sms // ctas)
    splits = int(np.clip(min(want, max(1, capacity // 256)), 1, 64))
    keys_per_tile = 64 if d <= 128 else 32
    ctas_out = []
    for b, (n, q) in enumerate(zip(seq_lens, q_lens)):
        for t0 in range(0, q, tpt):
            pos = [n - q + t for t in range(t0, min(q, t0 + tpt))]
            lo, hi = 0, n
            if causal:
                hi = min(hi, pos[-1] + 1)
            if window:
                lo = max(lo, pos[0] - window + 1)
            hi = max(hi, lo)
            bounds = [lo + (hi - lo) * s // splits for s in range(splits + 1)]
            tile_starts = [k for s in range(splits) for k in range(bounds[s], bounds[s + 1], keys_per_tile)]
            warp_pos = [pos[r // group] for r in range(0, len(pos) * group, 16)]  # first row of each warp
            warp_pos += [pos[min(len(pos) - 1, (r + 15) // group)] for r in range(0, len(pos) * group, 16)]
            ctas_out.append((b, bounds, tile_starts, warp_pos))
    return splits, ctas_out


def needle_case(rng, dtype, d, hq, hkv, seq_lens, q_lens, causal, window, sms):
    page_size = 16
    args = paged_case(rng, dtype, hq=hq, hkv=hkv, d=d, page_size=page_size, decode=False, seq_lens=seq_lens,
                      q_lens=q_lens)
    args = {key: torch.as_tensor(x) for key, x in args.items()}
    table = args["block_table"].numpy()
    capacity = table.shape[1] * page_size
    splits, ctas = plan(seq_lens, q_lens, hq, hkv, d, capacity, sms, causal, window)
    k = args["k_cache"].float()
    v = args["v_cache"].float()
    k.uniform_(-0.02, 0.02, generator=torch.Generator().manual_seed(int(rng.integers(1 << 31))))
    q = torch.zeros(tuple(args["q"].shape))
    cu = args["cu_seqlens_q"].numpy()
    needles_per_request = []
    for b, n in enumerate(seq_lens):
        wanted = set()
        for cb, bounds, tile_starts, warp_pos in ctas:
            if cb != b:
                continue
            for x in bounds[:-1] + tile_starts:  # both sides of every boundary
                wanted.update((x - 1, x))
            for x in warp_pos:  # the diagonal: the warp's edge rows' own key and the next one
                wanted.update((x, x + 1))
        wanted = sorted(x for x in wanted if 0 <= x < n)
        # One coordinate per needle: at most d needles, keeping boundaries spread over the sequence.
        if len(wanted) > d:
            wanted = [wanted[i] for i in np.linspace(0, len(wanted) - 1, d).astype(int)]
        coords = rng.permutation(d)[:len(wanted)]
        for j, c in zip(wanted, coords):
            page, slot = table[b, j // page_size], j % page_size
            k[page, slot] = 0.0
            k[page, slot, :, c] = 8.0
        needles_per_request.append(list(zip(wanted, coords)))
        # Rows: each (token, head) targets a visible needle, round robin so that every needle is hit.
        q_len = int(q_lens[b])
        for t in range(q_len):
            pos = n - q_len + t
            visible = [(j, c) for j, c in needles_per_request[b]
                       if (not causal or j <= pos) and (not window or j > pos - window)]
            after = [(j, c) for j, c in needles_per_request[b] if causal and j > pos]
            before = [(j, c) for j, c in needles_per_request[b] if window and j <= pos - window]
            decoy = after[0] if after else (before[-1] if before else None)
            for h in range(hq):
                row = cu[b] + t
                if visible:
                    q[row, h, visible[(t * hq + h) % len(visible)][1]] = 8.0
                if decoy is not None:
                    q[row, h, decoy[1]] = 8.0
    dt = args["q"].dtype
    args["q"] = q.to(dt)
    args["k_cache"] = k.to(dt)
    args["v_cache"] = v.to(dt)
    return args, splits


# (head_dim, group, q_len of the long request): query lengths not multiples of 16, GQA 1/4/8.
CASES = [(64, 1, 37), (80, 4, 29), (96, 8, 45), (128, 4, 53), (192, 1, 21), (256, 8, 19)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["causal", "non_causal", "window"])
@pytest.mark.parametrize("head_dim,group,q_len", CASES)
def test_prefill_needles_at_split_and_tile_boundaries(dev, rng, head_dim, group, q_len, mode, dtype):
    hkv = 2 if group < 8 else 1
    hq = hkv * group
    causal = mode != "non_causal"
    window = 100 if mode == "window" else 0  # wider than a key tile: every window holds a needle
    seq_lens = np.array([1100, 150], np.int32)
    q_lens = np.array([q_len, 11], np.int32)
    args, splits = needle_case(rng, dtype, head_dim, hq, hkv, seq_lens, q_lens, causal, window, sm_count(dev))
    assert splits > 1  # the plan splits the keys: split boundaries are exercised
    options = dict(causal=causal, scale=1.0, **(dict(window=window) if window else {}))
    want, want_lse = paged_attention_reference(args["q"], args["k_cache"], args["v_cache"], args["block_table"],
                                               args["seq_lens"], args["cu_seqlens_q"], **options)
    gpu = on_device(dev, args)
    out = dev.nan_like(gpu["q"])
    lse = dev.full(tuple(want_lse.shape), NAN, torch.float32)
    got, got_lse = dev.kv.paged_prefill(**gpu, out=out, lse=lse, return_lse=True, **options)
    dev.sync()
    g, gl = to_numpy_f32(got), to_numpy_f32(got_lse)
    assert not np.isnan(g).any() and not np.isnan(gl).any()
    assert (want_lse > 60).all()  # every row found its target
    np.testing.assert_allclose(gl, want_lse, rtol=1e-5, atol=0)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
