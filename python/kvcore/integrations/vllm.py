"""kvcore as a vLLM v1 attention backend.

    # pyproject.toml of a plugin package (kvcore's own extra does not install one for you):
    # [project.entry-points."vllm.general_plugins"] kvcore = "kvcore.integrations.vllm:register"
    vllm serve MODEL --attention-backend CUSTOM

`register()` (the `vllm.general_plugins` entry point, or call it yourself before building the
engine) points vLLM's `AttentionBackendEnum.CUSTOM` at `KVCoreAttentionBackend`
(vllm/v1/attention/backends/registry.py: register_backend). Written against the v1 interface in
vllm/v1/attention/backend.py as of vLLM 0.34 (the latest release): AttentionBackend (get_name,
get_impl_cls, get_builder_cls, get_kv_cache_shape, supported dtypes / head sizes / block sizes,
forward_includes_kv_cache_update), AttentionMetadataBuilder.build(common_prefix_len,
CommonAttentionMetadata) and AttentionImpl (__init__ arguments, do_kv_cache_update, forward with
a preallocated output).

KV layout: vLLM's FlashAttention one, [2, num_blocks, block_size, Hkv, D] per layer; kvcore reads
kv_cache[0] / kv_cache[1] in place. New tokens are written by do_kv_cache_update with
`kvcore.append_kv` (int64 slot mapping, -1 padding skipped); forward runs `kvcore.paged_prefill`
over the ragged batch (decodes are queries of length 1 in the same call), or
`kvcore.shared_prefix_prefill` when the scheduler found a common prefix (cascade attention).
Supported: bfloat16/float16, head sizes of `supported_head_dims`, any block size, GQA/MQA, sliding
windows, logit soft-capping, decoder attention. Refused with ValueError: alibi, fp8 KV, encoder or
cross attention, attention sinks, KV sharing across layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._paged import PagedLayerKV, check_head_dim, check_heads, check_kv_dtype, supported_head_dims

try:  # vLLM's base classes when it is installed; the same interface otherwise
    from vllm.v1.attention.backend import AttentionBackend as _Backend
    from vllm.v1.attention.backend import AttentionImpl as _Impl
    from vllm.v1.attention.backend import AttentionMetadataBuilder as _Builder
    from vllm.v1.attention.backend import AttentionCGSupport as _CGSupport
except ImportError:  # pragma: no cover - exercised where vLLM is absent
    _Backend = _Impl = _Builder = object
    _CGSupport = None

__all__ = ["KVCoreAttentionBackend", "KVCoreAttentionImpl", "KVCoreMetadata", "KVCoreMetadataBuilder", "register"]


@dataclass
class KVCoreMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor   # int32 [num_reqs + 1]
    seq_lens: torch.Tensor          # int32 [num_reqs]
    block_table: torch.Tensor       # int32 [num_reqs, max_blocks]
    slot_mapping: torch.Tensor      # int64 [num_actual_tokens]
    max_query_len: int
    common_prefix_len: int = 0      # > 0: cascade over a prefix every request shares


class KVCoreMetadataBuilder(_Builder):
    """Per-batch metadata from vLLM's CommonAttentionMetadata (one build per KV-cache group)."""

    if _CGSupport is not None:
        _cudagraph_support = _CGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device):
        self.kv_cache_spec, self.layer_names, self.vllm_config, self.device = (kv_cache_spec, layer_names,
                                                                              vllm_config, device)
        self.block_size = int(kv_cache_spec.block_size)

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> KVCoreMetadata:
        m = common_attn_metadata
        n = m.num_actual_tokens
        if common_prefix_len % self.block_size:
            raise ValueError(f"common_prefix_len: must be whole blocks of {self.block_size}, got {common_prefix_len}")
        return KVCoreMetadata(
            num_actual_tokens=n, query_start_loc=m.query_start_loc.to(torch.int32), seq_lens=m.seq_lens.to(torch.int32),
            block_table=m.block_table_tensor.to(torch.int32), slot_mapping=m.slot_mapping[:n],
            max_query_len=int(m.max_query_len), common_prefix_len=int(common_prefix_len))

    def use_cascade_attention(self, common_prefix_len: int, *args, **kwargs) -> bool:
        return common_prefix_len >= self.block_size


class KVCoreAttentionImpl(_Impl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None, attn_type: str = "decoder",
                 kv_sharing_target_layer_name: str | None = None, sinks: Any = None, **extra):
        self.num_heads, self.head_size, self.scale = int(num_heads), int(head_size), float(scale)
        self.num_kv_heads = int(num_kv_heads or num_heads)
        check_heads(self.num_heads, self.num_kv_heads)
        if alibi_slopes is not None:
            raise ValueError("alibi_slopes: ALiBi is not supported by the kvcore backend")
        if kv_cache_dtype not in ("auto", "bfloat16", "float16"):
            raise ValueError(f"kv_cache_dtype: the kvcore backend stores bfloat16/float16 KV, got {kv_cache_dtype!r}")
        if str(getattr(attn_type, "value", attn_type)) != "decoder":
            raise ValueError(f"attn_type: the kvcore backend runs decoder attention only, got {attn_type}")
        if kv_sharing_target_layer_name is not None:
            raise ValueError("kv_sharing_target_layer_name: KV sharing across layers is not supported")
        if sinks is not None:
            raise ValueError("sinks: attention sinks are not supported by the kvcore backend")
        self.sliding_window = int(sliding_window) if sliding_window else None
        self.logits_soft_cap = float(logits_soft_cap) if logits_soft_cap else None
        self.kv_cache_dtype = kv_cache_dtype

    @staticmethod
    def _layer_kv(kv_cache: torch.Tensor) -> PagedLayerKV:
        check_kv_dtype(kv_cache.dtype, "kv_cache")
        return PagedLayerKV(kv_cache[0], kv_cache[1])

    def do_kv_cache_update(self, layer: Any, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """Writes the step's K/V (key/value may carry padding rows past the slot mapping's length)."""
        n = slot_mapping.shape[0]
        self._layer_kv(kv_cache).append(key[:n], value[:n], slot_mapping)

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: KVCoreMetadata | None, output: torch.Tensor | None = None, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("output_scale: fused output quantization is not supported by the kvcore backend")
        if output is None:
            output = torch.empty_like(query)
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        check_head_dim(self.head_size, query.device.type, "head_size")
        m = attn_metadata
        n = m.num_actual_tokens
        kv = self._layer_kv(kv_cache)
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        options = {"scale": self.scale, "window": self.sliding_window, "soft_cap": self.logits_soft_cap}
        if m.common_prefix_len:
            pages = m.common_prefix_len // kv.page_size
            dev = q.device
            batch = m.seq_lens.shape[0]
            kv.shared_prefix_prefill(
                q, m.block_table[:1, :pages].contiguous(),
                torch.tensor([m.common_prefix_len], dtype=torch.int32, device=dev),
                torch.tensor([0, batch], dtype=torch.int32, device=dev),
                m.block_table[:, pages:].contiguous(), m.seq_lens - m.common_prefix_len, m.query_start_loc,
                out=out, **options)
        else:
            kv.prefill(q, m.block_table, m.seq_lens, m.query_start_loc, out=out, **options)
        return output


class KVCoreAttentionBackend(_Backend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KVCoreAttentionImpl]:
        return KVCoreAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVCoreMetadataBuilder]:
        return KVCoreMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        return (0, 1, 2, 3, 4, 5) if include_num_layers_dimension else (0, 1, 2, 3, 4)

    @staticmethod
    def get_supported_kernel_block_sizes() -> list:
        return []  # any block size

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(supported_head_dims("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in cls.get_supported_head_sizes()

    @classmethod
    def supports_dtype(cls, dtype: torch.dtype) -> bool:
        return dtype in cls.supported_dtypes

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype is None or kv_cache_dtype in cls.supported_kv_cache_dtypes

    @classmethod
    def is_mla(cls) -> bool:
        return False


def register() -> None:
    """The `vllm.general_plugins` entry point: AttentionBackendEnum.CUSTOM -> KVCoreAttentionBackend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.KVCoreAttentionBackend")
