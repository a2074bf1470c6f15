#!/usr/bin/env bash
# One machine, one process per GPU, through the DeepSpeed launcher.
#
#   launch/single_node.sh CONFIG [key=value ...]                 # every visible GPU
#   NUM_GPUS=4 launch/single_node.sh configs/sft_8shot.yaml train.lr=1e-5
#   NUM_GPUS=2 launch/single_node.sh configs/tiny_cpu.yaml       # CPU: 2 gloo processes
#
# Environment: NUM_GPUS (default: GPUs that nvidia-smi lists, else 1), MASTER_PORT (default 29500;
# change it to run two trainings on one machine), DS_LAUNCHER_ARGS (extra launcher options, e.g.
# "--include localhost:4,5,6,7" to pick GPUs: the launcher ignores CUDA_VISIBLE_DEVICES when it
# is given --include). Run from the repository root with the virtualenv active.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: [NUM_GPUS=N] launch/single_node.sh CONFIG [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift

if [ -z "${NUM_GPUS:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NUM_GPUS=$(nvidia-smi -L | wc -l)
    else
        NUM_GPUS=1
    fi
fi

export PYTHONUNBUFFERED=1
# One intra-op thread pool per rank must not oversubscribe the CPU cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NUM_GPUS > 0 ? $(nproc) / NUM_GPUS : 1 ))}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# --module: ranks run `python -m megaflamingo.cli.train`, the same code as `megaflamingo-train`;
# the launcher adds --local_rank=N, which the CLI accepts (it reads LOCAL_RANK from the env anyway).
# shellcheck disable=SC2086  # DS_LAUNCHER_ARGS is a list of words on purpose
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" ${DS_LAUNCHER_ARGS:-} \
    --module megaflamingo.cli.train --config "$CONFIG" "$@"
