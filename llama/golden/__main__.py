"""The command line: record a golden file, compare another engine with one.

    python -m llama.golden record --ckpt_dir models/demo --prompts prompts.jsonl --out golden.jsonl.gz
    torchrun --nproc_per_node 2 -m llama.golden record --ckpt_dir D --prompts P --out golden.jsonl
    python -m llama.golden compare golden.jsonl.gz other.jsonl        # another engine's outputs
    python -m llama.golden compare golden.jsonl.gz hf:/path/to/hf_dir  # run transformers on the prompts
    python -m llama.golden compare golden.jsonl.gz llamacpp:model.gguf # run llama.cpp (llama-cpp-python)
    python -m llama.golden compare golden.jsonl.gz ours:models/demo --dtype bfloat16   # this package

compare exits with 0 when every prompt agrees within the tolerances, 1 when one does not, 2 on bad input.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch

from llama.golden.compare import compare
from llama.golden.formats import TokenIds, load_outputs
from llama.golden.prompts import read_prompts
from llama.golden.record import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TOP_K, make_header, record, run_engine
from llama.golden.schema import Golden, load_golden
from llama.golden.tolerances import Tolerances, for_dtypes, named

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama.golden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("record", help="run this package's Llama on prompts and write a golden file")
    rec.add_argument("--ckpt_dir", required=True, help="a Meta checkpoint (or any directory Llama.build reads)")
    rec.add_argument("--tokenizer_path", default=None, help="default: tokenizer.model in ckpt_dir")
    rec.add_argument("--prompts", required=True, help="JSONL: {prompt|dialog|tokens, id?, continuation?}")
    rec.add_argument("--out", required=True, help="golden file (.jsonl, or .jsonl.gz for gzip); resumed if it exists")
    rec.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                     help=f"greedy tokens per prompt (default {DEFAULT_MAX_NEW_TOKENS})")
    rec.add_argument("--top_k", type=int, default=DEFAULT_TOP_K,
                     help=f"alternatives recorded per position (default {DEFAULT_TOP_K})")
    rec.add_argument("--max_seq_len", type=int, default=512, help="context: prompt + generation (default 512)")
    rec.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: Llama.build's")
    rec.add_argument("--device", default=None, help="cpu, cuda, ...; default: Llama.build's")

    cmp = sub.add_parser("compare", help="compare another engine with a golden file")
    cmp.add_argument("golden", help="the reference golden file")
    cmp.add_argument("other", help="outputs file (golden or documented JSONL), hf:DIR, llamacpp:FILE.gguf, "
                                   "or ours:CKPT_DIR")
    cmp.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    cmp.add_argument("--json_out", default=None, help="also write the JSON report to this file")
    cmp.add_argument("--tolerance", default=None, choices=["float32", "float16", "bfloat16", "quantized"],
                     help="tolerance preset (default: by the dtypes of the two sides)")
    cmp.add_argument("--logprob_tol", type=float, default=None, help="largest |Δ logprob| at one position")
    cmp.add_argument("--mean_tol", type=float, default=None, help="largest mean |Δ logprob| of a prompt")
    cmp.add_argument("--tie_tol", type=float, default=None,
                     help="greedy may part where the reference's top two differ by less (a near-tie)")
    cmp.add_argument("--tokenizer", default=None,
                     help="tokenizer.model to show token texts and read OpenAI-style records (default: the "
                          "golden header's, when that file exists)")
    cmp.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of an engine run by compare")
    cmp.add_argument("--device", default=None, help="device of an engine run by compare")
    return parser


def _record(args: argparse.Namespace) -> int:
    from llama.checkpoints.meta import find_tokenizer
    from llama.golden.engines import OursEngine

    for name in ("max_new_tokens", "top_k", "max_seq_len"):
        if getattr(args, name) < (0 if name == "top_k" else 1):
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    prompts = read_prompts(args.prompts)  # checked before the model loads
    if not Path(args.ckpt_dir).is_dir():
        raise FileNotFoundError(f"--ckpt_dir {args.ckpt_dir!r} is not a directory")
    tokenizer_path = args.tokenizer_path or find_tokenizer(args.ckpt_dir)
    engine = OursEngine.build(args.ckpt_dir, tokenizer_path, max_seq_len=args.max_seq_len,
                              dtype=DTYPES.get(args.dtype), device=args.device)
    settings = {"max_new_tokens": args.max_new_tokens, "top_k": args.top_k, "max_seq_len": args.max_seq_len,
                "decoding": "greedy", "prompts_per_call": 1}
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    writer = not distributed or dist.get_rank() == 0
    # Only the writer needs the header (md5 sums of big checkpoints take minutes); every rank needs settings.
    header = make_header(engine, settings, args.ckpt_dir, tokenizer_path) if writer else {"settings": settings}
    golden = record(engine, prompts, args.out, header, progress=sys.stderr if writer else None, writer=writer,
                    share=_broadcast if distributed else (lambda obj: obj))
    if writer:
        print(f"{args.out}: {len(golden.records)} prompts", file=sys.stderr)
    return 0


def _broadcast(obj):
    """Rank 0's `obj` on every rank."""
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _tokenizer(path: Optional[str]):
    """Our Tokenizer for token texts, or None when there is no usable file."""
    if not path or not Path(path).is_file():
        return None
    from llama import Tokenizer

    try:
        return Tokenizer(path)
    except (ValueError, OSError):  # e.g. a SentencePiece model: texts are only a convenience
        return None


def _other(args: argparse.Namespace, golden: Golden, tokenizer) -> Golden:
    spec: str = args.other
    dtype = DTYPES.get(args.dtype)
    stop_ids = set(golden.header.get("stop_ids") or [])
    kind, _, target = spec.partition(":")
    if kind == "hf" and target:
        from llama.golden.adapters import HFEngine

        engine = HFEngine.from_pretrained(target, stop_ids, dtype=dtype, device=args.device or "cpu")
    elif kind == "llamacpp" and target:
        from llama.golden.adapters import LlamaCppEngine

        settings = golden.header.get("settings") or {}
        engine = LlamaCppEngine(target, stop_ids, n_ctx=int(settings.get("max_seq_len", 2048)))
    elif kind == "ours" and target:
        from llama.golden.engines import OursEngine

        settings = golden.header.get("settings") or {}
        engine = OursEngine.build(target, max_seq_len=int(settings.get("max_seq_len", 512)), dtype=dtype,
                                  device=args.device)
    else:
        token_ids = None
        if tokenizer is not None:
            token_bytes = getattr(getattr(tokenizer, "model", None), "decode_single_token_bytes", None)
            token_ids = TokenIds(tokenizer.decode, tokenizer.n_words, token_bytes)
        return load_outputs(spec, token_ids)
    other = run_engine(engine, golden, progress=sys.stderr)
    other.path = spec
    return other


def _compare(args: argparse.Namespace) -> int:
    golden = load_golden(args.golden)
    tokenizer = _tokenizer(args.tokenizer or golden.header.get("tokenizer"))
    if args.tokenizer and tokenizer is None:
        raise ValueError(f"--tokenizer {args.tokenizer!r} is not a readable tiktoken tokenizer.model")
    other = _other(args, golden, tokenizer)
    base: Optional[Tolerances] = named(args.tolerance) if args.tolerance else None
    given = (args.logprob_tol, args.mean_tol, args.tie_tol)
    tolerances = None
    if base is not None or any(v is not None for v in given):
        base = base or for_dtypes(golden.header.get("dtype"), other.header.get("dtype"))
        tolerances = base.updated(logprob=args.logprob_tol, mean_logprob=args.mean_tol, tie=args.tie_tol)
    token_text = (lambda t: tokenizer.decode([t])) if tokenizer is not None else None
    report = compare(golden, other, tolerances, token_text, other_name=args.other)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    print(json.dumps(report.to_json(), indent=1) if args.json else report.table())
    return 0 if report.passed else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _record(args) if args.command == "record" else _compare(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
