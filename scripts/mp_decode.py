"""Compiled decoding at a named shape on 1 or N model-parallel ranks: tokens/s, % of the aggregate read
bandwidth, and the greedy tokens (to compare float32 runs on different numbers of ranks).

    python scripts/mp_decode.py --dtype float32 --out one.json                       # one GPU
    torchrun --standalone --nproc_per_node 2 scripts/mp_decode.py --dtype float32 --out two.json
    python scripts/mp_decode.py --compare one.json two.json        # same greedy tokens? speed ratio

Every rank makes the same full random weights (bench.run.random_weights, one seed), keeps its slice as Meta
cuts a checkpoint (llama.checkpoints.reshard.Layout) and builds the model-parallel Transformer on it, so N
ranks hold exactly the one-process weights. The decode step is compiled (compile=True; with several ranks
its all-reduces are torch's functional collectives, llama/fast/collectives.py). Decode tok/s is a full
greedy generation less a 1-token one, the best of --repeats; the bandwidth is each rank's own reading
(bench.bandwidth) times the number of ranks, and the bytes a step reads are the whole model's, as for one
process. Rank 0 writes the JSON. --device cpu runs the same on gloo (to try the script).
"""

import argparse
import json
import sys
import time

import torch
import torch.distributed as dist

from bench.bandwidth import measure_read_bandwidth
from bench.run import DTYPES, SHAPES, NoStopTokenizer, bytes_per_decode_step, random_weights
from llama.checkpoints.meta import load_into
from llama.checkpoints.reshard import Layout
from llama.distributed import default_dtype, init_distributed, local_rank
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.tokenizer import ChatFormat


def rank_slice(sd: dict, args: ModelArgs, rank: int, world: int) -> dict:
    """This rank's pieces of a full Meta-layout state dict, cut as Meta cuts checkpoints."""
    layout = Layout(parts=world, n_kv_heads=args.n_kv_heads or args.n_heads, head_dim=args.head_dim)
    out = {}
    for name, tensor in sd.items():
        dim = layout.split_dim(name)
        if dim is None or world == 1:
            out[name] = tensor
        else:
            start, end = layout.interval(name, tensor.shape[dim], rank)
            out[name] = tensor.narrow(dim, start, end - start).clone()
    return out


def compare(paths) -> None:
    """Print whether the runs made the same greedy tokens and their speeds against the first."""
    runs = [json.load(open(p)) for p in paths]
    base = runs[0]
    for path, run in zip(paths, runs):
        same = run["tokens"] == base["tokens"]
        print(f"{path}: {run['world']} rank(s), {run['dtype']}, {run['decode_tok_s']:.1f} tok/s "
              f"({run['decode_tok_s'] / base['decode_tok_s']:.2f}x of the first), "
              f"{100 * run['fraction_of_aggregate_read_bandwidth']:.0f}% of {run['world']} x "
              f"{run['read_bandwidth_bytes_s'] / 1e9:.0f} GB/s, same greedy tokens as the first: {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cuda (this rank's GPU) or cpu (gloo)")
    p.add_argument("--no-compile", action="store_true", help="eager, for comparison")
    p.add_argument("--out", default="mp_decode.json")
    p.add_argument("--compare", nargs="+", metavar="JSON", help="compare earlier runs' JSON files and exit")
    opts = p.parse_args()
    if opts.compare:
        return compare(opts.compare)

    device = torch.device("cuda", local_rank()) if opts.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = init_distributed(device)
    rank = dist.get_rank()
    dtype = DTYPES[opts.dtype]
    args = ModelArgs.from_params(SHAPES[opts.shape], max_seq_len=opts.prompt_len + opts.new_tokens,
                                 max_batch_size=opts.batch)
    full = random_weights(args, dtype, device, seed=0)
    traffic = bytes_per_decode_step(full, args, dtype, opts.batch, opts.prompt_len, opts.new_tokens)
    sd = rank_slice(full, args, rank, world)
    del full
    with default_dtype(dtype):
        model = Transformer(args)
    load_into(model, sd, device, dtype, source="random weights")
    del sd
    model.to(device).eval()
    tokenizer = NoStopTokenizer()
    llama = Llama(model, tokenizer, ChatFormat(tokenizer), fast=True, compile=not opts.no_compile)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab_size, (opts.batch, opts.prompt_len), generator=g).tolist()

    def gen(n: int):
        out, _ = llama.generate(prompts, max_gen_len=n, temperature=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    start = time.perf_counter()
    gen(opts.new_tokens)  # compiles (the first batch of a size is slow)
    compile_s = time.perf_counter() - start
    bandwidth = measure_read_bandwidth(device)
    best = float("inf")
    for _ in range(opts.repeats):
        t0 = time.perf_counter()
        gen(1)
        t1 = time.perf_counter()
        tokens = gen(opts.new_tokens)
        t2 = time.perf_counter()
        best = min(best, (t2 - t1) - (t1 - t0))
    steps_s = (opts.new_tokens - 1) / best
    report = {
        "command": "scripts/mp_decode.py " + " ".join(sys.argv[1:]), "world": world, "shape": opts.shape,
        "dtype": opts.dtype, "batch": opts.batch, "compile": not opts.no_compile, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__,
        "decode_tok_s": opts.batch * steps_s, "compile_and_first_run_s": compile_s,
        "read_bandwidth_bytes_s": bandwidth, "bytes_per_decode_step": traffic["total_bytes"],
        "fraction_of_aggregate_read_bandwidth": traffic["total_bytes"] * steps_s / (world * bandwidth),
        "tokens": tokens,
    }
    if rank == 0:
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"{world} rank(s), {opts.dtype}, batch {opts.batch}: {report['decode_tok_s']:.1f} tok/s, "
              f"{100 * report['fraction_of_aggregate_read_bandwidth']:.0f}% of {world} x {bandwidth / 1e9:.0f} GB/s; "
              f"compiled in {compile_s:.0f} s; wrote {opts.out}", flush=True)


if __name__ == "__main__":
    main()
