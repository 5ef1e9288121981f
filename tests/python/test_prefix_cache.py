"""kvcore.PrefixCache: matching, insertion, locks, pins, eviction order, both policies, the host tier
and its admission, prefetch, resize, namespaces, statistics, real bytes through PagedKVMover over numpy
page caches, PagePool reclaim through attach_pool, and every bad input. Random operation sequences
against a model are in test_prefix_cache_state_machine.py. The trace replay benchmark
(kvcore.bench.prefix_replay) is checked at the end on a small synthetic trace."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import pathlib
import sys
import weakref

import numpy as np
import pytest

import kvcore

PT = 4  # tokens per page in most tests
PB = 4096  # CPU PagePool page size


def toks(*pages: int, partial: int = 0) -> np.ndarray:
    """Tokens for pages with the given values (page v = [v, v+1000, v+2000, v+3000]), plus a
    partial page of `partial` tokens."""
    out = [v + 1000 * j for v in pages for j in range(PT)] + [777] * partial
    return np.asarray(out, dtype=np.int32)


def serve(cache: kvcore.PrefixCache, tokens, now: float, namespace: int = 0, lock: bool = True):
    """An engine's request: match, lock, prefetch, alloc the rest, insert, unlock. Returns the match
    and the page ids backing the full pages."""
    m = cache.match(tokens, namespace=namespace, now=now)
    pages = list(m.gpu_pages)
    if m.handle >= 0 and lock:
        cache.lock(m.handle)
        if m.host_tokens:
            pages += list(cache.prefetch(m.handle, now=now).gpu_pages)
    new = cache.alloc(len(tokens) // cache.page_tokens - len(pages), now=now)
    ids = np.concatenate([np.asarray(pages, np.int64), new])
    assert cache.insert(tokens, ids, namespace=namespace, now=now) == len(pages) * cache.page_tokens
    if m.handle >= 0 and lock:
        cache.unlock(m.handle)
    return m, [int(x) for x in ids]


def ledger(cache) -> dict:
    g = cache.stats()["gpu"]
    assert g["free_pages"] + g["held_pages"] + g["cached_pages"] == g["capacity_pages"]
    return g


# ---------------------------------------------------------------------------------------------
# construction


@pytest.mark.parametrize("policy", ["lru", "hot"])
def test_new_cache_is_empty(policy):
    c = kvcore.PrefixCache(PT, 8, 3, policy, page_bytes=64)
    assert c.page_tokens == PT and c.policy == policy
    s = c.stats()
    assert s["gpu"] == {"hit_tokens": 0, "capacity_pages": 8, "cached_pages": 0, "free_pages": 8, "held_pages": 0,
                        "evictions": 0}
    assert s["host"]["capacity_pages"] == 3 and s["host"]["used_pages"] == 0 and s["host"]["writes"] == 0
    assert s["host"]["admission_threshold"] == (1.5 if policy == "hot" else 0.0)
    assert s["nodes"] == s["queried_tokens"] == s["inserted_tokens"] == 0
    m = c.match(toks(1, 2), now=1)
    assert m.handle == -1 and m.gpu_tokens == m.host_tokens == 0
    assert m.gpu_pages.dtype == np.int64 and m.gpu_pages.shape == (0,)
    assert c.stats()["queried_tokens"] == 2 * PT


@pytest.mark.parametrize("kwargs, exc", [
    (dict(page_tokens=0), ValueError),
    (dict(page_tokens=-4), ValueError),
    (dict(gpu_pages=-1), ValueError),
    (dict(gpu_pages=2**31), ValueError),
    (dict(host_pages=-1), ValueError),
    (dict(half_life=0.0), ValueError),
    (dict(half_life=-5.0), ValueError),
    (dict(host_write_budget=-0.1), ValueError),
    (dict(host_write_budget=float("nan")), ValueError),
    (dict(class_gate=-0.5), ValueError),
    (dict(class_gate=float("nan")), ValueError),
    (dict(page_bytes=-1), ValueError),
    (dict(policy="fifo"), ValueError),
    (dict(policy="LRU"), ValueError),
])
def test_bad_construction(kwargs, exc):
    args = dict(page_tokens=PT, gpu_pages=4, host_pages=0, policy="lru")
    args.update(kwargs)
    with pytest.raises(exc):
        kvcore.PrefixCache(**args)


# ---------------------------------------------------------------------------------------------
# match / insert


@pytest.mark.parametrize("policy", ["lru", "hot"])
def test_insert_then_match_whole_pages_only(policy):
    c = kvcore.PrefixCache(PT, 8, 0, policy)
    t = toks(1, 2, partial=3)  # two full pages and a partial one
    pages = c.alloc(2, now=1)
    assert c.insert(t, pages, now=1) == 0
    s = c.stats()
    assert s["inserted_tokens"] == 2 * PT and s["nodes"] == 2
    assert ledger(c)["cached_pages"] == 2

    m = c.match(t, now=2)
    assert list(m.gpu_pages) == list(pages) and m.gpu_tokens == 2 * PT and m.host_tokens == 0 and m.handle >= 0
    # longer, shorter, diverging and partial-only queries
    assert c.match(toks(1, 2, 3), now=2).gpu_tokens == 2 * PT
    assert list(c.match(toks(1), now=2).gpu_pages) == [pages[0]]
    assert c.match(toks(1, 5), now=2).gpu_tokens == PT
    assert c.match(toks(2), now=2).handle == -1  # page 2 only exists behind page 1
    assert c.match(toks(1)[:PT - 1], now=2).handle == -1  # a partial page never matches
    diverge = toks(1, 2).copy()
    diverge[PT + 2] = 4242  # the second page differs in one token
    assert c.match(diverge, now=2).gpu_tokens == PT
    s = c.stats()
    assert s["gpu"]["hit_tokens"] == 2 * PT + 2 * PT + PT + PT + 0 + 0 + PT
    assert s["host"]["hit_tokens"] == 0


def test_insert_more_pages_than_full_pages_leaves_the_extra_held():
    c = kvcore.PrefixCache(PT, 4, 0, "lru")
    pages = c.alloc(3, now=1)
    c.insert(toks(1, 2, partial=1), pages, now=1)  # 2 full pages; the third id stays with the caller
    g = ledger(c)
    assert g["cached_pages"] == 2 and g["held_pages"] == 1
    c.free(pages[2:])
    assert ledger(c)["free_pages"] == 2


def test_insert_returns_cached_tokens_and_the_caller_frees_duplicates():
    c = kvcore.PrefixCache(PT, 8, 0, "lru")
    first = c.alloc(2, now=1)
    c.insert(toks(1, 2), first, now=1)
    dup = c.alloc(3, now=2)
    assert c.insert(toks(1, 2, 3), dup, now=2) == 2 * PT  # the first two pages were cached already
    m = c.match(toks(1, 2, 3), now=3)
    assert list(m.gpu_pages) == [first[0], first[1], dup[2]]  # the tree keeps its own pages
    g = ledger(c)
    assert g["held_pages"] == 2 and g["cached_pages"] == 3
    c.free(dup[:2])
    assert ledger(c)["held_pages"] == 0
    # Re-inserting with the tree's own ids: everything cached, nothing to free.
    assert c.insert(toks(1, 2, 3), m.gpu_pages, now=4) == 3 * PT
    assert ledger(c)["held_pages"] == 0 and c.stats()["inserted_tokens"] == 3 * PT


def test_insert_extends_a_shared_prefix_into_a_tree():
    c = kvcore.PrefixCache(PT, 16, 0, "hot")
    _, a = serve(c, toks(1, 2, 3), now=1)
    _, b = serve(c, toks(1, 2, 4, 5), now=2)
    _, d = serve(c, toks(1, 6), now=3)
    assert b[:2] == a[:2] and d[0] == a[0]
    assert len({*a, *b, *d}) == 6 and c.stats()["nodes"] == 6
    assert list(c.match(toks(1, 2, 4, 5), now=4).gpu_pages) == b


def test_namespaces_are_separate_trees():
    c = kvcore.PrefixCache(PT, 8, 0, "lru")
    _, p0 = serve(c, toks(1, 2), now=1, namespace=0)
    assert c.match(toks(1, 2), namespace=1, now=2).handle == -1
    _, p1 = serve(c, toks(1, 2), now=2, namespace=1)
    assert set(p0).isdisjoint(p1)
    assert list(c.match(toks(1, 2), namespace=0, now=3).gpu_pages) == p0
    assert list(c.match(toks(1, 2), namespace=1, now=3).gpu_pages) == p1
    assert list(c.match(toks(1, 2), namespace=-7, now=3).gpu_pages) == []
    assert c.stats()["nodes"] == 4


def test_tokens_accept_any_integer_dtype_and_lists():
    c = kvcore.PrefixCache(PT, 4, 0, "lru")
    serve(c, toks(1, 2), now=1)
    strided = np.repeat(toks(1, 2), 2)[::2]  # not contiguous
    for t in [toks(1, 2).astype(np.int64), toks(1, 2).astype(np.uint16), toks(1, 2).tolist(), strided]:
        assert c.match(t, now=2).gpu_tokens == 2 * PT
    assert c.match(np.zeros(0, np.int32), now=2).handle == -1
    # token ids are compared exactly: negative and large ids are tokens like any other
    big = np.asarray([-(2**31), 2**31 - 1, -1, 0], np.int64)
    serve(c, big, now=3)
    assert c.match(big, now=4).gpu_tokens == PT


# ---------------------------------------------------------------------------------------------
# locks, pins, eviction order


@pytest.mark.parametrize("policy", ["lru", "hot"])
def test_locked_paths_are_never_evicted(policy):
    c = kvcore.PrefixCache(PT, 4, 0, policy)
    _, a = serve(c, toks(1, 2), now=1)
    _, b = serve(c, toks(3, 4), now=2)
    h = c.match(toks(1, 2), now=3).handle
    c.lock(h)
    c.lock(h)  # locks nest
    got = c.alloc(2, now=4)
    assert sorted(got) == sorted(b)  # only the unlocked path could go
    with pytest.raises(MemoryError):
        c.alloc(1, now=5)
    assert list(c.match(toks(1, 2), now=5).gpu_pages) == a
    c.unlock(h)
    with pytest.raises(MemoryError):
        c.alloc(1, now=6)
    c.unlock(h)
    with pytest.raises(ValueError, match="not locked"):
        c.unlock(h)
    assert c.alloc(1, now=7)[0] == a[1]  # the leaf first
    ledger(c)


def test_locking_a_leaf_protects_its_ancestors():
    c = kvcore.PrefixCache(PT, 3, 0, "lru")
    _, a = serve(c, toks(1, 2, 3), now=1)
    leaf = c.match(toks(1, 2, 3), now=2).handle
    c.lock(leaf)
    assert len(c.evict(3, now=3)) == 0
    c.unlock(leaf)
    assert list(c.evict(3, now=4)) == [a[2], a[1], a[0]]  # leaves first


def test_lru_evicts_the_least_recently_used_leaf():
    c = kvcore.PrefixCache(PT, 6, 0, "lru")
    _, a = serve(c, toks(1, 2), now=1)
    _, b = serve(c, toks(3, 4), now=2)
    _, d = serve(c, toks(5, 6), now=3)
    c.match(toks(1, 2), now=4)  # a is now the most recent
    assert list(c.evict(2, now=5)) == [b[1], b[0]]
    assert list(c.evict(1, now=5)) == [d[1]]
    assert c.match(toks(3, 4), now=6).handle == -1  # evicted without a host tier: gone
    assert c.match(toks(5, 6), now=6).gpu_tokens == PT
    s = c.stats()
    assert s["gpu"]["evictions"] == 3 and s["nodes"] == 3


def test_hot_keeps_frequently_hit_prefixes_over_recent_ones():
    c = kvcore.PrefixCache(PT, 4, 0, "hot", half_life=100.0)
    _, hot_pages = serve(c, toks(1, 2), now=1)
    for t in range(2, 8):
        c.match(toks(1, 2), now=t)  # hit six times
    _, cold = serve(c, toks(3, 4), now=9)  # newer, hit once
    assert sorted(c.evict(2, now=10)) == sorted(cold)
    lru = kvcore.PrefixCache(PT, 4, 0, "lru")
    serve(lru, toks(1, 2), now=1)
    for t in range(2, 8):
        lru.match(toks(1, 2), now=t)
    _, newer = serve(lru, toks(3, 4), now=9)
    assert sorted(lru.evict(2, now=10)) != sorted(newer)


def test_pin_keeps_a_path_until_the_ttl_passes():
    c = kvcore.PrefixCache(PT, 2, 0, "lru")
    _, a = serve(c, toks(1, 2), now=1)
    h = c.match(toks(1, 2), now=2).handle
    c.pin(h, 10.0, now=2)
    assert len(c.evict(2, now=5)) == 0
    with pytest.raises(MemoryError):
        c.alloc(1, now=11.5)
    c.pin(h, 0.0, now=3)  # a shorter pin does not shorten the longer one
    assert len(c.evict(2, now=11.9)) == 0
    assert list(c.evict(2, now=12)) == [a[1], a[0]]


def test_evict_returns_free_ids_and_stops_when_nothing_is_evictable():
    c = kvcore.PrefixCache(PT, 5, 0, "hot")
    _, a = serve(c, toks(1, 2, 3), now=1)
    held = c.alloc(2, now=2)
    assert len(c.evict(0, now=3)) == 0
    out = c.evict(10, now=3)
    assert sorted(out) == sorted(a)
    g = ledger(c)
    assert g["free_pages"] == 3 and g["held_pages"] == 2 and g["cached_pages"] == 0 and g["evictions"] == 3
    assert sorted(c.alloc(3, now=4)) == sorted(a)
    c.free(held)


def test_alloc_hands_out_each_page_once():
    c = kvcore.PrefixCache(PT, 6, 0, "lru")
    a = c.alloc(4, now=1)
    b = c.alloc(2, now=1)
    assert len({*a, *b}) == 6 and set(a) | set(b) == set(range(6))
    assert a.dtype == np.int64
    with pytest.raises(MemoryError, match="held by callers"):
        c.alloc(1, now=1)
    c.free(b)
    c.free(a[:1])
    assert sorted(c.alloc(3, now=2)) == sorted([*b, a[0]])
    assert len(c.alloc(0, now=2)) == 0


# ---------------------------------------------------------------------------------------------
# host tier, admission, prefetch


def test_lru_writes_every_evicted_page_to_the_host_and_prefetch_brings_it_back():
    c = kvcore.PrefixCache(PT, 3, 4, "lru", page_bytes=1000)
    _, a = serve(c, toks(1, 2, 3), now=1)
    assert list(c.evict(2, now=2)) == [a[2], a[1]]
    s = c.stats()
    assert s["host"]["writes"] == 2 and s["host"]["used_pages"] == 2 and s["bytes_to_host"] == 2000
    m = c.match(toks(1, 2, 3), now=3)
    assert list(m.gpu_pages) == [a[0]] and m.gpu_tokens == PT and m.host_tokens == 2 * PT
    c.lock(m.handle)
    ticket = c.prefetch(m.handle, now=3)
    ticket.wait()
    assert ticket.done() and ticket.pages == 2 and len(ticket.gpu_pages) == 2
    c.unlock(m.handle)
    m2 = c.match(toks(1, 2, 3), now=4)
    assert list(m2.gpu_pages) == [a[0], *ticket.gpu_pages] and m2.host_tokens == 0
    s = c.stats()
    assert s["prefetched_pages"] == 2 and s["bytes_from_host"] == 2000 and s["prefetches_used"] == 2
    assert s["host"]["hit_tokens"] == 2 * PT and s["host"]["used_pages"] == 2  # the host copies stay
    # Pages that still have their host copy are not written again: only the first page is.
    c.evict(3, now=5)
    assert c.stats()["host"]["writes"] == 3 and c.stats()["host"]["used_pages"] == 3
    ledger(c)


def test_prefetch_of_a_gpu_resident_path_does_nothing():
    c = kvcore.PrefixCache(PT, 3, 2, "lru")
    serve(c, toks(1, 2), now=1)
    t = c.prefetch(c.match(toks(1, 2), now=2).handle, now=2)
    assert t.pages == 0 and len(t.gpu_pages) == 0 and t.done()


def test_prefetch_brings_back_as_many_pages_as_fit():
    c = kvcore.PrefixCache(PT, 3, 4, "lru")
    serve(c, toks(1, 2, 3), now=1)
    c.evict(3, now=2)
    held = c.alloc(2, now=3)
    m = c.match(toks(1, 2, 3), now=4)
    assert m.gpu_tokens == 0 and m.host_tokens == 3 * PT
    t = c.prefetch(m.handle, now=4)
    assert t.pages == 1
    m = c.match(toks(1, 2, 3), now=5)
    assert list(m.gpu_pages) == list(t.gpu_pages) and m.host_tokens == 2 * PT  # a GPU run, then the host
    c.free(held)


def test_a_wasted_prefetch_is_counted():
    c = kvcore.PrefixCache(PT, 2, 2, "lru")
    serve(c, toks(1), now=1)
    c.evict(1, now=2)
    c.prefetch(c.match(toks(1), now=3).handle, now=3)
    c.evict(1, now=4)
    s = c.stats()
    assert s["prefetched_pages"] == 1 and s["prefetches_wasted"] == 1 and s["prefetches_used"] == 0


def test_host_tier_full_evicts_the_coldest_host_page():
    c = kvcore.PrefixCache(PT, 1, 2, "lru")
    for t, v in enumerate([1, 2, 3], start=1):
        serve(c, toks(v), now=t)
        c.evict(1, now=t + 0.5)
    s = c.stats()
    assert s["host"]["writes"] == 3 and s["host"]["used_pages"] == 2
    assert s["host"]["evictions"] == 1 and s["host"]["evictions_unused"] == 1
    assert c.match(toks(1), now=9).handle == -1
    assert c.match(toks(2), now=9).host_tokens == PT and c.match(toks(3), now=9).host_tokens == PT


def test_hot_admits_only_pages_hot_enough():
    c = kvcore.PrefixCache(PT, 2, 4, "hot", admission_threshold=1.5, adaptive=False)
    _, a = serve(c, toks(1), now=1)
    serve(c, toks(2), now=1)
    c.match(toks(1), now=2)  # hotness ~2
    c.evict(2, now=3)
    s = c.stats()["host"]
    assert s["writes"] == 1 and s["admissions_rejected"] == 1 and s["used_pages"] == 1
    assert c.match(toks(1), now=4).host_tokens == PT
    assert c.match(toks(2), now=4).handle == -1  # rejected and dropped
    s = c.stats()["host"]
    assert s["ghost_hits"] == 1 and s["admission_threshold"] == 1.5  # not adaptive


def test_hot_adapts_the_threshold():
    # Budget 0: only pages with a reuse history can reach the host, through the threshold.
    c = kvcore.PrefixCache(PT, 1, 1, "hot", admission_threshold=3.0, adaptive=True, host_write_budget=0)
    serve(c, toks(1), now=1)
    serve(c, toks(1), now=1)  # hotness 2
    c.evict(1, now=2)  # rejected: 2 < 3
    serve(c, toks(2), now=2)
    c.evict(1, now=2)  # rejected: first seen
    assert c.stats()["host"]["admissions_rejected"] == 2
    c.match(toks(2), now=3)  # a ghost hit of a first-seen page: the budget's business, not the threshold's
    assert c.stats()["host"]["admission_threshold"] == 3.0
    c.match(toks(1), now=3)  # a ghost hit of a page the threshold turned away lowers it
    s = c.stats()["host"]
    assert s["ghost_hits"] == 2 and s["admission_threshold"] == pytest.approx(2.7)
    # History pages evicted from the host without a hit raise it again.
    c2 = kvcore.PrefixCache(PT, 1, 1, "hot", admission_threshold=1.0, adaptive=True, host_write_budget=0)
    for t, v in enumerate([1, 2, 3], start=1):
        serve(c2, toks(v), now=t)
        serve(c2, toks(v), now=t)
        c2.evict(1, now=t + 0.5)
    s = c2.stats()["host"]
    assert s["writes"] == 3 and s["evictions_unused"] == 2
    assert s["admission_threshold"] == pytest.approx(1.0106**2)


def test_hot_rejected_page_keeps_its_history():
    # Rejected when first seen; requested again, it comes back with its hotness (1 decayed + 1) and
    # is admitted at its next eviction without any write budget.
    c = kvcore.PrefixCache(PT, 1, 4, "hot", admission_threshold=1.5, adaptive=False, host_write_budget=0)
    serve(c, toks(1), now=1)
    c.evict(1, now=2)
    assert c.stats()["host"]["writes"] == 0 and c.match(toks(1), now=3).handle == -1
    serve(c, toks(1), now=3)
    c.evict(1, now=4)
    assert c.stats()["host"]["writes"] == 1 and c.stats()["host"]["budget_admitted"] == 0
    assert c.match(toks(1), now=5).host_tokens == PT


def test_hot_write_budget_admits_whole_runs():
    # Budget 0.5 writes per queried page: a 2-page prompt earns 1 page of budget, not enough for
    # its 2-page run (admitted whole or not at all); the next 2-page prompt brings the balance to 2.
    c = kvcore.PrefixCache(PT, 4, 8, "hot", adaptive=False, host_write_budget=0.5)
    serve(c, toks(1, 2), now=1)
    c.evict(2, now=2)
    s = c.stats()["host"]
    assert s["writes"] == 0 and s["admissions_rejected"] == 2
    serve(c, toks(3, 4), now=3)
    c.evict(2, now=4)
    s = c.stats()["host"]
    assert s["writes"] == 2 and s["budget_admitted"] == 2
    assert c.match(toks(3, 4), now=5).host_tokens == 2 * PT
    # Unlimited: every first-seen page goes to the host, like lru.
    u = kvcore.PrefixCache(PT, 4, 8, "hot", host_write_budget=None)
    serve(u, toks(1, 2, 3), now=1)
    u.evict(3, now=2)
    assert u.stats()["host"]["writes"] == 3 and u.stats()["host"]["budget_admitted"] == 3


def _serve_classes(c, rounds: int, t0: float = 0.0) -> float:
    """Class 1's prompts are requested again right away, class 2's never. Returns the next time."""
    t = t0
    for i in range(rounds):
        a, b = toks(100 + i), toks(500 + i)
        c.match(a, now=t)
        c.insert(a, c.alloc(1, now=t), now=t, reuse_class=1)
        c.match(b, now=t + 0.1)
        c.insert(b, c.alloc(1, now=t + 0.1), now=t + 0.1, reuse_class=2)
        m = c.match(a, now=t + 0.2)  # the reuse that labels class 1 (from either tier)
        assert m.gpu_tokens + m.host_tokens == PT
        t += 1
    return t


def test_hot_learns_which_reuse_classes_are_worth_host_writes():
    c = kvcore.PrefixCache(PT, 3, 64, "hot", host_write_budget=100.0, class_gate=0.5)
    t = _serve_classes(c, 30)
    s = c.stats()["host"]
    assert s["reuse_classes"] == 2
    # Class 2's rate (0 reused) fell below half the cache-wide one (~0.5) after a few samples.
    assert 10 <= s["class_gated"] <= 30 - 8
    # A fresh run of each class, evicted before any reuse: only class 1's goes to the host.
    for v, cls in ((900, 1), (901, 2)):
        c.match(toks(v), now=t)
        c.insert(toks(v), c.alloc(1, now=t), now=t, reuse_class=cls)
    c.evict(3, now=t + 1)
    assert c.match(toks(900), now=t + 2).host_tokens == PT
    assert c.match(toks(901), now=t + 2).handle == -1
    # Without the gate both are written.
    u = kvcore.PrefixCache(PT, 3, 64, "hot", host_write_budget=100.0, class_gate=0)
    t = _serve_classes(u, 30)
    assert u.stats()["host"]["class_gated"] == 0
    u.match(toks(901), now=t)
    u.insert(toks(901), u.alloc(1, now=t), now=t, reuse_class=2)
    u.evict(3, now=t + 1)
    assert u.match(toks(901), now=t + 2).host_tokens == PT


def test_hot_a_refused_page_requested_again_teaches_its_class():
    # Requests for class 2's refused pages find them in the ghost list: that is reuse too, and the
    # class earns its host writes back.
    c = kvcore.PrefixCache(PT, 3, 64, "hot", host_write_budget=100.0, class_gate=0.5)
    t = _serve_classes(c, 30)
    gated = c.stats()["host"]["class_gated"]
    ghost_hits = c.stats()["host"]["ghost_hits"]
    for i in range(30):  # the early ones were admitted before the gate closed: hits on the host
        c.match(toks(500 + i), now=t)
    assert c.stats()["host"]["ghost_hits"] > ghost_hits
    c.match(toks(902), now=t)
    c.insert(toks(902), c.alloc(1, now=t), now=t, reuse_class=2)
    assert c.stats()["host"]["class_gated"] == gated
    c.evict(3, now=t + 1)
    assert c.match(toks(902), now=t + 2).host_tokens == PT


@pytest.mark.parametrize("bad, exc", [("1", TypeError), (1.5, TypeError), (True, TypeError), (2**64, ValueError)])
def test_bad_reuse_class_raises(bad, exc):
    c = kvcore.PrefixCache(PT, 2, 2, "hot")
    with pytest.raises(exc, match="reuse_class"):
        c.insert(toks(1), c.alloc(1), reuse_class=bad)
    assert c.stats()["nodes"] == 0


def test_hot_host_tier_evicts_least_recently_used():
    # A page hit often long ago goes before a page used once recently (host reuse follows recency).
    c = kvcore.PrefixCache(PT, 1, 2, "hot", admission_threshold=1.0, adaptive=False, host_write_budget=None)
    for _ in range(5):
        serve(c, toks(1), now=1)
    c.evict(1, now=1)
    serve(c, toks(2), now=100)
    c.evict(1, now=100)
    serve(c, toks(3), now=101)
    c.evict(1, now=101)  # the host is full: page 1 (hot but old) goes
    assert c.match(toks(1), now=102).handle == -1
    assert c.match(toks(2), now=102).host_tokens == PT and c.match(toks(3), now=102).host_tokens == PT


def test_no_host_tier_means_no_writes():
    for policy in ["lru", "hot"]:
        c = kvcore.PrefixCache(PT, 2, 0, policy, admission_threshold=0.0)
        serve(c, toks(1, 2), now=1)
        c.evict(2, now=2)
        s = c.stats()
        assert s["host"]["writes"] == 0 and s["host"]["admissions_rejected"] == 2 and s["nodes"] == 0


# ---------------------------------------------------------------------------------------------
# resize


def test_resize_grows_and_shrinks_the_gpu_tier():
    c = kvcore.PrefixCache(PT, 4, 0, "lru")
    assert list(c.resize(6, now=1)) == [4, 5]
    assert ledger(c)["capacity_pages"] == 6
    _, a = serve(c, toks(1, 2), now=2)
    _, b = serve(c, toks(3, 4), now=3)
    held = c.alloc(2, now=4)
    gone = [int(x) for x in c.resize(3, now=5)]  # 0 free: evicts the coldest pages (a, then b's leaf)
    assert sorted(gone) == sorted([*a, b[1]])
    g = ledger(c)
    assert g["capacity_pages"] == 3 and g["cached_pages"] == 1 and g["held_pages"] == 2 and g["free_pages"] == 0
    assert c.match(toks(1, 2), now=6).handle == -1 and c.match(toks(3, 4), now=6).gpu_tokens == PT
    for p in gone:  # given-back ids are neither held nor free
        with pytest.raises(ValueError, match="not held"):
            c.free([p])
    c.free(held)
    # Growing re-uses the ids given back first, lowest first.
    assert list(c.resize(5, now=7)) == sorted(gone)[:2]
    assert list(c.resize(7, now=7)) == [sorted(gone)[2], 6]


def test_resize_blocked_by_locks_raises_with_capacity_unchanged():
    c = kvcore.PrefixCache(PT, 3, 0, "lru")
    serve(c, toks(1, 2, 3), now=1)
    h = c.match(toks(1, 2, 3), now=2).handle
    c.lock(h)
    with pytest.raises(MemoryError, match="capacity unchanged"):
        c.resize(1, now=3)
    assert ledger(c)["capacity_pages"] == 3 and ledger(c)["cached_pages"] == 3
    c.unlock(h)
    assert len(c.resize(0, now=4)) == 3
    assert ledger(c)["capacity_pages"] == 0
    with pytest.raises(MemoryError):
        c.alloc(1, now=5)


# ---------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("policy", ["lru", "hot"])
def test_statistics_add_up_over_a_random_workload(policy, rng):
    c = kvcore.PrefixCache(PT, 12, 10, policy, page_bytes=10, admission_threshold=1.2)
    queried = gpu_hit = host_hit = 0
    systems = [list(rng.integers(0, 50, 2)) for _ in range(3)]
    for t in range(300):
        pages = systems[int(rng.integers(3))] + list(rng.integers(0, 6, int(rng.integers(0, 4))))
        tk = toks(*pages, partial=int(rng.integers(0, PT)))
        m, _ = serve(c, tk, now=float(t))
        queried += len(tk)
        gpu_hit += m.gpu_tokens
        host_hit += m.host_tokens
        if t % 7 == 0:
            c.evict(int(rng.integers(0, 4)), now=float(t))
    s = c.stats()
    g, h = s["gpu"], s["host"]
    assert s["queried_tokens"] == queried and g["hit_tokens"] == gpu_hit and h["hit_tokens"] == host_hit
    assert gpu_hit + host_hit <= queried
    assert g["free_pages"] + g["held_pages"] + g["cached_pages"] == g["capacity_pages"] == 12
    assert g["held_pages"] == 0
    assert h["used_pages"] <= h["capacity_pages"]
    assert s["bytes_to_host"] == 10 * h["writes"] and s["bytes_from_host"] == 10 * s["prefetched_pages"]
    assert s["prefetches_used"] + s["prefetches_wasted"] <= s["prefetched_pages"]
    assert h["evictions_unused"] <= h["evictions"]
    assert s["nodes"] >= g["cached_pages"]
    assert s["inserted_tokens"] % PT == 0 and s["inserted_tokens"] >= PT * s["nodes"]
    # Every node is on a tier: evicting the whole GPU leaves exactly the host-resident nodes.
    c.evict(100, now=1000.0)
    s = c.stats()
    assert s["gpu"]["cached_pages"] == 0 and s["nodes"] == s["host"]["used_pages"]


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_unknown_and_expired_handles_raise():
    c = kvcore.PrefixCache(PT, 2, 0, "lru")
    serve(c, toks(1, 2), now=1)
    h = c.match(toks(1, 2), now=2).handle
    forged = [-1, -(2**40), 0, 12345, (999 << 32) | (h & 0xFFFFFFFF), h + (1 << 32), 2**62]
    ops = [c.lock, c.unlock, lambda x: c.prefetch(x, now=3), lambda x: c.pin(x, 1.0, now=3)]
    for bad in forged:
        for op in ops:
            with pytest.raises(ValueError, match="unknown or expired handle"):
                op(bad)
    c.evict(2, now=3)  # the node is gone: its handle has expired
    serve(c, toks(5, 6), now=4)  # and its slot in the tree is reused
    for op in ops:
        with pytest.raises(ValueError, match="unknown or expired handle"):
            op(h)
    ledger(c)


def test_unlock_below_zero_raises_and_changes_nothing():
    c = kvcore.PrefixCache(PT, 2, 0, "lru")
    serve(c, toks(1, 2), now=1)
    h = c.match(toks(1, 2), now=2).handle
    with pytest.raises(ValueError, match="not locked"):
        c.unlock(h)
    c.lock(h)
    c.unlock(h)
    with pytest.raises(ValueError, match="below zero"):
        c.unlock(h)
    assert len(c.evict(2, now=3)) == 2  # still unlocked, not "locked -1"


def test_bad_page_ids_raise_and_change_nothing():
    c = kvcore.PrefixCache(PT, 4, 0, "lru")
    _, a = serve(c, toks(1), now=1)
    held = [int(x) for x in c.alloc(2, now=2)]
    before = c.stats()
    free_id = ({0, 1, 2, 3} - set(a) - set(held)).pop()
    cases = [
        (c.free, ([4],), IndexError, "out of range"),
        (c.free, ([-1],), IndexError, "out of range"),
        (c.free, ([held[0], 10**12],), IndexError, "out of range"),
        (c.free, ([a[0]],), ValueError, "not held"),  # cached, not held
        (c.free, ([free_id],), ValueError, "not held"),
        (c.free, ([held[0], held[0]],), ValueError, "twice"),
        (c.insert, (toks(2, 3), [held[0], 9]), IndexError, "out of range"),
        (c.insert, (toks(2, 3), [-3, held[0]]), IndexError, "out of range"),
        (c.insert, (toks(2, 3), [held[0], free_id]), ValueError, "not held"),
        (c.insert, (toks(2, 3), [held[0], a[0]]), ValueError, "not held"),  # a page of the tree
        (c.insert, (toks(2, 3), [held[0], held[0]]), ValueError, "twice"),
        (c.insert, (toks(2, 3), [held[0]]), ValueError, "entries"),
    ]
    for fn, args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn(*args)
    after = c.stats()
    assert after == before
    # The ids of an already cached prefix are not checked: they are the caller's duplicates.
    assert c.insert(toks(1, 2), [10**9, held[0]], now=3) == PT


def test_negative_counts_and_ttl_raise():
    c = kvcore.PrefixCache(PT, 2, 0, "lru")
    serve(c, toks(1), now=1)
    h = c.match(toks(1), now=2).handle
    with pytest.raises(ValueError, match="negative"):
        c.alloc(-1)
    with pytest.raises(ValueError, match="negative"):
        c.evict(-1)
    with pytest.raises(ValueError):
        c.resize(-1)
    with pytest.raises(ValueError, match="ttl"):
        c.pin(h, -0.5, now=2)
    assert ledger(c)["capacity_pages"] == 2


@pytest.mark.parametrize("bad", [
    np.array([1.0, 2.0, 3.0, 4.0]),
    np.array([True, False, True, False]),
    np.arange(8, dtype=np.int32).reshape(2, 4),
    ["a", "b", "c", "d"],
])
def test_tokens_of_wrong_dtype_or_ndim_raise_type_error(bad):
    c = kvcore.PrefixCache(PT, 2, 0, "lru")
    with pytest.raises(TypeError, match="tokens"):
        c.match(bad)
    with pytest.raises(TypeError, match="tokens"):
        c.insert(bad, [0])


def test_tokens_out_of_int32_range_raise_value_error():
    c = kvcore.PrefixCache(PT, 2, 0, "lru")
    for bad in [np.array([0, 1, 2, 2**31], np.int64), np.array([-(2**31) - 1, 0, 0, 0], np.int64),
                np.array([2**63], np.uint64)]:
        with pytest.raises(ValueError, match="int32"):
            c.match(bad)


@pytest.mark.parametrize("bad", [np.array([0.0, 1.0]), np.zeros((1, 2), np.int64), ["x", "y"]])
def test_page_ids_of_wrong_dtype_or_ndim_raise_type_error(bad):
    c = kvcore.PrefixCache(PT, 2, 0, "lru")
    c.alloc(2)
    with pytest.raises(TypeError, match="page"):
        c.free(bad)
    with pytest.raises(TypeError, match="gpu_pages"):
        c.insert(toks(1, 2), bad)


# ---------------------------------------------------------------------------------------------
# real bytes: PagedKVMover over numpy page caches


def test_paged_kv_mover_moves_real_bytes(rng):
    layers, heads, dim, gpu_pages, host_pages = 2, 2, 8, 4, 6
    shape = (PT, heads, dim)
    gpu = [np.zeros((gpu_pages, *shape), np.float32) for _ in range(2 * layers)]  # every layer's K and V
    host = [np.zeros((host_pages, *shape), np.float32) for _ in range(2 * layers)]
    mover = kvcore.PagedKVMover(gpu, host)
    c = kvcore.PrefixCache(PT, gpu_pages, host_pages, "lru", page_bytes=2 * layers * PT * heads * dim * 4,
                           mover=mover)
    seq = toks(1, 2, 3, 4)
    pages = c.alloc(4, now=1)
    kv = [rng.standard_normal((4, *shape)).astype(np.float32) for _ in gpu]  # the engine's prefill
    for g, x in zip(gpu, kv):
        g[pages] = x
    c.insert(seq, pages, now=1)

    evicted = c.evict(3, now=2)  # the last three pages go to the host
    assert list(evicted) == list(pages[1:][::-1])
    for g, h, x in zip(gpu, host, kv):
        for i in range(1, 4):  # each admitted page's bytes are in some host slot
            assert any(np.array_equal(h[s], x[i]) for s in range(host_pages)), f"page {i} not on the host"
        g[evicted] = -1.0  # the freed GPU pages get overwritten by other work

    m = c.match(seq, now=3)
    assert list(m.gpu_pages) == [pages[0]] and m.host_tokens == 3 * PT
    c.lock(m.handle)
    ticket = c.prefetch(m.handle, now=3)
    ticket.wait()
    c.unlock(m.handle)
    assert ticket.pages == 3
    m = c.match(seq, now=4)
    assert m.host_tokens == 0
    for g, x in zip(gpu, kv):  # the bytes came back into the new GPU pages, in path order
        np.testing.assert_array_equal(g[m.gpu_pages], x)
    s = c.stats()
    assert s["bytes_to_host"] == s["bytes_from_host"] == 3 * 2 * layers * PT * heads * dim * 4


def test_paged_kv_mover_argument_checks():
    with pytest.raises(ValueError, match="host_caches"):
        kvcore.PagedKVMover([np.zeros((2, 4))], [])
    m = kvcore.PagedKVMover([np.zeros((2, 4), np.float32)], [np.zeros((1, 4), np.float32)])
    assert m.done(0) and m.wait(0) is None and m.load([0], [1]) == 0


def test_a_python_mover_sees_every_transfer():
    calls = []

    class Recorder:
        def offload(self, gpu_pages, host_slots):
            calls.append(("offload", list(gpu_pages), list(host_slots)))

        def load(self, host_slots, gpu_pages):
            calls.append(("load", list(host_slots), list(gpu_pages)))
            return 7

        def done(self, token):
            calls.append(("done", token))
            return False

        def wait(self, token):
            calls.append(("wait", token))

    c = kvcore.PrefixCache(PT, 2, 2, "lru", mover=Recorder())
    _, a = serve(c, toks(1, 2), now=1)
    c.evict(2, now=2)
    assert [x[0] for x in calls] == ["offload", "offload"]
    assert [x[1] for x in calls] == [[a[1]], [a[0]]]
    slots = [x[2][0] for x in calls]
    assert sorted(slots) == [0, 1]
    ticket = c.prefetch(c.match(toks(1, 2), now=3).handle, now=3)
    load = calls[2]
    assert load[0] == "load" and load[1] == slots[::-1] and load[2] == list(ticket.gpu_pages)
    assert ticket.done() is False and calls[-1] == ("done", 7)
    ticket.wait()
    assert calls[-1] == ("wait", 7)


# ---------------------------------------------------------------------------------------------
# attach_pool: a PagePool shrinking takes pages back from the cache


def test_attach_pool_gives_cold_pages_back_to_a_shrinking_pool():
    n = 6
    pool = kvcore.PagePool("cpu", n * PB, page_bytes=PB)
    kv = kvcore.VirtualTensor(pool, [n * PB], "uint8")  # cache page p = tensor page p
    c = kvcore.PrefixCache(1, n, 0, "lru")
    released = []

    def release_pages(ids):
        released.append(sorted(int(p) for p in ids))
        count = 0
        for p in ids:
            if kv.is_mapped(int(p)):
                kv.unmap(int(p), 1)
                count += 1
        return count

    callback = c.attach_pool(pool, release_pages)
    assert isinstance(callback, int)
    paths = {}
    for t, seq in enumerate([[10, 11], [20, 21], [30, 31]], start=1):
        pages = c.alloc(2, now=t)
        for p in pages:
            kv.map(int(p), 1)
        c.insert(np.asarray(seq, np.int32), pages, now=t)
        paths[seq[0]] = sorted(int(p) for p in pages)
    assert pool.free_pages == 0
    c.match(np.asarray([10, 11], np.int32), now=5)  # [20, 21] is now the coldest

    pool.resize(n - 2)
    assert pool.capacity_pages == n - 2 and released == [paths[20]]
    assert c.stats()["gpu"]["capacity_pages"] == n - 2
    assert c.match(np.asarray([20, 21], np.int32), now=6).handle == -1
    assert c.match(np.asarray([10, 11], np.int32), now=6).gpu_tokens == 2
    assert kv.mapped_pages() == sorted(paths[10] + paths[30])

    # Locked pages cannot be given back: the pool's resize fails, both capacities unchanged.
    for seq in ([10, 11], [30, 31]):
        c.lock(c.match(np.asarray(seq, np.int32), now=7).handle)
    with pytest.raises(MemoryError):
        pool.resize(1)
    assert pool.capacity_pages == n - 2 and c.stats()["gpu"]["capacity_pages"] == n - 2
    pool.remove_reclaim(callback)
    kv.free()


# ---------------------------------------------------------------------------------------------
# regressions of bugs these tests found


def test_failed_alloc_leaves_the_cache_intact():
    c = kvcore.PrefixCache(PT, 4, 0, "lru")
    serve(c, toks(1, 2, 3, 4), now=1)
    with pytest.raises(MemoryError):
        c.alloc(5, now=2)
    assert c.match(toks(1, 2, 3, 4), now=3).gpu_tokens == 4 * PT


def test_an_empty_token_list_is_an_empty_prompt():
    c = kvcore.PrefixCache(PT, 2, 0, "lru")
    assert c.match([], now=1).handle == -1
    assert c.insert([], [], now=1) == 0


def test_scalar_tokens_and_page_ids_raise_type_error():
    c = kvcore.PrefixCache(1, 2, 0, "lru")
    with pytest.raises(TypeError):
        c.match(np.int32(5))
    with pytest.raises(TypeError):
        c.free(np.int64(0))


def test_a_failing_mover_leaks_nothing():
    class Failing:
        def offload(self, gpu_pages, host_slots):
            raise RuntimeError("copy failed")

        def load(self, host_slots, gpu_pages):
            return 0

        def done(self, token):
            return True

        def wait(self, token):
            pass

    c = kvcore.PrefixCache(PT, 1, 1, "lru", mover=Failing())
    serve(c, toks(1), now=1)
    with pytest.raises(RuntimeError, match="copy failed"):
        c.evict(1, now=2)
    s = c.stats()
    assert s["host"]["used_pages"] == 0 and s["gpu"]["evictions"] == 0 and s["gpu"]["cached_pages"] == 1


def test_a_cycle_through_the_mover_is_collected():
    class Mover:
        def offload(self, gpu_pages, host_slots):
            pass

        def load(self, host_slots, gpu_pages):
            return 0

        def done(self, token):
            return True

        def wait(self, token):
            pass

    m = Mover()
    c = kvcore.PrefixCache(PT, 1, 1, "lru", mover=m)
    m.cache = c  # e.g. a mover that reports back to its cache
    ref = weakref.ref(m)
    del m, c
    gc.collect()
    alive = ref()
    if alive is not None:
        alive.cache = None  # break the cycle by hand so the process does not leak it
    assert alive is None


# ---------------------------------------------------------------------------------------------
# the trace replay benchmark (kvcore.bench.prefix_replay)


def _prefix_replay():
    """The replay module of this source tree (the installed kvcore may be an older build)."""
    src = pathlib.Path(__file__).resolve().parents[2] / "python" / "kvcore" / "bench" / "prefix_replay.py"
    installed = importlib.import_module("kvcore.bench")
    if src.exists() and pathlib.Path(installed.__file__).resolve().parent != src.parent:
        spec = importlib.util.spec_from_file_location("kvcore.bench.prefix_replay", src)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # relative imports resolve against the installed kvcore.bench
        return mod
    return importlib.import_module("kvcore.bench.prefix_replay")


REQUIRED = ("gpu_hit_rate", "host_hit_rate", "total_hit_rate", "host_writes_per_block")


def _write_trace(path, requests):
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps(r) + "\n")


def test_replay_of_a_tiny_trace_by_hand(tmp_path):
    pr = _prefix_replay()
    path = tmp_path / "t.jsonl"
    _write_trace(path, [
        {"timestamp": 0, "input_length": 1536, "output_length": 1, "hash_ids": [0, 1, 2]},
        {"timestamp": 1000, "input_length": 1100, "output_length": 1, "hash_ids": [0, 1, 3]},
        {"timestamp": 2000, "input_length": 600, "output_length": 1, "hash_ids": [4, 5]},
        {"timestamp": 3000, "input_length": 1600, "output_length": 1, "hash_ids": [0, 1, 2, 6]},
    ])
    trace = pr.load_trace(path)
    assert trace.prompt_blocks == 12 and trace.unique_blocks == 7
    assert trace.ceiling == pytest.approx((2 + 3) / 12)
    # Everything fits on the GPU: every policy reaches the ceiling, with no host traffic.
    res = pr.replay(path, gpu_blocks=100, host_blocks=0, policies=["lru", "hot"])
    for r in res.values():
        assert r["gpu_hit_rate"] == pytest.approx(5 / 12) and r["host_hit_rate"] == 0
        assert r["host_writes_per_block"] == 0 and r["ceiling"] == pytest.approx(5 / 12)
    # GPU of 3 blocks, LRU writing every evicted block to the host. Partial last blocks (3, 5, 6)
    # are served from a page of their own and never cached. Request 2 hits [0, 1] on the GPU
    # (evicting 2 for its partial block); request 3 evicts 1; request 4 finds 0 on the GPU and 1, 2
    # on the host, prefetches them (evicting 4) and then has no room for block 6 next to its
    # locked path.
    r = pr.replay(path, gpu_blocks=3, host_blocks=10, policies="lru")["lru"]
    assert r["gpu_hit_rate"] == pytest.approx(3 / 12)
    assert r["host_hit_rate"] == pytest.approx(2 / 12)
    assert r["total_hit_rate"] == pytest.approx(5 / 12)
    assert r["host_writes_per_block"] == pytest.approx(3 / 12)
    assert r["requests_not_cached"] == 1 and r["prefetched_blocks"] == 2
    cm = r["cost_model"]
    saved = 3 * cm["gpu_hit_saves_s"] + 2 * cm["host_hit_saves_s"]
    assert r["prefill_seconds_saved"] == pytest.approx(saved)
    assert cm["kv_bytes_per_block"] == 64 << 20


def test_replay_of_a_synthetic_workload_stays_within_the_ceiling():
    pr = _prefix_replay()
    trace = pr.synthetic_trace(400, seed=3)
    res = pr.replay(trace, policies=["lru", "hot"])
    for p, r in res.items():
        for k in REQUIRED:
            assert 0.0 <= r[k] <= 1.0 + 1e-12, (p, k, r[k])
        assert r["total_hit_rate"] == pytest.approx(r["gpu_hit_rate"] + r["host_hit_rate"])
        assert r["total_hit_rate"] <= r["ceiling"] + 1e-12
        assert r["gpu_blocks"] == max(1, round(0.01 * trace.unique_blocks))
        assert r["host_blocks"] == round(0.10 * trace.unique_blocks)
        assert r["replay_seconds"] > 0 and r["pages_per_second"] > 0
    unlimited = pr.replay(trace, gpu_blocks=10**6, host_blocks=0, policies="lru,hot")
    for r in unlimited.values():
        assert r["total_hit_rate"] == pytest.approx(trace.ceiling)


def test_replay_cli_writes_json(tmp_path, capsys):
    pr = _prefix_replay()
    path = tmp_path / "t.jsonl"
    trace = pr.synthetic_trace(200, seed=1)
    _write_trace(path, [{"timestamp": int(t * 1000), "input_length": 512 * len(b), "output_length": 1,
                         "hash_ids": b.tolist()} for t, b in zip(trace.times, trace.blocks)])
    out = tmp_path / "r.json"
    assert pr.main(["--trace", str(path), "--gpu-blocks", "8", "--host-blocks", "40", "--policy", "lru",
                    "--policy", "hot", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"lru", "hot"}
    for r in data.values():
        assert all(k in r for k in REQUIRED + ("unique_blocks", "ceiling", "prefill_seconds_saved"))
        assert r["gpu_blocks"] == 8 and r["host_blocks"] == 40
    text = capsys.readouterr().out
    assert "lru" in text and "hot" in text and "cost model" in text and "goal" in text
    assert pr.parse_policies("hot,lru") == ["hot", "lru"] and pr.parse_policies(None) == ["lru", "hot"]
    with pytest.raises(ValueError):
        pr.parse_policies(["lru,fifo"])
    # hot:BUDGET variants: hot with another host-write budget, compared in the same run.
    assert pr.split_policy("hot:0.6") == ("hot", {"host_write_budget": 0.6})
    assert pr.split_policy("hot:inf") == ("hot", {"host_write_budget": float("inf")})
    for bad in ["lru:0.3", "hot:x", "hot:-1", "hot:nan", "fifo:1"]:
        with pytest.raises(ValueError):
            pr.parse_policies(bad)
    trace2 = pr.load_trace(path)
    variants = pr.replay(trace2, 8, 40, ["hot:0", "hot:inf", "lru"])
    assert list(variants) == ["hot:0", "hot:inf", "lru"]
    assert variants["hot:0"]["budget_admitted"] == 0 and variants["hot:inf"]["admissions_rejected"] == 0
    assert variants["hot:inf"]["host_writes"] == variants["lru"]["host_writes"] > 0
    with pytest.raises(SystemExit):
        pr.main(["--trace", str(path), "--policy", "fifo"])
    with pytest.raises(SystemExit):
        pr.main(["--trace", str(tmp_path / "missing.jsonl")])


def test_bench_cli_dispatches_prefix_replay(tmp_path):
    """`python -m kvcore.bench prefix-replay ...` reaches the replay; `python -m kvcore.bench <names>`
    still lists the benchmarks, prefix-cache among them."""
    bench = importlib.import_module("kvcore.bench")
    if "prefix-cache" not in bench.BENCHMARKS:
        pytest.skip("the installed kvcore predates the prefix-replay benchmark")
    from kvcore.bench.__main__ import main as bench_main

    path, out = tmp_path / "t.jsonl", tmp_path / "r.json"
    _write_trace(path, [{"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [0, 1]},
                        {"timestamp": 5, "input_length": 1024, "output_length": 1, "hash_ids": [0, 2]}])
    assert bench_main(["prefix-replay", "--trace", str(path), "--gpu-blocks", "4", "--policy", "hot",
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data) == ["hot"] and data["hot"]["total_hit_rate"] == pytest.approx(1 / 4)
    with pytest.raises(SystemExit):
        bench_main(["no-such-benchmark"])
