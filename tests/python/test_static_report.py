"""The static kernel report (kvcore.bench.kernels_static) on small kernels compiled here, whose
loops and loads are known from their source: the parsed numbers are checked against facts derived
independently (ptxas -v, the load widths written in the source, a backward branch found by a
plain regex). Needs nvcc and cuobjdump (skipped otherwise); no GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from kvcore.bench import kernels_static as ks
except ImportError:  # the report itself needs no extension module: take it from the source tree
    _path = Path(__file__).resolve().parents[2] / "python" / "kvcore" / "bench" / "kernels_static.py"
    _spec = importlib.util.spec_from_file_location("kernels_static", _path)
    ks = sys.modules["kernels_static"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(ks)

ARCHS = ("sm_80", "sm_90a")
VECTOR_LOADS = 3  # float4 loads per iteration of `three_streams`

SOURCE = r"""
extern "C" {  // unmangled names, as ptxas and cuobjdump print them
// Three 16-byte loads and four FMAs per element, one iteration per step of i (not unrolled).
__global__ void __launch_bounds__(256) three_streams(const float4* __restrict__ a, const float4* __restrict__ b,
                                                     const float4* __restrict__ c, float* out, int n) {
  float acc = 0.f;
#pragma unroll 1
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const float4 x = a[i], y = b[i], z = c[i];
    acc += x.x * y.x * z.x + x.y * y.y * z.y + x.z * y.z * z.z + x.w * y.w * z.w;
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// A run-time choice inside the loop: 16-byte loads or 4-byte loads.
__global__ void __launch_bounds__(128) wide_or_narrow(const float4* __restrict__ wide, const float* __restrict__ narrow,
                                                      bool use_wide, float* out, int n) {
  float acc = 0.f;
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (use_wide) {
      const float4 v = wide[i];
      acc += v.x * v.y + v.z * v.w;
    } else {
      acc += narrow[i] * 3.f;
    }
  }
  out[threadIdx.x] = acc;
}

// cp.async (LDGSTS on sm_80 and later): one 16-byte copy per lane and iteration.
__global__ void __launch_bounds__(128) async_copy(const float4* __restrict__ src, float* out, int n) {
  __shared__ float4 tile[128];
  float acc = 0.f;
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(&tile[threadIdx.x]));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src + i));
    asm volatile("cp.async.wait_all;\n" ::);
    acc += tile[threadIdx.x].x;
  }
  out[threadIdx.x] = acc;
}

// No loop at all.
__global__ void __launch_bounds__(64) no_loop(const float* x, float* out) { out[threadIdx.x] = x[threadIdx.x] * 2.f; }
}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    nvcc, cuobjdump = ks.find_tool("nvcc"), ks.find_tool("cuobjdump")
    if nvcc and not cuobjdump and os.environ.get("CI"):
        pytest.fail("nvcc is here but cuobjdump is not: the test extra installs nvidia-cuda-cuobjdump")
    if not nvcc or not cuobjdump:
        pytest.skip("needs nvcc and cuobjdump (CUDA toolkit, or pip install nvidia-cuda-cuobjdump)")
    tmp = tmp_path_factory.mktemp("static_report")
    src, obj = tmp / "tiny.cu", tmp / "tiny.o"
    src.write_text(SOURCE)
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    done = subprocess.run([nvcc, *ks.NVCC_FLAGS, *gencode, "-Xptxas", "-v", "-c", str(src), "-o", str(obj)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp / "tiny.ptxas.log").write_text(done.stderr)
    rows = {(r["kernel"], r["arch"]): r for r in ks.analyze_objects([obj])}
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    return dict(rows=rows, ptxas=done.stderr, sass=sass, obj=obj, dir=tmp)


def _function_sass(sass: str, kernel: str, arch: str) -> str:
    section = sass.split(f"code for {arch}")[1].split("code for ")[0]
    return next(f for f in re.split(r"\n\s*Function : ", section) if f.startswith(kernel))


@pytest.mark.parametrize("arch", ARCHS)
def test_resources_match_ptxas(compiled, arch):
    """Registers, stack and spills as ptxas -v prints them; the block size from __launch_bounds__."""
    printed = {}
    for kernel, target in re.findall(r"Compiling entry function '(\w+)' for '(\w+)'", compiled["ptxas"]):
        if target == arch:
            after = compiled["ptxas"].split(f"Compiling entry function '{kernel}' for '{arch}'")[1]
            printed[kernel] = int(re.search(r"Used (\d+) registers", after).group(1))
    assert set(printed) == {"three_streams", "wide_or_narrow", "async_copy", "no_loop"}
    for kernel, registers in printed.items():
        row = compiled["rows"][(kernel, arch)]
        assert row["registers"] == registers
        assert (row["spill_stores"], row["spill_loads"], row["stack"]) == (0, 0, 0)
    assert compiled["rows"][("three_streams", arch)]["block_threads"] == 256
    assert compiled["rows"][("no_loop", arch)]["block_threads"] == 64
    assert compiled["rows"][("async_copy", arch)]["static_smem"] == 128 * 16


@pytest.mark.parametrize("arch", ARCHS)
def test_loop_of_vector_loads(compiled, arch):
    """One loop, three LDG.E.128 per iteration = 3 x 16 B x 32 lanes; its instructions are those
    between the target of the only backward branch and that branch."""
    row = compiled["rows"][("three_streams", arch)]
    selected = [l for l in row["loops"] if l["selected"]]
    assert len(selected) == 1
    assert row["loop_bytes"] == VECTOR_LOADS * 16 * 32
    assert all(".128" in op and op.startswith("LDG") for op in selected[0]["loads"])

    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?P\d\s+)?([A-Z][A-Z0-9_.]*)([^;]*);",
                       _function_sass(compiled["sass"], "three_streams", arch))
    backward = [(int(a, 16), int(t, 16)) for a, op, rest in lines if op == "BRA"
                for t in re.findall(r"0x([0-9a-f]+)\s*$", rest) if int(t, 16) <= int(a, 16)]
    backward = [(a, t) for a, t in backward if a != t]  # the self-branch after the final EXIT
    assert len(backward) == 1
    end, start = backward[0]
    body = [op for a, op, _ in lines if start <= int(a, 16) <= end and op != "NOP"]
    assert row["loop_instructions"] == len(body)
    assert body.count("LDG.E.128.CONSTANT") + body.count("LDG.E.128") == VECTOR_LOADS
    assert row["instructions_per_byte"] == pytest.approx(len(body) / (VECTOR_LOADS * 512), abs=1e-4)
    fmas = sum(1 for op in body if op.split(".")[0] in ("FFMA", "FMUL", "FADD"))
    assert row["loop_mix"]["fp"] == pytest.approx(fmas / len(body), abs=1e-3)
    assert row["loop_mix"]["global_load"] == pytest.approx(VECTOR_LOADS / len(body), abs=1e-3)
    assert not any(row["features"].values())  # no ldmatrix, mma, cp.async, TMA


@pytest.mark.parametrize("arch", ARCHS)
def test_run_time_branch_follows_the_widest_loads(compiled, arch):
    """Whether the compiler keeps one loop with both paths or splits it in two, the reported
    iteration is the 16-byte path: 512 B per warp."""
    row = compiled["rows"][("wide_or_narrow", arch)]
    assert row["loop_bytes"] == 16 * 32
    assert all(".128" in op for l in row["loops"] if l["selected"] for op in l["loads"])


@pytest.mark.parametrize("arch", ARCHS)
def test_cp_async_is_seen_and_counted(compiled, arch):
    row = compiled["rows"][("async_copy", arch)]
    assert row["features"]["cp.async"]
    assert row["loop_bytes"] == 16 * 32


@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_without_loop_and_full_occupancy(compiled, arch):
    row = compiled["rows"][("no_loop", arch)]
    assert row["loops"] == [] and row.get("instructions_per_byte") is None
    # Few registers, no shared memory, 64-thread CTAs: 32 CTAs x 2 warps (CTA and thread slots both full).
    assert row["registers"] <= 32
    assert (row["ctas_per_sm"], row["warps_per_sm"]) == (32, 64)
    # 256 threads and <= 32 registers: 8 CTAs fill the 2048 thread slots, 64 warps.
    streams = compiled["rows"][("three_streams", arch)]
    if streams["registers"] <= 32:
        assert (streams["ctas_per_sm"], streams["warps_per_sm"]) == (8, 64)


def test_cli_json_and_compare(compiled, capsys):
    out = compiled["dir"] / "report.json"
    assert ks.main(["--static", "--objects", str(compiled["obj"]), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {r["kernel"] for r in report["rows"]} == {"three_streams", "wide_or_narrow", "async_copy", "no_loop"}
    capsys.readouterr()
    assert ks.main(["--static", "--objects", str(compiled["obj"]), "--compare", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "after / before" in printed and "x1.00" in printed


def test_short_names_are_stable_across_builds():
    name = ("kvcore::(anonymous namespace)::prefill_tc_kernel<128, __nv_bfloat16>(kvcore::AttentionArgs, int, "
            "int const*, kvcore::tc::TcPartials, kvcore::DeviceErrorReport*)")
    assert ks.short_name(name) == "prefill_tc_kernel<128, __nv_bfloat16>"
    assert ks.short_name("kvcore::comm::(anonymous namespace)::reduce_kernel<kvcore::comm::(anonymous "
                         "namespace)::Bf16Codec, false, 4>(X)") == "reduce_kernel<Bf16Codec, false, 4>"
    assert ks.short_name("merge_states_kernel") == "merge_states_kernel"
