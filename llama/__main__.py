"""`python -m llama`: see llama/cli/."""

import sys

from llama.cli import main

if __name__ == "__main__":
    sys.exit(main())
