"""Prefix-cache trace replay: `python -m kvcore.bench prefix-replay --trace PATH [options]`.

Replays a JSONL request trace in the Mooncake format (one request per line: `timestamp` in ms,
`input_length`, `output_length`, `hash_ids` = chained ids of the prompt's 512-token blocks) through a
kvcore.PrefixCache with a GPU and a host tier of the given capacities (in blocks), once per policy.
One cache page is one 512-token block: the cache runs with page_tokens=1 and the block ids as its
tokens (chained ids, so equal ids at the same depth are the same prefix). Per request, at the time
of its arrival:

    match the prompt's blocks -> a GPU run, then a host run (lock the matched path)
    prefetch the host run back to the GPU, alloc GPU pages for the missed blocks
    insert the whole prompt (each request's blocks cached after it is served), unlock

A partial last block (input_length not a multiple of 512) is served from a GPU page of its own
but never cached, as in any page-granular cache: its id is never a prefix of a later prompt. Every
block counts in the rates, the partial one included, so the rates are over all prompt blocks:

    gpu_hit_rate, host_hit_rate   blocks found on the GPU / on the host, over all prompt blocks
    total_hit_rate                their sum (the unlimited-capacity `ceiling` bounds it)
    host_writes_per_block         blocks written to the host tier, over all prompt blocks

Policies: `lru`, `hot` (its default host-write budget, 0.3 writes per queried block for first-seen
blocks) and `hot:B` (budget B; `hot:inf` admits every first-seen block): one run can compare the
points of hot's trade-off between host writes and hit rate.

Reuse classes (`--reuse-class`): hot learns, per class of requests, how often first-seen blocks are
requested again, and spends host writes on the classes that are. A serving engine would label
requests by application or endpoint; the traces carry no such field, so by default (`output`) a
request's class is the octave of its output length (floor(log2(output_length + 1))), which an
engine knows when it inserts the finished request. `none` puts every request in one class.

Cost model (the constants are in every result under "cost_model"): a Llama-3-8B-like model (32
layers, 8 KV heads of 128 dims, bf16) on one H200. A 512-token block holds 512 * 32 * 2 * 8 * 128 * 2
bytes = 64 MiB of KV. Prefill costs ~30 us per token (about 16 GFLOP per token of weights plus
attention at the trace's ~12k-token prompts, at ~60% of 989 dense bf16 TFLOPS), so recomputing a
block costs ~15.4 ms. A GPU hit saves the block's prefill; a host hit saves it minus the PCIe copy
back (64 MiB at 50 GB/s = 1.34 ms). Host writes are offloads on a copy engine, overlapped with
compute: they are reported as PCIe seconds (`offload_seconds`), not subtracted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

BLOCK_TOKENS = 512
POLICIES = ("lru", "hot")
DEFAULT_TRACE_NAME = "mooncake_conversation_trace.jsonl"
DEFAULT_GPU_FRACTION = 0.01    # of the trace's unique blocks
DEFAULT_HOST_FRACTION = 0.10

# Llama-3-8B-like KV geometry and an H200 with PCIe Gen5.
LAYERS, KV_HEADS, HEAD_DIM, KV_DTYPE_BYTES = 32, 8, 128, 2
BLOCK_BYTES = BLOCK_TOKENS * LAYERS * 2 * KV_HEADS * HEAD_DIM * KV_DTYPE_BYTES  # K and V: 64 MiB
PREFILL_US_PER_TOKEN = 30.0
PCIE_GBPS = 50.0

COST_MODEL = {
    "model": "Llama-3-8B-like: 32 layers, 8 KV heads x 128 dims, bf16 KV",
    "device": "H200, PCIe Gen5",
    "block_tokens": BLOCK_TOKENS,
    "kv_bytes_per_block": BLOCK_BYTES,
    "prefill_us_per_token": PREFILL_US_PER_TOKEN,
    "pcie_gbps": PCIE_GBPS,
    "gpu_hit_saves_s": BLOCK_TOKENS * PREFILL_US_PER_TOKEN * 1e-6,
    "host_hit_saves_s": BLOCK_TOKENS * PREFILL_US_PER_TOKEN * 1e-6 - BLOCK_BYTES / (PCIE_GBPS * 1e9),
}

# Goals on the conversation trace at GPU = 1% and host = 10% of its unique blocks (the issue's).
GOAL_HOT_GPU_HIT = 0.10
GOAL_HOT_TOTAL_HIT = 0.29
GOAL_HOT_MAX_WRITES = 0.30
GOAL_MAX_LOSS_VS_LRU = 0.01


class Trace:
    """A trace in memory: arrival times (s) and block-id arrays, plus its unique-block count and the
    unlimited-capacity prefix-hit ceiling."""

    def __init__(self, name: str, times: list[float], blocks: list[np.ndarray], input_tokens: int = 0,
                 full_blocks: list[int] | None = None, output_tokens: list[int] | None = None):
        self.name, self.times, self.blocks, self.input_tokens = name, times, blocks, input_tokens
        # Blocks that are full pages (cacheable); all of them when the trace gives no lengths.
        self.full_blocks = [len(b) for b in blocks] if full_blocks is None else full_blocks
        self.output_tokens = [0] * len(blocks) if output_tokens is None else output_tokens
        self.prompt_blocks = int(sum(len(b) for b in blocks))
        seen: set[int] = set()
        hits = 0
        for b in blocks:
            ids = b.tolist()
            k = 0
            while k < len(ids) and ids[k] in seen:
                k += 1
            hits += k
            seen.update(ids)
        self.unique_blocks = len(seen)
        self.ceiling = hits / self.prompt_blocks if self.prompt_blocks else 0.0

    def __len__(self) -> int:
        return len(self.blocks)


def load_trace(path: str | Path, limit: int | None = None) -> Trace:
    """Reads a JSONL trace (the first `limit` requests when given); blocks as int32 arrays."""
    times: list[float] = []
    blocks: list[np.ndarray] = []
    full: list[int] = []
    outputs: list[int] = []
    tokens = 0
    with open(path) as f:
        for line in f:
            if limit is not None and len(blocks) >= limit:
                break
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            ids = r["hash_ids"]
            if ids and (min(ids) < 0 or max(ids) >= 2**31):
                raise ValueError(f"{path}: hash ids must fit in int32")
            times.append(float(r["timestamp"]) / 1e3)
            blocks.append(np.asarray(ids, dtype=np.int32))
            length = r.get("input_length")
            full.append(len(ids) if length is None else min(len(ids), int(length) // BLOCK_TOKENS))
            tokens += int(length or 0)
            outputs.append(int(r.get("output_length") or 0))
    return Trace(Path(path).name, times, blocks, tokens, full, outputs)


def synthetic_trace(requests: int = 2000, seed: int = 0) -> Trace:
    """A multi-turn chat workload in the trace format, for when no trace file is present: a few
    shared system prompts, conversations whose every turn extends the previous prompt, popular
    conversations revisited more often (Zipf), one request per ~50 ms."""
    rng = np.random.default_rng(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    systems = [fresh(int(rng.integers(2, 9))) for _ in range(8)]
    convs: list[list[int]] = []
    times, blocks = [], []
    t = 0.0
    for _ in range(requests):
        t += float(rng.exponential(0.05))
        if not convs or rng.random() < 0.3:
            convs.append(list(systems[int(rng.integers(len(systems)))]) + fresh(int(rng.integers(1, 12))))
            prompt = convs[-1]
        else:
            c = min(int(rng.zipf(1.3)) - 1, len(convs) - 1)
            convs[-1 - c] = convs[-1 - c] + fresh(int(rng.integers(1, 4)))  # the next turn
            prompt = convs[-1 - c]
        times.append(t)
        blocks.append(np.asarray(prompt, dtype=np.int32))
    return Trace("synthetic-multiturn", times, blocks, sum(len(b) for b in blocks) * BLOCK_TOKENS)


def default_trace_path() -> Path | None:
    """../shared/traces/<conversation trace> relative to the repository root (found from the
    working directory or from this file), when it exists."""
    here = Path(__file__).resolve()
    roots = [Path.cwd(), *Path.cwd().parents, *here.parents]
    for root in roots:
        candidate = root.parent / "shared" / "traces" / DEFAULT_TRACE_NAME
        if (root / "pyproject.toml").exists() and candidate.exists():
            return candidate
    for root in roots:  # no repository around (an installed package): any ../shared/traces
        candidate = root.parent / "shared" / "traces" / DEFAULT_TRACE_NAME
        if candidate.exists():
            return candidate
    return None


def capacities(trace: Trace, gpu_blocks: int | None, host_blocks: int | None) -> tuple[int, int]:
    gpu = max(1, round(DEFAULT_GPU_FRACTION * trace.unique_blocks)) if gpu_blocks is None else int(gpu_blocks)
    host = max(0, round(DEFAULT_HOST_FRACTION * trace.unique_blocks)) if host_blocks is None else int(host_blocks)
    if gpu < 1 or host < 0:
        raise ValueError(f"capacities: gpu_blocks must be >= 1 and host_blocks >= 0, got {gpu} and {host}")
    return gpu, host


def split_policy(name: str) -> tuple[str, dict]:
    """"hot:0.6" -> ("hot", {"host_write_budget": 0.6}); "hot:inf" -> unlimited; "lru" -> ("lru", {})."""
    base, _, budget = name.partition(":")
    if base not in POLICIES or (budget and base != "hot"):
        raise ValueError(f"policy: expected lru, hot or hot:BUDGET (host writes per queried block), got {name!r}")
    if not budget:
        return base, {}
    try:
        b = float(budget)
    except ValueError:
        raise ValueError(f"policy: {name!r}: the write budget must be a number or inf") from None
    if not b >= 0:
        raise ValueError(f"policy: {name!r}: the write budget must be >= 0")
    return base, {"host_write_budget": b}


REUSE_CLASSES = ("output", "none")


def reuse_classes(trace: Trace, kind: str) -> list[int]:
    """Each request's reuse class (see the module docstring)."""
    if kind == "none":
        return [0] * len(trace)
    if kind == "output":
        return [int(o + 1).bit_length() - 1 for o in trace.output_tokens]
    raise ValueError(f"reuse_class: expected one of {', '.join(REUSE_CLASSES)}, got {kind!r}")


def replay_policy(trace: Trace, gpu_blocks: int, host_blocks: int, policy: str, reuse_class: str = "output",
                  **cache_kwargs: Any) -> dict:
    """Replays the trace through one cache; returns its metrics (see the module docstring). `policy`
    is lru, hot (default write budget) or hot:BUDGET."""
    import kvcore

    base, extra = split_policy(policy)
    classes = reuse_classes(trace, reuse_class)
    cache = kvcore.PrefixCache(1, gpu_blocks, host_blocks, base, page_bytes=BLOCK_BYTES, **{**extra, **cache_kwargs})
    gpu_hits = host_hits = prefetched = skipped = 0
    empty = np.zeros(0, np.int64)
    t0 = time.perf_counter()
    for now, blocks, full, cls in zip(trace.times, trace.blocks, trace.full_blocks, classes):
        m = cache.match(blocks[:full], now=now)
        gpu_hits += m.gpu_tokens
        host_hits += m.host_tokens
        pages = m.gpu_pages
        if m.handle >= 0:
            cache.lock(m.handle)
            if m.host_tokens:
                got = cache.prefetch(m.handle, now=now).gpu_pages
                prefetched += len(got)
                pages = np.concatenate([pages, got])
        try:
            new = cache.alloc(len(blocks) - len(pages), now=now)
        except MemoryError:  # the prompt does not fit next to the locked pages: served, not cached
            new = None
            skipped += 1
        if new is not None:
            all_pages = np.concatenate([pages, new]) if len(new) else pages
            dup = cache.insert(blocks[:full], all_pages[:full], now=now, reuse_class=cls)
            assert dup == len(pages), "insert: the matched pages should be exactly the cached GPU run"
            cache.free(all_pages[full:])  # the partial last page stays with the request
        if m.handle >= 0:
            cache.unlock(m.handle)
    seconds = time.perf_counter() - t0
    s = cache.stats()
    n = trace.prompt_blocks or 1
    assert s["gpu"]["hit_tokens"] == gpu_hits and s["host"]["hit_tokens"] == host_hits
    assert s["gpu"]["held_pages"] == 0, "replay leaked pages"
    saved = gpu_hits * COST_MODEL["gpu_hit_saves_s"] + host_hits * COST_MODEL["host_hit_saves_s"]
    return {
        "policy": policy,
        "gpu_hit_rate": gpu_hits / n,
        "host_hit_rate": host_hits / n,
        "total_hit_rate": (gpu_hits + host_hits) / n,
        "host_writes_per_block": s["host"]["writes"] / n,
        "prefill_seconds_saved": saved,
        "prefill_seconds_total": trace.prompt_blocks * BLOCK_TOKENS * PREFILL_US_PER_TOKEN * 1e-6,
        "offload_seconds": s["host"]["writes"] * BLOCK_BYTES / (PCIE_GBPS * 1e9),
        "gpu_hit_blocks": gpu_hits,
        "host_hit_blocks": host_hits,
        "host_writes": s["host"]["writes"],
        "prefetched_blocks": prefetched,
        "requests_not_cached": skipped,
        "gpu_evictions": s["gpu"]["evictions"],
        "host_evictions": s["host"]["evictions"],
        "host_evictions_unused": s["host"]["evictions_unused"],
        "admissions_rejected": s["host"]["admissions_rejected"],
        "budget_admitted": s["host"]["budget_admitted"],
        "class_gated": s["host"]["class_gated"],
        "reuse_class": reuse_class,
        "reuse_classes": s["host"]["reuse_classes"],
        "ghost_hits": s["host"]["ghost_hits"],
        "admission_threshold": s["host"]["admission_threshold"],
        "trace": trace.name,
        "requests": len(trace),
        "prompt_blocks": trace.prompt_blocks,
        "unique_blocks": trace.unique_blocks,
        "ceiling": trace.ceiling,
        "gpu_blocks": gpu_blocks,
        "host_blocks": host_blocks,
        "replay_seconds": seconds,
        # match + insert each walk every block of the prompt
        "pages_per_second": 2 * trace.prompt_blocks / seconds if seconds > 0 else 0.0,
        "cost_model": dict(COST_MODEL),
    }


def replay(trace_path: str | Path | Trace, gpu_blocks: int | None = None, host_blocks: int | None = None,
           policies: Sequence[str] = POLICIES, limit: int | None = None, reuse_class: str = "output",
           **cache_kwargs: Any) -> dict[str, dict]:
    """Replays a trace (a path or a loaded Trace) once per policy at the given capacities in blocks
    (default: 1% and 10% of its unique blocks). Returns policy -> metrics, with gpu_hit_rate,
    host_hit_rate, total_hit_rate, host_writes_per_block, unique_blocks, ceiling,
    prefill_seconds_saved, replay_seconds and pages_per_second among them."""
    policies = list(parse_policies(policies))
    trace = trace_path if isinstance(trace_path, Trace) else load_trace(trace_path, limit)
    gpu, host = capacities(trace, gpu_blocks, host_blocks)
    return {p: replay_policy(trace, gpu, host, p, reuse_class, **cache_kwargs) for p in policies}


def parse_policies(values: Iterable[str] | str | None) -> list[str]:
    """["lru", "hot"] from --policy lru --policy hot, --policy lru,hot or None (both)."""
    if values is None:
        return list(POLICIES)
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        for p in str(v).split(","):
            p = p.strip()
            if not p:
                continue
            split_policy(p)
            if p not in out:
                out.append(p)
    if not out:
        raise ValueError("policy: none given")
    return out


def goals(results: dict[str, dict], is_default_conversation: bool) -> list[tuple[str, bool]]:
    """(description, met) for the goals that apply to this run."""
    out = []
    hot, lru = results.get("hot"), results.get("lru")
    if hot and is_default_conversation:
        out.append((f"hot GPU hit rate >= {GOAL_HOT_GPU_HIT:.2f} (lru ~0.054)", hot["gpu_hit_rate"] >= GOAL_HOT_GPU_HIT))
        out.append((f"hot total hit rate >= {GOAL_HOT_TOTAL_HIT:.2f}", hot["total_hit_rate"] >= GOAL_HOT_TOTAL_HIT))
        out.append((f"hot host writes per prompt block <= {GOAL_HOT_MAX_WRITES:.2f} (write-everything lru ~0.72)",
                    hot["host_writes_per_block"] <= GOAL_HOT_MAX_WRITES))
    if hot and lru:
        out.append((f"hot total hit rate >= lru - {GOAL_MAX_LOSS_VS_LRU:.2f}",
                    hot["total_hit_rate"] >= lru["total_hit_rate"] - GOAL_MAX_LOSS_VS_LRU))
    return out


def is_default_conversation(trace: Trace, gpu: int, host: int) -> bool:
    """The goals' configuration: the conversation trace at 1% / 10% of its unique blocks."""
    want = capacities(trace, None, None)
    return "conversation" in trace.name and (gpu, host) == want


def print_results(results: dict[str, dict], out=None, goal_lines: Iterable[tuple[str, bool]] = ()) -> None:
    out = sys.stdout if out is None else out
    if not results:
        return
    first = next(iter(results.values()))
    print(f"trace {first['trace']}: {first['requests']} requests, {first['prompt_blocks']} prompt blocks, "
          f"{first['unique_blocks']} unique; GPU {first['gpu_blocks']} blocks, host {first['host_blocks']} blocks; "
          f"unlimited-capacity ceiling {first['ceiling']:.3f}", file=out)
    header = (f"{'policy':<8} {'gpu hit':>8} {'host hit':>8} {'total':>7} {'writes/blk':>10} "
              f"{'prefill saved s':>15} {'of total s':>10} {'replay s':>8} {'Mpages/s':>8}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for p, r in results.items():
        print(f"{p:<8} {r['gpu_hit_rate']:8.4f} {r['host_hit_rate']:8.4f} {r['total_hit_rate']:7.4f} "
              f"{r['host_writes_per_block']:10.4f} {r['prefill_seconds_saved']:15.1f} "
              f"{r['prefill_seconds_total']:10.1f} {r['replay_seconds']:8.2f} {r['pages_per_second'] / 1e6:8.2f}",
              file=out)
    cm = first["cost_model"]
    print(f"cost model: {cm['model']} on {cm['device']}: prefill {cm['prefill_us_per_token']:g} us/token, "
          f"{cm['kv_bytes_per_block'] >> 20} MiB KV per {cm['block_tokens']}-token block, PCIe "
          f"{cm['pcie_gbps']:g} GB/s (GPU hit saves {cm['gpu_hit_saves_s'] * 1e3:.2f} ms, host hit "
          f"{cm['host_hit_saves_s'] * 1e3:.2f} ms per block)", file=out)
    for desc, met in goal_lines:
        print(f"goal [{first['trace']}] {desc}: {'met' if met else 'NOT MET'}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcore.bench prefix-replay",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = default_trace_path()
    parser.add_argument("--trace", metavar="PATH", default=None,
                        help=f"JSONL trace (default: {default or '../shared/traces/' + DEFAULT_TRACE_NAME})")
    parser.add_argument("--gpu-blocks", type=int, metavar="N", help="GPU tier in blocks (default: 1%% of unique)")
    parser.add_argument("--host-blocks", type=int, metavar="M", help="host tier in blocks (default: 10%% of unique)")
    parser.add_argument("--policy", action="append", metavar="P",
                        help="lru, hot and/or hot:BUDGET (hot with that many host writes per queried block "
                             "for first-seen blocks; inf = unlimited); repeat or comma-separate (default: lru,hot)")
    parser.add_argument("--reuse-class", choices=REUSE_CLASSES, default="output",
                        help="how requests are labelled for hot's learned admission (default: output)")
    parser.add_argument("--limit", type=int, metavar="R", help="replay only the first R requests")
    parser.add_argument("--json", metavar="FILE", help="write policy -> metrics as JSON")
    args = parser.parse_args(argv)

    try:
        policies = parse_policies(args.policy)
    except ValueError as e:
        parser.error(str(e))
    path = Path(args.trace) if args.trace else default
    if path is None or not path.exists():
        parser.error(f"trace not found: {args.trace or '../shared/traces/' + DEFAULT_TRACE_NAME}")
    if args.gpu_blocks is not None and args.gpu_blocks < 1:
        parser.error("--gpu-blocks must be >= 1")
    if args.host_blocks is not None and args.host_blocks < 0:
        parser.error("--host-blocks must be >= 0")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    trace = load_trace(path, args.limit)
    gpu, host = capacities(trace, args.gpu_blocks, args.host_blocks)
    results = replay(trace, gpu, host, policies, reuse_class=args.reuse_class)
    print_results(results, goal_lines=goals(results, is_default_conversation(trace, gpu, host)))
    if args.json:
        import datetime
        import platform

        run = {  # where and how these numbers were made, in every policy's entry
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "-m", "kvcore.bench", "prefix-replay",
                                 *(a if not a.endswith(".jsonl") else Path(a).name for a in (sys.argv[1:] if argv is None else argv))]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads",
        }
        with open(args.json, "w") as f:
            json.dump({p: {**r, "run": run} for p, r in results.items()}, f, indent=2)
            f.write("\n")
    return 0


# ---- the quick "prefix-cache" benchmark of `python -m kvcore.bench` / `python -m kvcore` -------------

QUICK_REQUESTS = 2000


def bench_prefix_cache(device, quick: bool) -> list:
    """Replays the first 2000 requests of the conversation trace (all of it unless quick), or a
    synthetic multi-turn workload when the trace is absent, at 1% / 10% of its unique blocks, with
    each policy. CPU only (the cache's bookkeeping runs on the host). time_us = microseconds per
    prompt block (match + insert); the hit rates and the cost model go to `extra`."""
    from ._harness import Row

    if device.kind != "cpu":
        return []
    path = default_trace_path()
    limit = QUICK_REQUESTS if quick else None
    trace = load_trace(path, limit) if path else synthetic_trace(QUICK_REQUESTS)
    gpu, host = capacities(trace, None, None)
    results = replay(trace, gpu, host, POLICIES)
    # The goals are about whole traces: checked in full runs only.
    goal_list = goals(results, is_default_conversation(trace, gpu, host)) if path and limit is None else []
    rows = []
    label = "conv" if "conversation" in trace.name else "synthetic"
    for p, r in results.items():
        extra = {k: v for k, v in r.items() if k != "cost_model"}
        extra["cost_model"] = r["cost_model"]
        if p == "hot" and goal_list:
            extra["goal"] = "; ".join(d for d, _ in goal_list)
            extra["goal_met"] = all(m for _, m in goal_list)
        rows.append(Row("prefix-cache", f"{label} {len(trace)}req {p} tot={r['total_hit_rate']:.3f}", "cpu",
                        time_us=r["replay_seconds"] / max(1, trace.prompt_blocks) * 1e6, gbps=0.0, extra=extra))
    return rows


def results_from_rows(rows: list) -> dict[str, dict]:
    """policy -> metrics, from the rows of bench_prefix_cache."""
    return {r.extra["policy"]: dict(r.extra) for r in rows if r.bench == "prefix-cache"}


if __name__ == "__main__":
    sys.exit(main())
