"""Random sequences of PagePool / VirtualTensor operations on the CPU against a pure-Python model.

The model knows, for every page of every tensor, whether it is unmapped, mapped (and to which
physical page, so aliases share) or offloaded (and the bytes it must come back with), plus the bytes
every physical page holds. After every step the real pool must agree: contents read back exactly
(unmapped and offloaded pages read zeros), physical pages are shared only by aliases, and the pool's
counters match. Operations the model predicts to fail must raise the predicted exception and change
nothing. At teardown everything is freed and the pool must be entirely free again.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import kvcore

PB = 4096
START_PAGES = 6
HOST_PAGES = 3
MAX_TENSORS = 5
DTYPES = {"uint8": 1, "float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "int64": 8}

UNMAPPED, MAPPED, OFFLOADED = "unmapped", "mapped", "offloaded"


def random_page(seed: int) -> bytes:
    """A page of random bytes, none zero."""
    return np.random.default_rng(seed).integers(1, 256, PB, dtype=np.uint8).tobytes()


def page_array(vt: kvcore.VirtualTensor, page: int) -> np.ndarray:
    return np.from_dlpack(vt.view(page * PB, [PB], "uint8"))


class TensorModel:
    def __init__(self, vt: kvcore.VirtualTensor, num_pages: int):
        self.vt = vt
        self.num_pages = num_pages
        self.freed = False
        self.state = [UNMAPPED] * num_pages
        self.phys = [-1] * num_pages  # MAPPED: the physical page id
        self.host: list[bytes | None] = [None] * num_pages  # OFFLOADED: the saved contents
        # A stray write to a page with nothing mapped lands in private memory the model does not
        # track; such a page reads back unspecified bytes until it is mapped again.
        self.stray = [False] * num_pages


ZERO_PAGE = bytes(PB)


class MemoryMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = kvcore.PagePool("cpu", START_PAGES * PB, HOST_PAGES * PB, page_bytes=PB)
        self.capacity = START_PAGES
        self.tensors: list[TensorModel] = []
        # physical page id -> {"members": set of (tensor index, page), "data": bytes}
        self.phys: dict[int, dict] = {}
        self.reclaim_enabled = False
        self.reclaim_calls: list[int] = []
        self.pool.on_reclaim(self._reclaim)
        # A tensor of another pool, for alias-across-pools checks.
        self.foreign_pool = kvcore.PagePool("cpu", PB, page_bytes=PB)
        self.foreign = kvcore.VirtualTensor(self.foreign_pool, [PB], "uint8")
        self.foreign.map(0, 1)

    # --- model helpers ---------------------------------------------------------------------

    def live(self) -> list[int]:
        return [i for i, t in enumerate(self.tensors) if not t.freed]

    def free_count(self) -> int:
        return self.capacity - len(self.phys)

    def host_used(self) -> int:
        return sum(t.state.count(OFFLOADED) for t in self.tensors if not t.freed)

    def pick(self, index: int) -> TensorModel:
        """A live tensor (there always is one; use_freed_tensor covers freed ones)."""
        live = [t for t in self.tensors if not t.freed]
        return live[index % len(live)]

    def tindex(self, t: TensorModel) -> int:
        return self.tensors.index(t)

    def drop_mapping(self, t: TensorModel, page: int) -> None:
        pid = t.phys[page]
        entry = self.phys[pid]
        entry["members"].discard((self.tindex(t), page))
        if not entry["members"]:
            del self.phys[pid]
        t.phys[page] = -1

    def add_fresh_mapping(self, t: TensorModel, page: int, data: bytes | None) -> None:
        """A page just mapped to a page of its own: records the physical id the pool chose."""
        pid = t.vt.physical_page(page)
        assert pid >= 0
        assert pid not in self.phys, f"physical page {pid} handed out while still mapped elsewhere"
        if data is None:  # fresh pages hold arbitrary bytes: whatever they read now
            data = page_array(t.vt, page).tobytes()
        self.phys[pid] = {"members": {(self.tindex(t), page)}, "data": data}
        t.state[page] = MAPPED
        t.phys[page] = pid
        t.stray[page] = False

    @staticmethod
    def guide(t: TensorModel, state: str, first: int, count: int, guided: bool, k: int) -> tuple[int, int]:
        """When `guided`, replaces (first, count) by a sub-range of a run of pages in `state` (so
        most guided calls are valid); otherwise returns them as drawn (often invalid)."""
        if not guided:
            return first, count
        runs, start = [], None
        for p in range(t.num_pages + 1):
            inside = p < t.num_pages and t.state[p] == state
            if inside and start is None:
                start = p
            elif not inside and start is not None:
                runs.append((start, p - start))
                start = None
        if not runs:
            return first, count
        run_first, run_len = runs[k % len(runs)]
        n = 1 + (k // 7) % run_len
        return run_first + (k // 3) % (run_len - n + 1), n

    def range_ok(self, t: TensorModel, first: int, count: int) -> bool:
        return first >= 0 and count >= 0 and first + count <= t.num_pages

    def expect_failure(self, exc_type, fn, *args) -> None:
        """fn(*args) must raise exc_type; the invariants then check nothing changed."""
        try:
            fn(*args)
        except exc_type:
            return
        raise AssertionError(f"{fn.__name__}{args} did not raise {exc_type.__name__}")

    def _reclaim(self, needed: int) -> int:
        """The pool's reclaim callback: when enabled, unmaps whole physical pages (every mapping of
        each, lowest id first) until `needed` are free."""
        self.reclaim_calls.append(needed)
        if not self.reclaim_enabled:
            return 0
        freed = 0
        for pid in sorted(self.phys):
            if freed >= needed:
                break
            for ti, page in sorted(self.phys[pid]["members"]):
                t = self.tensors[ti]
                t.vt.unmap(page, 1)
                t.state[page] = UNMAPPED
                self.drop_mapping(t, page)
            freed += 1
        return freed

    # --- rules -----------------------------------------------------------------------------

    @initialize()
    def first_tensors(self):
        # One freed tensor that is never dropped, so every rule always has a tensor to pick.
        self._create(1, "uint8", 0)
        self.tensors[0].vt.free()
        self._forget(self.tensors[0])
        self._create(3, "uint8", 0)
        self._create(2, "float32", 7)
        self._create(4, "bfloat16", 1)

    def _create(self, pages: int, dtype: str, slack: int) -> None:
        itemsize = DTYPES[dtype]
        elems = (pages * PB) // itemsize - slack  # slack < one page: the last page is partly used
        shape = [elems] if elems % 2 else [2, elems // 2]
        vt = kvcore.VirtualTensor(self.pool, shape, dtype)
        assert vt.num_pages == pages and vt.nbytes == elems * itemsize
        self.tensors.append(TensorModel(vt, pages))

    @precondition(lambda self: len(self.live()) < MAX_TENSORS)
    @rule(pages=st.integers(1, 5), dtype=st.sampled_from(sorted(DTYPES)), slack=st.integers(0, 100))
    def create_tensor(self, pages, dtype, slack):
        self._create(pages, dtype, slack)

    @rule(ti=st.integers(0, 99), first=st.integers(-1, 5), count=st.integers(-1, 3), guided=st.booleans(),
          k=st.integers(0, 999))
    def map(self, ti, first, count, guided, k):
        t = self.pick(ti)
        first, count = self.guide(t, UNMAPPED, first, count, guided, k)
        if not self.range_ok(t, first, count):
            return self.expect_failure(IndexError, t.vt.map, first, count)
        pages = range(first, first + count)
        if any(t.state[p] != UNMAPPED for p in pages):
            return self.expect_failure(ValueError, t.vt.map, first, count)
        if self.free_count() < count:
            return self.expect_failure(MemoryError, t.vt.map, first, count)
        t.vt.map(first, count)
        for p in pages:
            self.add_fresh_mapping(t, p, None)

    @rule(ti=st.integers(0, 99), first=st.integers(-1, 5), count=st.integers(-1, 3), guided=st.booleans(),
          k=st.integers(0, 999))
    def unmap(self, ti, first, count, guided, k):
        t = self.pick(ti)
        first, count = self.guide(t, MAPPED, first, count, guided, k)
        if not self.range_ok(t, first, count):
            return self.expect_failure(IndexError, t.vt.unmap, first, count)
        pages = range(first, first + count)
        if any(t.state[p] == UNMAPPED for p in pages):
            return self.expect_failure(ValueError, t.vt.unmap, first, count)
        t.vt.unmap(first, count)
        for p in pages:
            if t.state[p] == MAPPED:
                self.drop_mapping(t, p)
            t.host[p] = None
            t.state[p] = UNMAPPED

    @rule(ti=st.integers(0, 99), page=st.integers(-1, 5), oi=st.integers(0, 99), other_page=st.integers(-1, 5),
          guided=st.booleans(), k=st.integers(0, 999))
    def alias(self, ti, page, oi, other_page, guided, k):
        t, o = self.pick(ti), self.pick(oi)
        if guided:  # a source tensor with a mapped page, when there is one
            sources = [x for x in self.tensors if not x.freed and MAPPED in x.state]
            o = sources[oi % len(sources)] if sources else o
        page = self.guide(t, UNMAPPED, page, 1, guided, k)[0]
        other_page = self.guide(o, MAPPED, other_page, 1, guided, k // 11)[0]
        args = (page, o.vt, other_page)
        if not (0 <= page < t.num_pages and 0 <= other_page < o.num_pages):
            return self.expect_failure(IndexError, t.vt.alias, *args)
        if t.state[page] != UNMAPPED or o.state[other_page] != MAPPED:
            return self.expect_failure(ValueError, t.vt.alias, *args)
        t.vt.alias(*args)
        pid = o.phys[other_page]
        assert t.vt.physical_page(page) == pid
        self.phys[pid]["members"].add((self.tindex(t), page))
        t.state[page] = MAPPED
        t.phys[page] = pid
        t.stray[page] = False

    @rule(ti=st.integers(0, 99), page=st.integers(0, 5))
    def alias_across_pools(self, ti, page):
        t = self.pick(ti)
        self.expect_failure(ValueError, t.vt.alias, page, self.foreign, 0)

    @rule(ti=st.integers(0, 99), first=st.integers(-1, 5), count=st.integers(-1, 3), guided=st.booleans(),
          k=st.integers(0, 999))
    def offload(self, ti, first, count, guided, k):
        t = self.pick(ti)
        first, count = self.guide(t, MAPPED, first, count, guided, k)
        if not self.range_ok(t, first, count):
            return self.expect_failure(IndexError, t.vt.offload, first, count)
        pages = range(first, first + count)
        if any(t.state[p] != MAPPED for p in pages):
            return self.expect_failure(ValueError, t.vt.offload, first, count)
        if HOST_PAGES - self.host_used() < count:
            return self.expect_failure(MemoryError, t.vt.offload, first, count)
        tr = t.vt.offload(first, count)
        tr.wait()
        assert tr.done() and tr.bytes == count * PB
        for p in pages:
            t.host[p] = self.phys[t.phys[p]]["data"]
            self.drop_mapping(t, p)
            t.state[p] = OFFLOADED

    @rule(ti=st.integers(0, 99), first=st.integers(-1, 5), count=st.integers(-1, 3), guided=st.booleans(),
          k=st.integers(0, 999))
    def prefetch(self, ti, first, count, guided, k):
        t = self.pick(ti)
        first, count = self.guide(t, OFFLOADED, first, count, guided, k)
        if not self.range_ok(t, first, count):
            return self.expect_failure(IndexError, t.vt.prefetch, first, count)
        pages = range(first, first + count)
        if any(t.state[p] != OFFLOADED for p in pages):
            return self.expect_failure(ValueError, t.vt.prefetch, first, count)
        if self.free_count() < count:
            return self.expect_failure(MemoryError, t.vt.prefetch, first, count)
        tr = t.vt.prefetch(first, count)
        tr.wait()
        assert tr.done() and tr.bytes == count * PB
        for p in pages:
            data, t.host[p] = t.host[p], None
            self.add_fresh_mapping(t, p, data)

    @rule(ti=st.integers(0, 99), nbytes=st.integers(-1, 5 * PB + 1))
    def ensure(self, ti, nbytes):
        t = self.pick(ti)
        if not 0 <= nbytes <= t.num_pages * PB:
            return self.expect_failure(IndexError, t.vt.ensure, nbytes)
        pages = range(-(-nbytes // PB))
        if any(t.state[p] == OFFLOADED for p in pages):
            return self.expect_failure(ValueError, t.vt.ensure, nbytes)
        missing = [p for p in pages if t.state[p] == UNMAPPED]
        if self.free_count() < len(missing):
            return self.expect_failure(MemoryError, t.vt.ensure, nbytes)
        t.vt.ensure(nbytes)
        for p in missing:
            self.add_fresh_mapping(t, p, None)

    @rule(ti=st.integers(0, 99), page=st.integers(0, 4), seed=st.integers(0, 2**32 - 1),
          framework=st.sampled_from(["numpy", "torch"]))
    def write(self, ti, page, seed, framework):
        """Random bytes through a DLPack view of one page (a stray write when nothing is mapped)."""
        t = self.pick(ti)
        page %= t.num_pages
        data = random_page(seed)
        if framework == "torch":
            import torch

            view = torch.from_dlpack(t.vt.view(page * PB, [PB // 4], "int32"))
            view.copy_(torch.frombuffer(bytearray(data), dtype=torch.int32))
        else:
            view = page_array(t.vt, page)
            view[:] = np.frombuffer(data, np.uint8)
        del view
        if t.state[page] == MAPPED:
            self.phys[t.phys[page]]["data"] = data
        else:
            t.stray[page] = True

    @rule(ti=st.integers(0, 99))
    def read_whole_tensor(self, ti):
        """The full-shape DLPack view (numpy, or torch for bfloat16) agrees page by page."""
        t = self.pick(ti)
        if t.vt.dtype == "bfloat16":
            import torch

            raw = torch.from_dlpack(t.vt).view(torch.int16).numpy().tobytes()
        else:
            raw = np.from_dlpack(t.vt).tobytes()
        assert len(raw) == t.vt.nbytes
        for p in range(t.num_pages):
            want = self.expected(t, p)
            if want is not None:
                lo = p * PB
                assert raw[lo:lo + PB] == want[:len(raw[lo:lo + PB])], f"tensor {self.tindex(t)} page {p}"

    @rule(delta=st.integers(-4, 3), enable_reclaim=st.booleans())
    def resize(self, delta, enable_reclaim):
        """Grows or shrinks by a few pages (a random walk around the start size; below zero: -1)."""
        target = max(-1, min(12, self.capacity + delta))
        self.reclaim_enabled = enable_reclaim
        self.reclaim_calls.clear()
        if target < 0:
            self.expect_failure(ValueError, self.pool.resize, target)
            assert self.reclaim_calls == []
            return
        need = self.capacity - target
        short = need - self.free_count()
        if need <= 0 or short <= 0:
            self.pool.resize(target)
            self.capacity = target
            assert self.reclaim_calls == []
            return
        # The callback runs (and updates the model as it unmaps); then the pool decides.
        can_free = len(self.phys) if enable_reclaim else 0
        if can_free >= short:
            self.pool.resize(target)
            self.capacity = target
        else:
            self.expect_failure(MemoryError, self.pool.resize, target)
        assert self.reclaim_calls == [short]
        self.reclaim_enabled = False

    @rule(ti=st.integers(0, 99), oi=st.integers(0, 99),
          op=st.sampled_from(["map", "unmap", "offload", "prefetch", "ensure", "alias_from", "alias_onto",
                              "is_mapped", "mapped_pages", "view", "free"]))
    def use_freed_tensor(self, ti, oi, op):
        """Any use of a freed tensor raises KVCoreError (checked before the arguments)."""
        held = [t for t in self.tensors if t.freed and t.vt is not None]
        t, o = held[ti % len(held)], self.pick(oi)
        vt = t.vt
        calls = {
            "map": (vt.map, 0, 1), "unmap": (vt.unmap, 0, 1), "offload": (vt.offload, 0, 1),
            "prefetch": (vt.prefetch, 0, 1), "ensure": (vt.ensure, 1), "alias_from": (vt.alias, 0, o.vt, 0),
            "alias_onto": (o.vt.alias, 0, vt, 0), "is_mapped": (vt.is_mapped, 0),
            "mapped_pages": (vt.mapped_pages,), "view": (vt.view, 0, [1], "uint8"), "free": (vt.free,),
        }
        fn, *args = calls[op]
        self.expect_failure(kvcore.KVCoreError, fn, *args)

    @precondition(lambda self: len(self.live()) >= 2)
    @rule(ti=st.integers(0, 99))
    def free_tensor(self, ti):
        t = self.pick(ti)
        t.vt.free()
        self._forget(t)

    @rule(ti=st.integers(0, 99), framework=st.sampled_from(["numpy", "torch", "view"]))
    def free_refused_while_viewed(self, ti, framework):
        t = self.pick(ti)
        if framework == "torch":
            import torch

            view = torch.from_dlpack(t.vt)
        elif framework == "numpy" and t.vt.dtype != "bfloat16":
            view = np.from_dlpack(t.vt)
        else:
            view = t.vt.view(0, [1], "uint8")
        self.expect_failure(kvcore.KVCoreError, t.vt.free)
        assert not t.vt.is_freed
        del view

    @precondition(lambda self: len(self.live()) >= 2)
    @rule(ti=st.integers(0, 99))
    def drop_without_free(self, ti):
        """Dropping the last reference releases everything, like free()."""
        t = self.pick(ti)
        t.vt = None  # the only reference: released at once (no cycle holds it)
        self._forget(t)

    def _forget(self, t: TensorModel) -> None:
        for p in range(t.num_pages):
            if t.state[p] == MAPPED:
                self.drop_mapping(t, p)
            t.state[p] = UNMAPPED
            t.host[p] = None
        t.freed = True

    # --- invariants ------------------------------------------------------------------------

    def expected(self, t: TensorModel, page: int) -> bytes | None:
        if t.state[page] == MAPPED:
            return self.phys[t.phys[page]]["data"]
        return None if t.stray[page] else ZERO_PAGE

    @invariant()
    def contents_match(self):
        for t in self.tensors:
            if t.freed:
                continue
            for p in range(t.num_pages):
                want = self.expected(t, p)
                if want is not None:
                    got = page_array(t.vt, p).tobytes()
                    assert got == want, f"tensor {self.tindex(t)} page {p} ({t.state[p]}) has wrong contents"

    @invariant()
    def page_states_match(self):
        for ti, t in enumerate(self.tensors):
            if t.freed:
                assert t.vt is None or t.vt.is_freed
                continue
            assert not t.vt.is_freed
            assert t.vt.mapped_pages() == [p for p in range(t.num_pages) if t.state[p] == MAPPED]
            for p in range(t.num_pages):
                assert t.vt.is_offloaded(p) == (t.state[p] == OFFLOADED)
                assert t.vt.physical_page(p) == t.phys[p]
                if t.state[p] == MAPPED:
                    assert (ti, p) in self.phys[t.phys[p]]["members"]

    @invariant()
    def physical_pages_shared_only_by_aliases(self):
        owners: dict[int, set] = {}
        for ti, t in enumerate(self.tensors):
            if t.freed:
                continue
            for p in range(t.num_pages):
                pid = t.vt.physical_page(p)
                if pid >= 0:
                    owners.setdefault(pid, set()).add((ti, p))
        assert owners == {pid: e["members"] for pid, e in self.phys.items()}

    @invariant()
    def pool_counters_match(self):
        s = self.pool.stats()
        mapped = len(self.phys)
        shared = sum(1 for e in self.phys.values() if len(e["members"]) > 1)
        offloaded = self.host_used()
        assert s["pages_total"] == self.capacity == self.pool.capacity_pages
        assert s["pages_mapped"] == mapped
        assert s["pages_shared"] == shared
        assert s["pages_releasing"] == 0
        assert s["pages_free"] == self.capacity - mapped == self.pool.free_pages
        assert s["pages_free"] + s["pages_mapped"] + s["pages_releasing"] == s["pages_total"]
        assert s["pages_offloaded"] == offloaded
        assert s["host_pages_total"] == HOST_PAGES
        assert s["host_pages_free"] == HOST_PAGES - offloaded == self.pool.host_free_pages
        live = [t for t in self.tensors if not t.freed]
        assert s["tensors"] == len(live)
        assert s["reserved_bytes"] == sum(t.num_pages for t in live) * PB

    def teardown(self):
        for t in self.tensors:
            if not t.freed:
                t.vt.free()
                self._forget(t)
        assert self.phys == {}
        s = self.pool.stats()
        assert s["pages_free"] == s["pages_total"] == self.capacity
        assert s["pages_mapped"] == s["pages_shared"] == s["pages_releasing"] == 0
        assert s["host_pages_free"] == HOST_PAGES and s["pages_offloaded"] == 0
        assert s["tensors"] == 0 and s["reserved_bytes"] == 0
        self.pool.resize(0)  # nothing leaked: every page can be given back
        assert self.pool.capacity_pages == 0
        self.foreign.free()


MemoryMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoryStateMachine = MemoryMachine.TestCase
