"""Framework-neutral helpers: dtype names and output allocation in the caller's framework."""

from __future__ import annotations

from typing import Any, Sequence


def dtype_name(dtype: Any) -> str:
    """'bfloat16', numpy dtypes/types and torch dtypes all map to kvcore's dtype names."""
    if isinstance(dtype, str):
        return dtype[6:] if dtype.startswith("torch.") else dtype
    name = getattr(dtype, "name", None)  # numpy dtype
    if name is None and isinstance(dtype, type):
        name = getattr(dtype, "__name__", None)  # numpy scalar type such as np.float16
    if name is None:
        name = str(dtype)  # torch.bfloat16 -> "torch.bfloat16"
    return name[6:] if name.startswith("torch.") else name


def is_array(x: Any) -> bool:
    """Whether kvcore can take x as an array (DLPack, the numpy interface or a buffer)."""
    return hasattr(x, "__dlpack__") or hasattr(x, "__array_interface__") or isinstance(x, memoryview)


def not_an_array(x: Any, name: str) -> str:
    """The message for an argument `name` that should have been an array."""
    return (f"{name}: expected an array (numpy, torch, JAX, CuPy: anything with __dlpack__), "
            f"got {type(x).__name__}")


def require_array(x: Any, name: str) -> None:
    """TypeError naming `name` unless x is an array kvcore can take."""
    if not is_array(x):
        raise TypeError(not_an_array(x, name))


def empty_like(like: Any, shape: Sequence[int], dtype: str, what: str = "out"):
    """An uninitialized array of `shape` and kvcore dtype `dtype` in like's framework, on its device."""
    module = type(like).__module__.split(".")[0]
    if module == "torch":
        import torch

        return torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=like.device)
    if module == "cupy":
        import cupy

        if dtype == "bfloat16":
            raise TypeError(f"{what}: CuPy has no bfloat16; pass {what}= explicitly")
        with cupy.cuda.Device(like.device.id):
            return cupy.empty(tuple(shape), dtype=dtype)
    if module == "numpy":
        import numpy as np

        if dtype == "bfloat16":
            raise TypeError(f"{what}: numpy has no bfloat16; pass {what}= explicitly")
        return np.empty(tuple(shape), dtype=dtype)
    raise TypeError(f"{what}: cannot allocate an output next to a {type(like).__name__}; pass {what}= explicitly")
