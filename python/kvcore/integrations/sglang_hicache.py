"""kvcore as an SGLang HiCache storage backend (the L3 tier under SGLang's GPU and host caches).

    python -m sglang.launch_server --model-path MODEL --enable-hierarchical-cache \\
      --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
      '{"backend_name": "kvcore", "module_path": "kvcore.integrations.sglang_hicache",
        "class_name": "KVCoreHiCacheStorage", "capacity_bytes": 64000000000}'

Written against SGLang 0.5.x: `HiCacheStorage` in python/sglang/srt/mem_cache/hicache_storage.py
(get / batch_get / set / batch_set / exists / batch_exists / clear / get_stats, the zero-copy
batch_get_v1 / batch_set_v1 over the registered host pool, register_mem_pool_host) and the
"dynamic" backend of python/sglang/srt/mem_cache/storage/backend_factory.py, which constructs
`class_name(storage_config, kwargs)`.

Pages live in one host buffer [capacity, page_bytes] (sized at the first write, from the page SGLang
passes) and are copied with `kvcore.copy_pages`; their page hash keys index kvcore's PrefixCache. SGLang's
keys are chained (each page's hash covers its prefix, `extra_info.prefix_keys` are the pages before
a run), so a run of keys is a path of the radix tree: under capacity pressure pages are evicted
leaves first and, with the "hot" policy, coldest first by decayed hit count (gets and exists hits),
so a hot shared prefix survives one-off prompts. extra_config: `capacity_bytes` or `capacity_pages`,
`policy` ("hot" or "lru"), `half_life` (seconds). Values must be whole pages of one size.
"""

from __future__ import annotations

from typing import Any, List, Optional

import numpy as np
import torch

import kvcore

from ._keyed import KeyedPages

try:  # SGLang's base class when it is installed; the same interface otherwise
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage as _Base
except ImportError:  # pragma: no cover - exercised where SGLang is absent
    _Base = object

__all__ = ["KVCoreHiCacheStorage"]


def _flat_bytes(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor page, got {type(value).__name__}")
    if value.device.type != "cpu":
        raise ValueError(f"{name}: HiCache pages are host tensors, got one on {value.device}")
    return value.contiguous().view(-1).view(torch.uint8)


class KVCoreHiCacheStorage(_Base):
    """SGLang HiCacheStorage over kvcore host pages and PrefixCache (see the module docstring)."""

    def __init__(self, storage_config: Any = None, kwargs: Optional[dict] = None):
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        extra.update({k: v for k, v in (kwargs or {}).items() if k in ("capacity_bytes", "capacity_pages")})
        if extra.get("capacity_pages") is None and extra.get("capacity_bytes") is None:
            raise ValueError("capacity_bytes: give capacity_bytes or capacity_pages in the storage extra_config")
        self.config = storage_config
        self._capacity_pages = extra.get("capacity_pages")
        self._capacity_bytes = extra.get("capacity_bytes")
        self._policy = str(extra.get("policy", "hot"))
        self._half_life = float(extra.get("half_life", 600.0))
        self._store: KeyedPages | None = None
        self._pages: np.ndarray | None = None   # [capacity, page_bytes] uint8
        self.page_bytes = 0
        self.sets = self.rejected = 0

    # -- the store, made at the first write (SGLang decides the page size) ---------------------
    def _ensure(self, page_bytes: int) -> None:
        if self._pages is not None:
            if page_bytes != self.page_bytes:
                raise ValueError(f"value: pages are {self.page_bytes} bytes in this store, got {page_bytes}")
            return
        if self._capacity_pages is not None:
            pages = int(self._capacity_pages)
        else:
            pages = int(self._capacity_bytes) // page_bytes
        if pages < 1:
            raise ValueError(f"capacity_bytes: {self._capacity_bytes} holds no page of {page_bytes} bytes")
        self._store = KeyedPages(pages, policy=self._policy, half_life=self._half_life)
        self._pages = np.empty((pages, page_bytes), np.uint8)
        self.page_bytes = page_bytes

    @staticmethod
    def _prefix(extra_info: Any) -> Any:
        keys = getattr(extra_info, "prefix_keys", None)
        return keys[-1] if keys else None

    def _put(self, keys: List[str], values: List[torch.Tensor], parent: Any = None, name: str = "values") -> List[bool]:
        flats = [_flat_bytes(v, name) for v in values]
        if len(flats) != len(keys):
            raise ValueError(f"values: {len(flats)} pages for {len(keys)} keys")
        if not keys:
            return []
        for f in flats:
            self._ensure(int(f.numel()))
        try:
            new, pages, _ = self._store.put(keys, parent=parent)
        except MemoryError:
            self.rejected += len(keys)
            return [False] * len(keys)
        slot = dict(zip(new, pages))
        src = [i for i, k in enumerate(keys) if k in slot and keys.index(k) == i]
        if src:
            stacked = torch.stack([flats[i] for i in src]).numpy()
            kvcore.copy_pages(stacked, self._pages, np.arange(len(src), dtype=np.int64),
                              np.array([slot[keys[i]] for i in src], np.int64))
        self.sets += len(src)
        return [True] * len(keys)

    def _get_into(self, key: str, target: torch.Tensor) -> bool:
        if self._store is None or not self._store.lookup(key):
            return False
        flat = _flat_bytes(target, "target_location")
        if not target.is_contiguous() or flat.numel() != self.page_bytes:
            raise ValueError(f"target_location: expected a contiguous page of {self.page_bytes} bytes, "
                             f"got {flat.numel()} bytes")
        self._read(key, flat)
        return True

    def _read(self, key: str, flat: torch.Tensor) -> None:
        kvcore.copy_pages(self._pages, flat.numpy().reshape(1, -1), np.array([self._store.page(key)], np.int64),
                          np.zeros(1, np.int64))

    # -- HiCacheStorage -------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        self.mem_pool_host = mem_pool_host

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        if target_location is None:
            if self._store is None or not self._store.lookup(key):
                return None
            target_location = torch.empty(self.page_bytes, dtype=torch.uint8)
            self._read(key, target_location)
            return target_location
        return target_location if self._get_into(key, target_location) else None

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None):
        targets = target_locations if target_locations is not None else [None] * len(keys)
        if len(targets) != len(keys):
            raise ValueError(f"target_locations: {len(targets)} for {len(keys)} keys")
        return [self.get(k, t) for k, t in zip(keys, targets)]

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self._put([key], [value], name="value")[0]

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        if values is None:
            raise ValueError("values: batch_set needs the pages to store")
        return all(self._put(list(keys), list(values)))

    def exists(self, key: str) -> bool:
        return self._store is not None and self._store.lookup(key)

    def batch_exists(self, keys: List[str], extra_info: Optional[Any] = None) -> int:
        if self._store is not None:  # the chain later writes of these pages hang below
            self._store.link(list(keys), parent=self._prefix(extra_info))
        for i, key in enumerate(keys):
            if not self.exists(key):
                return i
        return len(keys)

    def _host_pages(self, keys: List[str], host_indices: torch.Tensor) -> tuple[Any, List[int]]:
        """The registered host pool and the first host slot of each key's page."""
        pool = getattr(self, "mem_pool_host", None)
        if pool is None:
            raise RuntimeError("register_mem_pool_host: must be called before the zero-copy batch_*_v1 calls")
        ps = int(getattr(pool, "page_size", 1) or 1)
        if host_indices.numel() != len(keys) * ps:
            raise ValueError(f"host_indices: expected {len(keys) * ps} slots for {len(keys)} pages, "
                             f"got {host_indices.numel()}")
        return pool, [int(host_indices[i * ps]) for i in range(len(keys))]

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Optional[Any] = None) -> List[bool]:
        pool, slots = self._host_pages(keys, host_indices)
        out = []
        for key, slot in zip(keys, slots):
            page = pool.get_dummy_flat_data_page()
            ok = self._get_into(key, page)
            if ok:
                pool.set_from_flat_data_page(slot, page)
            out.append(ok)
        return out

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Optional[Any] = None) -> List[bool]:
        pool, slots = self._host_pages(keys, host_indices)
        values = [pool.get_data_page(slot, flat=True) for slot in slots]
        return self._put(list(keys), values, parent=self._prefix(extra_info))

    def clear(self) -> bool:
        if self._store is not None:
            self._store.clear()
        return True

    def get_stats(self):
        if self._store is None:
            return None
        return {**self._store.prefix.stats(), "hits": self._store.hits, "misses": self._store.misses,
                "pages_written": self.sets, "writes_rejected": self.rejected}
