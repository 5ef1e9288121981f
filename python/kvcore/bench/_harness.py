"""Timing, device helpers, tables and JSON for `python -m kvcore.bench`.

GB/s everywhere counts bytes read plus bytes written (memory traffic), so a kernel's figure and the
device-to-device copy reference (`copy_bandwidth`) are directly comparable.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import kvcore


@dataclass
class Row:
    bench: str
    case: str
    device: str
    time_us: float
    gbps: float
    peer: str = ""
    peer_time_us: float | None = None
    peer_gbps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        """kvcore's speed relative to the peer (>1: kvcore is faster)."""
        return self.peer_time_us / self.time_us if self.peer_time_us else None


class Device:
    """Where a benchmark runs, and how to make arrays and time work there."""

    def __init__(self, kind: str):
        self.kind = kind
        self.torch = None
        if kind == "cuda":
            import torch  # CUDA benchmarks allocate through torch, the framework users pair us with

            self.torch = torch
            self.name = torch.cuda.get_device_name()
        else:
            self.name = platform.processor() or platform.machine()
            try:
                import torch  # optional CPU peer
            except ImportError:
                torch = None
            self.torch = torch

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def time(self, fn: Callable[[], Any], min_time: float = 0.2, max_reps: int = 2000) -> float:
        """Median seconds per call of fn, after warm-up."""
        fn()
        if self.is_cuda:
            torch = self.torch
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            one = max(start.elapsed_time(end) / 1e3, 1e-6)
            inner = max(1, min(1000, int(0.01 / one)))  # batch launches so each sample is >= 10 ms
            samples = []
            deadline = time.perf_counter() + min_time
            while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < max_reps):
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / inner)
            return statistics.median(samples)
        samples = []
        deadline = time.perf_counter() + min_time
        while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < max_reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)


def available_devices() -> list[str]:
    devices = ["cpu"]
    if kvcore.cuda_status()[0]:
        try:
            import torch

            if torch.cuda.is_available():
                devices.append("cuda")
        except ImportError:
            pass
    return devices


def copy_bandwidth(dev: Device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write), the roofline reference."""
    if dev.is_cuda:
        torch = dev.torch
        a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        t = dev.time(lambda: b.copy_(a))
    else:
        import numpy as np

        nbytes = min(nbytes, 1 << 27)
        a = np.ones(nbytes, np.uint8)
        b = np.empty_like(a)
        t = dev.time(lambda: np.copyto(b, a))
    return 2 * nbytes / t / 1e9


def print_table(rows: list[Row], copy_gbps: dict[str, float], out=sys.stdout) -> None:
    if not rows:
        return
    header = f"{'benchmark':<12} {'case':<34} {'dev':<4} {'time us':>10} {'GB/s':>8} {'%copy':>6} " \
             f"{'peer':<22} {'peer us':>10} {'x peer':>7}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        ref = copy_gbps.get(r.device)
        pct = f"{100 * r.gbps / ref:6.1f}" if ref and r.gbps else "     -"
        gbps = f"{r.gbps:8.1f}" if r.gbps else "       -"  # latency rows carry no bandwidth
        peer_us = f"{r.peer_time_us:10.1f}" if r.peer_time_us else "         -"
        speedup = f"{r.speedup:7.2f}" if r.speedup else "      -"
        print(f"{r.bench:<12} {r.case:<34} {r.device:<4} {r.time_us:10.1f} {gbps} {pct} "
              f"{r.peer:<22} {peer_us} {speedup}", file=out)
    goals = [r for r in rows if "goal" in r.extra and "goal_met" in r.extra]
    for r in goals:
        verdict = "met" if r.extra["goal_met"] else "NOT MET"
        print(f"goal [{r.device}] {r.case}: {r.extra['goal']}: {verdict}", file=out)


def metadata(devices: list[Device], copy_gbps: dict[str, float], module: str = "kvcore.bench") -> dict[str, Any]:
    """Run facts for a JSON result; `module` is the `python -m` entry point that produced it."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], "-m", module, *sys.argv[1:]]),
        "devices": {d.kind: d.name for d in devices},
        "copy_bandwidth_gbps": copy_gbps,
        "build_info": kvcore.build_info(),
        "cuda_status": list(kvcore.cuda_status()),
        "python": platform.python_version(),
        "cpu_threads": kvcore.num_threads(),
    }


def write_json(path: str, rows: list[Row], meta: dict[str, Any]) -> None:
    payload = {"meta": meta, "rows": [dict(asdict(r), speedup=r.speedup) for r in rows]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
