"""Argument errors at the Python boundary: a value that is not an array, a read-only output and a
JAX array as an output each raise a TypeError naming the argument (never nanobind's signature dump),
and nothing is written."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import kvcore
from arrays import random_array

ARRAY_MESSAGE = r"expected an array \(numpy, torch, JAX, CuPy: anything with __dlpack__\), got list"


class FakeJaxArray:
    """A CPU array that reports itself as JAX's (its type's module), exporting DLPack like jax.Array."""

    __module__ = "jaxlib._jax"

    def __init__(self, data: np.ndarray):
        self._data = data
        self.shape, self.dtype = data.shape, data.dtype

    def __dlpack__(self, *args, **kwargs):
        return self._data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._data.__dlpack_device__()


def _append_args(rng):
    k = random_array(rng, (5, 2, 16), "float32")
    return dict(k=k, v=k + 1, k_cache=np.full((3, 4, 2, 16), -7.0, np.float32),
                v_cache=np.full((3, 4, 2, 16), -7.0, np.float32), slot_mapping=np.array([0, 5, 2, 11, 7]))


def _decode_args(rng):
    cache = random_array(rng, (4, 8, 2, 64), "float16")
    return dict(q=random_array(rng, (2, 4, 64), "float16"), k_cache=cache, v_cache=cache + 0.5,
                block_table=np.array([[0, 1], [2, 3]], np.int32), seq_lens=np.array([9, 16], np.int32))


@pytest.mark.parametrize("name", ["k", "v", "k_cache", "v_cache", "slot_mapping"])
def test_append_kv_names_the_argument_that_is_a_list(rng, name):
    args = _append_args(rng)
    before = args["k_cache"].copy()
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=rf"{name}: {ARRAY_MESSAGE}"):
        kvcore.append_kv(**args)
    if name != "k_cache":
        assert np.array_equal(args["k_cache"], before)


@pytest.mark.parametrize("name", ["q", "k_cache", "v_cache", "block_table", "seq_lens"])
def test_paged_decode_names_the_argument_that_is_a_list(rng, name):
    args = _decode_args(rng)
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=rf"{name}: {ARRAY_MESSAGE}"):
        kvcore.paged_decode(**args)


def test_every_op_names_a_list_argument():
    """Each public op given lists for all its arrays raises a TypeError naming the first one."""
    for name in kvcore.__all__:
        fn = getattr(kvcore, name)
        if not inspect.isfunction(fn) or name in ("int4_cache_shapes", "random_signs"):
            continue
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
        if not params:
            continue
        with pytest.raises(TypeError, match=rf"{params[0].name}: {ARRAY_MESSAGE}"):
            fn(*[[1.0, 2.0] for _ in params])


def test_read_only_output_is_named(rng):
    args = _append_args(rng)
    args["v_cache"].setflags(write=False)
    with pytest.raises(TypeError, match="v_cache: the array is read-only, but kvcore writes its result there"):
        kvcore.append_kv(**args)


def test_jax_arrays_are_refused_as_outputs(rng):
    """JAX buffers are immutable: writing a cache in place would change it and all its aliases."""
    args = _append_args(rng)
    cache = args["k_cache"].copy()
    args["k_cache"] = FakeJaxArray(cache)
    with pytest.raises(TypeError, match="k_cache: JAX arrays are immutable and cannot be written in place"):
        kvcore.append_kv(**args)
    assert (cache == -7.0).all()
    dec = _decode_args(rng)
    out = np.full((2, 4, 64), np.nan, np.float16)
    with pytest.raises(TypeError, match="out: JAX arrays are immutable"):
        kvcore.paged_decode(**dec, out=FakeJaxArray(out))
    assert np.isnan(out).all()
    # As inputs JAX arrays are fine (read through DLPack).
    dec["k_cache"] = FakeJaxArray(dec["k_cache"])
    got = kvcore.paged_decode(**dec)
    assert got.shape == (2, 4, 64) and np.isfinite(got).all()


def test_wrong_scalar_type_is_named(rng):
    with pytest.raises(TypeError, match="stream"):
        kvcore.append_kv(**_append_args(rng), stream="default")
