"""What every engine adapter shares: the configuration checks and one layer's paged KV (16-bit or
INT4) with the three calls an attention backend makes: append new tokens, prefill/extend, decode.

Imports torch lazily through its callers only (this module itself needs nothing but kvcore).
"""

from __future__ import annotations

from typing import Any, Sequence

import kvcore

__all__ = ["KV_DTYPES", "PagedLayerKV", "check_head_dim", "check_heads", "check_kv_dtype", "supported_head_dims"]

# Head dims the attention kernels are built for, per backend (see kvcore.attention).
_HEAD_DIMS = {"cpu": (64, 80, 96, 128, 192, 256), "cuda": (64, 80, 96, 128, 192, 256)}
KV_DTYPES = ("bfloat16", "float16")


def supported_head_dims(device_type: str = "cuda") -> tuple[int, ...]:
    """Head dims kvcore's attention runs for on `device_type` ("cpu" or "cuda")."""
    try:
        return _HEAD_DIMS[device_type]
    except KeyError:
        raise ValueError(f"device: kvcore runs on cpu or cuda, got {device_type!r}") from None


def check_head_dim(head_dim: int, device_type: str, name: str = "head_dim") -> int:
    dims = supported_head_dims(device_type)
    if head_dim not in dims:
        raise ValueError(f"{name}: kvcore attention on {device_type} supports head dims {list(dims)}, got {head_dim}")
    return int(head_dim)


def check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: must divide num_heads ({num_heads}) for GQA/MQA, got {num_kv_heads}")


def check_kv_dtype(dtype: Any, name: str = "kv_dtype") -> str:
    """The dtype name ("bfloat16" / "float16") of a torch dtype or string; ValueError otherwise."""
    text = str(dtype).removeprefix("torch.")
    text = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(text, text)
    if text not in KV_DTYPES:
        raise ValueError(f"{name}: kvcore attention reads bfloat16 or float16 KV, got {dtype}")
    return text


class PagedLayerKV:
    """One layer's paged KV cache as kvcore's ops take it.

    16-bit: `k`, `v` are [num_pages, page_size, Hkv, D] views (any page stride: the halves of vLLM's
    [2, P, S, H, D] or FlashInfer's [P, 2, S, H, D] buffers work). INT4: `int4` = (k_codes, k_params,
    v_codes, v_params) as `kvcore.int4_cache_shapes`, rotated with `signs` / `block_size`.
    """

    def __init__(self, k: Any = None, v: Any = None, *, int4: Sequence[Any] | None = None, signs: Any = None,
                 block_size: int | None = None):
        if (int4 is None) == (k is None or v is None):
            raise ValueError("int4: give either k and v (16-bit pages) or the four INT4 caches")
        self.k, self.v = k, v
        self.int4 = tuple(int4) if int4 is not None else None
        if self.int4 is not None and len(self.int4) != 4:
            raise ValueError("int4: expected (k_codes, k_params, v_codes, v_params)")
        self._q = {"signs": signs, "block_size": block_size} if self.int4 is not None else {}

    @property
    def caches(self) -> tuple:
        """The page-major arrays (for copy_pages / PagedKVMover)."""
        return self.int4 if self.int4 is not None else (self.k, self.v)

    @property
    def page_size(self) -> int:
        return int((self.int4[0] if self.int4 is not None else self.k).shape[1])

    def append(self, k, v, slot_mapping) -> None:
        """k, v [tokens, Hkv, D] into slots (page * page_size + offset; negative: skipped)."""
        if self.int4 is not None:
            kvcore.append_kv_int4(k, v, *self.int4, slot_mapping, **self._q)
        else:
            kvcore.append_kv(k, v, self.k, self.v, slot_mapping)

    def _kv(self) -> tuple:
        return self.int4 if self.int4 is not None else (self.k, self.v)

    def prefill(self, q, block_table, seq_lens, cu_seqlens_q, *, causal=True, **options):
        """Ragged q [total_q, Hq, D] over the pages (new tokens already appended)."""
        fn = kvcore.paged_prefill_int4 if self.int4 is not None else kvcore.paged_prefill
        return fn(q, *self._kv(), block_table, seq_lens, cu_seqlens_q, causal=causal, **self._q, **options)

    def decode(self, q, block_table, seq_lens, **options):
        """One query per request, q [batch, Hq, D]."""
        fn = kvcore.paged_decode_int4 if self.int4 is not None else kvcore.paged_decode
        return fn(q, *self._kv(), block_table, seq_lens, **self._q, **options)

    def shared_prefix_decode(self, q, prefix_block_table, prefix_lens, group_indptr, block_table, seq_lens,
                             **options):
        """Cascade decode: the groups' shared prefix pages are read once per group."""
        fn = kvcore.shared_prefix_decode_int4 if self.int4 is not None else kvcore.shared_prefix_decode
        return fn(q, *self._kv(), prefix_block_table, prefix_lens, group_indptr, block_table, seq_lens,
                  **self._q, **options)

    def shared_prefix_prefill(self, q, prefix_block_table, prefix_lens, group_indptr, block_table, seq_lens,
                              cu_seqlens_q, *, causal=True, **options):
        fn = kvcore.shared_prefix_prefill_int4 if self.int4 is not None else kvcore.shared_prefix_prefill
        return fn(q, *self._kv(), prefix_block_table, prefix_lens, group_indptr, block_table, seq_lens,
                  cu_seqlens_q, causal=causal, **self._q, **options)
