"""`python -m kvcore.bench <name ...|all> [--device cpu|cuda|all] [--quick] [--json FILE]`.

`python -m kvcore.bench prefix-replay --trace PATH [--gpu-blocks N] [--host-blocks M]
[--policy lru,hot] [--json FILE]` replays a request trace through the prefix cache (see
kvcore.bench.prefix_replay).

`python -m kvcore.bench kernels --static [--objects DIR] [--json FILE] [--compare BEFORE.json]`
prints the static cost report of the CUDA kernels (registers, spills, shared memory, occupancy,
SASS instructions per KV byte of the inner loop), built from the sources with nvcc and read with
cuobjdump; no GPU needed (see kvcore.bench.kernels_static).
"""

from __future__ import annotations

import argparse
import sys

from . import BENCHMARKS, available_devices, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "prefix-replay":
        from .prefix_replay import main as replay_main

        return replay_main(argv[1:])
    if argv and argv[0] == "kernels":
        from .kernels_static import main as kernels_main

        return kernels_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m kvcore.bench", description=__doc__)
    parser.add_argument("names", nargs="+", help=f"benchmarks to run: {', '.join(BENCHMARKS)} or all "
                        "(or: prefix-replay --trace PATH ..., see prefix-replay --help; "
                        "kernels --static, see kernels --help)")
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"],
                        help="where to run (default: every available device)")
    parser.add_argument("--quick", action="store_true", help="one small case per benchmark")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and run metadata as JSON")
    args = parser.parse_args(argv)

    names = list(BENCHMARKS) if "all" in args.names else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    present = available_devices()
    devices = present if args.device == "all" else [args.device]
    if args.device == "cuda" and "cuda" not in present:
        import kvcore

        print(f"CUDA benchmarks need a GPU and torch with CUDA: {kvcore.cuda_status()[1]}", file=sys.stderr)
        return 2
    run(names, devices, quick=args.quick, json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
