"""kvcore's ops as torch custom operators (torch.ops.kvcore.*), for torch.compile and CUDA graphs.

Importing this module imports torch (``import kvcore`` never does) and registers, through
``torch.library.custom_op``, the ops a serving step calls, each with a fake implementation that
gives output shapes and dtypes so torch.compile traces them without running them, and with its
in-place arguments declared (``mutates_args``) so functionalization orders them correctly:

=====================================  ================================================================
``append_kv(k, v, k_cache, v_cache, slot_mapping)``               writes k_cache, v_cache
``append_kv_int4(k, v, k_codes, k_params, v_codes, v_params, slot_mapping, block_size, signs)``
                                                                   writes the four INT4 caches
``copy_pages(src, dst, src_pages, dst_pages)``                    writes dst
``paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale, window, soft_cap)`` -> out
``paged_decode_lse(...)``                                          -> (out, lse)
``paged_prefill(q, ..., cu_seqlens_q, causal, scale, window, soft_cap)`` -> out
``paged_decode_int4(q, k_codes, k_params, v_codes, v_params, block_table, seq_lens, block_size, signs, scale, window, soft_cap)`` -> out
``merge_states(o_a, lse_a, o_b, lse_b)``                          -> (out, lse)
=====================================  ================================================================

Optional arguments default as in kvcore (scale None = 1/sqrt(D), window/soft_cap None = off).
The ops run on the tensors' device and CUDA ops on torch's current stream.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import kvcore

__all__ = ["append_kv", "append_kv_int4", "copy_pages", "merge_states", "paged_decode", "paged_decode_int4",
           "paged_decode_lse", "paged_prefill"]


@torch.library.custom_op("kvcore::append_kv", mutates_args=("k_cache", "v_cache"))
def append_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    kvcore.append_kv(k, v, k_cache, v_cache, slot_mapping)


@append_kv.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


@torch.library.custom_op("kvcore::append_kv_int4", mutates_args=("k_codes", "k_params", "v_codes", "v_params"))
def append_kv_int4(k: Tensor, v: Tensor, k_codes: Tensor, k_params: Tensor, v_codes: Tensor, v_params: Tensor,
                   slot_mapping: Tensor, block_size: Optional[int] = None, signs: Optional[Tensor] = None) -> None:
    kvcore.append_kv_int4(k, v, k_codes, k_params, v_codes, v_params, slot_mapping, block_size=block_size,
                          signs=signs)


@append_kv_int4.register_fake
def _(k, v, k_codes, k_params, v_codes, v_params, slot_mapping, block_size=None, signs=None):
    return None


@torch.library.custom_op("kvcore::copy_pages", mutates_args=("dst",))
def copy_pages(src: Tensor, dst: Tensor, src_pages: Tensor, dst_pages: Tensor) -> None:
    kvcore.copy_pages(src, dst, src_pages, dst_pages)


@copy_pages.register_fake
def _(src, dst, src_pages, dst_pages):
    return None


def _lse_like(q: Tensor) -> Tensor:
    return q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("kvcore::paged_decode", mutates_args=())
def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                 scale: Optional[float] = None, window: Optional[int] = None,
                 soft_cap: Optional[float] = None) -> Tensor:
    return kvcore.paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale=scale, window=window,
                               soft_cap=soft_cap)


@paged_decode.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale=None, window=None, soft_cap=None):
    return torch.empty_like(q)


@torch.library.custom_op("kvcore::paged_decode_lse", mutates_args=())
def paged_decode_lse(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                     scale: Optional[float] = None, window: Optional[int] = None,
                     soft_cap: Optional[float] = None) -> tuple[Tensor, Tensor]:
    return kvcore.paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale=scale, window=window,
                               soft_cap=soft_cap, return_lse=True)


@paged_decode_lse.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale=None, window=None, soft_cap=None):
    return torch.empty_like(q), _lse_like(q)


@torch.library.custom_op("kvcore::paged_prefill", mutates_args=())
def paged_prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                  cu_seqlens_q: Tensor, causal: bool = True, scale: Optional[float] = None,
                  window: Optional[int] = None, soft_cap: Optional[float] = None) -> Tensor:
    return kvcore.paged_prefill(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, causal=causal,
                                scale=scale, window=window, soft_cap=soft_cap)


@paged_prefill.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, causal=True, scale=None, window=None,
      soft_cap=None):
    return torch.empty_like(q)


@torch.library.custom_op("kvcore::paged_decode_int4", mutates_args=())
def paged_decode_int4(q: Tensor, k_codes: Tensor, k_params: Tensor, v_codes: Tensor, v_params: Tensor,
                      block_table: Tensor, seq_lens: Tensor, block_size: Optional[int] = None,
                      signs: Optional[Tensor] = None, scale: Optional[float] = None, window: Optional[int] = None,
                      soft_cap: Optional[float] = None) -> Tensor:
    return kvcore.paged_decode_int4(q, k_codes, k_params, v_codes, v_params, block_table, seq_lens,
                                    block_size=block_size, signs=signs, scale=scale, window=window,
                                    soft_cap=soft_cap)


@paged_decode_int4.register_fake
def _(q, k_codes, k_params, v_codes, v_params, block_table, seq_lens, block_size=None, signs=None, scale=None,
      window=None, soft_cap=None):
    return torch.empty_like(q)


@torch.library.custom_op("kvcore::merge_states", mutates_args=())
def merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    return kvcore.merge_states(o_a, lse_a, o_b, lse_b)


@merge_states.register_fake
def _(o_a, lse_a, o_b, lse_b):
    return torch.empty_like(o_a), torch.empty_like(lse_a)
