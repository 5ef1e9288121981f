"""The INT4 KV family on CUDA: append_kv_int4 codes and params bit-identical to the CPU backend (and
to the numpy reference of test_quant.py) for every head dim, input dtype, block size and with or
without signs; hadamard_transform and dequantize_kv_int4 bit-identical to the CPU; INT4 attention
(decode incl. split-KV over long contexts, prefill, shared prefix, virtual layout) within tolerance of
the CPU backend, which test_quant.py checks against the float64 reference; debug-mode index reports."""

from __future__ import annotations

import numpy as np
import pytest

import kvcore
from arrays import POISON, bits, random_array, to_numpy_f32
from test_attention import (
    HEAD_CONFIGS,
    OPTION_SETS,
    SHARED_OPTIONS,
    alloc_tables,
    cu_of,
    ragged_q_lens,
    ragged_seq_lens,
)
from test_quant import (
    assert_same_bits,
    default_block,
    int4_caches,
    int4_paged_case,
    make_signs,
    np_append,
    np_dequantize,
    np_rotate,
)

pytestmark = pytest.mark.cuda

torch = pytest.importorskip("torch")

# CPU and CUDA both accumulate in float32; the CUDA tensor-core prefill path additionally rounds the
# dequantized K/V, the rotated queries and the probabilities to the 16-bit dtype, hence the slack
# over the bf16-cache tolerances of test_attention_cuda.py.
TOL = {"bfloat16": dict(atol=1.5e-2, rtol=1.5e-2), "float16": dict(atol=6e-3, rtol=6e-3)}
LSE_TOL = dict(atol=3e-3, rtol=3e-3)
NAN = float("nan")


def cuda(x):
    """numpy / torch CPU arrays -> torch CUDA tensors; anything else unchanged."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).cuda()
    if isinstance(x, torch.Tensor):
        return x.cuda()
    return x


def on_cuda(args: dict) -> dict:
    return {k: cuda(v) for k, v in args.items()}


def host_bits(x) -> np.ndarray:
    """Raw bits of a numpy or torch array (on any device) on the host."""
    return bits(x)


def torch_caches(num_pages, page_size, heads, d, device="cpu"):
    """Poisoned (k_codes, k_params, v_codes, v_params) torch tensors."""
    cs, ps = kvcore.int4_cache_shapes(num_pages, page_size, heads, d)
    codes = torch.full(cs, 0xA5, dtype=torch.uint8, device=device)
    params = torch.full(ps, POISON, dtype=torch.float16, device=device)
    return codes, params, codes.clone(), params.clone()


def model_like(rng, tokens, heads, d, dtype):
    """Per-channel lognormal scales and a few large, offset outlier channels (exercises wide ranges)."""
    x = rng.standard_normal((tokens, heads, d)) * np.exp(0.7 * rng.standard_normal(d))
    out = rng.choice(d, 3, replace=False)
    x[..., out] = x[..., out] * 12 + 20 * rng.choice([-1, 1], 3)
    return torch.from_numpy(x.astype(np.float32)).to(getattr(torch, dtype))


def blocks_for(d: int) -> list[int]:
    return [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if d % b == 0 and b <= d]


# --- append_kv_int4: CUDA == CPU == numpy, bit for bit ---------------------------------------------

@pytest.mark.parametrize("with_signs", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("d", [64, 128, 256, 96, 8, 512])  # 64/128/256: warp kernel; others: generic kernel
def test_append_kv_int4_cuda_bit_identical_to_cpu(rng, d, dtype, with_signs):
    heads, page_size = 3, 7
    tokens = 150
    num_pages = tokens // page_size + 4
    k = model_like(rng, tokens, heads, d, dtype)
    v = random_array(rng, (tokens, heads, d), dtype, "torch")
    slots = rng.permutation(num_pages * page_size)[:tokens].astype(rng.choice([np.int32, np.int64]))
    slots[rng.random(tokens) < 0.15] = -1
    signs = make_signs(d, with_signs)
    default_ok = d % 128 == 0 or d & (d - 1) == 0  # the default block min(D, 128) must be a power of two
    for block in blocks_for(d) + ([None] if default_ok else []):
        cpu = torch_caches(num_pages, page_size, heads, d)
        gpu = torch_caches(num_pages, page_size, heads, d, "cuda")
        kvcore.append_kv_int4(k, v, *cpu, torch.from_numpy(slots), block_size=block,
                              signs=None if signs is None else torch.from_numpy(signs))
        kvcore.append_kv_int4(k.cuda(), v.cuda(), *gpu, cuda(slots), block_size=block, signs=cuda(signs))
        torch.cuda.synchronize()
        want = np_append(k, v, *[c.numpy() for c in torch_caches(num_pages, page_size, heads, d)], slots,
                         block or default_block(d), signs)
        for c, g, w in zip(cpu, gpu, want):
            assert_same_bits(host_bits(g), host_bits(c))
            assert_same_bits(host_bits(c), w)


def _cpu_vs_cuda_rows(rows: np.ndarray, cases) -> None:
    """append_kv_int4 of [n, 1, D] float32 rows on both backends, compared bit for bit per case."""
    n, _, d = rows.shape
    x = torch.from_numpy(rows)
    for block, signs in cases:
        cpu = torch_caches(1, n, 1, d)
        gpu = torch_caches(1, n, 1, d, "cuda")
        kvcore.append_kv_int4(x, x, *cpu, torch.arange(n), block_size=block,
                              signs=None if signs is None else torch.from_numpy(signs))
        kvcore.append_kv_int4(x.cuda(), x.cuda(), *gpu, torch.arange(n, device="cuda"), block_size=block,
                              signs=cuda(signs))
        torch.cuda.synchronize()
        for c, g in zip(cpu, gpu):
            assert_same_bits(host_bits(g), host_bits(c))


ROW_CASES = [(1, None), (1, make_signs(64, True)), (2, None), (16, make_signs(64, True)), (64, None)]


def test_append_kv_int4_cuda_ties_constant_and_tiny_rows():
    """Exact ties (round half to even), clamped extremes, zero ranges and float16-subnormal scales: the
    division and rounding must be IEEE on the device too (no fast-math). No input is zero, so every
    zero the rotation produces is +0 (signed zeros have their own test below)."""
    d = 64
    rows = np.ones((5, 1, d), np.float32)
    rows[0, 0, :2] = [1.0, 1 + 15 / 16]  # block 1: min 1, scale 1/16, both exact in float16
    rows[0, 0, 2:17] = 1 + (np.arange(15) + 0.5) / 16  # exact ties between codes c and c + 1
    rows[0, 0, 17:] = 1.25
    rows[1] = 2.5
    rows[2, 0] = np.linspace(-1 / 3, 7.0, d)  # -1/3 rounds up in float16: its code is clamped to 0
    rows[3] = 1e-8  # min underflows to 0 in float16, the range is 0
    rows[4, 0] = np.linspace(1e-4, 3e-4, d)  # a float16-subnormal scale
    _cpu_vs_cuda_rows(rows, ROW_CASES)


def test_append_kv_int4_cuda_signed_zero_rows():
    """Rows of +0 and -0: the stored min keeps the sign of the FIRST extreme of the row in the CPU's
    sequential scan (detail/int4.h). The CUDA warp reduction (fminf/fmaxf over lanes) must pick the
    same zero for the params to stay bit-identical (the dequantized values are equal either way)."""
    d = 64
    rows = np.zeros((4, 1, d), np.float32)
    rows[1] = -0.0
    rows[2, 0, ::2] = -0.0
    rows[3, 0, 1::2] = -0.0
    _cpu_vs_cuda_rows(rows, ROW_CASES)


def test_append_kv_int4_cuda_strided_inputs_and_pages(rng):
    """k/v slices of a fused QKV tensor (head stride 2D) and INT4 pages inside larger page slots."""
    tokens, heads, d, page_size, num_pages = 300, 2, 128, 16, 24
    qkv = random_array(rng, (tokens, 8 + 4 * heads, d), "bfloat16", "torch")
    k, v = qkv[:, 8:8 + 2 * heads:2], qkv[:, 8 + 2 * heads::2]
    slots = torch.from_numpy(rng.permutation(num_pages * page_size)[:tokens].astype(np.int64))
    cs, ps = kvcore.int4_cache_shapes(num_pages, page_size + 5, heads, d)

    def caches(device):
        codes = torch.full(cs, 0x5A, dtype=torch.uint8, device=device)
        params = torch.full(ps, POISON, dtype=torch.float16, device=device)
        return codes, params, (codes[:, 2:2 + page_size], params[:, 5:], codes.clone()[:, :page_size],
                               params.clone()[:, 1:1 + page_size])

    cbig, pbig, cpu = caches("cpu")
    gcbig, gpbig, gpu = caches("cuda")
    kvcore.append_kv_int4(k, v, *cpu, slots, block_size=32, signs=torch.from_numpy(make_signs(d, True)))
    gqkv = qkv.cuda()
    kvcore.append_kv_int4(gqkv[:, 8:8 + 2 * heads:2], gqkv[:, 8 + 2 * heads::2], *gpu, slots.cuda(), block_size=32,
                          signs=cuda(make_signs(d, True)))
    torch.cuda.synchronize()
    for c, g in zip(cpu, gpu):
        assert_same_bits(host_bits(g), host_bits(c))
    assert_same_bits(host_bits(gcbig), host_bits(cbig))
    assert_same_bits(host_bits(gpbig), host_bits(pbig))


def test_append_kv_int4_cuda_large_batch(rng):
    """Many rows (grid-stride loop) at D = 128, bf16, default block, with signs."""
    tokens, heads, d, page_size = 20000, 8, 128, 16
    num_pages = tokens // page_size + 1
    k = model_like(rng, tokens, heads, d, "bfloat16")
    slots = torch.from_numpy(rng.permutation(num_pages * page_size)[:tokens].astype(np.int32))
    signs = make_signs(d, True)
    cpu = torch_caches(num_pages, page_size, heads, d)
    gpu = torch_caches(num_pages, page_size, heads, d, "cuda")
    kvcore.append_kv_int4(k, k, *cpu, slots, signs=torch.from_numpy(signs))
    kvcore.append_kv_int4(k.cuda(), k.cuda(), *gpu, slots.cuda(), signs=cuda(signs))
    torch.cuda.synchronize()
    for c, g in zip(cpu, gpu):
        assert_same_bits(host_bits(g), host_bits(c))


def test_append_kv_int4_cuda_debug_reports_bad_slots(rng):
    d = 64
    k = torch.randn(4, 2, d, device="cuda", dtype=torch.bfloat16)
    caches = torch_caches(2, 4, 2, d, "cuda")
    slots = torch.tensor([0, 9, 3, 1], device="cuda", dtype=torch.int32)  # 9 >= 8 slots
    kvcore.set_debug_checks(True)
    try:
        with pytest.raises(IndexError, match=r"slot_mapping\[1\] = 9 is out of range"):
            kvcore.append_kv_int4(k, k, *caches, slots)
        # the report was cleared: a good call passes
        kvcore.append_kv_int4(k, k, *caches, torch.tensor([0, 2, 3, 1], device="cuda", dtype=torch.int32))
        torch.cuda.synchronize()
    finally:
        kvcore.set_debug_checks(False)
    # Without debug checks the bad token is skipped and the others land exactly as on the CPU.
    gpu = torch_caches(2, 4, 2, d, "cuda")
    kvcore.append_kv_int4(k, k, *gpu, slots)
    cpu = torch_caches(2, 4, 2, d)
    kvcore.append_kv_int4(k.cpu(), k.cpu(), *cpu, torch.tensor([0, -1, 3, 1], dtype=torch.int32))
    torch.cuda.synchronize()
    for c, g in zip(cpu, gpu):
        assert_same_bits(host_bits(g), host_bits(c))


def test_append_kv_int4_cuda_rejects_mixed_devices_and_huge_head_dim():
    k = torch.randn(2, 1, 64, device="cuda")
    caches = torch_caches(1, 4, 1, 64, "cuda")
    with pytest.raises(ValueError, match="signs is on cpu but the data is on cuda"):
        kvcore.append_kv_int4(k, k, *caches, torch.tensor([0, 1], device="cuda"), signs=make_signs(64, True))
    with pytest.raises(ValueError, match="slot_mapping is on cpu but k is on cuda"):
        kvcore.append_kv_int4(k, k, *caches, torch.tensor([0, 1]))
    big = torch.randn(2, 1, 1024, device="cuda")
    with pytest.raises(ValueError, match="head_dim"):
        kvcore.append_kv_int4(big, big, *torch_caches(1, 4, 1, 1024, "cuda"), torch.tensor([0, 1], device="cuda"))


# --- hadamard_transform / dequantize_kv_int4 --------------------------------------------------------

@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128, 256, 96])
def test_hadamard_cuda_bit_identical_to_cpu(rng, d, dtype, inverse):
    full = random_array(rng, (37, 2 * d), dtype, "torch")
    x, xg = full[:, :d], full.cuda()[:, :d]  # rows with a stride of 2D on both devices
    for block in blocks_for(d):
        for signs in (None, make_signs(d, True, seed=block)):
            want = kvcore.hadamard_transform(x, block, None if signs is None else torch.from_numpy(signs), inverse)
            got = kvcore.hadamard_transform(xg, block, cuda(signs), inverse)
            torch.cuda.synchronize()
            assert got.is_cuda and got.dtype == x.dtype
            assert_same_bits(host_bits(got), host_bits(want))
            if dtype == "float32" and not inverse:
                assert_same_bits(host_bits(got), np_rotate(x.numpy(), block, signs))


@pytest.mark.parametrize("d", [64, 128, 256, 96])
def test_dequantize_cuda_bit_identical_to_cpu(rng, d):
    codes = torch.from_numpy(rng.integers(0, 256, (9, 4, 2, d // 2)).astype(np.uint8))
    params = torch.from_numpy(np.stack([rng.uniform(0, 0.7, (9, 4, 2)), rng.uniform(-5, 0, (9, 4, 2))],
                                       -1).astype(np.float16))
    for block in blocks_for(d):
        for signs in (None, make_signs(d, True)):
            want = kvcore.dequantize_kv_int4(codes, params, block_size=block,
                                             signs=None if signs is None else torch.from_numpy(signs))
            got = kvcore.dequantize_kv_int4(codes.cuda(), params.cuda(), block_size=block, signs=cuda(signs))
            torch.cuda.synchronize()
            assert got.is_cuda and got.dtype == torch.float32 and tuple(got.shape) == (9, 4, 2, d)
            assert_same_bits(host_bits(got), host_bits(want))
            assert_same_bits(host_bits(got), np_dequantize(codes.numpy(), params.numpy(), block, signs))


# --- INT4 attention: CUDA vs CPU ------------------------------------------------------------------------

def assert_close(got, want, dtype, got_lse=None, want_lse=None):
    assert got.is_cuda
    g = to_numpy_f32(got)
    assert not np.isnan(g).any(), f"{np.isnan(g).sum()} output elements were never written"
    np.testing.assert_allclose(g, to_numpy_f32(want), **TOL[dtype])
    if want_lse is not None:
        assert got_lse.is_cuda and got_lse.dtype == torch.float32
        gl = to_numpy_f32(got_lse)
        assert not np.isnan(gl).any()
        np.testing.assert_allclose(gl, to_numpy_f32(want_lse), **LSE_TOL)


def nan_like_cuda(q):
    return torch.full(tuple(q.shape), NAN, dtype=q.dtype if isinstance(q, torch.Tensor) else torch.float16,
                      device="cuda")


def compare_int4(cpu_args: dict, dtype: str, **options):
    op = kvcore.paged_prefill_int4 if "cu_seqlens_q" in cpu_args else kvcore.paged_decode_int4
    want, want_lse = op(**cpu_args, return_lse=True, **options)
    gpu = on_cuda(cpu_args)
    out = nan_like_cuda(gpu["q"])
    got, got_lse = op(**gpu, out=out, return_lse=True, **options)
    torch.cuda.synchronize()
    assert got is out
    assert_close(got, want, dtype, got_lse, want_lse)


ATTN_CASES = [  # (head_dim, heads, page_size, block, signs)
    (64, "mha", 1, None, False), (64, "gqa4", 7, 16, True), (64, "mqa", 16, 1, False),
    (128, "gqa4", 1, 32, True), (128, "gqa8", 7, None, False), (128, "mha", 16, 64, True),
    (128, "gqa4", 16, 4, True),
    (256, "mqa", 1, None, True), (256, "gqa4", 7, 128, False), (256, "gqa8", 16, 256, True),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("head_dim,heads,page_size,block,with_signs", ATTN_CASES)
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_int4_attention_cuda_equals_cpu(rng, mode, head_dim, heads, page_size, block, with_signs, dtype):
    hq, hkv = HEAD_CONFIGS[heads]
    args, _, _ = int4_paged_case(rng, dtype, batch=5, hq=hq, hkv=hkv, d=head_dim, page_size=page_size,
                                 max_len=150, decode=mode == "decode", block=block, with_signs=with_signs)
    compare_int4(args, dtype, **({} if mode == "decode" else dict(causal=mode == "causal")))


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_int4_attention_cuda_options(rng, mode, options):
    opts = dict(OPTION_SETS[options])
    if mode != "decode":
        opts["causal"] = mode == "causal"
    args, _, _ = int4_paged_case(rng, "bfloat16", batch=6, hq=16, hkv=2, d=128, page_size=16, max_len=300,
                                 decode=mode == "decode", block=64, with_signs=True)
    compare_int4(args, "bfloat16", **opts)


@pytest.mark.parametrize("options", [{}, dict(window=5000, soft_cap=20.0)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_int4_split_kv_long_sequence(rng, mode, dtype, options):
    """16K keys at batch 1 (split across many CTAs and merged), next to short requests."""
    seq_lens = np.array([16384, 3, 777], np.int32)
    q_lens = np.array([48, 3, 20], np.int32) if mode == "prefill" else None
    args, _, _ = int4_paged_case(rng, dtype, hq=16, hkv=2, d=128, page_size=16, decode=mode == "decode",
                                 seq_lens=seq_lens, q_lens=q_lens, with_signs=True)
    compare_int4(args, dtype, **options)


@pytest.mark.parametrize("table", ["none", "slots"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_int4_virtual_layout_cuda(rng, mode, table):
    max_seqs, max_tokens, hq, hkv, d, batch = 6, 700, 8, 1, 256, 5
    caches = int4_caches(max_seqs, max_tokens, hkv, d, poison=False)
    k = random_array(rng, (max_seqs * max_tokens, hkv, d), "float16")
    kvcore.append_kv_int4(k, k[::-1].copy(), *caches, np.arange(max_seqs * max_tokens), signs=make_signs(d, True))
    seq_lens = ragged_seq_lens(rng, batch, max_tokens)
    seq_lens[0] = max_tokens
    args = dict(k_codes=caches[0], k_params=caches[1], v_codes=caches[2], v_params=caches[3], block_table=None,
                seq_lens=seq_lens, signs=make_signs(d, True))
    if table == "slots":
        args["block_table"] = rng.permutation(max_seqs)[:batch].astype(np.int32)[:, None].copy()
    if mode == "decode":
        args["q"] = random_array(rng, (batch, hq, d), "float16")
    else:
        q_lens = ragged_q_lens(rng, seq_lens)
        args["q"] = random_array(rng, (int(q_lens.sum()), hq, d), "float16")
        args["cu_seqlens_q"] = cu_of(q_lens)
    compare_int4(args, "float16", window=500)


@pytest.mark.parametrize("options", list(SHARED_OPTIONS))
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_shared_prefix_int4_cuda_equals_cpu(rng, mode, options):
    opts = dict(SHARED_OPTIONS[options])
    if mode != "decode":
        opts["causal"] = mode == "causal"
    hq, hkv, d, page_size, block = 16, 2, 128, 16, 64
    group_sizes = [3, 1, 0, 40, 2]
    prefix_lens = [int(rng.integers(1, 400)), 0, int(rng.integers(0, 10)), 2048, 17]
    suffix_lens = ragged_seq_lens(rng, sum(group_sizes), 60)
    q_lens = None if mode == "decode" else ragged_q_lens(rng, suffix_lens)
    prefix_table, table, num_pages = alloc_tables(rng, page_size, prefix_lens, suffix_lens)
    signs = make_signs(d, True)
    k = random_array(rng, (num_pages * page_size, hkv, d), "bfloat16", "torch")
    v = random_array(rng, (num_pages * page_size, hkv, d), "bfloat16", "torch")
    caches = [c.numpy() for c in torch_caches(num_pages, page_size, hkv, d)]
    kvcore.append_kv_int4(k, v, *caches, np.arange(num_pages * page_size), block_size=block, signs=signs)
    tokens = len(suffix_lens) if mode == "decode" else int(q_lens.sum())
    cpu = dict(q=random_array(rng, (tokens, hq, d), "bfloat16", "torch"), k_codes=caches[0], k_params=caches[1],
               v_codes=caches[2], v_params=caches[3], prefix_block_table=prefix_table,
               prefix_lens=np.array(prefix_lens, np.int32), group_indptr=cu_of(group_sizes), block_table=table,
               seq_lens=suffix_lens, block_size=block, signs=signs)
    if mode != "decode":
        cpu["cu_seqlens_q"] = cu_of(q_lens)
    op = kvcore.shared_prefix_decode_int4 if mode == "decode" else kvcore.shared_prefix_prefill_int4
    want, want_lse = op(**cpu, return_lse=True, **opts)
    gpu = on_cuda(cpu)
    out = nan_like_cuda(gpu["q"])
    got, got_lse = op(**gpu, out=out, return_lse=True, **opts)
    torch.cuda.synchronize()
    assert got is out
    assert_close(got, want, "bfloat16", got_lse, want_lse)


def test_int4_attention_cuda_debug_reports_bad_block_table(rng):
    seq_lens = np.array([20, 30, 9], np.int32)
    args, _, _ = int4_paged_case(rng, "bfloat16", hq=8, hkv=2, d=64, page_size=8, decode=True, seq_lens=seq_lens)
    num_pages = args["k_codes"].shape[0]
    gpu = on_cuda(args)
    gpu["block_table"][2, 1] = num_pages + 90
    kvcore.set_debug_checks(True)
    try:
        with pytest.raises(IndexError, match=rf"= {num_pages + 90} is out of range"):
            kvcore.paged_decode_int4(**gpu)
        compare_int4(args, "bfloat16")  # the report was cleared: a good call passes
    finally:
        kvcore.set_debug_checks(False)


def test_int4_attention_cuda_rejects_signs_on_the_host(rng):
    args, _, _ = int4_paged_case(rng, "float16", hq=4, hkv=2, d=64, page_size=8, decode=True, with_signs=True)
    gpu = on_cuda(args)
    gpu["signs"] = args["signs"]  # numpy, on the host
    with pytest.raises(ValueError, match="signs is on cpu"):
        kvcore.paged_decode_int4(**gpu)
