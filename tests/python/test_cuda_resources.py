"""Static resource checks of every CUDA kernel, read from ptxas (nvcc -Xptxas -v) for each
architecture kvcore builds machine code for; no GPU needed. A kernel's stack frame is local memory
that the driver reserves for every thread the GPU can hold at once (2048 per SM): 1 KiB per thread
is ~280 MB on a 132-SM H200, so a per-thread array sized for a head dim attention never accepts is a
bug, not a tuning detail. Spills mean registers ran out in an inner loop."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "cuda").rglob("*.cu"))
ARCHS = ["sm_80", "sm_90a"]  # the machine code of the default build (CMakeLists.txt)
MAX_STACK_BYTES = 1024  # a float row of the largest head dim attention accepts (256)

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _nvcc() -> str:
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if not nvcc:
        if os.environ.get("CI"):
            pytest.fail("nvcc not found: CI must compile-check the CUDA kernels")
        pytest.skip("nvcc not found")
    return nvcc


def _demangle(names: list[str]) -> list[str]:
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return done.stdout.split("\n")[: len(names)] if done.returncode == 0 else names


def ptxas_report(nvcc: str, source: Path, arch: str, tmp: Path) -> dict[str, tuple[int, int, int]]:
    """{kernel: (stack frame, spill stores, spill loads) in bytes} of one translation unit."""
    cmd = [nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-arch={arch}", "-Xptxas", "-v",
           "-I", str(ROOT / "csrc"), "-c", str(source), "-o", str(tmp / f"{source.stem}.{arch}.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{source.name} for {arch} does not compile:\n{done.stderr[-3000:]}"
    kernels, current = {}, None
    for line in done.stderr.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
        elif (m := _FRAME.search(line)) and current is not None:
            kernels[current] = tuple(int(g) for g in m.groups())
            current = None
    assert kernels, f"ptxas reported no kernels for {source.name}:\n{done.stderr[-2000:]}"
    return dict(zip(_demangle(list(kernels)), kernels.values()))


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[tuple[str, str], dict]:
    nvcc = _nvcc()
    tmp = tmp_path_factory.mktemp("ptxas")
    jobs = [(s, a) for s in SOURCES for a in ARCHS]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda job: ptxas_report(nvcc, *job, tmp), jobs))
    return {(s.name, a): r for (s, a), r in zip(jobs, results)}


@pytest.mark.parametrize("arch", ARCHS)
def test_no_kernel_reserves_more_than_a_head_row_of_local_memory(reports, arch):
    too_big = {f"{src}: {k}": frame for (src, a), ks in reports.items() if a == arch
               for k, (frame, _, _) in ks.items() if frame > MAX_STACK_BYTES}
    assert not too_big, f"stack frames over {MAX_STACK_BYTES} B per thread on {arch}: {too_big}"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_kernel_spills_registers(reports, arch):
    spills = {f"{src}: {k}": (st, ld) for (src, a), ks in reports.items() if a == arch
              for k, (_, st, ld) in ks.items() if st or ld}
    assert not spills, f"register spills (store, load bytes) on {arch}: {spills}"


def test_every_kernel_family_is_checked(reports):
    """The report covers each source (attention, comm, memory, quant), so a new .cu is not missed."""
    assert {s.parent.name for s in SOURCES} >= {"attention", "comm", "memory", "quant"}
    assert all(reports[(s.name, a)] for s in SOURCES for a in ARCHS)
