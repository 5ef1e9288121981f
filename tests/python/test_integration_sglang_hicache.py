"""kvcore.integrations.sglang_hicache driven the way SGLang 0.5.x's HiCache drives a storage backend.

SGLang does not install on CI, so the stand-ins mirror what it hands the backend:
- StorageBackendFactory._create_dynamic_backend (python/sglang/srt/mem_cache/storage/backend_factory.py)
  imports extra_config's module_path, takes class_name and constructs it with
  (storage_config, kwargs); HiCacheStorageConfig / HiCacheStorageExtraInfo mirror
  python/sglang/srt/mem_cache/hicache_storage.py.
- HostPool mirrors MHATokenToKVPoolHost's layer_first layout (python/sglang/srt/mem_cache/
  memory_pool_host.py): kv_buffer [2, layers, tokens, H, D]; get_data_page(index, flat=True),
  get_dummy_flat_data_page(), set_from_flat_data_page(index, page).
- HiCacheController (python/sglang/srt/managers/cache_controller.py): a backup writes with
  batch_set_v1(keys, host_indices, extra_info) (zero copy) or batch_set(keys, pages) (generic); a
  prefetch asks batch_exists(keys, extra_info) for the stored prefix, then reads with
  batch_get_v1(keys, host_indices, extra_info) or batch_get(keys, dummy pages) +
  set_from_flat_data_page.
Page keys are chained sha256 hex digests of (previous key, page tokens), as SGLang's get_hash_str.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")

PS, LAYERS, H, D = 4, 2, 2, 32


@dataclass
class HiCacheStorageConfig:  # hicache_storage.py
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    attn_cp_rank: int = 0
    attn_cp_size: int = 1
    is_mla_model: bool = False
    enable_storage_metrics: bool = False
    is_page_first_layout: bool = False
    model_name: Optional[str] = "test/model"
    extra_config: Optional[dict] = None


@dataclass
class HiCacheStorageExtraInfo:  # hicache_storage.py
    prefix_keys: Optional[List[str]] = None
    extra_info: Optional[dict] = None


class HostPool:
    """MHATokenToKVPoolHost, layer_first layout."""

    def __init__(self, tokens, g):
        self.page_size, self.layout = PS, "layer_first"
        self.kv_buffer = torch.randn(2, LAYERS, tokens, H, D, generator=g).to(torch.bfloat16)

    def get_data_page(self, index, flat=True):
        page = self.kv_buffer[:, :, index:index + PS]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self):
        return torch.zeros(2, LAYERS, PS, H, D, dtype=torch.bfloat16).flatten()

    def set_from_flat_data_page(self, index, data_page):
        self.kv_buffer[:, :, index:index + PS] = data_page.reshape(2, LAYERS, PS, H, D)

    def pages(self, starts):
        return np.stack([self.kv_buffer[:, :, s:s + PS].view(torch.int16).numpy() for s in starts])

    def poison(self):
        self.kv_buffer.view(torch.int16).fill_(0x7FC1)


def page_keys(tokens, prior=None):
    keys = []
    for i in range(len(tokens) // PS):
        h = hashlib.sha256()
        if prior is not None:
            h.update(bytes.fromhex(prior))
        h.update(np.asarray(tokens[i * PS:(i + 1) * PS], np.uint32).tobytes())
        prior = h.hexdigest()
        keys.append(prior)
    return keys


def make_backend(**extra):
    """What `--hicache-storage-backend dynamic` does with the extra config."""
    extra = {"backend_name": "kvcore", "module_path": "kvcore.integrations.sglang_hicache",
             "class_name": "KVCoreHiCacheStorage", **extra}
    cls = getattr(importlib.import_module(extra["module_path"]), extra["class_name"])
    return cls(HiCacheStorageConfig(extra_config=extra), {})


def rand_tokens(g, pages, offset=0):
    return (torch.randint(0, 30000, (pages * PS,), generator=g) + offset).tolist()


def test_zero_copy_backup_and_prefetch_round_trip_bit_exact():
    g = torch.Generator().manual_seed(0)
    pool = HostPool(64, g)
    backend = make_backend(capacity_bytes=16 * pool.get_dummy_flat_data_page().numel() * 2)
    backend.register_mem_pool_host(pool)
    keys = page_keys(rand_tokens(g, 4))
    assert backend.batch_exists(keys, HiCacheStorageExtraInfo()) == 0
    src = [8, 12, 16, 20]
    before = pool.pages(src)
    assert backend.batch_set_v1(keys, torch.arange(8, 24), HiCacheStorageExtraInfo()) == [True] * 4
    pool.poison()
    assert backend.batch_exists(keys, HiCacheStorageExtraInfo()) == 4
    dst = torch.tensor([40, 41, 42, 43, 52, 53, 54, 55, 0, 1, 2, 3, 28, 29, 30, 31])
    assert backend.batch_get_v1(keys, dst, HiCacheStorageExtraInfo()) == [True] * 4
    np.testing.assert_array_equal(pool.pages([40, 52, 0, 28]), before)
    others = [s for s in range(0, 64, PS) if s not in (40, 52, 0, 28)]
    assert (pool.pages(others) == np.int16(0x7FC1)).all()
    # a continuation run hangs below the stored prefix (prefix_keys) and is found after it
    more = page_keys(rand_tokens(g, 2), prior=keys[-1])
    assert backend.batch_set_v1(more, torch.arange(32, 40), HiCacheStorageExtraInfo(prefix_keys=keys)) == [True] * 2
    assert backend.batch_exists(keys + more) == 6
    assert backend.batch_exists([page_keys(rand_tokens(g, 1))[0]] + keys) == 0
    stats = backend.get_stats()
    assert stats["pages_written"] == 6 and stats["nodes"] == 6


def test_generic_page_get_and_set_round_trip():
    g = torch.Generator().manual_seed(1)
    pool = HostPool(32, g)
    backend = make_backend(capacity_pages=8)
    keys = page_keys(rand_tokens(g, 3))
    pages = [pool.get_data_page(i * PS, flat=True) for i in range(3)]
    before = pool.pages([0, 4, 8])
    assert backend.batch_set(keys, pages)
    assert backend.set(keys[0], pages[0])            # already stored: nothing rewritten
    pool.poison()
    got = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    for i, page in enumerate(got):
        pool.set_from_flat_data_page(16 + i * PS, page)
    np.testing.assert_array_equal(pool.pages([16, 20, 24]), before)
    assert backend.get("missing") is None and not backend.exists("missing")
    single = backend.get(keys[1])
    assert torch.equal(single, got[1].view(torch.uint8))
    assert backend.exists(keys[2]) and backend.clear() and not backend.exists(keys[2])


def test_hot_policy_keeps_the_hot_prefix_under_capacity_pressure():
    def run(policy):
        g = torch.Generator().manual_seed(2)
        pool = HostPool(8 * PS, g)
        backend = make_backend(capacity_pages=8, policy=policy)
        backend.register_mem_pool_host(pool)
        hot = page_keys(rand_tokens(g, 4))
        assert all(backend.batch_set_v1(hot, torch.arange(0, 16)))
        hits = []
        for r in range(12):
            if r % 3 == 0:
                hits.append(backend.batch_exists(hot, HiCacheStorageExtraInfo()))
            cold = page_keys(rand_tokens(g, 2, offset=100000 * (r + 1)))
            assert backend.batch_exists(cold) == 0
            assert all(backend.batch_set_v1(cold, torch.arange(16, 24), HiCacheStorageExtraInfo()))
        return backend, hot, hits

    backend, hot, hits = run("hot")
    assert hits == [4, 4, 4, 4] and backend.batch_exists(hot) == 4
    stats = backend.get_stats()
    assert stats["gpu"]["evictions"] == 12 * 2 + 4 - 8 and stats["gpu"]["cached_pages"] == 8
    _, _, hits = run("lru")
    assert min(hits) < 4  # the recency baseline drops the prefix between its uses


def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="capacity_bytes"):
        make_backend()
    with pytest.raises(ValueError, match="capacity_bytes"):
        make_backend(capacity_bytes=10).set("k", torch.ones(64, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(3)
    pool = HostPool(16, g)
    backend = make_backend(capacity_pages=4)
    with pytest.raises(RuntimeError, match="register_mem_pool_host"):
        backend.batch_get_v1(["a"], torch.arange(PS))
    backend.register_mem_pool_host(pool)
    with pytest.raises(ValueError, match="host_indices"):
        backend.batch_set_v1(["a", "b"], torch.arange(PS))
    assert backend.set("a", pool.get_data_page(0))
    with pytest.raises(ValueError, match="value"):
        backend.set("b", torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="values"):
        backend.batch_set(["c"], [np.ones(4)])
    with pytest.raises(ValueError, match="target_location"):
        backend.get("a", torch.empty(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="values"):
        backend.batch_set(["c"], None)


def test_pages_stay_readable_when_token_ids_run_out(monkeypatch):
    """kvcore's tree takes int32 tokens: after 2**31 page ids the store moves to a new namespace
    (here after 6), and pages stored before and after stay readable and chained."""
    from kvcore.integrations._keyed import KeyedPages

    monkeypatch.setattr(KeyedPages, "_ID_LIMIT", 6)
    g = torch.Generator().manual_seed(4)
    pool = HostPool(16 * PS, g)
    backend = make_backend(capacity_pages=16)
    backend.register_mem_pool_host(pool)
    runs = [page_keys(rand_tokens(g, 4, offset=1000 * r)) for r in range(3)]
    data = []
    for r, keys in enumerate(runs):
        data.append(pool.pages([4 * PS * r + PS * i for i in range(4)]))
        assert all(backend.batch_set_v1(keys, torch.arange(4 * PS * r, 4 * PS * (r + 1))))
    more = page_keys(rand_tokens(g, 1), prior=runs[2][-1])  # continues a run of the newest namespace
    assert all(backend.batch_set_v1(more, torch.arange(0, PS), HiCacheStorageExtraInfo(prefix_keys=runs[2])))
    assert backend._store._ns == 2
    pool.poison()
    for r, keys in enumerate(runs):
        assert backend.batch_exists(keys) == 4
        assert all(backend.batch_get_v1(keys, torch.arange(4 * PS * r, 4 * PS * (r + 1))))
        np.testing.assert_array_equal(pool.pages([4 * PS * r + PS * i for i in range(4)]), data[r])
    assert backend.batch_exists(runs[2] + more) == 5
