"""kvcore.integrations.vllm_offload driven the way vLLM v1's OffloadingConnector drives a spec.

vLLM does not install on CI, so the stand-ins below mirror what the connector hands the spec, and
the driver makes the connector's calls in its order:
- scheduler side (vllm/distributed/kv_transfer/kv_connector/v1/offloading/scheduler.py,
  OffloadingConnectorScheduler): get_num_new_matched_tokens -> manager.touch(all keys, ctx), then
  manager.lookup(key, ctx) per block from the first one not computed on the GPU until a miss;
  update_state_after_alloc -> manager.prepare_load(keys, ctx) paired with GPULoadStoreSpec(block_ids,
  group_sizes, block_indices); _get_reqs_to_store -> manager.prepare_store(new keys, ctx), then
  touch, then a (GPULoadStoreSpec, store_spec) transfer; update_connector_output ->
  complete_load / complete_store.
- worker side (offloading/worker.py, OffloadingConnectorWorker.register_kv_caches): each layer's
  FlashAttention cache [2, num_blocks, block_size, Hkv, D] is viewed as two (num_blocks, page_bytes)
  int8 tensors (CanonicalKVCaches); spec.get_handlers(...) handlers are registered by
  (src.medium(), dst.medium()) (worker/worker.py, OffloadingWorker) and run transfer_async /
  get_finished.
Keys are OffloadKeys as in vllm/v1/kv_offload/base.py: a chained block hash + 4-byte group index.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvcore.integrations.vllm_offload import KVCoreOffloadingSpec  # noqa: E402

BS, HK, D, LAYERS = 16, 2, 64, 2


class GPULoadStoreSpec:
    """Mirrors vllm/v1/kv_offload/base.py GPULoadStoreSpec."""

    def __init__(self, block_ids, group_sizes, block_indices):
        self.block_ids = np.array(block_ids, dtype=np.int64)
        self.group_sizes, self.block_indices = group_sizes, block_indices

    @staticmethod
    def medium() -> str:
        return "GPU"


class ReqContext:
    """Mirrors vllm/v1/kv_offload/base.py ReqContext."""

    def __init__(self, req_id, kv_transfer_params=None):
        self.req_id, self.kv_transfer_params = req_id, kv_transfer_params


class OffloadingWorker:
    """Mirrors vllm/v1/kv_offload/worker/worker.py OffloadingWorker (handlers by medium pair)."""

    def __init__(self):
        self.by_type = {}

    def register_handler(self, src_cls, dst_cls, handler):
        key = (src_cls.medium(), dst_cls.medium())
        assert key not in self.by_type
        self.by_type[key] = handler

    def transfer(self, job_id, spec):
        handler = self.by_type[(spec[0].medium(), spec[1].medium())]
        assert handler.transfer_async(job_id, spec)
        handler.wait({job_id})
        done = [r for h in self.by_type.values() for r in h.get_finished()]
        assert [(r.job_id, r.success) for r in done] == [(job_id, True)]
        return done[0]


def offload_key(block_hash: bytes, group: int = 0) -> bytes:
    return block_hash + group.to_bytes(4, "big")


def block_keys(tokens):
    """Chained block hashes of the full blocks (vLLM hashes parent hash + block tokens)."""
    keys, parent = [], b""
    for i in range(len(tokens) // BS):
        parent = hashlib.sha256(parent + np.asarray(tokens[i * BS:(i + 1) * BS], np.int64).tobytes()).digest()
        keys.append(offload_key(parent))
    return keys


def configs(num_gpu_blocks, **extra):
    page_bytes = 2 * BS * HK * D * 2  # K and V, bf16
    spec = SimpleNamespace(block_size=BS, page_size_bytes=page_bytes)
    layer_names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    kv_cache_config = SimpleNamespace(  # vllm/v1/kv_cache_interface.py KVCacheConfig
        num_blocks=num_gpu_blocks, kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=layer_names)],
        kv_cache_tensors=[SimpleNamespace(size=page_bytes * num_gpu_blocks, shared_by=[n]) for n in layer_names])
    vllm_config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector="OffloadingConnector", kv_connector_extra_config={
            "spec_name": "KVCoreOffloadingSpec", "spec_module_path": "kvcore.integrations.vllm_offload", **extra}),
        cache_config=SimpleNamespace(block_size=BS, enable_prefix_caching=True),
        parallel_config=SimpleNamespace(world_size=1), kv_events_config=None)
    return vllm_config, kv_cache_config


class Engine:
    """The connector's scheduler and worker halves over one spec, GPU caches on the CPU."""

    def __init__(self, num_gpu_blocks=48, cpu_blocks=8, seed=0, groups=1, **extra):
        self.g = torch.Generator().manual_seed(seed)
        vllm_config, kv_cache_config = configs(num_gpu_blocks)
        page_bytes = kv_cache_config.kv_cache_groups[0].kv_cache_spec.page_size_bytes
        vllm_config.kv_transfer_config.kv_connector_extra_config["cpu_bytes_to_use"] = cpu_blocks * page_bytes * LAYERS
        vllm_config.kv_transfer_config.kv_connector_extra_config.update(extra)
        self.spec = KVCoreOffloadingSpec(vllm_config, kv_cache_config)
        assert self.spec.num_blocks == cpu_blocks
        self.manager = self.spec.get_manager()
        self.kv = [torch.randn(2, num_gpu_blocks, BS, HK, D, generator=self.g).to(torch.bfloat16)
                   for _ in range(LAYERS)]
        tensors, refs = [], [[] for _ in range(groups)]
        for i, layer in enumerate(self.kv):  # register_kv_caches: FlashAttention layout -> K and V tensors
            raw = layer.view(torch.int8).view(2, num_gpu_blocks, page_bytes // 2)
            for half in raw.unbind(0):
                tensors.append(SimpleNamespace(tensor=half, page_size_bytes=page_bytes // 2))
                refs[i % groups].append(SimpleNamespace(tensor_idx=len(tensors) - 1, page_size_bytes=page_bytes // 2))
        self.worker = OffloadingWorker()
        for src, dst, handler in self.spec.get_handlers(SimpleNamespace(tensors=tensors, group_data_refs=refs)):
            self.worker.register_handler(src, dst, handler)
        self.jobs = 0

    def blocks(self, ids):
        return np.stack([layer[:, ids].view(torch.int16).numpy() for layer in self.kv])

    def matched(self, keys, ctx, computed_blocks=0):
        """get_num_new_matched_tokens: blocks loadable after the GPU-computed ones."""
        self.manager.touch(keys, ctx)
        hits = 0
        for key in keys[computed_blocks:]:
            if not self.manager.lookup(key, ctx):
                break
            hits += 1
        return hits

    def load(self, keys, ctx, gpu_ids, start_block=0):
        src = self.manager.prepare_load(keys, ctx)
        self.jobs += 1
        self.worker.transfer(self.jobs, (src, GPULoadStoreSpec(gpu_ids, [len(gpu_ids)], [start_block])))
        self.manager.complete_load(keys, ctx)

    def store(self, keys, ctx, gpu_ids, success=True):
        out = self.manager.prepare_store(keys, ctx)
        assert out is not None
        self.manager.touch(keys, ctx)
        if out.keys_to_store:
            src = [gpu_ids[keys.index(k)] for k in out.keys_to_store]
            self.jobs += 1
            self.worker.transfer(self.jobs, (GPULoadStoreSpec(src, [len(src)], [0]), out.store_spec))
        self.manager.complete_store(out.keys_to_store, ctx, success=success)
        return out


def tokens(g, n_blocks, start=0):
    return (torch.randint(0, 32000, (n_blocks * BS,), generator=g) + start).tolist()


def test_store_evict_load_round_trip_is_bit_exact():
    e = Engine()
    prompt = tokens(e.g, 5)
    keys = block_keys(prompt)
    ctx = ReqContext("a")
    assert e.matched(keys, ctx) == 0                      # nothing offloaded yet: a miss
    src_ids = [3, 17, 1, 40, 9]
    before = e.blocks(src_ids)
    out = e.store(keys, ctx, src_ids)
    assert out.keys_to_store == keys and out.evicted_keys == []
    assert sorted(out.store_spec.block_ids.tolist()) == sorted(set(out.store_spec.block_ids.tolist()))
    # vLLM frees and reuses the GPU blocks: poison the whole GPU cache, then a new request with the
    # same prompt loads its blocks into other GPU block ids.
    for layer in e.kv:
        layer.view(torch.int16).fill_(0x7FC1)
    ctx2 = ReqContext("b")
    assert e.matched(keys, ctx2) == 5
    dst_ids = [20, 21, 5, 33, 47]
    e.load(keys, ctx2, dst_ids)
    np.testing.assert_array_equal(e.blocks(dst_ids), before)
    untouched = [i for i in range(48) if i not in dst_ids]
    assert (e.blocks(untouched) == np.int16(0x7FC1)).all()
    # A GPU prefix hit of 2 blocks: only the rest is loaded, at block index 2.
    for layer in e.kv:
        layer.view(torch.int16).fill_(0x7FC1)
    ctx3 = ReqContext("c")
    assert e.matched(keys, ctx3, computed_blocks=2) == 3
    e.load(keys[2:], ctx3, [8, 9, 10], start_block=2)
    np.testing.assert_array_equal(e.blocks([8, 9, 10]), before[:, :, 2:])
    stats = e.manager.stats()
    assert stats["lookup_hits"] == 8 and stats["lookup_misses"] == 1


def run_pressure(policy):
    e = Engine(cpu_blocks=8, seed=1, kvcore_policy=policy)
    hot = tokens(e.g, 4)
    hot_keys = block_keys(hot)
    hot_ids = [0, 1, 2, 3]
    hot_data = e.blocks(hot_ids)
    e.store(hot_keys, ReqContext("hot-0"), hot_ids)
    evicted, hot_hits = [], []
    for r in range(12):
        # the shared prefix comes back every third request; one-off prompts arrive in between
        if r % 3 == 0:
            hot_hits.append(e.matched(hot_keys, ReqContext(f"hot-{r + 1}")))
        cold = block_keys(tokens(e.g, 2, start=100000 * (r + 1)))
        ctx = ReqContext(f"cold-{r}")
        assert e.matched(cold, ctx) == 0
        evicted += e.store(cold, ctx, [10 + 2 * r, 11 + 2 * r]).evicted_keys
    return e, hot_keys, hot_data, evicted, hot_hits


def test_hot_policy_keeps_the_hot_prefix_under_pressure():
    e, hot_keys, hot_data, evicted, hot_hits = run_pressure("hot")
    assert hot_hits == [4, 4, 4, 4]
    assert len(evicted) == 12 * 2 + 4 - 8 and not set(evicted) & set(hot_keys)
    assert e.matched(hot_keys, ReqContext("check")) == 4
    for layer in e.kv:
        layer.view(torch.int16).fill_(0x7FC1)
    e.load(hot_keys, ReqContext("load"), [30, 31, 32, 33])
    np.testing.assert_array_equal(e.blocks([30, 31, 32, 33]), hot_data)
    assert e.manager.stats()["gpu"]["evictions"] == len(evicted)
    # LRU (SGLang-style baseline) evicts it: the one-off prompts are more recent.
    e, hot_keys, _, evicted, hot_hits = run_pressure("lru")
    assert set(evicted) & set(hot_keys) and min(hot_hits) < 4


def test_decode_blocks_chain_below_the_prompt_and_evict_leaves_first():
    e = Engine(cpu_blocks=4, seed=2)
    prompt = tokens(e.g, 3)
    keys = block_keys(prompt)
    ctx = ReqContext("r")
    e.matched(keys[:2], ctx)
    e.store(keys[:2], ctx, [0, 1])
    e.store(keys[2:3], ctx, [2])   # a block filled while decoding: its parent is the request's last one
    for _ in range(3):
        e.matched(keys, ReqContext("again"))
    cold = block_keys(tokens(e.g, 2, start=50000))
    out = e.store(cold, ReqContext("cold"), [5, 6])
    assert out.evicted_keys == [keys[2]]          # the leaf of the prompt's path goes, not its root
    assert e.matched(keys, ReqContext("x")) == 2


def test_pending_failed_and_locked_blocks():
    e = Engine(cpu_blocks=2, seed=3)
    keys = block_keys(tokens(e.g, 2))
    ctx = ReqContext("p")
    out = e.manager.prepare_store(keys, ctx)
    assert out.keys_to_store == keys
    assert not e.manager.lookup(keys[0], ctx)     # not loadable before complete_store
    assert e.manager.prepare_store(block_keys(tokens(e.g, 1, start=7)), ReqContext("q")) is None  # all locked
    e.manager.complete_store(keys, ctx, success=False)
    assert e.matched(keys, ctx) == 0              # a failed store is not offered for loading
    again = e.store(keys, ctx, [4, 5])            # the retry writes the same CPU blocks
    assert again.keys_to_store == keys and list(again.store_spec.block_ids) == list(out.store_spec.block_ids)
    assert e.matched(keys, ctx) == 2


def test_bad_input_is_refused_with_the_setting_named():
    vllm_config, kv_cache_config = configs(8)
    with pytest.raises(ValueError, match="cpu_bytes_to_use"):
        KVCoreOffloadingSpec(vllm_config, kv_cache_config)
    vllm_config, kv_cache_config = configs(8, cpu_bytes_to_use=10**7, block_size=2 * BS)
    with pytest.raises(ValueError, match="block_size"):
        KVCoreOffloadingSpec(vllm_config, kv_cache_config)
    vllm_config, kv_cache_config = configs(8, cpu_bytes_to_use=10)
    with pytest.raises(ValueError, match="cpu_bytes_to_use"):
        KVCoreOffloadingSpec(vllm_config, kv_cache_config)
    e = Engine(cpu_blocks=4, seed=4)
    keys = block_keys(tokens(e.g, 2))
    with pytest.raises(KeyError, match="keys"):
        e.manager.prepare_load(keys, ReqContext("z"))
    out = e.store(keys, ReqContext("z"), [0, 1])
    handler = e.worker.by_type[("CPU", "GPU")]
    with pytest.raises(ValueError, match="group_sizes"):
        handler.transfer_async(99, (out.store_spec, GPULoadStoreSpec([0, 1], [1, 1], [0, 0])))
    with pytest.raises(ValueError, match="block_ids"):
        handler.transfer_async(99, (out.store_spec, GPULoadStoreSpec([0], [1], [0])))
    with pytest.raises(IndexError):  # kvcore.copy_pages checks block ids before copying
        handler.transfer_async(99, (out.store_spec, GPULoadStoreSpec([0, 480], [2], [0])))


def test_two_kv_cache_groups_round_trip():
    """A hybrid model's two KV-cache groups (one layer each): keys carry the group index and the GPU
    spec lists the groups' blocks one group after the other (group_sizes), as the scheduler does."""
    e = Engine(cpu_blocks=8, seed=5, groups=2)
    hashes = block_keys(tokens(e.g, 2))
    keys = [offload_key(k[:-4], 0) for k in hashes] + [offload_key(k[:-4], 1) for k in hashes]
    ctx = ReqContext("hybrid")
    out = e.manager.prepare_store(keys, ctx)
    assert out.keys_to_store == keys
    # each group's blocks form their own chain: group 1's first block is a root, not group 0's child
    assert e.manager.store.parents.get(keys[2]) is None and e.manager.store.parents[keys[3]] == keys[2]
    before = [e.kv[0][:, [4, 5]].clone(), e.kv[1][:, [6, 7]].clone()]  # group 0: blocks 4, 5; group 1: 6, 7
    e.jobs += 1
    e.worker.transfer(e.jobs, (GPULoadStoreSpec([4, 5, 6, 7], [2, 2], [0, 0]), out.store_spec))
    e.manager.complete_store(keys, ctx)
    for layer in e.kv:
        layer.view(torch.int16).fill_(0x7FC1)
    spec = e.manager.prepare_load(keys, ctx)
    e.jobs += 1
    e.worker.transfer(e.jobs, (spec, GPULoadStoreSpec([10, 11, 20, 21], [2, 2], [0, 0])))
    e.manager.complete_load(keys, ctx)
    assert torch.equal(e.kv[0][:, [10, 11]].view(torch.int16), before[0].view(torch.int16))
    assert torch.equal(e.kv[1][:, [20, 21]].view(torch.int16), before[1].view(torch.int16))
    assert (e.kv[1][:, [10, 11]].view(torch.int16) == 0x7FC1).all()  # group 0's blocks are not layer 1's
