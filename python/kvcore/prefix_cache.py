"""Hotness-aware prefix cache with GPU and host tiers.

A radix tree over token sequences in units of `page_tokens` tokens (one node per full page; a
partial last page is never cached), with one root per namespace (model, adapter, tenant). Each
node knows its GPU page, its host slot, a lock count and a decayed hotness. Eviction is
tree-constrained (leaves first) and ordered in O(log n) sets: `lru` by last access (the SGLang-style
baseline, writing every evicted page to the host) or `hot`: GPU pages by decayed hit count
H = H * 2**(-dt / half_life) + 1, host pages by last access, and host admission limited to pages
with a reuse history whose hotness reaches a threshold (a ghost list of recently rejected pages gives
a page requested again its history back), plus first-seen pages while a host-write budget has room
(whole inserted runs, since a page is useless on the host without its parent) and their reuse class
(the label `insert` gets) has shown a reuse rate near the cache's: the rates are learned online
from which first-seen pages are requested again.

The cache owns the GPU page ids [0, gpu_pages): `alloc` hands free ones to the engine (evicting as
needed), `insert` adopts them into the tree, `free` returns unused ones. Standalone it works over
abstract ids (simulation, trace replay); with a mover (e.g. `PagedKVMover`) evictions and prefetches
also move the bytes. `now` arguments are seconds on any monotonic clock (default: the steady clock).
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple, Sequence

import numpy as np

from ._native import C as _C
from .kv_cache import copy_pages

__all__ = ["PagedKVMover", "PrefixCache", "PrefixMatch", "PrefetchTicket"]


class PrefixMatch(NamedTuple):
    gpu_pages: np.ndarray   # int64 ids of the GPU-resident run of the match
    gpu_tokens: int         # tokens cached on the GPU
    host_tokens: int        # tokens cached on the host right after them (prefetch() brings them back)
    handle: int             # the deepest matched node (-1: nothing matched), for lock/unlock/prefetch/pin


class PrefetchTicket:
    """Host-resident pages of a path brought back to the GPU; the copies are ordered on the
    mover's stream, `wait()` blocks until they are complete."""

    def __init__(self, cache: "PrefixCache", pages: int, token: int, gpu_pages: np.ndarray):
        self._cache, self.pages, self._token, self.gpu_pages = cache, pages, token, gpu_pages

    def done(self) -> bool:
        return self._cache._native.prefetch_done(self._token)

    def wait(self) -> None:
        self._cache._native.prefetch_wait(self._token)


def _tokens(tokens: Any) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim == 1 and arr.size == 0:
        return np.zeros(0, np.int32)  # an empty prompt ([] is float64 to numpy)
    arr = np.ascontiguousarray(arr) if arr.ndim == 1 else arr  # (ascontiguousarray makes 0-d 1-d)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"tokens: expected a 1-D sequence of integers, got {arr.dtype} with shape {arr.shape}")
    if arr.size and (arr.min() < -2**31 or arr.max() >= 2**31):
        raise ValueError("tokens: token ids must fit in int32")
    return arr.astype(np.int32, copy=False)


def _int64(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if not -2**63 <= int(value) < 2**63:
        raise ValueError(f"{name}: {value} does not fit in int64")
    return int(value)


def _pages(pages: Any, name: str) -> np.ndarray:
    arr = np.asarray(pages)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name}: expected a 1-D sequence of integer page ids")
    return np.ascontiguousarray(arr).astype(np.int64, copy=False)


class PrefixCache:
    """Args:
      page_tokens: tokens per page (the unit of caching).
      gpu_pages, host_pages: capacity of each tier in pages.
      policy: "hot" (default) or "lru".
      half_life: seconds for the hotness decay.
      page_bytes: bytes per page (all layers), for the transfer statistics.
      ghost_pages: size of the ghost list (default: host_pages).
      admission_threshold: "hot": the decayed hotness a page with a reuse history needs for host
        admission (initially).
      adaptive: "hot": adapt that threshold (ghost hits lower it, host pages evicted unused raise it).
      host_write_budget: "hot": host writes per queried page that first-seen pages may use on
        average (None or inf: admit every first-seen page; 0: only pages with a reuse history).
      class_gate: "hot": first-seen runs of a reuse class whose learned reuse rate is below
        class_gate times the cache-wide rate are not admitted (0: no gate).
      mover: an object with offload(gpu_pages, host_slots), load(host_slots, gpu_pages) -> token,
        done(token) and wait(token) that moves the bytes; None for a standalone cache.
    """

    def __init__(self, page_tokens: int, gpu_pages: int, host_pages: int = 0, policy: str = "hot",
                 half_life: float = 600.0, page_bytes: int = 0, ghost_pages: int = 0,
                 admission_threshold: float = 1.5, adaptive: bool = False,
                 host_write_budget: float | None = 0.3, class_gate: float = 0.5, mover: Any = None):
        # The mover lives here, where Python's GC sees it; the native cache only holds a proxy with a
        # weak reference back, so a mover that references this cache forms no uncollectable cycle.
        self._mover = mover
        proxy = None if mover is None else _MoverProxy(weakref.ref(self))
        self._native = _C.PrefixCache(int(page_tokens), int(gpu_pages), int(host_pages), str(policy),
                                      float(half_life), int(page_bytes), int(ghost_pages),
                                      float(admission_threshold), bool(adaptive),
                                      float("inf") if host_write_budget is None else float(host_write_budget),
                                      float(class_gate), proxy)
        self.page_tokens = int(page_tokens)
        self.policy = str(policy)

    def match(self, tokens: Sequence[int], namespace: int = 0, now: float | None = None) -> PrefixMatch:
        """The longest cached prefix of tokens (whole pages): its GPU run and the host run after it.
        Every matched page counts as a hit for hotness and LRU order."""
        return PrefixMatch(*self._native.match(_tokens(tokens), int(namespace), now))

    def lock(self, handle: int) -> None:
        """Protects the handle's path from eviction (pages used by a running request)."""
        self._native.lock(handle)

    def unlock(self, handle: int) -> None:
        self._native.unlock(handle)

    def insert(self, tokens: Sequence[int], gpu_pages: Sequence[int], namespace: int = 0,
               now: float | None = None, reuse_class: int = 0) -> int:
        """Caches the full pages of tokens, gpu_pages[i] backing page i (ids from alloc, or the
        tree's own ids for pages already cached). Returns the number of tokens already cached on the
        GPU: where your pages differ from the tree's for those, free your duplicates.
        reuse_class: any integer label for requests whose prompts are reused alike (application,
        endpoint, an output-length bucket); "hot" learns each class's reuse rate for admission."""
        return self._native.insert(_tokens(tokens), _pages(gpu_pages, "gpu_pages"), int(namespace), now,
                                   _int64(reuse_class, "reuse_class"))

    def alloc(self, n: int, now: float | None = None) -> np.ndarray:
        """n free GPU page ids, evicting cached pages as needed (MemoryError if impossible)."""
        return self._native.alloc(int(n), now)

    def free(self, pages: Sequence[int]) -> None:
        """Returns pages from alloc that were not inserted (or were duplicates)."""
        self._native.free(_pages(pages, "pages"))

    def evict(self, n_pages: int, now: float | None = None) -> np.ndarray:
        """Evicts up to n GPU pages (coldest leaves first; offloading those the policy admits);
        returns their ids, now free."""
        return self._native.evict(int(n_pages), now)

    def prefetch(self, handle: int, now: float | None = None) -> PrefetchTicket:
        """Brings the host-resident pages of the handle's path back to the GPU (as many as fit)."""
        pages, token, gpu_pages = self._native.prefetch(handle, now)
        return PrefetchTicket(self, pages, token, gpu_pages)

    def pin(self, handle: int, ttl: float, now: float | None = None) -> None:
        """Keeps the handle's path cached for ttl seconds (e.g. a system prompt)."""
        self._native.pin(handle, float(ttl), now)

    def resize(self, gpu_pages: int, now: float | None = None) -> np.ndarray:
        """Grows the GPU tier (returns the new page ids) or shrinks it, demoting the coldest pages
        first (returns the ids given back; MemoryError, capacity unchanged, when locked pages prevent
        it)."""
        return self._native.resize(int(gpu_pages), now)

    def attach_pool(self, pool: Any, release_pages) -> int:
        """Registers this cache as `pool`'s reclaim callback: when the pool shrinks by n physical pages,
        the cache gives back enough of its pages, and release_pages(ids) unmaps them and returns how
        many pool pages that freed."""
        def reclaim(pool_pages_needed: int) -> int:
            capacity = self.stats()["gpu"]["capacity_pages"]
            ids = self.resize(max(0, capacity - pool_pages_needed))
            return int(release_pages(ids) or 0)

        return pool.on_reclaim(reclaim)

    def stats(self) -> dict:
        """Per tier: hit tokens, capacity and occupancy, evictions; host writes, admissions rejected,
        ghost hits, first-seen pages admitted under the write budget or refused by the class gate,
        reuse classes seen and the admission threshold; queried and inserted tokens, bytes moved each
        way, prefetches used and wasted."""
        return self._native.stats()


class _MoverProxy:
    """Forwards the native cache's mover calls to its PrefixCache's mover."""

    def __init__(self, cache_ref: "weakref.ref[PrefixCache]"):
        self._cache_ref = cache_ref

    def _mover(self):
        cache = self._cache_ref()
        if cache is None:
            raise RuntimeError("the PrefixCache of this mover is gone")
        return cache._mover

    def offload(self, gpu_pages, host_slots):
        self._mover().offload(gpu_pages, host_slots)

    def load(self, host_slots, gpu_pages):
        return self._mover().load(host_slots, gpu_pages)

    def done(self, token):
        return self._mover().done(token)

    def wait(self, token):
        self._mover().wait(token)


class PagedKVMover:
    """Moves pages between GPU page caches and host page caches with copy_pages (one DMA per run of
    consecutive pages), on `stream`. gpu_caches and host_caches are matching lists of page-major
    arrays (e.g. every layer's K and V); copies are stream-ordered, so tokens are always complete."""

    def __init__(self, gpu_caches: Sequence[Any], host_caches: Sequence[Any], stream: Any = None):
        if len(gpu_caches) != len(host_caches):
            raise ValueError("host_caches: must match gpu_caches one to one")
        self.gpu_caches, self.host_caches, self.stream = list(gpu_caches), list(host_caches), stream

    def offload(self, gpu_pages, host_slots) -> None:
        src, dst = np.asarray(gpu_pages, np.int64), np.asarray(host_slots, np.int64)
        for g, h in zip(self.gpu_caches, self.host_caches):
            copy_pages(g, h, src, dst, stream=self.stream)

    def load(self, host_slots, gpu_pages) -> int:
        src, dst = np.asarray(host_slots, np.int64), np.asarray(gpu_pages, np.int64)
        for g, h in zip(self.gpu_caches, self.host_caches):
            copy_pages(h, g, src, dst, stream=self.stream)
        return 0

    def done(self, token: int) -> bool:
        return True

    def wait(self, token: int) -> None:
        return None
