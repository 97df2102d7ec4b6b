#!/usr/bin/env bash
# Tear down what up.sh made, also after a crash: every process inside the cluster's network
# namespaces (daemons, holders, job steps), the private munged, the namespaces and the
# bridge. Logs stay in the cluster directory for a post-mortem; up.sh wipes them.
#
# usage: down.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/cluster/lib.sh
source "$here/lib.sh"

if [[ $# -ne 0 ]]; then echo "usage: down.sh" >&2; exit 64; fi
[[ $EUID -eq 0 ]] || die "needs root"

# Processes are found by namespace membership (ip netns pids), so a lost state directory
# still leaves nothing behind; each is ended by its id.
mapfile -t spaces < <(ip netns list | awk -v p="$NS_PREFIX" 'index($1, p) == 1 {print $1}')
pids=()
for ns in "${spaces[@]}"; do mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns"); done
if [[ -s "$CLUSTER_DIR/munge/munged.pid" ]]; then pids+=("$(cat "$CLUSTER_DIR/munge/munged.pid")"); fi
if ((${#pids[@]})); then
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    ((${#alive[@]})) || break
    sleep 0.1
  done
  if ((${#alive[@]})); then kill -KILL "${alive[@]}" 2>/dev/null || true; fi
fi
# The kernel frees a namespace, and the veth inside it, some time after its last process
# leaves; delete the host ends now so an immediate up.sh can reuse the names.
mapfile -t veths < <(ip -o link show | awk -F': ' -v p="${NS_PREFIX}v-" 'index($2, p) == 1 {sub("@.*", "", $2); print $2}')
for veth in "${veths[@]}"; do ip link del "$veth" 2>/dev/null || true; done
for ns in "${spaces[@]}"; do ip netns del "$ns"; done
if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
rm -f "$CLUSTER_DIR"/*.pid "$CLUSTER_DIR"/munge/munged.pid
log "down (${#spaces[@]} namespaces, ${#pids[@]} processes)"
