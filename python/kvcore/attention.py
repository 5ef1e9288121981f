"""Attention over paged (or per-sequence contiguous) KV caches.

Shapes (any DLPack arrays, all on one device):
  q:            [tokens, Hq, D] (decode: [batch, Hq, D]); last dim contiguous.
  k_cache,
  v_cache:      [num_pages, page_size, Hkv, D]; inner three dims contiguous, any page stride.
                The virtual layout of a VirtualTensor, [max_seqs, max_tokens, Hkv, D], works too:
                pass block_table=None (request b reads sequence b) or a [batch, 1] table of slots.
  block_table:  int32 [batch, max_pages]: request b's logical page i is cache page block_table[b, i].
  seq_lens:     int32 [batch]: keys per request (cached prefix + the new tokens, already appended).
  cu_seqlens_q: int32 [batch + 1]: request b's queries are q[cu[b]:cu[b+1]], the last tokens of its
                sequence (prefill / extend / chunked prefill).
dtypes: bfloat16 or float16 (CUDA and CPU), float32 (CPU); D in {64, 80, 96, 128, 192, 256} (the
CUDA kernels: see the CUDA error for the ones compiled); GQA/MQA when Hq % Hkv == 0; any page size.
Options: `scale` (default D**-0.5), `window` (a query at position p sees keys p - window < j <= p),
`soft_cap` (logits = soft_cap * tanh(logits / soft_cap)). With `return_lse=True` the ops also return
the float32 log-sum-exp [tokens, Hq] in the NATURAL log (FlashInfer uses base 2), which
`merge_states` combines; `lse=` takes a preallocated one (as `out=` does the output; both needed for
CUDA-graph capture, and passing it implies return_lse). CUDA ops run asynchronously on `stream` (default: torch's current stream
for torch tensors); the CPU backend validates block tables and lengths (IndexError / ValueError).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._native import C as _C
from ._arrays import dtype_name, empty_like, require_array
from ._streams import resolve_stream

__all__ = ["merge_states", "paged_decode", "paged_prefill", "shared_prefix_decode", "shared_prefix_prefill"]


def _options(scale: Any, window: Any, soft_cap: Any) -> tuple[float, int, float]:
    # The kernels take float32, where a positive value too small to represent would read as 0 (off).
    if scale is not None and not np.float32(scale) > 0:
        raise ValueError(f"scale: must be positive (as a float32), got {scale}")
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
        raise ValueError(f"window: must be a positive number of tokens or None, got {window}")
    if soft_cap is not None and not np.float32(soft_cap) > 0:
        raise ValueError(f"soft_cap: must be positive (as a float32) or None, got {soft_cap}")
    return float(scale or 0.0), int(window or 0), float(soft_cap or 0.0)


def _outputs(q: Any, out: Any, return_lse: bool, lse: Any = None):
    """`out` [tokens, Hq, D] and, with return_lse, the float32 LSE [tokens, Hq]: the caller's arrays
    (preallocated, as CUDA graphs need) or new ones next to q. Passing `lse` implies return_lse."""
    require_array(q, "q")
    if out is None:
        out = empty_like(q, q.shape, _dtype_of(q))
    if lse is None and return_lse:
        lse = empty_like(q, (q.shape[0], q.shape[1]), "float32", "lse")
    return out, lse


def _dtype_of(x: Any) -> str:
    return dtype_name(x.dtype)


def _result(out: Any, lse: Any, return_lse: bool):
    return (out, lse) if return_lse or lse is not None else out


def paged_decode(q, k_cache, v_cache, block_table, seq_lens, *, scale=None, return_lse=False, out=None, lse=None,
                 window=None, soft_cap=None, stream=None):
    """One query token per request against its paged KV: q [batch, Hq, D] -> out [batch, Hq, D]
    (and LSE [batch, Hq] float32, natural log, with return_lse=True). See the module docstring."""
    scale_, window_, cap = _options(scale, window, soft_cap)
    out, lse = _outputs(q, out, return_lse, lse)
    _C.attention(q, k_cache, v_cache, block_table, seq_lens, None, out, lse, scale_, cap, window_, True,
                 resolve_stream(stream, (q,)))
    return _result(out, lse, return_lse)


def paged_prefill(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, causal=True, scale=None,
                  return_lse=False, out=None, lse=None, window=None, soft_cap=None, stream=None):
    """Ragged new tokens q [total_q, Hq, D] (request b: q[cu_seqlens_q[b]:cu_seqlens_q[b+1]], the last
    tokens of its seq_lens[b], already appended) attend to the cached prefix and, causally, to each
    other -> out [total_q, Hq, D] (and LSE [total_q, Hq]). causal=False lets every query see every key
    of its request."""
    scale_, window_, cap = _options(scale, window, soft_cap)
    out, lse = _outputs(q, out, return_lse, lse)
    _C.attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out, lse, scale_, cap, window_,
                 bool(causal), resolve_stream(stream, (q,)))
    return _result(out, lse, return_lse)


def shared_prefix_decode(q, k_cache, v_cache, prefix_block_table, prefix_lens, group_indptr, block_table,
                         seq_lens, *, scale=None, return_lse=False, out=None, lse=None, window=None, soft_cap=None,
                         stream=None):
    """Cascade decode: requests grouped by a shared prefix whose pages are listed once per group.

    prefix_block_table: int32 [groups, max_prefix_pages]; prefix_lens: int32 [groups] (tokens);
    group_indptr: int32 [groups + 1], requests of group g are batch rows group_indptr[g] to
    group_indptr[g+1] (contiguous). block_table / seq_lens describe each request's own KV after the
    prefix (its suffix, including the new token), whose positions continue after the prefix.
    The prefix is read once per group for all its queries (GQA heads packed), the suffixes per
    request, and the two partial states are merged exactly. Equals paged_decode over prefix + suffix.
    """
    scale_, window_, cap = _options(scale, window, soft_cap)
    out, lse = _outputs(q, out, return_lse, lse)
    _C.attention(q, k_cache, v_cache, block_table, seq_lens, None, out, lse, scale_, cap, window_, True,
                 resolve_stream(stream, (q,)), prefix_block_table, prefix_lens, group_indptr)
    return _result(out, lse, return_lse)


def shared_prefix_prefill(q, k_cache, v_cache, prefix_block_table, prefix_lens, group_indptr, block_table,
                          seq_lens, cu_seqlens_q, *, causal=True, scale=None, return_lse=False, out=None, lse=None,
                          window=None, soft_cap=None, stream=None):
    """Cascade prefill/extend: as shared_prefix_decode, with ragged queries q [total_q, Hq, D]
    (cu_seqlens_q int32 [batch + 1]) that are the last tokens of each request's suffix; they see the
    whole shared prefix and, causally, their suffix -> out [total_q, Hq, D] (and LSE [total_q, Hq])."""
    scale_, window_, cap = _options(scale, window, soft_cap)
    out, lse = _outputs(q, out, return_lse, lse)
    _C.attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out, lse, scale_, cap, window_,
                 bool(causal), resolve_stream(stream, (q,)), prefix_block_table, prefix_lens, group_indptr)
    return _result(out, lse, return_lse)


def merge_states(o_a, lse_a, o_b, lse_b, *, out=None, lse_out=None, stream=None):
    """Exactly combines two partial attention states over disjoint key sets:
    o = (o_a e^lse_a + o_b e^lse_b) / (e^lse_a + e^lse_b), lse = log(e^lse_a + e^lse_b) (natural log).

    o_a, o_b: [tokens, heads, D] float32, bfloat16 or float16; lse_a, lse_b: [tokens, heads] float32.
    An empty state (lse = -inf) contributes nothing. Returns (o, lse); `out` may alias o_a.
    """
    require_array(o_a, "o_a")
    require_array(lse_a, "lse_a")
    if out is None:
        out = empty_like(o_a, o_a.shape, _dtype_of(o_a))
    if lse_out is None:
        lse_out = empty_like(lse_a, lse_a.shape, "float32", "lse_out")
    _C.merge_states(o_a, lse_a, o_b, lse_b, out, lse_out, resolve_stream(stream, (o_a,)))
    return out, lse_out
