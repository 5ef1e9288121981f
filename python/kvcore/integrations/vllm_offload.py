"""kvcore as vLLM v1's KV offloading spec: CPU offloading whose manager is kvcore's PrefixCache
("hot" policy) and whose workers move blocks GPU <-> CPU with `kvcore.copy_pages`.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"spec_name": "KVCoreOffloadingSpec",
        "spec_module_path": "kvcore.integrations.vllm_offload", "cpu_bytes_to_use": 32000000000}}'

vLLM's OffloadingConnector is generic over specs (OffloadingSpecFactory.create_spec imports
`spec_module_path`.`spec_name` when the name is not registered), so no connector of kvcore's own is
needed: the connector asks the spec for the scheduler-side manager and the worker-side handlers.
Written against vllm/v1/kv_offload/base.py (OffloadingSpec(vllm_config, kv_cache_config),
OffloadingManager with lookup(key, req_context) / prepare_load / touch / complete_load /
prepare_store -> PrepareStoreOutput / complete_store(success) / take_events, GPULoadStoreSpec with
group_sizes and block_indices, CanonicalKVCaches), vllm/v1/kv_offload/worker/worker.py
(OffloadingHandler.transfer_async / get_finished / wait, TransferResult) and
vllm/v1/kv_offload/factory.py, as of the newest vLLM source (the 0.34 line).

The manager keeps one CPU block per offloaded block (OffloadKey); vLLM's chained block hashes make
each request's keys a path of kvcore's radix tree, so CPU blocks are evicted leaves first and, with
"hot", coldest by decayed hit count (lookups are hits): a hot shared prefix outlives a stream of
one-off prompts. The PrefixCache's first tier ("gpu" in its stats) holds the CPU blocks: vLLM keeps
its GPU blocks and GPU prefix cache itself. extra_config: `cpu_bytes_to_use` (or `num_cpu_blocks`),
`kvcore_policy` ("hot" or "lru"), `kvcore_half_life` (seconds). Not supported (ValueError): an
offloaded `block_size` other than the GPU block size.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

import kvcore

from ._keyed import KeyedPages

try:  # vLLM's classes when it is installed; the same interface otherwise
    from vllm.v1.kv_offload.base import BlockIDsLoadStoreSpec as _BlockIDsSpec
    from vllm.v1.kv_offload.base import GPULoadStoreSpec
    from vllm.v1.kv_offload.base import OffloadingEvent, OffloadingManager, OffloadingSpec, PrepareStoreOutput
    from vllm.v1.kv_offload.worker.worker import OffloadingHandler, TransferResult
except ImportError:  # pragma: no cover - exercised where vLLM is absent
    _BlockIDsSpec = OffloadingManager = OffloadingSpec = OffloadingHandler = object

    class GPULoadStoreSpec:  # type: ignore[no-redef]  # medium tag the handlers are registered under
        @staticmethod
        def medium() -> str:
            return "GPU"

    @dataclass
    class PrepareStoreOutput:  # type: ignore[no-redef]
        keys_to_store: list
        store_spec: Any
        evicted_keys: list

    @dataclass
    class OffloadingEvent:  # type: ignore[no-redef]
        keys: list
        medium: str
        removed: bool

    @dataclass
    class TransferResult:  # type: ignore[no-redef]
        job_id: int
        success: bool
        transfer_size: int | None = None
        transfer_time: float | None = None
        transfer_type: tuple[str, str] | None = None

__all__ = ["KVCoreCPULoadStoreSpec", "KVCoreOffloadingHandler", "KVCoreOffloadingManager", "KVCoreOffloadingSpec"]

MEDIUM = "CPU"


class KVCoreCPULoadStoreSpec(_BlockIDsSpec):
    """CPU block ids of a load or store, in key order (one per key)."""

    def __init__(self, block_ids):
        self.block_ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)

    @staticmethod
    def medium() -> str:
        return MEDIUM

    def __repr__(self) -> str:
        return f"KVCoreCPULoadStoreSpec({self.block_ids.tolist()})"


def _group(key: Any) -> Any:
    """The KV-cache group of an OffloadKey (block hash + 4-byte big-endian group index)."""
    return bytes(key[-4:]) if isinstance(key, (bytes, bytearray)) and len(key) > 4 else None


def _group_runs(keys: list) -> list[list]:
    runs: list[list] = []
    for key in keys:
        if runs and _group(runs[-1][-1]) == _group(key):
            runs[-1].append(key)
        else:
            runs.append([key])
    return runs


class KVCoreOffloadingManager(OffloadingManager):
    """vLLM's scheduler-side OffloadingManager over kvcore's PrefixCache (see the module docstring).
    A block being stored is not loadable until complete_store; blocks being loaded or stored are
    protected from eviction."""

    def __init__(self, num_blocks: int, policy: str = "hot", half_life: float = 600.0,
                 enable_events: bool = False):
        self.store = KeyedPages(num_blocks, policy=policy, half_life=half_life)
        self._pending: set = set()          # prepared for store, not yet complete
        self._invalid: set = set()          # stores that failed: in the tree, not loadable
        self._tails: OrderedDict = OrderedDict()  # (request, group) -> last stored key (the next run's parent)
        self._events: list | None = [] if enable_events else None

    def _request(self, req_context: Any) -> Any:
        return getattr(req_context, "req_id", None) or id(req_context)

    def lookup(self, key, req_context=None) -> bool | None:
        return key not in self._pending and key not in self._invalid and self.store.lookup(key)

    def prepare_load(self, keys, req_context=None) -> KVCoreCPULoadStoreSpec:
        keys = list(keys)
        bad = [k for k in keys if k not in self.store or k in self._pending or k in self._invalid]
        if bad:
            raise KeyError(f"keys: {len(bad)} of the blocks to load are not offloaded (first: {bad[0]!r})")
        for k in keys:
            self.store.lock(k)
        return KVCoreCPULoadStoreSpec([self.store.page(k) for k in keys])

    def touch(self, keys, req_context=None) -> None:
        # vLLM touches a request's whole key list: the chain the tree paths are built from.
        self.store.link(list(keys))

    def complete_load(self, keys, req_context=None) -> None:
        for k in keys:
            self.store.unlock(k)

    def prepare_store(self, keys, req_context=None) -> PrepareStoreOutput | None:
        keys = list(keys)
        req = self._request(req_context) if req_context is not None else None
        # Blocks whose earlier store failed keep their page and are written again; they and each
        # run's new blocks are locked at once, so that making room for a later run cannot evict them.
        new = [k for k in dict.fromkeys(keys) if k in self._invalid and k not in self._pending]
        pages, evicted = [self.store.page(k) for k in new], []
        for k in new:
            self.store.lock(k)
        # One run per KV-cache group (the scheduler lists the groups' keys one after the other; an
        # OffloadKey ends with its 4-byte group index): a block's parent is in its own group.
        for run in _group_runs(keys):
            # The run's first parent: learned from touch(), else the request's last stored block of
            # that group (blocks filled while decoding).
            tail = (req, _group(run[0]))
            parent = self._tails.get(tail) if req is not None and run[0] not in self.store.parents else None
            try:
                placed, run_pages, run_evicted = self.store.put(run, parent=parent)
            except MemoryError:  # every block is locked by loads/stores in flight
                for k in new:
                    self.store.unlock(k)
                self._invalid.update(new)  # placed, never written
                return None
            for k in placed:
                self.store.lock(k)
            new, pages, evicted = new + placed, pages + run_pages, evicted + run_evicted
            if req is not None:
                self._tails[tail] = run[-1]
                self._tails.move_to_end(tail)
                while len(self._tails) > 4096:
                    self._tails.popitem(last=False)
        self._invalid.difference_update(new)
        self._invalid.difference_update(evicted)
        self._pending.update(new)
        if self._events is not None and evicted:
            self._events.append(OffloadingEvent(keys=evicted, medium=MEDIUM, removed=True))
        return PrepareStoreOutput(keys_to_store=new, store_spec=KVCoreCPULoadStoreSpec(pages), evicted_keys=evicted)

    def complete_store(self, keys, req_context=None, success: bool = True) -> None:
        done = [k for k in dict.fromkeys(keys) if k in self._pending]
        for k in done:
            self._pending.discard(k)
            self.store.unlock(k)
        if not success:
            self._invalid.update(done)  # unreadable until stored again (or evicted)
        elif self._events is not None and done:
            self._events.append(OffloadingEvent(keys=done, medium=MEDIUM, removed=False))

    def take_events(self):
        events, self._events = (self._events or []), ([] if self._events is not None else None)
        return events

    def stats(self) -> dict:
        """kvcore's PrefixCache statistics plus lookup hits/misses."""
        return {**self.store.prefix.stats(), "lookup_hits": self.store.hits, "lookup_misses": self.store.misses}


@dataclass
class _Job:
    job_id: int
    event: Any        # torch.cuda.Event, None for a (synchronous) CPU copy
    nbytes: int
    start: float


class KVCoreOffloadingHandler(OffloadingHandler):
    """One direction (GPU->CPU or CPU->GPU) of block copies with `kvcore.copy_pages`, on a side CUDA
    stream (after the compute stream for offloads), jobs completing in submission order.

    gpu_tensors / cpu_tensors: matching lists of block-major tensors (vLLM's canonical
    (num_blocks, page_bytes) int8 views); group_data_refs: per KV-cache group, its tensors'
    indices (CanonicalKVCacheRef.tensor_idx)."""

    def __init__(self, gpu_tensors, cpu_tensors, group_data_refs, gpu_to_cpu: bool):
        if len(gpu_tensors) != len(cpu_tensors):
            raise ValueError("cpu_tensors: must match gpu_tensors one to one")
        # vLLM's canonical views are int8; copy_pages moves bytes as uint8 (same bits).
        as_bytes = lambda t: t.view(torch.uint8) if t.dtype == torch.int8 else t  # noqa: E731
        self.gpu_tensors = [as_bytes(t) for t in gpu_tensors]
        self.cpu_tensors = [as_bytes(t) for t in cpu_tensors]
        self.group_tensors = [[ref.tensor_idx for ref in refs] for refs in group_data_refs]
        self.gpu_to_cpu = gpu_to_cpu
        self.transfer_type = ("GPU", MEDIUM) if gpu_to_cpu else (MEDIUM, "GPU")
        cuda = any(t.is_cuda for t in self.gpu_tensors)
        self._stream = torch.cuda.Stream() if cuda else None
        self._jobs: list[_Job] = []

    def transfer_async(self, job_id: int, spec) -> bool:
        src, dst = spec
        gpu_spec, cpu_spec = (src, dst) if self.gpu_to_cpu else (dst, src)
        gpu_ids = np.asarray(gpu_spec.block_ids, np.int64)
        cpu_ids = np.asarray(cpu_spec.block_ids, np.int64)
        sizes = list(getattr(gpu_spec, "group_sizes", None) or [len(gpu_ids)])
        if len(sizes) != len(self.group_tensors):
            raise ValueError(f"group_sizes: {len(sizes)} groups, the KV caches have {len(self.group_tensors)}")
        if sum(sizes) != len(gpu_ids) or len(cpu_ids) != len(gpu_ids):
            raise ValueError(f"block_ids: {len(gpu_ids)} GPU and {len(cpu_ids)} CPU blocks for groups of {sizes} "
                             "(offloaded blocks are one GPU block each)")
        start, nbytes, t0 = 0, 0, time.perf_counter()
        stream = self._stream
        if stream is not None and self.gpu_to_cpu:
            stream.wait_stream(torch.cuda.current_stream())  # offload what the model has written
        for size, tensors in zip(sizes, self.group_tensors):
            g, c = gpu_ids[start:start + size], cpu_ids[start:start + size]
            start += size
            for t in tensors:
                gpu, cpu = self.gpu_tensors[t], self.cpu_tensors[t]
                if self.gpu_to_cpu:
                    kvcore.copy_pages(gpu, cpu, g, c, stream=stream)
                else:
                    kvcore.copy_pages(cpu, gpu, c, g, stream=stream)
                nbytes += size * gpu[0].numel() * gpu.element_size()
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        self._jobs.append(_Job(job_id, event, nbytes, t0))
        return True

    def get_finished(self) -> list:
        done = []
        while self._jobs and (self._jobs[0].event is None or self._jobs[0].event.query()):
            job = self._jobs.pop(0)
            done.append(TransferResult(job_id=job.job_id, success=True, transfer_size=job.nbytes,
                                       transfer_time=time.perf_counter() - job.start,
                                       transfer_type=self.transfer_type))
        return done

    def wait(self, job_ids) -> None:
        for job in self._jobs:
            if job.job_id in job_ids and job.event is not None:
                job.event.synchronize()

    def shutdown(self) -> None:
        self.wait({job.job_id for job in self._jobs})
        self._jobs.clear()


class KVCoreOffloadingSpec(OffloadingSpec):
    """The spec vLLM's OffloadingConnector builds (see the module docstring)."""

    def __init__(self, vllm_config: Any, kv_cache_config: Any):
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        if OffloadingSpec is not object:  # pragma: no cover - only where vLLM is installed
            super().__init__(vllm_config, kv_cache_config)
        self.vllm_config, self.kv_cache_config, self.extra_config = vllm_config, kv_cache_config, extra
        gpu_block_sizes = {g.kv_cache_spec.block_size for g in kv_cache_config.kv_cache_groups}
        block_size = extra.get("block_size")
        if block_size is not None and {int(block_size)} != gpu_block_sizes:
            raise ValueError(f"block_size: kvcore offloads whole GPU blocks ({sorted(gpu_block_sizes)} tokens), "
                             f"got {block_size}")
        self.block_size_factor = 1
        if extra.get("num_cpu_blocks") is not None:
            self.num_blocks = int(extra["num_cpu_blocks"])
        else:
            if not extra.get("cpu_bytes_to_use"):
                raise ValueError("cpu_bytes_to_use: must be given in kv_connector_extra_config (or num_cpu_blocks)")
            # Same accounting as vLLM's CPUOffloadingSpec: all layers' bytes of one block, every rank.
            page_bytes = max(g.kv_cache_spec.page_size_bytes for g in kv_cache_config.kv_cache_groups)
            per_block = page_bytes * len(kv_cache_config.kv_cache_tensors) * vllm_config.parallel_config.world_size
            self.num_blocks = int(extra["cpu_bytes_to_use"]) // per_block
        if self.num_blocks < 1:
            raise ValueError(f"cpu_bytes_to_use: room for {self.num_blocks} CPU blocks; at least 1 is needed")
        self._manager: KVCoreOffloadingManager | None = None
        self._handlers: tuple[KVCoreOffloadingHandler, KVCoreOffloadingHandler] | None = None

    def get_manager(self) -> KVCoreOffloadingManager:
        if self._manager is None:
            events = getattr(self.vllm_config, "kv_events_config", None)
            self._manager = KVCoreOffloadingManager(
                self.num_blocks, policy=str(self.extra_config.get("kvcore_policy", "hot")),
                half_life=float(self.extra_config.get("kvcore_half_life", 600.0)),
                enable_events=bool(events is not None and getattr(events, "enable_kv_cache_events", False)))
        return self._manager

    def get_handlers(self, kv_caches: Any) -> Iterator[tuple[type, type, KVCoreOffloadingHandler]]:
        """kv_caches: vLLM's CanonicalKVCaches (tensors with a leading num_blocks dim, group_data_refs)."""
        if self._handlers is None:
            pin = torch.cuda.is_available()
            gpu = [t.tensor for t in kv_caches.tensors]
            cpu = [torch.empty((self.num_blocks, *t.shape[1:]), dtype=t.dtype, pin_memory=pin) for t in gpu]
            refs = kv_caches.group_data_refs
            self._handlers = (KVCoreOffloadingHandler(gpu, cpu, refs, gpu_to_cpu=True),
                              KVCoreOffloadingHandler(gpu, cpu, refs, gpu_to_cpu=False))
        yield GPULoadStoreSpec, KVCoreCPULoadStoreSpec, self._handlers[0]
        yield KVCoreCPULoadStoreSpec, GPULoadStoreSpec, self._handlers[1]
