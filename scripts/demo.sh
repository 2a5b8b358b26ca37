#!/usr/bin/env bash
# The README's first command: set up .venv if needed, then run the whole job end to end on the embedded
# reference model (train or reuse it, compress, recover, export, verify). Extra arguments go to `flexi-export demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/flexi-export demo "$@"
