"""Random sequences of PrefixCache operations against a brute-force Python model.

The model keeps the tree as a dict from (namespace, tuple of page values) to a node record: its GPU
page id (exactly known: every page that leaves the GPU comes back to the caller through the ids
alloc / evict / resize / prefetch return), whether it holds a host copy ("yes", "no" or "maybe"),
its lock count and its pin deadline; plus the GPU page ledger (free, held by the caller, cached,
removed by a shrink). Eviction order and host admission are the policy's business, so the model
does not predict them; it predicts what the documented invariants fix:

- how many pages an operation evicts (all GPU nodes that are unlocked and unpinned can go, leaves
  first), and whether alloc / resize / evict / prefetch succeed;
- that no locked or pinned page is evicted, the GPU-resident nodes stay prefix-closed, and no page
  id is handed out twice or leaked (free + held + cached == capacity);
- match: the GPU run is exactly the model's, the host run right after it reaches at least every
  node the model knows to be present and stops before the first node the model knows to be gone
  (a node evicted without a host copy may have been admitted to the host or dropped: "maybe" until
  a match, a handle or a prefetch tells);
- insert: which pages are adopted, which duplicates come back, the validation errors (in the
  library's check order);
- the bytes: a PagedKVMover over numpy page caches, where the "engine" stamps every page it inserts
  with its prefix; every GPU page the model knows must hold its node's stamp (prefetched pages
  included, so evictions and prefetches must move the right bytes);
- the statistics, exactly where the model knows the answer and within bounds where it does not.

At teardown everything is unlocked and evicted, the host-resident tree is read back by matches,
and the host slots in use must equal the nodes found (no slot leaked).
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kvcore

PT = 2               # tokens per page
PAGE_BYTES = 100     # for the byte statistics
ID_ROOM = 64         # rows of the numpy "GPU" page cache (ids grow with resize)
STAMP = 4            # int64 words per page in the numpy caches

pages_st = st.lists(st.integers(0, 2), max_size=4)  # page values: few, so prefixes are shared
ns_st = st.sampled_from([0, 0, 0, 1])


def page_tokens(v: int) -> list[int]:
    return [v, 10 + v]


def tokens_of(pages: tuple[int, ...], partial: int) -> np.ndarray:
    toks = [t for v in pages for t in page_tokens(v)] + [99] * partial
    return np.asarray(toks, dtype=np.int32)


def stamp(key) -> np.ndarray:
    ns, pages = key
    return np.asarray([ns + 1, len(pages), hash(pages) & 0x7FFFFFFFFFFF, 12345], dtype=np.int64)


class Node:
    """One tree node in the model. `host`: does it hold a host slot? For a node off the GPU that is
    also whether it exists at all; "maybe" after an eviction the model cannot see through."""

    def __init__(self, key, gpu: int | None, host: str):
        self.key, self.gpu, self.host = key, gpu, host
        self.lock = 0
        self.own_locks = 0  # lock() calls on handles of this node minus unlock() calls
        self.pin = -1.0
        self.dead = False


class PrefixCacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache = None

    @initialize(policy=st.sampled_from(["lru", "hot"]), gpu=st.integers(3, 8), host=st.sampled_from([0, 2, 5]),
                threshold=st.sampled_from([0.0, 0.0, 1.5, 3.0]), warm=st.lists(pages_st, max_size=3))
    def setup(self, policy, gpu, host, threshold, warm):
        self.policy, self.host_pages = policy, host
        self.gpu_cache = np.zeros((ID_ROOM, STAMP), np.int64)
        self.host_cache = np.zeros((max(host, 1), STAMP), np.int64)
        mover = kvcore.PagedKVMover([self.gpu_cache], [self.host_cache]) if host else None
        self.cache = kvcore.PrefixCache(PT, gpu, host, policy, half_life=5.0, page_bytes=PAGE_BYTES,
                                        admission_threshold=threshold, mover=mover)
        self.t = 1.0
        self.capacity = gpu
        self.id_space = gpu
        self.removed: set[int] = set()
        self.held: set[int] = set()
        self.nodes: dict = {}
        self.handles: list[tuple[int, Node]] = []
        # exact statistics
        self.queried = self.gpu_hit = self.host_hit = self.inserted = 0
        self.evictions = self.prefetched = 0
        # bounds: GPU evictions of nodes without a host copy are host writes or rejections
        self.wr_lo = self.wr_hi = 0
        for pages in warm:  # a few requests served, so that matches find something from the start
            self.serve(0, pages, 0, lock=True, prefetch=False, mode="engine", k=0)

    # --- model helpers ---------------------------------------------------------------------

    @staticmethod
    def path(ns: int, pages) -> list:
        pages = tuple(pages)
        return [(ns, pages[:i + 1]) for i in range(len(pages))]

    @staticmethod
    def parent(key):
        ns, pages = key
        return (ns, pages[:-1]) if len(pages) > 1 else None

    def cached_pages(self) -> dict[int, Node]:
        return {n.gpu: n for n in self.nodes.values() if n.gpu is not None}

    def free_ids(self) -> set[int]:
        return set(range(self.id_space)) - self.removed - self.held - set(self.cached_pages())

    def evictable(self, exclude=()) -> list[Node]:
        return [n for n in self.nodes.values()
                if n.gpu is not None and n.lock == 0 and n.pin <= self.t and n.key not in exclude]

    def present(self, n: Node) -> bool | None:
        """True: exists; False: gone; None: unknown."""
        if n.dead:
            return False
        if n.gpu is not None or n.host == "yes":
            return True
        return None

    def remove_subtree(self, key) -> None:
        ns, pages = key
        for k in [k for k in self.nodes if k[0] == ns and k[1][:len(pages)] == pages]:
            n = self.nodes.pop(k)
            assert n.gpu is None, f"model: removing {k} which is on the GPU"
            assert n.lock == 0, f"model: removing locked {k}"
            n.dead = True

    def confirm(self, key) -> None:
        """key exists in the cache: so do its ancestors."""
        while key is not None:
            n = self.nodes[key]
            if n.gpu is None:
                n.host = "yes"
            key = self.parent(key)

    def apply_evictions(self, pages) -> None:
        """`pages` left the GPU (evicted by the cache). Checks they were evictable; updates tiers."""
        cached = self.cached_pages()
        victims = [cached[p] for p in pages]
        for n in victims:
            assert n.lock == 0, f"locked node {n.key} was evicted (page {n.gpu})"
            assert n.pin <= self.t, f"pinned node {n.key} was evicted (pin until {n.pin}, now {self.t})"
        self.evictions += len(victims)
        for n in sorted(victims, key=lambda n: -len(n.key[1])):  # leaves first
            n.gpu = None
            if n.host != "yes":
                self.wr_hi += 1
                if n.host == "no":
                    self.wr_lo += 1
                if self.host_pages == 0:
                    self.remove_subtree(n.key)
                else:
                    n.host = "maybe"
        if victims and self.host_pages:
            # An admission may have evicted any unlocked, unpinned host-only node, and a dropped
            # node takes its host-only subtree with it.
            for n in self.nodes.values():
                if n.gpu is None and n.lock == 0 and n.pin <= self.t:
                    n.host = "maybe"
        self.check_prefix_closed()

    def check_prefix_closed(self) -> None:
        for key, n in self.nodes.items():
            p = self.parent(key)
            if p is not None:
                assert p in self.nodes, f"model: {key} has no parent"
                if n.gpu is not None:
                    assert self.nodes[p].gpu is not None, f"GPU-resident {key} below a non-GPU parent"

    def check_ids(self, ids, allowed: set[int], what: str) -> list[int]:
        ids = [int(x) for x in ids]
        assert len(set(ids)) == len(ids), f"{what} returned a page twice: {ids}"
        bad = set(ids) - allowed
        assert not bad, f"{what} handed out pages {sorted(bad)} that are held, locked, pinned or not in the tier"
        return ids

    def lock_path(self, key, delta: int) -> None:
        while key is not None:
            self.nodes[key].lock += delta
            key = self.parent(key)

    def pick_handle(self, i: int):
        """A recent handle most of the time (mostly live), any handle otherwise (often expired)."""
        if i % 4:
            return self.handles[-1 - (i // 4) % min(len(self.handles), 6)]
        return self.handles[(i // 4) % len(self.handles)]

    def raises(self, exc, fn, *args, match: str | None = None):
        try:
            fn(*args)
        except exc as e:
            if match is not None:
                assert match in str(e), f"{fn.__name__}{args}: {e}"
            return e
        raise AssertionError(f"{fn.__name__}{args} did not raise {exc.__name__}")

    def after_failed_make_free(self, cached_before: int) -> None:
        """alloc / resize raised MemoryError: either nothing was evicted (the state left intact) or,
        as the library does today, every evictable page was evicted on the way."""
        s = self.cache.stats()["gpu"]
        ev = self.evictable()
        if s["cached_pages"] == cached_before:
            return
        assert s["cached_pages"] == cached_before - len(ev), "a failed alloc/resize evicted some pages only"
        self.apply_evictions([n.gpu for n in ev])

    # --- operations shared by rules --------------------------------------------------------

    def do_match(self, ns: int, pages, partial: int = 0):
        toks = tokens_of(tuple(pages), partial)
        m = self.cache.match(toks, namespace=ns, now=self.t)
        keys = self.path(ns, pages)
        g = 0
        while g < len(keys) and keys[g] in self.nodes and self.nodes[keys[g]].gpu is not None:
            g += 1
        assert [int(p) for p in m.gpu_pages] == [self.nodes[k].gpu for k in keys[:g]], "GPU run differs"
        assert m.gpu_tokens == g * PT
        assert m.host_tokens % PT == 0
        top = g
        while top < len(keys) and keys[top] in self.nodes:
            top += 1
        known = g
        for i in range(g, top):
            if self.present(self.nodes[keys[i]]):
                known = i + 1
        d = g + m.host_tokens // PT
        assert known <= d <= top, (f"match({ns}, {pages}) found {d} pages ({g} on the GPU); the model "
                                   f"has {known} certainly and at most {top}")
        for i in range(g, d):
            self.nodes[keys[i]].host = "yes"
        if d < top:
            self.remove_subtree(keys[d])
        if d:
            assert m.handle >= 0
            self.handles.append((m.handle, self.nodes[keys[d - 1]]))
        else:
            assert m.handle == -1
        self.queried += len(toks)
        self.gpu_hit += m.gpu_tokens
        self.host_hit += m.host_tokens
        return m, keys, d

    def handle_op(self, fn, handle: int, node: Node, *args):
        """Runs fn(handle, *args) for a model node that may be gone; returns (ok, result)."""
        state = self.present(node)
        if state is False:
            self.raises(ValueError, fn, handle, *args, match="unknown or expired handle")
            return False, None
        try:
            out = fn(handle, *args)
        except ValueError as e:
            assert state is None and "unknown or expired handle" in str(e), f"{fn.__name__}: {e}"
            self.remove_subtree(node.key)
            return False, None
        if state is None:
            self.confirm(node.key)
        return True, out

    def do_alloc(self, n: int):
        free = self.free_ids()
        ev = self.evictable()
        cached_before = len(self.cached_pages())
        if n > len(free) + len(ev):
            self.raises(MemoryError, self.cache.alloc, n, self.t)
            self.after_failed_make_free(cached_before)
            return None
        ids = self.check_ids(self.cache.alloc(n, now=self.t), free | {x.gpu for x in ev}, "alloc")
        assert len(ids) == n
        evicted = [p for p in ids if p not in free]
        assert len(evicted) == max(0, n - len(free)), "alloc evicted more pages than it needed"
        self.apply_evictions(evicted)
        self.held.update(ids)
        return ids

    def do_prefetch(self, handle: int, node: Node):
        state = self.present(node)
        if state is False:
            self.raises(ValueError, self.cache.prefetch, handle, self.t, match="unknown or expired handle")
            return
        # Predicted as if the node exists (then so does its path); a gone node raises first.
        keys = self.path(*node.key)
        todo = [self.nodes[k] for k in keys if self.nodes[k].gpu is None]
        free = self.free_ids()
        ev = self.evictable(exclude=set(keys))
        k = min(len(todo), len(free) + len(ev))
        try:
            ticket = self.cache.prefetch(handle, now=self.t)
        except ValueError as e:
            assert state is None and "unknown or expired handle" in str(e), f"prefetch: {e}"
            self.remove_subtree(node.key)
            return
        self.confirm(node.key)
        ticket.wait()
        assert ticket.done()
        assert ticket.pages == k == len(ticket.gpu_pages), f"prefetch brought {ticket.pages} pages, model {k}"
        ids = self.check_ids(ticket.gpu_pages, free | {x.gpu for x in ev}, "prefetch")
        self.lock_path(node.key, +1)
        self.apply_evictions([p for p in ids if p not in free])
        self.lock_path(node.key, -1)
        for n, p in zip(todo, ids):
            n.gpu = p
            n.host = "yes"
        self.prefetched += k
        self.check_prefix_closed()

    def pin_path(self, key, until: float) -> None:
        while key is not None:
            self.nodes[key].pin = max(self.nodes[key].pin, until)
            key = self.parent(key)

    def predict_insert_error(self, keys, pages: list[int]):
        cached_gpu = 0
        while cached_gpu < len(keys) and keys[cached_gpu] in self.nodes and self.nodes[keys[cached_gpu]].gpu is not None:
            cached_gpu += 1
        for i in range(cached_gpu, len(keys)):
            p = pages[i]
            if not 0 <= p < self.id_space:
                return IndexError, cached_gpu
            if p not in self.held:
                return ValueError, cached_gpu
            if p in pages[cached_gpu:i]:
                return ValueError, cached_gpu
        return None, cached_gpu

    def do_insert(self, ns: int, pages_v, partial: int, gpu_pages: list[int]):
        keys = self.path(ns, pages_v)
        toks = tokens_of(tuple(pages_v), partial)
        err, cached_gpu = self.predict_insert_error(keys, gpu_pages)
        if err is not None:
            self.raises(err, self.cache.insert, toks, np.asarray(gpu_pages, np.int64), ns, self.t)
            return None
        assert all(k in self.nodes for k in keys[:cached_gpu])
        for k in keys:  # the caller resolved the path with a match: no unknown nodes on it
            assert k not in self.nodes or self.present(self.nodes[k]) is True
        for i in range(cached_gpu, len(keys)):  # the engine computed the KV of the pages it inserts
            self.gpu_cache[gpu_pages[i]] = stamp(keys[i])
        got = self.cache.insert(toks, np.asarray(gpu_pages, np.int64), namespace=ns, now=self.t)
        assert got == cached_gpu * PT, f"insert returned {got}, model {cached_gpu * PT}"
        for i in range(cached_gpu, len(keys)):
            k, p = keys[i], gpu_pages[i]
            if k in self.nodes:
                assert self.nodes[k].gpu is None
                self.nodes[k].gpu = p
            else:
                self.nodes[k] = Node(k, p, "no")
                self.inserted += PT
            self.held.discard(p)
        self.check_prefix_closed()
        return cached_gpu

    # --- rules -----------------------------------------------------------------------------

    @rule(ns=ns_st, pages=pages_st, partial=st.integers(0, PT - 1))
    def match(self, ns, pages, partial):
        self.do_match(ns, pages, partial)

    @rule(ns=ns_st, pages=pages_st, partial=st.integers(0, PT - 1), lock=st.booleans(),
          prefetch=st.booleans(), mode=st.sampled_from(["engine", "engine", "dup", "bad"]),
          k=st.integers(0, 10**6))
    def serve(self, ns, pages, partial, lock, prefetch, mode, k):
        """An engine's request: match, (lock, prefetch,) alloc the missing pages, insert, unlock,
        free the duplicates. `dup` passes fresh pages for the cached run too; `bad` passes random
        ids (mostly invalid)."""
        m, keys, d = self.do_match(ns, pages, partial)
        entry = self.handles[-1] if d else None
        if entry and lock:
            self.cache.lock(entry[0])
            self.lock_path(entry[1].key, +1)
            entry[1].own_locks += 1
        if entry and lock and prefetch and m.host_tokens:
            self.do_prefetch(*entry)
        tree = []  # the matched GPU run (after the prefetch), as the engine saw it
        for key in keys:
            if key not in self.nodes or self.nodes[key].gpu is None:
                break
            tree.append(self.nodes[key].gpu)
        gpu_pages = None
        if mode == "bad":
            rng = np.random.default_rng(k)
            gpu_pages = [int(x) for x in rng.integers(-2, self.id_space + 2, len(keys))]
        else:
            need = len(keys) - (0 if mode == "dup" else len(tree))
            short = need - len(self.held)
            ok = short <= 0 or self.do_alloc(short) is not None
            if ok and short > 0 and not lock:
                # The alloc may have evicted the unlocked matched path: look again (an engine that
                # does not lock passes the ids it saw; insert must catch the stale ones).
                self.do_match(ns, pages, partial)
            if ok:
                gpu_pages = (tree if mode == "engine" else []) + sorted(self.held)[:need]
        if gpu_pages is not None and len(gpu_pages) == len(keys):
            cached_gpu = self.do_insert(ns, pages, partial, gpu_pages)
            if cached_gpu is not None:  # free our duplicates (pages we passed for the cached run)
                # (each once: a `bad` call may list one held page at several cached positions)
                dups = list(dict.fromkeys(p for p in gpu_pages[:cached_gpu] if p in self.held))
                if dups:
                    self.cache.free(np.asarray(dups, np.int64))
                    self.held.difference_update(dups)
        if entry and lock:
            self.cache.unlock(entry[0])
            self.lock_path(entry[1].key, -1)
            entry[1].own_locks -= 1

    @rule(ns=ns_st, pages=pages_st.filter(lambda p: len(p) > 0), short=st.integers(1, 2))
    def insert_too_few_pages(self, ns, pages, short):
        gpu_pages = sorted(self.held)[:max(0, len(pages) - short)]
        self.raises(ValueError, self.cache.insert, tokens_of(tuple(pages), 0), np.asarray(gpu_pages, np.int64),
                    ns, self.t, match="entries")

    @rule(n=st.integers(-1, 8))
    def alloc(self, n):
        if n < 0:
            self.raises(ValueError, self.cache.alloc, n, self.t)
            return
        self.do_alloc(n)

    @rule(k=st.integers(0, 10**6), count=st.integers(0, 3), bad=st.sampled_from(["none", "range", "not_held", "twice"]))
    def free(self, k, count, bad):
        rng = np.random.default_rng(k)
        held = sorted(self.held)
        pages = [held[int(i)] for i in rng.permutation(len(held))[:count]]
        if bad == "range":
            pages.insert(int(rng.integers(0, len(pages) + 1)), int(rng.choice([-1, self.id_space, 10**9])))
        elif bad == "not_held":
            others = sorted(set(range(self.id_space)) - self.held)
            if others:
                pages.append(others[int(rng.integers(len(others)))])
        elif bad == "twice" and pages:
            pages.append(pages[0])
        expected = None
        for i, p in enumerate(pages):
            if not 0 <= p < self.id_space:
                expected = IndexError
            elif p not in self.held or p in pages[:i]:
                expected = ValueError
            if expected:
                break
        if expected:
            self.raises(expected, self.cache.free, np.asarray(pages, np.int64))
            return
        self.cache.free(np.asarray(pages, np.int64))
        self.held.difference_update(pages)

    @rule(n=st.integers(-1, 5))
    def evict(self, n):
        if n < 0:
            self.raises(ValueError, self.cache.evict, n, self.t)
            return
        cached = self.cached_pages()
        ev = self.evictable()
        ids = self.check_ids(self.cache.evict(n, now=self.t), {x.gpu for x in ev}, "evict")
        assert len(ids) == min(n, len(ev)), f"evict({n}) evicted {len(ids)}; {len(ev)} were evictable"
        assert set(ids) <= set(cached)
        self.apply_evictions(ids)

    @rule(i=st.integers(0, 10**6))
    def lock(self, i):
        if not self.handles:
            return
        h, node = self.pick_handle(i)
        ok, _ = self.handle_op(self.cache.lock, h, node)
        if ok:
            self.confirm(node.key)
            self.lock_path(node.key, +1)
            node.own_locks += 1

    @rule(i=st.integers(0, 10**6))
    def unlock(self, i):
        """Unlocks a handle this machine locked, or one whose path is not locked (must raise)."""
        if not self.handles:
            return
        h, node = self.pick_handle(i)
        if node.own_locks > 0:
            self.cache.unlock(h)
            self.lock_path(node.key, -1)
            node.own_locks -= 1
            return
        state = self.present(node)
        if state is False:
            self.raises(ValueError, self.cache.unlock, h, match="unknown or expired handle")
        elif node.lock == 0:  # below zero (or gone, when the model does not know)
            e = self.raises(ValueError, self.cache.unlock, h)
            if "unknown or expired handle" in str(e):
                assert state is None, f"unlock of a live node: {e}"
                self.remove_subtree(node.key)
            else:
                assert "not locked" in str(e), str(e)
                self.confirm(node.key)
        # a node locked through a descendant's handle: unlocking it would be a caller error the
        # cache cannot tell from a valid unlock (the counts are per node)

    @rule(i=st.integers(0, 10**6), ttl=st.sampled_from([-1.0, 0.0, 2.0, 10.0, 50.0]))
    def pin(self, i, ttl):
        if not self.handles:
            return
        h, node = self.pick_handle(i)
        if ttl < 0:
            self.raises(ValueError, self.cache.pin, h, ttl, self.t, match="ttl")
            return
        ok, _ = self.handle_op(self.cache.pin, h, node, ttl, self.t)
        if ok:
            self.confirm(node.key)
            self.pin_path(node.key, self.t + ttl)

    @rule(i=st.integers(0, 10**6))
    def prefetch(self, i):
        if self.handles:
            self.do_prefetch(*self.pick_handle(i))

    @rule(ns=ns_st, pages=pages_st, hold=st.integers(0, 8))
    def match_and_prefetch(self, ns, pages, hold):
        """Matches, then brings the host run back; first holds up to `hold` free pages (so the GPU
        may be too full for the whole run)."""
        hold = min(hold, len(self.free_ids()))
        if hold:
            self.do_alloc(hold)
        m, keys, d = self.do_match(ns, pages)
        if m.host_tokens:
            self.do_prefetch(*self.handles[-1])

    @rule(delta=st.integers(-3, 3))
    def resize(self, delta):
        target = self.capacity + delta
        if target < 0:
            self.raises(ValueError, self.cache.resize, target, self.t)
            return
        if target > ID_ROOM:
            return
        if target >= self.capacity:
            need = target - self.capacity
            back = sorted(self.removed)[:need]
            want = back + list(range(self.id_space, self.id_space + need - len(back)))
            ids = [int(x) for x in self.cache.resize(target, now=self.t)]
            assert ids == want, f"resize grew with {ids}, expected {want}"
            self.removed.difference_update(back)
            self.id_space += need - len(back)
            self.capacity = target
            return
        give = self.capacity - target
        free, ev = self.free_ids(), self.evictable()
        cached_before = len(self.cached_pages())
        if give > len(free) + len(ev):
            self.raises(MemoryError, self.cache.resize, target, self.t)
            self.after_failed_make_free(cached_before)
            return
        ids = self.check_ids(self.cache.resize(target, now=self.t), free | {x.gpu for x in ev}, "resize")
        assert len(ids) == give
        evicted = [p for p in ids if p not in free]
        assert len(evicted) == max(0, give - len(free))
        self.apply_evictions(evicted)
        self.removed.update(ids)
        self.capacity = target

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0, 4.0]))
    def advance(self, dt):
        self.t += dt

    @rule(h=st.sampled_from([-1, -(2**40), 0, 7, (1000 << 32) | 0, (1000 << 32) | 3, 2**62]),
          op=st.sampled_from(["lock", "unlock", "prefetch", "pin"]))
    def unknown_handle(self, h, op):
        fn = {"lock": self.cache.lock, "unlock": self.cache.unlock,
              "prefetch": lambda x: self.cache.prefetch(x, now=self.t),
              "pin": lambda x: self.cache.pin(x, 1.0, now=self.t)}[op]
        self.raises(ValueError, fn, h, match="unknown or expired handle")

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def ledger_and_stats(self):
        if self.cache is None:
            return
        s = self.cache.stats()
        gpu, host = s["gpu"], s["host"]
        cached = self.cached_pages()
        assert len(cached) == len([n for n in self.nodes.values() if n.gpu is not None]), "a page in two nodes"
        assert not (set(cached) & self.held), "a page both cached and held"
        assert gpu["capacity_pages"] == self.capacity
        assert gpu["cached_pages"] == len(cached)
        assert gpu["held_pages"] == len(self.held)
        assert gpu["free_pages"] == len(self.free_ids())
        assert gpu["free_pages"] + gpu["held_pages"] + gpu["cached_pages"] == gpu["capacity_pages"]
        assert gpu["evictions"] == self.evictions
        assert gpu["hit_tokens"] == self.gpu_hit and host["hit_tokens"] == self.host_hit
        assert s["queried_tokens"] == self.queried
        assert s["inserted_tokens"] == self.inserted
        assert s["prefetched_pages"] == self.prefetched
        assert s["bytes_from_host"] == self.prefetched * PAGE_BYTES
        assert s["bytes_to_host"] == host["writes"] * PAGE_BYTES
        assert s["prefetches_used"] + s["prefetches_wasted"] <= self.prefetched
        assert self.wr_lo <= host["writes"] + host["admissions_rejected"] <= self.wr_hi
        assert host["capacity_pages"] == self.host_pages
        sure = sum(1 for n in self.nodes.values() if n.host == "yes")
        maybe = sum(1 for n in self.nodes.values() if n.host == "maybe")
        assert sure <= host["used_pages"] <= min(self.host_pages, sure + maybe), \
            f"host slots in use {host['used_pages']}, model {sure} (+{maybe} unknown)"
        assert host["evictions_unused"] <= host["evictions"]
        if self.host_pages == 0:
            assert host["writes"] == host["used_pages"] == 0
        certain = sum(1 for n in self.nodes.values() if self.present(n))
        unknown = sum(1 for n in self.nodes.values() if self.present(n) is None)
        assert certain <= s["nodes"] <= certain + unknown
        if self.policy == "lru":
            assert host["admission_threshold"] == 0 and host["ghost_hits"] == 0
        else:
            assert host["admission_threshold"] >= 0

    @invariant()
    def gpu_bytes(self):
        """Every GPU page the model knows holds its node's KV (stamped at insert, moved by the mover)."""
        if self.cache is None:
            return
        for n in self.nodes.values():
            if n.gpu is not None:
                assert (self.gpu_cache[n.gpu] == stamp(n.key)).all(), f"page {n.gpu} of {n.key} holds wrong bytes"

    def teardown(self):
        if self.cache is None:
            return
        for h, node in self.handles:
            while node.own_locks > 0:
                self.cache.unlock(h)
                self.lock_path(node.key, -1)
                node.own_locks -= 1
        assert all(n.lock == 0 for n in self.nodes.values())
        self.t += 1000.0  # past every pin
        self.evict(10**6)
        assert self.cache.stats()["gpu"]["cached_pages"] == 0
        if self.held:
            self.cache.free(np.asarray(sorted(self.held), np.int64))
            self.held.clear()
        # Read the host-resident tree back: every node is host-only now.
        for key in sorted(self.nodes, key=lambda k: (k[0], len(k[1]), k[1])):
            if key in self.nodes:
                self.do_match(key[0], key[1])
        found = len(self.nodes)
        assert all(n.host == "yes" for n in self.nodes.values())
        s = self.cache.stats()
        assert s["host"]["used_pages"] == found, f"{s['host']['used_pages']} host slots used by {found} nodes"
        assert s["nodes"] == found
        assert s["gpu"]["free_pages"] == s["gpu"]["capacity_pages"] == self.capacity
        assert len(self.cache.resize(0, now=self.t)) == self.capacity  # nothing held back


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPrefixCacheStateMachine = PrefixCacheMachine.TestCase
