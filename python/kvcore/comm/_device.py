"""Byte buffers on either side of the PCIe bus, so the collectives and links are written once.

A CPU buffer is a flat numpy uint8 array; a GPU buffer is a DeviceBytes (pointer, length, device)
that slices and splits into rows the way the numpy array does. What differs is how bytes are copied
and reduced: HostOps and DeviceOps (one per link stream) provide both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._native import C as _C


class DeviceBytes:
    """A contiguous byte range of GPU memory; it does not own the memory."""

    __slots__ = ("ptr", "nbytes", "device")

    def __init__(self, ptr: int, nbytes: int, device: int):
        self.ptr, self.nbytes, self.device = ptr, nbytes, device

    def __len__(self) -> int:
        return self.nbytes

    @property
    def size(self) -> int:
        return self.nbytes

    def __getitem__(self, index: slice) -> "DeviceBytes":
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"index: DeviceBytes takes contiguous slices only, got {index!r}")
        start, stop, _ = index.indices(self.nbytes)
        return DeviceBytes(self.ptr + start, max(0, stop - start), self.device)

    def reshape(self, rows: int, width: int) -> list["DeviceBytes"]:
        """The first rows * width bytes as `rows` consecutive rows (like numpy's 2-D reshape)."""
        if rows * width > self.nbytes:
            raise ValueError(f"reshape: {rows} x {width} bytes exceed the buffer's {self.nbytes}")
        return [DeviceBytes(self.ptr + r * width, width, self.device) for r in range(rows)]


def address(buf) -> int:
    """The first byte's address of a numpy array or a DeviceBytes."""
    return buf.ptr if isinstance(buf, DeviceBytes) else buf.ctypes.data


def carve(area, buffers: list) -> list:
    """Consecutive slices of `area` as long as each buffer (None stays None): where a staging area
    holds a list of messages."""
    views, at = [], 0
    for b in buffers:
        views.append(None if b is None else area[at:at + len(b)])
        at += 0 if b is None else len(b)
    return views


def copy_bytes(dst, src, stream: int) -> None:
    """dst[:] = src; through cudaMemcpyAsync on `stream` when either side is on the GPU (the caller
    synchronizes before it reads or reuses host memory)."""
    if isinstance(dst, np.ndarray) and isinstance(src, np.ndarray):
        dst[:] = src
    elif len(src):
        _C.cuda_memcpy_async(address(dst), address(src), len(src), stream)


def cuda_array_bytes(x: Any, what: str) -> tuple[DeviceBytes, str] | None:
    """(bytes, dtype name) of a contiguous CUDA array (torch, CuPy, any DLPack array on a GPU), or
    None for arrays elsewhere. KVCoreError when the array is on a GPU but CUDA is unusable here."""
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        if x.device.type != "cuda":
            return None
        _C._require_cuda(f"{what} (a CUDA array)")
        if not x.is_contiguous():
            raise ValueError(f"{what}: expected a contiguous array")
        from .._arrays import dtype_name

        return DeviceBytes(x.data_ptr(), x.numel() * x.element_size(), x.device.index), dtype_name(x.dtype)
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is None or dlpack_device()[0] not in (2, 13):  # kDLCUDA, kDLCUDAManaged
        return None
    _C._require_cuda(f"{what} (a CUDA array)")
    ptr, nbytes, dtype, device = _C.comm_cuda_array(x, what)
    return DeviceBytes(ptr, nbytes, device), dtype


class HostOps:
    """Copies and reductions of CPU buffers (the calling thread does them)."""

    stream = 0

    @staticmethod
    def copy(dst, src) -> None:
        dst[:] = src

    @staticmethod
    def reduce(inputs: list, out, dtype: str, op: str) -> None:
        _C.comm_reduce(inputs, out, dtype, op)


class DeviceOps:
    """Copies and reductions of GPU buffers, queued on one stream."""

    def __init__(self, stream: int, elem_sizes: dict[str, int]):
        self.stream = stream
        self._elem_sizes = elem_sizes

    def copy(self, dst: DeviceBytes, src: DeviceBytes) -> None:
        copy_bytes(dst, src, self.stream)

    def reduce(self, inputs: list[DeviceBytes], out: DeviceBytes, dtype: str, op: str) -> None:
        _C.comm_reduce_cuda([i.ptr for i in inputs], out.ptr, out.nbytes // self._elem_sizes[dtype], dtype, op,
                            self.stream)


class DeviceScratch:
    """A reusable device buffer that grows (in powers of two) to the largest size asked for. A CUDA
    graph may have captured an old buffer's address, so after a capture old buffers live until close()."""

    def __init__(self, device: int):
        self.device = device
        self._ptr, self._nbytes = 0, 0
        self._retired: list[int] = []
        self.keep_retired = False

    def get(self, nbytes: int) -> DeviceBytes:
        if self._nbytes < nbytes:
            size = 1 << max(12, (nbytes - 1).bit_length())
            new = _C.cuda_malloc(self.device, size)
            if self._ptr:
                if self.keep_retired:
                    self._retired.append(self._ptr)
                else:
                    _C.cuda_free(self._ptr)  # waits for the device: no queued work still uses it
            self._ptr, self._nbytes = new, size
        return DeviceBytes(self._ptr, nbytes, self.device)

    def close(self) -> None:
        for ptr in self._retired + ([self._ptr] if self._ptr else []):
            _C.cuda_free(ptr)
        self._ptr, self._nbytes, self._retired = 0, 0, []


class PinnedBuffer:
    """A growing host byte buffer page-locked for the GPU when the system allows (asynchronous DMA);
    a link's staging area between GPU memory and a transport that only reads host memory."""

    def __init__(self):
        self._buf = np.empty(0, np.uint8)
        self._registered = False

    def get(self, nbytes: int) -> np.ndarray:
        if self._buf.size < nbytes:
            self.close()
            self._buf = np.empty(1 << max(12, (nbytes - 1).bit_length()), np.uint8)
            self._registered = _C.cuda_host_register(self._buf.ctypes.data, self._buf.size)
        return self._buf[:nbytes]

    def close(self) -> None:
        if self._registered:
            _C.cuda_host_unregister(self._buf.ctypes.data)
            self._registered = False
        self._buf = np.empty(0, np.uint8)
