"""`python -m llama.convert`: converting and resharding checkpoints; the code is llama/checkpoints/convert.py."""

import sys

from llama.checkpoints.convert import main

if __name__ == "__main__":
    sys.exit(main())
