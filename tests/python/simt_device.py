"""The SIMT harness from the tests' side: builds kvcore_simt (tests/simt: kvcore with its CUDA
kernels executed on the CPU) once per session, and device arrays of its emulated GPU: host torch
tensors registered as device memory whose DLPack export says cuda:0."""

from __future__ import annotations

import ctypes
import importlib
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("KVCORE_SIMT_BUILD", ROOT / "build" / "simt"))  # override: a private build
STAGE = BUILD / "stage"
KDL_CUDA = 2

_module = None


def _missing_tools() -> str:
    missing = [t for t in ("cmake", "ninja", "g++", "addr2line") if not shutil.which(t)]
    try:
        import nanobind  # noqa: F401
    except ImportError:
        missing.append("nanobind (pip)")
    return ", ".join(missing)


def build():
    """Configures and builds the harness (incremental), stages the package, imports it."""
    global _module
    if _module is not None:
        return _module
    missing = _missing_tools()
    if missing:
        raise RuntimeError(f"the SIMT harness needs: {missing}")
    out = BUILD / "modules"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(BUILD), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
        "-DKVCORE_CUDA=OFF", "-DKVCORE_BUILD_PYTHON=OFF", "-DKVCORE_BUILD_SIMT=ON",
        f"-DKVCORE_SIMT_OUTPUT_DIR={out}", f"-DPython_EXECUTABLE={sys.executable}",
    ]
    done = subprocess.run(configure, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError("configuring the SIMT harness failed:\n" + done.stdout[-3000:] + done.stderr[-3000:])
    done = subprocess.run(["cmake", "--build", str(BUILD), "--target", "simt_C", "simt_control", "simt_nccl", "-j",
                           str(os.cpu_count() or 2)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError("building the SIMT harness failed:\n" + done.stdout[-6000:] + done.stderr[-3000:])
    # The pure-Python package next to the harness's modules, as kvcore_simt.
    pkg = STAGE / "kvcore_simt"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for entry in (ROOT / "python" / "kvcore").iterdir():
        if entry.name != "__pycache__" and not entry.name.startswith("_C"):
            (pkg / entry.name).symlink_to(entry)
    for so in out.iterdir():
        (pkg / so.name).symlink_to(so)
    sys.path.insert(0, str(STAGE))
    _module = importlib.import_module("kvcore_simt")
    return _module


def control():
    return importlib.import_module("kvcore_simt._simt")


def load_in_process_nccl() -> None:
    """Makes the harness's in-process NCCL (tests/simt/nccl, built by build()) the process's
    libnccl.so.2: kvcore's dlopen of that name then finds it loaded. Call before kvcore_simt first
    looks for NCCL, in a process of its own (a real kvcore in the same process would find it too)."""
    ctypes.CDLL(str(BUILD / "modules" / "nccl" / "libnccl.so.2"), mode=ctypes.RTLD_GLOBAL)


# --- device arrays -------------------------------------------------------------------------------

_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype = ctypes.c_char_p
_get_name.argtypes = [ctypes.py_object]
_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _as_cuda_capsule(capsule):
    """Rewrites the device of a DLPack capsule to cuda:0 (the memory is the emulated GPU's)."""
    name = _get_name(capsule)
    ptr = _get_pointer(capsule, name)
    # DLManagedTensorVersioned: version (8 bytes), manager_ctx, deleter, flags, then the DLTensor;
    # DLManagedTensor starts with the DLTensor. A DLTensor's device follows its data pointer.
    tensor = ptr + (32 if name == b"dltensor_versioned" else 0)
    ctypes.c_int32.from_address(tensor + 8).value = KDL_CUDA
    ctypes.c_int32.from_address(tensor + 12).value = 0
    return capsule


class DeviceTensor:
    """A tensor on the emulated GPU: a host torch tensor (the memory) that exports as cuda:0.
    Indexing and view-like methods give device tensors over the same memory."""

    def __init__(self, host, base=None):
        self.host = host
        self._base = base if base is not None else self  # keeps the registration alive

    # DLPack producer: the host tensor's capsule with the device rewritten.
    def __dlpack__(self, *args, **kwargs):
        kwargs.pop("stream", None)
        kwargs.pop("dl_device", None)
        kwargs.pop("copy", None)
        return _as_cuda_capsule(self.host.__dlpack__(*args, **kwargs))

    def __dlpack_device__(self):
        return (KDL_CUDA, 0)

    def __getitem__(self, index):
        return DeviceTensor(self.host[index], self._base)

    def __setitem__(self, index, value):
        self.host[index] = value.host if isinstance(value, DeviceTensor) else value

    def view(self, *args):
        return DeviceTensor(self.host.view(*args), self._base)

    def reshape(self, *args):
        v = self.host.reshape(*args)
        assert v.data_ptr() == self.host.data_ptr(), "reshape of a device tensor must be a view"
        return DeviceTensor(v, self._base)

    def __getattr__(self, name):  # shape, dtype, stride(), numel(), element_size(), ndim, ...
        return getattr(self.host, name)

    @property
    def is_cuda(self) -> bool:
        return True

    def cpu(self):
        return self.host.clone()

    def clone(self) -> "DeviceTensor":
        return to_device(self.host)

    def __repr__(self) -> str:
        return f"DeviceTensor(shape={tuple(self.host.shape)}, dtype={self.host.dtype})"


def _register(t, kind: str):
    storage = t.untyped_storage()
    ptr, nbytes = storage.data_ptr(), storage.nbytes()
    ctl = control()
    ctl.register_memory(ptr, max(nbytes, 1), kind)
    weakref.finalize(t, ctl.unregister_memory, ptr)


RED_ZONE = 256  # bytes on each side of a device array that kernels must not touch


def to_device(host) -> DeviceTensor:
    """A device copy of a host torch tensor or numpy array (same shape and strides as a fresh
    contiguous tensor), between two red zones: a kernel touching them is reported."""
    import numpy as np
    import torch

    if isinstance(host, np.ndarray):
        host = torch.from_numpy(np.ascontiguousarray(host))
    host = host.detach()
    nbytes = host.numel() * host.element_size()
    buf = torch.empty(nbytes + 2 * RED_ZONE, dtype=torch.uint8)
    t = buf[RED_ZONE:RED_ZONE + nbytes].view(host.dtype).view(host.shape)
    t.copy_(host)
    dev = DeviceTensor(t)
    _register(t, "device")
    ctl, start = control(), buf.data_ptr()
    ctl.add_red_zone(start, RED_ZONE)
    ctl.add_red_zone(start + RED_ZONE + nbytes, RED_ZONE)
    weakref.finalize(t, ctl.remove_red_zone, start)
    weakref.finalize(t, ctl.remove_red_zone, start + RED_ZONE + nbytes)
    return dev


def pinned(host):
    """A host torch tensor copy registered as pinned (page-locked) memory of the emulated GPU."""
    t = host.detach().clone().contiguous()
    _register(t, "pinned")
    return t
