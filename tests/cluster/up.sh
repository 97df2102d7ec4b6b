#!/usr/bin/env bash
# Bring up a real Slurm 22.05 cluster of N nodes on this machine, for the launcher tests:
# one network namespace per node (interface eno1 on a private bridge), each with its own
# hostname and /etc/hosts (like DNS on a real cluster), one slurmd and one sshd per node,
# slurmctld in a namespace of its own, and a private munged. Stale state from an earlier
# crashed run is torn down first. Needs root.
#
# usage: up.sh NODES        (then: source "$LLMTRAIN_CLUSTER_DIR/env.sh"; down.sh to stop)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/cluster/lib.sh
source "$here/lib.sh"

if [[ $# -ne 1 || ! "$1" =~ ^[1-9][0-9]?$ ]]; then
  echo "usage: up.sh NODES   (1..99 slurmd nodes in network namespaces)" >&2
  exit 64
fi
nodes="$1"
[[ $EUID -eq 0 ]] || die "needs root (network namespaces, slurmd, sshd)"
for tool in slurmctld slurmd munged mungekey sshd ssh-keygen ip nsenter unshare sinfo; do
  command -v "$tool" >/dev/null || die "missing $tool: apt-get install slurm-wlm munge openssh-server openssh-client iproute2"
done

"$here/down.sh"
rm -rf "$CLUSTER_DIR"
mkdir -p "$CLUSTER_DIR"/{log,munge,ctld,slurmd,ssh}
chmod 0700 "$CLUSTER_DIR/ssh"

members=("$CTL_NAME")
for ((i = 1; i <= nodes; i++)); do members+=("$(node_name "$i")"); done

# Network: a bridge in the root namespace (address .1, so sbatch here reaches slurmctld) and
# one veth per member whose inner end is eno1. No default route: nothing leaves the /24.
ip link add "$BRIDGE" type bridge
ip addr add "$BRIDGE_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
hosts_common="$CLUSTER_DIR/hosts"
{
  printf '127.0.0.1\tlocalhost\n'
  printf '%s\t%s\n' "$CTL_ADDR" "$CTL_NAME"
  for ((i = 1; i <= nodes; i++)); do printf '%s\t%s\n' "$(node_addr "$i")" "$(node_name "$i")"; done
} >"$hosts_common"

for name in "${members[@]}"; do
  if [[ $name == "$CTL_NAME" ]]; then addr="$CTL_ADDR"; else addr="$(node_addr "${name#node}")"; fi
  ns="$NS_PREFIX$name"
  ip netns add "$ns"
  ip link add "${NS_PREFIX}v-$name" type veth peer name "$NODE_IFACE" netns "$ns"
  ip link set "${NS_PREFIX}v-$name" master "$BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$addr/24" dev "$NODE_IFACE"
  ip -n "$ns" link set "$NODE_IFACE" up
  # Each member's own copy, rewritten in place by tests (the bind mount pins the inode).
  cp "$hosts_common" "$CLUSTER_DIR/hosts.$name"
  # The holder owns the member's UTS and mount namespaces; daemons join them with nsenter.
  # shellcheck disable=SC2016  # $1 and $2 expand in the inner shell
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
    sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec sleep infinity' \
    sh "$name" "$CLUSTER_DIR/hosts.$name" </dev/null >/dev/null 2>&1 &
  echo "$!" >"$CLUSTER_DIR/holder.$name.pid"
done
for name in "${members[@]}"; do
  for _ in $(seq 50); do [[ "$(in_member "$name" hostname 2>/dev/null)" == "$name" ]] && break; sleep 0.1; done
  [[ "$(in_member "$name" hostname)" == "$name" ]] || die "namespace holder for $name did not start"
done
log "network $SUBNET.0/24 on $BRIDGE: ${members[*]}"

# A private munged with its own key and socket, so a system munge is never touched.
mungekey --create --keyfile="$CLUSTER_DIR/munge/munge.key"
munged --socket="$CLUSTER_DIR/munge/munge.sock" --key-file="$CLUSTER_DIR/munge/munge.key" \
  --pid-file="$CLUSTER_DIR/munge/munged.pid" --log-file="$CLUSTER_DIR/log/munged.log" \
  --seed-file="$CLUSTER_DIR/munge/munged.seed" </dev/null

conf="$CLUSTER_DIR/slurm.conf"
cat >"$conf" <<CONF
ClusterName=llmtest
SlurmctldHost=$CTL_NAME($CTL_ADDR)
AuthType=auth/munge
CredType=cred/munge
# cred_expire: slurmctld holds a requeued job back this long (default 120 s) so slurmd has
# forgotten the revoked credential of the last attempt; short, for the requeue tests.
AuthInfo=socket=$CLUSTER_DIR/munge/munge.sock,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$CLUSTER_DIR/ctld
SlurmdSpoolDir=$CLUSTER_DIR/slurmd/%n
SlurmctldPidFile=$CLUSTER_DIR/slurmctld.pid
SlurmdPidFile=$CLUSTER_DIR/slurmd.%n.pid
SlurmctldLogFile=$CLUSTER_DIR/log/slurmctld.log
SlurmdLogFile=$CLUSTER_DIR/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups inside namespaces: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
KillWait=5
MinJobAge=600
NodeName=DEFAULT CPUs=2 RealMemory=2000 State=UNKNOWN
CONF
for ((i = 1; i <= nodes; i++)); do
  printf 'NodeName=%s NodeAddr=%s\n' "$(node_name "$i")" "$(node_addr "$i")" >>"$conf"
done
printf 'PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n' >>"$conf"

SLURM_CONF="$conf" in_member "$CTL_NAME" slurmctld -i </dev/null >>"$CLUSTER_DIR/log/slurmctld.out" 2>&1
for ((i = 1; i <= nodes; i++)); do
  name="$(node_name "$i")"
  SLURM_CONF="$conf" in_member "$name" slurmd -N "$name" </dev/null >>"$CLUSTER_DIR/log/slurmd.$name.out" 2>&1
done

# sshd in every node for the PBS test (mpirun launches its daemons over ssh), key-only root
# login with a key made here.
ssh-keygen -q -t ed25519 -N '' -f "$CLUSTER_DIR/ssh/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$CLUSTER_DIR/ssh/id_ed25519"
cp "$CLUSTER_DIR/ssh/id_ed25519.pub" "$CLUSTER_DIR/ssh/authorized_keys"
cat >"$CLUSTER_DIR/ssh/config" <<CONF
Host *
  User root
  IdentityFile $CLUSTER_DIR/ssh/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  BatchMode yes
  LogLevel ERROR
CONF
mkdir -p /run/sshd  # sshd's privilege-separation directory (systemd makes it on a real host)
for ((i = 1; i <= nodes; i++)); do
  name="$(node_name "$i")"
  cat >"$CLUSTER_DIR/ssh/sshd_config.$name" <<CONF
ListenAddress $(node_addr "$i")
HostKey $CLUSTER_DIR/ssh/host_key
PidFile $CLUSTER_DIR/ssh/sshd.$name.pid
AuthorizedKeysFile $CLUSTER_DIR/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
CONF
  in_member "$name" /usr/sbin/sshd -f "$CLUSTER_DIR/ssh/sshd_config.$name" \
    -E "$CLUSTER_DIR/log/sshd.$name.log" </dev/null
done

cat >"$CLUSTER_DIR/env.sh" <<ENV
export SLURM_CONF=$conf
export LLMTRAIN_CLUSTER_DIR=$CLUSTER_DIR
export LLMTRAIN_CLUSTER_NODES=$nodes
ENV

export SLURM_CONF="$conf"
for _ in $(seq 120); do
  idle="$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)"
  [[ "$idle" -eq "$nodes" ]] && break
  sleep 0.5
done
if [[ "$idle" -ne "$nodes" ]]; then
  sinfo -N >&2 || true
  die "only $idle of $nodes nodes became idle; logs in $CLUSTER_DIR/log"
fi
log "slurm up: $nodes nodes idle; source $CLUSTER_DIR/env.sh"
