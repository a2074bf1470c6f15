"""``python -m preprocess`` from a checkout = ``megaflamingo-preprocess`` (megaflamingo/cli/preprocess.py).
Not installed: the installed package is ``megaflamingo`` only."""
