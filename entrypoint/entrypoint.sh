#!/usr/bin/env bash
# The image's entrypoint: dispatch to what the image can do; any other command runs as given.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

usage() {
    cat <<EOF
llmtrain image: container-first LLM fine-tuning (manifest: $root/manifest.json)

usage: entrypoint.sh [COMMAND [ARGS...]]
  (no command)         this help
  smoke [KEY=VALUE..]  fine-tune the embedded tiny Llama with LoRA on CPU (about a minute) and
                       check the loss fell and the adapter was written; output in \$SMOKE_DIR,
                       else ./llmtrain-smoke when writable, else a new temporary directory
  check                the build-time checks: import the stack, pip check, llmtrain env
  launch ARGS...       one node of a multi-node run: $here/launch.sh
  llmtrain VERB ...    the llmtrain CLI (llmtrain --help), e.g. llmtrain env
  COMMAND ...          anything else runs as given, e.g. bash

examples:
  docker run --rm --ipc=host --ulimit memlock=-1 --gpus all IMAGE smoke
  apptainer run llmtrain.sif llmtrain validate configs/lora.yaml
EOF
}

# Apptainer and Pyxis run as the calling user, docker --user leaves HOME=/: every cache
# (HF_HOME, torch extensions, triton, matplotlib) defaults under HOME, so it must be writable.
ensure_writable_home() {
    if [[ -z "${HOME:-}" || ! -d "$HOME" || ! -w "$HOME" ]]; then
        HOME="${TMPDIR:-/tmp}/llmtrain-home-$(id -u)"
        export HOME
        mkdir -p "$HOME"
        echo "entrypoint: HOME was not writable; using $HOME" >&2
    fi
}

check() {
    python3 -m llmtrain.image_check imports
    python3 "$root/build/image_packages.py" pip-check
    llmtrain env >/dev/null
    echo "check: llmtrain env ok"
}

smoke() {
    local dir="${SMOKE_DIR:-}"
    if [[ -z "$dir" ]]; then
        if [[ "$PWD" != / && -w "$PWD" ]]; then
            dir="$PWD/llmtrain-smoke"
        else
            dir="$(mktemp -d "${TMPDIR:-/tmp}/llmtrain-smoke.XXXXXX")"
        fi
    fi
    echo "smoke: llmtrain finetune $root/configs/demo.yaml output.dir=$dir $*" >&2
    llmtrain finetune "$root/configs/demo.yaml" "output.dir=$dir" "$@"
    python3 -m llmtrain.image_check smoke "$dir"
}

if [[ $# -eq 0 ]]; then
    usage
    exit 0
fi
ensure_writable_home
case "$1" in
    -h | --help | help) usage ;;
    smoke) shift && smoke "$@" ;;
    check) shift && check "$@" ;;
    launch) shift && exec "$here/launch.sh" "$@" ;;
    *) exec "$@" ;;
esac
