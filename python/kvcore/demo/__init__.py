"""`python -m kvcore demo`: a small Llama-style model generating through kvcore.

Several users share a long system prompt and hold multi-turn conversations; the KV memory budget is
small enough that earlier turns are offloaded to the host tier and prefetched back. Each turn runs
twice: through kvcore (paged KV in VirtualTensors, prefix cache, paged/shared-prefix attention,
optionally INT4 KV) and through the plain torch reference (contiguous KV, SDPA, recomputing every
prompt), and the two are compared token by token.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .engine import KVCoreEngine
from .model import ModelConfig, TinyLlama, reference_generate

__all__ = ["KVCoreEngine", "ModelConfig", "TinyLlama", "reference_generate", "run_demo"]


def run_demo(device: str = "cpu", *, users: int = 6, batch: int = 3, turns: int = 3, system_tokens: int = 96,
             message_tokens=(8, 24), new_tokens: int = 8, kv_pages: int = 24, host_pages: int = 256,
             int4: bool = False, policy: str = "lru", layers: int = 2, seed: int = 0, verbose: bool = True) -> dict:
    """Runs the workload through kvcore and the reference; returns the metrics. Users are served in
    batches of `batch`; with the default budget each batch pushes the previous one's conversation
    pages to the host tier, and the next turn prefetches them back."""
    rng = np.random.default_rng(seed)
    model = TinyLlama(ModelConfig(layers=layers, seed=seed), device=device)
    vocab = model.cfg.vocab
    engine = KVCoreEngine(model, kv_pages=kv_pages, host_pages=host_pages, int4=int4, policy=policy)
    system = rng.integers(0, vocab, system_tokens).tolist()
    history = [list(system) for _ in range(users)]
    agree = total = 0
    max_logit_err = 0.0
    kv_time = ref_time = 0.0
    for turn in range(turns):
        prompts = []
        for u in range(users):
            history[u] += rng.integers(0, vocab, int(rng.integers(*message_tokens))).tolist()
            prompts.append(list(history[u]))
        t0 = time.perf_counter()
        outs, logits = [], []
        for first in range(0, users, batch):
            o, lg = engine.generate(prompts[first:first + batch], new_tokens, now=float(turn * 60 + first))
            outs += o
            logits += list(lg)
        kv_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        for u, prompt in enumerate(prompts):
            ref_tokens, ref_logits = reference_generate(model, prompt, new_tokens)
            agree += sum(a == b for a, b in zip(outs[u], ref_tokens))
            total += new_tokens
            steps = next((i for i, (a, b) in enumerate(zip(outs[u], ref_tokens)) if a != b), new_tokens)
            if steps:  # compare logits while both followed the same tokens
                max_logit_err = max(max_logit_err, float((logits[u][:steps] - ref_logits[:steps]).abs().max()))
            history[u] += outs[u]
        ref_time += time.perf_counter() - t0
    s = engine.cache.stats()
    st = engine.stats
    hit = (s["gpu"]["hit_tokens"] + s["host"]["hit_tokens"]) / max(1, s["queried_tokens"])
    logit_scale = max(float(lg.abs().max()) for lg in logits)
    metrics = {
        "device": device,
        "kv": "int4" if int4 else "bf16",
        "tokens_per_s_kvcore": st.generated_tokens / kv_time,
        "tokens_per_s_reference": total / ref_time,
        "kv_bytes_per_token": engine.kv_bytes_per_token,
        "kv_bytes_per_token_bf16": 2 * model.cfg.layers * model.cfg.kv_heads * model.cfg.head_dim * 2,
        "prefix_hit_rate": hit,
        "gpu_hit_tokens": s["gpu"]["hit_tokens"],
        "host_hit_tokens": s["host"]["hit_tokens"],
        "host_writes": s["host"]["writes"],
        "prefetched_pages": s["prefetched_pages"],
        "prompt_tokens": st.prompt_tokens,
        "computed_prompt_tokens": st.computed_prompt_tokens,
        "shared_prefix_decode_steps": st.shared_prefix_steps,
        "decode_pages_saved_by_sharing": 1 - st.distinct_pages / max(1, st.page_uses),
        "greedy_token_agreement": agree / total,
        "max_logit_error": max_logit_err,
        "logit_scale": logit_scale,
    }
    if verbose:
        print_metrics(metrics)
    return metrics


def print_metrics(m: dict) -> None:
    print(f"  {m['kv']} KV on {m['device']}:")
    print(f"    tokens/s: kvcore {m['tokens_per_s_kvcore']:.1f}, plain torch reference {m['tokens_per_s_reference']:.1f}")
    print(f"    KV bytes per token: {m['kv_bytes_per_token']} (bf16 would be {m['kv_bytes_per_token_bf16']})")
    print(f"    prefix-cache hit rate: {m['prefix_hit_rate']:.3f} ({m['gpu_hit_tokens']} GPU + {m['host_hit_tokens']} "
          f"host-tier tokens; {m['host_writes']} pages offloaded, {m['prefetched_pages']} prefetched back)")
    print(f"    prompt tokens computed: {m['computed_prompt_tokens']} of {m['prompt_tokens']}")
    print(f"    decode KV pages saved by sharing: {100 * m['decode_pages_saved_by_sharing']:.1f}% "
          f"({m['shared_prefix_decode_steps']} shared-prefix decode steps)")
    print(f"    agreement with the reference: greedy tokens {100 * m['greedy_token_agreement']:.1f}%, "
          f"max logit error {m['max_logit_error']:.4f} (logits up to {m['logit_scale']:.1f})")
