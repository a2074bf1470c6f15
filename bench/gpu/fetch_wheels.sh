#!/usr/bin/env bash
# Put the optional GPU-suite packages into .whl/ (ignored by .gitignore) for bench/gpu/run.sh to install on a machine
# without PyPI: run this where pip reaches PyPI. Wheels target CPython 3.12 / manylinux x86-64 (the GPU
# image). Keep the total under the 64 MiB a device call carries.
#   deepspeed: sdist only on PyPI -> built here into a pure-Python wheel (DS_BUILD_OPS=0: no compiled ops;
#              the suite uses torch AdamW, so none are needed); + hjson, pydantic (+core, annotated-types,
#              typing-inspection), the dependencies the image lacks.
#   liger-kernel: pure Python (Triton kernels).
# flash-attn has no binary wheel on PyPI (a CUDA build takes far longer than a lease): the suite uses
# torch's own varlen flash kernel (torch.nn.attention.varlen) instead and records flash-attn as absent.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
DEST="$ROOT/.whl"
mkdir -p "$DEST"
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --only-binary=:all: --no-deps -d "$DEST")
$PY -m pip download "${PLAT[@]}" hjson==3.1.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 \
    typing-inspection==0.4.2 liger-kernel==0.8.5
DS_BUILD_OPS=0 $PY -m pip wheel --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
du -sh "$DEST"; ls "$DEST"
