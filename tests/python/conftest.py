"""Shared fixtures: fresh random generators (seed printed on failure) and the `cuda` marker."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

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
