"""A minimal serving engine whose KV cache and attention are kvcore's (the worked example of how a
serving framework wires kvcore in).

- KV lives in VirtualTensors carved from one PagePool: per layer a paged cache
  [kv_pages, 2, page_size, Hkv, D] (bf16) or INT4 codes/params; VMM pages are mapped as KV pages
  are handed out.
- A PrefixCache owns the KV page ids: requests reuse earlier requests' prefixes (GPU hits, or host
  hits prefetched back), and under memory pressure pages are offloaded to a host tier by a
  PagedKVMover.
- New tokens are written with append_kv / append_kv_int4; prompts run paged_prefill on top of the
  cached prefix; generation runs paged_decode, or shared_prefix_decode when the whole batch shares
  leading pages (a system prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

import kvcore

from .model import TinyLlama


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    shared_prefix_steps: int = 0
    page_uses: int = 0           # sum over requests and steps of pages referenced
    distinct_pages: int = 0      # the same, counting shared pages once
    extra: dict = field(default_factory=dict)


class KVCoreEngine:
    def __init__(self, model: TinyLlama, *, kv_pages: int, host_pages: int, page_size: int = 16,
                 int4: bool = False, policy: str = "hot", vmm_page_bytes: int | None = None):
        c = model.cfg
        self.model, self.page_size, self.int4 = model, page_size, int4
        self.device = str(model.device)
        dev = "cuda" if model.device.type == "cuda" else "cpu"
        d, h = c.head_dim, c.kv_heads
        if int4:
            codes_shape, params_shape = kvcore.int4_cache_shapes(kv_pages, page_size, h, d)
            layout = [(codes_shape, "uint8"), (params_shape, "float16")] * 2  # K codes, K params, V codes, V params
        else:
            layout = [((kv_pages, 2, page_size, h, d), "bfloat16")]
        bytes_per_layer = sum(int(np.prod(s)) * {"uint8": 1, "float16": 2, "bfloat16": 2}[t] for s, t in layout)
        self.kv_bytes_per_token = bytes_per_layer * c.layers // (kv_pages * page_size)
        probe = kvcore.PagePool(dev, 0)
        page_bytes = vmm_page_bytes or probe.granularity * max(1, (64 << 10) // probe.granularity)
        del probe
        tensors_bytes = sum(math.ceil(int(np.prod(s)) * {"uint8": 1, "float16": 2, "bfloat16": 2}[t] / page_bytes)
                            * page_bytes for s, t in layout) * c.layers
        self.pool = kvcore.PagePool(dev, tensors_bytes, page_bytes=page_bytes)
        self.vts = [[kvcore.VirtualTensor(self.pool, s, t) for s, t in layout] for _ in range(c.layers)]
        self.views = [[torch.from_dlpack(vt) for vt in layer] for layer in self.vts]
        self.host = [[torch.zeros((host_pages,) + tuple(v.shape[1:]), dtype=v.dtype) for v in layer]
                     for layer in self.views]
        if dev == "cuda":
            self.host = [[t.pin_memory() for t in layer] for layer in self.host]
        mover = kvcore.PagedKVMover([v for layer in self.views for v in layer], [t for layer in self.host for t in layer])
        self.cache = kvcore.PrefixCache(page_size, kv_pages, host_pages, policy=policy,
                                        page_bytes=bytes_per_layer * c.layers // kv_pages, mover=mover)
        self.bytes_per_kv_page = [[int(np.prod(v.shape[1:])) * v.element_size() for v in layer] for layer in self.views]
        self.signs = torch.from_numpy(kvcore.random_signs(d)).to(model.device) if int4 else None
        self.stats = EngineStats()

    # --- pages -----------------------------------------------------------------------------------
    def _map(self, pages) -> None:
        """Maps the VMM pages behind newly handed-out KV pages (a VirtualTensor maps on demand)."""
        for layer_vts, layer_bytes in zip(self.vts, self.bytes_per_kv_page):
            for vt, kv_page_bytes in zip(layer_vts, layer_bytes):
                for p in pages:
                    first = int(p) * kv_page_bytes // vt.page_bytes
                    last = ((int(p) + 1) * kv_page_bytes - 1) // vt.page_bytes
                    for vmm_page in range(first, last + 1):
                        if not vt.is_mapped(vmm_page):
                            vt.map(vmm_page, 1)

    def _slots(self, table: list[int], positions: range) -> list[int]:
        return [table[p // self.page_size] * self.page_size + p % self.page_size for p in positions]

    # --- attention over the engine's caches ----------------------------------------------------
    def _append(self, layer: int, k, v, slots) -> None:
        views, slots = self.views[layer], torch.tensor(slots, dtype=torch.int64, device=self.model.device)
        if self.int4:
            kvcore.append_kv_int4(k, v, views[0], views[1], views[2], views[3], slots, signs=self.signs)
        else:
            kvcore.append_kv(k, v, views[0][:, 0], views[0][:, 1], slots)

    def _kv_args(self, layer: int):
        views = self.views[layer]
        return tuple(views) if self.int4 else (views[0][:, 0], views[0][:, 1])

    def _prefill(self, layer, q, table, seq_lens, cu):
        if self.int4:
            return kvcore.paged_prefill_int4(q, *self._kv_args(layer), table, seq_lens, cu, signs=self.signs)
        return kvcore.paged_prefill(q, *self._kv_args(layer), table, seq_lens, cu)

    def _decode(self, layer, q, tables, seq_lens, shared_pages: int):
        dev = self.model.device
        if shared_pages:  # the whole batch shares its leading pages: read them once
            self.stats.shared_prefix_steps += layer == 0
            prefix = torch.tensor([tables[0][:shared_pages]], dtype=torch.int32, device=dev)
            prefix_lens = torch.tensor([shared_pages * self.page_size], dtype=torch.int32, device=dev)
            indptr = torch.tensor([0, len(tables)], dtype=torch.int32, device=dev)
            suffix = _table([t[shared_pages:] for t in tables], dev)
            suffix_lens = seq_lens - shared_pages * self.page_size
            fn = kvcore.shared_prefix_decode_int4 if self.int4 else kvcore.shared_prefix_decode
            extra = {"signs": self.signs} if self.int4 else {}
            return fn(q, *self._kv_args(layer), prefix, prefix_lens, indptr, suffix, suffix_lens, **extra)
        if self.int4:
            return kvcore.paged_decode_int4(q, *self._kv_args(layer), _table(tables, dev), seq_lens, signs=self.signs)
        return kvcore.paged_decode(q, *self._kv_args(layer), _table(tables, dev), seq_lens)

    # --- serving ---------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], new_tokens: int, now: float):
        """Greedy generation for a batch; returns (tokens per request, logits [B, new_tokens, vocab])."""
        m, dev, ps = self.model, self.model.device, self.page_size
        reqs = []
        for prompt in prompts:
            match = self.cache.match(prompt, now=now)
            pages = list(match.gpu_pages)
            if match.handle >= 0:
                self.cache.lock(match.handle)
                if match.host_tokens:
                    pages += list(self.cache.prefetch(match.handle, now=now).gpu_pages)
            reuse = min(len(pages), (len(prompt) - 1) // ps)  # always compute the last prompt token
            pages = pages[:reuse]
            need = math.ceil((len(prompt) + new_tokens) / ps) - reuse
            fresh = [int(p) for p in self.cache.alloc(need, now=now)]
            self._map(fresh)
            reqs.append({"handle": match.handle, "table": pages + fresh, "fresh": set(fresh),
                         "cached": reuse * ps, "prompt": list(prompt), "out": [], "logits": []})
            self.stats.prompt_tokens += len(prompt)
            self.stats.computed_prompt_tokens += len(prompt) - reuse * ps

        # Prefill the uncached part of every prompt in one ragged batch.
        toks, pos, slots, cu = [], [], [], [0]
        for r in reqs:
            span = range(r["cached"], len(r["prompt"]))
            toks += r["prompt"][r["cached"]:]
            pos += list(span)
            slots += self._slots(r["table"], span)
            cu.append(cu[-1] + len(span))
        seq_lens = torch.tensor([len(r["prompt"]) for r in reqs], dtype=torch.int32, device=dev)
        tables = [r["table"] for r in reqs]
        x = m.embed_tokens(torch.tensor(toks, device=dev))
        positions = torch.tensor(pos, device=dev)
        cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
        for layer in range(m.cfg.layers):
            q, k, v = m.qkv(layer, x, positions)
            self._append(layer, k, v, slots)
            x = m.finish_layer(layer, x, self._prefill(layer, q, _table(tables, dev), seq_lens, cu_t))
        logits = m.logits(x[torch.tensor(cu[1:], device=dev) - 1])
        self._take(reqs, logits)

        # Decode: one token per request per step.
        shared = _common_pages(tables, min(len(r["prompt"]) for r in reqs) // ps) if len(reqs) > 1 else 0
        for _ in range(new_tokens - 1):
            lens = [len(r["prompt"]) + len(r["out"]) for r in reqs]
            pos_t = torch.tensor([n - 1 for n in lens], device=dev)
            x = m.embed_tokens(torch.tensor([r["out"][-1] for r in reqs], device=dev))
            slots = [self._slots(r["table"], range(n - 1, n))[0] for r, n in zip(reqs, lens)]
            seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            for layer in range(m.cfg.layers):
                q, k, v = m.qkv(layer, x, pos_t)
                self._append(layer, k, v, slots)
                x = m.finish_layer(layer, x, self._decode(layer, q, tables, seq_lens, shared))
            self._take(reqs, m.logits(x))
            self.stats.decode_steps += 1
            used = [math.ceil(n / ps) for n in lens]
            self.stats.page_uses += sum(used)
            self.stats.distinct_pages += sum(used) - shared * (len(reqs) - 1)

        # Cache what was computed (prompt + generated tokens but the last), give back the rest.
        for r in reqs:
            kept = r["prompt"] + r["out"][:-1]
            full = len(kept) // ps
            already = self.cache.insert(kept, r["table"][:full], now=now) // ps
            duplicates = [p for p in r["table"][:already] if p in r["fresh"]]
            leftovers = r["table"][full:]
            self.cache.free(duplicates + leftovers)
            if r["handle"] >= 0:
                self.cache.unlock(r["handle"])
            self.stats.generated_tokens += len(r["out"])
        return [r["out"] for r in reqs], torch.stack([torch.stack(r["logits"]) for r in reqs])

    @staticmethod
    def _take(reqs, logits) -> None:
        for r, row in zip(reqs, logits):
            r["logits"].append(row.float())
            r["out"].append(int(row.argmax()))


def _table(tables: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(t) for t in tables))
    rows = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _common_pages(tables: list[list[int]], limit: int) -> int:
    """Leading page ids shared by every table (at most `limit`, the full pages of the shortest prompt)."""
    n = 0
    while n < limit and all(t[n] == tables[0][n] for t in tables):
        n += 1
    return n
