"""Starts `megaflamingo-demo` for the browser tests, in its own process.

    python tests/inference/demo_server.py --model DIR [demo options]

The same as the console script, except that LAION-CLAP's HTSAT (for --rerank-clap with a random
test checkpoint) gets its one torchvision name stubbed where torchvision cannot be imported, and
the hub guard is on (the page and the server must work offline).
"""
import sys

from clap_kit import install_torchvision_stub  # this file's directory is on the path (run as a script)

from megaflamingo.testing import no_hub

if __name__ == "__main__":
    no_hub()
    install_torchvision_stub()
    from megaflamingo.cli.demo import main

    sys.exit(main(sys.argv[1:]))
