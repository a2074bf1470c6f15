"""Console scripts: parse arguments, call the library, print. Nothing in the library imports these.

``megaflamingo-preprocess`` (:mod:`.preprocess`), ``megaflamingo-train`` (:mod:`.train`),
``megaflamingo-convert`` (:mod:`.convert`), ``megaflamingo-infer`` (:mod:`.infer`),
``megaflamingo-eval`` (:mod:`.eval`); each also runs as ``python -m megaflamingo.cli.<name>``
(torchrun / deepspeed launch ``-m megaflamingo.cli.train``; torchrun ``-m megaflamingo.cli.eval``).
"""
