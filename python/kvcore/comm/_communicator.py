"""Communicator: splits each collective across links with the C++ planner/balancer, runs the
slices concurrently, agrees on failures and timings with the other ranks, and re-sends failed
slices on the links that survive.

Results do not depend on the split: slices are contiguous element ranges and every element is
reduced in rank order 0..n-1 by kvcore._C.comm_reduce (CPU arrays) or comm_reduce_cuda (CUDA
arrays, bitwise the same), whichever link carried it.

CUDA arrays: each link works on its own stream, which waits for the caller's stream at the start;
the caller's stream waits for the link streams at the end. A collective blocks until its slices have
completed (the balancer needs their times), except inside CUDA graph capture, where the whole
collective runs on the nccl link with the split frozen and nothing waits.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .._native import C as _C
from .._arrays import dtype_name, empty_like
from .._streams import resolve_stream
from ._device import DeviceBytes, DeviceOps, DeviceScratch, HostOps, cuda_array_bytes
from ._links import DEFAULT_MODELS, LINK_TYPES, Link, LinkDown

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4}
LINK_KINDS = ("nccl", "host", "socket")


def _byte_view(x: Any, what: str, writable: bool) -> tuple[np.ndarray | DeviceBytes, str, int]:
    """(x's memory as bytes: a flat uint8 view, or DeviceBytes for a CUDA array; dtype name; element
    count) for a contiguous array."""
    on_gpu = cuda_array_bytes(x, what)
    module = type(x).__module__.split(".")[0]
    if on_gpu is not None:
        raw, dtype = on_gpu
    elif module == "torch":
        if x.device.type != "cpu":
            raise ValueError(f"{what}: {x.device} arrays are not supported; the communicator takes CPU and CUDA "
                             "arrays")
        if not x.is_contiguous():
            raise ValueError(f"{what}: expected a contiguous array")
        dtype = dtype_name(x.dtype)
        raw = x.reshape(-1).view(__import__("torch").uint8).numpy() if x.numel() else np.empty(0, np.uint8)
    else:
        arr = x if isinstance(x, np.ndarray) else np.from_dlpack(x)
        if not arr.flags.c_contiguous:
            raise ValueError(f"{what}: expected a contiguous array")
        dtype = dtype_name(arr.dtype)
        raw = arr.reshape(-1).view(np.uint8)
        if writable and not arr.flags.writeable:
            raise ValueError(f"{what}: the array is read-only")
    if dtype not in DTYPES:
        raise TypeError(f"{what}: expected float32, float16, bfloat16 or int32, got {dtype}")
    return raw, dtype, raw.size // DTYPES[dtype]


def _parse_link(spec: Any) -> tuple[str, dict]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and isinstance(spec.get("kind"), str):
        return spec["kind"], {k: v for k, v in spec.items() if k != "kind"}
    raise TypeError(f"links: expected a link name or a dict with 'kind', got {spec!r}")


class Communicator:
    """A group of `world_size` processes doing collectives over several links at once.

    links: names from ("nccl", "host", "socket"), or dicts {"kind": name, options...}: bandwidth_gbps
    and latency_us (starting estimates), min_slice_bytes, delay_s_per_mib (artificial slowdown),
    fail_at / fail_rank (fault injection), and per-link options (host: area_bytes; socket: host).
    store: anything with set(key, value) and a waiting get(key) (kvcore.comm.FileStore / TCPStore,
    torch.distributed.TCPStore). Every wait is bounded by `timeout` seconds.
    """

    def __init__(self, rank: int, world_size: int, store: Any, links=("host", "socket"), *, timeout: float = 30.0,
                 prefix: str = "kvcore/comm", damping: float = 0.5, align_bytes: int = 4096,
                 min_gain: float = 0.03, uplink_gbps: float | None = None):
        if world_size < 1:
            raise ValueError(f"world_size: expected >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0..{world_size - 1}, got {rank}")
        if timeout <= 0:
            raise ValueError(f"timeout: expected > 0 seconds, got {timeout}")
        specs = [_parse_link(s) for s in links]
        if not specs:
            raise ValueError("links: expected at least one link")
        kinds = [k for k, _ in specs]
        for k in kinds:
            if k not in LINK_KINDS:
                raise ValueError(f"links: unknown link '{k}', expected one of {', '.join(LINK_KINDS)}")
            if kinds.count(k) > 1:
                raise ValueError(f"links: '{k}' listed twice")
        if "nccl" in kinds:
            for ok, reason in (_C.nccl_status(), _C.cuda_status()):
                if not ok:
                    raise ValueError(f"links: 'nccl' is unavailable: {reason}")
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self._links: list[Link] = []
        models = []
        try:
            for kind, opts in specs:
                self._links.append(LINK_TYPES[kind](rank, world_size, timeout, opts, store, f"{prefix}/{kind}"))
                bw, lat = DEFAULT_MODELS[kind]
                bw = float(opts.get("bandwidth_gbps", bw / 1e9)) * 1e9
                lat = float(opts.get("latency_us", lat * 1e6)) * 1e-6
                # host (PCIe) and NIC traffic share one GPU uplink when a cap is given
                models.append(_C.CommLink(kind, bw, lat, int(opts.get("min_slice_bytes", 64 << 10)),
                                          0 if uplink_gbps else -1))
        except BaseException:
            self.close()
            raise
        caps = [_C.CommCap("uplink", uplink_gbps * 1e9)] if uplink_gbps else []
        self._balancer = _C.CommBalancer(models, caps, damping=damping, align_bytes=align_bytes, min_gain=min_gain)
        self._agreed_up = [True] * len(self._links)
        self._weights: list[float] | None = None
        self._frozen = 0
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=len(self._links), thread_name_prefix="kvcore-comm")
        self._counters = {"collectives": 0, "payload_bytes": 0, "resent_slices": 0}
        self._per_link = [{"bytes": 0, "slices": 0, "seconds": 0.0, "failures": 0} for _ in self._links]
        # Receive buffers per link (slices run concurrently), reused: no page faults per collective.
        self._host_lanes = _HostLanes(len(self._links))
        self._cuda_lanes: _CudaLanes | None = None  # made on the first CUDA collective
        self._agree([0.0] * (2 * len(self._links)))  # every link connected before the first collective

    # ---- public API -----------------------------------------------------------------------------

    # CUDA arrays (torch, CuPy, any DLPack array on a GPU) are reduced on their GPU. `stream`: the
    # caller's CUDA stream (handle or stream object; default torch's / CuPy's current stream).

    def all_reduce(self, x: Any, op: str = "sum", *, stream: Any = None) -> Any:
        """In place: x = op over ranks of x, element-wise; returns x."""
        raw, dtype, n = _byte_view(x, "x", writable=True)
        self._check_op(op)
        with self._lock, self._lanes(raw, x, stream) as lanes:
            out = lanes.result.get(raw.size)
            self._run("all_reduce", raw, out, dtype, n, op, lanes)
            lanes.caller.copy(raw, out)  # only now: a re-sent slice must read the original input
        return x

    def all_gather(self, x: Any, *, stream: Any = None) -> Any:
        """Returns [world_size * n]: every rank's x (flattened) in rank order."""
        raw, dtype, n = _byte_view(x, "x", writable=False)
        result = empty_like(x, (self.world_size * n,), dtype, "x")
        out, _, _ = _byte_view(result, "out", writable=True)
        with self._lock, self._lanes(raw, x, stream) as lanes:
            self._run("all_gather", raw, out, dtype, n, "sum", lanes)
        return result

    def reduce_scatter(self, x: Any, op: str = "sum", *, stream: Any = None) -> Any:
        """x: [world_size * n] (flattened); returns this rank's [n] of the reduction over ranks."""
        raw, dtype, total = _byte_view(x, "x", writable=False)
        self._check_op(op)
        if total % self.world_size:
            raise ValueError(f"x: reduce_scatter needs a multiple of world_size ({self.world_size}) elements, "
                             f"got {total}")
        n = total // self.world_size
        result = empty_like(x, (n,), dtype, "x")
        out, _, _ = _byte_view(result, "out", writable=True)
        with self._lock, self._lanes(raw, x, stream) as lanes:
            self._run("reduce_scatter", raw, out, dtype, n, op, lanes)
        return result

    def plan(self, nbytes: int, collective: str = "all_reduce", dtype: str = "float32") -> list[dict]:
        """The split a collective of `nbytes` payload (nccl-tests size) would get now:
        [{"link", "offset", "bytes"}], offsets and sizes in payload bytes."""
        if dtype not in DTYPES:
            raise TypeError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype}")
        per_elem = DTYPES[dtype] * (1 if collective == "all_reduce" else self.world_size)
        if nbytes < 0 or nbytes % per_elem:
            raise ValueError(f"nbytes: expected a non-negative multiple of {per_elem}, got {nbytes}")
        slices, _ = self._make_plan(collective, nbytes // per_elem, DTYPES[dtype])
        return [{"link": self._links[l].kind, "offset": b * per_elem, "bytes": c * per_elem} for l, b, c in slices]

    def stats(self) -> dict:
        models = self._balancer.links
        links = {}
        for i, link in enumerate(self._links):
            links[link.kind] = dict(self._per_link[i], up=self._agreed_up[i], bandwidth_gbps=models[i].bandwidth / 1e9,
                                    latency_us=models[i].latency * 1e6)
        return dict(self._counters, balancer_updates=self._balancer.updates, frozen=self._frozen > 0, links=links)

    def force_split(self, weights: dict[str, float] | None) -> None:
        """Use fixed proportions per link name (tests, experiments); None returns to the balancer."""
        if weights is None:
            self._weights = None
            return
        names = [l.kind for l in self._links]
        for name in weights:
            if name not in names:
                raise ValueError(f"weights: unknown link '{name}', this communicator has {', '.join(names)}")
        self._weights = [float(weights.get(name, 0.0)) for name in names]

    @contextlib.contextmanager
    def frozen(self):
        """Keeps the split fixed (no balancer updates), e.g. while a CUDA graph captures."""
        self._frozen += 1
        try:
            yield self
        finally:
            self._frozen -= 1

    def kill_link(self, name: str) -> None:
        """Takes a link down on this rank now (its peers notice on their next use)."""
        for link in self._links:
            if link.kind == name:
                link.kill()
                return
        raise ValueError(f"name: no link '{name}'")

    def close(self) -> None:
        for link in self._links:
            link.close()
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if getattr(self, "_cuda_lanes", None) is not None:
            self._cuda_lanes.close()
            self._cuda_lanes = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- internals ------------------------------------------------------------------------------

    @staticmethod
    def _check_op(op: str) -> None:
        if op not in ("sum", "max"):
            raise ValueError(f"op: expected 'sum' or 'max', got '{op}'")

    @contextlib.contextmanager
    def _lanes(self, raw, x: Any, stream: Any):
        """The buffers and copy/reduce operations for x's side of the bus; for CUDA arrays with x's
        GPU current and the caller's stream resolved (and whether it is capturing a CUDA graph)."""
        names = [l.kind for l in self._links]
        if not isinstance(raw, DeviceBytes):
            if "nccl" in names:
                raise ValueError("x: the nccl link carries CUDA arrays only; pass a CUDA array or leave 'nccl' "
                                 "out of links")
            yield self._host_lanes
            return
        if self._pool is None:
            raise RuntimeError("communicator is closed")
        for link in self._links:
            if getattr(link, "device", raw.device) != raw.device:
                raise ValueError(f"x: on cuda:{raw.device}, but this communicator's {link.kind} link uses "
                                 f"cuda:{link.device}")
        if self._cuda_lanes is None:
            self._cuda_lanes = _CudaLanes(raw.device, len(self._links))
        lanes = self._cuda_lanes
        if lanes.device != raw.device:
            raise ValueError(f"x: on cuda:{raw.device}, but this communicator works on cuda:{lanes.device}")
        previous = _C.cuda_get_device()
        _C.cuda_set_device(lanes.device)
        try:
            lanes.caller.stream = resolve_stream(stream, (x,))
            lanes.capturing = _C.cuda_stream_is_capturing(lanes.caller.stream)
            if lanes.capturing and not ("nccl" in names and self._agreed_up[names.index("nccl")]):
                up = [name for name, ok in zip(names, self._agreed_up) if ok]
                raise _C.KVCoreError(f"x: the caller's CUDA stream is capturing a CUDA graph, which only the nccl "
                                     f"link can join; this communicator's links up are {', '.join(up) or 'none'}")
            yield lanes
        finally:
            _C.cuda_set_device(previous)

    def _make_plan(self, collective: str, count: int, elem: int):
        if self._weights is not None:
            return self._balancer.plan_weights(collective, self.world_size, count, elem, self._weights)
        return self._balancer.plan(collective, self.world_size, count, elem)

    def _run(self, collective: str, raw, out, dtype: str, n: int, op: str, lanes) -> None:
        with self._lock:  # one collective at a time: every rank must post links in the same order (re-entrant)
            if self._pool is None:
                raise RuntimeError("communicator is closed")
            elem = DTYPES[dtype]
            self._counters["collectives"] += 1
            self._counters["payload_bytes"] += n * elem * (1 if collective == "all_reduce" else self.world_size)
            if n == 0:
                return
            job = (collective, raw, out, dtype, elem, n, op, lanes)
            lanes.fork()
            try:
                if lanes.capturing:
                    self._run_captured(job)
                else:
                    self._run_balanced(job)
            finally:
                lanes.join()

    def _run_captured(self, job) -> None:
        """Inside CUDA graph capture: the whole collective on nccl, queued only (no timing, no
        agreement: nothing may wait while a graph is captured)."""
        n, lanes = job[5], job[7]
        nccl = [l.kind for l in self._links].index("nccl")
        lanes.retain_buffers()  # the graph keeps their addresses
        status = [0.0] * (2 * len(self._links))
        self._timed_slices(job, [(nccl, 0, n)], status)
        if status[2 * nccl]:
            raise _C.KVCoreError("collective failed: the nccl link went down during CUDA graph capture")

    def _run_balanced(self, job) -> None:
        collective, _, _, _, elem, n, _, _ = job
        slices, _ = self._make_plan(collective, n, elem)
        first = True
        while slices:
            seconds, failed = self._post(job, slices)
            if first and not self._frozen and not failed:
                self._balancer.observe(collective, self.world_size, n, elem, slices, seconds)
            first = False
            if not failed:
                return
            # Re-send every failed slice over the links that are still up, in the same split
            # every rank computes (the agreed failure set is identical on all ranks).
            retry = []
            for link, begin, count in slices:
                if link in failed:
                    self._counters["resent_slices"] += 1
                    sub, _ = self._balancer.plan(collective, self.world_size, count, elem)
                    retry += [(l, begin + b, c) for l, b, c in sub]
            slices = retry

    def _post(self, job, slices) -> tuple[list[float], set[int]]:
        """Runs the slices (concurrently when several), then agrees with every rank on which links
        failed and how long each took (maximum over ranks). Returns (seconds per link, failed links)."""
        status = [0.0] * (2 * len(self._links))  # per link: failed flag, seconds
        # One task per link: a link's slices (several after a re-send) run one after another, in the
        # same order on every rank, and never share its receive buffer.
        groups: dict[int, list] = {}
        for s in slices:
            groups.setdefault(s[0], []).append(s)
        tasks = list(groups.values())
        if len(tasks) == 1:
            self._timed_slices(job, tasks[0], status)
        else:
            for f in [self._pool.submit(self._timed_slices, job, t, status) for t in tasks]:
                f.result()
        table = self._agree(status)
        failed = {i for i in range(len(self._links)) if table[:, 2 * i].any()}
        for i in failed:
            self._links[i].kill()
            self._agreed_up[i] = False
            self._balancer.set_up(i, False)
            self._per_link[i]["failures"] += 1
        if failed and not any(self._agreed_up):
            raise _C.KVCoreError("collective failed: every link is down")
        return [float(table[:, 2 * i + 1].max()) for i in range(len(self._links))], failed

    def _timed_slices(self, job, slices, status) -> None:
        collective, _, _, _, elem, _, _, lanes = job
        lanes.enter_thread()
        for link_index, begin, count in slices:
            t0 = time.perf_counter()
            link, ops = self._links[link_index], lanes.ops[link_index]
            try:
                _run_slice(link, job, begin, count, self.rank, self.world_size, lanes.scratch[link_index], ops)
                if not lanes.capturing and ops.stream:
                    link.finish(ops.stream)  # done, so the time is the slice's
            except LinkDown:
                lanes.settle(link_index)
                status[2 * link_index] = 1.0
            seconds = time.perf_counter() - t0
            status[2 * link_index + 1] += seconds
            stats = self._per_link[link_index]
            stats["bytes"] += count * elem * (1 if collective == "all_reduce" else self.world_size)
            stats["slices"] += 1
            stats["seconds"] += seconds

    def _agree(self, status: list[float]) -> np.ndarray:
        """All-gathers this rank's status over the first link that works (in list order, so every
        rank tries the same ones); returns [world_size, len(status)]."""
        mine = np.asarray(status, np.float64).view(np.uint8)
        table = np.zeros((self.world_size, len(status)), np.float64)
        table[self.rank] = status
        rows = table.view(np.uint8).reshape(self.world_size, -1)
        sends = [None if p == self.rank else mine for p in range(self.world_size)]
        recvs = [None if p == self.rank else rows[p] for p in range(self.world_size)]
        reasons = []
        for i, link in enumerate(self._links):
            if not self._agreed_up[i]:
                continue
            try:
                link.exchange(sends, recvs, mine.size)
                return table
            except LinkDown as e:
                reasons.append(str(e))
                self._agreed_up[i] = False  # every rank fails on it too: the link is killed
                self._balancer.set_up(i, False)
                status_failed = 2 * i
                table[self.rank, status_failed] = 1.0
                mine = table[self.rank].view(np.uint8)
                sends = [None if p == self.rank else mine for p in range(self.world_size)]
        raise _C.KVCoreError(f"collective failed: every link is down ({'; '.join(reasons) or 'none left'})")


class _Scratch:
    """A reusable byte buffer that grows to the largest size asked for."""

    def __init__(self):
        self._buf = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if self._buf.size < nbytes:
            self._buf = np.empty(nbytes, np.uint8)
        return self._buf[:nbytes]


class _HostLanes:
    """CPU arrays: per-link receive buffers; copies and reductions by the calling thread."""

    capturing = False

    def __init__(self, links: int):
        self.ops = [HostOps] * links
        self.scratch = [_Scratch() for _ in range(links)]
        self.result = _Scratch()  # all_reduce's result until every slice is done
        self.caller = HostOps

    def fork(self) -> None:
        pass

    def join(self) -> None:
        pass

    def enter_thread(self) -> None:
        pass

    def settle(self, link: int) -> None:
        pass

    def retain_buffers(self) -> None:
        pass


class _CudaLanes:
    """CUDA arrays on one GPU: a stream, receive buffer and event per link, and the caller's stream
    (set per collective). Created once and reused; freed by close()."""

    def __init__(self, device: int, links: int):
        self.device, self.capturing = device, False
        self.caller = DeviceOps(0, DTYPES)
        self.ops, self.scratch, self._done = [], [], []
        self._start = _C.cuda_event_create(device)
        self.result = DeviceScratch(device)
        try:
            for _ in range(links):
                self.ops.append(DeviceOps(_C.cuda_stream_create(device), DTYPES))
                self.scratch.append(DeviceScratch(device))
                self._done.append(_C.cuda_event_create(device))
        except BaseException:
            self.close()
            raise

    def fork(self) -> None:
        """Every link stream waits for the work the caller queued before the collective."""
        _C.cuda_event_record(self._start, self.caller.stream)
        for ops in self.ops:
            _C.cuda_stream_wait_event(ops.stream, self._start)

    def join(self) -> None:
        """The caller's stream waits for everything the links queued."""
        for ops, done in zip(self.ops, self._done):
            _C.cuda_event_record(done, ops.stream)
            _C.cuda_stream_wait_event(self.caller.stream, done)

    def enter_thread(self) -> None:
        _C.cuda_set_device(self.device)  # pool threads start on the runtime's default device

    def settle(self, link: int) -> None:
        """After a link failed: let its queued copies land before another link re-sends the slice."""
        if not self.capturing:
            try:
                _C.cuda_stream_synchronize(self.ops[link].stream)
            except _C.KVCoreError:
                pass  # the failure is already being handled; the stream's error surfaces at the join

    def retain_buffers(self) -> None:
        for scratch in (*self.scratch, self.result):
            scratch.keep_retired = True

    def close(self) -> None:
        for ops in self.ops:
            _C.cuda_stream_synchronize(ops.stream)
        for scratch in (*self.scratch, self.result):
            scratch.close()
        for event in (self._start, *self._done):
            _C.cuda_event_destroy(event)
        for ops in self.ops:
            _C.cuda_stream_destroy(ops.stream)
        self.ops, self.scratch, self._done = [], [], []


def _run_slice(link: Link, job, begin: int, count: int, rank: int, world: int, scratch, ops) -> None:
    """One link's share [begin, begin + count) of the split dimension, in elements. The reductions
    read this rank's own part in place (rank order is kept by position in the input list). Buffers
    are numpy arrays or DeviceBytes alike; `ops` copies and reduces them (on the link's stream)."""
    collective, raw, out, dtype, elem, n, op, _ = job
    b, e = begin * elem, (begin + count) * elem
    if collective == "all_gather":
        mine = raw[b:e]
        link.exchange([None if p == rank else mine for p in range(world)],
                      [None if p == rank else out[p * n * elem + b:p * n * elem + e] for p in range(world)], e - b,
                      ops.stream)
        ops.copy(out[rank * n * elem + b:rank * n * elem + e], mine)
    elif collective == "reduce_scatter":
        stride = n * elem
        inbox = scratch.get(world * (e - b)).reshape(world, e - b)
        inputs = [raw[p * stride + b:p * stride + e] if p == rank else inbox[p] for p in range(world)]
        link.exchange([None if p == rank else raw[p * stride + b:p * stride + e] for p in range(world)],
                      [None if p == rank else inbox[p] for p in range(world)], e - b, ops.stream)
        ops.reduce(inputs, out[b:e], dtype, op)
    else:  # all_reduce: reduce-scatter the slice in `world` parts, then all-gather the reduced parts
        bounds = [(begin + count * p // world) * elem for p in range(world + 1)]
        part = [raw[bounds[p]:bounds[p + 1]] for p in range(world)]
        widest = max(bounds[p + 1] - bounds[p] for p in range(world))
        mine = out[bounds[rank]:bounds[rank + 1]]
        inbox = scratch.get(world * mine.size).reshape(world, mine.size)
        link.exchange([None if p == rank else part[p] for p in range(world)],
                      [None if p == rank else inbox[p] for p in range(world)], widest, ops.stream)
        ops.reduce([part[p] if p == rank else inbox[p] for p in range(world)], mine, dtype, op)
        link.exchange([None if p == rank else mine for p in range(world)],
                      [None if p == rank else out[bounds[p]:bounds[p + 1]] for p in range(world)],
                      widest, ops.stream)
