"""Independent references: plain Python/numpy loops, written from the op definitions only."""

from __future__ import annotations

import numpy as np


def append_kv_reference(k, v, k_cache, v_cache, slot_mapping):
    """Returns new (k_cache, v_cache) numpy arrays: row (page, offset) of each token's slot set."""
    k_out, v_out = np.array(k_cache, copy=True), np.array(v_cache, copy=True)
    page_size = k_cache.shape[1]
    for t, slot in enumerate(np.asarray(slot_mapping).tolist()):
        if slot < 0:
            continue
        page, offset = divmod(slot, page_size)
        k_out[page, offset] = k[t]
        v_out[page, offset] = v[t]
    return k_out, v_out


def copy_pages_reference(src, dst, src_pages, dst_pages):
    out = np.array(dst, copy=True)
    for s, d in zip(np.asarray(src_pages).tolist(), np.asarray(dst_pages).tolist()):
        out[d] = src[s]
    return out
