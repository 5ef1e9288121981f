"""The extension module as the Python API calls it: nanobind's "incompatible function arguments"
(a dump of signatures) becomes a TypeError that names the argument and says what it got, and JAX
arrays are refused as outputs (their buffers are immutable: writing one in place would change
every alias of it behind JAX's back)."""

from __future__ import annotations

import re
from typing import Any, Callable

from . import _C as _extension
from ._arrays import is_array, not_an_array

_SIGNATURE = re.compile(r"def \w+\((.*)\)\s*->")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


class _Param:
    def __init__(self, spec: str):
        name, _, rest = spec.partition(":")
        annotation = rest.split(" = ")[0].strip()
        self.name = name.strip()
        self.array = annotation.startswith("ndarray")
        self.optional = annotation.endswith("| None") or " = None" in spec
        self.output = self.array and "writable=False" not in annotation
        self.annotation = annotation


def _params(fn) -> list[_Param] | None:
    signatures = getattr(fn, "__nb_signature__", None)
    if not signatures or len(signatures) != 1:  # overloads: leave nanobind's message
        return None
    m = _SIGNATURE.search(signatures[0][0])
    return [_Param(p) for p in _split_top_level(m.group(1))] if m else None


def _is_jax(x: Any) -> bool:
    return type(x).__module__.split(".")[0] in ("jax", "jaxlib")


def _why(p: _Param, value: Any) -> str | None:
    """What is wrong with `value` for parameter p, or None when it looks acceptable."""
    got = type(value).__name__
    if value is None:
        return None if p.optional else f"{p.name}: expected an array, got None" if p.array else None
    if p.array:
        if not is_array(value):
            return not_an_array(value, p.name)
        flags = getattr(value, "flags", None)
        if p.output and flags is not None and not getattr(flags, "writeable", True):
            return f"{p.name}: the array is read-only, but kvcore writes its result there"
        return None
    expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(p.annotation.split(" ")[0])
    if expected is not None and not isinstance(value, expected):
        return f"{p.name}: expected {p.annotation.split(' ')[0]}, got {got}"
    return None


def _checked(fn, name: str) -> Callable:
    params = _params(fn)
    if params is None:
        return fn
    outputs = [(i, p.name) for i, p in enumerate(params) if p.output]

    def call(*args, **kwargs):
        for i, pname in outputs:
            value = args[i] if i < len(args) else kwargs.get(pname)
            if value is not None and _is_jax(value):
                raise TypeError(f"{pname}: JAX arrays are immutable and cannot be written in place; pass a "
                                f"numpy/torch/CuPy array as {pname}, or use the returned array")
        try:
            return fn(*args, **kwargs)
        except TypeError as e:
            if "incompatible function arguments" not in str(e):
                raise
            for i, p in enumerate(params):
                if i < len(args) or p.name in kwargs:
                    why = _why(p, args[i] if i < len(args) else kwargs[p.name])
                    if why:
                        raise TypeError(f"{name}: {why}") from None
            raise

    call.__name__ = call.__qualname__ = name
    call.__doc__ = fn.__doc__
    call.__wrapped__ = fn
    return call


class _Native:
    """Attribute access to the extension; its plain functions come back checked (classes and
    values unchanged)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        value = getattr(self._module, name)
        if type(value).__name__ == "nb_func":
            value = _checked(value, name)
        setattr(self, name, value)  # resolved once
        return value


C = _Native(_extension)
