"""Speculative decoding against plain decoding on the demo model, greedy, in one run (a measurement, not a test).

    python -m bench.speculative [--new-tokens 48] [--repeats 3] [--k 4] [--threads 1] [--draft-layers 0,2,4,5]
                                [--drafters lookup,eagle] [--eagle models/demo-eagle] [--min-confidence P]
                                [--out FILE.json]

Two prompt sets: copy-heavy (an Austen sentence three times, then its first words: the model goes on
copying, as far as this toy model copies) and held-out Austen (sentences from the last chapters, quoted from
memory: the 5% of each novel the demo model never saw). For each prompt, plain decoding (`Llama.generate`,
temperature 0, the fast loop) and speculative decoding (`speculative_generate`) run alternately `--repeats`
times, each generating exactly --new-tokens tokens (stop tokens ignored); the best time of each counts (wall
time, and the process's CPU time beside it). Per set it prints tokens/s of both, their ratio, the mean
accepted length and acceptance by draft position, and checks the tokens are equal. Drafters (--drafters):
`lookup` (prompt lookup), `eagle` (the demo's EAGLE-style head, models/demo-eagle, made by
scripts/train_eagle.py; --min-confidence ends its chains early); with --draft-layers 0,2,4,5 the demo cut to
those layers (its embedding and output too) also runs as a draft model.
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from bench.run import machine_info
from llama.cli.demo import DEMO_DIR, build_demo
from llama.generation import Llama
from llama.speculative import Drafter, DraftModel, PromptLookup, speculative_generate
from llama.speculative.eagle import EagleDrafter

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


def timed(fn: Callable[[], Any], times: List[float], cpu_times: List[float]) -> Any:
    """fn(), its wall time appended to `times` and the process's CPU time to `cpu_times` (on a machine
    shared with other jobs, CPU time counts less of the time spent waiting for a core)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - start_cpu)
    return result


def run_set(llama: Llama, prompts: List[str], drafter: Drafter, k: int, new_tokens: int, repeats: int) -> Dict:
    plain_s = spec_s = plain_cpu = spec_cpu = 0.0
    tokens = steps = accepted = drafted = 0
    drafted_at, accepted_at, same = [0] * k, [0] * k, True
    for text in prompts:
        ids = llama.tokenizer.encode(text, bos=True, eos=False)
        plain_times: List[float] = []
        spec_times: List[float] = []
        plain_cpus: List[float] = []
        spec_cpus: List[float] = []
        for _ in range(repeats):  # alternating, so that both see the same machine
            want = timed(lambda: llama.generate([ids], new_tokens, temperature=0, ignore_eos=True)[0][0],
                         plain_times, plain_cpus)
            got, _, stats = timed(lambda: speculative_generate(llama, [ids], new_tokens, drafter, k, ignore_eos=True),
                                  spec_times, spec_cpus)
        plain_cpu, spec_cpu = plain_cpu + min(plain_cpus), spec_cpu + min(spec_cpus)
        same &= got[0] == want
        plain_s, spec_s, tokens = plain_s + min(plain_times), spec_s + min(spec_times), tokens + len(want)
        steps, accepted, drafted = steps + stats.steps, accepted + stats.accepted, drafted + stats.drafted
        drafted_at = [a + b for a, b in zip(drafted_at, stats.drafted_at)]
        accepted_at = [a + b for a, b in zip(accepted_at, stats.accepted_at)]
    return {
        "drafter": repr(drafter), "k": k, "prompts": len(prompts), "tokens": tokens, "same_tokens": same,
        "plain_tok_s": tokens / plain_s, "speculative_tok_s": tokens / spec_s, "speed_up": plain_s / spec_s,
        "speed_up_cpu_time": plain_cpu / spec_cpu,
        "mean_accepted_length": (accepted + steps) / steps, "drafts_per_step": drafted / steps,
        "acceptance_by_position": [round(a / d, 3) if d else None for a, d in zip(accepted_at, drafted_at)],
    }


def truncated_demo(layers: List[int], dir_: str) -> Llama:
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
    return Llama.build(str(out), None, max_seq_len=256, max_batch_size=1, device="cpu")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.speculative", description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--draft-layers", default="",
                   help="also a draft model: the demo with only these layers, e.g. 0,2,4,5 (of 0..5)")
    p.add_argument("--drafters", default="lookup,eagle", help="comma-separated: lookup, eagle")
    p.add_argument("--eagle", default=str(Path(DEMO_DIR).parent / "demo-eagle"),
                   help="the EAGLE-style head's directory")
    p.add_argument("--min-confidence", type=float, default=0.0, help="the eagle drafter's min_confidence")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON report path")
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    llama = build_demo(max_seq_len=256, max_batch_size=1, device="cpu")
    names = [n.strip() for n in opts.drafters.split(",") if n.strip()]
    unknown = sorted(set(names) - {"lookup", "eagle"})
    if unknown:
        p.error(f"unknown drafters {unknown}: choose from lookup, eagle")
    drafters: List[Drafter] = [PromptLookup()] if "lookup" in names else []
    if "eagle" in names:
        drafters.append(EagleDrafter(opts.eagle, llama, min_confidence=opts.min_confidence))
    if opts.draft_layers:
        layers = [int(i) for i in opts.draft_layers.split(",")]
        drafters.append(DraftModel(truncated_demo(layers, tempfile.mkdtemp())))
    report: Dict[str, Any] = {"machine": machine_info(torch.device("cpu")), "new_tokens": opts.new_tokens,
                              "repeats": opts.repeats, "load_average_start": os.getloadavg(), "results": []}
    print(f"CPU: {report['machine'].get('cpu')}, {torch.get_num_threads()} threads")
    for name, prompts in (("copy-heavy", COPY_HEAVY), ("held-out Austen", HELD_OUT)):
        for drafter in drafters:
            r = dict(set=name, **run_set(llama, prompts, drafter, opts.k, opts.new_tokens, opts.repeats))
            report["results"].append(r)
            print(f"{name:16} {r['drafter']:45} plain {r['plain_tok_s']:7.1f} tok/s  speculative "
                  f"{r['speculative_tok_s']:7.1f} tok/s  x{r['speed_up']:.2f} "
                  f"(CPU time x{r['speed_up_cpu_time']:.2f})  "
                  f"mean accepted length "
                  f"{r['mean_accepted_length']:.2f}  drafts/step {r['drafts_per_step']:.2f}  "
                  f"by position {r['acceptance_by_position']}  "
                  f"same tokens: {r['same_tokens']}")
    report["load_average_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min): start {report['load_average_start']}, end {report['load_average_end']}")
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
