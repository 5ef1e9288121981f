"""INT4 KV cache with block-diagonal Hadamard rotation, fused into the paged write and attention.

Format (per layer, K and V alike):
  codes:  uint8 [num_pages, page_size, Hkv, D/2] - two 4-bit codes per byte: element 2i in the low
          nibble of byte i, element 2i+1 in the high nibble.
  params: float16 [num_pages, page_size, Hkv, 2] = (scale, min), asymmetric: x ~= code * scale + min,
          in the rotated basis.
Before quantizing, each head vector x[D] is rotated: y = H (s * x), H the normalized block-diagonal
Hadamard transform of block size b (a power of two dividing D; default min(D, 128), or in general the
largest power of two dividing D up to 128) and s optional
fixed signs (+1/-1, float32 [D], e.g. from `random_signs`). Attention rotates q the same way inside
the kernel (scores need no un-rotation) and rotates the output back (V's rotation undone). Codes and
params are bit-identical between the CPU and CUDA backends. 4.25 bits per element at D = 128 (vs 16).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._native import C as _C
from ._arrays import dtype_name, empty_like, require_array
from ._streams import resolve_stream
from .attention import _options, _outputs, _result

__all__ = [
    "append_kv_int4",
    "dequantize_kv_int4",
    "hadamard_transform",
    "int4_cache_shapes",
    "paged_decode_int4",
    "paged_prefill_int4",
    "random_signs",
    "shared_prefix_decode_int4",
    "shared_prefix_prefill_int4",
]


def _block(block_size: Any) -> int:
    if block_size is None:
        return 0
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size: must be a positive power of two or None, got {block_size}")
    return int(block_size)


def random_signs(head_dim: int, seed: int = 0) -> np.ndarray:
    """Fixed random +1/-1 signs, float32 [head_dim] (move them to the GPU for CUDA arrays)."""
    return np.where(np.random.default_rng(seed).random(head_dim) < 0.5, -1.0, 1.0).astype(np.float32)


def int4_cache_shapes(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int):
    """(codes shape, params shape) of one INT4 page cache: uint8 [num_pages, page_size, Hkv, D/2]
    (two codes per byte) and float16 [num_pages, page_size, Hkv, 2] (scale, min)."""
    if head_dim % 2:
        raise ValueError(f"head_dim: must be even for INT4 packing, got {head_dim}")
    return (num_pages, page_size, num_kv_heads, head_dim // 2), (num_pages, page_size, num_kv_heads, 2)


def hadamard_transform(x, block_size=None, signs=None, inverse=False, *, out=None, stream=None):
    """y = H (s * x) over the last dim: x [..., D] -> y [..., D] (inverse: x = s * (H y)), same dtype
    (float32, bfloat16, float16); signs: float32 [D] or None. Orthonormal, so the inverse undoes the
    forward transform. out: an optional preallocated result of x's shape and dtype (its leading dims
    viewable as rows without a copy)."""
    require_array(x, "x")
    d = x.shape[-1]
    if out is None:
        out = empty_like(x, tuple(x.shape), dtype_name(x.dtype))
    _check_out_shape(out, tuple(x.shape))
    _C.hadamard_transform(x.reshape(-1, d), out, _block(block_size), signs, bool(inverse),
                          resolve_stream(stream, (x,)))
    return out


def append_kv_int4(k, v, k_codes, k_params, v_codes, v_params, slot_mapping, *, block_size=None, signs=None,
                   stream=None) -> None:
    """One fused pass: rotate each new token's K/V head vectors, find min/max per (token, head),
    quantize, pack and store into the INT4 pages at slot = page * page_size + offset (negative slots
    skip). k, v: [tokens, Hkv, D] bfloat16/float16/float32, last dim contiguous; caches as in the
    module docstring. Out-of-range slots raise IndexError on the CPU before anything is written."""
    _C.append_kv_int4(k, v, k_codes, k_params, v_codes, v_params, slot_mapping, _block(block_size), signs,
                      resolve_stream(stream, (k,)))


def dequantize_kv_int4(codes, params, *, block_size=None, signs=None, out=None, stream=None):
    """Float32 values in the original (un-rotated) basis: codes [..., D/2], params [..., 2] ->
    [..., D] (into out when given). For tests and debugging."""
    require_array(codes, "codes")
    require_array(params, "params")
    half = codes.shape[-1]
    if tuple(params.shape) != tuple(codes.shape[:-1]) + (2,):
        raise ValueError(f"params: expected shape {tuple(codes.shape[:-1]) + (2,)} (the codes' leading dims, then "
                         f"(scale, min)), got {tuple(params.shape)}")
    shape = tuple(codes.shape[:-1]) + (2 * half,)
    if out is None:
        out = empty_like(codes, shape, "float32")
    _check_out_shape(out, shape)
    _C.dequantize_kv_int4(codes.reshape(-1, half), params.reshape(-1, 2), out, _block(block_size), signs,
                          resolve_stream(stream, (codes,)))
    return out


def _check_out_shape(out, shape) -> None:
    if tuple(out.shape) != shape:
        raise ValueError(f"out: expected shape {shape}, got {tuple(out.shape)}")


def paged_decode_int4(q, k_codes, k_params, v_codes, v_params, block_table, seq_lens, *, block_size=None, signs=None,
                      scale=None, return_lse=False, out=None, lse=None, window=None, soft_cap=None, stream=None):
    """paged_decode over INT4 pages (dequantized inside the kernel, q rotated, output rotated back).
    q [batch, Hq, D] bfloat16/float16 (float32 on the CPU) -> out [batch, Hq, D] (and LSE [batch, Hq] float32, natural log)."""
    scale_, window_, cap = _options(scale, window, soft_cap)
    out, lse = _outputs(q, out, return_lse, lse)
    _C.attention_int4(q, k_codes, k_params, v_codes, v_params, block_table, seq_lens, None, out, lse,
                      _block(block_size), signs, scale_, cap, window_, True, resolve_stream(stream, (q,)))
    return _result(out, lse, return_lse)


def paged_prefill_int4(q, k_codes, k_params, v_codes, v_params, block_table, seq_lens, cu_seqlens_q, *, causal=True,
                       block_size=None, signs=None, scale=None, return_lse=False, out=None, lse=None, window=None,
                       soft_cap=None, stream=None):
    """paged_prefill over INT4 pages, read directly (no bf16 copy of the cache is rebuilt): q
    [total_q, Hq, D] bfloat16/float16 (float32 on the CPU) -> out [total_q, Hq, D] (and LSE [total_q, Hq]); caches as
    int4_cache_shapes, cu_seqlens_q int32 [batch + 1]."""
    scale_, window_, cap = _options(scale, window, soft_cap)
    out, lse = _outputs(q, out, return_lse, lse)
    _C.attention_int4(q, k_codes, k_params, v_codes, v_params, block_table, seq_lens, cu_seqlens_q, out, lse,
                      _block(block_size), signs, scale_, cap, window_, bool(causal), resolve_stream(stream, (q,)))
    return _result(out, lse, return_lse)


def shared_prefix_decode_int4(q, k_codes, k_params, v_codes, v_params, prefix_block_table, prefix_lens, group_indptr,
                              block_table, seq_lens, *, block_size=None, signs=None, scale=None, return_lse=False,
                              out=None, lse=None, window=None, soft_cap=None, stream=None):
    """shared_prefix_decode over INT4 pages: q [batch, Hq, D] -> out [batch, Hq, D] (and LSE
    [batch, Hq]); caches as int4_cache_shapes, tables as shared_prefix_decode."""
    scale_, window_, cap = _options(scale, window, soft_cap)
    out, lse = _outputs(q, out, return_lse, lse)
    _C.attention_int4(q, k_codes, k_params, v_codes, v_params, block_table, seq_lens, None, out, lse,
                      _block(block_size), signs, scale_, cap, window_, True, resolve_stream(stream, (q,)),
                      prefix_block_table, prefix_lens, group_indptr)
    return _result(out, lse, return_lse)


def shared_prefix_prefill_int4(q, k_codes, k_params, v_codes, v_params, prefix_block_table, prefix_lens, group_indptr,
                               block_table, seq_lens, cu_seqlens_q, *, causal=True, block_size=None, signs=None,
                               scale=None, return_lse=False, out=None, lse=None, window=None, soft_cap=None, stream=None):
    """shared_prefix_prefill over INT4 pages: q [total_q, Hq, D] -> out [total_q, Hq, D] (and LSE
    [total_q, Hq]); caches as int4_cache_shapes, tables as shared_prefix_prefill."""
    scale_, window_, cap = _options(scale, window, soft_cap)
    out, lse = _outputs(q, out, return_lse, lse)
    _C.attention_int4(q, k_codes, k_params, v_codes, v_params, block_table, seq_lens, cu_seqlens_q, out, lse,
                      _block(block_size), signs, scale_, cap, window_, bool(causal), resolve_stream(stream, (q,)),
                      prefix_block_table, prefix_lens, group_indptr)
    return _result(out, lse, return_lse)
