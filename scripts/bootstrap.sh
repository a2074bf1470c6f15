#!/usr/bin/env bash
# Creates/updates .venv/ in the checkout with everything the project needs on a CPU machine.
# Idempotent: re-running only installs what changed. Used by `make quickstart` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
C=constraints/cpu.txt

# System packages: Open MPI (mpi4py / mpirun tests), Slurm + munge (the real-Slurm test), ffmpeg
# (decoder fallback, also for the browser's webm/ogg microphone recordings), a Java runtime for
# megaflamingo-eval's captioning metrics (pycocoevalcap's PTB tokenizer and METEOR jars) and Debian's
# chromium (the demo's browser test drives it with Playwright; Playwright's own browser download is
# never used, so `playwright install` is not run).
need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin libopenmpi-dev)
command -v slurmctld >/dev/null 2>&1 || need_apt+=(slurm-wlm munge)
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v java >/dev/null 2>&1 || need_apt+=(default-jre-headless)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ] && [ "${MEGAFLAMINGO_SKIP_APT:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "[bootstrap] note: missing system packages (${need_apt[*]}); MPI/Slurm/browser tests will be skipped," \
      "captioning metrics fall back to a Python tokenizer without METEOR" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
P="$VENV/bin/python"
stamp="$VENV/.megaflamingo-installed"
want=$(cat setup.py "$C" scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from the pin, so nothing later resolves a CUDA build.
"$P" -m pip install -q -c "$C" "torch==2.13.0"
"$P" -m pip install -q -c "$C" -e ".[dev,eval,demo]"
# Real audio encoders: their declared deps (numpy<2, torchvision, torchaudio) cannot be met on
# CPU machines here, so install the packages without deps, then only what their audio
# encoders import.
"$P" -m pip install -q --no-deps "laion-clap==1.1.7" "msclap==1.3.4"
"$P" -m pip install -q -c "$C" torchlibrosa h5py ftfy braceexpand
echo "$want" > "$stamp"
echo "[bootstrap] $VENV ready"
