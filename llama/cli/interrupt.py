"""Ctrl-C in the command line and the example scripts: a one-line message and exit status 130, the status a
shell reports for a program stopped by SIGINT (128 + 2), instead of a traceback from wherever the
generation happened to be."""

import contextlib
import sys
from typing import Iterator

from llama.distributed import is_rank_zero

INTERRUPTED = 130


def report_interrupt() -> int:
    """Say on stderr (rank 0 only) that the run was interrupted; return the exit status to use."""
    if is_rank_zero():
        print("\ninterrupted (Ctrl-C)", file=sys.stderr, flush=True)
    return INTERRUPTED


@contextlib.contextmanager
def exit_on_interrupt() -> Iterator[None]:
    """Run the block; on Ctrl-C (KeyboardInterrupt) report it and exit with status 130."""
    try:
        yield
    except KeyboardInterrupt:
        sys.exit(report_interrupt())
