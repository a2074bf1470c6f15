"""Console scripts: parse arguments, call the library, print. Nothing in the library imports these.

``megaflamingo-preprocess`` (:mod:`.preprocess`), ``megaflamingo-train`` (:mod:`.train`),
``megaflamingo-convert`` (:mod:`.convert`), ``megaflamingo-infer`` (:mod:`.infer`), ``megaflamingo-demo``
(:mod:`.demo`, needs the ``demo`` extra); each also runs as
``python -m megaflamingo.cli.<name>`` (torchrun / deepspeed launch ``-m megaflamingo.cli.train``).
"""
