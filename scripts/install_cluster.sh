#!/usr/bin/env bash
# Install megaflamingo into the CURRENT Python environment of a GPU cluster (a venv or conda env
# that already has the cluster's CUDA build of torch). Unlike scripts/bootstrap.sh (CPU machines,
# own .venv, CPU torch pin) this never installs or replaces torch: every pip call is constrained
# to the torch that is already there.
#
#   bash scripts/install_cluster.sh                      # core + encoders + GPU build tools
#   bash scripts/install_cluster.sh --flash-attn         # also build flash-attn against this torch
#   bash scripts/install_cluster.sh --with-torchvision   # install the torchvision matching torch
#   PYTHON=/path/to/python bash scripts/install_cluster.sh --dry-run --report pip-report.json
#
# What it does:
#   1. pip install -e ".[encoders,gpu]": the core, what the real audio encoders' model code imports
#      (torchlibrosa, librosa, h5py, ftfy, braceexpand) and flash-attn's build prerequisites;
#   2. laion-clap and msclap with --no-deps: their declared pins (numpy<2, transformers<5,
#      torchaudio) cannot be met next to the core's numpy>=2, and their audio encoders need none
#      of what the pins are for;
#   3. checks that torchvision imports (LAION-CLAP's HTSAT code imports torchvision.ops) and, with
#      --with-torchvision, installs the release that matches torch (0.<minor+15>);
#   4. with --flash-attn: pip install flash-attn --no-build-isolation (it compiles against the
#      installed torch and CUDA toolkit; without it attention uses torch SDPA);
#   5. builds both real encoders with random weights as a smoke test (no weights, no hub).
# Extra pip settings pass through pip's own environment variables (PIP_INDEX_URL, PIP_CONSTRAINT,
# PIP_FIND_LINKS, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
FLASH=0
TORCHVISION=0
DRY=()
REPORT=()
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --flash-attn) FLASH=1 ;;
    --with-torchvision) TORCHVISION=1 ;;
    --dry-run) DRY=(--dry-run) ;;
    --report) shift; [ $# -gt 0 ] || { echo "install_cluster: --report needs a file" >&2; exit 2; }
              REPORT=(--report "$1") ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install_cluster: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if ! torch_version=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  echo "install_cluster: '$PY' cannot import torch. Install your cluster's CUDA build of torch" >&2
  echo "  first (module load ..., or pip install torch --index-url https://download.pytorch.org/whl/cuXXX)," >&2
  echo "  or set PYTHON to the interpreter that has it. This script never installs torch." >&2
  exit 2
fi
echo "[install_cluster] python: $("$PY" -c 'import sys; print(sys.executable)'), torch $torch_version"

pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
# Keep torch exactly as installed: any package asking for another torch fails loudly instead of
# silently pulling several GB of a different CUDA build.
echo "torch==${torch_version}" > "$pins"
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "[install_cluster] pip install -e .[encoders,gpu]"
"$PY" -m pip install ${DRY[@]+"${DRY[@]}"} ${REPORT[@]+"${REPORT[@]}"} -c "$pins" -e ".[encoders,gpu]"

echo "[install_cluster] laion-clap, msclap (--no-deps: their numpy<2 / transformers<5 / torchaudio pins do not apply to the audio encoders)"
"$PY" -m pip install ${DRY[@]+"${DRY[@]}"} --no-deps "laion-clap==1.1.7" "msclap==1.3.4"

minor=$(echo "$torch_version" | cut -d. -f2)
patch=$(echo "$torch_version" | cut -d. -f3 | cut -d+ -f1)
tv_spec="torchvision==0.$((minor + 15)).${patch}"
if ! "$PY" -c 'import torchvision.ops' >/dev/null 2>&1; then
  if [ "$TORCHVISION" = 1 ]; then
    echo "[install_cluster] $tv_spec (LAION-CLAP's HTSAT imports torchvision.ops)"
    "$PY" -m pip install ${DRY[@]+"${DRY[@]}"} -c "$pins" "$tv_spec"
  else
    echo "[install_cluster] warning: torchvision does not import; the laion-clap encoder (kNN clip" >&2
    echo "  embeddings) needs it. Install the release matching torch $torch_version, e.g." >&2
    echo "  bash scripts/install_cluster.sh --with-torchvision   (runs: pip install -c <torch pin> \"$tv_spec\")" >&2
  fi
fi

if [ "$FLASH" = 1 ]; then
  echo "[install_cluster] flash-attn (compiled against torch $torch_version; this takes a while)"
  "$PY" -m pip install ${DRY[@]+"${DRY[@]}"} -c "$pins" --no-build-isolation flash-attn
fi

if [ ${#DRY[@]} -gt 0 ]; then
  echo "[install_cluster] dry run: nothing installed"
  exit 0
fi
echo "[install_cluster] smoke test: building the real encoders with random weights"
"$PY" - <<'EOF'
from megaflamingo.audio.encoders import EncoderError, build_encoder

enc = build_encoder("clapcap", random_init=True)
print(f"  clapcap ok: {enc.embed_dim}-d at {enc.sample_rate} Hz")
try:
    enc = build_encoder("laion-clap", random_init=True)
    print(f"  laion-clap ok: {enc.embed_dim}-d at {enc.sample_rate} Hz")
except EncoderError as e:
    print(f"  laion-clap NOT usable: {e}")
EOF
echo "[install_cluster] done"
