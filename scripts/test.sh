#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the whole test suite (slow end-to-end tests
# included). Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` or `scripts/test.sh tests/export`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@"
