"""Benchmarks: `python -m kvcore.bench <name ...> [--device cpu|cuda] [--quick] [--json FILE]`.

Each benchmark checks its results against a numpy reference before timing, then reports time,
achieved GB/s (bytes read + written), % of the measured device copy bandwidth, and the speed-up
over the best peer (numpy / torch) measured in the same run.
"""

from __future__ import annotations

from typing import Callable

from ._harness import Device, Row, available_devices, copy_bandwidth, metadata, print_table, write_json
from .kv_cache import bench_append_kv, bench_copy_pages

# name -> function(device, quick) -> rows. Later capabilities register themselves here.
BENCHMARKS: dict[str, Callable[[Device, bool], list[Row]]] = {
    "append-kv": bench_append_kv,
    "copy-pages": bench_copy_pages,
}

__all__ = ["BENCHMARKS", "Device", "Row", "available_devices", "copy_bandwidth", "metadata", "print_table",
           "run", "write_json"]


def run(names: list[str], devices: list[str], quick: bool = False, json_path: str | None = None,
        out=None) -> list[Row]:
    """Runs the named benchmarks on each device, prints one table, optionally writes JSON."""
    import sys

    out = out or sys.stdout
    devs = [Device(d) for d in devices]
    copy_gbps = {d.kind: copy_bandwidth(d) for d in devs}
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
