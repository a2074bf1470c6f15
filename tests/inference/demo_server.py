"""Starts `megaflamingo-demo` for the browser tests, in its own process.

    python -m tests.inference.demo_server --model DIR [demo options]     # from the checkout's root

The same as the console script, except that LAION-CLAP's HTSAT (for --rerank-clap with a random
test checkpoint) gets its one torchvision name stubbed where torchvision cannot be imported, and
the hub guard is on (the page and the server must work offline).
"""
import sys

from megaflamingo.testing import no_hub
from megaflamingo.testing.clap import install_torchvision_stub

if __name__ == "__main__":
    no_hub()
    install_torchvision_stub()
    from megaflamingo.cli.demo import main

    sys.exit(main(sys.argv[1:]))
