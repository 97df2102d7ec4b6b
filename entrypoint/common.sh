# shellcheck shell=bash
# Sourced by entrypoint/job.sh (host side, once per job) and entrypoint/launch.sh (container
# side, once per node): messages, the launcher check, and interface lookups. The caller sets
# SCRIPT to its name before sourcing; nothing here runs on its own.

EX_USAGE=64  # bad usage or config: never requeued (src/llmtrain/errors.py)

say() { printf '%s: %s\n' "${SCRIPT:-llmtrain}" "$*" >&2; }
die() { say "error on $(hostname): $*"; exit "$EX_USAGE"; }

# The launchers launch.sh knows; job.sh checks before anything starts, launch.sh once per node.
check_launcher() {
  [[ $1 == torchrun || $1 == accelerate ]] || die "LAUNCHER=$1 is unknown: use torchrun or accelerate"
}

# The first IPv4 address of interface $1, empty if it has none.
iface_ipv4() {
  ip -o -4 addr show dev "$1" 2>/dev/null | awk '{sub("/.*", "", $4); print $4; exit}'
}

# This node's interface toward address $1. On the head node the route to its own address is
# "local ... dev lo", useless to the peers, so the interface holding the address is taken.
iface_to() {
  local addr="$1" dev
  dev="$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')"
  if [[ $dev == lo ]]; then
    dev="$(ip -o -4 addr show | awk -v a="$addr" 'index($4, a "/") == 1 {print $2; exit}')"
  fi
  printf '%s\n' "$dev"
}
