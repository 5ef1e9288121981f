"""Array helpers for tests: raw bits of numpy/torch arrays, random data in any dtype."""

from __future__ import annotations

import numpy as np

POISON = -777.0  # written into outputs before a kernel runs; never produced by the inputs


def bits(x) -> np.ndarray:
    """The raw bits of a numpy or torch array (on any device) as an unsigned numpy array."""
    if not isinstance(x, np.ndarray):
        import torch

        t = x.detach().cpu().contiguous()
        x = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


def random_array(rng: np.random.Generator, shape, dtype: str, framework: str = "numpy"):
    """Standard-normal data (never zeros) in dtype; bfloat16 needs framework='torch'."""
    data = rng.standard_normal(shape).astype(np.float32) + 0.25
    if framework == "numpy":
        return data.astype(dtype)
    import torch

    return torch.from_numpy(data).to(getattr(torch, dtype))


def poisoned(shape, dtype: str, framework: str = "numpy"):
    if framework == "numpy":
        return np.full(shape, POISON, dtype)
    import torch

    return torch.full(shape, POISON, dtype=getattr(torch, dtype))


def to_numpy_f32(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float32)
    return x.detach().cpu().float().numpy()
