#!/usr/bin/env bash
# Build the CUDA extension here (no GPU needed) for the GPU machine's torch, so the
# device call loads it instead of spending its minutes compiling.
#
#   bash bench/prebuild_cuda.sh [--archs "9.0a"] [--venv DIR] [--force]
#
# * A throwaway venv outside the repo (default /tmp/vk-prebuild-venv, reused) gets the
#   GPU machine's torch: PyPI torch==2.11.0 (its cu130 build; a multi-GB download, once)
#   and ninja. VITKERNELS_PREBUILD_TORCH changes the pin.
# * `python -m vitkernels build` compiles csrc/ there for the architectures given
#   (default sm_90a, the H200; "8.0;9.0a" adds the A100) with the CUDA toolkit from
#   CUDA_HOME or the nvcc on PATH, on MAX_JOBS cores (default 2).
# * The library and its sources.sha256 stamp land in .prebuilt/ (git-ignored), with
#   BUILD.txt saying what it was built from. The library is Python-agnostic (ATen and
#   torch/library.h only): the script fails if `nm -D` shows any Python symbol, if it
#   needs libpython or libtorch_python, or if it does not load with
#   torch.ops.load_library and register every op in the venv's torch.
#
# Then carry it to the device machine: run(command="bash bench/gpu_check.sh",
# carry=[".prebuilt"]); gpu_check.sh loads it (VITKERNELS_CUDA_LIBRARY) when the stamp
# matches the checkout's csrc/ and torch, and builds there only when it does not.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ARCHS=9.0a
VENV=${VITKERNELS_PREBUILD_VENV:-/tmp/vk-prebuild-venv}
TORCH_PIN=${VITKERNELS_PREBUILD_TORCH:-torch==2.11.0}
PYTHON=${PYTHON:-python3}
FORCE=0
while [ $# -gt 0 ]; do
  case $1 in
    --archs) ARCHS=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;;
    *) echo "prebuild_cuda.sh: unknown argument $1 (expected --archs, --venv, --force)" >&2; exit 2 ;;
  esac
done
case $VENV in "$ROOT"|"$ROOT"/*)
  echo "prebuild_cuda.sh: the venv must live outside the repo (got $VENV)" >&2; exit 2 ;;
esac
say() { echo "[prebuild $(date +%H:%M:%S)] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating the venv $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
VPY=$VENV/bin/python
if ! "$VPY" -c "import ninja, torch" 2>/dev/null \
   || [ "$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0])')" != "${TORCH_PIN#torch==}" ]; then
  say "installing $TORCH_PIN and ninja into $VENV (the cu130 build: several GB, once)"
  "$VPY" -m pip install -q --disable-pip-version-check "$TORCH_PIN" ninja
fi
TORCH_VERSION=$("$VPY" -c 'import torch; print(torch.__version__)')
TORCH_CUDA=$("$VPY" -c 'import torch; print(torch.version.cuda)')
say "torch $TORCH_VERSION (CUDA $TORCH_CUDA), python $("$VPY" -c 'import platform; print(platform.python_version())')"

OUTDIR=$ROOT/.prebuilt
LIB=$OUTDIR/vitkernels_C.so
WORK=${VENV}-cache
export TORCH_CUDA_ARCH_LIST=$ARCHS
export VITKERNELS_CACHE_DIR=$WORK
export MAX_JOBS=${MAX_JOBS:-2}
# the stamp the loader will compare against, computed by the venv's torch
WANT=$("$VPY" -c 'import sys; sys.path.insert(0, "."); from vitkernels import cuda; print(cuda._sources_hash())')
if [ "$FORCE" = 0 ] && [ -f "$LIB" ] && [ "$(cat "$OUTDIR/sources.sha256" 2>/dev/null)" = "$WANT" ] \
   && grep -qx "archs: $ARCHS" "$OUTDIR/BUILD.txt" 2>/dev/null; then
  say "$LIB is up to date with csrc/ and torch $TORCH_VERSION (--force rebuilds)"
else
  say "building for TORCH_CUDA_ARCH_LIST=$ARCHS on $MAX_JOBS cores (7-13 minutes on 2 cores)"
  start=$(date +%s)
  force_flag=()
  [ "$FORCE" = 1 ] && force_flag=(--force)
  "$VPY" -m vitkernels build "${force_flag[@]}"
  built=$("$VPY" -c 'import sys; sys.path.insert(0, "."); from vitkernels import cuda; print(cuda._jit_library(cuda.cache_dir()))')
  mkdir -p "$OUTDIR"
  rm -f "$OUTDIR"/vitkernels_C*.so
  cp "$built" "$LIB"
  cp "$(dirname "$built")/sources.sha256" "$OUTDIR/sources.sha256"
  {
    echo "vitkernels CUDA extension, prebuilt by bench/prebuild_cuda.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "torch: $TORCH_VERSION"
    echo "cuda: $TORCH_CUDA"
    echo "archs: $ARCHS"
    echo "python used to build (the library does not depend on it): $("$VPY" -c 'import platform; print(platform.python_version())')"
    echo "nvcc: $("$VPY" -c 'import sys; sys.path.insert(0, "."); from vitkernels import _toolkit; print(_toolkit.cuda_home())')"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet -- csrc 2>/dev/null || echo ' (csrc/ modified)')"
    echo "build seconds: $(( $(date +%s) - start ))"
  } >"$OUTDIR/BUILD.txt"
fi

say "checking $LIB"
py_symbols=$(nm -D "$LIB" | grep -E ' (U|T|D|B|W) _?Py' || true)
if [ -n "$py_symbols" ]; then
  echo "prebuild_cuda.sh: $LIB refers to the Python C API:" >&2
  echo "$py_symbols" | head -20 >&2
  exit 1
fi
needed=$(readelf -d "$LIB" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
case " $needed " in *libpython*|*libtorch_python*)
  echo "prebuild_cuda.sh: $LIB needs $needed (expected no libpython, no libtorch_python)" >&2; exit 1 ;;
esac
say "nm -D: no Py symbols; NEEDED: $needed"
VITKERNELS_CUDA_LIBRARY=$LIB "$VPY" - <<'EOF'
import sys

sys.path.insert(0, ".")
import torch

from vitkernels import cuda

reason = cuda.unavailable_reason()
if reason is not None:
    sys.exit(f"prebuild_cuda.sh: the library does not load: {reason}")
missing = [name for name in cuda.OPS if not cuda.has_op(name)]
if missing:
    sys.exit(f"prebuild_cuda.sh: the library lacks the ops {', '.join(missing)}")
schemas = [str(getattr(torch.ops.vitkernels_C, name).default._schema) for name in cuda.OPS]
print(f"loaded {cuda.library_path()} with torch {torch.__version__}: " + "; ".join(schemas))
EOF
say "ready: $LIB ($(du -h "$LIB" | cut -f1)); carry \".prebuilt\" to the device machine"
