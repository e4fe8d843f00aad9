"""Serving bench: N requests through the continuous-batching engine (llama.serve) against one static batch of
the same N prompts through Llama.generate, on the same weights, in one process, alternating round by round.

    python -m bench.serving                       # the CPU demo model, N = 8
    python -m bench.serving --n 64 --device cuda --shape llama3-8b --prompt-len 128 --new-tokens 128 --max-seq-len 512

Greedy, stop tokens ignored, so both produce the same number of tokens (checked equal, token for token).
Reports tokens/s of each (median over rounds), their ratio, the engine's time to first token and
inter-token latency (p50/p99) with every request arriving at once, and how many sequences of a length mix
fit in the memory of the static cache (N rows of max_seq_len) when the cache is paged instead.
"""

import argparse
import json
import math
import random
import statistics
import time
from typing import Dict, List

import torch

from llama import Llama
from llama.cli.demo import DEMO_DIR
from llama.serve.engine import Engine


def percentile(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_engine(engine: Engine, prompts: List[List[int]], new_tokens: int) -> Dict:
    start = time.perf_counter()
    ids = [engine.add_request(p, temperature=0, ignore_eos=True, max_new_tokens=new_tokens) for p in prompts]
    seen: Dict[int, List[float]] = {i: [] for i in ids}
    for event in engine.run():
        if event.token is not None:
            seen[event.request_id].append(time.perf_counter())
    elapsed = time.perf_counter() - start
    ttft = [times[0] - start for times in seen.values()]
    itl = [b - a for times in seen.values() for a, b in zip(times, times[1:])]
    tokens = [engine.outputs.pop(i).tokens for i in ids]
    return dict(elapsed=elapsed, tokens=tokens, ttft=ttft, itl=itl)


def paged_capacity(max_seq_len: int, n_static: int, block_size: int, seed: int = 0) -> Dict:
    """Sequences of a length mix (prompt and output each uniform in 16 .. max_seq_len / 2) that fit in the
    positions of a static cache of n_static rows x max_seq_len, paged in blocks of block_size."""
    rng = random.Random(seed)
    budget_blocks = n_static * max_seq_len // block_size
    used, fitted = 0, 0
    while True:
        length = rng.randint(16, max_seq_len // 2) + rng.randint(16, max_seq_len // 2)
        need = math.ceil(min(length, max_seq_len) / block_size)
        if used + need > budget_blocks:
            break
        used, fitted = used + need, fitted + 1
    return dict(static_rows=n_static, paged_sequences=fitted, block_size=block_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt-dir", default=str(DEMO_DIR))
    parser.add_argument("--shape", default=None, help="random weights at this shape of bench.run (no tokenizer)")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    if args.shape:  # random weights, as `python -m bench` makes them (tokenizer without stop tokens)
        from bench.run import DTYPES, SHAPES, build_ours, random_weights
        from llama.distributed import init_distributed
        from llama.model import ModelArgs

        device = torch.device(args.device)
        init_distributed(device)
        dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
        model_args = ModelArgs.from_params(SHAPES[args.shape], max_seq_len=args.max_seq_len, max_batch_size=args.n)
        llama = build_ours(model_args, random_weights(model_args, dtype, device, 0), device, dtype, True, False)
    else:
        llama = Llama.build(args.ckpt_dir, None, args.max_seq_len, args.n, device=args.device, dtype=args.dtype)
    vocab = llama.model.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, min(vocab, 256), (args.prompt_len,), generator=g).tolist() for _ in range(args.n)]
    engine = Engine(llama, n_blocks=args.n * math.ceil(args.max_seq_len / args.block_size),
                    block_size=args.block_size)
    sync = torch.cuda.synchronize if llama.device.type == "cuda" else (lambda: None)

    static_s, engine_s, last = [], [], None
    llama.generate(prompts, 4, temperature=0, ignore_eos=True)  # warm-up, both
    run_engine(engine, prompts, 4)
    for _ in range(args.rounds):
        sync()
        start = time.perf_counter()
        static_tokens, _ = llama.generate(prompts, args.new_tokens, temperature=0, ignore_eos=True)
        sync()
        static_s.append(time.perf_counter() - start)
        last = run_engine(engine, prompts, args.new_tokens)
        engine_s.append(last["elapsed"])
    # bf16 on a GPU: the two programs sum in other orders, so near-ties may part (counted, not required equal)
    differing = sum(a != b for a, b in zip(last["tokens"], static_tokens))
    total = args.n * args.new_tokens
    result = dict(
        device=str(llama.device), n=args.n, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        static_tokens_per_s=total / statistics.median(static_s),
        engine_tokens_per_s=total / statistics.median(engine_s),
        same_tokens=last["tokens"] == static_tokens, rows_differing=differing, 
        dtype=str(llama.model.norm.weight.dtype),
        ttft_ms_p50=1000 * percentile(last["ttft"], 0.5), ttft_ms_p99=1000 * percentile(last["ttft"], 0.99),
        itl_ms_p50=1000 * percentile(last["itl"], 0.5), itl_ms_p99=1000 * percentile(last["itl"], 0.99),
        capacity=paged_capacity(args.max_seq_len, args.n, args.block_size),
    )
    result["engine_over_static"] = result["engine_tokens_per_s"] / result["static_tokens_per_s"]
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
