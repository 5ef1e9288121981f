"""Import behaviour, build facts, CUDA status and stream resolution."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types

import pytest

import kvcore
from kvcore._streams import resolve_stream


def test_import_does_not_import_torch():
    code = "import sys, kvcore; kvcore.cuda_status(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_info():
    info = kvcore.build_info()
    assert info["version"] == kvcore.__version__ and info["version"].count(".") == 2
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        archs = info["cuda_architectures"].split(",")
        assert archs and all(a[0].isdigit() for a in archs)
        assert info["cuda_version"][0].isdigit()
    else:
        assert info["cuda_architectures"] == "" and info["cuda_version"] == ""


@pytest.mark.skipif(not shutil.which("nvcc"), reason="only a machine with nvcc builds the CUDA sources")
def test_cuda_sources_compiled_when_nvcc_present():
    info = kvcore.build_info()
    assert info["cuda_compiled"], "nvcc is on PATH but this kvcore build has no CUDA code"
    assert "90a" in info["cuda_architectures"] and "80" in info["cuda_architectures"]


def test_cuda_status_never_raises_and_explains():
    available, reason = kvcore.cuda_status()
    assert isinstance(available, bool) and isinstance(reason, str) and reason
    if not available:
        assert any(w in reason for w in ("driver", "device", "without CUDA"))


def test_extension_links_neither_libcuda_nor_libtorch():
    if not shutil.which("readelf"):
        pytest.skip("readelf (binutils) is not installed")
    out = subprocess.run(["readelf", "-d", kvcore._C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line for line in out.splitlines() if "NEEDED" in line]
    assert needed, "readelf listed no NEEDED entries"
    for lib in ("libcuda", "libcudart", "libtorch", "libc10", "libpython"):
        assert not any(lib in line for line in needed), f"the extension links {lib}: {needed}"


def test_typed_stubs_are_installed():
    pkg = os.path.dirname(kvcore.__file__)
    assert os.path.exists(os.path.join(pkg, "py.typed"))
    stub = open(os.path.join(pkg, "_C.pyi")).read()
    for name in ("def append_kv", "def copy_pages", "def cuda_status", "def build_info"):
        assert name in stub


def test_kvcore_error_is_a_runtime_error():
    assert issubclass(kvcore.KVCoreError, RuntimeError)


@pytest.mark.skipif(kvcore.cuda_status()[0], reason="checks the CPU-only failure path")
def test_cuda_only_entry_points_fail_clearly_without_cuda():
    from kvcore import _C

    with pytest.raises(kvcore.KVCoreError, match="CUDA is not available"):
        _C._require_cuda("test")


def test_debug_checks_toggle():
    before = kvcore.debug_checks()
    try:
        kvcore.set_debug_checks(not before)
        assert kvcore.debug_checks() is (not before)
    finally:
        kvcore.set_debug_checks(before)


def test_num_threads():
    before = kvcore.num_threads()
    try:
        kvcore.set_num_threads(1)
        assert kvcore.num_threads() == 1
        kvcore.set_num_threads(3)
        assert kvcore.num_threads() == 3
    finally:
        kvcore.set_num_threads(0)
    assert kvcore.num_threads() == before


def test_resolve_stream():
    assert resolve_stream(None, (object(),)) == 0
    assert resolve_stream(7, ()) == 7
    assert resolve_stream(types.SimpleNamespace(cuda_stream=11), ()) == 11
    assert resolve_stream(types.SimpleNamespace(ptr=13), ()) == 13
    for bad in (-1, True, 1.5, "s"):
        with pytest.raises(TypeError, match="stream"):
            resolve_stream(bad, ())


def test_resolve_stream_torch_cpu_tensor_uses_default():
    torch = pytest.importorskip("torch")
    assert resolve_stream(None, (torch.zeros(1),)) == 0
