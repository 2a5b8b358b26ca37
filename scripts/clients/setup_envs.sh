#!/usr/bin/env bash
# Create the environments of the external clients that scripts/clients/check_clients.py runs a bundle in:
#   .venv-optimum                 optimum-onnx (ORTModelForCausalLM); it pins transformers<4.58, so it cannot share
#                                 the project's venv (transformers 5); torch==2.13.0 (CPU) is installed first and
#                                 everything else constrained to it, so no multi-GB CUDA build of torch is pulled
#   .venv-genai                   onnxruntime-genai (numpy + onnxruntime, no torch)
#   scripts/clients/js/node_modules   transformers.js, installed with ONNXRUNTIME_NODE_INSTALL=skip (the npm tarball
#                                 already holds the CPU binaries; the post-install step only downloads the CUDA EP)
# Usage: scripts/clients/setup_envs.sh [optimum] [genai] [js]     (no argument: all three)
# Idempotent: each environment has a stamp keyed by this script and its pin file; nothing is done when it matches.
# Two runs at once are serialised (flock on this file).
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-python3}"
here=scripts/clients

exec 9<"$0"
flock 9

key() { cat "$0" "$@" | sha256sum | cut -c1-16; }

stamped() {  # stamped DIR KEY: true when DIR was set up with KEY
    [ -f "$1/.flexi-client-installed-$2" ]
}

stamp() {  # stamp DIR KEY
    rm -f "$1"/.flexi-client-installed-*
    touch "$1/.flexi-client-installed-$2"
}

pip_install() {  # pip_install VENV ARGS...: quiet, without the harmless "Location ... is ignored" lines
    local venv=$1
    shift
    "$venv/bin/python" -m pip --disable-pip-version-check install --quiet "$@" 2> >(grep -v "is ignored" >&2)
}

setup_optimum() {
    local venv=.venv-optimum k
    k=$(key "$here/requirements-optimum.txt" scripts/constraints.txt)
    stamped "$venv" "$k" && return 0
    echo "setting up $venv (torch 2.13.0 CPU first, then optimum-onnx)" >&2
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    pip_install "$venv" "torch==2.13.0"
    pip_install "$venv" -c scripts/constraints.txt -r "$here/requirements-optimum.txt"
    stamp "$venv" "$k"
}

setup_genai() {
    local venv=.venv-genai k
    k=$(key "$here/requirements-genai.txt")
    stamped "$venv" "$k" && return 0
    echo "setting up $venv (onnxruntime-genai)" >&2
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    pip_install "$venv" -r "$here/requirements-genai.txt"
    stamp "$venv" "$k"
}

setup_js() {
    local dir=$here/js k
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        echo "error: the transformers.js client needs Node.js >= 18 and npm on PATH" >&2
        return 1
    fi
    k=$(key "$dir/package.json" "$dir/package-lock.json")
    mkdir -p "$dir/node_modules"
    stamped "$dir/node_modules" "$k" && return 0
    echo "setting up $dir/node_modules (transformers.js, npm ci)" >&2
    # npm ci installs exactly the committed package-lock.json; --no-audit/--no-fund: no extra registry calls
    (cd "$dir" && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error >&2)
    stamp "$dir/node_modules" "$k"
}

envs=("$@")
[ ${#envs[@]} -gt 0 ] || envs=(optimum genai js)
for env in "${envs[@]}"; do
    case "$env" in
        optimum | genai | js) "setup_$env" ;;
        *)
            echo "error: unknown client environment '$env' (choose from: optimum genai js)" >&2
            exit 2
            ;;
    esac
done
