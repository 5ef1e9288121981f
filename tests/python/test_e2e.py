"""End to end: a small Llama-style model generates through kvcore (paged KV in VirtualTensors, prefix
cache with host offload and prefetch, paged prefill/decode, shared-prefix decode, INT4 KV) and agrees
with the plain torch reference (contiguous KV, SDPA)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvcore.demo import run_demo  # noqa: E402


def check_bf16(m):
    assert m["greedy_token_agreement"] == 1.0
    assert m["max_logit_error"] < 0.02 * m["logit_scale"]  # bf16 KV, float32 accumulation on both sides
    assert m["prefix_hit_rate"] > 0.5
    assert m["host_writes"] > 0 and m["prefetched_pages"] > 0 and m["host_hit_tokens"] > 0  # offload happened
    assert m["shared_prefix_decode_steps"] > 0 and m["decode_pages_saved_by_sharing"] > 0.2
    assert m["computed_prompt_tokens"] < 0.5 * m["prompt_tokens"]


def check_int4(m, bf16):
    assert m["kv_bytes_per_token"] <= 0.3 * bf16["kv_bytes_per_token"]
    assert m["greedy_token_agreement"] >= 0.6
    assert m["max_logit_error"] < 0.2 * m["logit_scale"]
    assert m["prefix_hit_rate"] == pytest.approx(bf16["prefix_hit_rate"])


def test_demo_cpu():
    bf16 = run_demo("cpu", verbose=False)
    check_bf16(bf16)
    check_int4(run_demo("cpu", int4=True, verbose=False), bf16)


@pytest.mark.cuda
def test_demo_cuda():
    bf16 = run_demo("cuda", verbose=False)
    check_bf16(bf16)
    check_int4(run_demo("cuda", int4=True, verbose=False), bf16)
