"""Offline preprocessing: `megaflamingo-preprocess` (see preprocess/cli.py)."""
