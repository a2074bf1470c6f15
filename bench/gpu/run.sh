#!/usr/bin/env bash
# One-command GPU suite (<= 8 minutes on one H100/H200, installs included): training-step figures of the
# AF1-1.3B shape for every attention path, as one JSON file.
#
#   bash bench/gpu/run.sh [--cpu-smoke] [gpu_bench.py options]
#
# Results go to $OUT/gpu_results.json ($OUT defaults to bench/gpu/out), the log to $OUT/gpu_suite.log.
# Optional packages the machine image lacks (deepspeed and its pure-Python dependencies, liger-kernel,
# flash-attn, a newer transformers) are installed from wheels in .whl/ at the repository root when
# present (bench/gpu/fetch_wheels.sh downloads/builds them on a machine with PyPI access); whatever is
# missing is skipped and recorded in the JSON ("env" and each variant's "skipped").
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-$ROOT/bench/gpu/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    echo "== installing carried wheels: $(cd "$ROOT/.whl" && ls *.whl | tr '\n' ' ')"
    SITE=/tmp/mf_gpu_site
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
      echo "== wheel install failed; running with the image's packages"
    fi
  else
    echo "== no .whl/ wheels: image packages only"
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1
  timeout "${SUITE_TIMEOUT_S:-450}" $PY "$ROOT/bench/gpu/gpu_bench.py" --out "$OUT/gpu_results.json" "$@"
  rc=$?
  echo "== gpu_bench exit code $rc"
  exit $rc
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
