"""kvcore inside Hugging Face transformers: an attention implementation ("kvcore", registered in
`transformers.AttentionInterface` and `AttentionMaskInterface`) and a paged `Cache` whose storage
is kvcore pages.

    import kvcore.integrations.transformers as kvt                    # registers "kvcore"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="kvcore")
    out = model.generate(**inputs, cache=kvt.KVCoreCache(model), max_new_tokens=32)

How a step runs: the model calls `cache.update(k, v, layer)`, which hands the new K/V to the
attention function unchanged; the attention function (which receives the 2-D padding mask, see
`kvcore_mask`) drops padded tokens, writes the real ones into the layer's pages with `append_kv`
(`append_kv_int4` for INT4 KV), and runs `paged_prefill` for prompts (ragged: every row only its
real tokens) and `paged_decode` per generated token (`shared_prefix_decode` when the rows share
prefix pages). Pages come from a `kvcore.PrefixCache` in a `KVCoreStore`; a store outlives caches,
so a later `KVCoreCache(model, store=store, prefix=system_prompt, batch_size=B)` reuses the cached
pages of a shared prompt prefix instead of recomputing them, and its B rows share those pages.

Targets transformers 5.25 (the `cache=` argument, `Cache`/`CacheLayerMixin`, the attention and
mask interfaces as in that release); decoder-only models whose attention passes the result of
`cache.update` straight to the attention function (Llama, Qwen2, Mistral and the many models
derived from them). KV is stored in bfloat16 or float16 (a float32 model's K/V are rounded to
`kv_dtype`, float16 by default) or INT4. Not supported: beam search (reorder_cache), cache crop,
training/dropout, 4-D custom masks, non-causal (encoder) attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

import kvcore

from ._paged import PagedLayerKV, check_head_dim, check_heads, check_kv_dtype

__all__ = ["ATTN_IMPLEMENTATION", "KVCoreCache", "KVCoreStore", "kvcore_attention_forward", "kvcore_mask", "register"]

ATTN_IMPLEMENTATION = "kvcore"


# --- registration ------------------------------------------------------------------------------
def kvcore_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask function for "kvcore": kvcore applies causality (and sliding windows) itself, so the
    attention function only needs which tokens are padding: the 2-D bool mask [batch, kv_length]
    (None: no padding)."""
    if attention_mask is None:
        return None
    return attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)


def kvcore_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: Any, value: Any,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, sliding_window: int | None = None,
                             softcap: float | None = None, **kwargs):
    """transformers' attention-function signature: query [B, Hq, T, D]; key/value are what
    KVCoreCache.update returned; returns (out [B, T, Hq, D], None)."""
    if not isinstance(key, _StepKV):
        raise TypeError("cache: the kvcore attention implementation reads and writes KV through a KVCoreCache; "
                        "pass cache=kvcore.integrations.transformers.KVCoreCache(model) (and use_cache=True)")
    if dropout and module.training:
        raise ValueError(f"dropout: kvcore attention is for inference, got dropout={dropout} in training mode")
    if not getattr(module, "is_causal", True):
        raise ValueError("is_causal: kvcore attention runs causal decoder attention only")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: kvcore takes the 2-D padding mask, got {attention_mask.dim()}-D "
                         "(custom 4-D masks are not supported)")
    return key.cache._attend(key, query, attention_mask, scaling, sliding_window, softcap)


def register() -> None:
    """Registers "kvcore" with transformers (done on import; calling again is harmless)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvcore_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kvcore_mask)


register()


# --- storage -----------------------------------------------------------------------------------
def _text_config(model_or_config: Any):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


class KVCoreStore:
    """Every layer's paged KV (kvcore page format) and the PrefixCache that owns the page ids.

    Args:
      model: the transformers model (or its config, with `device`).
      num_pages, page_size: capacity in pages of `page_size` tokens (all layers alike).
      kv_dtype: bfloat16 or float16 (default: the model's dtype if 16-bit, else float16).
      int4: store K/V as INT4 with Hadamard rotation (`kvcore.append_kv_int4`); int4_block_size the
        rotation block (default min(D, 128)); fixed random signs from `seed`.
      host_pages, policy: the prefix cache's host tier and eviction policy ("hot" or "lru"); cold
        prefix pages are offloaded there (a `kvcore.PagedKVMover`) and prefetched back on a hit.
    """

    def __init__(self, model: Any, num_pages: int = 256, page_size: int = 16, *, kv_dtype: Any = None,
                 int4: bool = False, int4_block_size: int | None = None, host_pages: int = 0, policy: str = "hot",
                 device: Any = None, seed: int = 0):
        config = _text_config(model)
        model_device, model_dtype = _model_device_dtype(model)
        self.device = torch.device(device) if device is not None else model_device
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        check_head_dim(self.head_dim, self.device.type)
        check_heads(self.num_heads, self.num_kv_heads)
        if kv_dtype is None:
            kv_dtype = model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.float16
        self.kv_dtype = getattr(torch, check_kv_dtype(kv_dtype))
        if page_size < 1 or num_pages < 1:
            raise ValueError(f"num_pages, page_size: must be positive, got {num_pages}, {page_size}")
        self.page_size, self.num_pages, self.int4 = int(page_size), int(num_pages), bool(int4)
        h, d = self.num_kv_heads, self.head_dim
        self.signs = torch.from_numpy(kvcore.random_signs(d, seed)).to(self.device) if int4 else None
        self.layers: list[PagedLayerKV] = []
        for _ in range(self.num_layers):
            if int4:
                codes, params = kvcore.int4_cache_shapes(self.num_pages, self.page_size, h, d)
                bufs = [torch.zeros(s, dtype=t, device=self.device)
                        for s, t in ((codes, torch.uint8), (params, torch.float16)) * 2]
                self.layers.append(PagedLayerKV(int4=bufs, signs=self.signs, block_size=int4_block_size))
            else:
                buf = torch.zeros((self.num_pages, 2, self.page_size, h, d), dtype=self.kv_dtype, device=self.device)
                self.layers.append(PagedLayerKV(buf[:, 0], buf[:, 1]))
        caches = [c for layer in self.layers for c in layer.caches]
        page_bytes = sum(c[0].numel() * c.element_size() for c in caches)
        mover = None
        if host_pages:
            host = [torch.zeros((host_pages,) + tuple(c.shape[1:]), dtype=c.dtype,
                                pin_memory=self.device.type == "cuda") for c in caches]
            mover = kvcore.PagedKVMover(caches, host)
        self.prefix = kvcore.PrefixCache(self.page_size, self.num_pages, host_pages, policy=policy,
                                         page_bytes=page_bytes, mover=mover)
        self.bytes_per_token = page_bytes // self.page_size

    def copy_page(self, src: int, dst: int) -> None:
        """Copies one page of every layer (K and V) with kvcore.copy_pages."""
        pages_src, pages_dst = torch.tensor([src]), torch.tensor([dst])
        for layer in self.layers:
            for c in layer.caches:
                kvcore.copy_pages(c, c, pages_src, pages_dst)


# --- the Cache -----------------------------------------------------------------------------------
@dataclass
class _StepKV:
    """What KVCoreCache.update returns as both `key` and `value`: the layer's new K/V states
    [B, Hkv, T, D] and where they go."""
    cache: "KVCoreCache"
    layer: int
    seen: int           # padded tokens of the layer before this step
    key: torch.Tensor
    value: torch.Tensor


@dataclass
class _Plan:
    rows: torch.Tensor       # int64 [n]: flat (b * T + t) index of each real new token
    slots: torch.Tensor      # int64 [n]
    table: torch.Tensor      # int32 [B, max_pages]
    seq_lens: torch.Tensor   # int32 [B]
    cu: torch.Tensor         # int32 [B + 1]
    decode: bool             # one real new token per row
    shared: tuple | None     # shared_prefix_decode tables, when rows share prefix pages


class _Layer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, cache: "KVCoreCache", index: int):
        super().__init__()
        self._cache, self._index, self.seen = cache, index, 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step = _StepKV(self._cache, self._index, self.seen, key_states, value_states)
        self.seen += key_states.shape[-2]
        return step, step

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("KVCoreCache: reset is not supported; release() it and make a new one")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("KVCoreCache: beam search (reorder_cache) is not supported")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KVCoreCache: crop is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("KVCoreCache: batch expansion is not supported; use prefix= and batch_size=")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("KVCoreCache: batch selection is not supported")


class KVCoreCache(Cache):
    """A transformers Cache whose K/V live in kvcore pages (one generate/forward sequence batch).

    Args:
      model: the model, loaded (or set) with attn_implementation="kvcore".
      store: the KVCoreStore to take pages from (default: a private one; `num_pages`, `page_size`,
        `kv_dtype`, `int4`, `host_pages` configure it).
      prefix: token ids of a prompt prefix shared by every row (a system prompt). Its pages cached in
        the store's PrefixCache are reused (host-tier pages prefetched back), the rest is computed
        now with one forward pass; all `batch_size` rows then share its full pages (the partial last
        page is copied per row). Pass generate the rows as [prefix | left-padded rest] with the
        matching attention mask: generate skips the prefix columns the cache already holds.
    Call `release()` when done: the prefix's full pages stay in the PrefixCache for later caches,
    every other page goes back to the store.
    """

    def __init__(self, model: Any, *, store: KVCoreStore | None = None, num_pages: int = 256, page_size: int = 16,
                 kv_dtype: Any = None, int4: bool = False, host_pages: int = 0,
                 prefix: Sequence[int] | torch.Tensor | None = None, batch_size: int | None = None):
        config = getattr(model, "config", model)
        impl = getattr(config, "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            raise ValueError(f"attn_implementation: KVCoreCache needs the model loaded with "
                             f"attn_implementation=\"{ATTN_IMPLEMENTATION}\", got {impl!r}")
        self.store = store or KVCoreStore(model, num_pages, page_size, kv_dtype=kv_dtype, int4=int4,
                                          host_pages=host_pages)
        super().__init__(layers=[_Layer(self, i) for i in range(self.store.num_layers)])
        self._tables: list[list[int]] = []
        self._lens: list[int] = []
        self._owned: set[int] = set()   # pages from alloc that the prefix tree does not hold
        self._shared = 0                # leading pages shared by every row
        self._handle = -1
        self._plan_key: tuple | None = None
        self._plan_value: _Plan | None = None
        self.reused_prefix_tokens = 0
        if prefix is not None:
            self._load_prefix(model, prefix, batch_size or 1)
        elif batch_size is not None:
            raise ValueError("batch_size: only used with prefix=")

    # -- pages ----------------------------------------------------------------------------------
    def _alloc(self, n: int) -> list[int]:
        pages = [int(p) for p in self.store.prefix.alloc(n)]
        self._owned.update(pages)
        return pages

    def _set_seen(self, n: int) -> None:
        for layer in self.layers:
            layer.seen = n

    def _load_prefix(self, model, prefix, batch: int) -> None:
        tokens = [int(t) for t in (prefix.tolist() if isinstance(prefix, torch.Tensor) else prefix)]
        if not tokens:
            raise ValueError("prefix: expected at least one token")
        store, ps = self.store, self.store.page_size
        cache = store.prefix
        match = cache.match(tokens)
        pages = [int(p) for p in match.gpu_pages]
        if match.handle >= 0:
            cache.lock(match.handle)
            if match.host_tokens:
                ticket = cache.prefetch(match.handle)
                ticket.wait()
                pages += [int(p) for p in ticket.gpu_pages]
        reuse = min(len(pages), len(tokens) // ps)
        self._tables, self._lens = [pages[:reuse]], [reuse * ps]
        self._set_seen(reuse * ps)
        self.reused_prefix_tokens = reuse * ps
        rest = tokens[reuse * ps:]
        if rest:
            with torch.no_grad():
                model(input_ids=torch.tensor([rest], device=store.device), cache=self, use_cache=True)
        full = len(tokens) // ps
        cache.insert(tokens, self._tables[0][:full])
        self._owned.difference_update(self._tables[0][:full])
        held = cache.match(tokens)  # lock the whole inserted path (the old handle covered only the reused part)
        cache.lock(held.handle)
        if match.handle >= 0:
            cache.unlock(match.handle)
        self._handle = held.handle
        first = self._tables[0]
        self._tables = [first]
        for _ in range(batch - 1):
            row = first[:full]
            if len(first) > full:  # the partial last page: each row appends its own tokens into it
                (page,) = self._alloc(1)
                store.copy_page(first[full], page)
                row = row + [page]
            self._tables.append(row)
        self._lens = [len(tokens)] * batch
        self._shared = full if batch > 1 else 0
        self._plan_key = None

    def release(self) -> None:
        """Gives the pages back: the cached prefix stays in the store's PrefixCache (unlocked), all
        other pages are freed. The cache is empty afterwards."""
        if self._handle >= 0:
            self.store.prefix.unlock(self._handle)
            self._handle = -1
        if self._owned:
            self.store.prefix.free(sorted(self._owned))
        self._owned.clear()
        self._tables, self._lens, self._shared, self._plan_key = [], [], 0, None
        self._set_seen(0)

    def __enter__(self) -> "KVCoreCache":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("KVCoreCache: beam search (reorder_cache) is not supported")

    @property
    def seq_lens(self) -> list[int]:
        """Tokens held per row (padding excluded)."""
        return list(self._lens)

    # -- one step -------------------------------------------------------------------------------
    def _plan(self, mask: torch.Tensor | None, batch: int, q_len: int, seen: int, device) -> _Plan:
        """The step's slots and tables, made once per step (the first layer) and used by all."""
        key = (seen, q_len, batch)
        if self._plan_key == key:
            return self._plan_value
        if not self._tables:
            self._tables, self._lens = [[] for _ in range(batch)], [0] * batch
        elif len(self._tables) != batch:
            raise ValueError(f"batch: this KVCoreCache holds {len(self._tables)} rows, the input has {batch}")
        if mask is None:
            new = torch.ones((batch, q_len), dtype=torch.bool, device=device)
        else:
            if mask.shape[0] != batch or mask.shape[1] < seen + q_len:
                raise ValueError(f"attention_mask: expected [{batch}, {seen + q_len}] (cached + new tokens), "
                                 f"got {list(mask.shape)}")
            new = mask[:, seen:seen + q_len]
        counts = new.sum(1).tolist()
        ps = self.store.page_size
        slots: list[int] = []
        for b, n in enumerate(counts):
            start = self._lens[b]
            need = math.ceil((start + n) / ps) - len(self._tables[b])
            if need > 0:
                self._tables[b] += self._alloc(need)
            table = self._tables[b]
            slots += [table[p // ps] * ps + p % ps for p in range(start, start + n)]
            self._lens[b] = start + n
        width = max(1, max(len(t) for t in self._tables))
        table = torch.tensor([t + [0] * (width - len(t)) for t in self._tables], dtype=torch.int32, device=device)
        seq_lens = torch.tensor(self._lens, dtype=torch.int32, device=device)
        cu = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
        decode = q_len == 1 and all(n == 1 for n in counts)
        shared = None
        if decode and self._shared:
            sp = self._shared
            shared = (table[:1, :sp].contiguous(),
                      torch.tensor([sp * ps], dtype=torch.int32, device=device),
                      torch.tensor([0, batch], dtype=torch.int32, device=device),
                      table[:, sp:].contiguous() if width > sp else table[:, :1].contiguous(),
                      seq_lens - sp * ps)
        plan = _Plan(new.reshape(-1).nonzero().squeeze(1),
                     torch.tensor(slots, dtype=torch.int64, device=device), table, seq_lens, cu, decode, shared)
        self._plan_key, self._plan_value = key, plan
        return plan

    def _attend(self, step: _StepKV, query: torch.Tensor, mask, scaling, window, soft_cap):
        b, hq, t, d = query.shape
        plan = self._plan(mask, b, t, step.seen, query.device)
        layer = self.store.layers[step.layer]
        dt = self.store.kv_dtype

        def rows(x):  # [B, H, T, D] -> the real tokens, [n, H, D]
            return x.transpose(1, 2).reshape(b * t, x.shape[1], d)[plan.rows].to(dt)

        layer.append(rows(step.key), rows(step.value), plan.slots)
        q = rows(query)
        options = {"scale": scaling, "window": window, "soft_cap": soft_cap}
        if plan.shared is not None:
            o = layer.shared_prefix_decode(q, *plan.shared, **options)
        elif plan.decode:
            o = layer.decode(q, plan.table, plan.seq_lens, **options)
        else:
            o = layer.prefill(q, plan.table, plan.seq_lens, plan.cu, **options)
        out = query.new_zeros((b * t, hq, d))
        out[plan.rows] = o.to(query.dtype)
        return out.view(b, t, hq, d), None
