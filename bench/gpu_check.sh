#!/usr/bin/env bash
# The device check: one call on a bare GPU machine, within one global deadline.
#
#   bash bench/gpu_check.sh [--minutes 9] [--out DIR] [--prebuilt PATH] [--no-build]
#                           [--compile-mode MODE] [--quick] [--dry-run]
#
# In priority order, each stage given what is left of the deadline, and the first four
# at most a share of it (env 10%, correctness 25%, ops 30%, models 20%), so that a slow
# stage leaves time to the next (a stage that runs over is stopped with SIGINT; what it
# measured stays, what it cut is recorded):
#   1. versions, clocks, the two ceilings (a 2 GiB device-to-device copy, an 8192^3
#      bf16 matrix product)                                         bench/gpu_run.py env
#   2. correctness: every op x backend x dtype, forward and backward, against float64
#      (fresh random inputs, outputs poisoned with NaN)      bench/gpu_run.py correctness
#   2b. the performer probe: the first run's fault, the second's wrong forward at E33, one
#      process per variant under CUDA_LAUNCH_BLOCKING=1 (15%)      bench/ima_probe.py
#   3. op benchmarks A1 A4 T1 P1 M1, forward and forward+backward, against their peers
#                                                                bench/gpu_run.py ops
#   4. whole models LeViT-256, T2T-ViT-14, ViT-B/16 at batch 256  bench/gpu_run.py models
#   4b. the host's time per op call, layer by layer (8%)        bench/host_overhead.py
#   5. while time remains: the gpu tests (pytest -m gpu, one process per test file, all
#      in pytest-gpu.log), then the other workloads and models
# then prints a short summary (the device tool returns the last 12,000 characters).
#
# The CUDA extension: a library prebuilt by bench/prebuild_cuda.sh (.prebuilt/, carried
# with the call: carry=[".prebuilt"]) is loaded when its stamp matches csrc/ and torch;
# else it is built here in the background (TORCH_CUDA_ARCH_LIST=9.0a) while stages 1-2
# run, and the cuda backend joins the stages that start after the build has finished.
#
# Files under --out (default $OUT, else .device-out/), at most 6, written as it goes:
#   summary.txt, gpu_check.log, check.json (every record), <gpu>-<yyyy-mm-dd>.json (the
#   measured rows for bench/results/, read by bench/make_results.py), pytest-gpu.log,
#   build.log (only when the extension was built here).
# The copy on the device machine has no .git: pass VITKERNELS_COMMIT=$(git rev-parse HEAD).
#
# --quick: a short verification pass (a few minutes of device time): versions and
# ceilings, correctness, the probe and the op benchmarks A1 A4 T1 P1 M1 only (shares 10/40/15/rest).
#
# --dry-run walks the same plan on this machine's CPU in seconds: what needs a GPU is
# reported as skipped, nothing is timed, nothing is installed or built.
# Exit status: 0 when everything that ran passed, 1 when a check, benchmark agreement or
# gpu test failed, 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)

MINUTES=9
OUTDIR=${OUT:-$ROOT/.device-out}
PREBUILT=""
BUILD=1
DRY=0
COMPILE_MODE=default
QUICK=0
while [ $# -gt 0 ]; do
  case $1 in
    --minutes) MINUTES=$2; shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    --prebuilt) PREBUILT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --compile-mode) COMPILE_MODE=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ $MINUTES =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "gpu_check.sh: --minutes takes a number of minutes, got '$MINUTES'" >&2; exit 2
fi
TOTAL=$(awk -v m="$MINUTES" 'BEGIN { printf "%d", m * 60 }')
DEADLINE=$(( START + TOTAL ))
RESERVE=15  # seconds kept for the report at the end
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vk-gpu-check.XXXXXX")
rm -f "$OUTDIR"/{summary.txt,gpu_check.log,check.json,pytest-gpu.log,build.log}
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1

export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-8}
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
DRY_FLAG=()
[ "$DRY" = 1 ] && DRY_FLAG=(--dry-run)
BUILD_PID=""

say() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( DEADLINE - $(date +%s) - RESERVE )); }
note() {  # note STAGE STATUS SECONDS [NOTE]: one record for the report
  "$PY" -c 'import json, sys; print(json.dumps({"kind": "stage", "name": sys.argv[1], "status": sys.argv[2], "seconds": int(sys.argv[3]), "note": sys.argv[4]}))' \
    "$1" "$2" "$3" "${4:-}" >>"$WORK/stages.jsonl"
}
report() { "$PY" bench/gpu_run.py report --work "$WORK" --out "$OUTDIR" "$@"; }
run_stage() {  # run_stage NAME MIN_SECONDS CAP_SECONDS CMD...: CMD within what is left (and CAP)
  local name=$1 min=$2 cap=$3 t0 rc status budget
  shift 3
  budget=$(left)
  if [ "$budget" -lt "$min" ]; then
    say "$name: cut (${budget}s left, needs ${min}s)"
    note "$name" cut 0 "deadline: ${budget}s left"
    return 0
  fi
  [ "$cap" -gt 0 ] && [ "$cap" -lt "$budget" ] && budget=$cap
  say "$name (up to ${budget}s)"
  t0=$(date +%s)
  # the stage's own deadline is STAGE_END; SIGINT there (it stops, keeping what it
  # measured, recording what it cut), KILL 20 s later
  timeout -s INT -k 20 "$budget" "${@//@STAGE_END@/$(( t0 + budget ))}"
  rc=$?
  case $rc in
    0) status=ok ;;
    124) status=cut ;;
    *) status=failed ;;
  esac
  note "$name" "$status" $(( $(date +%s) - t0 )) "$([ $rc -ne 0 ] && echo "exit $rc")"
  report >/dev/null 2>&1  # the files under --out follow every stage
  return 0
}
probe() {  # the performer illegal-access probe (bench/ima_probe.py), at most SHARE % of the deadline
  run_stage probe 30 $(( TOTAL * $1 / 100 )) "$PY" bench/ima_probe.py --work "$WORK" \
    "${DRY_FLAG[@]}" --deadline @STAGE_END@
}
stage() {  # stage NAME MIN_SECONDS SHARE_OF_THE_DEADLINE_% gpu_run.py-args...
  local name=$1 min=$2 share=$3
  shift 3
  run_stage "$name" "$min" $(( TOTAL * share / 100 )) "$PY" bench/gpu_run.py "$@" --work "$WORK" \
    "${DRY_FLAG[@]}" --deadline @STAGE_END@ --compile-mode "$COMPILE_MODE"
}
cuda_status() {  # "ok" when the extension loads here, else why not
  "$PY" -c 'from vitkernels import cuda; print(cuda.unavailable_reason() or "ok")' 2>&1 | tail -1
}
build_done() { [ -z "$BUILD_PID" ] || ! kill -0 "$BUILD_PID" 2>/dev/null; }
finish() {
  if [ -n "$BUILD_PID" ] && kill -0 "$BUILD_PID" 2>/dev/null; then
    say "stopping the unfinished CUDA build"
    kill -TERM "$BUILD_PID" 2>/dev/null  # timeout passes it on to the compilers
    note build cut 0 "unfinished at the deadline"
  fi
  say "report"
  report
  local rc=$?
  rm -rf "$WORK"
  exit $rc
}
trap finish EXIT

say "vitkernels gpu_check: deadline in ${MINUTES} min, files in $OUTDIR$([ "$DRY" = 1 ] && echo ' (dry run)')"

# the package, from this copy of the tree (nothing to fetch: no network there)
link_package() {  # the package laid out as installed (vitkernels.models is models/), by links
  mkdir -p "$WORK/site/vitkernels"
  for f in "$ROOT"/vitkernels/*; do ln -s "$f" "$WORK/site/vitkernels/"; done
  ln -s "$ROOT/models" "$WORK/site/vitkernels/models"
  export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
}
if ! "$PY" -c 'import sys, vitkernels, vitkernels.models; sys.exit(not vitkernels.__file__.startswith(sys.argv[1]))' "$ROOT" 2>/dev/null; then
  if [ "$DRY" = 1 ]; then
    say "vitkernels is not installed from this checkout; a dry run installs nothing: imported from links"
    link_package
  else
    say "pip install -e . (no deps, no build isolation)"
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1; then
      tail -5 "$WORK/install.log"
      say "pip install failed: vitkernels imported from links under $WORK/site instead"
      link_package
      note install fallback 0 "pip install -e . failed; vitkernels imported from links"
    fi
  fi
fi

# the CUDA extension: prebuilt, else built here in the background
[ -z "$PREBUILT" ] && [ -f .prebuilt/vitkernels_C.so ] && PREBUILT=.prebuilt/vitkernels_C.so
if [ -n "$PREBUILT" ]; then
  export VITKERNELS_CUDA_LIBRARY=$ROOT/${PREBUILT#"$ROOT"/}
  [ "${PREBUILT#/}" != "$PREBUILT" ] && export VITKERNELS_CUDA_LIBRARY=$PREBUILT
fi
if [ "$DRY" = 1 ]; then
  EXT="not checked, loaded or built in a dry run (the env stage reports it)"
else
  EXT=$(cuda_status)
fi
if [ "$EXT" = ok ]; then
  say "CUDA extension: loaded ${VITKERNELS_CUDA_LIBRARY:-(installed or JIT build)}"
elif [ "$DRY" = 1 ] || [ "$BUILD" = 0 ]; then
  say "CUDA extension: $EXT; not building ($([ "$DRY" = 1 ] && echo dry run || echo --no-build))"
  note build skipped 0 "$EXT"
else
  say "CUDA extension: not loaded ($EXT); building it in the background (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  if [ -n "${VITKERNELS_CUDA_LIBRARY:-}" ]; then
    say "(the prebuilt library is not used: $EXT)"
    unset VITKERNELS_CUDA_LIBRARY
  fi
  timeout -s TERM -k 10 $(( $(left) > 60 ? $(left) - 30 : 30 )) \
    "$PY" -m vitkernels build >"$OUTDIR/build.log" 2>&1 &
  BUILD_PID=$!
fi

after_build() {  # once the background build has finished: record it, check the cuda backend
  [ -n "$BUILD_PID" ] || return 0
  if ! build_done; then
    say "the CUDA build is still running: the next stage runs without the cuda backend"
    return 0
  fi
  wait "$BUILD_PID"
  local brc=$?
  BUILD_PID=""
  note build "$([ $brc = 0 ] && echo ok || echo failed)" 0 "$(tail -1 "$OUTDIR/build.log")"
  [ $brc = 0 ] && stage correctness-cuda 20 10 correctness --backends cuda --tag cuda
}

if [ "$QUICK" = 1 ]; then
  stage env 20 10 env
  stage correctness 30 40 correctness
  probe 15
  after_build
  stage ops 40 100 ops --workloads A1,A4,T1,P1,M1
  note models skipped 0 "--quick"
  note tests skipped 0 "--quick"
  exit 0  # the EXIT trap writes the files and prints the summary
fi
stage env 20 10 env
stage correctness 30 25 correctness
probe 15
after_build
stage ops 40 30 ops --workloads A1,A4,T1,P1,M1
after_build
stage models 40 20 models
after_build
# the host's time per op call, layer by layer, with real launches (the first two runs'
# triton calls were host-bound: 355 us a call around 59 us of kernels at A1)
if [ "$DRY" = 1 ]; then
  note host skipped 0 "needs a GPU (dry run; tests/test_host_overhead.py runs it on CPU)"
else
  run_stage host 30 $(( TOTAL * 8 / 100 )) "$PY" bench/host_overhead.py --calls 300
fi

# the gpu tests, one pytest process per file (an illegal memory access poisons the CUDA
# context of its process: it fails that file, not every test after it), the kernels'
# own files first; the extension's own tests only once it is loaded
FIRST=(tests/test_relpos_gpu.py tests/test_performer_gpu.py tests/test_patch_embed_gpu.py
       tests/test_cuda_gpu.py tests/test_gpu_devices.py)
TESTS=()
for f in "${FIRST[@]}" $(grep -l "mark.gpu" tests/test_*.py); do
  case " ${TESTS[*]} " in *" $f "*) continue ;; esac
  TESTS+=("$f")
done
if [ "$DRY" = 0 ] && [ "$(cuda_status)" != ok ]; then
  # its fixture would build the extension (again, or beside the running build)
  say "tests/test_cuda_gpu.py left out: the CUDA extension is not loaded"
  TESTS=("${TESTS[@]/tests\/test_cuda_gpu.py}")
fi
# (bench/gpu_tests.sh; a dry run collects the first file, to walk the same plumbing)
if [ "$DRY" = 1 ]; then
  run_stage tests 30 0 env VK_GPU_TESTS_COLLECT_ONLY=1 \
    bash bench/gpu_tests.sh "$PY" "$OUTDIR/pytest-gpu.log" "${TESTS[0]}"
else
  # SIGINT at the deadline stops the running file's pytest (it still writes its summary
  # line) and then the loop
  run_stage tests 30 0 bash bench/gpu_tests.sh "$PY" "$OUTDIR/pytest-gpu.log" "${TESTS[@]}"
fi

stage ops-rest 40 100 ops --workloads A2,A3,A5,T2,P2,P3,M2,M3 --tag rest
stage models-rest 60 100 models --tag rest \
  --models "DeiT-S distilled [timm];CaiT-XXS24 [timm];PiT-S [timm];LeViT-128S [timm];CrossViT-S [timm];CvT-13 [zoo];DeepViT [zoo]"
# finish (EXIT trap): stop an unfinished build, write the files, print the summary
