"""``python -m tools`` from a checkout = ``megaflamingo-convert`` (megaflamingo/cli/convert.py).
Not installed: the installed package is ``megaflamingo`` only."""
