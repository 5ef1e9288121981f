"""Virtual-memory KV tensors: one pool of physical pages, tensors that map them on demand.

A `PagePool` owns physical pages (CUDA: cuMemCreate pages of the device's allocation granularity,
2 MiB on current GPUs; CPU: memfd pages, the same semantics) plus an optional host tier for offload.
A `VirtualTensor` reserves its whole address range once - its address never changes, so CUDA graphs
may capture it - and maps pool pages into it on demand. Pages can be shared between tensors
(`alias`: a shared prefix costs its memory once), offloaded to the host tier with their contents and
prefetched back, and the pool can grow and shrink while tensors live (`resize`, `on_reclaim`).

Unmapped pages read as zeros: a zero page is mapped wherever nothing else is (read-only on CUDA,
where a stray write faults; on the CPU a stray write is harmless and dropped at the next map).
Newly mapped pages hold arbitrary contents, like any fresh allocation.

Releases that kernels may still be reading (`unmap`, `offload`) are ordered behind an event
recorded on the given stream - never a device- or stream-wide synchronization. All classes are
thread-safe and release the GIL in driver calls.
"""

from __future__ import annotations

import functools
import itertools
import sys
import weakref
from typing import Any, Callable, Sequence

from ._native import C as _C
from ._arrays import dtype_name as _dtype_name
from ._streams import resolve_stream

__all__ = ["Arena", "PagePool", "Transfer", "VirtualTensor"]

Transfer = _C.Transfer
Transfer.__doc__ = """An asynchronous offload or prefetch: `done()` polls, `wait()` blocks on its event
only (no device synchronization); `bytes` is the amount moved. CPU transfers complete at once."""


def _device_name(device: Any) -> str:
    if isinstance(device, str):
        return device
    if type(device).__module__ == "torch" and type(device).__name__ == "device":  # torch.device
        return device.type if device.index is None else f"{device.type}:{device.index}"
    raise TypeError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _stream_for(stream: Any, device: str) -> int:
    """An explicit stream, else torch's current stream for a CUDA pool when torch is in use."""
    if stream is None and device.startswith("cuda"):
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.current_stream(torch.device(device)).cuda_stream)
    return resolve_stream(stream, ())


class PagePool:
    """A pool of physical pages on one device, plus an optional host tier for offload.

    Args:
      device: "cpu", "cuda" or "cuda:N" (or a torch.device).
      capacity_bytes: device memory to create up front, rounded up to whole pages.
      host_capacity_bytes: size of the host tier (pinned memory on CUDA), rounded up to whole pages.
      page_bytes: physical page size; a multiple of the device's allocation granularity (reported
        as `granularity`). Default: the granularity on CUDA (2 MiB expected), 2 MiB on the CPU.
    """

    def __init__(self, device: Any = "cpu", capacity_bytes: int = 0, host_capacity_bytes: int = 0,
                 page_bytes: int | None = None):
        self._native = _C.PagePool(_device_name(device), int(capacity_bytes), int(host_capacity_bytes),
                                   int(page_bytes or 0))
        # Callbacks live here, where Python's GC sees them; the native pool only holds a weak
        # reference back, so a callback that references this pool forms no uncollectable cycle.
        self._reclaimers: dict[int, Callable[[int], int | None]] = {}
        self._reclaim_keys: dict[int, int] = {}  # native callback id -> key in _reclaimers

    device = property(lambda self: self._native.device, doc="'cpu' or 'cuda:N'")
    page_bytes = property(lambda self: self._native.page_bytes, doc="bytes per physical page")
    granularity = property(lambda self: self._native.granularity, doc="the device's VMM allocation granularity")
    capacity_pages = property(lambda self: self._native.capacity_pages, doc="physical pages in the pool")
    free_pages = property(lambda self: self._native.free_pages, doc="pages not mapped anywhere")
    host_capacity_pages = property(lambda self: self._native.host_capacity_pages, doc="host-tier slots")
    host_free_pages = property(lambda self: self._native.host_free_pages, doc="free host-tier slots")

    def resize(self, capacity_pages: int) -> None:
        """Grows or shrinks the physical pool to `capacity_pages` while tensors live.

        Shrinking takes free pages first, then calls the reclaim callbacks (newest first) with the
        number of pages still needed; raises MemoryError, capacity unchanged, if still short.
        """
        self._native.resize(int(capacity_pages))

    def on_reclaim(self, fn: Callable[[int], int | None]) -> int:
        """Registers fn(pages_needed) -> pages_freed, called when `resize` shrinks past the free
        pages (the consumer unmaps or offloads its coldest pages). Returns an id for remove_reclaim."""
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        key = next(_reclaim_keys)
        callback_id = self._native.on_reclaim(functools.partial(_call_reclaim, weakref.ref(self), key))
        self._reclaimers[key] = fn
        self._reclaim_keys[callback_id] = key
        return callback_id

    def remove_reclaim(self, callback_id: int) -> None:
        self._native.remove_reclaim(callback_id)
        del self._reclaimers[self._reclaim_keys.pop(callback_id)]

    def stats(self) -> dict:
        """Pages total/free/mapped/shared/releasing/offloaded, host tier, live tensors, reserved
        bytes, and per driver call ("map", "unmap", "set_access", "create", ...) its count and mean
        latency in microseconds."""
        return self._native.stats()

    def __repr__(self) -> str:
        return (f"PagePool(device={self.device!r}, page_bytes={self.page_bytes}, "
                f"capacity_pages={self.capacity_pages}, free_pages={self.free_pages}, "
                f"host_capacity_pages={self.host_capacity_pages})")


class VirtualTensor:
    """A tensor whose address range is reserved once and backed on demand by pool pages.

    Args:
      pool: the PagePool its pages come from.
      shape: the full (maximum) shape, e.g. [max_seqs, max_tokens, num_kv_heads, head_dim].
      dtype: "bfloat16", "float16", "float32", "int32", "int64", "uint8", or a numpy / torch dtype.

    The tensor exposes `__dlpack__` for its full shape, so `torch.from_dlpack(vt)` and
    `np.from_dlpack(vt)` are zero-copy views (freeing the tensor is refused while one lives).
    Page i covers bytes [i * page_bytes, (i + 1) * page_bytes) of the row-major layout.
    """

    def __init__(self, pool: PagePool, shape: Sequence[int], dtype: Any):
        if not isinstance(pool, PagePool):
            raise TypeError(f"pool: expected a kvcore.PagePool, got {type(pool).__name__}")
        self.pool = pool
        self._native = _C.VirtualTensor(pool._native, [int(d) for d in shape], _dtype_name(dtype))

    shape = property(lambda self: tuple(self._native.shape))
    dtype = property(lambda self: self._native.dtype, doc="kvcore dtype name")
    device = property(lambda self: self._native.device)
    data_ptr = property(lambda self: self._native.data_ptr, doc="the fixed base address")
    num_pages = property(lambda self: self._native.num_pages)
    page_bytes = property(lambda self: self._native.page_bytes)
    nbytes = property(lambda self: self._native.nbytes)
    is_freed = property(lambda self: self._native.is_freed)

    def map(self, first: int, count: int) -> None:
        """Maps free pool pages at pages [first, first + count). They must be unmapped (ValueError);
        MemoryError when the pool is short (nothing changes)."""
        self._native.map(first, count)

    def unmap(self, first: int, count: int, stream: Any = None) -> None:
        """Unmaps pages (mapped or offloaded). Their physical pages return to the pool once the work
        queued on `stream` so far has completed; offloaded contents are discarded."""
        self._native.unmap(first, count, _stream_for(stream, self.device))

    def ensure(self, nbytes: int) -> None:
        """Maps every still-unmapped page among those covering the first `nbytes` bytes."""
        self._native.ensure(int(nbytes))

    def alias(self, page: int, other: "VirtualTensor", other_page: int) -> None:
        """Maps the physical page behind other's `other_page` at this tensor's `page` (shared,
        reference-counted: it returns to the pool when its last mapping goes)."""
        if not isinstance(other, VirtualTensor):
            raise TypeError(f"other: expected a kvcore.VirtualTensor, got {type(other).__name__}")
        self._native.alias(page, other._native, other_page)

    def offload(self, first: int, count: int, stream: Any = None) -> Transfer:
        """Copies mapped pages to the host tier and returns their physical pages to the pool (after
        the copy). Asynchronous on `stream`; the pages then read as zeros until prefetched."""
        return self._native.offload(first, count, _stream_for(stream, self.device))

    def prefetch(self, first: int, count: int, stream: Any = None) -> Transfer:
        """Maps free pool pages at offloaded pages and copies their contents back, asynchronously on
        `stream` (work queued on it afterwards sees the data). The address never changes."""
        return self._native.prefetch(first, count, _stream_for(stream, self.device))

    def is_mapped(self, page: int) -> bool:
        return self._native.is_mapped(page)

    def is_offloaded(self, page: int) -> bool:
        return self._native.is_offloaded(page)

    def mapped_pages(self) -> list[int]:
        return self._native.mapped_pages()

    def physical_page(self, page: int) -> int:
        """The pool page id behind `page`, -1 when unmapped; equal ids mean shared memory."""
        return self._native.physical_page(page)

    def view(self, offset: int = 0, shape: Sequence[int] | None = None, dtype: Any = None):
        """A zero-copy DLPack-capable array over `shape` elements starting `offset` bytes in."""
        shape = self.shape if shape is None else shape
        return self._native.view(int(offset), [int(d) for d in shape], _dtype_name(dtype or self.dtype))

    def use_stream(self, stream: Any) -> None:
        """Records that work on `stream` uses this tensor's memory, so that destroying the tensor
        without free() releases its pages only after that work (exports through __dlpack__(stream=)
        and unmap/offload/prefetch record their streams themselves)."""
        self._native.use_stream(resolve_stream(stream, ()))

    def __dlpack__(self, **kwargs):
        stream = kwargs.get("stream")
        if isinstance(stream, int) and not isinstance(stream, bool) and stream >= 0 and self.device.startswith("cuda"):
            # The consumer's stream (DLPack: 1 is the legacy default stream, 2 the per-thread one).
            self._native.use_stream(0 if stream == 1 else stream)
        return self.view().__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        device = self.device
        return (2, int(device[5:])) if device.startswith("cuda") else (1, 0)  # kDLCUDA / kDLCPU

    def free(self, stream: Any = None) -> None:
        """Unmaps everything and releases the address range; later use raises KVCoreError."""
        self._native.free(_stream_for(stream, self.device))

    def __enter__(self) -> "VirtualTensor":
        return self

    def __exit__(self, *exc) -> None:
        if not self.is_freed:
            self.free()

    def __repr__(self) -> str:
        if self.is_freed:
            return "VirtualTensor(freed)"
        return (f"VirtualTensor(shape={self.shape}, dtype={self.dtype!r}, device={self.device!r}, "
                f"pages={len(self.mapped_pages())}/{self.num_pages} mapped)")


class Arena:
    """A bump (stack) allocator of temporary buffers on a VirtualTensor that borrows pages from the
    pool on demand and gives them all back on `reset()` - activations and the KV cache sharing one
    physical pool.

    `alloc(shape, dtype)` returns a zero-copy DLPack array (use it with torch.from_dlpack or
    np.from_dlpack); `mark()` / `release(mark)` pop back to an earlier point keeping pages mapped;
    buffers handed out before a `reset()` or `release()` must not be used afterwards.
    """

    def __init__(self, pool: PagePool, max_bytes: int, alignment: int = 256):
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment: must be a positive power of two, got {alignment}")
        self._tensor = VirtualTensor(pool, (int(max_bytes),), "uint8")
        self._alignment = alignment
        self._offset = 0

    capacity = property(lambda self: self._tensor.nbytes, doc="maximum bytes")
    used_bytes = property(lambda self: self._offset, doc="bytes handed out since the last reset")
    mapped_bytes = property(lambda self: len(self._tensor.mapped_pages()) * self._tensor.page_bytes)

    def alloc(self, shape: Sequence[int], dtype: Any):
        itemsize = _C.dtype_size(_dtype_name(dtype))
        count = 1
        for d in shape:
            if int(d) < 0:
                raise ValueError(f"shape: negative dimension {d}")
            count *= int(d)
        start = (self._offset + self._alignment - 1) & ~(self._alignment - 1)
        end = start + count * itemsize
        if end > self.capacity:
            raise MemoryError(f"Arena.alloc: {count * itemsize} bytes at offset {start} exceed the arena's "
                              f"{self.capacity} bytes")
        self._tensor.ensure(end)  # MemoryError from the pool leaves the arena unchanged
        view = self._tensor.view(start, shape, dtype)
        self._offset = end
        return view

    def mark(self) -> int:
        return self._offset

    def release(self, mark: int) -> None:
        if not 0 <= mark <= self._offset:
            raise ValueError(f"mark: {mark} is not a mark of this arena (used bytes {self._offset})")
        self._offset = mark

    def reset(self, stream: Any = None) -> None:
        """Forgets every buffer and gives all pages back to the pool (ordered behind `stream`)."""
        for first, count in _runs(self._tensor.mapped_pages()):
            self._tensor.unmap(first, count, stream)
        self._offset = 0

    def free(self) -> None:
        self._tensor.free()


_reclaim_keys = itertools.count()


def _call_reclaim(pool_ref: "weakref.ref[PagePool]", key: int, pages: int) -> int:
    pool = pool_ref()
    fn = pool._reclaimers.get(key) if pool is not None else None
    return int(fn(pages) or 0) if fn is not None else 0


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page indices -> (first, count) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs
