"""kvcore: the KV-cache memory core of an LLM serving engine.

Arrays cross the boundary through DLPack, so numpy, torch, JAX and CuPy arrays all work; every op
runs on the device its arrays live on (CPU or CUDA). Importing kvcore never imports torch and works
on machines without a GPU or a CUDA driver: `cuda_status()` says why CUDA is unavailable.
"""

from . import _C
from ._C import (
    KVCoreError,
    build_info,
    cuda_status,
    debug_checks,
    num_threads,
    set_debug_checks,
    set_num_threads,
)
from .attention import merge_states, paged_decode, paged_prefill, shared_prefix_decode, shared_prefix_prefill
from .kv_cache import append_kv, copy_pages
from .memory import Arena, PagePool, Transfer, VirtualTensor
from .prefix_cache import PagedKVMover, PrefetchTicket, PrefixCache, PrefixMatch
from .quant import (
    append_kv_int4,
    dequantize_kv_int4,
    hadamard_transform,
    int4_cache_shapes,
    paged_decode_int4,
    paged_prefill_int4,
    random_signs,
    shared_prefix_decode_int4,
    shared_prefix_prefill_int4,
)

__version__: str = _C.build_info()["version"]

__all__ = [
    "Arena",
    "KVCoreError",
    "PagePool",
    "PagedKVMover",
    "PrefetchTicket",
    "PrefixCache",
    "PrefixMatch",
    "Transfer",
    "VirtualTensor",
    "__version__",
    "append_kv",
    "append_kv_int4",
    "build_info",
    "copy_pages",
    "cuda_status",
    "debug_checks",
    "dequantize_kv_int4",
    "hadamard_transform",
    "int4_cache_shapes",
    "merge_states",
    "num_threads",
    "paged_decode",
    "paged_decode_int4",
    "paged_prefill",
    "paged_prefill_int4",
    "random_signs",
    "set_debug_checks",
    "set_num_threads",
    "shared_prefix_decode",
    "shared_prefix_decode_int4",
    "shared_prefix_prefill",
    "shared_prefix_prefill_int4",
]
