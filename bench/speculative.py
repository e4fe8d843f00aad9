"""Speculative decoding against plain decoding on the demo model, greedy, in one run (a measurement, not a test).

    python -m bench.speculative [--new-tokens 48] [--repeats 3] [--k 4,8] [--threads 1] [--device cuda]
                                [--compile] [--draft-layers 0,2,4,5]
                                [--drafters lookup,eagle,eagle-fp32,eagle-full,eagle-tree]
                                [--eagle models/demo-eagle[,OTHER_HEAD_DIR]] [--min-confidence P] [--tree 3x8x3,4x12x4]
                                [--draft-vocab auto|all|N] [--draft-dtype auto|float32|bfloat16] [--out FILE.json]
                                [--graph-pass] [--eager-stages] [--row-products] [--breakdown]

Two prompt sets: copy-heavy (an Austen sentence three times, then its first words: the model is invited to
copy, as far as this toy model copies: it mostly does not) and held-out Austen (sentences from the last
chapters, quoted from memory: the 5% of each novel the demo model never saw). For each prompt, plain decoding
(`Llama.generate`, temperature 0, the fast loop), the speculative loop without drafts (`naive_generate`) and
speculative decoding (`speculative_generate`, each k) run in rotating order `--repeats` times, each
generating exactly --new-tokens tokens (stop tokens ignored); the best time of each counts. Per set it
prints tokens/s, the ratio to plain decoding in wall time and in this process's CPU time (steadier on a
shared machine), the mean accepted length and acceptance by draft position, and checks the tokens are
equal. Drafters (--drafters): `lookup` (prompt lookup), `eagle` (the demo's EAGLE-style head,
models/demo-eagle, made by scripts/train_eagle.py, drafting from its reduced vocabulary in the named
setting's dtype, int8 on the CPU; --min-confidence ends its chains early), `eagle-fp32` (the same in the
model's float32), `eagle-full` (the same head over the whole vocabulary, float32), `eagle-tree` (the head
drafting trees of each --tree shape, verified in one pass, as the named setting); several --eagle heads
(comma-separated) each run every eagle drafter, in the same process; with
--draft-layers 0,2,4,5 the demo cut to those layers (its embedding and output too) also runs as a draft model.
With --compile (CUDA) the decode step replays CUDA graphs, and greedy speculative rows with prompt lookup, the
EAGLE chain or no drafts run as whole passes on the device, each one CUDA graph (llama.speculative.graph_pass;
--graph-pass runs the same stages eagerly on the CPU); --breakdown then times each pass's stages and the plain
step (bench/graph_pass_timing.py).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from bench.run import machine_info
from llama.cli.demo import DEMO_DIR, check_demo_files
from llama.generation import Llama
from llama.speculative import (
    Drafter, DraftModel, PromptLookup, SpeculativeStats, naive_generate, speculative_generate,
)
from llama.speculative.eagle import EagleDrafter
from llama.speculative.eagle_tree import EagleTreeDrafter
from llama.speculative.settings import eagle_draft_options

PASSAGES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want"
    " of a wife. However little known the feelings or views of such a man may be on his first entering a"
    " neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is"
    " considered as the rightful property of some one or other of their daughters.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite"
    " some of the best blessings of existence; and had lived nearly twenty-one years in the world with very"
    " little to distress or vex her.",
    "The family of Dashwood had long been settled in Sussex. Their estate was large, and their residence was at"
    " Norland Park, in the centre of their property, where, for many generations, they had lived in so"
    " respectable a manner as to engage the general good opinion of their surrounding acquaintance.",
]
# Each passage's first sentence three times, then its first words: the demo model, a toy, copies poorly from
# one occurrence (tried: "passage, then 'Copy the passage above exactly:', then its start"), better from three.
SENTENCES = [p[: p.index(".") + 1] if "." in p[:200] else p[: p.index(";") + 1] for p in PASSAGES]
COPY_HEAVY = [f"{s}\n{s}\n{s}\n{s[: s.index(' ', 10)]}" for s in SENTENCES]
HELD_OUT = [
    "Happy for all her maternal feelings was the day on which Mrs. Bennet got rid of her two most deserving"
    " daughters.",
    "The wedding was very much like other weddings, where the parties have no taste for finery or parade;",
    "Let other pens dwell on guilt and misery.",
    "Between Barton and Delaford, there was that constant communication which strong family affection would"
    " naturally dictate;",
]


def timed(fn: Callable[[], Any]) -> Tuple[float, float, Any]:
    """(wall seconds, this process's CPU seconds, fn())."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def run_set(llama: Llama, prompts: List[str], drafter: Drafter, ks: List[int], new_tokens: int,
            repeats: int) -> List[Dict]:
    """Plain decoding (Llama.generate), the same loop without drafts (naive_generate) and speculative
    decoding with each k, on every prompt in rotating order `repeats` times; the best time of each counts.
    Returns one result per k (and one for the naive loop), with speed-ups over plain decoding."""
    methods: Dict[str, Callable[[List[int]], Any]] = {
        "plain": lambda ids: (llama.generate([ids], new_tokens, temperature=0, ignore_eos=True)[0][0], None),
        "naive": lambda ids: naive_generate(llama, [ids], new_tokens, ignore_eos=True)[::2],
    }
    for k in ks:
        methods[f"k={k}"] = (lambda ids, k=k: speculative_generate(llama, [ids], new_tokens, drafter, k,
                                                                   ignore_eos=True)[::2])
    names = list(methods)
    wall = {n: 0.0 for n in names}
    cpu = {n: 0.0 for n in names}
    stats: Dict[str, Optional[SpeculativeStats]] = {n: None for n in names}
    same = {n: True for n in names}
    tokens = 0
    for text in prompts:
        ids = llama.tokenizer.encode(text, bos=True, eos=False)
        best_wall = {n: float("inf") for n in names}
        best_cpu = {n: float("inf") for n in names}
        outputs: Dict[str, Any] = {}
        for r in range(repeats):  # rotating order, so that every method sees the same machine
            for n in names[r % len(names):] + names[: r % len(names)]:
                w, c, outputs[n] = timed(lambda: methods[n](ids))
                best_wall[n], best_cpu[n] = min(best_wall[n], w), min(best_cpu[n], c)
        want = outputs["plain"][0]
        tokens += len(want)
        for n in names:
            wall[n] += best_wall[n]
            cpu[n] += best_cpu[n]
            got, row_stats = outputs[n]
            same[n] &= (got[0] if n != "plain" else got) == want
            if row_stats is not None:
                stats[n] = row_stats if stats[n] is None else stats[n].add(row_stats)
    results = []
    for n in names[1:]:
        st = stats[n]
        results.append({
            "drafter": "none (the same loop)" if n == "naive" else repr(drafter), "method": n,
            "k": st.k, "prompts": len(prompts), "tokens": tokens, "same_tokens": same[n],
            "plain_tok_s": tokens / wall["plain"], "speculative_tok_s": tokens / wall[n],
            "speed_up": wall["plain"] / wall[n], "speed_up_cpu_time": cpu["plain"] / cpu[n],
            "mean_accepted_length": st.mean_accepted_length, "drafts_per_step": st.drafted / st.steps,
            "steps": st.steps, "ms_per_pass": wall[n] * 1e3 / st.steps, "plain_ms_per_token": wall["plain"] * 1e3 / tokens,
            "graph_pass": _graph_pass_used(llama, drafter if n != "naive" else Drafter(), st.k),
            "acceptance_by_position": [None if a is None else round(a, 3) for a in st.acceptance_by_position],
        })
    return results


def _graph_pass_used(llama: Llama, drafter: Drafter, k: int) -> bool:
    """Whether the speculative loop ran these rows through a GraphPass (llama.speculative.graph_pass)."""
    from llama.speculative.graph_pass import _passes, pass_key

    return any(pass_key(drafter, k, gp.graph is not None) == key for key, gp in _passes.get(llama.model, {}).items())


def truncated_demo(layers: List[int], dir_: str, device: str = "cpu") -> Llama:
    """The demo model with only the given layers (renumbered in order; its embedding, final norm and output
    kept), written in Meta's layout and built by Llama.build: a cheap draft model."""
    out = Path(dir_)
    params = json.loads((DEMO_DIR / "params.json").read_text())
    params["n_layers"] = len(layers)
    (out / "params.json").write_text(json.dumps(params))
    state = torch.load(DEMO_DIR / "consolidated.00.pth", map_location="cpu", weights_only=True)
    kept = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for new, old in enumerate(layers):
        prefix = f"layers.{old}."
        kept.update({f"layers.{new}." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    torch.save(kept, out / "consolidated.00.pth")
    shutil.copy(DEMO_DIR / "tokenizer.model", out / "tokenizer.model")
    return Llama.build(str(out), None, max_seq_len=256, max_batch_size=1, device=device)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.speculative", description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", default="4", help="drafts per pass; several: 4,8")
    p.add_argument("--draft-layers", default="",
                   help="also a draft model: the demo with only these layers, e.g. 0,2,4,5 (of 0..5)")
    p.add_argument("--drafters", default="lookup,eagle",
                   help="comma-separated: lookup, eagle (draft vocabulary, int8 on the CPU), eagle-fp32 (draft "
                        "vocabulary, float32), eagle-full (whole vocabulary), eagle-tree")
    p.add_argument("--eagle", default=str(Path(DEMO_DIR).parent / "demo-eagle"),
                   help="the EAGLE-style head's directory (several, comma-separated: each runs every eagle drafter)")
    p.add_argument("--min-confidence", type=float, default=0.0, help="the eagle drafter's min_confidence")
    p.add_argument("--tree", default="3x10x4", help="eagle-tree shapes BRANCHxNODESxDEPTH, comma-separated")
    p.add_argument("--draft-vocab", default="auto",
                   help="eagle drafters: N most frequent tokens, 'all', or 'auto' (the named setting's)")
    p.add_argument("--draft-dtype", default="auto", help="eagle drafters: float32, bfloat16 or auto (as named)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="compiled decode and verify steps (CUDA graphs)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: Llama.build's)")
    p.add_argument("--graphs-only", action="store_true",
                   help="with --compile: CUDA graphs without max_autotune (compiles in seconds, not minutes)")
    p.add_argument("--sets", default="copy-heavy,held-out Austen")
    p.add_argument("--graph-pass", action="store_true",
                   help="greedy passes through llama.speculative.graph_pass even without --compile (eagerly)")
    p.add_argument("--row-products", action="store_true",
                   help="graph passes' few-row products as reductions (llama.speculative.graph_pass.few_row_products)")
    p.add_argument("--eager-stages", action="store_true",
                   help="capture the graph passes' eager kernels, without torch.compile's fusion")
    p.add_argument("--breakdown", action="store_true",
                   help="then time each graph pass's stages and the plain step (bench/graph_pass_timing.py)")
    p.add_argument("--out", default=None, help="JSON report path")
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.graphs_only:  # both compiled steps read compile_options from their own modules
        import llama.fast.step
        import llama.speculative.verify_step

        graphs = lambda: {"triton.cudagraphs": True}  # noqa: E731
        llama.fast.step.compile_options = llama.speculative.verify_step.compile_options = graphs
    check_demo_files()
    llama = Llama.build(str(DEMO_DIR), None, max_seq_len=256, max_batch_size=1, device=opts.device,
                        dtype=opts.dtype, compile=opts.compile)
    from llama.speculative import graph_pass

    if opts.graph_pass:
        graph_pass.use_graph_pass(llama)
    graph_pass.COMPILE_STAGES = not opts.eager_stages
    graph_pass.ROW_PRODUCTS = opts.row_products
    names = [n.strip() for n in opts.drafters.split(",") if n.strip()]
    unknown = sorted(set(names) - {"lookup", "eagle", "eagle-fp32", "eagle-full", "eagle-tree"})
    if unknown:
        p.error(f"unknown drafters {unknown}: choose from lookup, eagle, eagle-fp32, eagle-full, eagle-tree")
    ks = [int(k) for k in opts.k.split(",")]
    # (drafter, its ks, the head directory or "")
    drafters: List[Tuple[Drafter, List[int], str]] = [(PromptLookup(), ks, "")] if "lookup" in names else []
    for head in opts.eagle.split(","):
        eagle_options = eagle_draft_options(head, llama.device)
        if opts.draft_vocab != "auto":
            eagle_options.pop("draft_vocab", None)
            if opts.draft_vocab != "all":
                eagle_options["draft_vocab"] = int(opts.draft_vocab)
        if opts.draft_dtype != "auto":
            eagle_options["draft_dtype"] = getattr(torch, opts.draft_dtype)
        fp32_options = {k: v for k, v in eagle_options.items() if k != "draft_dtype"}
        if "eagle" in names:
            drafters.append((EagleDrafter(head, llama, min_confidence=opts.min_confidence, **eagle_options), ks, head))
        if "eagle-fp32" in names:  # the named setting before int8 products
            drafters.append((EagleDrafter(head, llama, min_confidence=opts.min_confidence, **fp32_options), ks, head))
        if "eagle-full" in names:  # the head over the whole vocabulary, in the model's dtype (the first version)
            drafters.append((EagleDrafter(head, llama, min_confidence=opts.min_confidence), ks, head))
        if "eagle-tree" in names:
            for shape in opts.tree.split(","):
                branch, nodes, depth = (int(x) for x in shape.split("x"))
                drafters.append((EagleTreeDrafter(head, llama, branch=branch, nodes=nodes, **eagle_options),
                                 [depth], head))
    if opts.draft_layers:
        layers = [int(i) for i in opts.draft_layers.split(",")]
        drafters.append((DraftModel(truncated_demo(layers, tempfile.mkdtemp(), opts.device)), ks, ""))
    report: Dict[str, Any] = {"machine": machine_info(llama.device), "new_tokens": opts.new_tokens,
                              "repeats": opts.repeats, "compile": opts.compile, "graphs_only": opts.graphs_only,
                              "graph_pass_stages": "eager" if opts.eager_stages else "compiled",
                              "row_products": opts.row_products,
                              "dtype": str(llama.model.tok_embeddings.weight.dtype),
                              "results": [],
                              "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                              "command": "python -m bench.speculative " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv)}
    print(f"{llama.device}: {report['machine'].get('gpu') or report['machine'].get('cpu')}, "
          f"{torch.get_num_threads()} threads, load average {report['load_average']}")
    sets = {"copy-heavy": COPY_HEAVY, "held-out Austen": HELD_OUT}
    for name in opts.sets.split(","):
        prompts = sets[name]
        for drafter, drafter_ks, head in drafters:
            for r in run_set(llama, prompts, drafter, drafter_ks, opts.new_tokens, opts.repeats):
                r = dict(set=name, head=head, load_average=os.getloadavg(), **r)
                report["results"].append(r)
                print(f"{name:16} {head[-14:]:14} {r['drafter'][:60]:60} {r['method']:5} plain {r['plain_tok_s']:7.1f} tok/s  "
                      f"this {r['speculative_tok_s']:7.1f} tok/s  x{r['speed_up']:.2f} (CPU time "
                      f"x{r['speed_up_cpu_time']:.2f})  mean accepted length {r['mean_accepted_length']:.2f}  "
                      f"drafts/step {r['drafts_per_step']:.2f}  by position {r['acceptance_by_position']}  "
                      f"{r['ms_per_pass']:.3f} ms/pass (plain {r['plain_ms_per_token']:.3f} ms/token)  "
                      f"graph pass: {r['graph_pass']}  same tokens: {r['same_tokens']}", flush=True)
                if opts.out:
                    with open(opts.out, "w") as f:
                        json.dump(report, f, indent=1)
    if opts.breakdown:
        from bench.graph_pass_timing import time_graph_pass, time_plain_step
        from llama.speculative.graph_pass import _passes

        ids = llama.tokenizer.encode(COPY_HEAVY[0], bos=True, eos=False)
        report["breakdown"] = [time_plain_step(llama, len(ids))]
        for gp in _passes.get(llama.model, {}).values():
            report["breakdown"].append(time_graph_pass(gp, ids))
        for row in report["breakdown"]:
            print("breakdown:", {key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()})
    report["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average at the end: {report['load_average_end']}")
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
