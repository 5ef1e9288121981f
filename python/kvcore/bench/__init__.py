"""Benchmarks: `python -m kvcore.bench <name ...> [--device cpu|cuda] [--quick] [--json FILE]`.

Each benchmark checks its results against a numpy reference before timing, then reports time,
achieved GB/s (bytes read + written), % of the measured device copy bandwidth, and the speed-up
over the best peer (numpy / torch) measured in the same run. Latency rows (the `memory` benchmark's
map, unmap, alias and page creation) give microseconds per page and no GB/s; rows that carry a
performance goal in `extra` get a met / NOT MET line under the table.

`python -m kvcore.bench prefix-replay --trace PATH ...` replays a request trace through the prefix
cache per policy (kvcore.bench.prefix_replay); the `prefix-cache` benchmark is its quick form.

`python -m kvcore.bench kernels --static` is the static cost report of the CUDA kernels, read from
the compiled objects with no GPU (kvcore.bench.kernels_static). It is a command of its own, not in
BENCHMARKS: it times nothing, and `all` should not compile every kernel.
"""

from __future__ import annotations

from typing import Callable

from ._harness import Device, Row, available_devices, copy_bandwidth, metadata, print_table, write_json
from .attention import bench_attention
from .comm import bench_comm, bench_comm_sim
from .int4 import bench_int4, bench_int4_accuracy
from .kv_cache import bench_append_kv, bench_copy_pages
from .memory import bench_memory
from .prefix_replay import bench_prefix_cache

# name -> function(device, quick) -> rows. Later capabilities register themselves here.
BENCHMARKS: dict[str, Callable[[Device, bool], list[Row]]] = {
    "append-kv": bench_append_kv,
    "copy-pages": bench_copy_pages,
    "memory": bench_memory,
    "attention": bench_attention,
    "prefix-cache": bench_prefix_cache,
    "int4-accuracy": bench_int4_accuracy,
    "int4": bench_int4,
    "comm": bench_comm,
    "comm-sim": bench_comm_sim,
}

__all__ = ["BENCHMARKS", "Device", "Row", "available_devices", "copy_bandwidth", "metadata", "print_table",
           "run", "write_json"]


def run(names: list[str], devices: list[str], quick: bool = False, json_path: str | None = None,
        out=None, copy_gbps: dict[str, float] | None = None) -> list[Row]:
    """Runs the named benchmarks on each device, prints one table, optionally writes JSON.

    `copy_gbps` caches the measured device copy bandwidth across calls: devices missing from it are
    measured and added.
    """
    import sys

    out = out or sys.stdout
    devs = [Device(d) for d in devices]
    copy_gbps = {} if copy_gbps is None else copy_gbps
    for d in devs:
        if d.kind not in copy_gbps:
            copy_gbps[d.kind] = copy_bandwidth(d)
    for d in devs:
        print(f"{d.kind}: {d.name}; device copy bandwidth {copy_gbps[d.kind]:.1f} GB/s (read + write)", file=out)
    rows: list[Row] = []
    for name in names:
        for d in devs:
            rows.extend(BENCHMARKS[name](d, quick))
    print_table(rows, copy_gbps, out=out)
    if json_path:
        write_json(json_path, rows, metadata(devs, copy_gbps))
    return rows
