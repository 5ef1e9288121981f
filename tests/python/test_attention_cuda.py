"""The attention family on the device, run twice: on a real GPU (cuda) and on the SIMT harness
(simt), which executes the same CUDA kernels on the CPU. Every op is compared with kvcore's CPU
backend (the same call on host copies, itself checked against the float64 reference in
test_attention.py), outputs poisoned (NaN) before each call; split-KV over long sequences, large
shared-prefix groups, debug-mode index reports. CUDA-graph capture and stream semantics run on the
GPU through torch, and on the harness through its emulated capture."""

from __future__ import annotations

import numpy as np
import pytest

import kvcore
from arrays import random_array, to_numpy_f32
from devices import on_device
from test_attention import (
    HEAD_CONFIGS,
    OPTION_SETS,
    SHARED_OPTIONS,
    alloc_tables,
    cu_of,
    paged_case,
    ragged_q_lens,
    ragged_seq_lens,
    random_states,
    shared_case,
)

torch = pytest.importorskip("torch")

# CPU and CUDA both accumulate in float32 and round the output once; the tensor-core prefill path
# also rounds the softmax probabilities to the 16-bit dtype before P @ V, hence the float16 slack.
TOL = {
    "bfloat16": dict(atol=1e-2, rtol=1e-2),
    "float16": dict(atol=4e-3, rtol=4e-3),
    "float32": dict(atol=1e-5, rtol=1e-5),
}
LSE_TOL = dict(atol=1e-3, rtol=1e-3)
NAN = float("nan")


def dtype_of(x) -> str:
    return str(x.dtype).replace("torch.", "")


def assert_close(got, want, got_lse=None, want_lse=None):
    """Device results (poisoned with NaN before the call, so a missed element fails) vs the CPU's."""
    assert got.is_cuda
    g = to_numpy_f32(got)
    assert not np.isnan(g).any(), f"{np.isnan(g).sum()} output elements were never written"
    np.testing.assert_allclose(g, to_numpy_f32(want), **TOL[dtype_of(want)])
    if want_lse is not None:
        assert got_lse.is_cuda and got_lse.dtype == torch.float32
        gl = to_numpy_f32(got_lse)
        assert not np.isnan(gl).any()
        np.testing.assert_allclose(gl, to_numpy_f32(want_lse), **LSE_TOL)


def compare_paged(dev, cpu_args: dict, gpu_args: dict | None = None, **options):
    """Runs the op on the host arrays and on their device copies (or the given device arrays)."""
    name = "paged_prefill" if "cu_seqlens_q" in cpu_args else "paged_decode"
    want, want_lse = getattr(kvcore, name)(**cpu_args, return_lse=True, **options)
    gpu_args = on_device(dev, cpu_args) if gpu_args is None else gpu_args
    out = dev.nan_like(gpu_args["q"])
    lse = dev.full(tuple(want_lse.shape), NAN, torch.float32)
    got, got_lse = getattr(dev.kv, name)(**gpu_args, out=out, lse=lse, return_lse=True, **options)
    dev.sync()
    assert got is out and got_lse is lse
    assert_close(got, want, got_lse, want_lse)
    return got, got_lse


def compare_shared(dev, cpu_args: dict, **options):
    name = "shared_prefix_prefill" if "cu_seqlens_q" in cpu_args else "shared_prefix_decode"
    want, want_lse = getattr(kvcore, name)(**cpu_args, return_lse=True, **options)
    gpu_args = on_device(dev, cpu_args)
    out = dev.nan_like(gpu_args["q"])
    lse = dev.full(tuple(want_lse.shape), NAN, torch.float32)
    got, got_lse = getattr(dev.kv, name)(**gpu_args, out=out, lse=lse, return_lse=True, **options)
    dev.sync()
    assert got is out and got_lse is lse
    assert_close(got, want, got_lse, want_lse)


# --- paged decode / prefill -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("page_size", [1, 7, 16, 256])
@pytest.mark.parametrize("heads", list(HEAD_CONFIGS))
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_paged_attention_cuda_equals_cpu(dev, rng, mode, head_dim, heads, page_size, dtype):
    hq, hkv = HEAD_CONFIGS[heads]
    max_len = page_size + 40 if page_size > 16 else 120
    args = paged_case(rng, dtype, batch=5, hq=hq, hkv=hkv, d=head_dim, page_size=page_size, max_len=max_len,
                      decode=mode == "decode")
    options = {} if mode == "decode" else dict(causal=mode == "causal")
    compare_paged(dev, args, **options)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("page_size", [7, 16])
@pytest.mark.parametrize("heads", list(HEAD_CONFIGS))
@pytest.mark.parametrize("head_dim", [80, 96, 192])
@pytest.mark.parametrize("mode", ["causal", "non_causal"])
def test_prefill_cuda_equals_cpu_head_dims_80_96_192(dev, rng, mode, head_dim, heads, page_size, dtype):
    """The tensor-core prefill path at the head dims whose rows are not a multiple of 8 chunks
    (80, 96: odd-pitch shared memory) or take Q from shared memory each tile (192)."""
    hq, hkv = HEAD_CONFIGS[heads]
    args = paged_case(rng, dtype, batch=5, hq=hq, hkv=hkv, d=head_dim, page_size=page_size, max_len=120,
                      decode=False)
    compare_paged(dev, args, causal=mode == "causal")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_paged_attention_cuda_options(dev, rng, mode, options, dtype):
    opts = dict(OPTION_SETS[options])
    if mode != "decode":
        opts["causal"] = mode == "causal"
    args = paged_case(rng, dtype, batch=6, hq=16, hkv=2, d=128, page_size=16, max_len=300, decode=mode == "decode")
    compare_paged(dev, args, **opts)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_paged_attention_cuda_strided_layouts(dev, rng, mode):
    """On the device: K/V as halves of a [P, 2, S, H, D] buffer, q a slice of a fused QKV tensor,
    a block table that is a column slice of every other row of a wider table, and a strided out."""
    hq, hkv, d, page_size = 8, 2, 128, 16
    seq_lens = ragged_seq_lens(rng, 5, 200)
    table, num_pages = alloc_tables(rng, page_size, seq_lens)
    buf = random_array(rng, (num_pages, 2, page_size, hkv, d), "bfloat16", "torch")
    q_lens = ragged_q_lens(rng, seq_lens) if mode == "prefill" else np.ones(5, np.int32)
    qkv = random_array(rng, (int(q_lens.sum()), hq + 2 * hkv, d), "bfloat16", "torch")
    wide = torch.from_numpy(rng.integers(-9, 9, (10, table.shape[1] + 5)).astype(np.int32))
    wide[::2, :table.shape[1]] = torch.from_numpy(table)
    cpu = dict(q=qkv[:, :hq], k_cache=buf[:, 0], v_cache=buf[:, 1], block_table=torch.from_numpy(table),
               seq_lens=torch.from_numpy(seq_lens))
    gbuf, gqkv, gwide = dev.put(buf), dev.put(qkv), dev.put(wide)
    gpu = dict(q=gqkv[:, :hq], k_cache=gbuf[:, 0], v_cache=gbuf[:, 1], block_table=gwide[::2, :table.shape[1]],
               seq_lens=dev.put(torch.from_numpy(seq_lens)))
    if mode == "prefill":
        cpu["cu_seqlens_q"] = torch.from_numpy(cu_of(q_lens))
        gpu["cu_seqlens_q"] = dev.put(cpu["cu_seqlens_q"])
    compare_paged(dev, cpu, gpu, window=64, soft_cap=8.0)

    name = "paged_prefill" if mode == "prefill" else "paged_decode"
    big = dev.full((gqkv.shape[0], 2 * hq, d), NAN, torch.bfloat16)
    getattr(dev.kv, name)(**gpu, out=big[:, 1::2])
    want = getattr(kvcore, name)(**cpu)
    dev.sync()
    assert_close(big[:, 1::2], want)
    assert torch.isnan(big[:, 0::2].float()).all()


@pytest.mark.parametrize("table", ["none", "slots"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_virtual_layout_cuda(dev, rng, mode, table):
    max_seqs, max_tokens, hq, hkv, d, batch = 8, 700, 8, 1, 256, 6
    k_cache = random_array(rng, (max_seqs, max_tokens, hkv, d), "float16", "torch")
    v_cache = random_array(rng, (max_seqs, max_tokens, hkv, d), "float16", "torch")
    seq_lens = ragged_seq_lens(rng, batch, max_tokens)
    seq_lens[0] = max_tokens
    args = dict(k_cache=k_cache, v_cache=v_cache, block_table=None, seq_lens=torch.from_numpy(seq_lens))
    if table == "slots":
        args["block_table"] = torch.from_numpy(rng.permutation(max_seqs)[:batch].astype(np.int32)[:, None].copy())
    if mode == "decode":
        args["q"] = random_array(rng, (batch, hq, d), "float16", "torch")
    else:
        q_lens = ragged_q_lens(rng, seq_lens)
        args["q"] = random_array(rng, (int(q_lens.sum()), hq, d), "float16", "torch")
        args["cu_seqlens_q"] = torch.from_numpy(cu_of(q_lens))
    compare_paged(dev, args, window=500)


def test_extend_with_empty_and_long_query_ranges_cuda(dev, rng):
    """Extend batches: a request without queries, a whole-sequence prefill, single queries."""
    seq_lens = np.array([300, 5, 1, 1000, 64, 77], np.int32)
    q_lens = np.array([40, 0, 1, 1000, 1, 77], np.int32)
    for heads in ("mha", "gqa8"):
        hq, hkv = HEAD_CONFIGS[heads]
        args = paged_case(rng, "bfloat16", hq=hq, hkv=hkv, d=128, page_size=16, decode=False, seq_lens=seq_lens,
                          q_lens=q_lens)
        compare_paged(dev, args)


def test_empty_batch_cuda(dev, rng):
    k_cache = dev.put(random_array(rng, (4, 8, 2, 64), "bfloat16", "torch"))
    out, lse = dev.kv.paged_decode(dev.put(torch.zeros((0, 4, 64), dtype=torch.bfloat16)), k_cache, k_cache,
                                   dev.put(torch.zeros((0, 2), dtype=torch.int32)),
                                   dev.put(torch.zeros(0, dtype=torch.int32)), return_lse=True,
                                   out=dev.put(torch.zeros((0, 4, 64), dtype=torch.bfloat16)),
                                   lse=dev.put(torch.zeros((0, 4), dtype=torch.float32)))
    dev.sync()
    assert tuple(out.shape) == (0, 4, 64) and tuple(lse.shape) == (0, 4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("page_size", [1, 7, 16])
@pytest.mark.parametrize("heads", list(HEAD_CONFIGS))
@pytest.mark.parametrize("head_dim", [80, 96, 192])
def test_paged_decode_cuda_more_head_dims(dev, rng, head_dim, heads, page_size, dtype):
    hq, hkv = HEAD_CONFIGS[heads]
    args = paged_case(rng, dtype, batch=5, hq=hq, hkv=hkv, d=head_dim, page_size=page_size, max_len=120, decode=True)
    compare_paged(dev, args)


@pytest.mark.parametrize("options", [{}, dict(soft_cap=2.0, scale=0.5), dict(window=9, soft_cap=5.0, scale=0.3)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("group", [4, 5, 8])
@pytest.mark.parametrize("head_dim", [64, 96, 256])
def test_paged_decode_cuda_gqa_groups(dev, rng, head_dim, group, dtype, options):
    """Groups of 4 to 8 query heads (the tensor-core decode, rows padded to 16) with soft cap and
    window, against the CPU."""
    args = paged_case(rng, dtype, batch=5, hq=2 * group, hkv=2, d=head_dim, page_size=7, max_len=300, decode=True)
    compare_paged(dev, args, **options)


@pytest.mark.parametrize("options", [dict(causal=True), dict(causal=True, window=7, soft_cap=5.0, scale=0.3),
                                     dict(causal=False)])
def test_paged_prefill_cuda_group_wider_than_a_tile(dev, rng, options):
    """A group of 72 query heads exceeds a 64-row tensor-core prefill tile: its extend rows run
    through the decode kernels, 8 heads of one token per CTA."""
    args = paged_case(rng, "bfloat16", batch=3, hq=72, hkv=1, d=64, page_size=7, max_len=90, decode=False)
    compare_paged(dev, args, **options)


# --- split-KV over long sequences ------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, dict(window=5000, soft_cap=20.0), dict(scale=0.02)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_split_kv_long_sequence(dev, rng, mode, dtype, options):
    """16K keys at batch 1: few CTAs, so the keys are split across many CTAs and merged."""
    seq_lens = np.array([16384], np.int32)
    q_lens = np.array([48], np.int32) if mode == "prefill" else None
    args = paged_case(rng, dtype, hq=16, hkv=2, d=128, page_size=16, decode=mode == "decode", seq_lens=seq_lens,
                      q_lens=q_lens)
    compare_paged(dev, args, **options)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_split_kv_with_ragged_lengths(dev, rng, mode):
    """Splits are sized for the longest possible sequence: short requests get empty splits."""
    seq_lens = np.array([16000, 1, 777, 3], np.int32)
    q_lens = np.array([20, 1, 100, 3], np.int32) if mode == "prefill" else None
    args = paged_case(rng, "bfloat16", hq=8, hkv=8, d=64, page_size=32, decode=mode == "decode", seq_lens=seq_lens,
                      q_lens=q_lens)
    compare_paged(dev, args, window=2000)
    compare_paged(dev, args)


# --- merge_states ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_merge_states_cuda_equals_cpu(dev, rng, dtype):
    o_a, lse_a = random_states(rng, 300, 8, 128, dtype, "torch")
    o_b, lse_b = random_states(rng, 300, 8, 128, dtype, "torch")
    lse_a[:3] = -np.inf
    lse_b[:3] = -np.inf
    want, want_lse = kvcore.merge_states(o_a, lse_a, o_b, lse_b)
    ga, gla, gb, glb = dev.put(o_a), dev.put(lse_a), dev.put(o_b), dev.put(lse_b)
    out, lse_out = dev.nan_like(ga), dev.nan_like(gla)
    got, got_lse = dev.kv.merge_states(ga, gla, gb, glb, out=out, lse_out=lse_out)
    dev.sync()
    assert got is out and got_lse is lse_out
    g = to_numpy_f32(got)
    assert not np.isnan(g).any()
    np.testing.assert_allclose(g, to_numpy_f32(want), **TOL[dtype])
    np.testing.assert_allclose(dev.host(got_lse).numpy(), want_lse.numpy(), rtol=1e-6, atol=1e-6)
    # out may alias o_a
    got, _ = dev.kv.merge_states(ga, gla, gb, glb, out=ga, lse_out=dev.nan_like(gla))
    dev.sync()
    assert got is ga
    np.testing.assert_allclose(to_numpy_f32(ga), to_numpy_f32(want), **TOL[dtype])


# --- shared-prefix attention -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("options", list(SHARED_OPTIONS))
@pytest.mark.parametrize("heads,head_dim,page_size", [("gqa4", 64, 7), ("mha", 128, 1), ("mqa", 256, 16),
                                                      ("gqa8", 128, 4)])
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_shared_prefix_cuda_equals_cpu(dev, rng, mode, heads, head_dim, page_size, options, dtype):
    hq, hkv = HEAD_CONFIGS[heads]
    opts = dict(SHARED_OPTIONS[options])
    if mode != "decode":
        opts["causal"] = mode == "causal"
    group_sizes = [3, 1, 0, 9, 2]
    prefix_lens = [int(rng.integers(1, 400)), 0, int(rng.integers(0, 10)), int(rng.integers(1, 400)), 17]
    args = shared_case(rng, dtype, group_sizes=group_sizes, prefix_lens=prefix_lens, decode=mode == "decode",
                       hq=hq, hkv=hkv, d=head_dim, page_size=page_size, max_suffix=60)
    compare_shared(dev, args, **opts)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("options", list(SHARED_OPTIONS))
@pytest.mark.parametrize("heads,head_dim,page_size", [("gqa4", 80, 16), ("gqa8", 96, 7), ("gqa4", 192, 16)])
@pytest.mark.parametrize("mode", ["causal", "non_causal"])
def test_shared_prefix_prefill_cuda_head_dims_80_96_192(dev, rng, mode, heads, head_dim, page_size, options, dtype):
    hq, hkv = HEAD_CONFIGS[heads]
    opts = dict(SHARED_OPTIONS[options], causal=mode == "causal")
    group_sizes = [3, 1, 0, 9, 2]
    prefix_lens = [int(rng.integers(1, 400)), 0, int(rng.integers(0, 10)), int(rng.integers(1, 400)), 17]
    args = shared_case(rng, dtype, group_sizes=group_sizes, prefix_lens=prefix_lens, decode=False, hq=hq, hkv=hkv,
                       d=head_dim, page_size=page_size, max_suffix=60)
    compare_shared(dev, args, **opts)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_shared_prefix_cuda_large_groups(dev, rng, mode):
    """64 requests sharing a 4K-token prefix, next to a smaller group and one without a prefix."""
    suffix_lens = ragged_seq_lens(rng, 70, 40)
    q_lens = np.minimum(suffix_lens, rng.integers(1, 5, 70)).astype(np.int32) if mode == "prefill" else None
    args = shared_case(rng, "bfloat16", group_sizes=[64, 5, 1], prefix_lens=[4096, 1000, 0], suffix_lens=suffix_lens,
                       q_lens=q_lens, decode=mode == "decode", hq=16, hkv=2, d=128, page_size=16)
    compare_shared(dev, args)
    compare_shared(dev, args, window=2048)


# --- CUDA graphs, debug checks, streams --------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_graph_capture_and_replay_of_paged_decode(rng):
    """Captured once on a side stream; replays read the new seq_lens and q contents in place."""
    batch, hq, hkv, d, page_size, capacity = 8, 16, 2, 128, 16, 2048
    table, num_pages = alloc_tables(rng, page_size, np.full(batch, capacity))
    k_cache = random_array(rng, (num_pages, page_size, hkv, d), "bfloat16", "torch")
    v_cache = random_array(rng, (num_pages, page_size, hkv, d), "bfloat16", "torch")
    gk, gv, gtable = k_cache.cuda(), v_cache.cuda(), torch.from_numpy(table).cuda()
    gq = random_array(rng, (batch, hq, d), "bfloat16", "torch").cuda()
    glens = torch.from_numpy(ragged_seq_lens(rng, batch, capacity)).cuda()
    out = torch.full_like(gq, NAN)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        kvcore.paged_decode(gq, gk, gv, gtable, glens, out=out, return_lse=True, soft_cap=30.0)
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        _, lse = kvcore.paged_decode(gq, gk, gv, gtable, glens, out=out, return_lse=True, soft_cap=30.0)

    for _ in range(3):
        lens = ragged_seq_lens(rng, batch, capacity)
        lens[-1] = capacity
        glens.copy_(torch.from_numpy(lens))
        gq.copy_(random_array(rng, (batch, hq, d), "bfloat16", "torch"))
        out.fill_(NAN)
        lse.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        want, want_lse = kvcore.paged_decode(gq.cpu(), k_cache, v_cache, torch.from_numpy(table),
                                             torch.from_numpy(lens), return_lse=True, soft_cap=30.0)
        assert_close(out, want, lse, want_lse)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_debug_checks_report_bad_block_table_entries(dev, rng, mode):
    page_size = 8
    seq_lens = np.array([20, 30, 9], np.int32)
    args = paged_case(rng, "bfloat16", hq=8, hkv=2, d=64, page_size=page_size, decode=mode == "decode",
                      seq_lens=seq_lens)
    num_pages = args["k_cache"].shape[0]
    gpu = on_device(dev, args)
    gpu["block_table"][2, 1] = num_pages + 90  # request 2's keys 8.. live on logical page 1
    op = getattr(dev.kv, "paged_prefill" if mode == "prefill" else "paged_decode")
    out = dev.nan_like(gpu["q"])
    dev.kv.set_debug_checks(True)
    try:
        with pytest.raises(IndexError, match=rf"block_table\[1\] = {num_pages + 90} is out of range \[0, {num_pages}\)"):
            op(**gpu, out=out)
        bad_lens = gpu["seq_lens"].clone()
        bad_lens[1] = args["block_table"].shape[1] * page_size + 1
        with pytest.raises(IndexError, match=r"seq_lens\[1\] = "):
            op(**dict(on_device(dev, args), seq_lens=bad_lens), out=out)
        compare_paged(dev, args)  # the report was cleared: a good call passes
    finally:
        dev.kv.set_debug_checks(False)
    # Without debug checks the bad page is skipped silently; the other requests are unaffected.
    got = op(**gpu, out=dev.nan_like(gpu["q"]))
    want = getattr(kvcore, "paged_prefill" if mode == "prefill" else "paged_decode")(**args)
    dev.sync()
    rows = slice(0, 2) if mode == "decode" else slice(0, int(args["cu_seqlens_q"][2]))
    assert_close(got[rows], want[rows])


def test_debug_checks_shared_prefix(dev, rng):
    args = shared_case(rng, "float16", group_sizes=[2, 2], prefix_lens=[40, 12], decode=True, hq=4, hkv=2, d=128,
                       page_size=8)
    gpu = on_device(dev, args)
    gpu["prefix_block_table"][0, 2] = -5
    dev.kv.set_debug_checks(True)
    try:
        with pytest.raises(IndexError, match=r"prefix_block_table\[2\] = -5 is out of range"):
            dev.kv.shared_prefix_decode(**gpu, out=dev.nan_like(gpu["q"]))
    finally:
        dev.kv.set_debug_checks(False)


@pytest.mark.cuda
def test_ops_run_on_the_given_stream(rng):
    """q is rewritten on a side stream after a delay; an op enqueued on that stream sees the new q."""
    args = paged_case(rng, "bfloat16", batch=8, hq=8, hkv=2, d=128, page_size=16, max_len=500, decode=True)
    gpu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    new_q = random_array(rng, tuple(args["q"].shape), "bfloat16", "torch")
    want = kvcore.paged_decode(**dict(args, q=new_q))
    gnew = new_q.cuda()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    for how in ("argument", "handle", "current"):
        gq = gpu["q"].clone()
        out = torch.full_like(gq, NAN)
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(20_000_000)
            gq.copy_(gnew)
        if how == "argument":
            kvcore.paged_decode(**dict(gpu, q=gq), out=out, stream=stream)
        elif how == "handle":
            kvcore.paged_decode(**dict(gpu, q=gq), out=out, stream=stream.cuda_stream)
        else:
            with torch.cuda.stream(stream):  # default: torch's current stream
                kvcore.paged_decode(**dict(gpu, q=gq), out=out)
        stream.synchronize()
        assert_close(out, want)


def test_misaligned_pages_are_rejected_on_cuda(dev, rng):
    """CUDA reads K/V rows with vector loads: an odd element offset is refused, not misread."""
    flat = dev.put(random_array(rng, (4 * 8 * 2 * 128 + 1,), "float16", "torch"))
    cache = flat[1:].view(4, 8, 2, 128)
    q = dev.put(random_array(rng, (2, 4, 128), "float16", "torch"))
    with pytest.raises(ValueError, match="k_cache"):
        dev.kv.paged_decode(q, cache, cache, dev.put(torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)),
                            dev.put(torch.tensor([9, 16], dtype=torch.int32)), out=dev.nan_like(q))


def test_mixed_devices_rejected(dev, rng):
    args = on_device(dev, paged_case(rng, "bfloat16", decode=True))
    with pytest.raises(ValueError, match="seq_lens is on cpu"):
        dev.kv.paged_decode(**dict(args, seq_lens=dev.host(args["seq_lens"])), out=dev.nan_like(args["q"]))
    with pytest.raises(ValueError, match="block_table is on cpu"):
        dev.kv.paged_decode(**dict(args, block_table=dev.host(args["block_table"])), out=dev.nan_like(args["q"]))


# --- regressions the SIMT harness exposed ----------------------------------------------------------

def test_prefill_masks_keys_on_bad_pages_like_decode(dev, rng):
    """Without debug checks a bad block-table entry drops its page's keys: prefill (tensor cores) once
    zero-filled them and still counted exp(0 - m) in the denominator; both paths now agree."""
    seq_lens = np.array([70, 45, 130], np.int32)
    args = paged_case(rng, "float16", hq=8, hkv=2, d=128, page_size=16, decode=True, seq_lens=seq_lens)
    num_pages = args["k_cache"].shape[0]
    gpu = on_device(dev, args)
    gpu["block_table"][0, 1] = num_pages + 7
    gpu["block_table"][2, 3] = -1
    dec, dec_lse = dev.kv.paged_decode(**gpu, out=dev.nan_like(gpu["q"]),
                                       lse=dev.full((3, 8), NAN, torch.float32))
    one_each = dev.put(torch.arange(4, dtype=torch.int32))  # one query per request: its last token
    pre, pre_lse = dev.kv.paged_prefill(**gpu, cu_seqlens_q=one_each, out=dev.nan_like(gpu["q"]),
                                        lse=dev.full((3, 8), NAN, torch.float32))
    dev.sync()
    assert_close(pre, dev.host(dec), pre_lse, dev.host(dec_lse))


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_request_longer_than_its_table_gets_an_empty_state(dev, rng, mode):
    """A seq_len past the block table (no debug checks) attends to nothing: output 0, LSE -inf,
    even with split-KV (its partial states used to stay unwritten and the merge read garbage)."""
    seq_lens = np.array([3000, 40, 900], np.int32)
    q_lens = np.array([5, 3, 7], np.int32) if mode == "prefill" else None
    args = paged_case(rng, "bfloat16", hq=4, hkv=2, d=64, page_size=16, decode=mode == "decode",
                      seq_lens=seq_lens, q_lens=q_lens)
    gpu = on_device(dev, args)
    bad = gpu["seq_lens"].clone()
    bad[1] = args["block_table"].shape[1] * 16 + 5
    name = "paged_prefill" if mode == "prefill" else "paged_decode"
    tokens = args["q"].shape[0]
    got, got_lse = getattr(dev.kv, name)(**dict(gpu, seq_lens=bad), out=dev.nan_like(gpu["q"]),
                                         lse=dev.full((tokens, 4), NAN, torch.float32))
    dev.sync()
    rows = [1] if mode == "decode" else list(range(5, 8))  # request 1's query rows
    g, gl = to_numpy_f32(got), to_numpy_f32(got_lse)
    assert (g[rows] == 0).all() and np.isneginf(gl[rows]).all()
    for b in (0, 2):  # the others are unaffected
        sub = {k: v for k, v in args.items()}
        sub["block_table"], sub["seq_lens"] = args["block_table"][b:b + 1], args["seq_lens"][b:b + 1]
        if mode == "prefill":
            q0, q1 = int(args["cu_seqlens_q"][b]), int(args["cu_seqlens_q"][b + 1])
            sub["q"], sub["cu_seqlens_q"] = args["q"][q0:q1], torch.tensor([0, q1 - q0], dtype=torch.int32)
        else:
            q0, q1 = b, b + 1
            sub["q"] = args["q"][b:b + 1]
        want, want_lse = getattr(kvcore, name)(**sub, return_lse=True)
        np.testing.assert_allclose(g[q0:q1], to_numpy_f32(want), **TOL["bfloat16"])
        np.testing.assert_allclose(gl[q0:q1], to_numpy_f32(want_lse), **LSE_TOL)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_table_capacity_beyond_int32(dev, rng, mode):
    """max_pages * page_size = 2^32 keys of table capacity: once narrowed to int (0), which dropped
    every request as too long."""
    page_size, max_pages = 4096, 1 << 20
    k_cache = random_array(rng, (3, page_size, 1, 64), "float16", "torch")
    v_cache = random_array(rng, (3, page_size, 1, 64), "float16", "torch")
    table = torch.zeros((2, max_pages), dtype=torch.int32)
    table[0, :2] = torch.tensor([2, 0])
    table[1, :1] = 1
    seq_lens = torch.tensor([5000, 300], dtype=torch.int32)
    args = dict(k_cache=k_cache, v_cache=v_cache, block_table=table, seq_lens=seq_lens)
    if mode == "decode":
        args["q"] = random_array(rng, (2, 4, 64), "float16", "torch")
    else:
        args["q"] = random_array(rng, (6, 4, 64), "float16", "torch")
        args["cu_seqlens_q"] = torch.tensor([0, 4, 6], dtype=torch.int32)
    compare_paged(dev, args)


def _capture_decode(dev, gpu, out, lse):
    """paged_decode captured on a fresh stream (torch's CUDA graph, or the harness's capture)."""
    if dev.name == "cuda":
        stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            dev.kv.paged_decode(**gpu, out=out, lse=lse)
        return graph.replay, lambda: (stream, graph)
    stream = dev.kv._C.cuda_stream_create(0)
    graph = dev.control.begin_capture(stream)
    try:
        dev.kv.paged_decode(**gpu, out=out, lse=lse, stream=stream)
    finally:
        dev.control.end_capture(stream)
    assert graph.nodes > 0
    return graph.replay, lambda: (graph, dev.kv._C.cuda_stream_destroy(stream))


def test_debug_checks_are_capture_safe(dev, rng):
    """With debug checks on, a captured op neither allocates nor synchronizes (both invalidate a
    capture); an index error a replay meets is raised by the next checked op outside the graph."""
    args = paged_case(rng, "bfloat16", batch=4, hq=8, hkv=2, d=64, page_size=16, max_len=200, decode=True)
    gpu = on_device(dev, args)
    out, lse = dev.nan_like(gpu["q"]), dev.full((4, 8), NAN, torch.float32)
    dev.kv.set_debug_checks(True)
    try:
        replay, keep = _capture_decode(dev, gpu, out, lse)
        replay()
        dev.sync()
        want, want_lse = kvcore.paged_decode(**args, return_lse=True)
        assert_close(out, want, lse, want_lse)
        gpu["block_table"][1, 0] = 10_000  # a replay now meets a bad entry
        replay()
        dev.sync()
        with pytest.raises(IndexError, match=r"block_table\[0\] = 10000 is out of range"):
            dev.kv.paged_decode(**dict(gpu, block_table=on_device(dev, args)["block_table"]),
                                out=dev.nan_like(gpu["q"]))
        keep()
    finally:
        dev.kv.set_debug_checks(False)


@pytest.mark.parametrize("broken", ["cu_decreasing", "cu_start", "cu_end", "cu_past_seq_len", "indptr_decreasing",
                                    "indptr_end", "prefix_len_too_long", "prefix_len_negative"])
def test_debug_checks_validate_ragged_and_group_metadata(dev, rng, broken):
    """Malformed cu_seqlens_q / group_indptr / prefix_lens on the device are reported by name in
    debug mode (before any kernel indexes with them), not read out of bounds."""
    q_lens = np.array([2, 1, 3, 2], np.int32)
    args = shared_case(rng, "float16", group_sizes=[2, 2], prefix_lens=[40, 12], decode=False, hq=4, hkv=2,
                       d=64, page_size=8, q_lens=q_lens, suffix_lens=np.array([5, 4, 6, 9], np.int32))
    gpu = on_device(dev, args)
    cu, indptr, plens = gpu["cu_seqlens_q"], gpu["group_indptr"], gpu["prefix_lens"]
    expect = {
        "cu_decreasing": (lambda: cu.__setitem__(2, 1), r"cu_seqlens_q\[2\] = 1 is out of range \[2, "),
        "cu_start": (lambda: cu.__setitem__(0, 1), r"cu_seqlens_q\[0\] = 1 is out of range \[0, 1\)"),
        "cu_end": (lambda: cu.__setitem__(4, 7), r"cu_seqlens_q\[4\] = 7 is out of range \[8, 9\)"),
        "cu_past_seq_len": (lambda: (cu.__setitem__(1, 6), cu.__setitem__(2, 6), cu.__setitem__(3, 6)),
                            r"cu_seqlens_q\[1\] = 6 is out of range \[0, 6\)"),
        "indptr_decreasing": (lambda: indptr.__setitem__(1, -3), r"group_indptr\[1\] = -3 is out of range \[0, 5\)"),
        "indptr_end": (lambda: indptr.__setitem__(2, 3), r"group_indptr\[2\] = 3 is out of range \[4, 5\)"),
        "prefix_len_too_long": (lambda: plens.__setitem__(1, 10_000), r"prefix_lens\[1\] = 10000 is out of range"),
        "prefix_len_negative": (lambda: plens.__setitem__(0, -1), r"prefix_lens\[0\] = -1 is out of range"),
    }
    mutate, message = expect[broken]
    mutate()
    dev.kv.set_debug_checks(True)
    try:
        with pytest.raises(IndexError, match=message):
            dev.kv.shared_prefix_prefill(**gpu, out=dev.nan_like(gpu["q"]))
        if broken.startswith("cu"):  # plain extend checks cu_seqlens_q too
            plain = {k: gpu[k] for k in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "cu_seqlens_q")}
            with pytest.raises(IndexError, match=message):
                dev.kv.paged_prefill(**plain, out=dev.nan_like(gpu["q"]))
    finally:
        dev.kv.set_debug_checks(False)


@pytest.mark.parametrize("head_dim", [48, 72])
def test_unsupported_head_dims_are_rejected_on_cuda(dev, rng, head_dim):
    """No backend takes these head dims: the device op names head_dim and writes nothing."""
    args = paged_case(rng, "float16", batch=2, hq=4, hkv=2, d=head_dim, page_size=8, max_len=20, decode=True)
    gpu = on_device(dev, args)
    out = dev.nan_like(gpu["q"])
    with pytest.raises(ValueError, match=rf"head_dim {head_dim} is not supported"):
        dev.kv.paged_decode(**gpu, out=out, lse=dev.full((2, 4), NAN, torch.float32))
    assert np.isnan(to_numpy_f32(out)).all()


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_float32_attention_is_cpu_only(dev, rng, mode):
    """float32 KV runs on the CPU backend; on CUDA the op names q and writes nothing."""
    args = paged_case(rng, "float32", batch=2, hq=4, hkv=2, d=64, page_size=8, max_len=20, decode=mode == "decode")
    gpu = on_device(dev, args)
    out = dev.nan_like(gpu["q"])
    op = dev.kv.paged_decode if mode == "decode" else dev.kv.paged_prefill
    with pytest.raises(ValueError, match="q: float32 attention runs on the CPU backend"):
        op(**gpu, out=out)
    assert np.isnan(to_numpy_f32(out)).all()


# --- needles at split, tile and page boundaries ----------------------------------------------------

def needle_case(rng, d, hkv, group, page_size, seq_lens):
    """A bf16 decode case whose keys at every 16-key boundary (j % 16 in {0, 15}: the tiles hold
    16, 32 or 64 keys, splits multiples of 64) and at every page boundary score ~10 above the rest,
    so a key lost or counted twice at a boundary moves the LSE by about 1 / (number of needles)."""
    args = paged_case(rng, "bfloat16", hq=hkv * group, hkv=hkv, d=d, page_size=page_size, decode=True,
                      seq_lens=np.asarray(seq_lens, np.int32))
    k = args["k_cache"].float()
    q = args["q"].float()
    table = np.asarray(args["block_table"])
    u = torch.from_numpy(rng.standard_normal((hkv, d))).float()
    u /= u.norm(dim=-1, keepdim=True)
    # q = sqrt(D) u + noise and needle keys 10 u: needle logits ~10, others ~N(0, 0.3).
    q = q * 0.3 + np.sqrt(d) * u.repeat_interleave(group, dim=0)[None]
    k = k * 0.3
    for b, n in enumerate(seq_lens):
        for j in range(n):
            if j % 16 in (0, 15) or (page_size > 1 and j % page_size in (0, page_size - 1)):
                k[table[b, j // page_size], j % page_size] = 10.0 * u
    args["q"] = q.to(torch.bfloat16)
    args["k_cache"] = k.to(torch.bfloat16)
    return args


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("page_size", [1, 16, 7])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 192, 256])
def test_decode_needles_at_split_and_tile_boundaries(dev, rng, head_dim, page_size, group):
    """Several device-planned splits per long request, ragged lengths; output and LSE against the
    independent float64 reference, the LSE at 1e-5 relative."""
    from attention_reference import paged_attention_reference

    args = needle_case(rng, head_dim, 2, group, page_size, [2100, 1, 333, 1000])
    want, want_lse = paged_attention_reference(args["q"], args["k_cache"], args["v_cache"], args["block_table"],
                                               args["seq_lens"])
    gpu = on_device(dev, args)
    out = dev.nan_like(gpu["q"])
    lse = dev.full(tuple(want_lse.shape), NAN, torch.float32)
    got, got_lse = dev.kv.paged_decode(**gpu, out=out, lse=lse, return_lse=True)
    dev.sync()
    g, gl = to_numpy_f32(got), to_numpy_f32(got_lse)
    assert not np.isnan(g).any() and not np.isnan(gl).any()
    np.testing.assert_allclose(gl, want_lse, rtol=1e-5, atol=0)
    np.testing.assert_allclose(g, want, **TOL["bfloat16"])
