# shellcheck shell=bash disable=SC2034  # constants used by the scripts that source this
# Names and helpers shared by up.sh and down.sh: a test cluster of network namespaces on one
# private /24 that exists only on a bridge these scripts create. Sourced, not executed.

CLUSTER_DIR="${LLMTRAIN_CLUSTER_DIR:-${TMPDIR:-/tmp}/llmtrain-cluster}"
NS_PREFIX="llmt-"
BRIDGE="llmt-br0"
SUBNET="10.213.7"
BRIDGE_ADDR="$SUBNET.1"
CTL_NAME="ctl"
CTL_ADDR="$SUBNET.2"
# Not eth0 on purpose: the launcher must find the interface without being told.
NODE_IFACE="eno1"

node_name() { printf 'node%d\n' "$1"; }
node_addr() { printf '%s.%d\n' "$SUBNET" "$((10 + $1))"; }

log() { printf 'cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Run a command inside a member's network, UTS and mount namespaces (held by its holder
# process). nsenter, not `ip netns exec`, which remounts /sys and hides cgroups from slurmd.
in_member() {
  local name="$1"; shift
  nsenter --target "$(cat "$CLUSTER_DIR/holder.$name.pid")" --net --uts --mount -- "$@"
}
