"""``python -m megaflamingo.checkpoint.to_universal --input_folder TAG_DIR --output_folder OUT [...]``

DeepSpeed's universal-checkpoint converter (``deepspeed.checkpoint.ds_to_universal``, same arguments) with
every ``torch.load`` it makes restricted (see :mod:`megaflamingo.checkpoint.safe_load`). The converter
calls ``torch.load(..., weights_only=False)`` on every rank file, in this process and in its extract/merge
worker processes; the guard is installed before DeepSpeed is imported, and the workers are forked so they
inherit it (``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` is inherited too: a worker started any other way loads
weights-only without the allow-list, i.e. fails closed).

A tag written by ``megaflamingo-train`` is first checked against its integrity record (sizes, CRC-32,
pickle scan); one without marker or record is converted with a warning.

Exit codes: 0 converted; 2 a refused, corrupted or missing input file (one line naming it); 1 other errors.
"""
from __future__ import annotations

import multiprocessing
import sys

from .integrity import CheckpointError
from .safe_load import install_guard
from .tag_manifest import verify_saved_tag


def main(argv=None) -> int:
    install_guard()  # for the whole (short-lived) process
    if "fork" in multiprocessing.get_all_start_methods():
        # The workers must inherit the guard; fork is the Linux default today, but not forever.
        multiprocessing.set_start_method("fork", force=True)
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", *(sys.argv[1:] if argv is None else argv)]
    args = ds_to_universal.parse_arguments()
    try:
        warning = verify_saved_tag(args.input_folder)  # a trainer tag must match its integrity record
        if warning:
            print(f"megaflamingo.checkpoint.to_universal: warning: {warning}", file=sys.stderr)
        ds_to_universal.main(args)
    except CheckpointError as e:
        print(f"megaflamingo.checkpoint.to_universal: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
