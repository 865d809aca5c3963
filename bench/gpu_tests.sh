#!/usr/bin/env bash
# The gpu tests, one pytest process per file (gpu_check.sh's tests stage):
#
#   bash bench/gpu_tests.sh PYTHON LOG FILE...
#
# An illegal memory access poisons the CUDA context of its process: one process per
# file fails that file, not every test after it. Every file's output goes to LOG
# (emptied first), one line per file to stdout. SIGINT stops the running file's pytest
# (which still writes its summary line) and then the loop.
# VK_GPU_TESTS_COLLECT_ONLY=1 collects instead of running (gpu_check.sh --dry-run).
# Exit status: 0 when every file passed or had no gpu test (pytest's 5), 1 when one
# failed, 2 for bad arguments, 130 when interrupted.
set -u
trap 'exit 130' INT
if [ $# -lt 2 ]; then
  echo "gpu_tests.sh: expected PYTHON LOG FILE..., got $# arguments" >&2; exit 2
fi
py=$1 log=$2
shift 2
if ! command -v "$py" >/dev/null 2>&1; then
  echo "gpu_tests.sh: the first argument must be a python to run pytest with, got '$py'" >&2; exit 2
fi
case $log in
  *.py) echo "gpu_tests.sh: the second argument is the log to write, got a Python file '$log'" >&2; exit 2 ;;
esac
extra=()
[ "${VK_GPU_TESTS_COLLECT_ONLY:-0}" = 1 ] && extra=(--collect-only -q)
rc=0
: >"$log"
for f in "$@"; do
  [ -n "$f" ] || continue
  echo "##### $f" >>"$log"
  "$py" -m pytest -m gpu -v -rfE --no-header -p no:cacheprovider "${extra[@]}" "$f" >>"$log" 2>&1
  r=$?
  [ $r -ne 0 ] && [ $r -ne 5 ] && rc=1
  echo "$f: $(tail -1 "$log")"
done
exit $rc
