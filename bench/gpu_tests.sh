#!/usr/bin/env bash
# The gpu tests, one pytest process per file (gpu_check.sh's tests stage):
#
#   bash bench/gpu_tests.sh PYTHON LOG FILE...
#
# An illegal memory access poisons the CUDA context of its process: one process per
# file fails that file, not every test after it. Every file's output goes to LOG
# (emptied first), one line per file to stdout. SIGINT stops the running file's pytest
# (which still writes its summary line) and then the loop.
# A CUDA fault still loses the rest of its file's process: tests/conftest.py then stops
# the session after the faulting test ("CUDA fault in <test>"), and the file is run
# again without the tests that already ran (their outcomes stand), at most 8 times a
# file; each rerun is its own block in LOG ("##### FILE (rerun after a CUDA fault ...)").
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
ran_ids() {  # the node ids a pytest -v block reports an outcome for, one a line
  "$py" - "$1" <<'PY'
import re, sys
pat = re.compile(r"^(\S+?\.py::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
for line in open(sys.argv[1], errors="replace"):
    m = pat.match(line)
    if m:
        print(m.group(1))
PY
}
rc=0
: >"$log"
block=$(mktemp)
trap 'rm -f "$block"; exit 130' INT
for f in "$@"; do
  [ -n "$f" ] || continue
  header="##### $f"
  deselect=()
  for attempt in 1 2 3 4 5 6 7 8 9; do
    echo "$header" >>"$log"
    "$py" -m pytest -m gpu -v -rfE --no-header -p no:cacheprovider "${extra[@]}" "${deselect[@]}" "$f" >"$block" 2>&1
    r=$?
    cat "$block" >>"$log"
    [ $r -ne 0 ] && [ $r -ne 5 ] && rc=1
    echo "$f: $(tail -1 "$block")"
    grep -q "CUDA fault in " "$block" || break
    [ "$attempt" = 9 ] && break
    n=0
    while IFS= read -r id; do
      deselect+=(--deselect "$id"); n=$((n + 1))
    done < <(ran_ids "$block")
    [ $n -gt 0 ] || break
    header="##### $f (rerun after a CUDA fault: without the $(( ${#deselect[@]} / 2 )) tests that ran)"
  done
done
rm -f "$block"
exit $rc
