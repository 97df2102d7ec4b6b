#!/usr/bin/env bash
# Host-side launch logic, once per job, in the batch shell: every slurm/*.sbatch and
# pbs/*.pbs holds only its resources and execs this. It finds the head node and its address,
# checks the request, validates the config once, starts entrypoint/launch.sh once per node
# (srun, or mpirun under PBS) inside the runtime, and applies the exit-code contract.
#
# usage: job.sh slurm|pbs [CONFIG] [key=value ...]
#   CONFIG and the overrides may also come from the environment as CONFIG and OVERRIDES
#   (space-separated), since qsub cannot pass arguments to a job script.
#
# Knobs (environment variables; [default]):
#   IMAGE           absolute path of the image: .sqsh (Pyxis/Enroot) or .sif (Apptainer)
#   RUNTIME         pyxis | apptainer | none   [from IMAGE's suffix; none = a venv, VENV]
#   VENV            virtual environment used when RUNTIME=none   [$LLMTRAIN_HOME/.venv]
#   LAUNCHER        torchrun | accelerate   [torchrun]
#   ACCELERATE_CONFIG  accelerate config file (e.g. a DeepSpeed one) for LAUNCHER=accelerate
#   MOUNTS          extra mounts, comma-separated SRC[:DST] with absolute paths (data, models)
#   HF_HOME         Hugging Face cache, mounted and read offline   [$HOME/.cache/huggingface]
#   RUN_DIR         run directory: the training output.dir and the STOP file
#                   [an output.dir=... override, else $SUBMIT_DIR/runs/<job name>-<job id>]
#   HEAD_ADDR       address of the head node   [its name resolved on the head node]
#   HEAD_IFACE      take the head address from this interface of the head node (e.g. ib0)
#   MASTER_PORT     rendezvous port   [20000 + job number modulo 20000; for ids that are not
#                   a plain number (PBS array jobs 1234[5].server): 20000 + cksum of the id
#                   modulo 20000]
#   NPROC_PER_NODE  processes per node   [GPUs of the node; CPUs when it has none]
#   PREFLIGHT       1: run `llmtrain doctor` on every node first (GPUs, NCCL bandwidth and
#                   transport, /dev/shm, output dir, offline cache); its failure stops the job
#   MAX_RESTARTS    Slurm requeues after failures other than 64, 65 and 75   [3]
#   WALLTIME        PBS: the job's wall time, HH:MM:SS or seconds   [qstat -f]
#   TRAIN_SCRIPT    a Python script run instead of `llmtrain finetune` (smoke tests), with
#                   CONFIG and the overrides as its arguments; skips `llmtrain validate`
#   LLMTRAIN_HOME   this repository's checkout   [set by the job scripts]
# Exit codes: 0 done; 64 bad usage or config and 65 bad data, never requeued; 75 stopped
# before the wall time, requeued; anything else requeued while restarts < MAX_RESTARTS.
set -euo pipefail

SCRIPT=job.sh
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

EX_STOPPED=75
# Where the image keeps this repository's entrypoint/ (see Dockerfile).
IMAGE_LAUNCH=/opt/llmtrain/entrypoint/launch.sh

usage() {
  echo "usage: job.sh slurm|pbs [CONFIG] [key=value ...]" >&2
  exit "$EX_USAGE"
}

# An absolute path for PATH, relative ones taken from the submit directory.
absolute() { if [[ $1 == /* ]]; then printf '%s\n' "$1"; else printf '%s/%s\n' "$SUBMIT_DIR" "$1"; fi; }

scheduler_facts() {
  case "$SCHEDULER" in
    slurm)
      [[ -n ${SLURM_JOB_ID:-} ]] || die "SLURM_JOB_ID is not set: submit with sbatch, not bash"
      JOB_ID="$SLURM_JOB_ID"
      JOB_NAME="${SLURM_JOB_NAME:-llmtrain}"
      SUBMIT_DIR="${SLURM_SUBMIT_DIR:-$PWD}"
      NNODES="$SLURM_JOB_NUM_NODES"
      # head -n1: the first host of the allocation, where this batch shell runs.
      HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
      ;;
    pbs)
      [[ -n ${PBS_JOBID:-} && -r ${PBS_NODEFILE:-} ]] ||
        die "PBS_JOBID and a readable PBS_NODEFILE are needed: submit with qsub"
      JOB_ID="$PBS_JOBID"
      JOB_NAME="${PBS_JOBNAME:-llmtrain}"
      SUBMIT_DIR="${PBS_O_WORKDIR:-$PWD}"
      # The node file repeats a host once per MPI slot: keep the first of each, in order.
      mapfile -t PBS_HOSTS < <(awk 'NF && !seen[$1]++ {print $1}' "$PBS_NODEFILE")
      NNODES="${#PBS_HOSTS[@]}"
      HEAD_NODE="${PBS_HOSTS[0]:-}"
      ;;
  esac
  [[ -n $HEAD_NODE ]] || die "the scheduler listed no hosts for job $JOB_ID"
}

parse_arguments() {
  local args=("$@")
  if ((${#args[@]} == 0)); then
    [[ -z ${CONFIG:-} ]] || args+=("$CONFIG")
    # shellcheck disable=SC2206  # OVERRIDES is a space-separated list by contract
    [[ -z ${OVERRIDES:-} ]] || args+=(${OVERRIDES})
  fi
  CONFIG_PATH="$LLMTRAIN_HOME/configs/lora.yaml"
  if ((${#args[@]})) && [[ ${args[0]} != *=* ]]; then
    CONFIG_PATH="$(absolute "${args[0]}")"
    args=("${args[@]:1}")
  fi
  TRAIN_ARGS=()
  local arg
  for arg in "${args[@]}"; do
    [[ $arg == ?*=* ]] || die "'$arg' is not a key=value override (usage: job.sh slurm|pbs [CONFIG] [key=value ...])"
    if [[ $arg == output.dir=* ]]; then RUN_DIR="$(absolute "${arg#output.dir=}")"; else TRAIN_ARGS+=("$arg"); fi
  done
  [[ -f $CONFIG_PATH ]] || die "config file $CONFIG_PATH does not exist: pass an existing YAML, e.g. configs/lora.yaml"
}

choose_runtime() {
  if [[ -z ${RUNTIME:-} ]]; then
    case "${IMAGE:-}" in
      *.sqsh) RUNTIME=pyxis ;;
      *.sif) RUNTIME=apptainer ;;
      "") die "IMAGE is not set: submit with IMAGE=/absolute/path/llmtrain.sqsh (Pyxis) or .sif (Apptainer), or RUNTIME=none to use the virtual environment VENV" ;;
      *) die "IMAGE=$IMAGE is neither a .sqsh nor a .sif: set RUNTIME=pyxis or RUNTIME=apptainer" ;;
    esac
  fi
  case "$RUNTIME" in
    pyxis | apptainer)
      [[ -n ${IMAGE:-} ]] || die "RUNTIME=$RUNTIME needs IMAGE=/absolute/path of the image"
      # Pyxis takes a relative .sqsh path for a registry image name: insist on absolute.
      [[ $IMAGE == /* ]] || die "IMAGE=$IMAGE is relative: give an absolute path, e.g. IMAGE=$SUBMIT_DIR/$IMAGE"
      [[ -f $IMAGE ]] || die "IMAGE=$IMAGE does not exist on $(hostname): build it with make sqsh or make sif"
      ;;
    none)
      : "${VENV:=$LLMTRAIN_HOME/.venv}"
      [[ -x $VENV/bin/python3 ]] || die "RUNTIME=none needs a virtual environment: $VENV/bin/python3 is missing (set VENV)"
      ;;
    *) die "RUNTIME=$RUNTIME is unknown: use pyxis, apptainer or none" ;;
  esac
  if [[ $RUNTIME == pyxis && $SCHEDULER != slurm ]]; then die "RUNTIME=pyxis works only under Slurm: use a .sif with Apptainer"; fi
  if [[ $RUNTIME == pyxis ]] && ! srun --help 2>&1 | grep -q -- '--container-image'; then
    die "srun has no --container-image (Pyxis is not installed here): use a .sif image with Apptainer"
  fi
}

# The head node's IPv4 address as the other nodes will dial it. A name that resolves to
# 127.* (Debian's /etc/hosts maps a host's own name to 127.0.1.1) would leave every other
# node waiting forever, so it is refused here, before anything starts.
head_address() {
  if [[ -z ${HEAD_ADDR:-} && -n ${HEAD_IFACE:-} ]]; then
    HEAD_ADDR="$(iface_ipv4 "$HEAD_IFACE")"
    [[ -n $HEAD_ADDR ]] || die "HEAD_IFACE=$HEAD_IFACE has no IPv4 address on $(hostname): list them with ip -4 addr"
  fi
  if [[ -z ${HEAD_ADDR:-} ]]; then
    HEAD_ADDR="$(getent ahostsv4 "$HEAD_NODE" | awk '{print $1; exit}')" || true
  fi
  local fix="set HEAD_IFACE=<interface the nodes share, e.g. ib0 or eno1> or HEAD_ADDR=<its IPv4 address> before submitting"
  [[ -n $HEAD_ADDR ]] || die "head node $HEAD_NODE has no IPv4 address (getent ahostsv4 $HEAD_NODE is empty): $fix"
  [[ $HEAD_ADDR != 127.* ]] || die "head node $HEAD_NODE resolves to the loopback address $HEAD_ADDR, which other nodes cannot reach: $fix"
}

walltime_seconds() {
  local wall="${WALLTIME:-}"
  if [[ -z $wall ]] && command -v qstat >/dev/null; then
    wall="$(qstat -f "$JOB_ID" 2>/dev/null | awk -F' = ' '$1 ~ /Resource_List\.walltime$/ {print $2; exit}')"
  fi
  [[ -n $wall ]] || return 0
  local h m s
  if [[ $wall =~ ^[0-9]+$ ]]; then printf '%s\n' "$wall"; return; fi
  [[ $wall =~ ^([0-9]+):([0-9]{2}):([0-9]{2})$ ]] || die "WALLTIME=$wall is not HH:MM:SS or seconds"
  h="${BASH_REMATCH[1]}" m="${BASH_REMATCH[2]}" s="${BASH_REMATCH[3]}"
  printf '%s\n' "$((10#$h * 3600 + 10#$m * 60 + 10#$s))"
}

# The rendezvous port for job id $1, in 20000-39999. A plain job number (Slurm's 4242, PBS's
# 77.server) gives 20000 + number mod 20000, so consecutive jobs on one head node differ; any
# other id (a PBS array element 1234[5].server, letters) gives 20000 + its CRC (cksum) mod
# 20000, never shell arithmetic on the id's text.
job_port() {
  local id="$1" number crc
  if [[ $id =~ ^([0-9]+)(\..*)?$ ]]; then
    number="${BASH_REMATCH[1]}"
    # mod 20000 needs only the last five digits (100000 is a multiple of 20000), which also
    # keeps a long id from overflowing; 10#: a leading zero is not octal.
    ((${#number} <= 5)) || number="${number: -5}"
    printf '%s\n' "$((20000 + 10#$number % 20000))"
  else
    crc="$(printf '%s' "$id" | cksum)"
    printf '%s\n' "$((20000 + ${crc%% *} % 20000))"
  fi
}

# Variables launch.sh reads; exported here and handed to every runtime explicitly, because
# under Pyxis and Apptainer an image's ENV beats the host's environment.
task_environment() {
  export MASTER_ADDR="$HEAD_ADDR"
  if [[ -z ${MASTER_PORT:-} ]]; then
    MASTER_PORT="$(job_port "$JOB_ID")"
  elif ! [[ $MASTER_PORT =~ ^[0-9]{1,5}$ ]] || ((10#$MASTER_PORT < 1 || 10#$MASTER_PORT > 65535)); then
    die "MASTER_PORT=$MASTER_PORT is not a port number (1-65535): unset it to derive one from job id $JOB_ID"
  fi
  export MASTER_PORT
  export NNODES LAUNCHER HF_HOME RUN_DIR
  export LLMTRAIN_STOP_FILE="$RUN_DIR/STOP"
  TASK_VARS=(MASTER_ADDR MASTER_PORT NNODES LAUNCHER HF_HOME RUN_DIR LLMTRAIN_STOP_FILE)
  local name
  for name in NPROC_PER_NODE ACCELERATE_CONFIG TRAIN_SCRIPT LLMTRAIN_DEADLINE PREFLIGHT \
    NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_DEBUG; do
    if [[ -n ${!name:-} ]]; then
      export "${name?}"
      TASK_VARS+=("$name")
    fi
  done
  if [[ $RUNTIME == none ]]; then
    export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
    TASK_VARS+=(VIRTUAL_ENV PATH)
  fi
}

# Host directories the run needs, mounted at the same path inside the container.
mount_list() {
  local mounts=("$RUN_DIR" "$HF_HOME" "$(dirname "$CONFIG_PATH")") extra mount
  [[ -z ${TRAIN_SCRIPT:-} ]] || mounts+=("$(dirname "$TRAIN_SCRIPT")")
  [[ -z ${ACCELERATE_CONFIG:-} ]] || mounts+=("$(dirname "$ACCELERATE_CONFIG")")
  IFS=, read -r -a extra <<<"${MOUNTS:-}"
  for mount in "${extra[@]}"; do
    [[ $mount == /* ]] || die "MOUNTS entry '$mount' is relative: use absolute SRC[:DST] paths"
    mounts+=("$mount")
  done
  local -A seen=()
  local out=()
  for mount in "${mounts[@]}"; do
    [[ $mount == *:* ]] || mount="$mount:$mount"
    [[ -z ${seen[$mount]:-} ]] || continue
    seen[$mount]=1
    out+=("$mount")
  done
  (IFS=,; printf '%s\n' "${out[*]}")
}

# RUNNER: the words that put a command inside the runtime on a node (srun flags for
# Pyxis, an apptainer prefix, nothing for a venv); LAUNCH: launch.sh's path there.
runtime_wrapper() {
  SRUN_CONTAINER=()
  RUNNER=()
  LAUNCH="$IMAGE_LAUNCH"
  local mounts
  mounts="$(mount_list)"
  case "$RUNTIME" in
    pyxis)
      SRUN_CONTAINER=(--container-image="$IMAGE" --container-mounts="$mounts"
        --no-container-mount-home "--container-env=$(IFS=,; echo "${TASK_VARS[*]}")")
      ;;
    apptainer)
      RUNNER=(apptainer exec --nv --bind "$mounts" --env PYTHONNOUSERSITE=1)
      local name
      for name in "${TASK_VARS[@]}"; do RUNNER+=(--env "$name=${!name}"); done
      RUNNER+=("$IMAGE")
      ;;
    none) LAUNCH="$LLMTRAIN_HOME/entrypoint/launch.sh" ;;
  esac
}

# Run one command on the head node inside the runtime (the validation step).
on_head() {
  if [[ $SCHEDULER == slurm ]]; then
    srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 "${SRUN_CONTAINER[@]}" "${RUNNER[@]}" "$@"
  else
    "${RUNNER[@]}" "$@"
  fi
}

# One task per node; node ranks are read inside each task by launch.sh, never here.
on_every_node() {
  if [[ $SCHEDULER == slurm ]]; then
    local cpus=()
    # Slurm 22.05's srun ignores SLURM_CPUS_PER_TASK: pass the job's value on.
    [[ -z ${SLURM_CPUS_PER_TASK:-} ]] || cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
      "${cpus[@]}" "${SRUN_CONTAINER[@]}" "${RUNNER[@]}" "$@"
  else
    local exports=() name
    for name in "${TASK_VARS[@]}"; do exports+=(-x "$name"); done
    # --bind-to none: the default core binding would squeeze all of a node's workers onto one.
    mpirun -np "$NNODES" --host "$(IFS=,; echo "${PBS_HOSTS[*]}")" --map-by ppr:1:node \
      --bind-to none "${exports[@]}" "${RUNNER[@]}" "$@"
  fi
}

# The exit code of the node that failed first, from launch.sh's records (none when every
# node was killed, e.g. at the time limit).
first_failure() {
  local _time name code
  while read -r _time name; do
    code="$(cat "$RUN_DIR/.exit-codes/$name")"
    if [[ $code != 0 ]]; then
      printf '%s\n' "$code"
      return
    fi
  done < <(find "$RUN_DIR/.exit-codes" -type f -printf '%T@ %f\n' 2>/dev/null | sort -n)
}

# shellcheck disable=SC2317  # invoked by the USR1 trap
on_wall_time_warning() {
  say "wall-time warning: asking training to checkpoint and stop ($LLMTRAIN_STOP_FILE)"
  touch "$LLMTRAIN_STOP_FILE"
  INTERRUPTED=1
}

# The exit-code contract: requeue (Slurm) or say how to resume (PBS), then exit with rc.
finish() {
  local rc="$1"
  case "$rc" in
    0) say "finished: outputs in $RUN_DIR" ;;
    64 | 65) say "exit $rc: bad config or data; not requeued (fix it and submit again)" ;;
    "$EX_STOPPED")
      if [[ $SCHEDULER == slurm ]]; then
        say "exit 75: stopped on purpose; requeueing job $JOB_ID to resume"
        scontrol requeue "$JOB_ID" || say "scontrol requeue failed: submit again to resume"
      else
        say "exit 75: stopped before the wall time; PBS cannot requeue, submit again to resume"
      fi
      ;;
    *)
      if [[ $SCHEDULER == slurm && ${SLURM_RESTART_COUNT:-0} -lt ${MAX_RESTARTS:-3} ]]; then
        say "exit $rc: failed; requeueing (restart $((${SLURM_RESTART_COUNT:-0} + 1)) of ${MAX_RESTARTS:-3})"
        scontrol requeue "$JOB_ID" || say "scontrol requeue failed"
      else
        say "exit $rc: failed; not requeued (restarts: ${SLURM_RESTART_COUNT:-0}, MAX_RESTARTS=${MAX_RESTARTS:-3})"
      fi
      ;;
  esac
  exit "$rc"
}

main() {
  (($# >= 1)) || usage
  SCHEDULER="$1"
  shift
  [[ $SCHEDULER == slurm || $SCHEDULER == pbs ]] || usage
  : "${LLMTRAIN_HOME:?LLMTRAIN_HOME must point at the llmtrain checkout (the job scripts set it)}"
  local started
  started="$(date +%s)"
  scheduler_facts
  parse_arguments "$@"
  choose_runtime
  : "${LAUNCHER:=torchrun}"
  check_launcher "$LAUNCHER"
  [[ -z ${ACCELERATE_CONFIG:-} ]] || ACCELERATE_CONFIG="$(absolute "$ACCELERATE_CONFIG")"
  [[ -z ${TRAIN_SCRIPT:-} ]] || TRAIN_SCRIPT="$(absolute "$TRAIN_SCRIPT")"
  : "${HF_HOME:=$HOME/.cache/huggingface}"
  : "${RUN_DIR:=$SUBMIT_DIR/runs/$JOB_NAME-${JOB_ID%%.*}}"
  RUN_DIR="$(absolute "$RUN_DIR")"
  head_address
  if [[ $SCHEDULER == pbs ]]; then
    # PBS sends no warning before the wall time: training stops itself before this instant.
    local wall
    wall="$(walltime_seconds)"
    [[ -z $wall ]] || export LLMTRAIN_DEADLINE="$((started + wall))"
  fi
  mkdir -p "$RUN_DIR" "$HF_HOME"
  task_environment
  runtime_wrapper
  rm -rf "$LLMTRAIN_STOP_FILE" "$RUN_DIR/.exit-codes"  # left by the run this one resumes
  say "job $JOB_ID: $NNODES node(s), head $HEAD_NODE ($HEAD_ADDR:$MASTER_PORT), runtime $RUNTIME, launcher $LAUNCHER, run dir $RUN_DIR"

  local rc=0
  if [[ -z ${TRAIN_SCRIPT:-} ]]; then
    on_head python3 -m llmtrain.cli validate "$CONFIG_PATH" "${TRAIN_ARGS[@]}" "output.dir=$RUN_DIR" || rc=$?
    ((rc == 0)) || finish "$rc"
  fi

  INTERRUPTED=0
  trap on_wall_time_warning USR1
  on_every_node "$LAUNCH" "$CONFIG_PATH" "${TRAIN_ARGS[@]}" "output.dir=$RUN_DIR" &
  local step=$!
  # A trapped signal ends `wait` early; wait again until the step itself has ended.
  while :; do
    rc=0
    wait "$step" || rc=$?
    ((INTERRUPTED && rc > 128)) || break
    INTERRUPTED=0
  done
  if ((rc != 0)); then
    local first
    first="$(first_failure)"
    if [[ -n $first && $first != "$rc" ]]; then
      say "step exit $rc; the first node to fail exited $first"
      rc="$first"
    fi
  fi
  finish "$rc"
}

main "$@"
