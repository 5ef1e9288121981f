"""append_kv and copy_pages on the CPU backend against the independent references, and their
argument checks. CUDA versions are in test_kv_cache_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest

import kvcore
from arrays import bits, poisoned, random_array
from reference import append_kv_reference, copy_pages_reference

FRAMEWORK_DTYPES = [
    ("numpy", "float32"),
    ("numpy", "float16"),
    ("torch", "bfloat16"),
    ("torch", "float16"),
    ("torch", "float32"),
]


def as_framework(x: np.ndarray, framework: str):
    if framework == "numpy":
        return x
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def random_slots(rng, tokens: int, capacity: int, dtype) -> np.ndarray:
    """Distinct slots with about a fifth of them negative (padding tokens to skip)."""
    slots = rng.permutation(capacity)[:tokens].astype(dtype)
    slots[rng.random(tokens) < 0.2] = -1
    return slots


@pytest.mark.parametrize("framework,dtype", FRAMEWORK_DTYPES)
@pytest.mark.parametrize("page_size", [1, 7, 16])
@pytest.mark.parametrize("heads,head_dim", [(1, 64), (8, 128), (3, 80)])
def test_append_kv_matches_reference(rng, framework, dtype, page_size, heads, head_dim):
    if framework == "torch":
        pytest.importorskip("torch")
    tokens = int(rng.integers(1, 40))
    num_pages = tokens // page_size + 3
    slots = random_slots(rng, tokens, num_pages * page_size, rng.choice([np.int32, np.int64]))
    k = random_array(rng, (tokens, heads, head_dim), dtype, framework)
    v = random_array(rng, (tokens, heads, head_dim), dtype, framework)
    k_cache = poisoned((num_pages, page_size, heads, head_dim), dtype, framework)
    v_cache = poisoned((num_pages, page_size, heads, head_dim), dtype, framework)
    want_k, want_v = append_kv_reference(bits(k), bits(v), bits(k_cache), bits(v_cache), slots)

    kvcore.append_kv(k, v, k_cache, v_cache, as_framework(slots, framework))

    assert np.array_equal(bits(k_cache), want_k)
    assert np.array_equal(bits(v_cache), want_v)


def test_append_kv_fused_qkv_and_interleaved_cache(rng):
    """k/v as slices of a fused QKV projection; K and V caches as halves of one [P, 2, S, H, D] buffer."""
    tokens, q_heads, heads, head_dim, page_size, num_pages = 23, 8, 2, 64, 4, 9
    qkv = rng.standard_normal((tokens, q_heads + 2 * heads, head_dim)).astype(np.float16)
    k, v = qkv[:, q_heads:q_heads + heads], qkv[:, q_heads + heads:]
    buf = np.full((num_pages, 2, page_size, heads, head_dim), -777.0, np.float16)
    slots = random_slots(rng, tokens, num_pages * page_size, np.int64)
    want_k, want_v = append_kv_reference(k, v, buf[:, 0], buf[:, 1], slots)

    kvcore.append_kv(k, v, buf[:, 0], buf[:, 1], slots)

    assert np.array_equal(bits(buf[:, 0]), bits(want_k))
    assert np.array_equal(bits(buf[:, 1]), bits(want_v))


def test_append_kv_strided_heads(rng):
    """Head stride != head_dim (every other head of a larger tensor) takes the per-head path."""
    tokens, heads, head_dim = 11, 4, 32
    big = rng.standard_normal((tokens, 2 * heads, head_dim)).astype(np.float32)
    k, v = big[:, ::2], big[:, 1::2]
    k_cache = np.full((6, 3, heads, head_dim), -777.0, np.float32)
    v_cache = k_cache.copy()
    slots = random_slots(rng, tokens, 18, np.int32)
    want_k, want_v = append_kv_reference(k, v, k_cache, v_cache, slots)
    kvcore.append_kv(k, v, k_cache, v_cache, slots)
    assert np.array_equal(bits(k_cache), bits(want_k))
    assert np.array_equal(bits(v_cache), bits(want_v))


def test_append_kv_zero_tokens_is_a_no_op():
    k = np.ones((0, 2, 8), np.float32)
    cache = np.full((2, 4, 2, 8), 5.0, np.float32)
    kvcore.append_kv(k, k, cache, cache.copy(), np.zeros(0, np.int32))
    assert (cache == 5.0).all()


def test_append_kv_releases_the_gil_and_is_thread_safe(rng):
    """Concurrent calls on disjoint slots from several threads all land."""
    import threading

    tokens, heads, head_dim, page_size = 256, 8, 128, 16
    k = random_array(rng, (tokens, heads, head_dim), "float32")
    k_cache = poisoned((4 * tokens // page_size, page_size, heads, head_dim), "float32")
    v_cache = poisoned(k_cache.shape, "float32")
    slots = rng.permutation(4 * tokens)[: 4 * tokens].reshape(4, tokens).astype(np.int64)

    def work(i):
        for _ in range(20):
            kvcore.append_kv(k, k, k_cache, v_cache, slots[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = k_cache.reshape(-1, heads, head_dim)
    for i in range(4):
        assert np.array_equal(flat[slots[i]], k)


# --- argument checks: each names the offending argument --------------------------------------

def _append_args(dtype=np.float16, tokens=5, heads=2, head_dim=8, num_pages=4, page_size=3):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((tokens, heads, head_dim)).astype(dtype)
    v = rng.standard_normal((tokens, heads, head_dim)).astype(dtype)
    kc = np.full((num_pages, page_size, heads, head_dim), 3.0, dtype)
    vc = np.full((num_pages, page_size, heads, head_dim), 3.0, dtype)
    slots = np.arange(tokens, dtype=np.int32)
    return dict(k=k, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(k=a["k"].astype(np.int32)), TypeError, "k: dtype int32"),
    (lambda a: a.update(v=a["v"].astype(np.float32)), TypeError, "v: dtype float32 does not match k"),
    (lambda a: a.update(k_cache=a["k_cache"].astype(np.float32)), TypeError, "k_cache: dtype"),
    (lambda a: a.update(v_cache=a["v_cache"].astype(np.float32)), TypeError, "v_cache: dtype"),
    (lambda a: a.update(k=a["k"][0]), ValueError, "k: expected 3 dimensions"),
    (lambda a: a.update(v=a["v"][None]), ValueError, "v: expected 3 dimensions"),
    (lambda a: a.update(k_cache=a["k_cache"][0]), ValueError, "k_cache: expected 4 dimensions"),
    (lambda a: a.update(v_cache=a["v_cache"][0]), ValueError, "v_cache: expected 4 dimensions"),
    (lambda a: a.update(v=a["v"][:3]), ValueError, r"v: dimension 0 \(tokens\)"),
    (lambda a: a.update(v=a["v"][:, :1]), ValueError, r"v: dimension 1 \(kv heads\)"),
    (lambda a: a.update(v=a["v"][:, :, :4]), ValueError, r"v: dimension 2 \(head_dim\)"),
    (lambda a: a.update(k_cache=np.zeros((4, 3, 1, 8), np.float16) + 1), ValueError, r"k_cache: dimension 2"),
    (lambda a: a.update(k_cache=np.zeros((4, 3, 2, 16), np.float16) + 1), ValueError, r"k_cache: dimension 3"),
    (lambda a: a.update(v_cache=np.ones((5, 3, 2, 8), np.float16)), ValueError, "v_cache: dimension 0"),
    (lambda a: a.update(k=np.ones((5, 2, 16), np.float16)[:, :, ::2]), ValueError, "k: the last 1 dimensions"),
    (lambda a: a.update(k_cache=np.ones((4, 2, 3, 8), np.float16).transpose(0, 2, 1, 3)), ValueError,
     "k_cache: the last 3 dimensions must be contiguous"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"].astype(np.float32)), TypeError, "slot_mapping: dtype"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"][:4]), ValueError, r"slot_mapping: dimension 0 \(tokens\)"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"][None]), ValueError, "slot_mapping: expected 1 dimensions"),
    (lambda a: a.update(slot_mapping=np.array([0, 1, 2, 12, 3], np.int64)), IndexError,
     r"slot_mapping\[3\] = 12 is out of range"),
    (lambda a: a.update(k=np.ones((5, 2, 8), np.complex64)), TypeError, "k: unsupported dtype complex64"),
])
def test_append_kv_rejects_bad_arguments_and_writes_nothing(change, error, match):
    args = _append_args()
    change(args)
    before_k, before_v = args["k_cache"].copy(), args["v_cache"].copy()
    with pytest.raises(error, match=match):
        kvcore.append_kv(**args)
    assert np.array_equal(args["k_cache"], before_k)
    assert np.array_equal(args["v_cache"], before_v)


def test_append_kv_output_is_never_a_silent_copy():
    """A read-only or non-array output is refused instead of being written to a temporary."""
    args = _append_args()
    args["k_cache"].setflags(write=False)
    with pytest.raises(TypeError):
        kvcore.append_kv(**args)
    args = _append_args()
    args["v_cache"] = args["v_cache"].tolist()
    with pytest.raises(TypeError):
        kvcore.append_kv(**args)


def test_append_kv_cuda_stream_argument_is_checked():
    with pytest.raises(TypeError, match="stream"):
        kvcore.append_kv(**_append_args(), stream="default")
    with pytest.raises(TypeError, match="stream"):
        kvcore.append_kv(**_append_args(), stream=-1)


def test_append_kv_torch_cpu_int64_and_mixed_frameworks(rng):
    torch = pytest.importorskip("torch")
    k = torch.randn(6, 2, 16, dtype=torch.bfloat16)
    k_cache = torch.full((3, 4, 2, 16), -777.0, dtype=torch.bfloat16)
    v_cache = k_cache.clone()
    slots = np.array([11, 0, -1, 5, 6, 3], np.int64)  # numpy index array with torch data
    want_k, _ = append_kv_reference(bits(k), bits(k), bits(k_cache), bits(v_cache), slots)
    kvcore.append_kv(k, k, k_cache, v_cache, slots)
    assert np.array_equal(bits(k_cache), want_k)


# --- copy_pages --------------------------------------------------------------------------------

@pytest.mark.parametrize("framework,dtype", FRAMEWORK_DTYPES)
@pytest.mark.parametrize("page_shape", [(1,), (16, 8, 64), (2, 5, 3, 32)])
def test_copy_pages_matches_reference(rng, framework, dtype, page_shape):
    if framework == "torch":
        pytest.importorskip("torch")
    src_pages_total, dst_pages_total = int(rng.integers(1, 20)), int(rng.integers(1, 20))
    n = int(rng.integers(0, min(src_pages_total, dst_pages_total) + 1))
    src = random_array(rng, (src_pages_total, *page_shape), dtype, framework)
    dst = poisoned((dst_pages_total, *page_shape), dtype, framework)
    index_dtype = rng.choice([np.int32, np.int64])
    src_pages = rng.integers(0, src_pages_total, n).astype(index_dtype)  # sources may repeat
    dst_pages = rng.permutation(dst_pages_total)[:n].astype(index_dtype)
    want = copy_pages_reference(bits(src), bits(dst), src_pages, dst_pages)

    kvcore.copy_pages(src, dst, as_framework(src_pages, framework), as_framework(dst_pages, framework))

    assert np.array_equal(bits(dst), want)


def test_copy_pages_strided_pages_and_same_buffer(rng):
    """Pages of a [P, 2, ...] buffer's K half into its V half; then within one buffer."""
    buf = rng.standard_normal((10, 2, 4, 8)).astype(np.float32)
    src, dst = buf[:, 0], buf[:, 1]
    want = copy_pages_reference(src, dst, [1, 3, 9], [0, 3, 7])
    kvcore.copy_pages(src, dst, np.array([1, 3, 9]), np.array([0, 3, 7]))
    assert np.array_equal(dst, want)

    pages = rng.standard_normal((8, 16)).astype(np.float32)
    want = copy_pages_reference(pages, pages, [0, 1, 2], [5, 6, 2])  # 2 -> 2 is a harmless self copy
    kvcore.copy_pages(pages, pages, np.array([0, 1, 2]), np.array([5, 6, 2]))
    assert np.array_equal(pages, want)


def _copy_args():
    rng = np.random.default_rng(1)
    src = rng.standard_normal((6, 4, 8)).astype(np.float16)
    dst = np.full((5, 4, 8), 2.0, np.float16)
    return dict(src=src, dst=dst, src_pages=np.array([0, 5, 2], np.int32), dst_pages=np.array([4, 0, 1], np.int32))


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(src_pages=np.array([0, 6, 2], np.int32)), IndexError, r"src_pages\[1\] = 6 is out of range"),
    (lambda a: a.update(src_pages=np.array([0, -1, 2], np.int32)), IndexError, r"src_pages\[1\] = -1"),
    (lambda a: a.update(dst_pages=np.array([4, 0, 5], np.int64)), IndexError, r"dst_pages\[2\] = 5 is out of range"),
    (lambda a: a.update(dst_pages=np.array([4, 0, 4], np.int32)), ValueError, r"dst_pages\[2\] = 4 appears more"),
    (lambda a: a.update(dst=np.ones((5, 4, 4), np.float16)), ValueError, "dst: dimension 2"),
    (lambda a: a.update(dst=np.ones((5, 32), np.float16)), ValueError, "dst: expected 3 dimensions"),
    (lambda a: a.update(dst=np.ones((5, 4, 8), np.float32)), TypeError, "dst: dtype float32 does not match src"),
    (lambda a: a.update(src=np.ones((6, 8, 4), np.float16).transpose(0, 2, 1)), ValueError, "src: the last 2"),
    (lambda a: a.update(src_pages=np.array([0.0, 5.0, 2.0])), TypeError, "src_pages: unsupported dtype float64"),
    (lambda a: a.update(dst_pages=np.array([4, 0], np.int32)), ValueError, "dst_pages: dimension 0"),
    (lambda a: a.update(src_pages=np.array([[0, 5, 2]], np.int32)), ValueError, "src_pages: expected 1 dimensions"),
    (lambda a: a.update(src=np.float16(1.0) * np.ones((), np.float16)), ValueError, "src: expected at least 1"),
])
def test_copy_pages_rejects_bad_arguments_and_copies_nothing(change, error, match):
    args = _copy_args()
    change(args)
    before = args["dst"].copy()
    with pytest.raises(error, match=match):
        kvcore.copy_pages(**args)
    assert np.array_equal(args["dst"], before)


def test_copy_pages_same_buffer_source_that_is_also_a_destination():
    pages = np.arange(40, dtype=np.float32).reshape(8, 5) + 1
    before = pages.copy()
    with pytest.raises(ValueError, match="the destination of copy 0 overlaps the source of copy 1"):
        kvcore.copy_pages(pages, pages, np.array([0, 1]), np.array([1, 2]))
    assert np.array_equal(pages, before)
    # Shifted views of one buffer: page 3 of dst is page 4 of src.
    with pytest.raises(ValueError, match="overlaps the source"):
        kvcore.copy_pages(pages[1:], pages[:-1], np.array([3, 0]), np.array([6, 4]))
    assert np.array_equal(pages, before)
    # The same shifted views with disjoint pages are fine.
    kvcore.copy_pages(pages[1:], pages[:-1], np.array([0]), np.array([3]))
    assert np.array_equal(pages[3], before[1])
