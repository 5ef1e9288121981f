"""Benchmarks of the virtual-memory tensors (kvcore.memory): PagePool and VirtualTensor.

Cases, per physical page of the pool (2 MiB):
  create            page creation latency: growing the pool (CUDA: cuMemCreate; CPU: memfd fallocate)
  map / unmap       latency per page, one page per call and 64-page runs, from wall time and from the
                    pool's driver-call statistics (CUDA map: cuMemUnmap of the zero page, cuMemMap,
                    cuMemSetAccess; unmap puts the zero page back)
  alias             mapping another tensor's physical page (a shared prefix)
  grow              growing a tensor by 1 GiB (quick: 64 MiB) in page steps with ensure(); peer: the
                    same growth with torch's caching allocator after empty_cache() (CUDA), np.ones on
                    the CPU (where each kvcore step then writes its page too, as np.ones does: memfd
                    pages are allocated at pool creation but, like np.empty, faulted in at first use)
  offload/prefetch  GB/s of moving N pages to the host tier and back; peer: a plain pinned memcpy of
                    the same bytes (CUDA: torch .copy_(non_blocking=True) timed with events; CPU:
                    np.copyto)
  CUDA only: unmap and map while streams are busy (an unmap's release is ordered behind an event on
  its stream, so the call must return at once), and a deferred release processed while another
  stream is busy (a device-wide synchronization there would wait for that stream's kernel).

Every case checks contents before timing: written pages read back, unmapped and offloaded pages
read zeros, prefetched pages hold exactly what was offloaded - a broken mapping is never timed.
Latency rows put µs per page in `time_us` and 0 in `gbps`; details (per-call times, driver-call
means) go to `extra`. Goals on an H200 are reported in `extra` and under the table: map+access at
most 40 µs per 2 MiB page, offload/prefetch at least 80% of the pinned-memcpy bandwidth, no
synchronization on the unmap path.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

import kvcore

from ._harness import Device, Row

MAP_GOAL_US = 40.0      # per 2 MiB page, map + access (the published A100 figure is ~37 µs)
COPY_GOAL_PCT = 80.0    # offload / prefetch bandwidth, % of a pinned memcpy of the same bytes
RUN = 64                # pages per call in the run cases
BUSY_KERNEL_MS = 50.0   # the kernel that keeps a stream busy in the CUDA "while busy" cases

_perf = time.perf_counter


def _size(nbytes: int) -> str:
    if nbytes >= 1 << 30 and nbytes % (1 << 30) == 0:
        return f"{nbytes >> 30}GiB"
    if nbytes >= 1 << 20:
        return f"{nbytes >> 20}MiB"
    return f"{nbytes >> 10}KiB"


def _median_us(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e6


class _Calls:
    """A snapshot of the pool's driver-call statistics (count, total µs per call name)."""

    def __init__(self, pool: kvcore.PagePool):
        self.calls = {name: (c["count"], c["mean_us"] * c["count"])
                      for name, c in pool.stats()["driver_calls"].items()}

    def since(self, earlier: "_Calls", into: dict[str, list[float]]) -> None:
        """Adds the calls made since `earlier` to `into` (name -> [count, total µs])."""
        for name, (count, total) in self.calls.items():
            c0, t0 = earlier.calls.get(name, (0, 0.0))
            if count > c0:
                acc = into.setdefault(name, [0, 0.0])
                acc[0] += count - c0
                acc[1] += total - t0


def _driver_extra(calls: dict[str, list[float]], pages: int) -> dict[str, Any]:
    """Per call name its count per page and mean µs; and the driver µs per page in all."""
    return {
        "driver_calls": {name: {"per_page": round(c / pages, 3), "mean_us": round(t / c, 3)}
                         for name, (c, t) in sorted(calls.items())},
        "driver_us_per_page": round(sum(t for _, t in calls.values()) / pages, 3),
    }


class _Ops:
    """Device-specific arrays, streams and synchronization for one benchmark device."""

    def __init__(self, dev: Device):
        self.dev = dev
        self.cuda = dev.is_cuda
        self.torch = dev.torch if dev.is_cuda else None
        self.pool_device = f"cuda:{self.torch.cuda.current_device()}" if self.cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def stream(self):
        """The stream kvcore's releases and copies are ordered on: torch's current one (CUDA)."""
        return self.torch.cuda.current_stream() if self.cuda else None

    def array(self, vt: kvcore.VirtualTensor):
        """A zero-copy view of the whole tensor: torch on CUDA, numpy on the CPU."""
        return self.torch.from_dlpack(vt) if self.cuda else np.from_dlpack(vt)

    def random(self, rng: np.random.Generator, shape: tuple[int, ...]):
        if self.cuda:
            torch = self.torch
            return torch.randint(0, 256, shape, dtype=torch.uint8, device=self.pool_device)
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    def copy(self, dst, src) -> None:
        if self.cuda:
            dst.copy_(src)
        else:
            np.copyto(dst, src)

    def equal(self, a, b) -> bool:
        return bool(self.torch.equal(a, b)) if self.cuda else bool(np.array_equal(a, b))

    def is_zero(self, a) -> bool:
        return int(self.torch.count_nonzero(a)) == 0 if self.cuda else not a.any()

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """Seconds for fn() and the work it queues (CUDA: events on the current stream, so host-side
        time inside fn counts while the GPU waits for it; CPU: wall time), and fn's result."""
        if self.cuda:
            torch = self.torch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, result
        t0 = _perf()
        result = fn()
        return _perf() - t0, result


def _fail(dev: Device, what: str) -> AssertionError:
    return AssertionError(f"kvcore.memory on {dev.kind}: {what}")


def _check_map_unmap(ops: _Ops, pool: kvcore.PagePool, rng: np.random.Generator) -> None:
    """Mapped pages hold what is written; unmapped pages read zeros and return to the pool."""
    pb, dev = pool.page_bytes, ops.dev
    vt = kvcore.VirtualTensor(pool, (2, pb), "uint8")
    arr = ops.array(vt)
    if not ops.is_zero(arr):
        raise _fail(dev, "a fresh tensor does not read zeros")
    vt.map(0, 2)
    data = ops.random(rng, (2, pb))
    ops.copy(arr, data)
    if not ops.equal(arr, data) or vt.mapped_pages() != [0, 1]:
        raise _fail(dev, "mapped pages do not hold what was written to them")
    vt.unmap(0, 2, ops.stream())
    ops.sync()
    if pool.free_pages != pool.capacity_pages:  # processes the ordered release
        raise _fail(dev, f"unmapped pages did not return to the pool ({pool.free_pages} free of "
                         f"{pool.capacity_pages})")
    if not ops.is_zero(arr):
        raise _fail(dev, "unmapped pages do not read zeros")
    del arr
    vt.free()


def _create_rows(ops: _Ops, pool: kvcore.PagePool, pages: int, reps: int) -> list[Row]:
    """Page creation (pool growth) and release (shrink) latency; leaves the pool at `pages`."""
    create_s, release_s = [], []
    create_calls: dict[str, list[float]] = {}
    release_calls: dict[str, list[float]] = {}
    for _ in range(reps):
        ops.sync()
        before = _Calls(pool)
        t0 = _perf()
        pool.resize(pages)
        create_s.append((_perf() - t0) / pages)
        mid = _Calls(pool)
        if pool.capacity_pages != pages or pool.free_pages != pages:
            raise _fail(ops.dev, f"resize({pages}) left {pool.capacity_pages} pages, {pool.free_pages} free")
        t0 = _perf()
        pool.resize(0)
        release_s.append((_perf() - t0) / pages)
        mid.since(before, create_calls)
        _Calls(pool).since(mid, release_calls)
    pool.resize(pages)
    api = "cuMemCreate" if ops.cuda else "memfd fallocate"
    extra = {"pages": pages, "per_page_us": round(_median_us(create_s), 3), "api": api,
             "release_us_per_page": round(_median_us(release_s), 3),
             "release_driver": _driver_extra(release_calls, pages * reps)}
    extra.update(_driver_extra(create_calls, pages * reps))
    return [Row("memory", f"create {_size(pool.page_bytes)} page (resize)", ops.dev.kind,
                _median_us(create_s), 0.0, extra=extra)]


def _map_unmap_rows(ops: _Ops, pool: kvcore.PagePool, rng: np.random.Generator, reps: int) -> list[Row]:
    """map and unmap latency per page, one page per call and RUN pages per call; then alias."""
    dev, pb, pages = ops.dev, pool.page_bytes, pool.capacity_pages
    stream = ops.stream()
    vt = kvcore.VirtualTensor(pool, (pages, pb), "uint8")
    # CPU: one byte per OS page, so unmap tears down populated mappings, as it does after real use.
    touch = None if ops.cuda else np.from_dlpack(vt)[:, ::pool.granularity]
    sz = _size(pb)
    rows = []
    for per_call in (1, RUN):
        map_s, unmap_s, unmap_call_s, touch_s = [], [], [], []
        map_calls: dict[str, list[float]] = {}
        unmap_calls: dict[str, list[float]] = {}
        for _ in range(reps):
            ops.sync()
            before = _Calls(pool)
            t0 = _perf()
            for first in range(0, pages, per_call):
                vt.map(first, per_call)
            ops.sync()
            map_s.append((_perf() - t0) / pages)
            mid = _Calls(pool)
            if len(vt.mapped_pages()) != pages or pool.free_pages != 0:
                raise _fail(dev, f"{pages} maps left {len(vt.mapped_pages())} pages mapped")
            if touch is not None:
                t0 = _perf()
                touch[...] = 1
                touch_s.append((_perf() - t0) / pages)
            ops.sync()
            t0 = _perf()
            for first in range(0, pages, per_call):
                vt.unmap(first, per_call, stream)
            t1 = _perf()
            ops.sync()
            free = pool.free_pages  # processes releases still waiting for their events
            t2 = _perf()
            unmap_call_s.append((t1 - t0) / pages)
            unmap_s.append((t2 - t0) / pages)
            if free != pages or vt.mapped_pages():
                raise _fail(dev, f"after unmapping every page {free} of {pages} pages are free")
            mid.since(before, map_calls)
            _Calls(pool).since(mid, unmap_calls)
        label = f"{per_call}/call"
        map_extra: dict[str, Any] = {"pages": pages, "pages_per_call": per_call,
                                     "per_page_us": round(_median_us(map_s), 3),
                                     "call_us": round(_median_us(map_s) * per_call, 3)}
        map_extra.update(_driver_extra(map_calls, pages * reps))
        if ops.cuda:
            map_us = _median_us(map_s)
            map_extra.update(goal=f"map+access <= {MAP_GOAL_US:g} us per {sz} page", goal_us=MAP_GOAL_US,
                             goal_met=map_us <= MAP_GOAL_US)
        else:
            map_extra["first_touch_us_per_page"] = round(_median_us(touch_s), 3)
        name = "map+access" if ops.cuda else "map"
        rows.append(Row("memory", f"{name} {sz} page, {label}", dev.kind, _median_us(map_s), 0.0, extra=map_extra))
        unmap_extra: dict[str, Any] = {"pages": pages, "pages_per_call": per_call,
                                       "per_page_us": round(_median_us(unmap_s), 3),
                                       "call_us_per_page": round(_median_us(unmap_call_s), 3)}
        unmap_extra.update(_driver_extra(unmap_calls, pages * reps))
        rows.append(Row("memory", f"unmap {sz} page, {label}", dev.kind, _median_us(unmap_s), 0.0,
                        extra=unmap_extra))

    # alias: map another tensor's physical pages (pool pages stay where they are).
    vt.map(0, pages)
    other = kvcore.VirtualTensor(pool, (pages, pb), "uint8")
    arr, arr2 = ops.array(vt), ops.array(other)
    data = ops.random(rng, (2, pb))
    ops.copy(arr[:2], data)
    other.alias(0, vt, 0)
    other.alias(1, vt, 1)
    if not ops.equal(arr2[:2], data) or other.physical_page(1) != vt.physical_page(1):
        raise _fail(dev, "aliased pages do not show the other tensor's contents")
    other.unmap(0, 2, stream)
    ops.sync()
    if pool.stats()["pages_shared"] != 0 or not ops.equal(arr[:2], data) or not ops.is_zero(arr2[:2]):
        raise _fail(dev, "unmapping an alias changed the original or left the alias readable")
    del arr, arr2
    alias_s = []
    alias_calls: dict[str, list[float]] = {}
    for _ in range(reps):
        ops.sync()
        before = _Calls(pool)
        t0 = _perf()
        for i in range(pages):
            other.alias(i, vt, i)
        ops.sync()
        alias_s.append((_perf() - t0) / pages)
        _Calls(pool).since(before, alias_calls)
        if pool.stats()["pages_shared"] != pages:
            raise _fail(dev, f"{pages} aliases left {pool.stats()['pages_shared']} pages shared")
        for first in range(0, pages, RUN):
            other.unmap(first, min(RUN, pages - first), stream)
        ops.sync()
        pool.free_pages  # noqa: B018 - processes the ordered releases
    alias_extra: dict[str, Any] = {"pages": pages, "per_page_us": round(_median_us(alias_s), 3)}
    alias_extra.update(_driver_extra(alias_calls, pages * reps))
    rows.append(Row("memory", f"alias {sz} page, 1/call", dev.kind, _median_us(alias_s), 0.0, extra=alias_extra))
    del touch
    other.free(stream)
    vt.free(stream)
    return rows


def _grow_rows(ops: _Ops, rng: np.random.Generator, quick: bool, reps: int) -> list[Row]:
    """Growing a tensor page by page with ensure(), against the same growth in the framework."""
    dev = ops.dev
    target = (64 << 20) if quick else (1 << 30)
    pool = kvcore.PagePool(ops.pool_device, target)  # the pool exists first: growth maps pooled pages
    pb, n = pool.page_bytes, pool.capacity_pages
    total = n * pb
    stream = ops.stream()
    vt = kvcore.VirtualTensor(pool, (total,), "uint8")
    arr = ops.array(vt)

    vt.ensure(pb + 1)
    if vt.mapped_pages() != [0, 1]:
        raise _fail(dev, f"ensure({pb + 1}) mapped pages {vt.mapped_pages()}, expected [0, 1]")
    data = ops.random(rng, (2 * pb,))
    ops.copy(arr[:2 * pb], data)
    vt.ensure(2 * pb)  # already mapped: must change nothing
    if not ops.equal(arr[:2 * pb], data) or vt.mapped_pages() != [0, 1]:
        raise _fail(dev, "ensure() of mapped bytes changed their pages or contents")
    vt.unmap(0, 2, stream)
    ops.sync()
    if pool.free_pages != n or not ops.is_zero(arr[:2 * pb]):
        raise _fail(dev, "unmapped pages did not return to the pool or do not read zeros")

    total_s, ensure_s, fill_s = [], [], []
    calls: dict[str, list[float]] = {}
    for _ in range(reps):
        ops.sync()
        before = _Calls(pool)
        t_ensure = t_fill = 0.0
        t0 = _perf()
        for k in range(1, n + 1):
            a = _perf()
            vt.ensure(k * pb)
            b = _perf()
            t_ensure += b - a
            if not ops.cuda:  # np.ones writes its memory; so does this side
                arr[(k - 1) * pb:k * pb].fill(1)
                t_fill += _perf() - b
        ops.sync()
        total_s.append(_perf() - t0)
        ensure_s.append(t_ensure / n)
        fill_s.append(t_fill / n)
        _Calls(pool).since(before, calls)
        if len(vt.mapped_pages()) != n:
            raise _fail(dev, f"growing by {total} bytes mapped {len(vt.mapped_pages())} of {n} pages")
        vt.unmap(0, n, stream)
        ops.sync()
        pool.free_pages  # noqa: B018 - processes the ordered releases
    del arr
    vt.free(stream)
    del vt, pool

    peer_s, cached_s = [], []
    if ops.cuda:
        torch = ops.torch
        peer = "torch caching alloc"

        def grow_torch(empty_cache: bool) -> float:
            if empty_cache:
                torch.cuda.empty_cache()
            torch.cuda.synchronize()
            t0 = _perf()
            held = [torch.empty(pb, dtype=torch.uint8, device=ops.pool_device) for _ in range(n)]
            torch.cuda.synchronize()
            seconds = _perf() - t0
            del held
            return seconds

        for _ in range(reps):
            peer_s.append(grow_torch(True))   # new cudaMalloc segments
            cached_s.append(grow_torch(False))  # served from the cache
        torch.cuda.empty_cache()
    else:
        peer = "np.ones"
        for _ in range(reps):
            t0 = _perf()
            held = [np.ones(pb, np.uint8) for _ in range(n)]
            peer_s.append(_perf() - t0)
            del held

    t, peer_t = statistics.median(total_s), statistics.median(peer_s)
    extra: dict[str, Any] = {"pages": n, "per_page_us": round(t / n * 1e6, 3),
                             "ensure_us_per_page": round(_median_us(ensure_s), 3),
                             "peer_per_page_us": round(peer_t / n * 1e6, 3),
                             # the peer's spread: allocator caches make later rounds cheaper
                             "peer_rounds_us": [round(x * 1e6, 1) for x in peer_s]}
    if ops.cuda:
        extra["peer"] = "torch.empty of one page per step after torch.cuda.empty_cache()"
        extra["peer_cached_us"] = round(_median_us(cached_s), 1)
        extra.update(goal=f"map+access <= {MAP_GOAL_US:g} us per {_size(pb)} page", goal_us=MAP_GOAL_US,
                     goal_met=t / n * 1e6 <= MAP_GOAL_US)
    else:
        extra["fill_us_per_page"] = round(_median_us(fill_s), 3)
        extra["peer"] = "np.ones of one page per step (allocates and writes), as each kvcore step writes its page"
    extra.update(_driver_extra(calls, n * reps))
    return [Row("memory", f"grow {_size(total)} in {_size(pb)} steps", dev.kind, t * 1e6, total / t / 1e9,
                peer, peer_t * 1e6, total / peer_t / 1e9, extra=extra)]


def _offload_rows(ops: _Ops, rng: np.random.Generator, quick: bool, reps: int) -> list[Row]:
    """Offload and prefetch bandwidth, verified bit-exact, against a pinned memcpy of the same bytes."""
    dev = ops.dev
    target = (16 << 20) if quick else (256 << 20)
    pool = kvcore.PagePool(ops.pool_device, target, target)
    pb, n = pool.page_bytes, pool.capacity_pages
    nbytes = n * pb
    stream = ops.stream()
    vt = kvcore.VirtualTensor(pool, (n, pb), "uint8")
    vt.map(0, n)
    arr = ops.array(vt)
    data = ops.random(rng, (n, pb))
    ops.copy(arr, data)

    def offload_and_check():
        tr = vt.offload(0, n, stream)
        tr.wait()
        ops.sync()
        if tr.bytes != nbytes or not all(vt.is_offloaded(i) for i in range(n)):
            raise _fail(dev, f"offload of {n} pages moved {tr.bytes} bytes or left pages not offloaded")
        if pool.free_pages != n or pool.stats()["pages_offloaded"] != n:
            raise _fail(dev, "offloaded pages did not return to the pool or are not held by the host tier")
        if not ops.is_zero(arr):
            raise _fail(dev, "offloaded pages do not read zeros")

    def prefetch_and_check():
        tr = vt.prefetch(0, n, stream)
        tr.wait()
        if tr.bytes != nbytes or vt.mapped_pages() != list(range(n)):
            raise _fail(dev, f"prefetch of {n} pages moved {tr.bytes} bytes or left pages unmapped")
        if not ops.equal(arr, data):
            raise _fail(dev, "prefetched pages differ from what was offloaded")
        if pool.host_free_pages != pool.host_capacity_pages:
            raise _fail(dev, "prefetch did not free its host-tier slots")

    offload_and_check()
    prefetch_and_check()

    off_s, pre_s, release_s = [], [], []
    off_calls: dict[str, list[float]] = {}
    pre_calls: dict[str, list[float]] = {}
    for _ in range(reps):
        ops.sync()
        before = _Calls(pool)
        t, tr = ops.timed(lambda: vt.offload(0, n, stream))
        off_s.append(t)
        t0 = _perf()
        tr.wait()
        pool.free_pages  # noqa: B018 - CUDA: the deferred release of the copied pages happens here
        release_s.append(_perf() - t0)
        mid = _Calls(pool)
        t, tr = ops.timed(lambda: vt.prefetch(0, n, stream))
        pre_s.append(t)
        tr.wait()
        pool.host_free_pages  # noqa: B018 - frees the host slots
        mid.since(before, off_calls)
        _Calls(pool).since(mid, pre_calls)
    if not ops.equal(arr, data):
        raise _fail(dev, "pages differ from the original after the timed offload/prefetch rounds")
    del arr
    vt.free(stream)
    del vt, pool

    # Peer: a plain memcpy of the same bytes between pinned host memory and the device.
    min_time = 0.05 if quick else 0.2
    if ops.cuda:
        torch = ops.torch
        host = torch.empty((n, pb), dtype=torch.uint8, pin_memory=True)
        back = torch.empty_like(data)
        peer_off = dev.time(lambda: host.copy_(data, non_blocking=True), min_time=min_time)
        peer_pre = dev.time(lambda: back.copy_(host, non_blocking=True), min_time=min_time)
        peer_names = ("pinned memcpy d2h", "pinned memcpy h2d")
        moved = nbytes  # one side of the link
    else:
        host = np.zeros_like(data)
        back = np.zeros_like(data)
        peer_off = dev.time(lambda: np.copyto(host, data), min_time=min_time)
        peer_pre = dev.time(lambda: np.copyto(back, host), min_time=min_time)
        peer_names = ("np.copyto", "np.copyto")
        moved = 2 * nbytes  # read + written, as device copies count
    del host, back, data

    rows = []
    for name, seconds, peer, peer_t, calls in (("offload", off_s, peer_names[0], peer_off, off_calls),
                                               ("prefetch", pre_s, peer_names[1], peer_pre, pre_calls)):
        t = statistics.median(seconds)
        pct = 100 * peer_t / t
        extra: dict[str, Any] = {"pages": n, "bytes": nbytes, "pct_of_peer": round(pct, 1)}
        # the same goal on both backends: at least COPY_GOAL_PCT of the plain copy (pinned memcpy / np.copyto)
        extra.update(goal=f"{name} >= {COPY_GOAL_PCT:g}% of the {peer} bandwidth (got {pct:.0f}%)",
                     goal_pct=COPY_GOAL_PCT, goal_met=bool(pct >= COPY_GOAL_PCT))
        if name == "offload":
            release = statistics.median(release_s)
            extra["release_us"] = round(release * 1e6, 1)  # CUDA: deferred unmap of the copied pages
            extra["gbps_with_release"] = round(moved / (t + release) / 1e9, 2)
        extra.update(_driver_extra(calls, n * reps))
        rows.append(Row("memory", f"{name} {_size(nbytes)} ({n} x {_size(pb)})", dev.kind, t * 1e6,
                        moved / t / 1e9, peer, peer_t * 1e6, moved / peer_t / 1e9, extra=extra))
    return rows


def _sleep_cycles_per_ms(torch, stream) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1000)  # loads the kernel
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
    end.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-3)


def _busy_rows(ops: _Ops, reps: int) -> list[Row]:
    """CUDA: unmap and map return at once while streams are busy; a deferred release processed
    while another stream runs a long kernel must not wait for it (no device-wide synchronization)."""
    torch, dev = ops.torch, ops.dev
    pool = kvcore.PagePool(ops.pool_device, 0)
    pool.resize(2)
    pb = pool.page_bytes
    vt = kvcore.VirtualTensor(pool, (2, pb), "uint8")
    s, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    cycles_per_ms = _sleep_cycles_per_ms(torch, s)
    long_cycles = int(BUSY_KERNEL_MS * cycles_per_ms)
    short_cycles = int(5 * cycles_per_ms)
    sz = _size(pb)

    unmap_s, map_s, release_s = [], [], []
    unmap_busy, map_busy, release_busy = [], [], []
    for _ in range(reps):
        # 1. unmap(stream=s) while a long kernel runs on s: the page must wait for it, the call not.
        vt.map(0, 1)
        torch.cuda.synchronize()
        with torch.cuda.stream(s):
            torch.cuda._sleep(long_cycles)
        t0 = _perf()
        vt.unmap(0, 1, stream=s)
        unmap_s.append(_perf() - t0)
        unmap_busy.append(not s.query())
        releasing = pool.stats()["pages_releasing"]
        if unmap_busy[-1] and releasing != 1:
            raise _fail(dev, f"the unmapped page was released ({releasing} releasing) while the kernel "
                             f"queued before the unmap was still running on its stream")
        s.synchronize()
        if pool.free_pages != 2:
            raise _fail(dev, "the unmapped page did not return to the pool after its stream finished")

        # 2. map while a long kernel runs on another stream.
        with torch.cuda.stream(s2):
            torch.cuda._sleep(long_cycles)
        t0 = _perf()
        vt.map(0, 1)
        map_s.append(_perf() - t0)
        map_busy.append(not s2.query())
        s2.synchronize()

        # 3. A release whose event has completed is processed by the next call (here free_pages):
        # cuMemUnmap, zero page, access - while s2 runs a long kernel.
        with torch.cuda.stream(s):
            torch.cuda._sleep(short_cycles)
        vt.unmap(0, 1, stream=s)
        pending = pool.stats()["pages_releasing"]
        s.synchronize()
        with torch.cuda.stream(s2):
            torch.cuda._sleep(long_cycles)
        t0 = _perf()
        free = pool.free_pages
        if pending == 1:  # else the short kernel ended early and the release already happened
            release_s.append(_perf() - t0)
            release_busy.append(not s2.query())
        s2.synchronize()
        if free != 2:
            raise _fail(dev, "a completed release was not processed")
    vt.free()
    del vt, pool

    rows = []
    unmap_us = _median_us(unmap_s)
    if not all(unmap_busy) and unmap_us >= 0.5 * BUSY_KERNEL_MS * 1e3:
        raise _fail(dev, f"unmap(stream=s) waited for the {BUSY_KERNEL_MS:g} ms kernel queued on s "
                         f"({unmap_us:.0f} us)")
    rows.append(Row("memory", f"unmap {sz} page, stream busy", dev.kind, unmap_us, 0.0, extra={
        "kernel_ms": BUSY_KERNEL_MS, "stream_busy_after_call": all(unmap_busy),
        "goal": "unmap returns while its stream is busy (no synchronization)", "goal_met": all(unmap_busy)}))
    rows.append(Row("memory", f"map+access {sz} page, device busy", dev.kind, _median_us(map_s), 0.0, extra={
        "kernel_ms": BUSY_KERNEL_MS, "other_stream_busy_after_call": all(map_busy),
        "goal": f"map+access <= {MAP_GOAL_US:g} us per {sz} page while the device is busy",
        "goal_us": MAP_GOAL_US, "goal_met": all(map_busy) and _median_us(map_s) <= MAP_GOAL_US}))
    if release_s:
        rows.append(Row("memory", f"release {sz} page, device busy", dev.kind, _median_us(release_s), 0.0, extra={
            "kernel_ms": BUSY_KERNEL_MS, "samples": len(release_s),
            "other_stream_busy_after_call": all(release_busy),
            "goal": "deferred unmap (cuMemUnmap + zero page) does not synchronize the device",
            "goal_met": all(release_busy)}))
    return rows


def bench_memory(dev: Device, quick: bool = False) -> list[Row]:
    """Latency of page creation, map, unmap, alias and tensor growth; offload/prefetch bandwidth;
    on CUDA, that unmap and release do not synchronize. Checks contents before timing."""
    rng = np.random.default_rng()
    ops = _Ops(dev)
    reps = 3 if quick else 5
    pages = RUN if quick else 4 * RUN
    pool = kvcore.PagePool(ops.pool_device, 0)
    rows = _create_rows(ops, pool, pages, 2 if quick else 3)
    _check_map_unmap(ops, pool, rng)
    rows += _map_unmap_rows(ops, pool, rng, reps)
    del pool
    rows += _grow_rows(ops, rng, quick, reps)
    rows += _offload_rows(ops, rng, quick, reps)
    if ops.cuda:
        rows += _busy_rows(ops, reps)
    return rows
