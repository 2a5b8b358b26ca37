#!/usr/bin/env bash
# Create the virtual environment (.venv) and install flexi-export into it, torch 2.13.0 (CPU build) first and
# everything else constrained to it, so that no dependency can pull a multi-GB CUDA build of torch.
# Idempotent: a stamp keyed by pyproject.toml and the constraints skips work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FLEXI_VENV:-.venv}"
python="${PYTHON:-python3}"
key=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)
stamp="$venv/.flexi-export-installed-$key"
if [ -f "$stamp" ]; then
    exit 0
fi
echo "setting up $venv (torch 2.13.0 CPU first, then flexi-export and its dev tools)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet "torch==2.13.0" 2> >(grep -v "is ignored" >&2)
"${pip[@]}" install --quiet -c scripts/constraints.txt -e ".[dev]" 2> >(grep -v "is ignored" >&2)
rm -f "$venv"/.flexi-export-installed-*
touch "$stamp"
