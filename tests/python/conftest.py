"""Shared fixtures: fresh random generators (seed printed on failure), the `cuda` marker, and `dev`:
the device tests' executor, once on a real GPU (marked cuda) and once on the SIMT harness (simt)."""

from __future__ import annotations

import os
import secrets

import numpy as np
import pytest

import devices
import kvcore


def pytest_collection_modifyitems(config, items):
    available, reason = kvcore.cuda_status()
    torch_cuda = False
    if available:
        try:
            import torch

            torch_cuda = torch.cuda.is_available()
        except ImportError:
            reason = "the cuda tests allocate GPU arrays through torch, which is not installed"
    if available and not torch_cuda and "torch" not in reason:
        reason = "torch cannot see the GPU (a CPU-only torch build?)"
    if available and torch_cuda:
        return
    skip = pytest.mark.skip(reason=f"no usable CUDA: {reason}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator with a fresh seed per test; the seed is printed so a failure can be replayed."""
    seed = secrets.randbits(32)
    print(f"{request.node.nodeid}: numpy seed {seed}")
    return np.random.default_rng(seed)


def _make_device(name: str):
    if name == "cuda":
        return devices.make("cuda")
    try:
        return devices.make("simt")
    except RuntimeError as e:  # the harness cannot be built here: say why (CI has every tool)
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("simt", marks=pytest.mark.simt)])
def dev(request):
    """The device under test: a GPU through torch (cuda) or the SIMT harness (simt)."""
    d = _make_device(request.param)
    yield d
    d.finish()


@pytest.fixture
def simt_dev(request):
    """The SIMT harness alone, for what only an emulated device can do (inject driver failures,
    inspect the call trace). Tests using it are marked simt."""
    d = _make_device("simt")
    yield d
    d.finish()
