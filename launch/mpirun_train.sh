#!/usr/bin/env bash
# Open MPI: NP ranks, one per GPU, on this machine or across the hosts of a hostfile.
#
#   NP=8 launch/mpirun_train.sh CONFIG [key=value ...]
#   NP=16 HOSTFILE=hosts.txt launch/mpirun_train.sh configs/pretrain.yaml     # hosts.txt: "gpu01 slots=8"
#   NP=2 MPIRUN_ARGS="--allow-run-as-root --oversubscribe" launch/mpirun_train.sh configs/tiny_cpu.yaml
#
# Each rank finds RANK / WORLD_SIZE / LOCAL_RANK in Open MPI's OMPI_COMM_WORLD_* variables
# (megaflamingo.engine.distributed); across nodes rank 0's host name is broadcast with mpi4py
# (pip install 'megaflamingo[mpi]'), or export MASTER_ADDR yourself. The processes rendezvous over
# torch.distributed (NCCL/gloo); MPI only starts them.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: NP=N [HOSTFILE=FILE] [MPIRUN_ARGS=...] launch/mpirun_train.sh CONFIG [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift

if [ -z "${NP:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NP=$(nvidia-smi -L | wc -l)
    else
        NP=1
    fi
fi

export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MASTER_PORT=${MASTER_PORT:-29500}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

args=(-np "$NP" --bind-to none --map-by slot)
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
# -x: copy variables to the ranks on other hosts (local ranks inherit the whole environment). The
# list is derived, not kept by hand: the launch basics, every ${NAME} the config refers to, and the
# families the stack reads (MF_*, HF_*, TRANSFORMERS_*, NCCL_*, TORCH_*, CUDA_*), when set.
forward=(PATH LD_LIBRARY_PATH PYTHONPATH PYTHONUNBUFFERED OMP_NUM_THREADS MASTER_PORT MASTER_ADDR)
if [ -f "$CONFIG" ]; then
    while IFS= read -r var; do forward+=("$var"); done < <(grep -oE '\$\{[A-Za-z_][A-Za-z0-9_]*' "$CONFIG" | cut -c3-)
fi
while IFS= read -r var; do forward+=("$var"); done < <(compgen -e | grep -E '^(MF|HF|TRANSFORMERS|NCCL|TORCH|CUDA)_' || true)
for var in $(printf '%s\n' "${forward[@]}" | sort -u); do
    [ -n "${!var:-}" ] && args+=(-x "$var")
done

# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of words on purpose
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} megaflamingo-train --config "$CONFIG" "$@"
