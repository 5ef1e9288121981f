"""Multi-link collectives: `comm` measures this machine (CPU ranks as processes over the host and
socket links, each alone and split by the balancer); `comm-sim` runs the planner and balancer
against simulated 8-GPU nodes (kvcore.comm.simulate).

GB/s in these rows is the nccl-tests bus bandwidth (busbw = algbw x 2(n-1)/n for all-reduce,
x (n-1)/n for all-gather), not memory traffic; extra holds algbw. The peer is the best single link
(measured) or NVLink alone (simulated), so "x peer" is the gain from splitting.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time

from ._harness import Device, Row

MiB = 1 << 20


def _bus_factor(collective: str, world: int) -> float:
    return 2 * (world - 1) / world if collective == "all_reduce" else (world - 1) / world


def _measure_rank(rank, world, store_dir, sizes, reps, results):
    """One rank: times each collective and size per link configuration; rank 0 reports."""
    import numpy as np

    from kvcore import comm

    try:
        c = comm.Communicator(rank, world, comm.FileStore(store_dir), links=["host", "socket"], timeout=60)
        out = []
        for collective in ("all_reduce", "all_gather"):
            for nbytes in sizes:
                n = nbytes // 4 if collective == "all_reduce" else nbytes // 4 // world
                x = np.ones(n, np.float32)
                for config, split in (("host", {"host": 1.0}), ("socket", {"socket": 1.0}), ("host+socket", None)):
                    c.force_split(split)
                    fn = (lambda: c.all_reduce(x)) if collective == "all_reduce" else (lambda: c.all_gather(x))
                    for _ in range(3 if split else 10):  # warm-up; lets the balancer settle
                        fn()
                    times = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        fn()
                        times.append(time.perf_counter() - t0)
                    plan = c.plan(nbytes, collective) if split is None else []
                    out.append((collective, nbytes, config, statistics.median(times), plan))
        c.close()
        results.put((rank, out))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        results.put((rank, e))


def measure(world: int = 2, sizes=(MiB, 16 * MiB), reps: int = 5, timeout: float = 300) -> list[tuple]:
    """(collective, payload bytes, link configuration, seconds, plan) measured with `world` processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="kvcore-comm-bench-")
    procs = [ctx.Process(target=_measure_rank, args=(r, world, store_dir, list(sizes), reps, results))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=timeout) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for r, v in got.items():
        if isinstance(v, BaseException):
            raise RuntimeError(f"comm benchmark rank {r} failed: {v!r}")
    return got[0]


def bench_comm(dev: Device, quick: bool) -> list[Row]:
    if dev.is_cuda:
        return []  # the CUDA links (nccl, GPU host path) are not implemented yet
    world = 2
    sizes = (MiB, 16 * MiB) if quick else (MiB, 4 * MiB, 16 * MiB, 64 * MiB)
    measured = measure(world, sizes)
    rows = []
    best_single = {}
    for collective, nbytes, config, seconds, _ in measured:
        if config != "host+socket":
            key = (collective, nbytes)
            if key not in best_single or seconds < best_single[key][1]:
                best_single[key] = (config, seconds)
    for collective, nbytes, config, seconds, plan in measured:
        algbw = nbytes / seconds / 1e9
        busbw = algbw * _bus_factor(collective, world)
        peer = best_single[(collective, nbytes)] if config == "host+socket" else None
        extra = {"algbw_gbps": algbw, "busbw_gbps": busbw, "world_size": world}
        if plan:
            extra["split"] = {p["link"]: p["bytes"] / nbytes for p in plan}
        rows.append(Row("comm", f"{collective} {world}r {nbytes // MiB}MiB {config}", "cpu", seconds * 1e6, busbw,
                        peer=f"{peer[0]} alone" if peer else "", peer_time_us=peer[1] * 1e6 if peer else None,
                        peer_gbps=(nbytes / peer[1] / 1e9 * _bus_factor(collective, world)) if peer else None,
                        extra=extra))
    return rows


def bench_comm_sim(dev: Device, quick: bool) -> list[Row]:
    if dev.is_cuda:
        return []  # a simulation: device-independent, reported once
    from kvcore.comm import SCENARIOS, simulate

    rows = []
    for scenario in SCENARIOS:
        sizes = [1 << k for k in range(18, 31)] if scenario == "8xH800" or not quick else \
            [1 << 20, 16 << 20, 256 << 20, 1 << 30]
        for collective in ("all_reduce", "all_gather"):
            points = simulate(scenario, collective, sizes)
            ref_name = points[0]["links"][0]
            for p in points:
                size = p["bytes"]
                label = f"{size >> 20}MiB" if size >= MiB else f"{size >> 10}KiB"
                extra = {"bound_busbw_gbps": p["bound_busbw"] / 1e9, "of_bound": p["busbw"] / p["bound_busbw"],
                         "split": dict(zip(p["links"], p["link_fraction"]))}
                if size == 256 * MiB:
                    speedup = p["busbw"] / p["reference_busbw"]
                    of_bound = p["busbw"] / p["bound_busbw"]
                    want_speedup = 1.2 if scenario == "8xH800" else 0.0  # H200 / PCIe-only: the bound is lower
                    extra["goal"] = (f"{scenario} {collective} 256MiB: "
                                     + (f">= {want_speedup}x {ref_name} alone and " if want_speedup else "")
                                     + f">= 95% of the analytic bound ({speedup:.2f}x, {100 * of_bound:.1f}%)")
                    extra["goal_met"] = speedup >= want_speedup and of_bound >= 0.95
                if size == MiB and ref_name == "nvlink":
                    small = [q for q in points if q["bytes"] <= MiB]
                    extra["goal"] = f"{scenario} {collective} <= 1MiB: no loss against {ref_name} alone"
                    extra["goal_met"] = all(q["busbw"] >= 0.999 * q["reference_busbw"] for q in small)
                rows.append(Row("comm-sim", f"{scenario} {collective} {label}", "sim", p["seconds"] * 1e6,
                                p["busbw"] / 1e9, peer=f"{ref_name} alone", peer_time_us=p["reference_seconds"] * 1e6,
                                peer_gbps=p["reference_busbw"] / 1e9, extra=extra))
    return rows
