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
    if argv and argv[0] == "demo":
        return demo_main(argv[1:])
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
    print()
    print("== INT4 KV cache (block-diagonal Hadamard rotation): accuracy on model-like KV against plain INT4 "
          "(float64 reference, goals flagged), then the fused rotate+quantize+write and INT4 decode timed "
          "against plain INT4 and 16-bit decode (codes checked bit for bit first) ==")
    rows += bench.run(["int4-accuracy", "int4"], devices, quick=not args.full, copy_gbps=copy_gbps)
    print()
    print("== Collectives: all-reduce / all-gather split over host (shared memory) and socket links, 2 CPU "
          "processes (bus bandwidth per link and aggregated), and the simulated 8-GPU nodes ==")
    rows += bench.run(["comm", "comm-sim"], ["cpu"], quick=True, copy_gbps=copy_gbps)
    print()
    print("== Prefix cache: trace replay (conversation trace, first 2000 requests unless --full; a synthetic "
          "multi-turn workload without it) at GPU 1% / host 10% of its unique 512-token blocks, lru vs hot; "
          "time us = replay time per prompt block ==")
    from kvcore.bench import prefix_replay

    pc_rows = bench.run(["prefix-cache"], ["cpu"], quick=not args.full, copy_gbps=copy_gbps)
    prefix_replay.print_results(prefix_replay.results_from_rows(pc_rows))
    rows += pc_rows
    if args.json:
        bench.write_json(args.json, rows, bench.metadata([bench.Device(d) for d in devices], copy_gbps,
                                                          module="kvcore"))
    print()
    print("all checks passed")
    return 0


def demo_main(argv: list[str]) -> int:
    """`python -m kvcore demo`: a small model generating through kvcore vs plain torch."""
    parser = argparse.ArgumentParser(prog="python -m kvcore demo", description=demo_main.__doc__)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the best present)")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("the demo model runs in torch, which is not installed (pip install torch)", file=sys.stderr)
        return 2
    import kvcore
    from kvcore.demo import run_demo

    device = args.device or ("cuda" if kvcore.cuda_status()[0] and torch.cuda.is_available() else "cpu")
    print(f"kvcore demo on {device}: {args.users} users sharing a system prompt, {args.turns} turns each, served "
          f"3 at a time on a KV budget small enough to force offload (prefix cache policy lru)")
    bf16 = run_demo(device, users=args.users, turns=args.turns, new_tokens=args.new_tokens)
    int4 = run_demo(device, users=args.users, turns=args.turns, new_tokens=args.new_tokens, int4=True)
    print(f"  INT4 KV saves {100 * (1 - int4['kv_bytes_per_token'] / bf16['kv_bytes_per_token']):.0f}% of KV memory")
    if bf16["greedy_token_agreement"] < 1.0:
        print("bf16 KV: greedy tokens differ from the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
