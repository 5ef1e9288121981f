"""The attention family (paged_decode, paged_prefill, shared_prefix_decode/prefill, merge_states) on
the CPU backend against the independent float64 reference in attention_reference.py, and the
argument checks. CUDA versions are in test_attention_cuda.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

import kvcore
from arrays import POISON, poisoned, random_array, to_numpy_f32
from attention_reference import (
    f64,
    merge_states_reference,
    paged_attention_reference,
    shared_prefix_reference,
)

torch = pytest.importorskip("torch")

# Outputs are O(1) (convex combinations of N(0.25, 1) values); the kernels accumulate in float32,
# so the error is dominated by the final rounding of the output to the 16-bit dtype (float32 KV
# runs on the CPU backend only).
OUT_TOL = {
    "bfloat16": dict(atol=1e-2, rtol=1e-2),
    "float16": dict(atol=2e-3, rtol=2e-3),
    "float32": dict(atol=3e-5, rtol=3e-5),  # INT4: the rotation's float32 rounding at D=256
}
LSE_TOL = dict(atol=1e-3, rtol=1e-3)

HEAD_CONFIGS = {  # name: (Hq, Hkv)
    "mha": (2, 2),
    "gqa4": (8, 2),
    "gqa8": (8, 1),
    "mqa": (3, 1),
}


# --- helpers ------------------------------------------------------------------------------------

def fw(x: np.ndarray, framework: str):
    """An int/float numpy array in the test's framework (torch CPU tensor or numpy)."""
    return x if framework == "numpy" else torch.from_numpy(np.ascontiguousarray(x))


def framework_of(dtype: str) -> str:
    return "numpy" if dtype == "numpy-float16" else "torch"


def plain_dtype(dtype: str) -> str:
    return "float16" if dtype == "numpy-float16" else dtype


def alloc_tables(rng, page_size: int, *length_lists, extra_pages: int = 2, pad: str = "valid"):
    """Block tables [len(lengths), max_pages] int32 for each list of lengths, all drawing distinct
    random (non-contiguous) pages from one pool. Entries past a row's length are padding: random
    valid pages ("valid") or -1 ("invalid"). Returns (tables..., num_pages)."""
    needs = [[-(-int(n) // page_size) for n in lengths] for lengths in length_lists]
    num_pages = sum(sum(n) for n in needs) + extra_pages
    perm = iter(rng.permutation(num_pages).tolist())
    tables = []
    for need in needs:
        cols = max(need + [1]) + int(rng.integers(0, 3))
        if pad == "valid":
            table = rng.integers(0, num_pages, (len(need), cols))
        else:
            table = np.full((len(need), cols), -1)
        for row, n in enumerate(need):
            for i in range(n):
                table[row, i] = next(perm)
        tables.append(table.astype(np.int32))
    return (*tables, num_pages)


def make_kv(rng, num_pages, page_size, hkv, d, dtype, framework, interleaved=False):
    if interleaved:  # K and V as the two halves of one [P, 2, S, Hkv, D] buffer
        buf = random_array(rng, (num_pages, 2, page_size, hkv, d), dtype, framework)
        return buf[:, 0], buf[:, 1]
    return (random_array(rng, (num_pages, page_size, hkv, d), dtype, framework),
            random_array(rng, (num_pages, page_size, hkv, d), dtype, framework))


def make_q(rng, tokens, hq, hkv, d, dtype, framework, fused=False):
    if fused:  # q as a strided slice of a fused [tokens, Hq + 2 Hkv, D] QKV projection
        qkv = random_array(rng, (tokens, hq + 2 * hkv, d), dtype, framework)
        return qkv[:, :hq]
    return random_array(rng, (tokens, hq, d), dtype, framework)


def ragged_seq_lens(rng, batch, max_len):
    lens = rng.integers(1, max_len + 1, batch)
    lens[rng.integers(batch)] = 1  # always one single-token sequence
    return lens.astype(np.int32)


def ragged_q_lens(rng, seq_lens):
    q_lens = np.array([rng.integers(1, n + 1) for n in seq_lens], np.int32)
    order = rng.permutation(len(seq_lens))
    q_lens[order[0]] = 1                         # a single query
    if len(seq_lens) > 1:
        q_lens[order[1]] = seq_lens[order[1]]    # a whole-sequence prefill
    return q_lens


def cu_of(q_lens) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)


def check_close(got, ref, dtype, lse=None, ref_lse=None):
    np.testing.assert_allclose(to_numpy_f32(got), ref, **OUT_TOL[plain_dtype(dtype)])
    if lse is not None:
        np.testing.assert_allclose(to_numpy_f32(lse), ref_lse, **LSE_TOL)


def paged_case(rng, dtype, *, batch=4, hq=4, hkv=2, d=64, page_size=7, max_len=40, decode=True, q_lens=None,
               seq_lens=None, interleaved=False, fused_q=False, pad="valid"):
    framework, dt = framework_of(dtype), plain_dtype(dtype)
    if seq_lens is None:
        seq_lens = ragged_seq_lens(rng, batch, max_len)
    seq_lens = np.asarray(seq_lens, np.int32)
    if not decode and q_lens is None:
        q_lens = ragged_q_lens(rng, seq_lens)
    table, num_pages = alloc_tables(rng, page_size, seq_lens, pad=pad)
    k_cache, v_cache = make_kv(rng, num_pages, page_size, hkv, d, dt, framework, interleaved)
    tokens = len(seq_lens) if decode else int(np.sum(q_lens))
    args = dict(q=make_q(rng, tokens, hq, hkv, d, dt, framework, fused_q), k_cache=k_cache, v_cache=v_cache,
                block_table=fw(table, framework), seq_lens=fw(seq_lens, framework))
    if not decode:
        args["cu_seqlens_q"] = fw(cu_of(q_lens), framework)
    return args


def run_paged(args, **options):
    if "cu_seqlens_q" in args:
        return kvcore.paged_prefill(**args, **options)
    return kvcore.paged_decode(**args, **options)


def reference_paged(args, **options):
    options = {k: v for k, v in options.items() if k in ("causal", "scale", "window", "soft_cap")}
    return paged_attention_reference(args["q"], args["k_cache"], args["v_cache"], args["block_table"],
                                     args["seq_lens"], args.get("cu_seqlens_q"), **options)


def poisoned_like(x, dtype=None):
    if isinstance(x, np.ndarray):
        return np.full(x.shape, POISON, dtype or x.dtype)
    return torch.full(tuple(x.shape), POISON, dtype=dtype or x.dtype)


# --- paged decode / prefill against the reference -----------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("page_size", [1, 7, 16, 256])
@pytest.mark.parametrize("heads", list(HEAD_CONFIGS))
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_paged_attention_matches_reference(rng, mode, head_dim, heads, page_size, dtype):
    hq, hkv = HEAD_CONFIGS[heads]
    max_len = page_size + 20 if page_size > 16 else 40  # page 256: one or two pages
    args = paged_case(rng, dtype, batch=3, hq=hq, hkv=hkv, d=head_dim, page_size=page_size, max_len=max_len,
                      decode=mode == "decode")
    out, lse = run_paged(args, return_lse=True)
    ref, ref_lse = reference_paged(args)
    assert tuple(out.shape) == tuple(args["q"].shape) and out.dtype == args["q"].dtype
    assert tuple(lse.shape) == tuple(args["q"].shape[:2]) and lse.dtype == torch.float32
    check_close(out, ref, dtype, lse, ref_lse)


OPTION_SETS = {
    "window1": dict(window=1),
    "window": dict(window=5),
    "wide_window": dict(window=1000),
    "soft_cap": dict(soft_cap=2.0, scale=0.5),  # logits up to ~20 before the cap
    "scale": dict(scale=0.05),
    "all": dict(window=9, soft_cap=5.0, scale=0.3),
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_paged_attention_options(rng, mode, options, dtype):
    opts = dict(OPTION_SETS[options])
    if mode != "decode":
        opts["causal"] = mode == "causal"
    args = paged_case(rng, dtype, batch=4, hq=8, hkv=2, d=128, page_size=7, max_len=50, decode=mode == "decode")
    out, lse = run_paged(args, return_lse=True, **opts)
    ref, ref_lse = reference_paged(args, **opts)
    check_close(out, ref, dtype, lse, ref_lse)


def test_window_one_returns_the_own_value_row(rng):
    """With window=1 a query sees only its own key: the output is that key's V row exactly."""
    args = paged_case(rng, "bfloat16", batch=3, hq=4, hkv=2, d=64, page_size=5, decode=False)
    out = kvcore.paged_prefill(**args, window=1)
    ref, _ = reference_paged(args, window=1)
    assert np.array_equal(to_numpy_f32(out), ref.astype(np.float32))


@pytest.mark.parametrize("option", ["scale", "soft_cap"])
def test_tiny_positive_scale_or_soft_cap_is_honoured_or_rejected(rng, option):
    args = paged_case(rng, "float16", batch=3, decode=True)
    try:
        out = kvcore.paged_decode(**args, **{option: 1e-50})
    except ValueError:
        return  # refusing a value the kernels cannot represent is fine too
    check_close(out, reference_paged(args, **{option: 1e-50})[0], "float16")


def test_return_lse_false_returns_only_out(rng):
    args = paged_case(rng, "float16", decode=True)
    out = kvcore.paged_decode(**args)
    assert isinstance(out, torch.Tensor)
    check_close(out, reference_paged(args)[0], "float16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "numpy-float16"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_out_is_written_in_place_everywhere(rng, mode, dtype):
    """A poisoned out= is returned and every element overwritten; numpy float16 works end to end."""
    args = paged_case(rng, dtype, batch=5, hq=8, hkv=2, d=128, page_size=16, max_len=70, decode=mode == "decode")
    out = poisoned_like(args["q"])
    got, lse = run_paged(args, out=out, return_lse=True, window=20, soft_cap=10.0)
    assert got is out
    assert not (to_numpy_f32(out) == to_numpy_f32(poisoned_like(out)[:1])[0, 0, 0]).any()  # POISON as stored
    ref, ref_lse = reference_paged(args, window=20, soft_cap=10.0)
    check_close(out, ref, dtype, lse, ref_lse)
    if framework_of(dtype) == "numpy":
        assert isinstance(lse, np.ndarray) and lse.dtype == np.float32


def test_out_as_a_strided_view_leaves_its_neighbours_alone(rng):
    """out may be a strided view (heads of a wider tensor); the gaps stay untouched."""
    args = paged_case(rng, "bfloat16", batch=3, hq=4, hkv=1, d=64, decode=False)
    tokens = args["q"].shape[0]
    big = torch.full((tokens, 8, 64), POISON, dtype=torch.bfloat16)
    out = big[:, 1::2]
    kvcore.paged_prefill(**args, out=out)
    check_close(out, reference_paged(args)[0], "bfloat16")
    assert torch.equal(big[:, 0::2], torch.full_like(big[:, 0::2], POISON))


@pytest.mark.parametrize("table", ["none", "slots"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_virtual_layout(rng, mode, table):
    """[max_seqs, max_tokens, Hkv, D] caches: request b reads sequence b (no block table) or the
    sequence slot in its [batch, 1] table."""
    max_seqs, max_tokens, hq, hkv, d, batch = 6, 48, 8, 2, 128, 4
    k_cache = random_array(rng, (max_seqs, max_tokens, hkv, d), "bfloat16", "torch")
    v_cache = random_array(rng, (max_seqs, max_tokens, hkv, d), "bfloat16", "torch")
    seq_lens = ragged_seq_lens(rng, batch, max_tokens)
    seq_lens[0] = max_tokens  # a full sequence
    block_table = None
    if table == "slots":
        block_table = torch.from_numpy(rng.permutation(max_seqs)[:batch].astype(np.int32)[:, None].copy())
    args = dict(q=None, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                seq_lens=torch.from_numpy(seq_lens))
    if mode == "decode":
        args["q"] = random_array(rng, (batch, hq, d), "bfloat16", "torch")
    else:
        q_lens = ragged_q_lens(rng, seq_lens)
        args["q"] = random_array(rng, (int(q_lens.sum()), hq, d), "bfloat16", "torch")
        args["cu_seqlens_q"] = torch.from_numpy(cu_of(q_lens))
    out, lse = run_paged(args, return_lse=True, window=30)
    ref, ref_lse = reference_paged(args, window=30)
    check_close(out, ref, "bfloat16", lse, ref_lse)


@pytest.mark.parametrize("dtype", ["bfloat16", "numpy-float16"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_interleaved_cache_and_fused_qkv(rng, mode, dtype):
    """K/V caches as cache[:, 0] / cache[:, 1] of a [P, 2, S, H, D] buffer, q a slice of a fused QKV."""
    args = paged_case(rng, dtype, batch=4, hq=8, hkv=2, d=64, page_size=16, max_len=60, decode=mode == "decode",
                      interleaved=True, fused_q=True)
    q = args["q"]
    token_stride = q.strides[0] // q.itemsize if isinstance(q, np.ndarray) else q.stride(0)
    assert token_stride == (8 + 2 * 2) * 64  # a genuinely strided q
    out, lse = run_paged(args, return_lse=True)
    ref, ref_lse = reference_paged(args)
    check_close(out, ref, dtype, lse, ref_lse)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_strided_block_table_seq_lens_and_q_heads(rng, mode):
    """A block table that is a column slice of every other row of a wider table, and q whose heads
    are every other head of a wider tensor (head stride != D)."""
    args = paged_case(rng, "float16", batch=4, hq=4, hkv=2, d=128, page_size=5, max_len=35, decode=mode == "decode")
    table = args["block_table"]
    wide = torch.from_numpy(rng.integers(-50, 50, (2 * table.shape[0], table.shape[1] + 7)).astype(np.int32))
    wide[::2, :table.shape[1]] = table
    q = args["q"]
    big = random_array(rng, (q.shape[0], 2 * q.shape[1], q.shape[2]), "float16", "torch")
    big[:, ::2] = q
    strided = dict(args, block_table=wide[::2, :table.shape[1]], q=big[:, ::2])
    assert strided["block_table"].stride(0) == 2 * wide.shape[1] and strided["q"].stride(1) == 2 * q.shape[2]
    out, lse = run_paged(strided, return_lse=True, window=7)
    ref, ref_lse = reference_paged(args, window=7)
    check_close(out, ref, "float16", lse, ref_lse)


def test_empty_batches(rng):
    """No requests (decode) or no query tokens at all (prefill) give empty outputs."""
    k_cache = random_array(rng, (4, 8, 2, 64), "bfloat16", "torch")
    out, lse = kvcore.paged_decode(random_array(rng, (0, 4, 64), "bfloat16", "torch"), k_cache, k_cache,
                                   torch.zeros((0, 2), dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                                   return_lse=True)
    assert tuple(out.shape) == (0, 4, 64) and tuple(lse.shape) == (0, 4)
    out = kvcore.paged_prefill(random_array(rng, (0, 4, 64), "bfloat16", "torch"), k_cache, k_cache,
                               torch.tensor([[1], [3]], dtype=torch.int32), torch.tensor([5, 8], dtype=torch.int32),
                               torch.zeros(3, dtype=torch.int32))
    assert tuple(out.shape) == (0, 4, 64)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_any_page_stride(rng, mode):
    """Pages need only their inner three dims contiguous: here they sit in a larger page slot."""
    args = paged_case(rng, "bfloat16", batch=4, hq=4, hkv=2, d=64, page_size=6, max_len=40, decode=mode == "decode")
    num_pages, page_size = args["k_cache"].shape[:2]
    slots = random_array(rng, (num_pages, 2 * page_size + 1, 2, 64), "bfloat16", "torch")
    slots[:, 3:3 + page_size] = args["k_cache"]
    vslots = random_array(rng, (num_pages, page_size + 2, 2, 64), "bfloat16", "torch")
    vslots[:, :page_size] = args["v_cache"]
    strided = dict(args, k_cache=slots[:, 3:3 + page_size], v_cache=vslots[:, :page_size])
    out, lse = run_paged(strided, return_lse=True)
    ref, ref_lse = reference_paged(args)
    check_close(out, ref, "bfloat16", lse, ref_lse)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_block_table_padding_past_seq_len_is_never_read(rng, mode):
    """Entries of a block table beyond a request's last page are padding (-1 here)."""
    args = paged_case(rng, "float16", batch=4, hq=4, hkv=2, d=64, page_size=4, max_len=30,
                      decode=mode == "decode", pad="invalid")
    out, lse = run_paged(args, return_lse=True)
    ref, ref_lse = reference_paged(args)
    check_close(out, ref, "float16", lse, ref_lse)


def test_extend_equals_full_prefill_sliced(rng):
    """Queries that are the last tokens of longer cached sequences (extend / chunked prefill) get
    exactly the rows of a full-sequence prefill; a request may contribute no query at all."""
    seq_lens = np.array([37, 5, 1, 64, 20], np.int32)
    q_lens = np.array([9, 5, 1, 30, 0], np.int32)
    full_args = paged_case(rng, "bfloat16", hq=8, hkv=2, d=128, page_size=16, decode=False, seq_lens=seq_lens,
                           q_lens=seq_lens)
    full, full_lse = kvcore.paged_prefill(**full_args, return_lse=True, window=25)
    cu_full = cu_of(seq_lens)
    rows = np.concatenate([np.arange(cu_full[b + 1] - q_lens[b], cu_full[b + 1]) for b in range(len(seq_lens))])
    ext_args = dict(full_args, q=full_args["q"][torch.from_numpy(rows)].clone(),
                    cu_seqlens_q=torch.from_numpy(cu_of(q_lens)))
    ext, ext_lse = kvcore.paged_prefill(**ext_args, return_lse=True, window=25)
    np.testing.assert_allclose(to_numpy_f32(ext), to_numpy_f32(full)[rows], atol=1e-2, rtol=0)
    np.testing.assert_allclose(ext_lse.numpy(), full_lse.numpy()[rows], rtol=1e-5, atol=1e-5)
    ref, ref_lse = reference_paged(ext_args, window=25)
    check_close(ext, ref, "bfloat16", ext_lse, ref_lse)


def test_prefill_with_one_query_per_request_equals_decode(rng):
    args = paged_case(rng, "float16", batch=6, hq=8, hkv=1, d=256, page_size=3, max_len=25, decode=True)
    dec, dec_lse = kvcore.paged_decode(**args, return_lse=True, soft_cap=4.0)
    pre, pre_lse = kvcore.paged_prefill(**args, cu_seqlens_q=torch.arange(7, dtype=torch.int32), return_lse=True,
                                        soft_cap=4.0)
    np.testing.assert_allclose(to_numpy_f32(pre), to_numpy_f32(dec), atol=2e-3, rtol=0)
    np.testing.assert_allclose(pre_lse.numpy(), dec_lse.numpy(), rtol=1e-5, atol=1e-5)


def test_long_prefill_chunks(rng):
    """Many queries per request (several work items per request and head)."""
    seq_lens = np.array([150, 97], np.int32)
    args = paged_case(rng, "bfloat16", hq=4, hkv=4, d=64, page_size=16, decode=False, seq_lens=seq_lens,
                      q_lens=np.array([150, 61], np.int32))
    out, lse = kvcore.paged_prefill(**args, return_lse=True)
    ref, ref_lse = reference_paged(args)
    check_close(out, ref, "bfloat16", lse, ref_lse)


# --- merge_states --------------------------------------------------------------------------------

def random_states(rng, tokens, heads, d, dtype, framework, empty_fraction=0.2):
    o = random_array(rng, (tokens, heads, d), dtype, framework)
    lse = (rng.standard_normal((tokens, heads)) * 3).astype(np.float32)
    lse[rng.random((tokens, heads)) < empty_fraction] = -np.inf
    return o, fw(lse, framework)


MERGE_DTYPES = [("numpy", "float32"), ("numpy", "float16"), ("torch", "float32"), ("torch", "bfloat16"),
                ("torch", "float16")]


@pytest.mark.parametrize("framework,dtype", MERGE_DTYPES)
def test_merge_states_matches_reference(rng, framework, dtype):
    tokens, heads, d = 13, 6, 128
    o_a, lse_a = random_states(rng, tokens, heads, d, dtype, framework)
    o_b, lse_b = random_states(rng, tokens, heads, d, dtype, framework)
    lse_a[0, :2] = -np.inf  # both empty for two heads
    lse_b[0, :2] = -np.inf
    out, lse = kvcore.merge_states(o_a, lse_a, o_b, lse_b)
    ref, ref_lse = merge_states_reference(o_a, lse_a, o_b, lse_b)
    assert out.dtype == o_a.dtype and tuple(out.shape) == tuple(o_a.shape)
    np.testing.assert_allclose(to_numpy_f32(out), ref, **OUT_TOL[dtype])
    np.testing.assert_allclose(to_numpy_f32(lse), ref_lse, rtol=1e-6, atol=1e-6)
    assert (to_numpy_f32(out)[0, :2] == 0).all() and np.isneginf(to_numpy_f32(lse)[0, :2]).all()


@pytest.mark.parametrize("framework,dtype", MERGE_DTYPES)
def test_merge_with_an_empty_state_returns_the_other(rng, framework, dtype):
    o_a, lse_a = random_states(rng, 9, 4, 64, dtype, framework, empty_fraction=0)
    o_b, _ = random_states(rng, 9, 4, 64, dtype, framework)
    empty = fw(np.full((9, 4), -np.inf, np.float32), framework)
    for args in ((o_a, lse_a, o_b, empty), (o_b, empty, o_a, lse_a)):
        out, lse = kvcore.merge_states(*args)
        np.testing.assert_array_equal(to_numpy_f32(out), to_numpy_f32(o_a))
        np.testing.assert_array_equal(to_numpy_f32(lse), to_numpy_f32(lse_a))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_merge_is_symmetric(rng, dtype):
    o_a, lse_a = random_states(rng, 11, 8, 256, dtype, "torch")
    o_b, lse_b = random_states(rng, 11, 8, 256, dtype, "torch")
    ab, lse_ab = kvcore.merge_states(o_a, lse_a, o_b, lse_b)
    ba, lse_ba = kvcore.merge_states(o_b, lse_b, o_a, lse_a)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == "float32" else OUT_TOL[dtype]
    np.testing.assert_allclose(to_numpy_f32(ab), to_numpy_f32(ba), **tol)
    np.testing.assert_allclose(lse_ab.numpy(), lse_ba.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_merging_the_halves_of_a_key_split_equals_full_attention(rng, dtype):
    """Decode over keys [0, s) and over [s, n) (their own block tables), merged, equals decode over
    all n keys (a decode query sits after every key, so positions do not matter)."""
    page_size, batch, hq, hkv, d = 3, 5, 8, 2, 64
    seq_lens = rng.integers(4, 40, batch).astype(np.int32)
    # A page-aligned split with at least one key on each side.
    split = np.array([page_size * rng.integers(1, -(-n // page_size)) for n in seq_lens], np.int32)
    assert (split > 0).all() and (split < seq_lens).all()
    args = paged_case(rng, dtype, hq=hq, hkv=hkv, d=d, page_size=page_size, seq_lens=seq_lens, decode=True)
    table = args["block_table"].numpy()
    second_table = np.stack([np.roll(table[b], -(split[b] // page_size)) for b in range(batch)]).astype(np.int32)
    out_a, lse_a = kvcore.paged_decode(**dict(args, seq_lens=torch.from_numpy(split)), return_lse=True)
    out_b, lse_b = kvcore.paged_decode(**dict(args, block_table=torch.from_numpy(second_table),
                                              seq_lens=torch.from_numpy(seq_lens - split)), return_lse=True)
    merged, lse = kvcore.merge_states(out_a, lse_a, out_b, lse_b)
    full, full_lse = kvcore.paged_decode(**args, return_lse=True)
    ref, ref_lse = reference_paged(args)
    tol = {k: 2 * v for k, v in OUT_TOL[dtype].items()}  # two roundings
    np.testing.assert_allclose(to_numpy_f32(merged), ref, **tol)
    np.testing.assert_allclose(to_numpy_f32(merged), to_numpy_f32(full), **tol)
    np.testing.assert_allclose(lse.numpy(), ref_lse, **LSE_TOL)
    np.testing.assert_allclose(lse.numpy(), full_lse.numpy(), **LSE_TOL)


def test_merging_reference_halves_in_float32_is_exact(rng):
    """float32 partial states of a key split (from the reference) merge to the full attention."""
    args = paged_case(rng, "bfloat16", batch=3, hq=4, hkv=2, d=64, page_size=1, seq_lens=[20, 7, 33], decode=True)
    table = args["block_table"].numpy()
    split = np.array([11, 3, 32], np.int32)
    lens = args["seq_lens"].numpy()
    a = reference_paged(dict(args, seq_lens=split))
    b = reference_paged(dict(args, block_table=np.stack([np.roll(table[i], -split[i]) for i in range(3)]),
                             seq_lens=lens - split))
    out, lse = kvcore.merge_states(a[0].astype(np.float32), a[1].astype(np.float32), b[0].astype(np.float32),
                                   b[1].astype(np.float32))
    ref, ref_lse = reference_paged(args)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_merge_out_may_alias_o_a(rng, dtype):
    o_a, lse_a = random_states(rng, 17, 4, 128, dtype, "torch")
    o_b, lse_b = random_states(rng, 17, 4, 128, dtype, "torch")
    want, want_lse = kvcore.merge_states(o_a, lse_a, o_b, lse_b)
    lse_out = torch.full((17, 4), POISON)
    got, got_lse = kvcore.merge_states(o_a, lse_a, o_b, lse_b, out=o_a, lse_out=lse_out)
    assert got is o_a and got_lse is lse_out
    assert torch.equal(o_a, want)
    assert torch.equal(lse_out, want_lse)


def test_merge_writes_into_a_poisoned_strided_out(rng):
    o_a, lse_a = random_states(rng, 5, 4, 64, "bfloat16", "torch")
    o_b, lse_b = random_states(rng, 5, 4, 64, "bfloat16", "torch")
    big = torch.full((5, 8, 64), POISON, dtype=torch.bfloat16)
    out, _ = kvcore.merge_states(o_a, lse_a, o_b, lse_b, out=big[:, ::2])
    ref, _ = merge_states_reference(o_a, lse_a, o_b, lse_b)
    np.testing.assert_allclose(to_numpy_f32(big[:, ::2]), ref, **OUT_TOL["bfloat16"])
    assert torch.equal(big[:, 1::2], torch.full_like(big[:, 1::2], POISON))


# --- shared-prefix (cascade) attention -----------------------------------------------------------

def shared_case(rng, dtype, *, group_sizes, prefix_lens, suffix_lens=None, q_lens=None, decode=True, hq=8, hkv=2,
                d=64, page_size=7, max_suffix=20):
    framework, dt = framework_of(dtype), plain_dtype(dtype)
    batch = int(sum(group_sizes))
    if suffix_lens is None:
        suffix_lens = ragged_seq_lens(rng, batch, max_suffix)
    suffix_lens = np.asarray(suffix_lens, np.int32)
    if not decode and q_lens is None:
        q_lens = ragged_q_lens(rng, suffix_lens)
    prefix_table, table, num_pages = alloc_tables(rng, page_size, prefix_lens, suffix_lens)
    k_cache, v_cache = make_kv(rng, num_pages, page_size, hkv, d, dt, framework)
    tokens = batch if decode else int(np.sum(q_lens))
    args = dict(q=make_q(rng, tokens, hq, hkv, d, dt, framework), k_cache=k_cache, v_cache=v_cache,
                prefix_block_table=fw(prefix_table, framework),
                prefix_lens=fw(np.asarray(prefix_lens, np.int32), framework),
                group_indptr=fw(cu_of(group_sizes), framework), block_table=fw(table, framework),
                seq_lens=fw(suffix_lens, framework))
    if not decode:
        args["cu_seqlens_q"] = fw(cu_of(q_lens), framework)
    return args


def run_shared(args, **options):
    if "cu_seqlens_q" in args:
        return kvcore.shared_prefix_prefill(**args, **options)
    return kvcore.shared_prefix_decode(**args, **options)


def reference_shared(args, **options):
    options = {k: v for k, v in options.items() if k in ("causal", "scale", "window", "soft_cap")}
    return shared_prefix_reference(args["q"], args["k_cache"], args["v_cache"], args["prefix_block_table"],
                                   args["prefix_lens"], args["group_indptr"], args["block_table"], args["seq_lens"],
                                   args.get("cu_seqlens_q"), **options)


SHARED_OPTIONS = {
    "plain": {},
    "window_in_prefix": dict(window=12),      # cuts into the prefix for most queries
    "window_in_suffix": dict(window=2),       # the prefix is invisible to most queries
    "capped": dict(soft_cap=3.0, scale=0.4),
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("options", list(SHARED_OPTIONS))
@pytest.mark.parametrize("heads,head_dim,page_size", [("gqa4", 64, 7), ("mha", 128, 1), ("mqa", 256, 16),
                                                      ("gqa8", 128, 4), ("gqa4", 80, 16), ("gqa8", 96, 7),
                                                      ("gqa4", 192, 16)])
@pytest.mark.parametrize("mode", ["decode", "causal", "non_causal"])
def test_shared_prefix_matches_reference(rng, mode, heads, head_dim, page_size, options, dtype):
    """Several groups of different sizes (one empty, one with prefix_len 0) in one call."""
    hq, hkv = HEAD_CONFIGS[heads]
    opts = dict(SHARED_OPTIONS[options])
    if mode != "decode":
        opts["causal"] = mode == "causal"
    group_sizes = [3, 1, 0, 4, 2]
    prefix_lens = [int(rng.integers(1, 40)), 0, int(rng.integers(0, 10)), int(rng.integers(1, 40)), 17]
    args = shared_case(rng, dtype, group_sizes=group_sizes, prefix_lens=prefix_lens, decode=mode == "decode",
                       hq=hq, hkv=hkv, d=head_dim, page_size=page_size)
    out, lse = run_shared(args, return_lse=True, **opts)
    ref, ref_lse = reference_shared(args, **opts)
    check_close(out, ref, dtype, lse, ref_lse)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_shared_prefix_equals_paged_attention_over_prefix_and_suffix(rng, mode):
    """With page-aligned prefixes, the same keys as one block table per request give the same result."""
    page_size, group_sizes = 4, [2, 5, 1]
    prefix_lens = [8, 0, 20]
    args = shared_case(rng, "bfloat16", group_sizes=group_sizes, prefix_lens=prefix_lens, decode=mode == "decode",
                       hq=8, hkv=2, d=128, page_size=page_size, max_suffix=30)
    ptable, table = args["prefix_block_table"].numpy(), args["block_table"].numpy()
    group_of = np.repeat(np.arange(len(group_sizes)), group_sizes)
    rows = [np.concatenate([ptable[g, :prefix_lens[g] // page_size], table[b]]) for b, g in enumerate(group_of)]
    width = max(len(r) for r in rows)
    combined = np.stack([np.pad(r, (0, width - len(r))) for r in rows]).astype(np.int32)
    total = (args["seq_lens"].numpy() + np.array(prefix_lens)[group_of]).astype(np.int32)
    paged_args = dict(q=args["q"], k_cache=args["k_cache"], v_cache=args["v_cache"],
                      block_table=torch.from_numpy(combined), seq_lens=torch.from_numpy(total))
    if mode == "prefill":
        paged_args["cu_seqlens_q"] = args["cu_seqlens_q"]
    out, lse = run_shared(args, return_lse=True, window=15)
    want, want_lse = run_paged(paged_args, return_lse=True, window=15)
    np.testing.assert_allclose(to_numpy_f32(out), to_numpy_f32(want), atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(lse.numpy(), want_lse.numpy(), **LSE_TOL)
    ref, ref_lse = reference_shared(args, window=15)
    check_close(out, ref, "bfloat16", lse, ref_lse)


def test_shared_prefix_poisoned_out_and_numpy(rng):
    args = shared_case(rng, "numpy-float16", group_sizes=[4, 3], prefix_lens=[30, 9], decode=False, hq=4, hkv=4,
                       d=64, page_size=5)
    out = poisoned_like(args["q"])
    got, lse = kvcore.shared_prefix_prefill(**args, out=out, return_lse=True)
    assert got is out and not (out == POISON).any()
    ref, ref_lse = reference_shared(args)
    check_close(out, ref, "float16", lse, ref_lse)


def test_shared_prefix_large_group(rng):
    """One group of many requests over a long prefix (many prefix row chunks)."""
    args = shared_case(rng, "bfloat16", group_sizes=[40], prefix_lens=[300], decode=True, hq=8, hkv=1, d=64,
                       page_size=16, max_suffix=8)
    out, lse = kvcore.shared_prefix_decode(**args, return_lse=True)
    ref, ref_lse = reference_shared(args)
    check_close(out, ref, "bfloat16", lse, ref_lse)


# --- argument checks: each error names the offending argument -----------------------------------

def _paged_args(rng, decode):
    """A small valid call: batch 3, Hq 4, Hkv 2, D 64, 8 pages of 4 tokens, q_lens [2, 1, 3]."""
    k_cache = random_array(rng, (8, 4, 2, 64), "float16")
    v_cache = random_array(rng, (8, 4, 2, 64), "float16")
    args = dict(k_cache=k_cache, v_cache=v_cache, block_table=np.array([[0, 3, 7], [5, 6, 6], [1, 2, 4]], np.int32),
                seq_lens=np.array([5, 1, 8], np.int32))
    if decode:
        args["q"] = random_array(rng, (3, 4, 64), "float16")
    else:
        args["q"] = random_array(rng, (6, 4, 64), "float16")
        args["cu_seqlens_q"] = np.array([0, 2, 3, 6], np.int32)
    args["out"] = np.full(args["q"].shape, POISON, np.float16)
    return args


def _set(**changes):
    return lambda a: a.update({k: (v(a) if callable(v) else v) for k, v in changes.items()})


def _f16(shape):
    return np.ones(shape, np.float16) + 0.5


COMMON_BAD = [
    (_set(q=lambda a: a["q"].astype(np.int32)), TypeError, "q: dtype int32 is not supported"),
    (_set(k_cache=lambda a: a["k_cache"].astype(np.float32)), TypeError, "k_cache: dtype float32 does not match q"),
    (_set(v_cache=lambda a: a["v_cache"].astype(np.float32)), TypeError, "v_cache: dtype float32 does not match q"),
    (_set(block_table=lambda a: a["block_table"].astype(np.int64)), TypeError, "block_table: dtype int64"),
    (_set(seq_lens=lambda a: a["seq_lens"].astype(np.int64)), TypeError, "seq_lens: dtype int64"),
    (_set(q=lambda a: _f16((a["q"].shape[0], 4, 112)), k_cache=_f16((8, 4, 2, 112)), v_cache=_f16((8, 4, 2, 112)),
          out=lambda a: _f16((a["q"].shape[0], 4, 112))), ValueError, "q: head_dim 112 is not supported"),
    (_set(q=lambda a: _f16((a["q"].shape[0], 3, 64)), out=lambda a: _f16((a["q"].shape[0], 3, 64))), ValueError,
     "q: 3 query heads are not a multiple of 2 kv heads"),
    (_set(q=lambda a: a["q"][:, 0]), ValueError, "q: expected 3 dimensions"),
    (_set(k_cache=lambda a: a["k_cache"][0]), ValueError, "k_cache: expected 4 dimensions"),
    (_set(v_cache=lambda a: a["v_cache"][None]), ValueError, "v_cache: expected 4 dimensions"),
    (_set(block_table=lambda a: a["block_table"][0]), ValueError, "block_table: expected 2 dimensions"),
    (_set(seq_lens=lambda a: a["seq_lens"][None]), ValueError, "seq_lens: expected 1 dimensions"),
    (_set(v_cache=_f16((8, 5, 2, 64))), ValueError, r"v_cache: dimension 1"),
    (_set(v_cache=_f16((9, 4, 2, 64))), ValueError, r"v_cache: dimension 0"),
    (_set(v_cache=_f16((8, 4, 1, 64))), ValueError, r"v_cache: dimension 2"),
    (_set(k_cache=_f16((8, 4, 2, 128)), v_cache=_f16((8, 4, 2, 128))), ValueError,
     r"k_cache: dimension 3 \(head_dim\)"),
    (_set(block_table=lambda a: a["block_table"][:2]), ValueError, r"block_table: dimension 0 \(batch\)"),
    (_set(q=lambda a: np.repeat(a["q"], 2, axis=2)[:, :, ::2]), ValueError, "q: the last 1 dimensions"),
    (_set(k_cache=lambda a: np.repeat(a["k_cache"], 2, axis=2)[:, :, ::2]), ValueError,
     "k_cache: the last 3 dimensions"),
    (_set(seq_lens=np.array([5, 0, 8], np.int32)), ValueError, r"seq_lens\[1\] = 0: empty sequences"),
    (_set(seq_lens=np.array([5, 1, -3], np.int32)), ValueError, r"seq_lens\[2\] = -3"),
    (_set(seq_lens=np.array([5, 1, 13], np.int32)), IndexError, r"seq_lens\[2\] = 13 exceeds the 12 slots"),
    (_set(block_table=np.array([[0, 3, 7], [5, 6, 6], [1, 8, 4]], np.int32)), IndexError,
     r"block_table\[2, 1\] = 8 is out of range \[0, 8\)"),
    (_set(block_table=np.array([[-1, 3, 7], [5, 6, 6], [1, 2, 4]], np.int32)), IndexError,
     r"block_table\[0, 0\] = -1 is out of range"),
    (_set(window=0), ValueError, "window"),
    (_set(window=-4), ValueError, "window"),
    (_set(window=2.5), ValueError, "window"),
    (_set(window=True), ValueError, "window"),
    (_set(soft_cap=0.0), ValueError, "soft_cap"),
    (_set(soft_cap=-1.0), ValueError, "soft_cap"),
    (_set(soft_cap=float("nan")), ValueError, "soft_cap"),
    (_set(scale=0.0), ValueError, "scale"),
    (_set(scale=-0.125), ValueError, "scale"),
    (_set(scale=float("nan")), ValueError, "scale"),
    (_set(out=lambda a: a["out"].astype(np.float32)), TypeError, "out: dtype float32 does not match q"),
    (_set(out=lambda a: a["out"][:, :2]), ValueError, r"out: dimension 1"),
    (_set(out=lambda a: a["out"][:, :, :32]), ValueError, r"out: dimension 2"),
    (_set(out=lambda a: np.repeat(a["out"], 2, axis=2)[:, :, ::2]), ValueError, "out: the last 1 dimensions"),
]

DECODE_BAD = [
    (_set(q=lambda a: a["q"][:2], out=lambda a: a["out"][:2]), ValueError, r"q: dimension 0 \(batch"),
    (_set(out=lambda a: a["out"][:2]), ValueError, r"out: dimension 0"),
]

PREFILL_BAD = [
    (_set(cu_seqlens_q=np.array([0, 2, 3, 6], np.int64)), TypeError, "cu_seqlens_q: dtype int64"),
    (_set(cu_seqlens_q=np.array([0, 2, 6], np.int32)), ValueError, r"cu_seqlens_q: dimension 0"),
    (_set(cu_seqlens_q=np.array([[0, 2, 3, 6]], np.int32)), ValueError, "cu_seqlens_q: expected 1 dimensions"),
    (_set(cu_seqlens_q=np.array([1, 2, 3, 6], np.int32)), ValueError, r"cu_seqlens_q\[0\] = 1, expected 0"),
    (_set(cu_seqlens_q=np.array([0, 4, 3, 6], np.int32)), ValueError, "cu_seqlens_q must be non-decreasing"),
    (_set(cu_seqlens_q=np.array([0, 2, 3, 5], np.int32)), ValueError, r"cu_seqlens_q\[3\] = 5 but q has 6 tokens"),
    (_set(cu_seqlens_q=np.array([0, 1, 3, 6], np.int32)), ValueError,
     r"request 1 has 2 queries but seq_lens\[1\] = 1"),
]


@pytest.mark.parametrize("change,error,match", COMMON_BAD + DECODE_BAD)
def test_paged_decode_rejects_bad_arguments_and_writes_nothing(rng, change, error, match):
    args = _paged_args(rng, decode=True)
    change(args)
    out = args["out"]
    before = out.copy()
    with pytest.raises(error, match=match):
        kvcore.paged_decode(**args)
    assert np.array_equal(out, before, equal_nan=True)


@pytest.mark.parametrize("change,error,match", COMMON_BAD + PREFILL_BAD)
def test_paged_prefill_rejects_bad_arguments_and_writes_nothing(rng, change, error, match):
    args = _paged_args(rng, decode=False)
    change(args)
    out = args["out"]
    before = out.copy()
    with pytest.raises(error, match=match):
        kvcore.paged_prefill(**args)
    assert np.array_equal(out, before, equal_nan=True)


def test_decode_rejects_cu_seqlens_and_bad_streams(rng):
    args = _paged_args(rng, decode=True)
    with pytest.raises(TypeError):
        kvcore.paged_decode(**args, cu_seqlens_q=np.array([0, 1, 2, 3], np.int32))
    with pytest.raises(TypeError, match="stream"):
        kvcore.paged_decode(**args, stream="default")
    with pytest.raises(TypeError, match="stream"):
        kvcore.paged_prefill(**_paged_args(rng, decode=False), stream=-1)


@pytest.mark.parametrize("lse,error,match", [
    (lambda t, h: np.full((t, h + 1), POISON, np.float32), ValueError, r"lse: dimension 1 \(query heads\)"),
    (lambda t, h: np.full((t + 1, h), POISON, np.float32), ValueError, r"lse: dimension 0 \(tokens\)"),
    (lambda t, h: np.full((t, h), POISON, np.float16), TypeError, "lse: dtype float16"),
    (lambda t, h: np.full((t * h,), POISON, np.float32), ValueError, "lse: expected 2 dimensions"),
])
def test_attention_lse_buffer_is_checked(rng, lse, error, match):
    """The public ops allocate the LSE themselves; the native entry point checks a given one."""
    args = _paged_args(rng, decode=False)
    t, h = args["q"].shape[:2]
    with pytest.raises(error, match=match):
        kvcore._C.attention(args["q"], args["k_cache"], args["v_cache"], args["block_table"], args["seq_lens"],
                            args["cu_seqlens_q"], args["out"], lse(t, h), 0.0, 0.0, 0, True, 0)


@pytest.mark.parametrize("table,seq_lens,error,match", [
    (None, [3, 1, 2, 4, 1], IndexError, "request 4 has no sequence: the cache holds 4 sequences and no block_table"),
    (None, [3, 17, 2], IndexError, r"seq_lens\[1\] = 17 exceeds the 16 slots of its sequence"),
    ([[0], [4], [2]], [3, 1, 2], IndexError, r"block_table\[1, 0\] = 4 is out of range \[0, 4\)"),
    ([[0], [3], [2]], [3, 17, 2], IndexError, r"seq_lens\[1\] = 17 exceeds the 16 slots of its block_table"),
    ([[0], [3], [2]], [3, 0, 2], ValueError, r"seq_lens\[1\] = 0"),
])
def test_virtual_layout_rejects_bad_metadata(rng, table, seq_lens, error, match):
    cache = random_array(rng, (4, 16, 2, 64), "float16")
    batch = len(seq_lens)
    q = random_array(rng, (batch, 4, 64), "float16")
    out = np.full(q.shape, POISON, np.float16)
    with pytest.raises(error, match=match):
        kvcore.paged_decode(q, cache, cache, None if table is None else np.array(table, np.int32),
                            np.array(seq_lens, np.int32), out=out)
    assert (out == np.float16(POISON)).all()


def test_index_vectors_must_be_contiguous(rng):
    args = _paged_args(rng, decode=False)
    with pytest.raises(ValueError, match="seq_lens: the last 1 dimensions must be contiguous"):
        kvcore.paged_prefill(**dict(args, seq_lens=np.repeat(args["seq_lens"], 2)[::2]))
    with pytest.raises(ValueError, match="cu_seqlens_q: the last 1 dimensions must be contiguous"):
        kvcore.paged_prefill(**dict(args, cu_seqlens_q=np.repeat(args["cu_seqlens_q"], 2)[::2]))
    with pytest.raises(ValueError, match="block_table: the last 1 dimensions must be contiguous"):
        kvcore.paged_prefill(**dict(args, block_table=np.repeat(args["block_table"], 2, axis=1)[:, ::2]))


def _shared_args(rng, decode):
    """_paged_args as the suffixes of two groups ([0, 1] and [2]) with prefixes of 6 and 0 tokens."""
    args = _paged_args(rng, decode)
    args.update(prefix_block_table=np.array([[2, 7], [0, 1]], np.int32), prefix_lens=np.array([6, 0], np.int32),
                group_indptr=np.array([0, 2, 3], np.int32))
    return args


SHARED_BAD = [
    (_set(group_indptr=np.array([0, 2, 2], np.int32)), ValueError, r"group_indptr\[2\] = 2 but the batch has 3"),
    (_set(group_indptr=np.array([1, 2, 3], np.int32)), ValueError, r"group_indptr\[0\] = 1, expected 0"),
    (_set(group_indptr=np.array([0, 3, 2], np.int32)), ValueError, "group_indptr must be non-decreasing"),
    (_set(group_indptr=np.array([0, 3], np.int32)), ValueError, r"group_indptr: dimension 0"),
    (_set(group_indptr=np.array([0, 2, 3], np.int64)), TypeError, "group_indptr: dtype int64"),
    (_set(prefix_lens=np.array([9, 0], np.int32)), IndexError, r"prefix_lens\[0\] = 9 exceeds the 8 slots"),
    (_set(prefix_lens=np.array([6, -1], np.int32)), ValueError, r"prefix_lens\[1\] = -1"),
    (_set(prefix_lens=np.array([6, 0], np.int64)), TypeError, "prefix_lens: dtype int64"),
    (_set(prefix_lens=np.array([[6, 0]], np.int32)), ValueError, "prefix_lens: expected 1 dimensions"),
    (_set(prefix_block_table=np.array([[2, 8], [0, 1]], np.int32)), IndexError,
     r"prefix_block_table\[0, 1\] = 8 is out of range \[0, 8\)"),
    (_set(prefix_block_table=np.array([[2, 7]], np.int32)), ValueError, r"prefix_block_table: dimension 0"),
    (_set(prefix_block_table=np.array([2, 7], np.int32)), ValueError, "prefix_block_table: expected 2 dimensions"),
    (_set(prefix_block_table=np.array([[2, 7], [0, 1]], np.int64)), TypeError, "prefix_block_table: dtype int64"),
    (_set(seq_lens=np.array([5, 0, 8], np.int32)), ValueError, r"seq_lens\[1\] = 0"),
    (_set(block_table=np.array([[0, 3, 7], [5, 6, 6], [1, 9, 4]], np.int32)), IndexError,
     r"block_table\[2, 1\] = 9 is out of range"),
    (_set(seq_lens=np.array([5, 1, 13], np.int32)), IndexError, r"seq_lens\[2\] = 13 exceeds"),
    (_set(q=lambda a: a["q"].astype(np.int32)), TypeError, "q: dtype int32"),
    (_set(window=0), ValueError, "window"),
    (_set(soft_cap=-2.0), ValueError, "soft_cap"),
    (_set(scale=-1.0), ValueError, "scale"),
    (_set(out=lambda a: a["out"].astype(np.float32)), TypeError, "out: dtype"),
]


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("change,error,match", SHARED_BAD)
def test_shared_prefix_rejects_bad_arguments_and_writes_nothing(rng, mode, change, error, match):
    args = _shared_args(rng, decode=mode == "decode")
    change(args)
    out = args["out"]
    before = out.copy()
    fn = kvcore.shared_prefix_decode if mode == "decode" else kvcore.shared_prefix_prefill
    with pytest.raises(error, match=match):
        fn(**args)
    assert np.array_equal(out, before, equal_nan=True)


def test_shared_prefix_valid_base_arguments_work(rng):
    """The base of the bad-argument cases is itself valid (so each case tests exactly one thing)."""
    for decode in (True, False):
        args = _shared_args(rng, decode)
        fn = kvcore.shared_prefix_decode if decode else kvcore.shared_prefix_prefill
        out, lse = fn(**args, return_lse=True)
        ref, ref_lse = reference_shared(args)
        check_close(out, ref, "float16", lse, ref_lse)
        args = _paged_args(rng, decode)
        out, lse = run_paged(args, return_lse=True)
        ref, ref_lse = reference_paged(args)
        check_close(out, ref, "float16", lse, ref_lse)


def _merge_args(rng):
    o_a, lse_a = random_states(rng, 5, 4, 64, "float16", "numpy")
    o_b, lse_b = random_states(rng, 5, 4, 64, "float16", "numpy")
    return dict(o_a=o_a, lse_a=lse_a, o_b=o_b, lse_b=lse_b, out=np.full((5, 4, 64), POISON, np.float16),
                lse_out=np.full((5, 4), POISON, np.float32))


MERGE_BAD = [
    (_set(o_a=lambda a: a["o_a"].astype(np.float64)), TypeError, "o_a: unsupported dtype float64"),
    (_set(o_a=lambda a: a["o_a"].astype(np.int32)), TypeError, "o_a: dtype int32 is not supported"),
    (_set(o_b=lambda a: a["o_b"].astype(np.float32)), TypeError, "o_b: dtype float32 does not match o_a"),
    (_set(o_b=lambda a: a["o_b"][:4]), ValueError, "o_b: dimension 0"),
    (_set(o_b=lambda a: a["o_b"][:, :, :32]), ValueError, "o_b: dimension 2"),
    (_set(o_a=lambda a: a["o_a"][0]), ValueError, "o_a: expected 3 dimensions"),
    (_set(lse_a=lambda a: a["lse_a"][:, :3]), ValueError, "lse_a: dimension 1"),
    (_set(lse_b=lambda a: a["lse_b"][:4]), ValueError, "lse_b: dimension 0"),
    (_set(lse_b=lambda a: a["lse_b"].astype(np.float16)), TypeError, "lse_b: dtype float16"),
    (_set(lse_a=lambda a: a["lse_a"].reshape(-1)), ValueError, "lse_a: expected 2 dimensions"),
    (_set(lse_out=np.full((5, 3), POISON, np.float32)), ValueError, "lse_out: dimension 1"),
    (_set(lse_out=np.full((5, 4), POISON, np.float16)), TypeError, "lse_out: dtype float16 is not supported"),
    (_set(out=lambda a: a["out"].astype(np.float32)), TypeError, "out: dtype float32 does not match o_a"),
    (_set(out=np.full((5, 2, 64), POISON, np.float16)), ValueError, "out: dimension 1"),
    (_set(o_a=lambda a: np.repeat(a["o_a"], 2, axis=2)[:, :, ::2]), ValueError, "o_a: the last 1 dimensions"),
]


@pytest.mark.parametrize("change,error,match", MERGE_BAD)
def test_merge_states_rejects_bad_arguments_and_writes_nothing(rng, change, error, match):
    args = _merge_args(rng)
    change(args)
    out, lse_out = args["out"], args["lse_out"]
    before, before_lse = out.copy(), lse_out.copy()
    with pytest.raises(error, match=match):
        kvcore.merge_states(**args)
    assert np.array_equal(out, before) and np.array_equal(lse_out, before_lse)


# --- CPU backend: determinism and the instruction-set builds ------------------------------------

def _bits_of(x) -> np.ndarray:
    return np.asarray(x.view(torch.int16) if isinstance(x, torch.Tensor) else x.view(np.uint16)).copy()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cpu_results_do_not_depend_on_the_thread_count(rng, dtype):
    """Decode split over fixed key ranges (sequences past 512 keys), prefill items and the shared-prefix
    passes give the same bits on 1, 2 and 3 threads."""
    seq_lens = np.array([1500, 700, 1, 1100], np.int32)
    dec = paged_case(rng, dtype, hq=8, hkv=2, d=128, page_size=16, seq_lens=seq_lens, decode=True)
    pre = paged_case(rng, dtype, hq=8, hkv=2, d=64, page_size=7, seq_lens=[300, 40, 129], decode=False,
                     q_lens=np.array([300, 1, 64], np.int32))
    try:
        runs = []
        for n in (1, 2, 3):
            kvcore.set_num_threads(n)
            out_d, lse_d = kvcore.paged_decode(**dec, return_lse=True)
            out_p, lse_p = kvcore.paged_prefill(**pre, return_lse=True)
            runs.append((_bits_of(out_d), lse_d.numpy().copy(), _bits_of(out_p), lse_p.numpy().copy()))
    finally:
        kvcore.set_num_threads(0)  # back to the default
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_cpu_instruction_set_builds_match_the_reference(isa):
    """The portable, AVX2 and AVX-512 builds of the CPU kernels (KVCORE_CPU_ISA picks one; the best
    the CPU supports is the default, with AMX tiles for INT4 decode where the CPU has AMX-INT8) pass
    the reference comparisons too. A build the CPU lacks falls back to the best below it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = dict(os.environ, KVCORE_CPU_ISA=isa)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
           "matches_reference or options or key_split or int4_attention",
           str(here / "test_attention.py"), str(here / "test_quant.py")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=here)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
