"""The compiled batch-1 decode step at the 8B shape, several systems in one process, alternating rounds as the
bench does (bench.run.measure): bf16 (ours), int8 with inductor's products (ours-int8-inductor:
LLAMA_INT8_GEMV=off, the form before llama.fast.int8_gemv), int8 with the GEMV on --roles' products without
prologues (ours-int8-gemv: LLAMA_INT8_GEMV_FUSE=off; the second session's form with its roles w2,wo,output)
and int8 with the GEMV on --fused-roles' products, the RMSNorm, the SwiGLU and the residual add taken into the
kernel (ours-int8-fused: LLAMA_INT8_GEMV_FUSE=on), or all but the SwiGLU (ours-int8-fused-noswiglu:
LLAMA_INT8_GEMV_FUSE=rms_norm,residual). Each of these launches the kernel plainly (LLAMA_INT8_GEMV_PDL=off);
ours-int8-pdl is ours-int8-fused-noswiglu with the kernel as a programmatic dependent launch, ours-int8-pdl-apart
that with each RMSNorm normed in the product's kernel or a kernel of its own, whichever timed faster at load
(LLAMA_INT8_GEMV_NORM_APART=auto; both the defaults since issue 18's sixth session). Default: ours,
ours-int8-gemv, ours-int8-fused.

    python scripts/int8_gemv_step.py [--sweep int8_gemv_sweep.json] [--roles w2,wo,output|from-sweep]
        [--fused-roles all] [--out step.json]

After the builds it also times every product shape alone, plain and with its prologue (llama.fast.int8_gemv's
pick timings, each candidate block shape a CUDA-graph replay over >= 256 MiB of the model's layers, per
product): the report's "alone". Partial reports are written to --out after the builds and after the measurement.

--sweep: candidates for the build-time pick from scripts/int8_gemv_sweep.py's output (each shape's top block
shapes); --roles from-sweep: the GEMV only for the shapes where the sweep found it faster than inductor's
form (3 us granted to the shapes after a norm, which inductor fuses into its product and the GEMV cannot).
--profile: afterwards, torch's profiler over the last system's decode steps (as scripts/profile_step.py).
--extra-candidates: block shapes added to the pick's candidates, e.g. "2,4096,1,8 4,1024,1,4".
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

from bench.bandwidth import measure_read_bandwidth
from bench.run import (SHAPES, build_ours, bytes_per_decode_step, log, measure, ours_system, random_weights,
                       same_tokens, summarise)
from llama.distributed import init_distributed
from llama.fast import int8_gemv as G
from llama.model import ModelArgs

SHAPE_OF = {(6144, 4096): "wqkv", (4096, 4096): "wo", (28672, 4096): "w13", (4096, 14336): "w2",
            (128256, 4096): "output"}
AFTER_NORM = ("wqkv", "w13", "output")


def picked(llama) -> dict:
    """{shape name: block shape} of the GEMV layers of a built model."""
    out = {}
    for m in llama.model.modules():
        cfg = getattr(getattr(m, "gemv", None), "cfg", None)
        if cfg is not None:
            out[SHAPE_OF.get((m.out_features, m.in_features), f"{m.out_features}x{m.in_features}")] = (
                list(cfg) + [PROLOGUE_NAMES[m.gemv.prologue]] + (["apart"] if m.gemv.norm_apart else []))
    return out


PROLOGUE_NAMES = {G.PLAIN: "plain", G.RMS_NORM: "rms_norm", G.SWIGLU: "swiglu"}


def alone_times(model) -> None:
    """Time each int8 product shape of `model` alone, plain and with the prologue the fast path gives it
    (G.PICK_TIMES collects the pick's timings), where the builds have not already."""
    layers = {}
    for path, m in model.named_modules():
        if getattr(m, "scale_act", None) is not None:
            layers.setdefault((m.out_features, m.in_features), (path.rpartition(".")[2], []))[1].append(m)
    for (n, k), (role, ms) in layers.items():
        for prologue in {G.PLAIN, G.PROLOGUE_OF.get(role, G.PLAIN)}:
            if not any(key[:4] == (n, k, str(ms[0].dtype), prologue) for key in G.PICK_TIMES):
                G.pick_config(ms, prologue=prologue, pdl=G.pdl_supported(ms[0].scale.device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep", default=None)
    p.add_argument("--roles", default="w2,wo,output")
    p.add_argument("--fused-roles", default="all")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--systems", nargs="+", default=["ours", "ours-int8-gemv", "ours-int8-fused"],
                   choices=["ours", "ours-int8-inductor", "ours-int8-gemv", "ours-int8-fused-noswiglu",
                            "ours-int8-fused", "ours-int8-pdl", "ours-int8-pdl-apart"])
    p.add_argument("--extra-candidates", nargs="*", default=[])
    p.add_argument("--out", default="int8_gemv_step.json")
    p.add_argument("--device", default="cuda", help="cuda (or cpu, to try the script: no GEMV there)")
    opts = p.parse_args()
    t0 = time.time()
    device = torch.device("cuda", 0) if opts.device == "cuda" else torch.device(opts.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    bandwidth = measure_read_bandwidth(device)
    report = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": opts.shape,
              "prompt_len": opts.prompt_len, "new_tokens": opts.new_tokens, "repeats": opts.repeats,
              "command": "python scripts/int8_gemv_step.py " + " ".join(sys.argv[1:])}
    roles = opts.roles
    if opts.sweep:
        sweep = json.load(open(opts.sweep))
        cands = []
        for best in sweep["best"].values():
            for c in best["top"][:3]:
                if tuple(c) not in cands:
                    cands.append(tuple(c))
        G.CANDIDATES = tuple(G.GemvConfig(*c) for c in cands)
        report["candidates"] = cands
        if roles == "from-sweep":
            ind = {r["shape"]: r["seconds"] for r in sweep["rows"] if r["form"] == "inductor"}
            wins = [s for s, b in sweep["best"].items()
                    if s in ind and b["seconds"] + (3e-6 if s in AFTER_NORM else 0) < ind[s]]
            roles = ",".join(wins) if wins else "off"
    if opts.extra_candidates:
        G.CANDIDATES = tuple(G.CANDIDATES) + tuple(G.GemvConfig(*map(int, c.split(","))) for c in opts.extra_candidates)
        G.SWIGLU_CANDIDATES = tuple(G.SWIGLU_CANDIDATES) + tuple(G.CANDIDATES[-len(opts.extra_candidates):])
        report["extra_candidates"] = opts.extra_candidates
    report["roles"] = roles
    log(f"roles {roles}; candidates {getattr(G, 'CANDIDATES')}")
    dtype = torch.bfloat16
    args = ModelArgs.from_params(SHAPES[opts.shape], max_seq_len=opts.prompt_len + opts.new_tokens, max_batch_size=1)
    sd = random_weights(args, dtype, device, seed=0)
    systems, builds = [], {}
    # name: (quantize, LLAMA_INT8_GEMV, LLAMA_INT8_GEMV_FUSE, LLAMA_INT8_GEMV_PDL, LLAMA_INT8_GEMV_NORM_APART)
    variants = {"ours": (None, "off", "off", "off", "off"),
                "ours-int8-inductor": ("int8", "off", "off", "off", "off"),
                "ours-int8-gemv": ("int8", roles, "off", "off", "off"),
                "ours-int8-fused-noswiglu": ("int8", opts.fused_roles, "rms_norm,residual", "off", "off"),
                "ours-int8-fused": ("int8", opts.fused_roles, "on", "off", "off"),
                "ours-int8-pdl": ("int8", opts.fused_roles, "rms_norm,residual", "auto", "off"),
                "ours-int8-pdl-apart": ("int8", opts.fused_roles, "rms_norm,residual", "auto", "auto")}
    report["fused_roles"] = opts.fused_roles
    for name in [v for v in variants if v in opts.systems]:
        quantize, *env = variants[name]
        start = time.time()
        for var, value in zip((G.ENV, G.FUSE_ENV, G.PDL_ENV, G.NORM_APART_ENV), env):
            os.environ[var] = value
        llama = build_ours(args, sd, device, dtype, True, True, quantize)
        builds[name] = {"build_s": time.time() - start, "picked": picked(llama)}
        systems.append(ours_system(name, llama))
        log(f"built {name} in {builds[name]['build_s']:.1f} s; gemv {builds[name]['picked']}")
    report["builds"] = builds
    if device.type == "cuda" and any(s.name != "ours" for s in systems):
        alone_times(systems[-1].llama.model)
        report["alone"] = [{"shape": SHAPE_OF.get((n, k), f"{n}x{k}"), "prologue": PROLOGUE_NAMES[pro], "pdl": pdl,
                            "norm_apart": apart, "best_us": 1e6 * min(t.values()), "best": list(min(t, key=t.get)),
                            "all_us": {str(tuple(c)): 1e6 * v for c, v in t.items()}}
                           for (n, k, _, pro, pdl, apart), t in G.PICK_TIMES.items()]
        for a in report["alone"]:
            log(f"alone {a['shape']:7s} {a['prologue']:8s} pdl {a['pdl']!s:5s} apart {a['norm_apart']!s:5s} "
                f"{a['best_us']:7.1f} us {a['best']}")
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)
    prompts = torch.randint(0, args.vocab_size, (1, opts.prompt_len), generator=torch.Generator().manual_seed(0))
    prompts = prompts.to(device)
    rounds_bw = measure(systems, prompts, opts.new_tokens, opts.repeats, 1, device, "bf16 batch 1")
    bandwidth = max([bandwidth] + rounds_bw)
    report["read_bandwidth_bytes_s"] = bandwidth
    traffic = {q: bytes_per_decode_step(sd, args, dtype, 1, opts.prompt_len, opts.new_tokens, int8=q)["total_bytes"]
               for q in (False, True)}
    res = {}
    for s in systems:
        r = summarise(s, 1, opts.prompt_len, opts.new_tokens)
        r["bytes_per_decode_step"] = traffic[s.name != "ours"]
        r["fraction_of_read_bandwidth"] = r["bytes_per_decode_step"] * r["decode_steps_s"] / bandwidth
        res[s.name] = r
    for name in ("ours-int8-inductor", "ours-int8-gemv", "ours-int8-fused-noswiglu", "ours-int8-fused",
                 "ours-int8-pdl", "ours-int8-pdl-apart"):
        if name in res and "ours" in res:
            res[f"ratio_{name}_to_bf16"] = res[name]["decode_tok_s"] / res["ours"]["decode_tok_s"]
            res[f"median_ratio_{name}_to_bf16"] = (res[name]["median_decode_tok_s"]
                                                   / res["ours"]["median_decode_tok_s"])
    tokens = {s.name: s.tokens for s in systems}
    for a, b, key in (("ours-int8-inductor", "ours-int8-gemv", "int8_inductor_vs_gemv"),
                      ("ours", "ours-int8-gemv", "bf16_vs_int8_gemv"),
                      ("ours-int8-gemv", "ours-int8-fused", "int8_gemv_vs_fused"),
                      ("ours-int8-fused-noswiglu", "ours-int8-fused", "int8_fused_noswiglu_vs_fused"),
                      ("ours-int8-fused-noswiglu", "ours-int8-pdl", "int8_fused_noswiglu_vs_pdl"),
                      ("ours-int8-pdl", "ours-int8-pdl-apart", "int8_pdl_vs_pdl_apart")):
        if a in tokens and b in tokens:
            same_tokens(res, tokens[a], tokens[b], key)
    report["results"] = res
    report["elapsed_s"] = time.time() - t0
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)
    for s in systems:
        r = res[s.name]
        print(f"{s.name:20s} {r['decode_tok_s']:7.1f} tok/s (median {r['median_decode_tok_s']:7.1f}), "
              f"{100 * r['fraction_of_read_bandwidth']:5.1f}% of {bandwidth / 1e9:.0f} GB/s", flush=True)
    print({k: v for k, v in res.items() if not isinstance(v, dict)}, flush=True)
    if opts.profile:
        spec = importlib.util.spec_from_file_location("profile_step", os.path.join(os.path.dirname(__file__),
                                                                                    "profile_step.py"))
        prof = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prof)
        gen = systems[-1].generate
        one = prof.kernel_times(lambda: gen(prompts, 1), device)
        full = prof.kernel_times(lambda: gen(prompts, opts.new_tokens), device)
        steps = opts.new_tokens - 1
        per_step = {n: ((c - one.get(n, (0, 0))[0]) / steps, (us - one.get(n, (0, 0.0))[1]) / steps)
                    for n, (c, us) in full.items()}
        top = sorted(((n, c, us) for n, (c, us) in per_step.items() if us > 0), key=lambda t: -t[2])[:20]
        report["profile_top_kernels"] = top
        report["profile_kernels_us_per_step"] = sum(us for _, _, us in top)
        for n, c, us in top:
            print(f"   {us:8.1f} us  {c:5.1f}x  {us / max(c, 1e-9):7.2f} us/call  {n[:100]}", flush=True)
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
