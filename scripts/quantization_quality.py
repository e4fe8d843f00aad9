"""What int8 and int4 weight-only quantization cost the demo model: held-out perplexity and greedy agreement,
against float32 and bf16 on the same weights (a measurement, not a test; figures in docs/quantization.md).

    python scripts/quantization_quality.py [--corpus PATH/Rdata.rdb] [--windows N] [--schemes int8 int4]

The held-out text is the last 5% of each of Austen's six novels, which neither the demo's tokenizer nor the
model saw in training (scripts/train_demo.py; the corpus: scripts/austen.py). It is scored by `Llama.score`
in windows of 256 tokens (<|begin_of_text|> and 255 of text), the text laid out as the training script
lays it (paragraphs on one line, each followed by a blank line). Greedy agreement: 64 tokens from the first
words of held-out paragraphs, int8 (int4) against the same activation dtype without quantization.
"""

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import austen  # noqa: E402
from llama import Llama  # noqa: E402
from llama.cli.demo import DEMO_DIR  # noqa: E402

HOLDOUT = 0.05  # as scripts/train_demo.py
WINDOW = 256


def held_out_windows(corpus: str, tokenizer, limit: int) -> List[List[int]]:
    novels = austen.read_novels(austen.find_rdata(corpus))
    ids: List[int] = []
    for _, text in novels:  # as scripts/train_demo.py lays the held-out text out: paragraphs, then an eos
        for paragraph in austen.paragraphs(austen.split_holdout(text, HOLDOUT)[1]):
            ids += tokenizer.encode(paragraph + "\n\n", bos=False, eos=False)
        ids.append(tokenizer.eos_id)
    windows = [[tokenizer.bos_id] + ids[i : i + WINDOW - 1] for i in range(0, len(ids), WINDOW - 1)]
    windows = [w for w in windows if len(w) > 1]
    return windows[:limit] if limit else windows


def greedy_prompts(corpus: str, n: int) -> List[str]:
    novels = austen.read_novels(austen.find_rdata(corpus))
    paras = [p for _, text in novels for p in austen.paragraphs(austen.split_holdout(text, HOLDOUT)[1])
             if len(p.split()) > 20]
    step = max(1, len(paras) // n)
    return [" ".join(p.split()[:8]) for p in paras[::step][:n]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="", help="Rdata.rdb of r-cran-janeaustenr (default: where austen.py looks)")
    p.add_argument("--windows", type=int, default=0, help="score only the first N windows (default: all)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--schemes", nargs="+", default=["int8"], choices=["int8", "int4"])
    opts = p.parse_args()
    results: Dict[str, Dict] = {}
    for dtype in (torch.float32, torch.bfloat16):
        for quantize in (None, *opts.schemes):
            name = f"{f'{quantize} weights, ' if quantize else ''}{str(dtype).replace('torch.', '')}"
            llama = Llama.build(str(DEMO_DIR), None, WINDOW, 16, device="cpu", dtype=dtype, quantize=quantize)
            windows = held_out_windows(opts.corpus, llama.tokenizer, opts.windows)
            start = time.time()
            scores = llama.score(windows)
            loglik, n = math.fsum(s["log_likelihood"] for s in scores), sum(s["n_tokens"] for s in scores)
            prompts = greedy_prompts(opts.corpus, opts.prompts)
            gen, _ = llama.generate([llama.tokenizer.encode(t, bos=True, eos=False) for t in prompts],
                                    max_gen_len=64, temperature=0, ignore_eos=True)
            with torch.inference_mode():  # full windows only: one (4, 256) batch
                logits = llama.model.forward(torch.tensor([w for w in windows if len(w) == WINDOW][:4]), 0)
            results[name] = {"nll": -loglik / n, "tokens": n, "generated": gen, "logits": logits.float()}
            print(f"{name:28s} held-out {n} tokens: {-loglik / n:.4f} nats/token, perplexity "
                  f"{math.exp(-loglik / n):.3f} ({time.time() - start:.1f} s)", flush=True)
    base = results["float32"]["nll"]
    for name, r in results.items():
        print(f"{name:28s} perplexity {math.exp(r['nll']):.3f}, {100 * (math.exp(r['nll'] - base) - 1):+.2f}% "
              "against float32")
    for scheme in opts.schemes:
        for dtype in ("float32", "bfloat16"):
            a, b = results[dtype]["generated"], results[f"{scheme} weights, {dtype}"]["generated"]
            same = sum(x == y for x, y in zip(a, b))
            prefix = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x)) for x, y in zip(a, b)]
            print(f"greedy, {scheme} vs {dtype}: {same}/{len(a)} continuations of 64 tokens identical; agreeing "
                  f"prefix {sum(prefix)}/{sum(map(len, a))} tokens")
    pairs = [(f"{scheme} weights, {dtype}", dtype) for scheme in opts.schemes for dtype in ("float32", "bfloat16")]
    for x, y in pairs + [("bfloat16", "float32")]:
        d, ref = results[x]["logits"] - results[y]["logits"], results[y]["logits"]
        print(f"logits, {x} vs {y}: RMS difference {(d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item():.2%} "
              f"of the RMS logit, max |difference| {d.abs().max().item():.3f}, same argmax at "
              f"{(results[x]['logits'].argmax(-1) == ref.argmax(-1)).float().mean().item():.1%} of positions")
    a, b = results["float32"]["generated"], results["bfloat16"]["generated"]
    print(f"greedy, bfloat16 vs float32 (for scale): {sum(x == y for x, y in zip(a, b))}/{len(a)} identical")


if __name__ == "__main__":
    main()
