"""Hash-keyed pages over kvcore's PrefixCache, for engines that name offloaded pages by chained block
hashes (vLLM's OffloadKey, SGLang's HiCache page keys) instead of token ids.

Each key is one page of a PrefixCache with `page_tokens=1` whose token is the key's interned id, and a
key's path is its parent's path plus itself, so a prefix run of keys is a path of the radix tree and
eviction is tree-constrained: leaves first, coldest first ("hot": decayed hit count; "lru": last access).
The cache's first tier is the store itself (the engine owns the GPU copy and its own GPU prefix cache).
Only kvcore is imported: the adapters bring the engine and torch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable, Sequence

import kvcore

__all__ = ["KeyedPages"]


class KeyedPages:
    """Args:
      capacity: pages in the store (page ids [0, capacity)).
      policy, half_life: as `kvcore.PrefixCache`.
    """

    _ID_LIMIT = 2**31  # token ids are int32

    def __init__(self, capacity: int, policy: str = "hot", half_life: float = 600.0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity: expected a positive number of pages, got {capacity!r}")
        self.capacity, self.policy = capacity, policy
        self.prefix = kvcore.PrefixCache(1, capacity, 0, policy=policy, half_life=half_life)
        # Token ids are never reused within a namespace (the tree keeps a page's history by its
        # path); when they run out, new paths start in the next namespace.
        self._ns, self._next_id = 0, 0
        self._ids: dict[Hashable, int] = {}             # stored key -> token id
        self._by_id: dict[tuple[int, int], Hashable] = {}  # (namespace, token id) -> stored key
        self._ns_of: dict[Hashable, int] = {}           # stored key -> namespace of its path
        self._parent: OrderedDict = OrderedDict()       # key -> parent key, learned from runs
        self._path: dict[Hashable, tuple[int, ...]] = {}  # resident key -> its tree path
        self._page: dict[Hashable, int] = {}            # resident key -> page id
        self._key: dict[int, Hashable] = {}             # page id -> resident key
        self._locks: dict[Hashable, list[int]] = {}     # key -> handles locked for it
        self.hits = self.misses = 0

    # -- keys and paths -----------------------------------------------------------------------
    def _id(self, key: Hashable) -> int:
        tid, self._next_id = self._next_id, self._next_id + 1
        self._ids[key], self._ns_of[key] = tid, self._ns
        self._by_id[(self._ns, tid)] = key
        return tid

    def link(self, keys: Sequence[Hashable], parent: Hashable | None = None) -> None:
        """Records that keys is a run of consecutive pages (each key the child of the one before),
        the first one following `parent` if given."""
        prev = parent
        for key in keys:
            if prev is not None:
                self._parent[key] = prev
                self._parent.move_to_end(key)
            prev = key
        while len(self._parent) > 8 * self.capacity:  # links of long-gone keys are relearned
            self._parent.popitem(last=False)

    @property
    def parents(self):
        """key -> parent key, as learned."""
        return self._parent

    def __contains__(self, key: Hashable) -> bool:
        return key in self._page

    def page(self, key: Hashable) -> int:
        try:
            return self._page[key]
        except KeyError:
            raise KeyError(f"keys: {key!r} is not in the store") from None

    def __len__(self) -> int:
        return len(self._page)

    # -- engine calls -------------------------------------------------------------------------
    def lookup(self, key: Hashable) -> bool:
        """Whether key is stored; a hit counts for its path's hotness."""
        path = self._path.get(key)
        hit = path is not None and self.prefix.match(path, self._ns_of[key]).gpu_tokens == len(path)
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        return hit

    def lock(self, key: Hashable) -> None:
        """Protects key's path from eviction (a load or store in flight) until unlock(key)."""
        path = self._path.get(key)
        if path is None:
            raise KeyError(f"keys: {key!r} is not in the store")
        handle = self.prefix.match(path, self._ns_of[key]).handle
        self.prefix.lock(handle)
        self._locks.setdefault(key, []).append(handle)

    def unlock(self, key: Hashable) -> None:
        handles = self._locks.get(key)
        if not handles:
            raise KeyError(f"keys: {key!r} is not locked")
        self.prefix.unlock(handles.pop())
        if not handles:
            del self._locks[key]

    def _forget(self, pages: Iterable[int]) -> list:
        gone = []
        for page in pages:
            key = self._key.pop(int(page), None)
            if key is not None:
                del self._page[key], self._path[key]
                del self._by_id[(self._ns_of.pop(key), self._ids.pop(key))]
                gone.append(key)
        return gone

    def put(self, keys: Sequence[Hashable], parent: Hashable | None = None) -> tuple[list, list[int], list]:
        """Makes room for the run `keys` (child of `parent`, if given, else of the parent link()
        learned). Returns (new keys, their page ids, keys evicted to make room); keys already stored
        are not new. Raises MemoryError, store unchanged, when locked pages leave too little room."""
        keys = list(keys)
        if parent is not None and keys:
            self.link(keys[:1], parent)
        self.link(keys)
        new = list(dict.fromkeys(k for k in keys if k not in self._page))
        if not new:
            return [], [], []
        # A run hangs below its parent only while the parent is stored (a path is cached from its
        # root); otherwise it starts a root of its own. Stored keys of the run and the parent are
        # locked so that making room cannot evict the nodes the run is inserted under.
        first_parent = self._parent.get(keys[0])
        held = [k for k in dict.fromkeys([first_parent, *keys]) if k in self._page]
        for k in held:
            self.lock(k)
        try:
            pages = self.prefix.alloc(len(new)).tolist()
        finally:
            for k in held:
                self.unlock(k)
        evicted = self._forget(pages)
        fresh = dict(zip(new, pages))
        if self._next_id + len(new) > self._ID_LIMIT:
            self._ns, self._next_id = self._ns + 1, 0
        # New pages extend a path only in the current namespace (an older one may hold their ids).
        path = list(self._path.get(first_parent, ())) if self._ns_of.get(first_parent) == self._ns else []
        grew = False
        for key in keys:
            if key in self._page:  # already stored: continue below its own node
                if grew:
                    self._insert(path)
                same = self._ns_of[key] == self._ns
                path, grew = (list(self._path[key]) if same else []), False
                continue
            path.append(self._id(key))
            self._path[key] = tuple(path)
            self._page[key] = fresh[key]
            self._key[fresh[key]] = key
            grew = True
        if grew:
            self._insert(path)
        return new, pages, evicted

    def _insert(self, path: list[int]) -> None:
        ns = self._ns
        self.prefix.insert(path, [self._page[self._by_id[(ns, t)]] for t in path], namespace=ns)

    def clear(self) -> None:
        """Drops every page (locks included): a fresh, empty store."""
        self.__init__(self.capacity, self.policy)
