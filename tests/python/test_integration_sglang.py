"""kvcore.integrations.sglang driven the way SGLang's ModelRunner drives an attention backend.

SGLang is not installed on CI (it pulls a CUDA torch), so the test builds the objects the backend
reads, with SGLang's attribute names and shapes (python/sglang/srt/model_executor/forward_batch_info.py,
mem_cache/memory_pool.py, layers/radix_attention.py of SGLang 0.5.x): a ModelRunner with
req_to_token_pool.req_to_token [max_reqs, max_context] and page_size; a ForwardBatch with
forward_mode, req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens, out_cache_loc and
token_to_kv_pool (get_key_buffer / get_value_buffer -> [slots, Hkv, D]); a RadixAttention layer
with tp_q_head_num, tp_k_head_num, qk_head_dim, v_head_dim, scaling, logit_cap,
sliding_window_size, layer_id. Calls follow AttentionBackend.forward: init_forward_metadata, then
forward_extend / forward_decode per layer; for CUDA graphs init_cuda_graph_state and the capture /
replay hooks. Outputs are checked against torch SDPA over each request's gathered K/V.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from kvcore.integrations.sglang import BACKEND_NAME, KVCoreAttnBackend, create_kvcore_backend  # noqa: E402


class Mode:
    def __init__(self, decode: bool):
        self.decode = decode

    def is_decode(self) -> bool:
        return self.decode

    def is_extend(self) -> bool:
        return not self.decode

    def __repr__(self):
        return "DECODE" if self.decode else "EXTEND"


class TokenToKVPool:
    def __init__(self, slots, layers, hk, d, dtype):
        self.k = [torch.zeros(slots, hk, d, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(slots, hk, d, dtype=dtype) for _ in range(layers)]

    def get_key_buffer(self, layer_id):
        return self.k[layer_id]

    def get_value_buffer(self, layer_id):
        return self.v[layer_id]


def layer(layer_id, hq, hk, d, **kw):
    return SimpleNamespace(layer_id=layer_id, tp_q_head_num=hq, tp_k_head_num=hk, qk_head_dim=d, v_head_dim=d,
                           scaling=d ** -0.5, logit_cap=0.0, sliding_window_size=-1, is_cross_attention=False, **kw)


def reference(q, ks, vs, prefix, scale, cap=None):
    """One request: q [n, Hq, D] are the last n of len(ks) positions, causal."""
    hq, hk = q.shape[1], ks.shape[1]
    k = ks.float().repeat_interleave(hq // hk, 1).transpose(0, 1)
    v = vs.float().repeat_interleave(hq // hk, 1).transpose(0, 1)
    s = q.float().transpose(0, 1) @ k.transpose(1, 2) * scale
    if cap:
        s = cap * torch.tanh(s / cap)
    n, total = q.shape[0], ks.shape[0]
    s = s.masked_fill(torch.arange(total)[None, :] > (prefix + torch.arange(n))[:, None], float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1)


class Engine:
    """Slot allocation and request bookkeeping the way SGLang's pools do it: slots page by page."""

    def __init__(self, page_size, hq=8, hk=2, d=128, layers=2, dtype=torch.bfloat16, reqs=8, ctx=96, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.ps, self.hq, self.hk, self.d, self.dtype = page_size, hq, hk, d, dtype
        pages = reqs * math.ceil(ctx / page_size) + 1
        self.pool = TokenToKVPool(pages * page_size, layers, hk, d, dtype)
        self.req_to_token = torch.zeros(reqs, ctx, dtype=torch.int32)
        perm = torch.randperm(pages - 1, generator=self.g) + 1  # page 0 unused (SGLang reserves slot 0)
        for r in range(reqs):
            own = perm[r * (pages - 1) // reqs:(r + 1) * (pages - 1) // reqs]
            slots = (own[:, None] * page_size + torch.arange(page_size)).reshape(-1)[:ctx]
            self.req_to_token[r, :len(slots)] = slots.to(torch.int32)
        self.runner = SimpleNamespace(device="cpu", page_size=page_size,
                                      req_to_token_pool=SimpleNamespace(req_to_token=self.req_to_token))
        self.layers = [layer(i, hq, hk, d) for i in range(layers)]
        self.kv = {}  # (req, layer) -> reference K/V so far

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.g).to(self.dtype)

    def batch(self, reqs, prefix_lens, new_lens, decode):
        seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
        loc = torch.cat([self.req_to_token[r, p:p + n] for r, p, n in zip(reqs, prefix_lens, new_lens)]).long()
        return SimpleNamespace(
            forward_mode=Mode(decode), batch_size=len(reqs), req_pool_indices=torch.tensor(reqs),
            seq_lens=torch.tensor(seq_lens), seq_lens_cpu=torch.tensor(seq_lens), seq_lens_sum=sum(seq_lens),
            extend_prefix_lens=torch.tensor(prefix_lens), extend_seq_lens=torch.tensor(new_lens),
            out_cache_loc=loc, token_to_kv_pool=self.pool, req_to_token_pool=self.runner.req_to_token_pool)

    def step(self, backend, reqs, prefix_lens, new_lens, decode, run_metadata=True):
        fb = self.batch(reqs, prefix_lens, new_lens, decode)
        if run_metadata:
            backend.init_forward_metadata(fb)
        worst = 0.0
        for lay in self.layers:
            n = sum(new_lens)
            q, k, v = self.rand(n, self.hq * self.d), self.rand(n, self.hk * self.d), self.rand(n, self.hk * self.d)
            fn = backend.forward_decode if decode else backend.forward_extend
            out = fn(q, k, v, lay, fb)
            assert out.shape == (n, self.hq * self.d)
            start = 0
            for r, p, m in zip(reqs, prefix_lens, new_lens):
                ks, vs = self.kv.get((r, lay.layer_id), (torch.empty(0, self.hk, self.d, dtype=self.dtype),) * 2)
                assert ks.shape[0] == p
                ks = torch.cat([ks, k[start:start + m].view(m, self.hk, self.d)])
                vs = torch.cat([vs, v[start:start + m].view(m, self.hk, self.d)])
                self.kv[(r, lay.layer_id)] = (ks, vs)
                ref = reference(q[start:start + m].view(m, self.hq, self.d), ks, vs, p, lay.scaling)
                got = out[start:start + m].view(m, self.hq, self.d).float()
                worst = max(worst, float((got - ref).abs().max()))
                start += m
        return worst


@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_then_decode_matches_reference(page_size):
    eng = Engine(page_size)
    backend = create_kvcore_backend(eng.runner)
    assert isinstance(backend, KVCoreAttnBackend) and BACKEND_NAME == "kvcore"
    reqs = [3, 0, 5]
    # Prefill, then an extend on top of the cached prefix (chunked prefill / radix-cache hit), then decode.
    assert eng.step(backend, reqs, [0, 0, 0], [17, 5, 30], decode=False) < 0.02
    assert eng.step(backend, reqs, [17, 5, 30], [9, 12, 1], decode=False) < 0.02
    lens = [26, 17, 31]
    for _ in range(3):
        assert eng.step(backend, reqs, lens, [1, 1, 1], decode=True) < 0.02
        lens = [n + 1 for n in lens]


def test_cuda_graph_hooks_decode():
    eng = Engine(16)
    backend = KVCoreAttnBackend(eng.runner)
    reqs = [1, 2]
    eng.step(backend, reqs, [0, 0], [20, 7], decode=False)
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    # Capture with a padded batch of 4 (rows past bs get the fill value), then replay the real one.
    fill = backend.get_cuda_graph_seq_len_fill_value()
    backend.init_forward_metadata_capture_cuda_graph(4, 4, torch.tensor([1, 2, 0, 0]),
                                                     torch.tensor([21, 8, fill, fill]), None, Mode(True), None)
    captured = backend.forward_metadata.block_table.data_ptr()
    backend.init_forward_metadata_replay_cuda_graph(2, torch.tensor(reqs), torch.tensor([21, 8]), 29, None,
                                                    Mode(True), None, torch.tensor([21, 8]))
    assert backend.forward_metadata.block_table.data_ptr() == captured  # same buffers the graph reads
    assert eng.step(backend, reqs, [20, 7], [1, 1], decode=True, run_metadata=False) < 0.02
    with pytest.raises(ValueError, match="forward_mode"):
        backend.init_forward_metadata_capture_cuda_graph(2, 8, torch.tensor(reqs), torch.tensor([21, 8]), None,
                                                         Mode(False), None)


def test_unsupported_layers_raise_by_name():
    eng = Engine(1)
    backend = KVCoreAttnBackend(eng.runner)
    fb = eng.batch([0], [0], [4], decode=False)
    backend.init_forward_metadata(fb)
    q, kv = eng.rand(4, 8 * 128), eng.rand(4, 2 * 128)
    lay = layer(0, 8, 2, 128)
    lay.sliding_window_size = 32
    with pytest.raises(ValueError, match="sliding_window_size"):
        backend.forward_extend(q, kv, kv, lay, fb)
    lay = layer(0, 8, 2, 128)
    lay.v_head_dim = 64
    with pytest.raises(ValueError, match="v_head_dim"):
        backend.forward_extend(q, kv, kv, lay, fb)
    eng48 = Engine(1, d=48)
    fb48 = eng48.batch([0], [0], [4], decode=False)
    b48 = KVCoreAttnBackend(eng48.runner)
    b48.init_forward_metadata(fb48)
    with pytest.raises(ValueError, match="head_dim"):
        b48.forward_extend(eng48.rand(4, 8 * 48), eng48.rand(4, 2 * 48), eng48.rand(4, 2 * 48), eng48.layers[0], fb48)
    with pytest.raises(ValueError, match="use_mla_backend"):
        KVCoreAttnBackend(SimpleNamespace(**vars(eng.runner), use_mla_backend=True))
