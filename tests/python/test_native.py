"""The native side of the test command: builds the C++ core with ASan + UBSan (CPU-only, with the
GoogleTest suite, the google-benchmark binaries and a sanitized extension), then runs the GoogleTest
suite, a short benchmark run, and the CPU pytest suite against the sanitized extension."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.native

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "native-asan"
STAGE = BUILD / "stage"


def _gcc_runtime(name: str) -> str:
    path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else ""


def _missing_tools() -> str:
    missing = [t for t in ("cmake", "ninja", "g++") if not shutil.which(t)]
    if missing:
        return f"missing build tools: {', '.join(missing)}"
    for header, pkg in (("/usr/include/gtest/gtest.h", "libgtest-dev"),
                        ("/usr/include/benchmark/benchmark.h", "libbenchmark-dev")):
        if not os.path.exists(header):
            return f"{pkg} is not installed"
    if not _gcc_runtime("libasan.so") or not _gcc_runtime("libubsan.so"):
        return "gcc's libasan/libubsan are not installed"
    return ""


@pytest.fixture(scope="session")
def native_build() -> Path:
    missing = _missing_tools()
    if missing:
        # CI installs everything (.ci/run); elsewhere say what is missing rather than fail obscurely.
        if os.environ.get("CI"):
            pytest.fail(f"native tests cannot run on CI: {missing}")
        pytest.skip(missing)
    module_dir = STAGE / "kvcore"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(BUILD), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
        "-DKVCORE_SANITIZE=address;undefined", "-DKVCORE_BUILD_TESTS=ON", "-DKVCORE_BUILD_BENCH=ON",
        f"-DKVCORE_PYTHON_OUTPUT_DIR={module_dir}", f"-DPython_EXECUTABLE={sys.executable}",
    ]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    build = subprocess.run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 2)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-6000:] + build.stderr[-4000:]
    warnings = [line for line in build.stdout.splitlines() if "warning:" in line]
    assert not warnings, "compiler warnings:\n" + "\n".join(warnings[:20])
    # Stage the pure-Python package next to the sanitized extension.
    shutil.copytree(ROOT / "python" / "kvcore", module_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return BUILD


def _sanitizer_env() -> dict:
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join([_gcc_runtime("libasan.so"), _gcc_runtime("libubsan.so")])
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1"  # CPython leaks by design
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


def test_googletest_suite_under_sanitizers(native_build):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    result = subprocess.run(["ctest", "--test-dir", str(native_build), "--output-on-failure"],
                            capture_output=True, text=True, env=env)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "tests passed" in result.stdout


def test_benchmark_binaries_run(native_build):
    binaries = sorted((native_build / "bench").glob("kvcore_bench_*"))
    assert binaries, "no benchmark binaries were built"
    for binary in binaries:
        result = subprocess.run([str(binary), "--benchmark_min_time=0.01"], capture_output=True, text=True,
                                env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1"))
        assert result.returncode == 0, result.stderr[-4000:]
        assert "bytes_per_second" in result.stdout or "/s" in result.stdout


def test_cpu_suite_under_sanitizers(native_build):
    """The whole CPU pytest suite against the sanitized extension (native, cuda and simt tests
    excluded: the SIMT harness is a separate, unsanitized build)."""
    env = _sanitizer_env()
    env["PYTHONPATH"] = os.pathsep.join([str(STAGE), env.get("PYTHONPATH", "")])
    # The ptxas resource checks and the static SASS report run nvcc, not kvcore: nothing to sanitize,
    # and nvcc under libasan crashes.
    nvcc_only = ["test_cuda_resources.py", "test_static_report.py"]
    ignored = [arg for name in nvcc_only for arg in ("--ignore", str(ROOT / "tests" / "python" / name))]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not native and not cuda and not simt",
           "-k", "not cuda_sources_compiled", *ignored, str(ROOT / "tests" / "python")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    tail = result.stdout[-6000:] + result.stderr[-6000:]
    assert result.returncode == 0, tail
    assert str(STAGE) in subprocess.run(
        [sys.executable, "-c", "import kvcore; print(kvcore._C.__file__)"], capture_output=True, text=True,
        env=env).stdout, "the sanitized run did not import the sanitized extension"
    assert " passed" in tail and "ERROR: AddressSanitizer" not in tail and "runtime error:" not in tail
