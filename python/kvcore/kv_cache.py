"""KV-cache page ops: append new tokens into a paged cache, copy whole pages."""

from __future__ import annotations

from typing import Any

from ._native import C as _C
from ._streams import resolve_stream


def append_kv(k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any, *, stream: Any = None) -> None:
    """Write new tokens' keys and values into a paged KV cache, in place.

    Shapes (any DLPack array: numpy, torch, JAX, CuPy; all on one device):
      k, v:          [tokens, num_kv_heads, head_dim]; last dim contiguous, other strides free
                     (so slices of a fused QKV projection work).
      k_cache,
      v_cache:       [num_pages, page_size, num_kv_heads, head_dim]; inner three dims contiguous,
                     page stride free (cache[:, 0] / cache[:, 1] of a [num_pages, 2, ...] buffer work).
      slot_mapping:  [tokens] int32 or int64, slot = page * page_size + offset; a negative slot
                     skips that token (padding).
    dtypes: bfloat16, float16 or float32, the same for all four K/V arrays.

    On the CPU, a slot >= num_pages * page_size raises IndexError before anything is written. On CUDA,
    out-of-range slots are skipped, and raise IndexError when debug checks are on
    (`kvcore.set_debug_checks(True)` or KVCORE_DEBUG=1, which synchronizes the stream).
    `stream`: CUDA stream handle (int) or stream object; default: torch's / CuPy's current stream for
    their arrays, else the default stream. The CUDA op is asynchronous on that stream.
    """
    _C.append_kv(k, v, k_cache, v_cache, slot_mapping, resolve_stream(stream, (k,)))


def copy_pages(src: Any, dst: Any, src_pages: Any, dst_pages: Any, *, stream: Any = None) -> None:
    """Copy whole pages between two page-major buffers: dst[dst_pages[i]] = src[src_pages[i]].

    Shapes:
      src:        [src_num_pages, *page_shape]; page contents contiguous, page stride free.
      dst:        [dst_num_pages, *page_shape]; same page shape and dtype as src.
      src_pages,
      dst_pages:  [n] int32 or int64.
    Devices: CPU to CPU, GPU to GPU (same device), GPU to host and host to GPU (for offload; pin the
    host buffer for asynchronous, full-bandwidth copies). With page lists on the CPU, CUDA copies run
    on the copy engines, one DMA per run of consecutive pages; with page lists on the GPU, one kernel
    does the copy with no host work (CUDA-graph capturable; host buffers must then be pinned).

    Host-resident page lists are checked: out-of-range pages raise IndexError, a destination listed
    twice raises ValueError, and when src and dst are the same buffer a page may not be both a source
    and a destination. Nothing is copied when a check fails.
    """
    _C.copy_pages(src, dst, src_pages, dst_pages, resolve_stream(stream, (src, dst)))
