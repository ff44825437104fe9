#!/usr/bin/env bash
# The whole test suite: sets up what it needs (hack/setup.sh), then runs pytest.
# Extra arguments go to pytest, e.g. hack/test.sh tests/unit -x
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
hack/setup.sh
set +e
# Two workers: the in-cluster scenarios run on one of them, in order (tests/e2e/conftest.py),
# while the other takes the rest; each worker starts its own local control plane.
.venv/bin/pytest -n "${ACCORD_TEST_WORKERS:-2}" --dist loadgroup "$@"
code=$?
set -e
if [[ $code -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $code
