"""`python -m tools` = `megaflamingo-convert`."""
import sys

from tools.convert import main

sys.exit(main())
