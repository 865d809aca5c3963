#!/usr/bin/env bash
# One call on a bare device machine: install, build the CUDA extension, run the gpu
# tests and the benchmarks, and leave every log and JSON under $OUT.
#
#   bash bench/gpu_check.sh [STAGE ...]    stages: info build tests ops models (default: all)
#
# Each stage is bounded so the whole run fits one 10-minute device call; run the
# stages over two calls if the budget is tight (e.g. "info build tests" then "ops models").
# No network there: the package installs over what is installed (torch 2.11, triton 3.6).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(info build tests ops models)
want() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
stamp() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

stamp "install (no deps, no build isolation)"
python -m pip install -q --no-deps --no-build-isolation -e . >/tmp/vk-install.log 2>&1 \
  || { tail -20 /tmp/vk-install.log; exit 1; }

if want info; then
  stamp "info"
  python -m vitkernels info 2>&1 | tee "$OUT/info.txt"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv \
    >>"$OUT/info.txt" 2>&1
fi

if want build && [ -d csrc ]; then
  stamp "build the CUDA extension (JIT, sm_90)"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} timeout 420 python -m vitkernels build \
    >"$OUT/build.log" 2>&1; echo "build exit $?" | tee -a "$OUT/build.log"; tail -5 "$OUT/build.log"
fi

if want tests; then
  stamp "pytest -m gpu"
  timeout 480 python -m pytest -m gpu tests -q --no-header -p no:cacheprovider \
    >"$OUT/gpu_tests.log" 2>&1
  echo "gpu tests exit $?"; tail -15 "$OUT/gpu_tests.log"
fi

bench() {  # bench NAME FILES...
  local name=$1; shift
  stamp "benchmarks: $name"
  timeout 540 python -m pytest "$@" -q --no-header -p no:cacheprovider \
    --benchmark-only --benchmark-json="$OUT/bench-$name.json" --benchmark-columns=median,rounds \
    >"$OUT/bench-$name.log" 2>&1
  echo "bench $name exit $?"; tail -25 "$OUT/bench-$name.log"
}
want ops && bench ops bench/test_relpos.py bench/test_performer.py bench/test_patch_embed.py
want models && bench models bench/test_models.py
stamp "done; files under $OUT"
ls -la "$OUT"
