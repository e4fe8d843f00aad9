"""`python -m llama.bench`: the benchmark lives outside the library, in the checkout's bench/ package
(`python -m bench`), beside its results and their history."""

import sys
from pathlib import Path

# Run from anywhere in a checkout: the bench/ package sits beside llama/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import main  # noqa: E402

if __name__ == "__main__":
    main()
