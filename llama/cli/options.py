"""The command line's options (`parse_args`), and the GenerationConfig and Llama they describe: shared by the
batch command (llama/cli/batch.py) and the chat (llama/cli/chat.py)."""

import argparse
import re
from typing import List, Optional, Sequence

import torch

from llama.config import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, GenerationConfig
from llama.fast.quantize import QUANTIZE_CHOICES
from llama.generation import Llama
from llama.speculative import Speculation
from llama.speculative.settings import DRAFTERS, drafter_names, resolve_speculation


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Read the command line. Every sampling control of GenerationConfig has an option of the same name."""
    p = argparse.ArgumentParser(
        prog="python -m llama",
        description="Complete prompts in batches (into JSON Lines or JSON), or chat, with a Llama checkpoint. "
        "Under torchrun rank 0 reads, prints and writes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("command", nargs="?", choices=["generate", "chat"], default="generate",
                   help="generate: complete prompts in batches; chat: talk interactively")
    model = p.add_argument_group("model")
    model.add_argument("--ckpt_dir", required=True, help="directory with params.json and consolidated.NN.pth")
    model.add_argument("--tokenizer_path", help="tokenizer.model (default: the one in --ckpt_dir or its original/)")
    model.add_argument("--chat_format", choices=["llama3", "llama2"], help="default: the tokenizer's family's")
    model.add_argument("--max_seq_len", type=int, default=512, help="longest prompt plus generation")
    model.add_argument("--model_parallel_size", type=int, help="default: the number of processes")
    model.add_argument("--device", help="cuda, cpu, ... (default: CUDA when available)")
    model.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on the CPU")
    model.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="int8: int8 weights, one scale per output row; "
                       "int4: 4-bit, a scale and zero per 128 inputs (default: as the checkpoint stores them)")

    io = p.add_argument_group("prompts and output")
    io.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    io.add_argument("--prompts_file", help="one prompt per line (blank lines skipped); in a .jsonl file each "
                    'line is a JSON string, {"prompt": "..."} or {"dialog": [messages]}; a .json file holds a '
                    "JSON array of them")
    io.add_argument("--output_file", help=".jsonl: one JSON object per prompt and line; .json: an array")
    io.add_argument("--batch_size", type=int, default=4, help="prompts per batch")
    io.add_argument("--use_chat_template", action="store_true", help="send each prompt as a user message")
    io.add_argument("--system", help="a system message in front of each chat (chat template, chat mode)")
    io.add_argument("--max_display", type=int, help="print at most this many results (default: all without "
                    "--output_file, else 4)")
    io.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
    io.add_argument("--interactive", action="store_true", help="the same as the chat command")

    s = p.add_argument_group("generation controls (see GenerationConfig)")
    s.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0: greedy")
    s.add_argument("--top_p", type=float, default=DEFAULT_TOP_P)
    s.add_argument("--top_k", type=int, default=0, help="0: off")
    s.add_argument("--min_p", type=float, default=0.0, help="0: off")
    s.add_argument("--repetition_penalty", type=float, default=1.0, help="1: off")
    s.add_argument("--stop", action="append", default=[], type=_unescape,
                   help=r"a stop string (repeat for several); \n, \t, \r and \\ are understood")
    s.add_argument("--banned_words", action="append", default=[], help="a banned word (repeat for several)")
    s.add_argument("--banned_token_ids", type=_int_list, default=[], help="comma-separated token ids")
    s.add_argument("--seed", type=int, help="sampling seed (default: the global seed, 1)")
    s.add_argument("--n", type=int, default=1, help="samples per prompt")
    s.add_argument("--min_new_tokens", type=int, default=0)
    s.add_argument("--max_gen_len", "--max_new_tokens", dest="max_gen_len", type=int,
                   help="most tokens per answer (default: up to max_seq_len)")
    s.add_argument("--ignore_eos", action="store_true", help="do not stop at stop tokens")
    s.add_argument("--logprobs", action="store_true", help="write each generated token's logprob")
    s.add_argument("--top_logprobs", type=int, default=0, help="write this many alternatives per token")

    sp = p.add_argument_group("speculative decoding (docs/speculative.md): the same output, fewer passes")
    sp.add_argument("--speculative", choices=drafter_names(), help="the drafter: " + "; ".join(
        f"{name}: {kind.help}" for name, kind in sorted(DRAFTERS.items())))
    sp.add_argument("--draft_ckpt_dir", help="the drafter's files: the draft model's checkpoint (--speculative "
                    "draft), the EAGLE-style head's directory (--speculative eagle; default the demo's)")
    sp.add_argument("--draft_k", type=int, help="most drafts verified per pass (default: the drafter's, 4)")
    args = p.parse_args(argv)
    if args.interactive:
        args.command = "chat"
    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    return args


def _unescape(text: str) -> str:
    r"""Read \n, \t, \r and \\ in a command-line string as the characters they name."""
    names = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda m: names[m.group(1)], text)


def _int_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig the options ask for (checked: bad values raise ValueError)."""
    return GenerationConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, stop=tuple(args.stop), banned_words=tuple(args.banned_words),
        banned_token_ids=tuple(args.banned_token_ids), seed=args.seed, n=args.n,
        min_new_tokens=args.min_new_tokens, max_new_tokens=args.max_gen_len, ignore_eos=args.ignore_eos,
    )


def check_speculative(args: argparse.Namespace) -> None:
    """Raise ValueError, before anything loads, for a draft option without --speculative, a drafter missing
    its --draft_ckpt_dir, or a bad --draft_k."""
    if args.speculative is None:
        if args.draft_ckpt_dir or args.draft_k is not None:
            raise ValueError("--draft_ckpt_dir and --draft_k need --speculative (e.g. --speculative draft)")
        return
    if DRAFTERS[args.speculative].needs_path and not args.draft_ckpt_dir:
        raise ValueError(f"--speculative {args.speculative} needs --draft_ckpt_dir (the draft model's checkpoint)")
    if args.draft_k is not None and args.draft_k < 0:
        raise ValueError(f"--draft_k must be >= 0, got {args.draft_k}")


def speculation(args: argparse.Namespace, llama: Llama) -> Optional[Speculation]:
    """The Speculation --speculative, --draft_ckpt_dir and --draft_k ask for (None without --speculative);
    a draft model is built here."""
    check_speculative(args)
    if args.speculative is None:
        return None
    setting = f"{args.speculative}:{args.draft_ckpt_dir}" if args.draft_ckpt_dir else args.speculative
    return resolve_speculation(setting, llama, args.draft_k)


def build(args: argparse.Namespace, max_batch_size: int) -> Llama:
    return Llama.build(
        ckpt_dir=args.ckpt_dir, tokenizer_path=args.tokenizer_path, max_seq_len=args.max_seq_len,
        max_batch_size=max_batch_size, model_parallel_size=args.model_parallel_size, device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None, chat_format=args.chat_format, quantize=args.quantize,
    )
