"""kvcore.integrations.transformers against transformers' own eager attention.

Tiny Llama- and Qwen2-style models built from configs with random weights (no downloads), a ragged
batch of left-padded prompts, greedy generation of 32 tokens:
- float32 model: generated tokens equal the eager path's. kvcore attention reads 16-bit KV, so a
  float32 model's K/V are rounded to float16: the logits differ from eager by that rounding (about
  1e-3 here), and the test first checks that the eager path has no near-tie that such a difference
  could flip (its smallest top-1 margin is well above the tolerance), so token equality is a sound
  assertion rather than luck.
- bfloat16 model: every step's logits within bf16 tolerance of eager run teacher-forced on the same
  tokens (one eager forward over the generated sequences).
- INT4 KV: agreement of greedy tokens with the teacher-forced eager float32 argmax, printed and
  asserted >= 0.65 (see INT4_MIN_AGREEMENT), and the logit error within 25% of the logit scale.
- A shared system prompt through the store's PrefixCache: the second batch reuses its cached pages
  (computed once), its rows share them, and tokens still equal eager's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
try:
    import transformers
except ImportError as e:  # CI installs the test extra, which includes transformers: never skip there
    if os.environ.get("CI"):
        raise
    pytest.skip(f"transformers is not installed ({e}); pip install '.[test]'", allow_module_level=True)

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import kvcore  # noqa: E402
import kvcore.integrations.transformers as kvt  # noqa: E402

NEW_TOKENS = 32
VOCAB = 512
PROMPT_LENS = (20, 7, 33)
FP32_REL_TOL = 2e-3     # float16 rounding of K/V and q, relative to the logit scale (measured ~4e-4)
BF16_REL_TOL = 0.05     # bf16 logits, relative to the logit scale (measured ~0.007)
# INT4: random-weight models have small top-1 margins (median ~1% of the logit scale), so INT4's
# rounding flips some greedy choices; measured 72-92% here. The logit error bound catches real bugs.
INT4_MIN_AGREEMENT = 0.65
INT4_REL_TOL = 0.25


def tiny_model(kind: str, dtype=torch.float32, seed: int = 7, head_dim: int = 64):
    common = dict(vocab_size=VOCAB, hidden_size=4 * head_dim, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.02,
                  pad_token_id=0, bos_token_id=None, eos_token_id=None, head_dim=head_dim)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=False, **common))
    return model.to(dtype).eval()


def ragged_batch(seed: int, lens=PROMPT_LENS, prefix: list[int] | None = None):
    """Left-padded prompts (as a tokenizer with padding_side="left" makes them); with a prefix, the
    rows are [prefix | left-padded rest], the layout KVCoreCache(prefix=...) expects."""
    g = torch.Generator().manual_seed(seed)
    width = max(lens)
    ids = torch.zeros(len(lens), width, dtype=torch.long)
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, width - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    if prefix is not None:
        p = torch.tensor(prefix).expand(len(lens), -1)
        ids, mask = torch.cat([p, ids], 1), torch.cat([torch.ones_like(p), mask], 1)
    return ids, mask


def generate(model, impl, ids, mask, cache=None):
    model.set_attn_implementation(impl)
    kwargs = {"cache": cache} if cache is not None else {}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits, 1).float()   # [B, T + new], [B, new, vocab]


def kvcore_cache(model, **kwargs):
    model.set_attn_implementation(kvt.ATTN_IMPLEMENTATION)
    return kvt.KVCoreCache(model, **kwargs)


def teacher_forced_logits(model, sequences, mask):
    """Eager logits for each generated position given the same preceding tokens: [B, new, vocab]."""
    model.set_attn_implementation("eager")
    full = torch.cat([mask, torch.ones(mask.shape[0], NEW_TOKENS, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=full).logits.float()
    return logits[:, mask.shape[1] - 1:-1]


def assert_matches_eager(model, ids, mask, tokens, logits) -> float:
    """Float32: tokens equal eager generate's, logits within the float16-rounding tolerance, and the
    eager path has no near-tie within the measured error (so the token check is well-posed)."""
    ref_tokens, ref_logits = generate(model, "eager", ids, mask)
    assert torch.equal(tokens, ref_tokens)
    err = float((logits - ref_logits).abs().max())
    assert err < FP32_REL_TOL * float(ref_logits.abs().max())
    assert min_margin(ref_logits) > err, "well-posed: no eager near-tie within the measured logit error"
    return err


def min_margin(logits):
    top = logits.topk(2, -1).values
    return float((top[..., 0] - top[..., 1]).min())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_float32_tokens_equal_eager(kind):
    model = tiny_model(kind)
    ids, mask = ragged_batch(seed=11)
    cache = kvcore_cache(model, num_pages=32)
    tokens, logits = generate(model, kvt.ATTN_IMPLEMENTATION, ids, mask, cache)
    print(f"{kind} float32: tokens equal eager, max logit error {assert_matches_eager(model, ids, mask, tokens, logits):.2e}")
    # The cache held each row's real tokens only: prompt + generated, less the last (never fed back).
    assert cache.seq_lens == [n + NEW_TOKENS - 1 for n in PROMPT_LENS]
    cache.release()
    assert cache.store.prefix.stats()["gpu"]["capacity_pages"] == 32


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bfloat16_logits_within_tolerance(kind):
    model = tiny_model(kind, torch.bfloat16)
    ids, mask = ragged_batch(seed=11)
    ref_tokens, _ = generate(model, "eager", ids, mask)
    tokens, logits = generate(model, kvt.ATTN_IMPLEMENTATION, ids, mask, kvcore_cache(model, num_pages=32))
    ref = teacher_forced_logits(model, tokens, mask)
    scale = float(ref.abs().max())
    err = float((logits - ref).abs().max())
    agree = float((tokens == ref_tokens).float()[:, ids.shape[1]:].mean())
    print(f"{kind} bfloat16: max logit error {err:.3f} at logit scale {scale:.2f}; "
          f"tokens equal to eager bf16 generate: {agree:.1%}")
    assert err < BF16_REL_TOL * scale


def test_int4_token_agreement():
    model = tiny_model("llama")
    ids, mask = ragged_batch(seed=11)
    cache = kvcore_cache(model, num_pages=32, int4=True)
    tokens, logits = generate(model, kvt.ATTN_IMPLEMENTATION, ids, mask, cache)
    ref = teacher_forced_logits(model, tokens, mask)
    agreement = float((ref.argmax(-1) == tokens[:, ids.shape[1]:]).float().mean())
    err = float((logits - ref).abs().max()) / float(ref.abs().max())
    ref_tokens, _ = generate(model, "eager", ids, mask)
    same_run = float((tokens == ref_tokens)[:, ids.shape[1]:].float().mean())
    print(f"INT4 KV: greedy tokens agree with eager float32 argmax (teacher-forced) {agreement:.1%}; "
          f"equal to the eager generate {same_run:.1%}; {cache.store.bytes_per_token} KV bytes/token "
          f"(float16: {2 * 2 * 2 * 2 * 64}); max logit error {err:.1%} of the logit scale")
    assert agreement >= INT4_MIN_AGREEMENT
    assert err < INT4_REL_TOL


@pytest.mark.parametrize("int4", [False, True])
def test_shared_prefix_reused_from_prefix_cache(int4):
    model = tiny_model("llama")
    system = torch.randint(1, VOCAB, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    store = kvt.KVCoreStore(model, num_pages=48, page_size=16, int4=int4)
    outputs = []
    for turn in range(2):
        ids, mask = ragged_batch(seed=20 + turn, lens=(9, 3, 14), prefix=system)
        cache = kvcore_cache(model, store=store, prefix=system, batch_size=3)
        # First batch computes the prefix; the second reuses its two full pages (32 tokens).
        assert cache.reused_prefix_tokens == (0 if turn == 0 else 32)
        tokens, logits = generate(model, kvt.ATTN_IMPLEMENTATION, ids, mask, cache)
        assert cache.seq_lens == [40 + n + NEW_TOKENS - 1 for n in (9, 3, 14)]
        cache.release()
        outputs.append((ids, mask, tokens, logits))
    stats = store.prefix.stats()
    assert stats["gpu"]["hit_tokens"] >= 32
    for ids, mask, tokens, logits in outputs:
        if int4:
            ref = teacher_forced_logits(model, tokens, mask)
            agreement = float((ref.argmax(-1) == tokens[:, ids.shape[1]:]).float().mean())
            print(f"INT4 KV with a shared prefix: agreement {agreement:.1%}")
            assert agreement >= INT4_MIN_AGREEMENT
        else:
            assert_matches_eager(model, ids, mask, tokens, logits)


def test_host_tier_prefix_prefetched_back():
    model = tiny_model("llama")
    system = torch.randint(1, VOCAB, (48,), generator=torch.Generator().manual_seed(4)).tolist()
    store = kvt.KVCoreStore(model, num_pages=12, page_size=16, host_pages=16, policy="lru")
    with kvcore_cache(model, store=store, prefix=system, batch_size=1):
        pass
    store.prefix.evict(12)   # push the cached system prompt to the host tier
    ids, mask = ragged_batch(seed=39, lens=(5, 8), prefix=system)
    with kvcore_cache(model, store=store, prefix=system, batch_size=2) as cache:
        assert cache.reused_prefix_tokens == 48
        tokens, logits = generate(model, kvt.ATTN_IMPLEMENTATION, ids, mask, cache)
    assert store.prefix.stats()["host"]["hit_tokens"] == 48
    assert_matches_eager(model, ids, mask, tokens, logits)


def test_unsupported_configurations_raise_by_name():
    with pytest.raises(ValueError, match="head_dim"):
        kvt.KVCoreStore(tiny_model("llama", head_dim=32))
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="attn_implementation"):
        kvt.KVCoreCache(model)
    model.set_attn_implementation(kvt.ATTN_IMPLEMENTATION)
    with pytest.raises(ValueError, match="kv_dtype"):
        kvt.KVCoreCache(model, kv_dtype=torch.float32)
    ids, mask = ragged_batch(seed=1)
    with pytest.raises(TypeError, match="KVCoreCache"):  # kvcore attention without its cache
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    cache = kvt.KVCoreCache(model, num_pages=2)   # 32 tokens of room for 3 x 33
    with pytest.raises(MemoryError):
        model(input_ids=ids, attention_mask=mask, cache=cache)


def test_import_kvcore_imports_no_engine():
    code = ("import sys, kvcore, kvcore.integrations; "
            "bad = [m for m in ('torch', 'transformers', 'vllm', 'sglang', 'kvcore.integrations.transformers', "
            "'kvcore.integrations.vllm_offload', 'kvcore.integrations.sglang_hicache') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
