"""The decode attention kernel (llama.fast.decode_attention) on a GPU: alone against SDPA with the step's mask,
then in the compiled batch-1 decode step at the 8B shape, with and without it, in one process.

    python scripts/decode_attention_step.py [--kv-lens 160 1024 4096] [--systems bf16 int8-attn int8-attn-rotary]
        [--repeats 3] [--profile SYSTEM ...] [--out attention_step.json]

Alone: for each kv_len, every candidate block shape (decode_attention.CANDIDATES) and SDPA with the step's bool
mask, each a CUDA-graph replay of a pass over 32 layers' caches (1 row, 8 KV heads of 128, 32 query heads,
bf16, random; the row at the last position, so that both read the whole of kv_len), with and without the
dependent launch: microseconds a layer (the load-time pick's own timing, decode_attention.time_candidates).

Step: the systems built as the bench builds them (bench.run.build_ours, compile=True, random weights, prompt 32,
128 new tokens), alternating rounds (bench.run.measure): bf16 and int8 with SDPA (LLAMA_DECODE_ATTENTION=off)
and with the kernel (=on: the fastest candidate, whatever SDPA's time), the kernel alone or with the step's
rotation and cache writes in it ("-rotary": LLAMA_DECODE_ATTENTION_ROTARY=auto), so that the ratios come from one
run.
--profile SYSTEM ...: afterwards, torch's profiler over those systems' decode steps (kernels a step, as
scripts/profile_step.py). Partial reports are written to --out as it goes.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

from bench.bandwidth import measure_read_bandwidth
from bench.run import SHAPES, build_ours, log, measure, ours_system, random_weights, same_tokens, summarise
from llama.distributed import init_distributed
from llama.fast import decode_attention as A
from llama.fast.int8_gemv_kernels import pdl_supported
from llama.model import ModelArgs

# name: (quantize, LLAMA_DECODE_ATTENTION, LLAMA_DECODE_ATTENTION_ROTARY)
SYSTEMS = {"bf16": (None, "off", "off"), "bf16-attn": (None, "on", "off"), "bf16-attn-rotary": (None, "on", "auto"),
           "int8": ("int8", "off", "off"), "int8-attn": ("int8", "on", "off"),
           "int8-attn-rotary": ("int8", "on", "auto")}


def alone(kv_lens, device: torch.device, layers: int = 32, heads=(32, 8, 128)) -> list:
    """Microseconds a layer of every candidate and of SDPA with the mask, at each kv_len, PDL off and on."""
    rows = []
    n_heads, n_kv_heads, head_dim = heads
    for kv_len in kv_lens:
        caches = [(torch.randn(1, n_kv_heads, kv_len, head_dim, device=device, dtype=torch.bfloat16),
                   torch.randn(1, n_kv_heads, kv_len, head_dim, device=device, dtype=torch.bfloat16))
                  for _ in range(layers)]
        for pdl in (False, True) if pdl_supported(device) else (False,):
            times = A.time_candidates(caches, n_heads, kv_len, pdl)
            best = min((c for c in times if c != A.SDPA), key=times.__getitem__)
            row = {"kv_len": kv_len, "pdl": pdl, "sdpa_us": 1e6 * times[A.SDPA], "best": list(best),
                   "best_us": 1e6 * times[best], "all_us": {str(tuple(c)) if c != A.SDPA else c: 1e6 * t
                                                             for c, t in times.items()}}
            rows.append(row)
            log(f"alone kv_len {kv_len:5d} pdl {pdl!s:5s}: SDPA + mask {row['sdpa_us']:6.2f} us, best kernel "
                f"{row['best_us']:6.2f} us {tuple(best)}  ({row['sdpa_us'] / row['best_us']:.2f}x)")
            for c, t in sorted(times.items(), key=lambda ct: ct[1]):
                log(f"    {str(c):60s} {1e6 * t:7.2f} us")
        del caches
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv-lens", nargs="*", type=int, default=[160, 1024, 4096])
    p.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--profile", nargs="*", default=[], choices=list(SYSTEMS))
    p.add_argument("--out", default="attention_step.json")
    opts = p.parse_args()
    t0 = time.time()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    init_distributed(device)
    report = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "shape": opts.shape,
              "prompt_len": opts.prompt_len, "new_tokens": opts.new_tokens, "repeats": opts.repeats,
              "command": "python scripts/decode_attention_step.py " + " ".join(sys.argv[1:])}

    def save():
        report["elapsed_s"] = time.time() - t0
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=1)

    report["alone"] = alone(opts.kv_lens, device)
    save()
    if not opts.systems:
        return
    dtype = torch.bfloat16
    args = ModelArgs.from_params(SHAPES[opts.shape], max_seq_len=opts.prompt_len + opts.new_tokens, max_batch_size=1)
    sd = random_weights(args, dtype, device, seed=0)
    systems, builds = [], {}
    for name in opts.systems:
        quantize, setting, rotary = SYSTEMS[name]
        os.environ[A.ENV], os.environ[A.ROTARY_ENV] = setting, rotary
        start = time.time()
        llama = build_ours(args, sd, device, dtype, True, True, quantize)
        builds[name] = {"build_s": time.time() - start, "attention": A.picked_attention(llama.model)}
        systems.append(ours_system(name, llama))
        log(f"built {name} in {builds[name]['build_s']:.1f} s; attention {builds[name]['attention']}")
    report["builds"] = builds
    report["pick_times_us"] = [{"key": list(map(str, k)), "us": {str(c): 1e6 * t for c, t in v.items()}}
                               for k, v in A.PICK_TIMES.items()]
    save()
    prompts = torch.randint(0, args.vocab_size, (1, opts.prompt_len), generator=torch.Generator().manual_seed(0))
    report["read_bandwidth_bytes_s"] = max([measure_read_bandwidth(device)] + measure(
        systems, prompts.to(device), opts.new_tokens, opts.repeats, 1, device, "bf16 batch 1"))
    res = {s.name: summarise(s, 1, opts.prompt_len, opts.new_tokens) for s in systems}
    for a, b in (("bf16", "bf16-attn"), ("int8", "int8-attn"), ("bf16", "int8"), ("bf16-attn", "int8-attn"),
                 ("bf16", "int8-attn"), ("int8-attn", "int8-attn-rotary"), ("bf16-attn", "bf16-attn-rotary"),
                 ("bf16", "int8-attn-rotary"), ("bf16", "bf16-attn-rotary")):
        if a in res and b in res:
            res[f"ratio_{b}_to_{a}"] = res[b]["decode_tok_s"] / res[a]["decode_tok_s"]
            res[f"median_ratio_{b}_to_{a}"] = res[b]["median_decode_tok_s"] / res[a]["median_decode_tok_s"]
    tokens = {s.name: s.tokens for s in systems}
    for a, b in (("bf16", "bf16-attn"), ("int8", "int8-attn"), ("int8-attn", "int8-attn-rotary"),
                 ("bf16", "bf16-attn-rotary")):
        if a in tokens and b in tokens:
            same_tokens(res, tokens[a], tokens[b], f"{a}_vs_{b}")
    report["results"] = res
    save()
    for s in systems:
        r = res[s.name]
        print(f"{s.name:10s} {r['decode_tok_s']:7.1f} tok/s (median {r['median_decode_tok_s']:7.1f})", flush=True)
    print({k: v for k, v in res.items() if not isinstance(v, dict)}, flush=True)
    if opts.profile:
        spec = importlib.util.spec_from_file_location("profile_step", os.path.join(os.path.dirname(__file__),
                                                                                    "profile_step.py"))
        prof = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prof)
        prompts = prompts.to(device)
        report["profile"] = {}
        for name in opts.profile:
            gen = next(s for s in systems if s.name == name).generate
            one = prof.kernel_times(lambda: gen(prompts, 1), device)
            full = prof.kernel_times(lambda: gen(prompts, opts.new_tokens), device)
            steps = opts.new_tokens - 1
            per_step = {n: ((c - one.get(n, (0, 0))[0]) / steps, (us - one.get(n, (0, 0.0))[1]) / steps)
                        for n, (c, us) in full.items()}
            kept = sorted(((n, c, us) for n, (c, us) in per_step.items() if us > 0), key=lambda t: -t[2])
            report["profile"][name] = {"kernels": kept, "kernels_us_per_step": sum(us for _, _, us in kept),
                                       "launches_per_step": sum(c for _, c, _ in kept)}
            print(f"profile {name}: {report['profile'][name]['kernels_us_per_step']:.1f} us of kernels a step, "
                  f"{report['profile'][name]['launches_per_step']:.0f} launches", flush=True)
            for n, c, us in kept[:25]:
                print(f"   {us:8.1f} us  {c:5.1f}x  {us / max(c, 1e-9):7.2f} us/call  {n[:100]}", flush=True)
            save()

if __name__ == "__main__":
    main()
