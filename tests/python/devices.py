"""The two executors of the device tests: a real GPU through torch CUDA tensors ("cuda"), and the
SIMT harness, which runs the same CUDA kernels on the CPU ("simt"). A test takes the `dev` fixture
and runs once per executor: `dev.kv` is the kvcore build under test, `dev.put` moves host arrays
to its device, `dev.host` brings results back; the CPU reference is always plain `kvcore`."""

from __future__ import annotations

import numpy as np


class CudaDevice:
    name = "cuda"

    def __init__(self):
        import torch

        import kvcore

        self.torch = torch
        self.kv = kvcore

    def put(self, x):
        if isinstance(x, np.ndarray):
            x = self.torch.from_numpy(np.ascontiguousarray(x))
        return x.cuda()

    def full(self, shape, value, dtype):
        return self.torch.full(tuple(shape), value, dtype=dtype, device="cuda")

    def nan_like(self, x):
        return self.full(x.shape, float("nan"), x.dtype)

    def host(self, x):
        return x.detach().cpu()

    def pinned(self, x):
        return x.clone().pin_memory()

    def sync(self):
        self.torch.cuda.synchronize()

    def finish(self):
        self.sync()


class SimtDevice:
    name = "simt"

    def __init__(self):
        import torch

        import simt_device

        self.torch = torch
        self._sd = simt_device
        self.kv = simt_device.build()
        self.control = simt_device.control()
        self.control.take_kernel_errors()

    def put(self, x):
        return self._sd.to_device(x)

    def full(self, shape, value, dtype):
        return self._sd.to_device(self.torch.full(tuple(shape), value, dtype=dtype))

    def nan_like(self, x):
        return self.full(x.shape, float("nan"), x.dtype)

    def host(self, x):
        return x.host.clone() if isinstance(x, self._sd.DeviceTensor) else x

    def pinned(self, x):
        return self._sd.pinned(x)

    def sync(self):
        pass  # the emulated device runs work at submission

    def finish(self):
        """Every kernel error the harness found fails the test, surfaced by the op or not."""
        errors = self.control.take_kernel_errors()
        assert not errors, "the SIMT harness reported kernel errors:\n" + "\n".join(errors)


def on_device(dev, args: dict) -> dict:
    """Keyword arguments with every host array (numpy or torch) moved to dev; the rest unchanged."""
    return {k: (dev.put(v) if isinstance(v, (np.ndarray, dev.torch.Tensor)) else v) for k, v in args.items()}


def make(name: str):
    return CudaDevice() if name == "cuda" else SimtDevice()
