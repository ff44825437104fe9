#!/usr/bin/env bash
# The whole test suite: sets up what it needs (hack/setup.sh), then runs pytest.
# Extra arguments go to pytest, e.g. hack/test.sh tests/unit -x
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
hack/setup.sh
set +e
if [[ $# -gt 0 ]]; then
  .venv/bin/pytest "$@"
  codes=($?)
else
  # The whole suite: the in-cluster scenarios (tests/e2e, in file order: they build on one
  # cluster) in a second pytest process beside the rest, which starts its own control
  # plane. Most of their time is spent waiting on pods. Their report follows the rest's.
  e2e_log="$(mktemp)"
  .venv/bin/pytest tests/e2e >"$e2e_log" 2>&1 &
  e2e=$!
  # The rest on two workers, a file per worker at a time (each worker starts its own
  # control plane): most of their time is spent waiting on processes, not computing.
  .venv/bin/pytest --ignore-glob='tests/e2e/*' -n 2 --dist loadfile
  rest=$?
  wait "$e2e"
  codes=("$rest" $?)
  echo
  echo "==================== the in-cluster suite (tests/e2e), run beside the rest ===================="
  cat "$e2e_log"
  rm -f "$e2e_log"
fi
set -e
for code in "${codes[@]}"; do
  if [[ $code -eq 5 ]]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
  fi
done
for code in "${codes[@]}"; do
  [[ $code -eq 0 ]] || exit "$code"
done
exit 0
