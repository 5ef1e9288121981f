"""kvcore.torch: the ops as torch custom operators. torch.library.opcheck validates each one (schema,
fake implementation, in-place declarations) on fresh CPU data, and a torch.compile'd serving step
(append the new token's K/V, paged decode over it) gives the eager step's bits, caches included."""

from __future__ import annotations

import numpy as np
import pytest

import kvcore
from arrays import random_array

torch = pytest.importorskip("torch")
kt = pytest.importorskip("kvcore.torch")


def _decode_state(rng, dtype="bfloat16", batch=3, hq=8, hkv=2, d=64, page_size=16, pages_per_seq=4):
    num_pages = batch * pages_per_seq
    k_cache = random_array(rng, (num_pages, page_size, hkv, d), dtype, "torch")
    v_cache = random_array(rng, (num_pages, page_size, hkv, d), dtype, "torch")
    table = torch.from_numpy(rng.permutation(num_pages).astype(np.int32).reshape(batch, pages_per_seq))
    seq_lens = torch.from_numpy(rng.integers(1, page_size * pages_per_seq, batch).astype(np.int32))
    return k_cache, v_cache, table, seq_lens


def _slots(table, seq_lens, page_size=16):
    """The slot of each request's next token (its position seq_lens[b] - 1 after the append)."""
    pos = seq_lens.long() - 1
    return table.long().gather(1, (pos // page_size)[:, None])[:, 0] * page_size + pos % page_size


def test_import_kvcore_does_not_register_or_import_torch_ops():
    import subprocess
    import sys

    code = "import sys, kvcore; assert 'torch' not in sys.modules and 'kvcore.torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_opcheck_every_op(rng):
    k_cache, v_cache, table, seq_lens = _decode_state(rng)
    q = random_array(rng, (3, 8, 64), "bfloat16", "torch")
    new = random_array(rng, (3, 2, 64), "bfloat16", "torch")
    slots = _slots(table, seq_lens)
    torch.library.opcheck(kt.append_kv, (new, new, k_cache.clone(), v_cache.clone(), slots))
    torch.library.opcheck(kt.paged_decode, (q, k_cache, v_cache, table, seq_lens), dict(scale=0.2, soft_cap=30.0))
    torch.library.opcheck(kt.paged_decode_lse, (q, k_cache, v_cache, table, seq_lens))
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    torch.library.opcheck(kt.paged_prefill, (q, k_cache, v_cache, table, seq_lens, cu), dict(causal=True))
    torch.library.opcheck(kt.copy_pages, (k_cache, v_cache.clone(), torch.tensor([0, 3]), torch.tensor([5, 1])))
    o, lse = kt.paged_decode_lse(q, k_cache, v_cache, table, seq_lens)
    o2, lse2 = kt.paged_decode_lse(q, v_cache, k_cache, table, seq_lens)
    torch.library.opcheck(kt.merge_states, (o, lse, o2, lse2))
    cs, ps = kvcore.int4_cache_shapes(k_cache.shape[0], 16, 2, 64)
    codes = [torch.full(cs, 0xA5, dtype=torch.uint8) for _ in range(2)]
    params = [torch.zeros(ps, dtype=torch.float16) for _ in range(2)]
    signs = torch.from_numpy(kvcore.random_signs(64, 3))
    all_slots = torch.arange(k_cache.shape[0] * 16)
    kt.append_kv_int4(k_cache.reshape(-1, 2, 64), v_cache.reshape(-1, 2, 64), codes[0], params[0], codes[1],
                      params[1], all_slots, 32, signs)
    torch.library.opcheck(kt.append_kv_int4, (new, new, codes[0].clone(), params[0].clone(), codes[1].clone(),
                                              params[1].clone(), slots, 32, signs))
    torch.library.opcheck(kt.paged_decode_int4, (q, codes[0], params[0], codes[1], params[1], table, seq_lens, 32,
                                                 signs))


def _step(q, k_new, v_new, k_cache, v_cache, slots, table, seq_lens):
    torch.ops.kvcore.append_kv(k_new, v_new, k_cache, v_cache, slots)
    out, lse = torch.ops.kvcore.paged_decode_lse(q, k_cache, v_cache, table, seq_lens)
    return out, lse, out.float() * lse.exp()[..., None]  # torch work around the ops, fused by the compiler


def test_compiled_decode_step_equals_eager(rng):
    k_cache, v_cache, table, seq_lens = _decode_state(rng)
    q = random_array(rng, (3, 8, 64), "bfloat16", "torch")
    k_new = random_array(rng, (3, 2, 64), "bfloat16", "torch")
    v_new = random_array(rng, (3, 2, 64), "bfloat16", "torch")
    slots = _slots(table, seq_lens)
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    want = _step(q, k_new, v_new, eager_k, eager_v, slots, table, seq_lens)
    compiled = torch.compile(_step, fullgraph=True, dynamic=False)
    got = compiled(q, k_new, v_new, k_cache, v_cache, slots, table, seq_lens)
    assert torch.equal(k_cache, eager_k) and torch.equal(v_cache, eager_v)  # the in-place append happened
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # kvcore's results: the same bits
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=0)  # the compiler's own exp may round apart
    # kvcore's plain call agrees too (the custom op adds nothing of its own).
    direct = kvcore.paged_decode(q, eager_k, eager_v, table, seq_lens)
    assert torch.equal(torch.ops.kvcore.paged_decode(q, k_cache, v_cache, table, seq_lens), direct)
