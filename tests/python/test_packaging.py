"""What a user's install carries: one version (CMakeLists.txt's, in the metadata and in
kvcore.__version__), the license, type stubs; and the CPU-only build option configures without
CUDA even where nvcc is installed."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvcore

ROOT = Path(__file__).resolve().parents[2]


def _cmake_version() -> str:
    m = re.search(r"project\(kvcore[^)]*VERSION\s+([0-9.]+)", (ROOT / "CMakeLists.txt").read_text())
    assert m, "CMakeLists.txt declares no project version"
    return m.group(1)


def _installed():
    try:
        return importlib.metadata.distribution("kvcore")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kvcore is not installed as a distribution here (a build-tree import)")


def test_one_version_everywhere():
    dist = _installed()
    assert dist.version == kvcore.__version__ == _cmake_version()
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()  # pyproject holds no second copy


def test_license_and_urls_ship():
    dist = _installed()
    files = [str(f) for f in dist.files or []]
    assert any(f.endswith("LICENSE") for f in files), files[:20]
    assert dist.metadata["License-Expression"] == "Apache-2.0"
    assert dist.metadata.get_all("Project-URL")
    assert (ROOT / "LICENSE").read_text().startswith(" " * 30 + "Apache License")


def test_type_stubs_ship():
    pkg = Path(kvcore.__file__).parent
    assert (pkg / "py.typed").exists()
    stub = (pkg / "_C.pyi").read_text()
    for fn in ("def append_kv(", "def attention(", "def hadamard_transform("):
        assert fn in stub


def test_cpu_only_build_option_configures_without_cuda(tmp_path):
    """-DKVCORE_CUDA=OFF (pip: -Ccmake.define.KVCORE_CUDA=OFF, see README) builds no CUDA code, even
    with nvcc on the PATH; the build config the extension reports says so."""
    cmake = shutil.which("cmake")
    if not cmake:
        if os.environ.get("CI"):
            pytest.fail("cmake not found")
        pytest.skip("cmake not found")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the toolchain is not under test
    done = subprocess.run([cmake, "-S", str(ROOT), "-B", str(tmp_path), "-DKVCORE_CUDA=OFF", "-DKVCORE_BUILD_PYTHON=OFF",
                           f"-DPython_EXECUTABLE={sys.executable}"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "CUDA=OFF" in done.stdout
    cache = (tmp_path / "CMakeCache.txt").read_text()
    assert "CMAKE_CUDA_COMPILER:" not in cache or re.search(r"CMAKE_CUDA_COMPILER:\w+=\s*$", cache, re.M)
    config = (tmp_path / "csrc" / "kvcore" / "build_config.h").read_text()
    assert re.search(r"#define KVCORE_WITH_CUDA 0", config), config


def test_cuda_driver_minimum_per_runtime():
    assert kvcore._C._cuda_driver_minimum(13000) == "580.65.06"
    assert kvcore._C._cuda_driver_minimum(12080) == "525.60.13"
    assert kvcore._C._cuda_driver_minimum(11080) == ""
    info = kvcore.build_info()
    assert "cuda_driver_minimum" in info
    if info["cuda_compiled"] and info["cuda_version"].startswith("13."):
        assert info["cuda_driver_minimum"] == "580.65.06"
        ok, reason = kvcore.cuda_status()
        assert ok or "580" in reason or "no devices" in reason or "compute capability" in reason, reason


def test_cuda_architecture_check():
    archs = "80-real,90a-real,90-virtual"  # the default build
    ok = kvcore._C._cuda_arch_mismatch
    for major, minor in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):  # SASS 8.x, 9.0a; PTX 9.0 JITs upward
        assert ok(major, minor, archs) == "", (major, minor)
    assert "compute capability 7.5 has no machine code or PTX" in ok(7, 5, archs)
    assert ok(9, 0, "90a-real") == "" and ok(10, 0, "90a-real") != ""  # "a" code runs on its own capability only
    assert ok(8, 6, "86") == "" and ok(8, 0, "86") != ""  # "86" alone: code and PTX of 8.6
    assert ok(7, 0, "simt") == ""  # no real architectures listed (the SIMT harness build): nothing to check


def test_help_of_every_array_op_shows_shapes():
    import inspect

    for name in kvcore.__all__:
        fn = getattr(kvcore, name)
        if inspect.isfunction(fn):
            doc = inspect.getdoc(fn) or ""
            assert re.search(r"\[[^\]]*\]", doc), f"help(kvcore.{name}) shows no shapes:\n{doc}"
