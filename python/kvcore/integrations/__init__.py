"""Adapters that plug kvcore into serving engines and model libraries.

Each submodule imports its engine (and torch) when it is imported itself; `import kvcore` and
`import kvcore.integrations` import neither:

- `kvcore.integrations.transformers`: an attention implementation and a paged Cache for
  Hugging Face transformers (`attn_implementation="kvcore"`).
- `kvcore.integrations.vllm`: a vLLM v1 attention backend (plugin entry point
  `vllm.general_plugins`).
- `kvcore.integrations.vllm_offload`: a vLLM v1 KV offloading spec for the OffloadingConnector
  (PrefixCache-managed CPU blocks, `copy_pages` transfers).
- `kvcore.integrations.sglang`: an SGLang attention backend.
- `kvcore.integrations.sglang_hicache`: an SGLang HiCache storage backend over PrefixCache-managed
  host pages.

See the README's engine sections for the versions targeted and what is supported.
"""

from ._paged import supported_head_dims

__all__ = ["supported_head_dims"]
