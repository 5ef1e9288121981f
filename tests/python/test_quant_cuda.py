"""The INT4 KV family on the device, run on a GPU (cuda) and on the SIMT harness (simt):
append_kv_int4 codes and params bit-identical to the CPU backend (and to the numpy reference of
test_quant.py) for every head dim, input dtype, block size and with or without signs; hadamard_transform and dequantize_kv_int4 bit-identical to the CPU; INT4 attention
(decode incl. split-KV over long contexts, prefill, shared prefix, virtual layout) within tolerance of
the CPU backend, which test_quant.py checks against the float64 reference; decode needles at split,
tile and page boundaries against a float64 reference on the dequantized caches; debug-mode index
reports."""

from __future__ import annotations

import numpy as np
import pytest

import kvcore
from arrays import POISON, bits, random_array, to_numpy_f32
from devices import on_device
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

torch = pytest.importorskip("torch")

# CPU and CUDA both accumulate in float32; the CUDA tensor-core prefill path additionally rounds the
# dequantized K/V, the rotated queries and the probabilities to the 16-bit dtype, hence the slack
# over the bf16-cache tolerances of test_attention_cuda.py (the harness measured bf16 tails of 0.019
# over 1.4M outputs, on rows with few keys where the rounding does not average out).
TOL = {"bfloat16": dict(atol=2.5e-2, rtol=1.5e-2), "float16": dict(atol=6e-3, rtol=6e-3)}
# The LSE is a log-sum of scores: on a row with one key (window 1, causal starts) it is one score, whose
# bf16 rounding of rotated q and dequantized K shows directly (measured by the harness at D = 128:
# std 0.0025, tails to 0.011 over a few thousand rows).
LSE_TOL = {"bfloat16": dict(atol=2e-2, rtol=3e-3), "float16": dict(atol=5e-3, rtol=3e-3)}
NAN = float("nan")


def put(dev, x):
    """numpy / torch CPU arrays -> the device's arrays; None unchanged."""
    return None if x is None else dev.put(x)


def host_bits(dev, x) -> np.ndarray:
    """Raw bits of a device array on the host."""
    return bits(dev.host(x))


def torch_caches(num_pages, page_size, heads, d, dev=None):
    """Poisoned (k_codes, k_params, v_codes, v_params) torch tensors, on dev when given."""
    cs, ps = kvcore.int4_cache_shapes(num_pages, page_size, heads, d)
    codes = torch.full(cs, 0xA5, dtype=torch.uint8)
    params = torch.full(ps, POISON, dtype=torch.float16)
    caches = (codes, params, codes.clone(), params.clone())
    return caches if dev is None else tuple(dev.put(c) for c in caches)


def model_like(rng, tokens, heads, d, dtype):
    """Per-channel lognormal scales and a few large, offset outlier channels (exercises wide ranges)."""
    x = rng.standard_normal((tokens, heads, d)) * np.exp(0.7 * rng.standard_normal(d))
    out = rng.choice(d, 3, replace=False)
    x[..., out] = x[..., out] * 12 + 20 * rng.choice([-1, 1], 3)
    return torch.from_numpy(x.astype(np.float32)).to(getattr(torch, dtype))


def blocks_for(d: int) -> list[int]:
    return [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if d % b == 0 and b <= d]


# --- append_kv_int4: device == CPU == numpy, bit for bit -------------------------------------------

@pytest.mark.parametrize("with_signs", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("d", [64, 128, 256, 96, 8, 192])  # 64/128/256: warp kernel; others: generic kernel
def test_append_kv_int4_cuda_bit_identical_to_cpu(dev, rng, d, dtype, with_signs):
    heads, page_size = 3, 7
    tokens = 150
    num_pages = tokens // page_size + 4
    k = model_like(rng, tokens, heads, d, dtype)
    v = random_array(rng, (tokens, heads, d), dtype, "torch")
    slots = rng.permutation(num_pages * page_size)[:tokens].astype(rng.choice([np.int32, np.int64]))
    slots[rng.random(tokens) < 0.15] = -1
    signs = make_signs(d, with_signs)
    default_ok = d % 128 == 0 or d & (d - 1) == 0  # the default block min(D, 128) must be a power of two
    gk, gv, gslots, gsigns = dev.put(k), dev.put(v), dev.put(slots), put(dev, signs)
    for block in blocks_for(d) + ([None] if default_ok else []):
        cpu = torch_caches(num_pages, page_size, heads, d)
        gpu = torch_caches(num_pages, page_size, heads, d, dev)
        kvcore.append_kv_int4(k, v, *cpu, torch.from_numpy(slots), block_size=block,
                              signs=None if signs is None else torch.from_numpy(signs))
        dev.kv.append_kv_int4(gk, gv, *gpu, gslots, block_size=block, signs=gsigns)
        dev.sync()
        want = np_append(k, v, *[c.numpy() for c in torch_caches(num_pages, page_size, heads, d)], slots,
                         block or default_block(d), signs)
        for c, g, w in zip(cpu, gpu, want):
            assert_same_bits(host_bits(dev, g), bits(c))
            assert_same_bits(bits(c), w)


def _cpu_vs_device_rows(dev, rows: np.ndarray, cases) -> None:
    """append_kv_int4 of [n, 1, D] float32 rows on both backends, compared bit for bit per case."""
    n, _, d = rows.shape
    x = torch.from_numpy(rows)
    gx, gslots = dev.put(x), dev.put(torch.arange(n))
    for block, signs in cases:
        cpu = torch_caches(1, n, 1, d)
        gpu = torch_caches(1, n, 1, d, dev)
        kvcore.append_kv_int4(x, x, *cpu, torch.arange(n), block_size=block,
                              signs=None if signs is None else torch.from_numpy(signs))
        dev.kv.append_kv_int4(gx, gx, *gpu, gslots, block_size=block, signs=put(dev, signs))
        dev.sync()
        for c, g in zip(cpu, gpu):
            assert_same_bits(host_bits(dev, g), bits(c))


ROW_CASES = [(1, None), (1, make_signs(64, True)), (2, None), (16, make_signs(64, True)), (64, None)]


def test_append_kv_int4_cuda_ties_constant_and_tiny_rows(dev):
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
    _cpu_vs_device_rows(dev, rows, ROW_CASES)


def test_append_kv_int4_cuda_signed_zero_rows(dev):
    """Rows of +0 and -0: the stored min keeps the sign of the FIRST extreme of the row in the CPU's
    sequential scan (detail/int4.h). The CUDA warp reduction (fminf/fmaxf over lanes) must pick the
    same zero for the params to stay bit-identical (the dequantized values are equal either way)."""
    d = 64
    rows = np.zeros((4, 1, d), np.float32)
    rows[1] = -0.0
    rows[2, 0, ::2] = -0.0
    rows[3, 0, 1::2] = -0.0
    _cpu_vs_device_rows(dev, rows, ROW_CASES)


def test_append_kv_int4_cuda_strided_inputs_and_pages(dev, rng):
    """k/v slices of a fused QKV tensor (head stride 2D) and INT4 pages inside larger page slots."""
    tokens, heads, d, page_size, num_pages = 300, 2, 128, 16, 24
    qkv = random_array(rng, (tokens, 8 + 4 * heads, d), "bfloat16", "torch")
    k, v = qkv[:, 8:8 + 2 * heads:2], qkv[:, 8 + 2 * heads::2]
    slots = torch.from_numpy(rng.permutation(num_pages * page_size)[:tokens].astype(np.int64))
    cs, ps = kvcore.int4_cache_shapes(num_pages, page_size + 5, heads, d)

    def caches(dev=None):
        codes = torch.full(cs, 0x5A, dtype=torch.uint8)
        params = torch.full(ps, POISON, dtype=torch.float16)
        codes2, params2 = codes.clone(), params.clone()
        if dev is not None:
            codes, params, codes2, params2 = (dev.put(x) for x in (codes, params, codes2, params2))
        return codes, params, (codes[:, 2:2 + page_size], params[:, 5:], codes2[:, :page_size],
                               params2[:, 1:1 + page_size])

    cbig, pbig, cpu = caches()
    gcbig, gpbig, gpu = caches(dev)
    kvcore.append_kv_int4(k, v, *cpu, slots, block_size=32, signs=torch.from_numpy(make_signs(d, True)))
    gqkv = dev.put(qkv)
    dev.kv.append_kv_int4(gqkv[:, 8:8 + 2 * heads:2], gqkv[:, 8 + 2 * heads::2], *gpu, dev.put(slots),
                          block_size=32, signs=dev.put(make_signs(d, True)))
    dev.sync()
    for c, g in zip(cpu, gpu):
        assert_same_bits(host_bits(dev, g), bits(c))
    assert_same_bits(host_bits(dev, gcbig), bits(cbig))
    assert_same_bits(host_bits(dev, gpbig), bits(pbig))


def test_append_kv_int4_cuda_large_batch(dev, rng):
    """Many rows (a large grid) at D = 128, bf16, default block, with signs."""
    tokens, heads, d, page_size = (20000 if dev.name == "cuda" else 2500), 8, 128, 16
    num_pages = tokens // page_size + 1
    k = model_like(rng, tokens, heads, d, "bfloat16")
    slots = torch.from_numpy(rng.permutation(num_pages * page_size)[:tokens].astype(np.int32))
    signs = make_signs(d, True)
    cpu = torch_caches(num_pages, page_size, heads, d)
    gpu = torch_caches(num_pages, page_size, heads, d, dev)
    kvcore.append_kv_int4(k, k, *cpu, slots, signs=torch.from_numpy(signs))
    gk = dev.put(k)
    dev.kv.append_kv_int4(gk, gk, *gpu, dev.put(slots), signs=dev.put(signs))
    dev.sync()
    for c, g in zip(cpu, gpu):
        assert_same_bits(host_bits(dev, g), bits(c))


def test_append_kv_int4_cuda_debug_reports_bad_slots(dev, rng):
    d = 64
    k_host = random_array(rng, (4, 2, d), "bfloat16", "torch")
    k = dev.put(k_host)
    caches = torch_caches(2, 4, 2, d, dev)
    slots = dev.put(torch.tensor([0, 9, 3, 1], dtype=torch.int32))  # 9 >= 8 slots
    dev.kv.set_debug_checks(True)
    try:
        with pytest.raises(IndexError, match=r"slot_mapping\[1\] = 9 is out of range"):
            dev.kv.append_kv_int4(k, k, *caches, slots)
        # the report was cleared: a good call passes
        dev.kv.append_kv_int4(k, k, *caches, dev.put(torch.tensor([0, 2, 3, 1], dtype=torch.int32)))
        dev.sync()
    finally:
        dev.kv.set_debug_checks(False)
    # Without debug checks the bad token is skipped and the others land exactly as on the CPU.
    gpu = torch_caches(2, 4, 2, d, dev)
    dev.kv.append_kv_int4(k, k, *gpu, slots)
    cpu = torch_caches(2, 4, 2, d)
    kvcore.append_kv_int4(k_host, k_host, *cpu, torch.tensor([0, -1, 3, 1], dtype=torch.int32))
    dev.sync()
    for c, g in zip(cpu, gpu):
        assert_same_bits(host_bits(dev, g), bits(c))


def test_append_kv_int4_cuda_rejects_mixed_devices_and_huge_head_dim(dev, rng):
    k = dev.put(random_array(rng, (2, 1, 64), "float32", "torch"))
    caches = torch_caches(1, 4, 1, 64, dev)
    with pytest.raises(ValueError, match="signs is on cpu but the data is on cuda"):
        dev.kv.append_kv_int4(k, k, *caches, dev.put(torch.tensor([0, 1])), signs=make_signs(64, True))
    with pytest.raises(ValueError, match="slot_mapping is on cpu but k is on cuda"):
        dev.kv.append_kv_int4(k, k, *caches, torch.tensor([0, 1]))
    # The generic kernels hold a row per thread in local memory, bounded by attention's largest head
    # dim: wider rows are refused up front (the CPU takes them).
    for d in (512, 1024):
        big = dev.put(random_array(rng, (2, 1, d), "float32", "torch"))
        with pytest.raises(ValueError, match="append_kv_int4: CUDA supports head_dim up to 256, got " + str(d)):
            dev.kv.append_kv_int4(big, big, *torch_caches(1, 4, 1, d, dev), dev.put(torch.tensor([0, 1])))
        with pytest.raises(ValueError, match="hadamard_transform: CUDA supports head_dim up to 256"):
            dev.kv.hadamard_transform(big, 64, out=dev.nan_like(big))
        codes, params = torch_caches(1, 2, 1, d, dev)[:2]
        with pytest.raises(ValueError, match="dequantize_kv_int4: CUDA supports head_dim up to 256"):
            dev.kv.dequantize_kv_int4(codes, params, block_size=64, out=dev.full((1, 2, 1, d), NAN, torch.float32))


# --- hadamard_transform / dequantize_kv_int4 --------------------------------------------------------

@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128, 256, 96, 192])
def test_hadamard_cuda_bit_identical_to_cpu(dev, rng, d, dtype, inverse):
    full = random_array(rng, (37, 2 * d), dtype, "torch")
    x, xg = full[:, :d], dev.put(full)[:, :d]  # rows with a stride of 2D on both devices
    for block in blocks_for(d):
        for signs in (None, make_signs(d, True, seed=block)):
            want = kvcore.hadamard_transform(x, block, None if signs is None else torch.from_numpy(signs), inverse)
            out = dev.nan_like(x)
            got = dev.kv.hadamard_transform(xg, block, put(dev, signs), inverse, out=out)
            dev.sync()
            assert got is out and got.dtype == x.dtype
            assert_same_bits(host_bits(dev, got), bits(want))
            if dtype == "float32" and not inverse:
                assert_same_bits(host_bits(dev, got), np_rotate(x.numpy(), block, signs))


@pytest.mark.parametrize("d", [64, 128, 256, 96, 192])
def test_dequantize_cuda_bit_identical_to_cpu(dev, rng, d):
    codes = torch.from_numpy(rng.integers(0, 256, (9, 4, 2, d // 2)).astype(np.uint8))
    params = torch.from_numpy(np.stack([rng.uniform(0, 0.7, (9, 4, 2)), rng.uniform(-5, 0, (9, 4, 2))],
                                       -1).astype(np.float16))
    gcodes, gparams = dev.put(codes), dev.put(params)
    for block in blocks_for(d):
        for signs in (None, make_signs(d, True)):
            want = kvcore.dequantize_kv_int4(codes, params, block_size=block,
                                             signs=None if signs is None else torch.from_numpy(signs))
            out = dev.full((9, 4, 2, d), NAN, torch.float32)
            got = dev.kv.dequantize_kv_int4(gcodes, gparams, block_size=block, signs=put(dev, signs), out=out)
            dev.sync()
            assert got is out
            assert_same_bits(host_bits(dev, got), bits(want))
            assert_same_bits(host_bits(dev, got), np_dequantize(codes.numpy(), params.numpy(), block, signs))


# --- INT4 attention: device vs CPU ------------------------------------------------------------------------

def assert_close(got, want, dtype, got_lse=None, want_lse=None, tol_factor=1.0):
    """Device results (poisoned with NaN before the call, so a missed element fails) vs the CPU's."""
    assert got.is_cuda
    g = to_numpy_f32(got)
    assert not np.isnan(g).any(), f"{np.isnan(g).sum()} output elements were never written"
    np.testing.assert_allclose(g, to_numpy_f32(want), **{k: t * tol_factor for k, t in TOL[dtype].items()})
    if want_lse is not None:
        assert got_lse.is_cuda and got_lse.dtype == torch.float32
        gl = to_numpy_f32(got_lse)
        assert not np.isnan(gl).any()
        np.testing.assert_allclose(gl, to_numpy_f32(want_lse), **{k: t * tol_factor for k, t in LSE_TOL[dtype].items()})


def run_on_device(dev, op, gpu_args: dict, lse_shape, **options):
    """op on device arrays into NaN-poisoned out and lse."""
    out = dev.nan_like(gpu_args["q"])
    lse = dev.full(tuple(lse_shape), NAN, torch.float32)
    got, got_lse = getattr(dev.kv, op.__name__)(**gpu_args, out=out, lse=lse, return_lse=True, **options)
    dev.sync()
    assert got is out and got_lse is lse
    return got, got_lse


def compare_int4(dev, cpu_args: dict, dtype: str, tol_factor: float = 1.0, **options):
    op = kvcore.paged_prefill_int4 if "cu_seqlens_q" in cpu_args else kvcore.paged_decode_int4
    want, want_lse = op(**cpu_args, return_lse=True, **options)
    got, got_lse = run_on_device(dev, op, on_device(dev, cpu_args), want_lse.shape, **options)
    assert_close(got, want, dtype, got_lse, want_lse, tol_factor)


ATTN_CASES = [  # (head_dim, heads, page_size, block, signs)
    (64, "mha", 1, None, False), (64, "gqa4", 7, 16, True), (64, "mqa", 16, 1, False),
    (128, "gqa4", 1, 32, True), (128, "gqa8", 7, None, False), (128, "mha", 16, 64, True),
    (128, "gqa4", 16, 4, True),
    (256, "mqa", 1, None, True), (256, "gqa4", 7, 128, False), (256, "gqa8", 16, 256, True),
    (80, "gqa4", 7, 16, True), (96, "gqa8", 16, 32, False), (192, "mha", 1, 64, True),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("head_dim,heads,page_size,block,with_signs", ATTN_CASES)
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_int4_attention_cuda_equals_cpu(dev, rng, mode, head_dim, heads, page_size, block, with_signs, dtype):
    hq, hkv = HEAD_CONFIGS[heads]
    args, _, _ = int4_paged_case(rng, dtype, batch=5, hq=hq, hkv=hkv, d=head_dim, page_size=page_size,
                                 max_len=150, decode=mode == "decode", block=block, with_signs=with_signs)
    compare_int4(dev, args, dtype, **({} if mode == "decode" else dict(causal=mode == "causal")))


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_int4_attention_cuda_options(dev, rng, mode, options):
    opts = dict(OPTION_SETS[options])
    if mode != "decode":
        opts["causal"] = mode == "causal"
    args, _, _ = int4_paged_case(rng, "bfloat16", batch=6, hq=16, hkv=2, d=128, page_size=16, max_len=300,
                                 decode=mode == "decode", block=64, with_signs=True)
    # The tensor-core path scores bf16-rounded q and K: the score error grows with the scale, and on
    # causal rows with two or three keys it moves the output by dp * (v0 - v1) undamped by averaging
    # (seen by the harness at scale 0.5, 5.7x the default: 0.025 off on a two-key row, LSE 0.018 off).
    large_scale = opts.get("scale", 128 ** -0.5) > 128 ** -0.5
    compare_int4(dev, args, "bfloat16", tol_factor=3.0 if large_scale else 1.0, **opts)


@pytest.mark.parametrize("options", [{}, dict(window=5000, soft_cap=20.0)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_int4_split_kv_long_sequence(dev, rng, mode, dtype, options):
    """16K keys at batch 1 (split across many CTAs and merged), next to short requests."""
    seq_lens = np.array([16384, 3, 777], np.int32)
    q_lens = np.array([48, 3, 20], np.int32) if mode == "prefill" else None
    args, _, _ = int4_paged_case(rng, dtype, hq=16, hkv=2, d=128, page_size=16, decode=mode == "decode",
                                 seq_lens=seq_lens, q_lens=q_lens, with_signs=True)
    compare_int4(dev, args, dtype, **options)


@pytest.mark.parametrize("table", ["none", "slots"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_int4_virtual_layout_cuda(dev, rng, mode, table):
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
    compare_int4(dev, args, "float16", window=500)


@pytest.mark.parametrize("options", list(SHARED_OPTIONS))
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_shared_prefix_int4_cuda_equals_cpu(dev, rng, mode, options):
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
    got, got_lse = run_on_device(dev, op, on_device(dev, cpu), want_lse.shape, **opts)
    assert_close(got, want, "bfloat16", got_lse, want_lse)


@pytest.mark.parametrize("group", [1, 8])
@pytest.mark.parametrize("page_size", [16, 7])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 192, 256])
def test_int4_decode_needles_at_split_and_tile_boundaries(dev, rng, head_dim, page_size, group):
    """The bf16 needle case of test_attention_cuda.py (keys scoring ~10 above the rest at every tile,
    split and page boundary) written as INT4 with signs: a key lost or counted twice at a boundary
    moves the LSE by ~1 / (number of needles), against 1e-5 relative here. The float64 reference
    runs on the dequantized caches (the rotation is orthogonal, so scores are the same)."""
    from attention_reference import paged_attention_reference
    from test_attention_cuda import needle_case

    hkv = 2
    case = needle_case(rng, head_dim, hkv, group, page_size, [2100, 1, 333, 1000])
    num_pages = case["k_cache"].shape[0]
    slots = num_pages * page_size
    block, signs = head_dim & -head_dim, make_signs(head_dim, True)  # the largest power-of-two block
    caches = int4_caches(num_pages, page_size, hkv, head_dim)
    kvcore.append_kv_int4(case["k_cache"].reshape(slots, hkv, head_dim), case["v_cache"].reshape(slots, hkv, head_dim),
                          *caches, np.arange(slots, dtype=np.int32), block_size=block, signs=signs)
    k_deq = kvcore.dequantize_kv_int4(caches[0], caches[1], block_size=block, signs=signs)
    v_deq = kvcore.dequantize_kv_int4(caches[2], caches[3], block_size=block, signs=signs)
    want, want_lse = paged_attention_reference(case["q"], k_deq, v_deq, case["block_table"], case["seq_lens"])
    args = dict(q=case["q"], k_codes=caches[0], k_params=caches[1], v_codes=caches[2], v_params=caches[3],
                block_table=case["block_table"], seq_lens=case["seq_lens"], block_size=block, signs=signs)
    got, got_lse = run_on_device(dev, kvcore.paged_decode_int4, on_device(dev, args), want_lse.shape)
    g, gl = to_numpy_f32(got), to_numpy_f32(got_lse)
    assert not np.isnan(g).any() and not np.isnan(gl).any()
    np.testing.assert_allclose(gl, want_lse, rtol=1e-5, atol=0)
    np.testing.assert_allclose(g, want, **TOL["bfloat16"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["causal", "non_causal", "window"])
@pytest.mark.parametrize("head_dim,group,q_len", [(64, 1, 37), (80, 4, 29), (96, 8, 45), (128, 4, 53),
                                                  (192, 1, 21), (256, 8, 19)])
def test_int4_prefill_needles_at_split_and_tile_boundaries(dev, rng, head_dim, group, q_len, mode, dtype):
    """The prefill needle case of test_attention_prefill_needles.py (one-hot needle keys of logit 64
    at every split and key-tile boundary and on each warp's causal diagonal, decoys just outside each
    row's visibility) written as INT4. With a rotation block of 64 (16 where it does not divide D),
    rotated one-hot queries and needles are exactly +-1 or +-2, so needle logits carry no 16-bit
    rounding and the LSE is compared with the float64 reference on the dequantized caches at 1e-5
    relative; a dropped, doubled or leaked needle moves it by >= ln 2."""
    from attention_reference import paged_attention_reference
    from test_attention_prefill_needles import needle_case as prefill_needle_case
    from test_attention_prefill_needles import sm_count

    hkv = 2 if group < 8 else 1
    hq = hkv * group
    causal = mode != "non_causal"
    window = 100 if mode == "window" else 0
    seq_lens, q_lens = np.array([1100, 150], np.int32), np.array([q_len, 11], np.int32)
    case, splits = prefill_needle_case(rng, dtype, head_dim, hq, hkv, seq_lens, q_lens, causal, window, sm_count(dev))
    assert splits > 1
    num_pages, page_size = case["k_cache"].shape[:2]
    slots = num_pages * page_size
    block, signs = 64 if head_dim % 64 == 0 else 16, make_signs(head_dim, True)
    caches = int4_caches(num_pages, page_size, hkv, head_dim)
    kvcore.append_kv_int4(case["k_cache"].reshape(slots, hkv, head_dim), case["v_cache"].reshape(slots, hkv, head_dim),
                          *caches, np.arange(slots, dtype=np.int32), block_size=block, signs=signs)
    k_deq = kvcore.dequantize_kv_int4(caches[0], caches[1], block_size=block, signs=signs)
    v_deq = kvcore.dequantize_kv_int4(caches[2], caches[3], block_size=block, signs=signs)
    options = dict(causal=causal, scale=1.0, **(dict(window=window) if window else {}))
    want, want_lse = paged_attention_reference(case["q"], k_deq, v_deq, case["block_table"], case["seq_lens"],
                                               case["cu_seqlens_q"], **options)
    args = dict(q=case["q"], k_codes=caches[0], k_params=caches[1], v_codes=caches[2], v_params=caches[3],
                block_table=case["block_table"], seq_lens=case["seq_lens"], cu_seqlens_q=case["cu_seqlens_q"],
                block_size=block, signs=signs)
    got, got_lse = run_on_device(dev, kvcore.paged_prefill_int4, on_device(dev, args), want_lse.shape, **options)
    g, gl = to_numpy_f32(got), to_numpy_f32(got_lse)
    assert not np.isnan(g).any() and not np.isnan(gl).any()
    # Every row found its target. Below 64: the zeros of a needle row dequantize to a constant
    # (code 8 of a [-a, a] row), and a query's decoy component can sum that over its block (+-4).
    assert (want_lse > 55).all()
    np.testing.assert_allclose(gl, want_lse, rtol=1e-5, atol=0)
    np.testing.assert_allclose(g, want, **TOL[dtype])


def test_int4_attention_cuda_debug_reports_bad_block_table(dev, rng):
    seq_lens = np.array([20, 30, 9], np.int32)
    args, _, _ = int4_paged_case(rng, "bfloat16", hq=8, hkv=2, d=64, page_size=8, decode=True, seq_lens=seq_lens)
    num_pages = args["k_codes"].shape[0]
    gpu = on_device(dev, args)
    gpu["block_table"][2, 1] = num_pages + 90
    dev.kv.set_debug_checks(True)
    try:
        with pytest.raises(IndexError, match=rf"block_table\[\d+\] = {num_pages + 90} is out of range"):
            run_on_device(dev, kvcore.paged_decode_int4, gpu, (3, 8))
        compare_int4(dev, args, "bfloat16")  # the report was cleared: a good call passes
    finally:
        dev.kv.set_debug_checks(False)


def test_int4_attention_cuda_rejects_signs_on_the_host(dev, rng):
    args, _, _ = int4_paged_case(rng, "float16", hq=4, hkv=2, d=64, page_size=8, decode=True, with_signs=True)
    gpu = on_device(dev, args)
    gpu["signs"] = args["signs"]  # numpy, on the host
    with pytest.raises(ValueError, match="signs is on cpu"):
        run_on_device(dev, kvcore.paged_decode_int4, gpu, (args["q"].shape[0], 4))
