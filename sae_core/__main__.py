"""`python -m sae_core COMMAND ...`: the command line, mirroring the web pages (see cli/main.py)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
