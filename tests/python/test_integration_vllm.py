"""kvcore.integrations.vllm driven the way vLLM v1's GPU model runner drives an attention backend.

vLLM is not installed on CI (it pulls a CUDA torch), so the test makes the calls vLLM makes, with
its argument names and shapes (vllm/v1/attention/backend.py, vllm 0.34): the backend's
get_kv_cache_shape allocates each layer's cache, get_builder_cls()(kv_cache_spec, layer_names,
vllm_config, device).build(common_prefix_len, CommonAttentionMetadata) makes the metadata,
get_impl_cls()(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name) is the impl, whose
do_kv_cache_update(layer, key, value, kv_cache, slot_mapping) and forward(layer, query, key, value,
kv_cache, attn_metadata, output=...) run per layer. The batch mixes decodes, a chunked-prefill
extend and a fresh prefill, padded past num_actual_tokens as for CUDA graphs (slot -1); outputs
are checked against SDPA over each request's K/V; cascade (common_prefix_len) against no cascade.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from kvcore.integrations.vllm import KVCoreAttentionBackend  # noqa: E402

HQ, HK, D, BS = 8, 2, 128, 16


def reference(q, ks, vs, prefix, scale, window=None):
    k = ks.float().repeat_interleave(HQ // HK, 1).transpose(0, 1)
    v = vs.float().repeat_interleave(HQ // HK, 1).transpose(0, 1)
    s = q.float().transpose(0, 1) @ k.transpose(1, 2) * scale
    pos, key = prefix + torch.arange(q.shape[0]), torch.arange(ks.shape[0])
    bad = key[None, :] > pos[:, None]
    if window:
        bad |= key[None, :] <= pos[:, None] - window
    return (s.masked_fill(bad, float("-inf")).softmax(-1) @ v).transpose(0, 1)


class Runner:
    def __init__(self, num_blocks=40, seed=0, sliding_window=None):
        self.g = torch.Generator().manual_seed(seed)
        B = KVCoreAttentionBackend
        assert B.supports_head_size(D) and B.supports_dtype(torch.bfloat16) and B.get_name() == "CUSTOM"
        self.kv_cache = torch.zeros(B.get_kv_cache_shape(num_blocks, BS, HK, D), dtype=torch.bfloat16)
        spec = SimpleNamespace(block_size=BS, num_kv_heads=HK, head_size=D, dtype=torch.bfloat16)
        self.builder = B.get_builder_cls()(spec, ["model.layers.0.self_attn.attn"], None, torch.device("cpu"))
        self.window = sliding_window
        self.impl = B.get_impl_cls()(HQ, D, D ** -0.5, HK, None, sliding_window, "auto", None, "decoder", None)
        self.layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.g).to(torch.bfloat16)

    def step(self, tables, cached, new, hist, common_prefix_len=0, pad_to=None):
        """tables: block ids per request; cached/new: tokens per request; hist: reference K/V."""
        n = sum(new)
        total = pad_to or n
        qsl = torch.tensor([0] + new).cumsum(0).to(torch.int32)
        seq_lens = torch.tensor([c + m for c, m in zip(cached, new)], dtype=torch.int32)
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        slots = [t[p // BS] * BS + p % BS for t, c, m in zip(tables, cached, new) for p in range(c, c + m)]
        slot_mapping = torch.tensor(slots + [-1] * (total - n), dtype=torch.int64)
        cm = SimpleNamespace(query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=len(new),
                             num_actual_tokens=n, max_query_len=max(new), max_seq_len=int(seq_lens.max()),
                             block_table_tensor=table, slot_mapping=slot_mapping, causal=True)
        md = self.builder.build(common_prefix_len, cm)
        q, k, v = self.rand(total, HQ, D), self.rand(total, HK, D), self.rand(total, HK, D)
        out = torch.full((total, HQ * D), float("nan"), dtype=torch.bfloat16)
        self.impl.do_kv_cache_update(self.layer, k, v, self.kv_cache, slot_mapping[:n])
        self.impl.forward(self.layer, q, k, v, self.kv_cache, md, output=out.view(total, HQ, D))
        worst = 0.0
        for r, (c, m) in enumerate(zip(cached, new)):
            a, b = int(qsl[r]), int(qsl[r + 1])
            ks, vs = hist.get(r, (torch.empty(0, HK, D, dtype=torch.bfloat16),) * 2)
            hist[r] = ks, vs = torch.cat([ks, k[a:b]]), torch.cat([vs, v[a:b]])
            ref = reference(q[a:b], ks, vs, c, D ** -0.5, self.window)
            worst = max(worst, float((out[a:b].view(m, HQ, D).float() - ref).abs().max()))
        return worst, out


@pytest.mark.parametrize("window", [None, 24])
def test_mixed_batch_matches_reference(window):
    run = Runner(sliding_window=window)
    tables = [[3, 7, 1], [12, 4, 9, 2], [20, 21]]
    hist = {}
    assert run.step(tables, [0, 0, 0], [20, 35, 9], hist, pad_to=72)[0] < 0.02           # prefills
    assert run.step(tables, [20, 35, 9], [1, 12, 1], hist, pad_to=16)[0] < 0.02         # decode, extend, decode
    assert run.step(tables, [21, 47, 10], [1, 1, 1], hist, pad_to=8)[0] < 0.02          # decodes


def test_cascade_common_prefix_equals_plain():
    shared = [5, 6]  # two blocks every request shares (common_prefix_len = 32)
    tables = [shared + [8], shared + [9, 10], shared + [11]]
    outs = []
    for cascade in (False, True):
        run = Runner(seed=1)
        hist = {}
        run.step([shared], [0], [32], hist)  # the prefix, computed once by one request
        hist = {r: hist[0] for r in range(3)}
        worst, out = run.step(tables, [32, 32, 32], [3, 17, 1], hist, common_prefix_len=32 if cascade else 0)
        assert worst < 0.02
        outs.append(out[:21])
    assert torch.allclose(outs[0].float(), outs[1].float(), atol=0.02)
    assert run.builder.use_cascade_attention(32, None, HQ, HK, False, False, False, 0, 1)


def test_unsupported_configurations_raise_by_name():
    impl_cls = KVCoreAttentionBackend.get_impl_cls()
    with pytest.raises(ValueError, match="alibi_slopes"):
        impl_cls(HQ, D, 0.1, HK, [0.5] * HQ)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        impl_cls(HQ, D, 0.1, HK, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="attn_type"):
        impl_cls(HQ, D, 0.1, HK, attn_type="encoder_only")
    with pytest.raises(ValueError, match="num_kv_heads"):
        impl_cls(HQ, D, 0.1, 3)
    assert not KVCoreAttentionBackend.supports_head_size(48)
    run = Runner()
    run.impl.head_size = 48
    with pytest.raises(ValueError, match="head_size"):
        run.step([[1]], [0], [4], {})
