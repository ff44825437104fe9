#!/usr/bin/env bash
# The whole test suite: sets up what it needs (hack/setup.sh), then runs pytest.
# Extra arguments go to pytest, e.g. hack/test.sh tests/unit -x
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
hack/setup.sh
set +e
.venv/bin/pytest "$@"
code=$?
set -e
if [[ $code -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $code
