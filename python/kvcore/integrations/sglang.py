"""kvcore as an SGLang attention backend.

    import kvcore.integrations.sglang                      # registers "kvcore" in SGLang's registry
    python -m sglang.launch_server --model-path ... --attention-backend kvcore

Written against SGLang 0.5.x's `AttentionBackend` (python/sglang/srt/layers/attention/
base_attn_backend.py: init_forward_metadata, forward_extend, forward_decode, init_cuda_graph_state,
init_forward_metadata_capture_cuda_graph / _replay_cuda_graph, get_cuda_graph_seq_len_fill_value)
and `register_attention_backend` (attention_registry.py), checked against the source of the 0.5.x
line (0.5.23 the latest). The backend reads SGLang's own pools: the token-to-KV pool's per-layer K and V
buffers [slots, Hkv, D] are viewed as pages of `page_size` tokens, the request-to-token table gives
each request's slots, so block tables are `req_to_token[rows, ::page_size] // page_size`. New K/V
are written with `kvcore.append_kv` at `out_cache_loc`, extend (prefill on a cached prefix) runs
`kvcore.paged_prefill`, decode `kvcore.paged_decode`.

Supported: bfloat16/float16 KV, head dims of `kvcore.integrations.supported_head_dims`, any page
size, GQA/MQA, logit soft-capping, CUDA graphs for decode batches. Refused with a ValueError naming
the setting: sliding windows, cross/encoder attention, MLA, differing K and V head dims, fp8 KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


from ._paged import PagedLayerKV, check_head_dim, check_heads, check_kv_dtype

try:  # the engine's base class and registry when SGLang is installed; the same interface otherwise
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend as _Base
except ImportError:  # pragma: no cover - exercised where SGLang is absent
    _Base = object
    register_attention_backend = None

__all__ = ["BACKEND_NAME", "KVCoreAttnBackend", "create_kvcore_backend"]

BACKEND_NAME = "kvcore"


@dataclass
class _Metadata:
    block_table: torch.Tensor          # int32 [bs, max_pages]
    seq_lens: torch.Tensor             # int32 [bs]
    cu_seqlens_q: torch.Tensor | None  # int32 [bs + 1], extend only


class KVCoreAttnBackend(_Base):
    """SGLang attention backend over kvcore's paged attention (see the module docstring)."""

    def __init__(self, model_runner: Any):
        super().__init__()
        self.device = torch.device(model_runner.device)
        self.page_size = int(getattr(model_runner, "page_size", 1) or 1)
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.max_pages = math.ceil(self.req_to_token.shape[1] / self.page_size)
        if getattr(model_runner, "use_mla_backend", False):
            raise ValueError("use_mla_backend: the kvcore backend runs MHA/GQA attention, not MLA")
        self.forward_metadata: _Metadata | None = None
        self._graph: _Metadata | None = None

    # --- metadata ----------------------------------------------------------------------------
    def _block_table(self, req_pool_indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        slots = self.req_to_token[req_pool_indices.long(), ::self.page_size][:, :self.max_pages]
        table = torch.div(slots, self.page_size, rounding_mode="floor").to(torch.int32)
        if out is None:
            return table
        out.copy_(table)
        return out

    def init_forward_metadata(self, forward_batch: Any) -> None:
        table = self._block_table(forward_batch.req_pool_indices)
        seq_lens = forward_batch.seq_lens.to(torch.int32)
        cu = None
        if not forward_batch.forward_mode.is_decode():
            lens = forward_batch.extend_seq_lens.to(torch.int32)
            cu = torch.zeros(lens.shape[0] + 1, dtype=torch.int32, device=lens.device)
            torch.cumsum(lens, 0, out=cu[1:])
        self.forward_metadata = _Metadata(table, seq_lens, cu)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Fixed buffers the captured decode graphs read their tables and lengths from."""
        self._graph = _Metadata(torch.zeros((max_bs, self.max_pages), dtype=torch.int32, device=self.device),
                                torch.ones(max_bs, dtype=torch.int32, device=self.device), None)

    def _graph_metadata(self, bs: int, req_pool_indices, seq_lens, forward_mode) -> None:
        if self._graph is None:
            raise RuntimeError("init_cuda_graph_state: must be called before capturing CUDA graphs")
        if not forward_mode.is_decode():
            raise ValueError(f"forward_mode: the kvcore backend captures CUDA graphs for decode only, got {forward_mode}")
        self._block_table(req_pool_indices[:bs], out=self._graph.block_table[:bs])
        self._graph.seq_lens[:bs].copy_(seq_lens[:bs])
        self.forward_metadata = _Metadata(self._graph.block_table[:bs], self._graph.seq_lens[:bs], None)

    def init_forward_metadata_capture_cuda_graph(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens,
                                                 forward_mode, spec_info) -> None:
        if spec_info is not None:
            raise ValueError("spec_info: speculative decoding is not supported by the kvcore backend")
        self._graph_metadata(bs, req_pool_indices, seq_lens, forward_mode)

    def init_forward_metadata_replay_cuda_graph(self, bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens,
                                                forward_mode, spec_info, seq_lens_cpu=None) -> None:
        self._graph_metadata(bs, req_pool_indices, seq_lens, forward_mode)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def support_triton(self) -> bool:
        return False

    # --- attention ---------------------------------------------------------------------------
    def _layer(self, layer: Any, forward_batch: Any) -> tuple[PagedLayerKV, int, int, int, dict]:
        if getattr(layer, "is_cross_attention", False):
            raise ValueError("is_cross_attention: the kvcore backend runs decoder self-attention only")
        window = getattr(layer, "sliding_window_size", -1)
        if window is not None and window >= 0:
            raise ValueError(f"sliding_window_size: not supported by the kvcore SGLang backend, got {window}")
        if layer.qk_head_dim != layer.v_head_dim:
            raise ValueError(f"v_head_dim: must equal qk_head_dim ({layer.qk_head_dim}), got {layer.v_head_dim}")
        hq, hk, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        check_head_dim(d, self.device.type)
        check_heads(hq, hk)
        pool = forward_batch.token_to_kv_pool
        k_buf, v_buf = pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)
        check_kv_dtype(k_buf.dtype, "kv_cache_dtype")
        ps = self.page_size
        kv = PagedLayerKV(k_buf.view(-1, ps, hk, d), v_buf.view(-1, ps, hk, d))
        cap = getattr(layer, "logit_cap", 0.0)
        return kv, hq, hk, d, {"scale": layer.scaling, "soft_cap": cap if cap and cap > 0 else None}

    def _save(self, kv, k, v, hk, d, forward_batch, save_kv_cache) -> None:
        if save_kv_cache and k is not None:
            kv.append(k.reshape(-1, hk, d), v.reshape(-1, hk, d), forward_batch.out_cache_loc)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        kv, hq, hk, d, options = self._layer(layer, forward_batch)
        self._save(kv, k, v, hk, d, forward_batch, save_kv_cache)
        m = self.forward_metadata
        o = kv.prefill(q.reshape(-1, hq, d), m.block_table, m.seq_lens, m.cu_seqlens_q, **options)
        return o.view(-1, hq * d)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        kv, hq, hk, d, options = self._layer(layer, forward_batch)
        self._save(kv, k, v, hk, d, forward_batch, save_kv_cache)
        m = self.forward_metadata
        o = kv.decode(q.reshape(-1, hq, d), m.block_table, m.seq_lens, **options)
        return o.view(-1, hq * d)


def create_kvcore_backend(runner: Any) -> KVCoreAttnBackend:
    """The factory SGLang's registry calls with the ModelRunner."""
    return KVCoreAttnBackend(runner)


if register_attention_backend is not None:  # pragma: no cover - only where SGLang is installed
    register_attention_backend(BACKEND_NAME)(create_kvcore_backend)
