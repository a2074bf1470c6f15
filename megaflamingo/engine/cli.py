"""`megaflamingo-train`: placeholder until its issue lands (answers --help, then says it is not available)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megaflamingo-train", description="Train under DeepSpeed.")
    parser.parse_args(argv)
    print("megaflamingo-train: not yet available in this version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
