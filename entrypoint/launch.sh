#!/usr/bin/env bash
# Once per node, inside the container (or the venv): work out this node's rank, its process
# count and the interface that reaches the head, then run torchrun (static rendezvous) or
# accelerate launch running `llmtrain finetune`. Started by entrypoint/job.sh through srun or
# mpirun; inside the image it is /opt/llmtrain/entrypoint/launch.sh.
#
# usage: launch.sh CONFIG [key=value ...]
#
# Reads (job.sh sets them): MASTER_ADDR, MASTER_PORT, NNODES; optional: NPROC_PER_NODE,
# LAUNCHER (torchrun | accelerate), ACCELERATE_CONFIG, TRAIN_SCRIPT, NODE_RANK (when no
# scheduler variable gives the rank), NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (kept if set),
# PREFLIGHT=1 (run `llmtrain doctor` the same way first; its failure stops the job),
# RUN_DIR (where each node records its exit code for job.sh).
set -euo pipefail

SCRIPT=launch.sh
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The rank comes from the task's own environment: expanded in the batch shell it would be 0
# on every node. One task per node, so a task rank is a node rank.
node_rank() {
  local name
  for name in SLURM_NODEID OMPI_COMM_WORLD_RANK PMI_RANK PBS_VNODENUM NODE_RANK; do
    if [[ -n ${!name:-} ]]; then
      [[ ${!name} =~ ^[0-9]+$ ]] || die "$name=${!name} is not a node rank"
      printf '%s\n' "${!name}"
      return
    fi
  done
  ((NNODES == 1)) || die "no node rank: none of SLURM_NODEID, OMPI_COMM_WORLD_RANK, PMI_RANK, PBS_VNODENUM, NODE_RANK is set; start one task per node with srun or mpirun"
  echo 0
}

gpu_count() {
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != NoDevFiles ]]; then
    local ids
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}

# Sets the global array `cmd`: the launcher with static rendezvous for this node, run by
# llmtrain.launch, which exits with the first failed worker's code (torchrun and accelerate
# exit 1 for any failure, hiding 64/65/75 from job.sh's contract). LAUNCHER is checked.
launcher_cmd() {
  local launcher="$1" rank="$2" nproc="$3" port="$4"
  case "$launcher" in
    torchrun)
      cmd=(torchrun --nnodes="$NNODES" --node-rank="$rank" --nproc-per-node="$nproc"
        --master-addr="$MASTER_ADDR" --master-port="$port")
      ;;
    accelerate)
      cmd=(accelerate --num_machines="$NNODES" --machine_rank="$rank"
        --main_process_ip="$MASTER_ADDR" --main_process_port="$port"
        --num_processes="$((NNODES * nproc))")
      if [[ -n ${ACCELERATE_CONFIG:-} ]]; then
        cmd+=(--config_file="$ACCELERATE_CONFIG")
      elif ((NNODES * nproc > 1)); then
        cmd+=(--multi_gpu)
      fi
      # Keep DeepSpeed on torch's launcher: its pdsh runner ssh-es outside the container.
      ((NNODES == 1)) || cmd+=(--deepspeed_multinode_launcher=standard)
      ;;
  esac
}

# For job.sh: after --kill-on-bad-exit, srun reports the highest code, the SIGTERM of the
# nodes it killed (143), not the cause. Nodes that ended on their own say it here.
record_exit() {
  if [[ -n ${RUN_DIR:-} ]]; then
    mkdir -p "$RUN_DIR/.exit-codes"
    echo "$2" >"$RUN_DIR/.exit-codes/node$1"
  fi
}

main() {
  (($# >= 1)) || { echo "usage: launch.sh CONFIG [key=value ...]" >&2; exit "$EX_USAGE"; }
  local name
  for name in MASTER_ADDR MASTER_PORT NNODES; do
    [[ -n ${!name:-} ]] || die "$name is not set: start this through entrypoint/job.sh (sbatch or qsub)"
  done
  local rank gpus nproc iface addr
  rank="$(node_rank)"
  ((rank < NNODES)) || die "node rank $rank is not below NNODES=$NNODES"
  gpus="$(gpu_count)"
  if [[ -n ${NPROC_PER_NODE:-} ]]; then
    nproc="$NPROC_PER_NODE"
  elif ((gpus > 0)); then
    nproc="$gpus"
  else
    nproc="$(nproc)"  # CPU processes with gloo
  fi
  [[ $nproc =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$nproc is not a positive number"

  iface="$(iface_to "$MASTER_ADDR")"
  [[ -n $iface ]] || die "no route from $(hostname) to the head address $MASTER_ADDR"
  addr="$(iface_ipv4 "$iface")"
  # Catch the classic hang early: rank 0 must be the head, and no other node may be.
  if ((rank == 0)) && [[ $addr != "$MASTER_ADDR" ]]; then
    die "node rank 0 but this node ($addr) is not the head $MASTER_ADDR: was the rank expanded in the batch shell?"
  fi
  if ((rank != 0)) && [[ $addr == "$MASTER_ADDR" ]]; then
    die "node rank $rank runs on the head $MASTER_ADDR: two nodes would claim the head"
  fi
  : "${NCCL_SOCKET_IFNAME:=$iface}" "${GLOO_SOCKET_IFNAME:=$iface}"
  : "${HF_HUB_OFFLINE:=1}" "${TRANSFORMERS_OFFLINE:=1}" "${HF_DATASETS_OFFLINE:=1}"
  : "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
  export NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME HF_HUB_OFFLINE TRANSFORMERS_OFFLINE \
    HF_DATASETS_OFFLINE TORCH_NCCL_ASYNC_ERROR_HANDLING

  local launcher="${LAUNCHER:-torchrun}" cmd=()
  check_launcher "$launcher"
  echo "launch: node_rank=$rank nnodes=$NNODES host=$(hostname) addr=$addr iface=$NCCL_SOCKET_IFNAME nproc=$nproc gpus=$gpus head=$MASTER_ADDR:$MASTER_PORT launcher=$launcher"

  local program=(-m llmtrain.cli finetune)
  [[ -z ${TRAIN_SCRIPT:-} ]] || program=("$TRAIN_SCRIPT")
  local rc=0
  if [[ ${PREFLIGHT:-0} == 1 ]]; then
    # The doctor runs as training will (same launcher, every node, every GPU), on the next
    # port so the training rendezvous never meets a socket still closing.
    launcher_cmd "$launcher" "$rank" "$nproc" "$((MASTER_PORT + 1))"
    python3 -m llmtrain.launch "${cmd[@]}" -m llmtrain.cli doctor "$@" || rc=$?
    if ((rc != 0)); then
      say "preflight (llmtrain doctor) failed on $(hostname) with exit $rc: not training"
      record_exit "$rank" "$rc"
      exit "$rc"
    fi
  fi
  launcher_cmd "$launcher" "$rank" "$nproc" "$MASTER_PORT"
  python3 -m llmtrain.launch "${cmd[@]}" "${program[@]}" "$@" || rc=$?
  record_exit "$rank" "$rc"
  exit "$rc"
}

main "$@"
