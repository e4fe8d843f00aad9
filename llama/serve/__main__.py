"""`python -m llama.serve [--ckpt_dir D]`: the OpenAI-compatible server (llama/serve/http.py) on a checkpoint,
or on the bundled demo model when none is given. See docs/serving.md."""

import argparse
import os
import sys
from typing import Optional, Sequence

from llama.fast.quantize import QUANTIZE_CHOICES

DEFAULT_MAX_SEQ_LEN = 2048  # a checkpoint's; the demo model's is the context it was trained on (256)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m llama.serve",
        description="Serve a Llama checkpoint over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health). SIGTERM or Ctrl-C drains the running requests, then exits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_argument_group("model")
    model.add_argument("--ckpt_dir", help="a Meta or Hugging Face checkpoint directory (default: the bundled demo "
                       "model, models/demo)")
    model.add_argument("--tokenizer_path", help="tokenizer.model (default: the one in --ckpt_dir)")
    model.add_argument("--chat_format", help="llama3, llama3.1 or llama2 (default: the tokenizer's family's)")
    model.add_argument("--max_seq_len", type=int, help=f"longest prompt plus generation (default: "
                       f"{DEFAULT_MAX_SEQ_LEN}; the demo model: 256)")
    model.add_argument("--device", help="cuda, cpu, ... (default: CUDA when available)")
    model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="default: bfloat16 on CUDA, float32 on the CPU")
    model.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="int8 weights, one scale per output row; int4: group-wise")
    model.add_argument("--served_model_name", help="the model id clients send (default: the checkpoint "
                       "directory's name; the demo model: llama-demo)")

    cache = p.add_argument_group("KV cache and scheduling (one budget at most; none: room for 8 full sequences)")
    budget = cache.add_mutually_exclusive_group()
    budget.add_argument("--kv_blocks", type=int, help="KV cache blocks")
    budget.add_argument("--kv_memory_bytes", type=int, help="KV cache bytes")
    budget.add_argument("--kv_memory_fraction", type=float, help="fraction of free CUDA memory for the KV cache")
    cache.add_argument("--block_size", type=int, default=16, help="positions per KV block")
    cache.add_argument("--max_running", type=int, default=256, help="most sequences decoded together")
    cache.add_argument("--max_step_tokens", type=int, default=512, help="most tokens fed in one step")

    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    http.add_argument("--port", type=int, default=8000, help="port (0: any free one; the line "
                      "'llama.serve: listening on http://HOST:PORT' says which)")
    http.add_argument("--drain_timeout", type=float, default=30.0,
                      help="seconds running requests get to finish after SIGTERM / Ctrl-C")
    http.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    if args.port is not None and not 0 <= args.port <= 65535:
        p.error(f"--port must be in [0, 65535], got {args.port}")
    if args.drain_timeout < 0:
        p.error(f"--drain_timeout must be >= 0, got {args.drain_timeout}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        from llama.serve.http import create_app, serve
    except ImportError as e:
        print(f"python -m llama.serve: {e}", file=sys.stderr)
        return 2
    from llama.cli.demo import DEMO_DIR, DEMO_MAX_SEQ_LEN, check_demo_files
    from llama.serve.async_engine import AsyncEngine
    from llama.serve.pipeline import pipeline

    ckpt_dir = args.ckpt_dir
    name = args.served_model_name
    max_seq_len = args.max_seq_len
    if ckpt_dir is None:
        check_demo_files(DEMO_DIR)
        ckpt_dir, name = str(DEMO_DIR), name or "llama-demo"
        max_seq_len = max_seq_len or DEMO_MAX_SEQ_LEN
    name = name or os.path.basename(os.path.normpath(ckpt_dir))
    pipe = pipeline(ckpt_dir, tokenizer_path=args.tokenizer_path, max_seq_len=max_seq_len or DEFAULT_MAX_SEQ_LEN,
                    n_blocks=args.kv_blocks, memory_bytes=args.kv_memory_bytes,
                    memory_fraction=args.kv_memory_fraction, block_size=args.block_size,
                    max_step_tokens=args.max_step_tokens, max_running=args.max_running, device=args.device,
                    dtype=args.dtype, chat_format=args.chat_format, quantize=args.quantize)
    cache = pipe.engine.cache
    print(f"llama.serve: {name} from {ckpt_dir}, max_seq_len {pipe.llama.model.params.max_seq_len}, KV cache "
          f"{cache.n_blocks} blocks of {cache.block_size} positions, on {pipe.llama.device}", flush=True)
    engine = AsyncEngine(pipe.engine)
    app = create_app(engine, name)
    try:
        serve(app, args.host, args.port, drain_timeout=args.drain_timeout, log_level=args.log_level)
    finally:
        engine.shutdown()
    print("llama.serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
