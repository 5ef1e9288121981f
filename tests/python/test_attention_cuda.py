"""The attention family on CUDA: every op on torch CUDA tensors against kvcore's CPU backend (the
same call on host copies, itself checked against the float64 reference in test_attention.py), with
outputs poisoned (NaN) before each call; split-KV over long sequences, large shared-prefix groups,
CUDA-graph capture and replay, debug-mode index reports and stream semantics."""

from __future__ import annotations

import numpy as np
import pytest

import kvcore
from arrays import random_array, to_numpy_f32
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

pytestmark = pytest.mark.cuda

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


def on_cuda(args: dict) -> dict:
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def nan_like(x):
    return torch.full(tuple(x.shape), NAN, dtype=x.dtype, device="cuda")


def dtype_of(x) -> str:
    return str(x.dtype).replace("torch.", "")


def assert_close(got, want, got_lse=None, want_lse=None):
    """CUDA results (poisoned with NaN before the call, so a missed element fails) vs the CPU's."""
    assert got.is_cuda
    g = to_numpy_f32(got)
    assert not np.isnan(g).any(), f"{np.isnan(g).sum()} output elements were never written"
    np.testing.assert_allclose(g, to_numpy_f32(want), **TOL[dtype_of(want)])
    if want_lse is not None:
        assert got_lse.is_cuda and got_lse.dtype == torch.float32
        gl = to_numpy_f32(got_lse)
        assert not np.isnan(gl).any()
        np.testing.assert_allclose(gl, to_numpy_f32(want_lse), **LSE_TOL)


def compare_paged(cpu_args: dict, gpu_args: dict | None = None, **options):
    """Runs the op on the host arrays and on their CUDA copies (or the given CUDA arrays)."""
    op = kvcore.paged_prefill if "cu_seqlens_q" in cpu_args else kvcore.paged_decode
    want, want_lse = op(**cpu_args, return_lse=True, **options)
    gpu_args = on_cuda(cpu_args) if gpu_args is None else gpu_args
    out = nan_like(gpu_args["q"])
    got, got_lse = op(**gpu_args, out=out, return_lse=True, **options)
    torch.cuda.synchronize()
    assert got is out
    assert_close(got, want, got_lse, want_lse)
    return got, got_lse


def compare_shared(cpu_args: dict, **options):
    op = kvcore.shared_prefix_prefill if "cu_seqlens_q" in cpu_args else kvcore.shared_prefix_decode
    want, want_lse = op(**cpu_args, return_lse=True, **options)
    gpu_args = on_cuda(cpu_args)
    out = nan_like(gpu_args["q"])
    got, got_lse = op(**gpu_args, out=out, return_lse=True, **options)
    torch.cuda.synchronize()
    assert got is out
    assert_close(got, want, got_lse, want_lse)


# --- paged decode / prefill -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("page_size", [1, 7, 16, 256])
@pytest.mark.parametrize("heads", list(HEAD_CONFIGS))
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_paged_attention_cuda_equals_cpu(rng, mode, head_dim, heads, page_size, dtype):
    hq, hkv = HEAD_CONFIGS[heads]
    max_len = page_size + 40 if page_size > 16 else 120
    args = paged_case(rng, dtype, batch=5, hq=hq, hkv=hkv, d=head_dim, page_size=page_size, max_len=max_len,
                      decode=mode == "decode")
    options = {} if mode == "decode" else dict(causal=mode == "causal")
    compare_paged(args, **options)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_paged_attention_cuda_options(rng, mode, options, dtype):
    opts = dict(OPTION_SETS[options])
    if mode != "decode":
        opts["causal"] = mode == "causal"
    args = paged_case(rng, dtype, batch=6, hq=16, hkv=2, d=128, page_size=16, max_len=300, decode=mode == "decode")
    compare_paged(args, **opts)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_paged_attention_cuda_strided_layouts(rng, mode):
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
    gbuf, gqkv, gwide = buf.cuda(), qkv.cuda(), wide.cuda()
    gpu = dict(q=gqkv[:, :hq], k_cache=gbuf[:, 0], v_cache=gbuf[:, 1], block_table=gwide[::2, :table.shape[1]],
               seq_lens=torch.from_numpy(seq_lens).cuda())
    if mode == "prefill":
        cpu["cu_seqlens_q"] = torch.from_numpy(cu_of(q_lens))
        gpu["cu_seqlens_q"] = cpu["cu_seqlens_q"].cuda()
    compare_paged(cpu, gpu, window=64, soft_cap=8.0)

    op = kvcore.paged_prefill if mode == "prefill" else kvcore.paged_decode
    big = torch.full((gqkv.shape[0], 2 * hq, d), NAN, dtype=torch.bfloat16, device="cuda")
    op(**gpu, out=big[:, 1::2])
    want = op(**cpu)
    torch.cuda.synchronize()
    assert_close(big[:, 1::2], want)
    assert torch.isnan(big[:, 0::2].float()).all()


@pytest.mark.parametrize("table", ["none", "slots"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_virtual_layout_cuda(rng, mode, table):
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
    compare_paged(args, window=500)


def test_extend_with_empty_and_long_query_ranges_cuda(rng):
    """Extend batches: a request without queries, a whole-sequence prefill, single queries."""
    seq_lens = np.array([300, 5, 1, 1000, 64, 77], np.int32)
    q_lens = np.array([40, 0, 1, 1000, 1, 77], np.int32)
    for heads in ("mha", "gqa8"):
        hq, hkv = HEAD_CONFIGS[heads]
        args = paged_case(rng, "bfloat16", hq=hq, hkv=hkv, d=128, page_size=16, decode=False, seq_lens=seq_lens,
                          q_lens=q_lens)
        compare_paged(args)


def test_empty_batch_cuda(rng):
    k_cache = random_array(rng, (4, 8, 2, 64), "bfloat16", "torch").cuda()
    out, lse = kvcore.paged_decode(torch.zeros((0, 4, 64), dtype=torch.bfloat16, device="cuda"), k_cache, k_cache,
                                   torch.zeros((0, 2), dtype=torch.int32, device="cuda"),
                                   torch.zeros(0, dtype=torch.int32, device="cuda"), return_lse=True)
    torch.cuda.synchronize()
    assert tuple(out.shape) == (0, 4, 64) and tuple(lse.shape) == (0, 4)


# --- split-KV over long sequences ------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, dict(window=5000, soft_cap=20.0), dict(scale=0.02)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_split_kv_long_sequence(rng, mode, dtype, options):
    """16K keys at batch 1: few CTAs, so the keys are split across many CTAs and merged."""
    seq_lens = np.array([16384], np.int32)
    q_lens = np.array([48], np.int32) if mode == "prefill" else None
    args = paged_case(rng, dtype, hq=16, hkv=2, d=128, page_size=16, decode=mode == "decode", seq_lens=seq_lens,
                      q_lens=q_lens)
    compare_paged(args, **options)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_split_kv_with_ragged_lengths(rng, mode):
    """Splits are sized for the longest possible sequence: short requests get empty splits."""
    seq_lens = np.array([16000, 1, 777, 3], np.int32)
    q_lens = np.array([20, 1, 100, 3], np.int32) if mode == "prefill" else None
    args = paged_case(rng, "bfloat16", hq=8, hkv=8, d=64, page_size=32, decode=mode == "decode", seq_lens=seq_lens,
                      q_lens=q_lens)
    compare_paged(args, window=2000)
    compare_paged(args)


# --- merge_states ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_merge_states_cuda_equals_cpu(rng, dtype):
    o_a, lse_a = random_states(rng, 300, 8, 128, dtype, "torch")
    o_b, lse_b = random_states(rng, 300, 8, 128, dtype, "torch")
    lse_a[:3] = -np.inf
    lse_b[:3] = -np.inf
    want, want_lse = kvcore.merge_states(o_a, lse_a, o_b, lse_b)
    ga, gla, gb, glb = o_a.cuda(), lse_a.cuda(), o_b.cuda(), lse_b.cuda()
    out, lse_out = nan_like(ga), nan_like(gla)
    got, got_lse = kvcore.merge_states(ga, gla, gb, glb, out=out, lse_out=lse_out)
    torch.cuda.synchronize()
    assert got is out and got_lse is lse_out
    g = to_numpy_f32(got)
    assert not np.isnan(g).any()
    np.testing.assert_allclose(g, to_numpy_f32(want), **TOL[dtype])
    np.testing.assert_allclose(got_lse.cpu().numpy(), want_lse.numpy(), rtol=1e-6, atol=1e-6)
    # out may alias o_a
    got, _ = kvcore.merge_states(ga, gla, gb, glb, out=ga)
    torch.cuda.synchronize()
    assert got is ga
    np.testing.assert_allclose(to_numpy_f32(ga), to_numpy_f32(want), **TOL[dtype])


# --- shared-prefix attention -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("options", list(SHARED_OPTIONS))
@pytest.mark.parametrize("heads,head_dim,page_size", [("gqa4", 64, 7), ("mha", 128, 1), ("mqa", 256, 16),
                                                      ("gqa8", 128, 4)])
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_shared_prefix_cuda_equals_cpu(rng, mode, heads, head_dim, page_size, options, dtype):
    hq, hkv = HEAD_CONFIGS[heads]
    opts = dict(SHARED_OPTIONS[options])
    if mode != "decode":
        opts["causal"] = mode == "causal"
    group_sizes = [3, 1, 0, 9, 2]
    prefix_lens = [int(rng.integers(1, 400)), 0, int(rng.integers(0, 10)), int(rng.integers(1, 400)), 17]
    args = shared_case(rng, dtype, group_sizes=group_sizes, prefix_lens=prefix_lens, decode=mode == "decode",
                       hq=hq, hkv=hkv, d=head_dim, page_size=page_size, max_suffix=60)
    compare_shared(args, **opts)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_shared_prefix_cuda_large_groups(rng, mode):
    """64 requests sharing a 4K-token prefix, next to a smaller group and one without a prefix."""
    suffix_lens = ragged_seq_lens(rng, 70, 40)
    q_lens = np.minimum(suffix_lens, rng.integers(1, 5, 70)).astype(np.int32) if mode == "prefill" else None
    args = shared_case(rng, "bfloat16", group_sizes=[64, 5, 1], prefix_lens=[4096, 1000, 0], suffix_lens=suffix_lens,
                       q_lens=q_lens, decode=mode == "decode", hq=16, hkv=2, d=128, page_size=16)
    compare_shared(args)
    compare_shared(args, window=2048)


# --- CUDA graphs, debug checks, streams --------------------------------------------------------------

def test_cuda_graph_capture_and_replay_of_paged_decode(rng):
    """Captured once on a side stream; replays read the new seq_lens and q contents in place."""
    batch, hq, hkv, d, page_size, capacity = 8, 16, 2, 128, 16, 2048
    table, num_pages = alloc_tables(rng, page_size, np.full(batch, capacity))
    k_cache = random_array(rng, (num_pages, page_size, hkv, d), "bfloat16", "torch")
    v_cache = random_array(rng, (num_pages, page_size, hkv, d), "bfloat16", "torch")
    gk, gv, gtable = k_cache.cuda(), v_cache.cuda(), torch.from_numpy(table).cuda()
    gq = random_array(rng, (batch, hq, d), "bfloat16", "torch").cuda()
    glens = torch.from_numpy(ragged_seq_lens(rng, batch, capacity)).cuda()
    out = nan_like(gq)

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
def test_debug_checks_report_bad_block_table_entries(rng, mode):
    page_size = 8
    seq_lens = np.array([20, 30, 9], np.int32)
    args = paged_case(rng, "bfloat16", hq=8, hkv=2, d=64, page_size=page_size, decode=mode == "decode",
                      seq_lens=seq_lens)
    num_pages = args["k_cache"].shape[0]
    gpu = on_cuda(args)
    gpu["block_table"][2, 1] = num_pages + 90  # request 2's keys 8.. live on logical page 1
    kvcore.set_debug_checks(True)
    try:
        with pytest.raises(IndexError, match=rf"block_table\[1\] = {num_pages + 90} is out of range \[0, {num_pages}\)"):
            (kvcore.paged_prefill if mode == "prefill" else kvcore.paged_decode)(**gpu)
        bad_lens = gpu["seq_lens"].clone()
        bad_lens[1] = args["block_table"].shape[1] * page_size + 1
        with pytest.raises(IndexError, match=r"seq_lens\[1\] = "):
            (kvcore.paged_prefill if mode == "prefill" else kvcore.paged_decode)(**dict(on_cuda(args),
                                                                                        seq_lens=bad_lens))
        compare_paged(args)  # the report was cleared: a good call passes
    finally:
        kvcore.set_debug_checks(False)
    # Without debug checks the bad page is skipped silently; the other requests are unaffected.
    got = (kvcore.paged_prefill if mode == "prefill" else kvcore.paged_decode)(**gpu)
    want = (kvcore.paged_prefill if mode == "prefill" else kvcore.paged_decode)(**args)
    torch.cuda.synchronize()
    rows = slice(0, 2) if mode == "decode" else slice(0, int(args["cu_seqlens_q"][2]))
    assert_close(got[rows], want[rows])


def test_debug_checks_shared_prefix(rng):
    args = shared_case(rng, "float16", group_sizes=[2, 2], prefix_lens=[40, 12], decode=True, hq=4, hkv=2, d=128,
                       page_size=8)
    gpu = on_cuda(args)
    gpu["prefix_block_table"][0, 2] = -5
    kvcore.set_debug_checks(True)
    try:
        with pytest.raises(IndexError, match="= -5 is out of range"):
            kvcore.shared_prefix_decode(**gpu)
    finally:
        kvcore.set_debug_checks(False)


def test_ops_run_on_the_given_stream(rng):
    """q is rewritten on a side stream after a delay; an op enqueued on that stream sees the new q."""
    args = paged_case(rng, "bfloat16", batch=8, hq=8, hkv=2, d=128, page_size=16, max_len=500, decode=True)
    gpu = on_cuda(args)
    new_q = random_array(rng, tuple(args["q"].shape), "bfloat16", "torch")
    want = kvcore.paged_decode(**dict(args, q=new_q))
    gnew = new_q.cuda()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    for how in ("argument", "handle", "current"):
        gq = gpu["q"].clone()
        out = nan_like(gq)
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


def test_misaligned_pages_are_rejected_on_cuda(rng):
    """CUDA reads K/V rows with vector loads: an odd element offset is refused, not misread."""
    flat = random_array(rng, (4 * 8 * 2 * 128 + 1,), "float16", "torch").cuda()
    cache = flat[1:].view(4, 8, 2, 128)
    q = random_array(rng, (2, 4, 128), "float16", "torch").cuda()
    with pytest.raises(ValueError, match="k_cache"):
        kvcore.paged_decode(q, cache, cache, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device="cuda"),
                            torch.tensor([9, 16], dtype=torch.int32, device="cuda"))


def test_mixed_devices_rejected(rng):
    args = on_cuda(paged_case(rng, "bfloat16", decode=True))
    with pytest.raises(ValueError, match="seq_lens is on cpu"):
        kvcore.paged_decode(**dict(args, seq_lens=args["seq_lens"].cpu()))
    with pytest.raises(ValueError, match="block_table is on cpu"):
        kvcore.paged_decode(**dict(args, block_table=args["block_table"].cpu()))
