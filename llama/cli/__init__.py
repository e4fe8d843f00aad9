"""The command line: `python -m llama` completes prompts in batches into JSON Lines (llama/cli/batch.py);
`python -m llama chat` talks (llama/cli/chat.py). Under torchrun every rank computes and rank 0 alone reads,
prints and writes.

    python -m llama --ckpt_dir DIR --prompts_file prompts.txt --output_file out.jsonl --batch_size 8
    python -m llama --ckpt_dir DIR --prompt "The capital of France is" --temperature 0
    python -m llama chat --ckpt_dir DIR --system "You are terse."
    torchrun --nproc_per_node 8 -m llama --ckpt_dir DIR_70B --prompts_file prompts.txt --output_file out.json
"""

import sys
from typing import Optional, Sequence

from llama.cli.batch import run_batch
from llama.cli.chat import run_chat
from llama.cli.interrupt import report_interrupt
from llama.cli.options import parse_args
from llama.distributed import is_rank_zero

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status: 0, 1 when some prompts failed, 2 for a usage or input
    error, 130 after Ctrl-C. Under torchrun, rank 0 alone reports."""
    args = parse_args(argv)
    try:
        if args.command == "chat":
            return run_chat(args)
        return run_batch(args)
    except (OSError, ValueError, TypeError) as e:
        if is_rank_zero():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return report_interrupt()
