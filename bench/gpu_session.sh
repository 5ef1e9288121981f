#!/usr/bin/env bash
# One scripted GPU session: build for the local GPU, then run the requested phases, each under its
# own time limit, with every log and result written to OUTDIR (the short table goes to stdout).
#   bash bench/gpu_session.sh OUTDIR [build] [test] [sanitize] [bench] [bench-quick] [static]
# Phases run in the order given; `build` is implied when kvcore is not importable yet.
set -u
OUT=${1:?usage: gpu_session.sh OUTDIR [phases...]}
shift
PHASES=${*:-build test bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ARCH=${KVCORE_CUDA_ARCHITECTURES:-90a-real}
date -u +%Y-%m-%dT%H:%M:%SZ >"$OUT/date.txt"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

phase_build() {
  local t0=$SECONDS
  # The editable-free install keeps the tests importing the built package, not the source tree.
  timeout 420 "$PY" -m pip install . --no-build-isolation --no-deps -q \
    -Ccmake.define.KVCORE_CUDA_ARCHITECTURES="$ARCH" -Cbuild.verbose=false \
    >"$OUT/build.log" 2>&1
  local rc=$?
  echo "build rc=$rc ($((SECONDS - t0)) s, arch $ARCH)"
  [ $rc -eq 0 ] || tail -40 "$OUT/build.log"
  "$PY" -c "import kvcore; print('cuda_status', kvcore.cuda_status()); print(kvcore.build_info())" 2>&1
  return $rc
}

phase_test() {
  local t0=$SECONDS
  timeout 300 "$PY" -m pytest -m cuda -q -p no:cacheprovider --timeout 120 \
    --junitxml="$OUT/pytest-cuda.xml" -rfE >"$OUT/pytest-cuda.log" 2>&1
  echo "pytest -m cuda rc=$? ($((SECONDS - t0)) s)"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest-cuda.log" | tail -40
}

phase_sanitize() {
  local t0=$SECONDS
  for tool in memcheck racecheck; do
    timeout 200 compute-sanitizer --tool $tool --error-exitcode 9 \
      "$PY" -m pytest -m cuda -q -p no:cacheprovider -x -k "not bench and not stress and not large" \
      tests/python/test_kv_cache_cuda.py tests/python/test_attention_cuda.py \
      tests/python/test_quant_cuda.py >"$OUT/sanitizer-$tool.log" 2>&1
    echo "compute-sanitizer $tool rc=$? ($((SECONDS - t0)) s)"
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer-$tool.log" | tail -5
  done
}

phase_bench() {
  local t0=$SECONDS
  timeout 420 "$PY" -m kvcore.bench all --device cuda --json "$OUT/bench-cuda.json" \
    >"$OUT/bench-cuda.txt" 2>&1
  echo "bench rc=$? ($((SECONDS - t0)) s)"
  tail -60 "$OUT/bench-cuda.txt"
}

phase_bench-quick() {
  timeout 200 "$PY" -m kvcore.bench all --device cuda --quick --json "$OUT/bench-cuda-quick.json" \
    >"$OUT/bench-cuda-quick.txt" 2>&1
  echo "bench --quick rc=$?"
  tail -40 "$OUT/bench-cuda-quick.txt"
}

# The static kernel report (no GPU needed): the sources compiled for sm_80/sm_90a, against the
# committed figures of the kernels before the issue 15 rewrite.
phase_static() {
  local t0=$SECONDS
  timeout 400 "$PY" -m kvcore.bench kernels --static --json "$OUT/static-kernels.json" \
    --compare bench/results/2026-12-07-static-kernels-before.json >"$OUT/static-kernels.txt" 2>&1
  echo "static kernel report rc=$? ($((SECONDS - t0)) s)"
  grep -E "^(kernel|paged_attention_kernel<128>|prefill_tc_kernel<128)" "$OUT/static-kernels.txt" | head -12
}

if ! "$PY" -c "import kvcore" 2>/dev/null && [[ " $PHASES " != *" build "* ]]; then
  PHASES="build $PHASES"
fi
for phase in $PHASES; do
  "phase_$phase" || { [ "$phase" = build ] && exit 1; }
done
