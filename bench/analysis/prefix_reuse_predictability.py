"""How predictable is it, when a request's new blocks are inserted, whether they will be requested
again? The question behind the prefix cache's host admission (bench/results/*prefix-replay-notes.md).

For every first-seen full block of a Mooncake-format trace it records what an engine knows at
insert time (new-run length, cached-prefix length, output length, the partial block's size, time
since the prefix was last used, the prefix's and the first block's request counts, the turn number,
position in the run, arrival time) and whether the block is requested again. A gradient-boosted
classifier is trained on the first half of the trace (by time) and its precision at fixed recall is
measured on the second half. Needs scikit-learn (not a kvcore dependency):

    python bench/analysis/prefix_reuse_predictability.py ../shared/traces/mooncake_conversation_trace.jsonl
"""

from __future__ import annotations

import argparse
import bisect
import json

import numpy as np

BLOCK_TOKENS = 512
FEATURES = ["new_run", "cached_prefix", "output", "partial_tokens", "prefix_idle_s", "prefix_requests",
            "first_block_requests", "turn", "position_in_run", "arrival_s"]


def first_seen_blocks(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [n, len(FEATURES)], reused [n], arrival [n]) over every first-seen full block."""
    reqs = [json.loads(line) for line in open(path) if line.strip()]
    requested_at: dict[int, list[float]] = {}
    for r in reqs:
        for h in r["hash_ids"][:r["input_length"] // BLOCK_TOKENS]:
            requested_at.setdefault(h, []).append(r["timestamp"] / 1e3)
    last_seen: dict[int, float] = {}
    seen_count: dict[int, int] = {}
    prompt_ends: set[int] = set()
    rows, reused, arrival = [], [], []
    for r in reqs:
        t = r["timestamp"] / 1e3
        ids = r["hash_ids"][:r["input_length"] // BLOCK_TOKENS]
        m = 0
        while m < len(ids) and ids[m] in last_seen:
            m += 1
        idle = t - last_seen[ids[m - 1]] if m else -1.0
        prefix_requests = seen_count[ids[m - 1]] if m else 0
        turn = sum(1 for h in ids[:m] if h in prompt_ends)
        for k in range(m, len(ids)):
            times = requested_at[ids[k]]
            rows.append([len(ids) - m, m, r["output_length"], r["input_length"] % BLOCK_TOKENS, idle,
                         prefix_requests, seen_count.get(ids[0], 0), turn, k - m, t])
            reused.append(bisect.bisect_right(times, t) < len(times))
            arrival.append(t)
        for h in ids:
            last_seen[h] = t
            seen_count[h] = seen_count.get(h, 0) + 1
        if ids:
            prompt_ends.add(ids[-1])
    return np.asarray(rows, float), np.asarray(reused), np.asarray(arrival)


def main() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import precision_recall_curve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    args = parser.parse_args()
    x, y, t = first_seen_blocks(args.trace)
    train = t < np.median(t)
    print(f"{len(y)} first-seen blocks, {y.mean():.3f} requested again")
    columns = [("all features", list(range(len(FEATURES))))] + [(f, [i]) for i, f in enumerate(FEATURES)]
    for name, cols in columns:
        model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05).fit(x[train][:, cols], y[train])
        precision, recall, _ = precision_recall_curve(y[~train], model.predict_proba(x[~train][:, cols])[:, 1])
        at = [precision[recall >= r].max() for r in (0.3, 0.6)]  # the best operating point with that recall
        print(f"{name:<22} precision {at[0]:.3f} at 30% recall, {at[1]:.3f} at 60% recall (held-out half)")


if __name__ == "__main__":
    main()
