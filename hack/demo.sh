#!/usr/bin/env bash
# One command: set everything up, then run the demo (Ctrl-C stops it cleanly).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/hack/setup.sh"
exec "$root/.venv/bin/python" "$root/hack/demo.py" "$@"
