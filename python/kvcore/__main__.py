"""`python -m kvcore`: the main job.

Prints what this build contains and which devices can run, then checks and benchmarks every
available op on the best device present (and on the CPU). Each benchmark verifies its results
against a numpy reference before timing, so a wrong kernel fails the job instead of being timed.
`python -m kvcore bench ...` forwards to `python -m kvcore.bench`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from .bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m kvcore", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="all benchmark sizes instead of the quick ones")
    parser.add_argument("--json", metavar="FILE", help="write the benchmark rows as JSON")
    args = parser.parse_args(argv)

    import kvcore
    from kvcore import bench

    info = kvcore.build_info()
    available, reason = kvcore.cuda_status()
    print(f"kvcore {info['version']} ({info['compiler']})")
    if info["cuda_compiled"]:
        print(f"  CUDA compiled: yes, nvcc {info['cuda_version']}, architectures {info['cuda_architectures']}")
    else:
        print("  CUDA compiled: no")
    print(f"  CUDA usable: {'yes' if available else 'no'} - {reason}")
    print(f"  CPU backend threads: {kvcore.num_threads()}")
    devices = bench.available_devices()
    if available and "cuda" not in devices:
        print("  (CUDA checks need torch with CUDA to allocate GPU arrays; running on the CPU only)")
    print(f"  running on: {', '.join(devices)}")
    print()
    copy_gbps: dict[str, float] = {}  # measured once, shared by the sections
    print("== KV cache ops: append_kv, copy_pages (checked against numpy, then timed) ==")
    rows = bench.run(["append-kv", "copy-pages"], devices, quick=not args.full, copy_gbps=copy_gbps)
    print()
    print("== Virtual memory: PagePool / VirtualTensor map, unmap, grow, offload, prefetch "
          "(contents checked, then timed; latency rows in us per page) ==")
    rows += bench.run(["memory"], devices, quick=not args.full, copy_gbps=copy_gbps)
    print()
    print("== Attention: paged decode, prefill/extend, shared-prefix decode (checked against a float32/float64 "
          "reference, then timed against torch SDPA / FlexAttention / FlashInfer or numpy peers) ==")
    rows += bench.run(["attention"], devices, quick=not args.full, copy_gbps=copy_gbps)
    if args.json:
        bench.write_json(args.json, rows, bench.metadata([bench.Device(d) for d in devices], copy_gbps))
    print()
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
