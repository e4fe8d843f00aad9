"""Where a compiled CPU decode step's time goes, on the bench's small shape with random weights (a measurement,
not part of the library; figures: docs/cpu-step.md, "Ninth pass"):

- `token`: a token of greedy `generate` (64 tokens less a 1-token run);
- `graph`: the step's compiled graph alone, called directly (cpu_step.DirectCall) in a loop;
- `token - graph`: what a token costs beyond its graph (the decode loop, the step's Python), paired by round;
- `layer`: one transformer layer's share of the graph: models of 2 and 10 layers (the small shape otherwise)
  called directly, the difference over 8 (paired by round), with the layer's bytes and its read speed;
- `read`: the bench's read-bandwidth probe (a float32 sum over 1 GB), in every round.

Every part is measured in every round, in turn (the machine's read speed moves in phases: compare within
rounds). With `--perf F` (Linux `perf` installed), the graph loop is also sampled by perf for 10 s and the
samples split by where each thread was: inductor's kernels, libgomp (a thread waiting at a barrier or for
work: the other thread is still in a loop or a single-threaded part), and the rest.

    python scripts/cpu_step_parts.py --quantize int8 [--dtype float32] [--rounds 8] [--perf /tmp/step.data]
    python scripts/cpu_step_parts.py --quantize int8 --vocab 512   # the same with the weights in L3
"""

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bandwidth import measure_read_bandwidth  # noqa: E402
from bench.run import SHAPES, build_ours, bytes_per_decode_step, random_weights  # noqa: E402
from cpu_step_ab import time_a_token  # noqa: E402  (this script's folder is on the path when it runs)
from llama.distributed import init_distributed  # noqa: E402
from llama.model import ModelArgs  # noqa: E402

PROMPT = [[1] * 16]
NEW_TOKENS = 64


def build(n_layers: int, dtype: torch.dtype, quantize: str, vocab_size: int):
    shape = dict(SHAPES["small"], n_layers=n_layers, vocab_size=vocab_size)
    args = ModelArgs(**shape, max_batch_size=1, max_seq_len=256)
    sd = random_weights(args, dtype, torch.device("cpu"), 0)
    llm = build_ours(args, sd, torch.device("cpu"), dtype, fast=True, compile=False, quantize=quantize or None)
    if not hasattr(llm.decode_step, "direct"):
        raise SystemExit("the compiled step was not chosen: run with LLAMA_CPU_STEP=on")
    llm.generate(PROMPT, max_gen_len=8, temperature=0.0)  # compiles; the DirectCall of batch size 1
    step_bytes = bytes_per_decode_step(sd, args, dtype, 1, len(PROMPT[0]), NEW_TOKENS, int8=quantize == "int8")
    return llm, step_bytes["total_bytes"]


def graph_loop(llm, steps: int = NEW_TOKENS) -> Callable[[], float]:
    """ms a call of the step's compiled graph, called directly `steps` times at cache lengths 21 to 20 + steps."""
    direct = llm.decode_step.direct[(1, torch.get_num_threads())]
    tokens = torch.zeros(1, dtype=torch.long)

    def run() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for i in range(steps):
                direct(tokens, torch.full((1,), 20 + i), 21 + i)
            return (time.perf_counter() - t0) / steps * 1e3
    return run


def perf_split(llm, out: str, seconds: float = 10.0) -> None:
    """Sample the graph loop with perf; print each thread's share in inductor's kernels, libgomp and the rest."""
    run = graph_loop(llm)
    pid = os.getpid()
    proc = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "2000", "-o", out, "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    end = time.time() + seconds
    while time.time() < end:
        run()
    proc.send_signal(2)
    proc.wait()
    script = subprocess.run(["perf", "script", "-i", out, "-F", "tid,ip,sym,dso"], capture_output=True, text=True)
    counts: Dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in script.stdout.splitlines():
        m = re.match(r"\s*(\d+)\s+\S+\s+(.*)\((.*)\)\s*$", line)
        if not m:
            continue
        tid, sym, dso = int(m.group(1)), m.group(2), m.group(3)
        if "libgomp" in dso:
            part = "libgomp (waiting)"
        elif re.search(r"cpp_fused|kernel", sym) and dso.endswith(".so") and "torch" not in dso:
            part = "inductor's kernels"
        else:
            part = "the rest (torch, Python, attention, ...)"
        counts[tid][part] += 1
    threads = sorted(counts, key=lambda t: -sum(counts[t].values()))[:torch.get_num_threads()]
    total = sum(sum(counts[t].values()) for t in threads)
    print(f"perf samples of the graph loop ({out}): share of all threads' time")
    for t in threads:
        name = "main" if t == pid else f"thread {t}"
        shares = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in counts[t].most_common())
        print(f"  {name}: {shares}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--quantize", choices=["", "int8"], default="")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=SHAPES["small"]["vocab_size"],
                   help="vocabulary size (512: a step's weights stay in a 32 MiB L3 from step to step)")
    p.add_argument("--perf", default="", help="a file for perf's samples of the graph loop (needs perf)")
    opts = p.parse_args()
    os.environ.setdefault("LLAMA_CPU_STEP", "on")
    torch.set_num_threads(opts.threads)
    init_distributed(torch.device("cpu"))
    dtype = getattr(torch, opts.dtype)
    llm, step_bytes = build(8, dtype, opts.quantize, opts.vocab)
    two, two_bytes = build(2, dtype, opts.quantize, opts.vocab)
    ten, ten_bytes = build(10, dtype, opts.quantize, opts.vocab)
    layer_bytes = (ten_bytes - two_bytes) / 8
    print(f"{torch.backends.cpu.get_cpu_capability()}, {opts.dtype}, {opts.quantize or 'no quantization'}, "
          f"{opts.threads} threads, vocabulary {opts.vocab}; a step reads {step_bytes / 1e6:.1f} MB, "
          f"a layer {layer_bytes / 1e6:.2f} MB")
    parts: Dict[str, Callable[[], float]] = {"token": lambda: time_a_token(llm, PROMPT, NEW_TOKENS),
                                             "graph": graph_loop(llm)}
    parts["2 layers"], parts["10 layers"] = graph_loop(two), graph_loop(ten)
    figures: Dict[str, List[float]] = {name: [] for name in parts}
    reads: List[float] = []
    for r in range(opts.rounds):
        for name in (list(parts) if r % 2 == 0 else list(parts)[::-1]):
            figures[name].append(parts[name]())
        reads.append(measure_read_bandwidth(torch.device("cpu")))
    for name, v in figures.items():
        print(f"  {name:22s} median {statistics.median(v):.3f} ms (best {min(v):.3f})")
    loop = sorted(a - b for a, b in zip(figures["token"], figures["graph"]))
    layer = sorted((b - a) / 8 for a, b in zip(figures["2 layers"], figures["10 layers"]))
    print(f"  token - graph: median {1e3 * statistics.median(loop):.0f} us a token "
          f"(quartiles {1e3 * loop[len(loop) // 4]:.0f}-{1e3 * loop[3 * len(loop) // 4]:.0f})")
    print(f"  a layer: median {1e3 * statistics.median(layer):.0f} us "
          f"(quartiles {1e3 * layer[len(layer) // 4]:.0f}-{1e3 * layer[3 * len(layer) // 4]:.0f}), "
          f"{layer_bytes / statistics.median(layer) / 1e6:.1f} GB/s")
    best_read = max(reads)
    print(f"  read bandwidth: best {best_read / 1e9:.1f}, median {statistics.median(reads) / 1e9:.1f} GB/s; "
          f"graph at {step_bytes / (min(figures['graph']) / 1e3) / best_read:.0%} of the best "
          f"(best graph), token at {step_bytes / (min(figures['token']) / 1e3) / best_read:.0%}")
    if opts.perf:
        perf_split(llm, opts.perf)


if __name__ == "__main__":
    main()
