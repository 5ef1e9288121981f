"""Stream resolution for CUDA ops: an explicit handle, or the framework's current stream."""

from __future__ import annotations

import sys
from typing import Any


def resolve_stream(stream: Any, arrays: tuple) -> int:
    """The integer CUDA stream handle an op should use.

    `stream` may be an int handle, a torch.cuda.Stream or a cupy Stream. When it is None and the
    arrays are torch CUDA tensors (torch already imported) torch's current stream is used; for CuPy
    arrays CuPy's current stream; otherwise the legacy default stream (0). CPU arrays ignore it.
    """
    if stream is not None:
        if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
            return int(stream.cuda_stream)
        if hasattr(stream, "ptr"):  # cupy.cuda.Stream
            return int(stream.ptr)
        if isinstance(stream, int) and not isinstance(stream, bool) and stream >= 0:
            return stream
        raise TypeError(f"stream: expected a non-negative int handle or a stream object, got {stream!r}")
    torch = sys.modules.get("torch")
    if torch is not None:
        for a in arrays:
            if isinstance(a, torch.Tensor):
                if a.is_cuda:
                    return int(torch.cuda.current_stream(a.device).cuda_stream)
                break
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return int(cupy.cuda.get_current_stream().ptr)
    return 0
