"""Static cost report of kvcore's CUDA kernels, read from the compiled objects (no GPU needed).

`python -m kvcore.bench kernels --static [--objects DIR|FILE ...] [--json FILE] [--compare BEFORE.json]`

Without `--objects`, every `cuda/**/*.cu` of the source tree is compiled with nvcc for each `--arch`
(default sm_80 and sm_90a, the machine code of the default build) with the flags of
cmake/KvcoreCuda.cmake plus the Release ones (`-O3 -DNDEBUG`), and `-Xptxas -v` so the spill counts
come from ptxas. `--objects` takes CMake build directories, object files or the extension module
instead (spills then come from a `<object stem>.ptxas.log` beside an object when there is one).

Per kernel (a template instantiation, e.g. `paged_attention_kernel<128>`) and architecture:

- registers, stack frame, static shared memory: `cuobjdump -res-usage` (REG, STACK, SHARED; the
  shared memory as ptxas prints it when its log is there, since an sm_90 object's SHARED also
  counts the 1 KiB the runtime reserves per CTA).
  Dynamic shared memory is set at launch, so it is not in the object; the report shows it only for
  the kernels listed in `DYNAMIC_SMEM`, whose C++ expression a small host probe evaluates.
- spill stores/loads in bytes: the ptxas `-v` lines.
- theoretical occupancy: resident warps per SM, the least of what the register file, the thread
  and CTA slots and shared memory allow (`SM_LIMITS`, with the allocation granularities of the
  CUDA occupancy calculator), for the kernel's `__launch_bounds__` block size (EIATTR_MAX_THREADS in
  `cuobjdump -elf`; 128 threads assumed when the kernel has none, marked in the JSON).
- SASS: whether the kernel uses LDSM (ldmatrix), HMMA (mma.sync), HGMMA (wgmma), LDGSTS (cp.async)
  and UTMALDG/UBLKCP (TMA / cp.async.bulk) anywhere.
- the inner loop, and its instructions per KV byte, derived as follows:
  1. The SASS of the kernel is cut into basic blocks; a back edge is a branch to a block that
     dominates the branching block, and its natural loop is every block that reaches the branch
     without passing the header (so out-of-line code jumping back to a join point is no loop).
  2. The load loops are the loops holding a global load (LDG*, LDGSTS*, or a generic LD*, which may
     read global memory); the inner load loops are those with no load loop nested inside. An inner
     loop without loads nested in a load loop is counted as one iteration of it.
  3. One iteration of a load loop is one path from its header back to the header. Branches whose
     direction is only known at run time (dtype, INT4, masking, rows of the tile) make several
     paths, so the report follows the path that requests the most bytes, and among those the one
     with the most instructions: e.g. at decode, the bf16/fp16 loads rather than the INT4 ones,
     every query row of the CTA active, every online-softmax rescale taken. It is an upper bound
     of the work of an iteration that reads that many bytes.
  4. Bytes per iteration per warp = sum over the path's load instructions of (load width x 32
     lanes): LDG.E.128 = 16 B per lane = 512 B per warp, LDG.E.64 = 256 B, LDG.E (32-bit) = 128 B,
     .U16 = 64 B, .U8 = 32 B; predicated loads count as executed, every lane active, distinct
     addresses (a warp-uniform block-table load counts 128 B like any 32-bit load).
  5. The key loop is the inner load loop nested deepest, then reading the most bytes per
     iteration, then the longest; its sibling inner load loops in the same parent loop are added
     to it (e.g. the separate K and V tile copies inside prefill's key-tile loop), each weighted by
     one iteration. So one-off loops (query loads, metadata scans, the INT4 output rotation) drop
     out. Instructions per KV byte = the selected paths' instructions (NOPs excluded) / their bytes
     per iteration per warp. Every inner load loop is listed in the JSON, with its address range
     and whether it was selected.
  The instruction mix of the same paths is given per class (`CLASSES`) as a fraction.

`--compare BEFORE.json` prints after/before ratios per kernel and architecture.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARCHS = ("sm_80", "sm_90a")
# Per-SM limits, from the CUDA C++ Programming Guide's table of technical specifications per
# compute capability (8.0 and 9.0), and the allocation units of the CUDA occupancy calculator.
SM_LIMITS = {
    "sm_80": dict(regs=65536, threads=2048, ctas=32, smem=164 * 1024, max_regs_per_thread=255),
    "sm_90": dict(regs=65536, threads=2048, ctas=32, smem=228 * 1024, max_regs_per_thread=255),
}
REG_ALLOC_UNIT = 256  # registers are given to a warp in chunks of 256 (8 per thread)
SMEM_ALLOC_UNIT = 128
SMEM_RESERVED_PER_CTA = 1024  # the runtime keeps 1 KiB of shared memory per CTA (sm_80 and later)
DEFAULT_BLOCK = 128  # threads per CTA assumed when a kernel declares no __launch_bounds__

# Dynamic shared memory of the kernels that use it: a C++ expression over the head dim D, evaluated
# by a host probe that includes the header; "/int4" keys are the INT4 instantiations (see
# dynamic_smem_key). Keep in step with the launches in cuda/.
DYNAMIC_SMEM = {
    "prefill_tc_kernel": ("attention/prefill_tc.cuh", "kvcore::tc::Tile<{D}>::kBytes"),
    "prefill_tc_kernel/int4": ("attention/prefill_tc.cuh", "kvcore::tc::Tile<{D}>::kInt4Bytes"),
    "prefix_tc_kernel": ("attention/prefill_tc.cuh", "kvcore::tc::Tile<{D}>::kBytes"),
    "prefix_tc_kernel/int4": ("attention/prefill_tc.cuh", "kvcore::tc::Tile<{D}>::kInt4Bytes"),
    "paged_attention_kernel": ("attention/decode.cuh", "kvcore::decode::Tile<{D}>::kBytes"),
    "paged_attention_kernel/int4": ("attention/decode.cuh", "kvcore::decode::Tile<{D}>::kInt4Bytes"),
    "paged_attention_tc_kernel": ("attention/prefill_tc.cuh", "kvcore::tc::Tile<{D}, kvcore::tc::kSharedRows>::kBytes"),
    "paged_attention_tc_kernel/int4": ("attention/prefill_tc.cuh",
                                       "kvcore::tc::Tile<{D}, kvcore::tc::kSharedRows>::kInt4Bytes"),
}
HEAD_DIMS = (64, 80, 96, 128, 192, 256)


def dynamic_smem_key(name: str) -> str:
    """The DYNAMIC_SMEM key of a kernel instantiation: its base name, plus "/int4" for the INT4 ones
    (CUDA-core decode: cache type Int4KV; the tensor-core kernels: the third template argument `true`)."""
    base = name.split("<")[0]
    args = [a.strip() for a in name[len(base) + 1:-1].split(",")] if "<" in name else []
    tensor_core = base in ("prefill_tc_kernel", "prefix_tc_kernel", "paged_attention_tc_kernel")
    int4 = "Int4KV" in args or (tensor_core and len(args) > 2 and args[2] == "true")
    return base + "/int4" if int4 else base

# Compile flags of the build (cmake/KvcoreCuda.cmake, CMake's Release flags, C++17).
NVCC_FLAGS = ["-O3", "-DNDEBUG", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]

# Instruction classes, by opcode (the part before the first dot; the uniform-datapath U-forms
# count with their vector forms).
CLASSES = {
    "global_load": {"LDG", "LDGSTS", "LD", "UTMALDG", "UBLKCP"},
    "shared_load": {"LDS", "LDSM"},
    "other_load": {"LDL", "LDC"},
    "store": {"STG", "STS", "STL", "ST", "RED", "ATOM", "ATOMG", "ATOMS", "UTMASTG"},
    "tensor": {"HMMA", "IMMA", "BMMA", "DMMA", "HGMMA", "IGMMA", "QGMMA", "WARPGROUP"},
    "fp": {"FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSET", "FSEL", "FCHK", "MUFU", "HFMA2", "HADD2",
           "HMUL2", "HMNMX2", "HSETP2", "HSET2", "DFMA", "DADD", "DMUL", "DSETP", "FSWZADD"},
    "conversion": {"F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP", "I2I", "I2IP", "FRND"},
    "int_address": {"IMAD", "IADD3", "IADD", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP", "ISETP", "IMNMX",
                    "IABS", "POPC", "FLO", "BREV", "IMUL", "VIADD", "VIMNMX", "IDP", "PRMT", "SEL", "BMSK",
                    "SGXT", "BFE", "BFI", "IMAD.WIDE"},
    "shuffle": {"SHFL", "VOTE", "VOTEU", "REDUX", "MATCH"},
    "branch": {"BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL", "BREAK", "BSSY", "BSYNC", "WARPSYNC", "YIELD",
               "BPT", "KILL"},
    "sync": {"BAR", "DEPBAR", "MEMBAR", "ERRBAR", "CCTL", "ARRIVES", "SYNCS", "FENCE", "LDGDEPBAR"},
}
_OPCODE_CLASS = {op: cls for cls, ops in CLASSES.items() for op in ops}
FEATURES = {"LDSM": "ldmatrix", "HMMA": "mma.sync", "HGMMA": "wgmma", "LDGSTS": "cp.async",
            "UTMALDG": "TMA load", "UBLKCP": "cp.async.bulk"}
_WIDTH_SUFFIX = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16, "256": 32}
WARP = 32


# --------------------------------------------------------------------------------------------
# Tools


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, beside nvcc, under CUDA_HOME, or from NVIDIA's pip packages."""
    found = shutil.which(name)
    if found:
        return found
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    dirs = [Path(nvcc).resolve().parent] if nvcc else []
    dirs += [Path(os.environ[v]) / "bin" for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ]
    for entry in sys.path:  # nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels: nvidia/cu*/bin
        dirs += sorted(Path(entry).glob("nvidia/*/bin"))
    for d in dirs:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def demangle(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    out = done.stdout.split("\n")[: len(names)] if done.returncode == 0 else names
    return dict(zip(names, out))


def short_name(demangled: str) -> str:
    """`kvcore::(anonymous namespace)::paged_attention_kernel<128>(AttentionArgs, ...)` ->
    `paged_attention_kernel<128>`: stable across builds (the anonymous namespace hash is not)."""
    depth, cut = 0, len(demangled)
    for i, ch in enumerate(demangled):  # the argument list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not demangled.startswith("(anonymous", i):
            cut = i
            break
    head = demangled[:cut]
    depth, start = 0, 0
    for i, ch in enumerate(head):  # drop namespaces: the last '::' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif head.startswith("::", i) and depth == 0:
            start = i + 2
    return re.sub(r"(?:\w+::|\(anonymous namespace\)::)+", "", head[start:])


# --------------------------------------------------------------------------------------------
# Building the objects


def build_objects(source_root: Path, out_dir: Path, archs=ARCHS, jobs: int | None = None) -> list[Path]:
    """Compiles every cuda/**/*.cu for `archs` into out_dir/<stem>.o, with <stem>.ptxas.log."""
    nvcc = find_tool("nvcc")
    if not nvcc:
        raise RuntimeError("nvcc not found: give --objects, or put nvcc on PATH")
    sources = sorted((source_root / "cuda").rglob("*.cu"))
    if not sources:
        raise RuntimeError(f"no cuda/**/*.cu under {source_root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]

    def one(src: Path) -> Path:
        obj = out_dir / f"{src.stem}.o"
        cmd = [nvcc, *NVCC_FLAGS, *gencode, "-Xptxas", "-v", "-I", str(source_root / "csrc"), "-c", str(src),
               "-o", str(obj)]
        log = _run(cmd)
        (out_dir / f"{src.stem}.ptxas.log").write_text(log)
        return obj

    with ThreadPoolExecutor(max_workers=jobs or min(len(sources), os.cpu_count() or 2)) as pool:
        return list(pool.map(one, sources))


def find_objects(paths: list[Path]) -> list[Path]:
    """Object files under the given directories (CMake's `*.cu.o`, or ours), or the files themselves."""
    found = []
    for p in paths:
        if p.is_dir():
            cu = sorted(p.rglob("*.cu.o"))
            found += cu or sorted(p.rglob("*.o"))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(p)
    return found


# --------------------------------------------------------------------------------------------
# Parsing ptxas and cuobjdump


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[tuple[str, str], dict]:
    """{(mangled kernel, arch): {stack, spill_stores, spill_loads, registers, smem}} from `ptxas -v`."""
    result, current = {}, None
    for line in log.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = (m.group(1), m.group(2))
            result[current] = {}
        elif current and (m := _PTXAS_FRAME.search(line)):
            result[current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current and (m := _PTXAS_REGS.search(line)):
            result[current]["registers"] = int(m[1])
            smem = _PTXAS_SMEM.search(line)
            result[current]["smem"] = int(smem[1]) if smem else 0
    return result


def parse_res_usage(text: str) -> dict[tuple[str, str], dict]:
    """{(mangled kernel, arch): {registers, stack, shared, local}} from `cuobjdump -res-usage`."""
    result, arch, func = {}, None, None
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"arch = (\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"Function (\S+):$", line):
            func = m.group(1)
        elif func and line.startswith("REG:"):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            result[(func, arch)] = dict(registers=int(fields["REG"]), stack=int(fields.get("STACK", 0)),
                                        shared=int(fields.get("SHARED", 0)), local=int(fields.get("LOCAL", 0)))
            func = None
    return result


@dataclasses.dataclass
class Instr:
    addr: int
    guard: str  # predicate guard, e.g. "@P0", "" when unconditional
    opcode: str  # full opcode with modifiers, e.g. "LDG.E.128"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> dict[tuple[str, str], list[Instr]]:
    """{(mangled kernel, arch): instructions} of `cuobjdump -sass`."""
    result, arch, instrs = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"\s*code for (\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            instrs = result.setdefault((m.group(1), arch), [])
        elif instrs is not None and (m := _SASS_LINE.search(line)):
            instrs.append(Instr(int(m[1], 16), (m[2] or "").strip(), m[3], m[4].strip()))
    return result


def parse_max_threads(text: str) -> dict[tuple[str, str], int]:
    """{(mangled kernel, arch): threads} of `__launch_bounds__` (EIATTR_MAX_THREADS in the kernel's
    .nv.info section of `cuobjdump -elf`)."""
    result, arch, func, attr = {}, None, None, None
    for line in text.splitlines():
        if m := re.match(r"arch = (\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\.nv\.info\.(\S+)$", line):
            func = m.group(1)
        elif line and not line[0].isspace():
            func = None  # another section
        elif func and (m := re.match(r"\s*Attribute:\s*(\w+)", line)):
            attr = m.group(1)
        elif func and attr == "EIATTR_MAX_THREADS" and (m := re.match(r"\s*Value:\s*(.*)", line)):
            threads = 1
            for v in m.group(1).split():
                threads *= int(v, 16)
            result[(func, arch)] = threads
            attr = None
    return result


# --------------------------------------------------------------------------------------------
# Control flow and loops


def _branch_target(ins: Instr) -> int | None:
    if ins.base not in ("BRA", "CALL"):
        return None
    m = re.search(r"(0x[0-9a-f]+)\s*$", ins.operands)
    return int(m.group(1), 16) if m else None


def _is_conditional(ins: Instr) -> bool:
    # A guard other than @PT, a predicate operand (`BRA P1, target`) or `BRA.DIV` may fall through.
    return (ins.guard not in ("", "@PT")) or bool(re.match(r"!?U?P\d", ins.operands)) or ".DIV" in ins.opcode


def basic_blocks(instrs: list[Instr]) -> tuple[list[list[Instr]], dict[int, list[int]], set[tuple[int, int]]]:
    """Basic blocks in address order, their successors (by block index) and the cold edges.

    CALL is an edge to its target and falls through: ptxas leaves some loops through a predicated
    `CALL.REL.NOINC` to the exit code, and a subroutine ends in RET, so it never reaches a loop's
    latch. BRA.DIV (taken only by a diverged warp, to a slow path) is a cold edge. BRX/JMX end a
    block with unknown targets."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    starts = {0}
    for i, ins in enumerate(instrs):
        t = _branch_target(ins)
        if t in index:
            starts.add(index[t])
        if ins.base in ("BRA", "CALL", "BRX", "JMX", "JMP", "EXIT", "RET") and i + 1 < len(instrs):
            starts.add(i + 1)
    order = sorted(starts)
    blocks = [instrs[s:e] for s, e in zip(order, order[1:] + [len(instrs)])]
    block_of = {blk[0].addr: b for b, blk in enumerate(blocks)}
    succ: dict[int, list[int]] = {}
    cold: set[tuple[int, int]] = set()
    for b, blk in enumerate(blocks):
        last, nxt = blk[-1], (b + 1 if b + 1 < len(blocks) else None)
        out = []
        t = block_of.get(_branch_target(last))
        if t is not None:
            out.append(t)
            if ".DIV" in last.opcode:
                cold.add((b, t))
        falls = (last.base not in ("BRA", "BRX", "JMX", "JMP", "EXIT", "RET") or _is_conditional(last)
                 or last.base == "CALL")
        if falls and nxt is not None and nxt not in out:
            out.append(nxt)
        succ[b] = out
    return blocks, succ, cold


def dominators(succ: dict[int, list[int]], entry: int = 0) -> dict[int, set[int]]:
    """Dominator sets of the blocks reachable from entry (iterative data flow; kernels are small)."""
    reach, stack = [], [entry]
    seen = {entry}
    while stack:
        b = stack.pop()
        reach.append(b)
        for s in succ[b]:
            if s not in seen:
                seen.add(s)
                stack.append(s)
    preds = {b: [p for p in reach if b in succ[p]] for b in reach}
    dom = {b: set(reach) for b in reach}
    dom[entry] = {entry}
    changed = True
    while changed:
        changed = False
        for b in sorted(reach):
            if b == entry:
                continue
            new = set.intersection(*(dom[p] for p in preds[b])) | {b} if preds[b] else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


@dataclasses.dataclass
class Loop:
    header: int
    blocks: set[int]
    latches: set[int]  # blocks branching back to the header


def natural_loops(succ: dict[int, list[int]]) -> list[Loop]:
    """One loop per header (back edges to the same header merged)."""
    dom = dominators(succ)
    preds: dict[int, list[int]] = {b: [] for b in dom}
    for b in dom:
        for s in succ[b]:
            if s in preds:
                preds[s].append(b)
    loops: dict[int, Loop] = {}
    for b in dom:
        for h in succ[b]:
            if h in dom[b]:  # back edge b -> h
                loop = loops.setdefault(h, Loop(h, {h}, set()))
                loop.latches.add(b)
                stack = [b]
                while stack:
                    x = stack.pop()
                    if x not in loop.blocks:
                        loop.blocks.add(x)
                        stack.extend(preds[x])
    return list(loops.values())


def access_width(ins: Instr) -> int:
    """Bytes one lane moves with a memory instruction: 4 unless a size modifier says otherwise."""
    width = 4
    for part in ins.opcode.split(".")[1:]:
        width = _WIDTH_SUFFIX.get(part, width)
    return width


def load_bytes_per_lane(ins: Instr) -> int:
    """Bytes one lane reads with a global (or generic) load; 0 for any other instruction."""
    return access_width(ins) if ins.base in ("LDG", "LDGSTS", "LD") else 0


def instr_class(ins: Instr) -> str:
    op = ins.base
    if op == "NOP":
        return "nop"
    if op in _OPCODE_CLASS:
        return _OPCODE_CLASS[op]
    if op.startswith("U") and op[1:] in _OPCODE_CLASS:  # uniform datapath: UIADD3, ULDC, USHF, ...
        return _OPCODE_CLASS[op[1:]]
    return "move_other"  # MOV, S2R, CS2R, PLOP3, P2R, R2UR, ...


def heaviest_path(loop: Loop, blocks: list[list[Instr]], succ: dict[int, list[int]], cold: set[tuple[int, int]],
                  inner_headers: set[int]) -> tuple[int, int, dict[str, int], list[int]]:
    """(bytes per warp, instructions, class counts, blocks) of one iteration of `loop`: the path
    from the header to a latch with the most load bytes, then the most instructions (non-NOP).
    Edges back to the header of any loop (this one or an inner one) are cut, so an inner loop is
    walked once."""
    def cost(b: int) -> tuple[int, int]:
        blk = blocks[b]
        return (sum(load_bytes_per_lane(i) for i in blk) * WARP, sum(1 for i in blk if i.base != "NOP"))

    headers = inner_headers | {loop.header}
    memo: dict[int, tuple[int, int, list[int]]] = {}

    def best(b: int) -> tuple[int, int, list[int]]:  # best path from b to a latch, through the body
        if b in memo:
            return memo[b]
        memo[b] = (-1, -1, [])  # cycle guard (irreducible flow): no path
        here = cost(b)
        options = [(0, 0, [])] if b in loop.latches else []
        for s in succ[b]:
            if s in loop.blocks and s not in headers and (b, s) not in cold:
                options.append(best(s))
        options = [o for o in options if o[0] >= 0]
        if not options:
            memo[b] = (-1, -1, [])
        else:
            nb, ni, path = max(options, key=lambda o: (o[0], o[1]))
            memo[b] = (nb + here[0], ni + here[1], [b] + path)
        return memo[b]

    nbytes, ninstr, path = best(loop.header)
    classes: dict[str, int] = {}
    for b in path:
        for ins in blocks[b]:
            c = instr_class(ins)
            if c != "nop":
                classes[c] = classes.get(c, 0) + 1
    return nbytes, ninstr, classes, path


def analyze_loops(instrs: list[Instr]) -> dict:
    """The inner loop summary of one kernel: see the module docstring, steps 1-5."""
    if not instrs:
        return {"loops": []}
    blocks, succ, cold = basic_blocks(instrs)
    loops = natural_loops(succ)

    def inside(a: Loop, b: Loop) -> bool:
        return a is not b and a.blocks < b.blocks

    def parent(loop: Loop) -> Loop | None:  # the smallest loop around it
        around = [o for o in loops if inside(loop, o)]
        return min(around, key=lambda o: len(o.blocks)) if around else None

    load_loops = [l for l in loops if any(load_bytes_per_lane(i) for b in l.blocks for i in blocks[b])]
    inner = [l for l in load_loops if not any(inside(o, l) for o in load_loops)]
    if not inner:
        return {"loops": []}
    described = {}
    for l in inner:
        nested = {o.header for o in loops if inside(o, l)}
        nbytes, ninstr, classes, path = heaviest_path(l, blocks, succ, cold, nested)
        described[l.header] = dict(
            start=f"{blocks[l.header][0].addr:#x}", end=f"{max(blocks[b][-1].addr for b in l.blocks):#x}",
            depth=sum(1 for o in loops if inside(l, o)), selected=False,
            body_instructions=sum(1 for b in l.blocks for i in blocks[b] if i.base != "NOP"),
            path_instructions=ninstr, bytes_per_iteration=nbytes,
            loads=sorted({i.opcode for b in path for i in blocks[b] if load_bytes_per_lane(i)}), classes=classes)
    # The key loop: deepest, then most bytes, then longest; with its load-loop siblings in the same
    # parent loop (e.g. separate K and V tile copies inside the key-tile loop).
    key = max(inner, key=lambda l: (described[l.header]["depth"], described[l.header]["bytes_per_iteration"],
                                    described[l.header]["path_instructions"]))
    home = parent(key)
    chosen = [l for l in inner if l is key or (home is not None and parent(l) is home)]
    for l in chosen:
        described[l.header]["selected"] = True
    total_instr = sum(described[l.header]["path_instructions"] for l in chosen)
    total_bytes = sum(described[l.header]["bytes_per_iteration"] for l in chosen)
    classes: dict[str, int] = {}
    for l in chosen:
        for c, n in described[l.header]["classes"].items():
            classes[c] = classes.get(c, 0) + n
    return dict(
        loop_instructions=total_instr, loop_bytes=total_bytes,
        instructions_per_byte=round(total_instr / total_bytes, 4) if total_bytes else None,
        loop_mix={c: round(n / total_instr, 3) for c, n in sorted(classes.items())} if total_instr else {},
        loops=sorted(described.values(), key=lambda d: int(d["start"], 16)))


# --------------------------------------------------------------------------------------------
# Occupancy


def occupancy(arch: str, registers: int, threads: int, smem_bytes: int) -> dict:
    """Resident warps per SM and the resource that limits them."""
    limits = SM_LIMITS[arch.rstrip("a")] if arch.rstrip("a") in SM_LIMITS else None
    if limits is None:
        return {}
    warps_per_cta = -(-threads // WARP)
    regs_per_warp = -(-max(registers, 1) * WARP // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by = {
        "threads": limits["threads"] // (warps_per_cta * WARP),
        "ctas": limits["ctas"],
        "registers": limits["regs"] // (regs_per_warp * warps_per_cta),
    }
    smem = -(-(smem_bytes + SMEM_RESERVED_PER_CTA) // SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    by["shared_memory"] = limits["smem"] // smem
    ctas = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "registers"))
    return dict(ctas_per_sm=ctas, warps_per_sm=ctas * warps_per_cta,
                occupancy=round(ctas * warps_per_cta * WARP / limits["threads"], 3), limited_by=limiter)


# --------------------------------------------------------------------------------------------
# Dynamic shared memory probe


def probe_dynamic_smem(source_root: Path, head_dims=HEAD_DIMS) -> dict[tuple[str, int], int]:
    """{(kernel base name, D): bytes} for DYNAMIC_SMEM, from a host program that prints the
    expressions; {} when it does not build (a renamed constant: update DYNAMIC_SMEM)."""
    nvcc = find_tool("nvcc")
    if not nvcc or not (source_root / "cuda").is_dir():
        return {}
    lines, keys = [], []
    headers = sorted({h for h, _ in DYNAMIC_SMEM.values()})
    for name, (_, expr) in DYNAMIC_SMEM.items():
        for d in head_dims:
            keys.append((name, d))
            lines.append(f'  std::printf("%zu\\n", size_t({expr.format(D=d)}));')
    program = "#include <cstdio>\n" + "".join(f'#include "{source_root / "cuda" / h}"\n' for h in headers)
    program += "int main() {\n" + "\n".join(lines) + "\n  return 0;\n}\n"
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.cu", Path(tmp) / "probe"
        src.write_text(program)
        done = subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-arch=sm_80", "-I",
                               str(source_root / "csrc"), str(src), "-o", str(exe)], capture_output=True, text=True)
        if done.returncode != 0:
            return {}
        run = subprocess.run([str(exe)], capture_output=True, text=True)
        if run.returncode != 0:
            return {}
        values = [int(v) for v in run.stdout.split()]
    return dict(zip(keys, values))


# --------------------------------------------------------------------------------------------
# The report


def analyze_objects(objects: list[Path], dynamic_smem: dict[tuple[str, int], int] | None = None) -> list[dict]:
    """One row per (kernel, arch) found in the objects."""
    cuobjdump = find_tool("cuobjdump")
    if not cuobjdump:
        raise RuntimeError("cuobjdump not found (CUDA toolkit, or `pip install nvidia-cuda-cuobjdump`)")
    dynamic_smem = dynamic_smem or {}
    rows = []
    for obj in objects:
        try:
            res = parse_res_usage(_run([cuobjdump, "-res-usage", str(obj)]))
        except RuntimeError:
            continue  # no device code in this object
        if not res:
            continue
        sass = parse_sass(_run([cuobjdump, "-sass", str(obj)]))
        max_threads = parse_max_threads(_run([cuobjdump, "-elf", str(obj)]))
        log = obj.with_name(obj.name.split(".")[0] + ".ptxas.log")
        ptxas = parse_ptxas(log.read_text()) if log.is_file() else {}
        names = demangle(sorted({k for k, _ in res}))
        for (mangled, arch), r in sorted(res.items()):
            instrs, block = sass.get((mangled, arch), []), max_threads.get((mangled, arch))
            name = short_name(names.get(mangled, mangled))
            base = name.split("<")[0]
            head_dim = next((int(x) for x in re.findall(r"[<,]\s*(\d+)", name)), None)
            dyn = dynamic_smem.get((dynamic_smem_key(name), head_dim))
            spills = ptxas.get((mangled, arch), {})
            static_smem = spills.get("smem", _user_shared(arch, r["shared"]))
            features = {FEATURES[op]: any(i.base == op for i in instrs) for op in FEATURES}
            row = dict(kernel=name, arch=arch, object=obj.name, registers=r["registers"], stack=r["stack"],
                       spill_stores=spills.get("spill_stores"), spill_loads=spills.get("spill_loads"),
                       local_access_bytes=sum(access_width(i) for i in instrs if i.base in ("STL", "LDL")),
                       static_smem=static_smem, dynamic_smem=dyn, block_threads=block or DEFAULT_BLOCK,
                       block_from_launch_bounds=block is not None, sass_instructions=len(instrs),
                       features=features)
            row.update(occupancy(arch, r["registers"], row["block_threads"], static_smem + (dyn or 0)))
            row.update(analyze_loops(instrs))
            rows.append(row)
    return rows


def _user_shared(arch: str, shared: int) -> int:
    """The kernel's own static shared memory from cuobjdump's SHARED: an sm_90 object counts the
    1 KiB the runtime reserves per CTA in it (ptxas and sm_80 objects do not)."""
    return shared - SMEM_RESERVED_PER_CTA if arch.startswith("sm_9") and shared >= SMEM_RESERVED_PER_CTA else shared


_MIX_SHORT = [("global_load", "gld"), ("shared_load", "lds"), ("fp", "fp"), ("tensor", "mma"),
              ("int_address", "int"), ("shuffle", "shfl"), ("branch", "br"), ("conversion", "cvt"),
              ("store", "st"), ("move_other", "mov")]


def format_table(rows: list[dict]) -> str:
    w = max([len(r["kernel"]) for r in rows] + [6])
    head = (f"{'kernel':<{w}} {'arch':<6} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem s+d':>13} "
            f"{'warps/SM':>8} {'limit':<8} {'loop ins':>8} {'B/iter':>6} {'ins/KVB':>7}  "
            f"{'LDSM HMMA LDGSTS':<16}  loop mix (fraction of loop instructions)")
    out = [head, "-" * len(head)]
    for r in rows:
        spill = "?" if r["spill_stores"] is None else f"{r['spill_stores']}/{r['spill_loads']}"
        smem = f"{r['static_smem']}+{'?' if r['dynamic_smem'] is None else r['dynamic_smem']}"
        ipb = r.get("instructions_per_byte")
        f = r["features"]
        feats = " ".join(("yes" if f[k] else "-").ljust(w) for k, w in
                         (("ldmatrix", 4), ("mma.sync", 4), ("cp.async", 6)))
        mix = " ".join(f"{s}={r['loop_mix'][c]:.2f}" for c, s in _MIX_SHORT if r.get("loop_mix", {}).get(c))
        out.append(f"{r['kernel']:<{w}} {r['arch']:<6} {r['registers']:>4} {spill:>11} {r['stack']:>5} "
                   f"{smem:>13} {r.get('warps_per_sm', '?'):>8} {r.get('limited_by', ''):<8} "
                   f"{r.get('loop_instructions', '-'):>8} {r.get('loop_bytes', '-'):>6} "
                   f"{'-' if ipb is None else f'{ipb:.3f}':>7}  {feats:<16}  {mix}")
    out.append("")
    out.append("loop ins / B/iter: instructions and bytes (load width x 32 lanes) of one iteration of the "
               "key loop (the deepest inner loop holding global loads, with its sibling load loops), along "
               "the path reading the most bytes (then the longest); ins/KVB = their ratio. warps/SM: theoretical, from registers, "
               "block size, static (+ dynamic where known) shared memory. See kvcore.bench.kernels_static.")
    return "\n".join(out)


def compare(before: list[dict], after: list[dict]) -> str:
    """after / before per (kernel, arch) present in both."""
    old = {(r["kernel"], r["arch"]): r for r in before}
    keys = ("registers", "spill_stores", "warps_per_sm", "loop_instructions", "loop_bytes", "instructions_per_byte")
    w = max([len(r["kernel"]) for r in before + after] + [6])
    head = f"{'kernel':<{w}} {'arch':<6} " + " ".join(f"{k:>22}" for k in keys)
    out = [head, "-" * len(head)]
    for r in after:
        b = old.get((r["kernel"], r["arch"]))
        if not b:
            out.append(f"{r['kernel']:<{w}} {r['arch']:<6} (new)")
            continue
        cells = []
        for k in keys:
            x, y = b.get(k), r.get(k)
            if x is None or y is None:
                cells.append(f"{'?':>22}")
            else:
                ratio = f"x{y / x:.2f}" if x else ("=" if y == x else "new")
                cells.append(f"{_num(x)}->{_num(y)} {ratio}".rjust(22))
        out.append(f"{r['kernel']:<{w}} {r['arch']:<6} " + " ".join(cells))
    gone = sorted(set(old) - {(r["kernel"], r["arch"]) for r in after})
    out += [f"{k:<{w}} {a:<6} (gone)" for k, a in gone]
    return "\n".join(out)


def _num(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def source_root_default() -> Path:
    """The source tree this package sits in (python/kvcore/bench -> repository root), if any."""
    return Path(__file__).resolve().parents[3]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcore.bench kernels",
                                     description="Static cost report of the CUDA kernels (no GPU needed).")
    parser.add_argument("--static", action="store_true", help="the static report (the only mode so far)")
    parser.add_argument("--source", type=Path, default=None, help="source tree to compile (default: this checkout)")
    parser.add_argument("--objects", type=Path, nargs="+", help="use these objects / build dirs instead of compiling")
    parser.add_argument("--build-dir", type=Path, help="where to put the compiled objects (default: a temp dir)")
    parser.add_argument("--arch", default=",".join(ARCHS), help="architectures to compile (default sm_80,sm_90a)")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--compare", metavar="BEFORE.json", help="print after/before ratios against this report")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel nvcc jobs")
    args = parser.parse_args(argv)
    if not args.static:
        parser.error("only the static report exists: pass --static")
    source = (args.source or source_root_default()).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        if args.objects:
            objects = find_objects(args.objects)
        else:
            out_dir = args.build_dir or Path(tmp)
            objects = build_objects(source, out_dir, tuple(args.arch.split(",")), args.jobs)
        rows = analyze_objects(objects, probe_dynamic_smem(source))
    rows = [r for r in rows if args.filter in r["kernel"]]
    print(format_table(rows))
    if args.json:
        meta = dict(date=datetime.date.today().isoformat(), command="python -m kvcore.bench kernels " + " ".join(
            argv if argv is not None else sys.argv[1:]), source_commit=None if args.objects else _commit(source),
            nvcc_flags=NVCC_FLAGS, sm_limits=SM_LIMITS, tools=_tool_versions())
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    if args.compare:
        before = [r for r in json.loads(Path(args.compare).read_text())["rows"] if args.filter in r["kernel"]]
        print()
        print(f"after / before ({args.compare}):")
        print(compare(before, rows))
    return 0


def _commit(source: Path) -> str | None:
    """The source tree's git commit, with '+changes' when cuda/ differs from it."""
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "cuda", "csrc/kvcore"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def _tool_versions() -> dict[str, str]:
    versions = {}
    for tool in ("nvcc", "cuobjdump"):
        path = find_tool(tool)
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            m = re.search(r"release [\d.]+, V[\d.]+", out)
            versions[tool] = m.group(0) if m else "?"
    return versions


if __name__ == "__main__":
    sys.exit(main())
