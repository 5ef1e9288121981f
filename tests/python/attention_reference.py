"""Independent float64 references for the attention family, written from the semantics stated in
csrc/kvcore/attention.h only (not from the kernels):

- request b's keys are positions 0..seq_len-1, read through its block table (logical page i is
  cache page block_table[b, i]), or sequence b of a [max_seqs, max_tokens, Hkv, D] cache when
  there is no block table;
- its q_len queries are the LAST tokens of the sequence: query t sits at seq_len - q_len + t;
- key j is visible to a query at p when j <= p (causal) and, with a window w, when j > p - w;
- logits = scale * q.k, then soft_cap * tanh(logits / soft_cap);
- LSE is the natural-log log-sum-exp of the visible logits; no visible key -> LSE -inf, output 0;
- GQA: query head h reads KV head h // (Hq // Hkv);
- shared-prefix attention is plain attention over the group's prefix keys followed by the
  request's own (suffix) keys, whose positions continue after the prefix.

Every function takes numpy/torch arrays of any float dtype (converted exactly to float64) and
returns float64 numpy arrays.
"""

from __future__ import annotations

import numpy as np


def f64(x) -> np.ndarray:
    """An exact float64 numpy copy of a numpy or torch array (bfloat16 included), on the host."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return x.detach().cpu().double().numpy()


def ints(x) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return x.astype(np.int64)
    return x.detach().cpu().numpy().astype(np.int64)


def gather_sequence(cache: np.ndarray, block_table: np.ndarray | None, row: int, length: int) -> np.ndarray:
    """The first `length` tokens [length, Hkv, D] of request `row`'s sequence in a paged cache."""
    page_size = cache.shape[1]
    if block_table is None:
        assert length <= page_size
        return cache[row, :length]
    pages = [int(p) for p in block_table[row, : -(-length // page_size)]]
    if not pages:
        return cache[:0, 0]  # [0, Hkv, D]
    return np.concatenate([cache[p] for p in pages], axis=0)[:length]


def attend(q: np.ndarray, q_pos: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool, scale: float,
           window: int | None, soft_cap: float | None) -> tuple[np.ndarray, np.ndarray]:
    """q [n, Hq, D] at positions q_pos [n] against keys/values [m, Hkv, D] at positions 0..m-1.
    Returns (out [n, Hq, D], lse [n, Hq]) in float64."""
    n, hq, d = q.shape
    m, hkv = k.shape[0], k.shape[1]
    group = hq // hkv
    kv_head = np.arange(hq) // group                      # GQA: query head h reads kv head h // group
    kh = k[:, kv_head, :].transpose(1, 0, 2)              # [Hq, m, D]
    vh = v[:, kv_head, :].transpose(1, 0, 2)
    logits = scale * np.matmul(q.transpose(1, 0, 2), kh.transpose(0, 2, 1)).transpose(1, 0, 2)  # [n, Hq, m]
    if soft_cap:
        logits = soft_cap * np.tanh(logits / soft_cap)
    j = np.arange(m)[None, :]
    p = np.asarray(q_pos, np.int64)[:, None]
    visible = np.ones((n, m), bool)
    if causal:
        visible &= j <= p
    if window:
        visible &= j > p - window
    visible = np.broadcast_to(visible[:, None, :], logits.shape)
    logits = np.where(visible, logits, -np.inf)
    any_visible = visible.any(axis=-1)                    # [n, Hq]
    mx = np.where(any_visible, logits.max(axis=-1, initial=-np.inf), 0.0)
    w = np.where(visible, np.exp(logits - mx[..., None]), 0.0)
    denom = w.sum(axis=-1)
    safe = np.where(any_visible, denom, 1.0)
    out = np.matmul((w / safe[..., None]).transpose(1, 0, 2), vh).transpose(1, 0, 2)  # [n, Hq, D]
    lse = np.where(any_visible, mx + np.log(safe), -np.inf)
    out[~any_visible] = 0.0
    return out, lse


def _query_ranges(batch: int, cu_seqlens_q) -> list[tuple[int, int]]:
    if cu_seqlens_q is None:
        return [(b, 1) for b in range(batch)]
    cu = ints(cu_seqlens_q)
    return [(int(cu[b]), int(cu[b + 1] - cu[b])) for b in range(batch)]


def _default_scale(d: int, scale) -> float:
    return float(scale) if scale is not None else d ** -0.5


def paged_attention_reference(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q=None, *, causal=True,
                              scale=None, window=None, soft_cap=None) -> tuple[np.ndarray, np.ndarray]:
    """paged_decode (cu_seqlens_q=None: one query per request, causal) or paged_prefill.
    Returns (out [tokens, Hq, D], lse [tokens, Hq]) float64."""
    qf, kc, vc = f64(q), f64(k_cache), f64(v_cache)
    table = ints(block_table)
    lens = ints(seq_lens)
    d = qf.shape[2]
    out = np.zeros(qf.shape)
    lse = np.full(qf.shape[:2], -np.inf)
    for b, (first, count) in enumerate(_query_ranges(len(lens), cu_seqlens_q)):
        n = int(lens[b])
        k = gather_sequence(kc, table, b, n)
        v = gather_sequence(vc, table, b, n)
        pos = n - count + np.arange(count)
        o, l = attend(qf[first:first + count], pos, k, v, causal=causal or cu_seqlens_q is None,
                      scale=_default_scale(d, scale), window=window, soft_cap=soft_cap)
        out[first:first + count] = o
        lse[first:first + count] = l
    return out, lse


def shared_prefix_reference(q, k_cache, v_cache, prefix_block_table, prefix_lens, group_indptr, block_table, seq_lens,
                            cu_seqlens_q=None, *, causal=True, scale=None, window=None,
                            soft_cap=None) -> tuple[np.ndarray, np.ndarray]:
    """Plain attention over the concatenation of the group's prefix keys and the request's suffix keys."""
    qf, kc, vc = f64(q), f64(k_cache), f64(v_cache)
    ptable, plens, indptr = ints(prefix_block_table), ints(prefix_lens), ints(group_indptr)
    table, lens = ints(block_table), ints(seq_lens)
    d = qf.shape[2]
    out = np.zeros(qf.shape)
    lse = np.full(qf.shape[:2], -np.inf)
    ranges = _query_ranges(len(lens), cu_seqlens_q)
    for g in range(len(plens)):
        pk = gather_sequence(kc, ptable, g, int(plens[g]))
        pv = gather_sequence(vc, ptable, g, int(plens[g]))
        for b in range(int(indptr[g]), int(indptr[g + 1])):
            first, count = ranges[b]
            k = np.concatenate([pk, gather_sequence(kc, table, b, int(lens[b]))], axis=0)
            v = np.concatenate([pv, gather_sequence(vc, table, b, int(lens[b]))], axis=0)
            pos = k.shape[0] - count + np.arange(count)
            o, l = attend(qf[first:first + count], pos, k, v, causal=causal or cu_seqlens_q is None,
                          scale=_default_scale(d, scale), window=window, soft_cap=soft_cap)
            out[first:first + count] = o
            lse[first:first + count] = l
    return out, lse


def merge_states_reference(o_a, lse_a, o_b, lse_b) -> tuple[np.ndarray, np.ndarray]:
    """o = (o_a e^lse_a + o_b e^lse_b) / (e^lse_a + e^lse_b), lse = log(e^lse_a + e^lse_b); two
    empty states (-inf) merge to an empty one (output 0)."""
    oa, ob, la, lb = f64(o_a), f64(o_b), f64(lse_a), f64(lse_b)
    lse = np.logaddexp(la, lb)
    empty = np.isneginf(lse)
    ref = np.where(empty, 0.0, lse)
    with np.errstate(invalid="ignore"):
        wa = np.where(np.isneginf(la), 0.0, np.exp(la - ref))
        wb = np.where(np.isneginf(lb), 0.0, np.exp(lb - ref))
    out = wa[..., None] * oa + wb[..., None] * ob
    out[empty] = 0.0
    return out, lse
