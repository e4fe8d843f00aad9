"""Where a speculative pass's time goes (a measurement, not a test): bench.speculative --breakdown calls it.

For a GraphPass (llama.speculative.graph_pass) set up on a real prompt: the time of each stage alone (draft,
verify with acceptance, advance: the head's catch-up and the state update) and of the whole pass, each
replayed from its own CUDA graph back to back (device time: CUDA events around 20 replays, the median of 15
rounds; the state is put back before each round so that the positions stay where a row's are), and the
host's share: launching a replay and reading a result back (a replay, a copy to pinned memory, an event,
waiting for it). For the plain decode step (Llama.decode_step, torch.compile's CUDA graphs) the same
back-to-back time per call. On the CPU the stages run eagerly, timed by the wall clock.
"""

import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from llama.speculative.graph_pass import GraphPass


def _median_ms(fn: Callable[[], None], reset: Optional[Callable[[], None]], cuda: bool, reps: int = 20,
               rounds: int = 15) -> float:
    times = []
    for _ in range(rounds):
        if reset is not None:
            reset()
        if cuda:
            torch.cuda.synchronize()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / reps)
        else:
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t) * 1e3 / reps)
    return statistics.median(times)


@torch.no_grad()
def time_graph_pass(gp: GraphPass, prompt: List[int]) -> Dict[str, Any]:
    """Milliseconds per pass of each stage, the whole pass, and a pass with its result read back."""
    cuda = gp.graph is not None
    with torch.inference_mode():
        gp.start(prompt)
    with torch.inference_mode(False):
        saved = [t.clone() for t in (gp.pos, gp.fed, gp.feature, gp.history)]

    def reset() -> None:
        for t, s in zip((gp.pos, gp.fed, gp.feature, gp.history), saved):
            t.copy_(s)

    out: Dict[str, Any] = {"kind": gp.kind, "k": gp.k, "device_time": cuda}
    names = ("draft", "verify_and_accept", "advance")
    if cuda:
        for name, graph in zip(names, gp.stage_graphs):
            out[name + "_ms"] = _median_ms(graph.replay, reset, cuda)
        out["pass_ms"] = _median_ms(gp.graph.replay, reset, cuda)
        pinned = torch.empty(gp.k + 3, dtype=torch.long, pin_memory=True)
        event = torch.cuda.Event()

        def pass_and_read() -> None:  # what the loop does per pass when it does not queue ahead
            gp.graph.replay()
            pinned.copy_(gp.result, non_blocking=True)
            event.record()
            event.synchronize()
            pinned.tolist()

        out["pass_synced_ms"] = _median_ms(pass_and_read, reset, cuda)
    else:
        for name, stage in zip(names, gp.stages):
            out[name + "_ms"] = _median_ms(stage, reset, cuda, reps=10, rounds=5)
        out["pass_ms"] = _median_ms(gp.run_pass, reset, cuda, reps=10, rounds=5)
    reset()
    return out


@torch.no_grad()
def time_plain_step(llama: Any, position: int) -> Dict[str, float]:
    """Milliseconds per call of the plain decode step, 20 calls back to back (on CUDA the time the device
    takes to get through them: the step's own time if the host keeps ahead, the host's if it does not)."""
    device = llama.model.rope_cos.device
    cuda = device.type == "cuda"
    tokens = torch.ones(1, dtype=torch.long, device=device)
    positions = torch.full((1,), position, dtype=torch.long, device=device)
    step = lambda: llama.decode_step(tokens, positions, position + 1)  # noqa: E731
    with torch.inference_mode():
        step()
        return {"plain_step_ms": _median_ms(step, None, cuda)}


def profile_stages(gp: GraphPass, prompt: List[int], reps: int = 10) -> Dict[str, Any]:
    """The device kernels each stage launches per pass (torch.profiler over `reps` calls of the compiled
    stages, outside the graph): their number and time, and the costliest."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        gp.start(prompt)
    out: Dict[str, Any] = {}
    for name, stage in zip(("draft", "verify_and_accept", "advance"), gp.stages):
        with torch.inference_mode(False), torch.no_grad():
            stage()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    stage()
                torch.cuda.synchronize()
        rows = []
        for evt in prof.key_averages():
            us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
            if us > 0:
                rows.append({"kernel": evt.key[:100], "calls_per_pass": evt.count / reps, "us_per_pass": us / reps})
        rows.sort(key=lambda r: -r["us_per_pass"])
        out[name] = {"kernels_per_pass": sum(r["calls_per_pass"] for r in rows),
                     "kernel_us_per_pass": sum(r["us_per_pass"] for r in rows), "top": rows[:12]}
    with torch.inference_mode():
        gp.start(prompt)
    return out


def time_kernels(device: torch.device, dtype: torch.dtype, dim: int, heads: int, kv_heads: int, hidden: int,
                 vocab: int, seq: int) -> Dict[str, Any]:
    """Microseconds per call, from a CUDA graph of 20 calls (launch gaps gone): each of the demo's products
    (F.linear, float32 as the model) and its masked attention over the whole cache, for 1 to 16 rows."""
    head_dim = dim // heads
    shapes = {"wqkv": ((heads + 2 * kv_heads) * head_dim, dim), "wo": (dim, dim), "w13": (2 * hidden, dim),
              "w2": (dim, hidden), "output": (vocab, dim)}
    out: Dict[str, Any] = {}
    for rows in (1, 2, 5, 8, 16):
        for name, (n, k) in shapes.items():
            weight, x = torch.randn(n, k, device=device, dtype=dtype), torch.randn(rows, k, device=device, dtype=dtype)
            out[f"{name}_{rows}rows_us"] = _graph_us(lambda: torch.nn.functional.linear(x, weight))
            if rows == 5:  # the same product with the weight stored transposed (another cuBLAS layout)
                weight_t = weight.t().contiguous()
                out[f"{name}_{rows}rows_transposed_us"] = _graph_us(lambda: torch.mm(x, weight_t))
        q = torch.randn(1, heads, rows, head_dim, device=device, dtype=dtype)
        keys = torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype)
        mask = torch.ones(1, 1, rows, seq, dtype=torch.bool, device=device).tril(seq - rows)
        out[f"attention_{rows}rows_us"] = _graph_us(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, keys, attn_mask=mask))
    return out


def _graph_us(fn: Callable[[], Any], calls: int = 20) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return _median_ms(graph.replay, None, True, reps=5, rounds=9) * 1e3 / calls


def main() -> None:
    """python -m bench.graph_pass_timing --out FILE.json: on CUDA, the demo model compiled (CUDA graphs, no
    max_autotune), its graph passes (EAGLE chain of 4, prompt lookup k = 4, no drafts): stage times, kernels
    per stage, the products' and attention's own times, and the copy-heavy set's speed-ups once more."""
    import argparse
    import json

    from bench.speculative import COPY_HEAVY, HELD_OUT, run_set
    from llama.speculative import graph_pass
    from llama.cli.demo import DEMO_DIR
    from llama.fast import step
    from llama.generation import Llama
    from llama.speculative import Drafter, PromptLookup, speculative_generate, verify_step
    from llama.speculative.eagle import EagleDrafter
    from llama.speculative.graph_pass import _passes
    from llama.speculative.settings import eagle_draft_options

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sets", default="copy-heavy", help="bench.speculative's sets to run again, comma-separated")
    p.add_argument("--row-products", action="store_true", help="graph_pass.ROW_PRODUCTS (few_row_products)")
    p.add_argument("--no-kernel-times", action="store_true", help="skip the products' and attention's own times")
    opts = p.parse_args()
    graph_pass.ROW_PRODUCTS = opts.row_products
    graphs = lambda: {"triton.cudagraphs": True}  # noqa: E731  (as bench.speculative --graphs-only)
    step.compile_options = verify_step.compile_options = graphs
    llama = Llama.build(str(DEMO_DIR), None, max_seq_len=256, max_batch_size=1, device="cuda", dtype="float32",
                        compile=True)
    head_dir = DEMO_DIR.parent / "demo-eagle"
    eagle = EagleDrafter(head_dir, llama, **eagle_draft_options(head_dir))
    ids = llama.tokenizer.encode(COPY_HEAVY[0], bos=True, eos=False)
    report: Dict[str, Any] = {"command": "python -m bench.graph_pass_timing " + " ".join(sys.argv[1:]),
                              "row_products": opts.row_products, "passes": [], "kernels": {}}

    def save() -> None:
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=1)

    for drafter, k in ((eagle, 4), (PromptLookup(), 4), (Drafter(), 0)):
        speculative_generate(llama, [ids], 16, drafter, k, ignore_eos=True)  # builds and captures its pass
    report["plain"] = time_plain_step(llama, len(ids))
    for gp in _passes[llama.model].values():
        report["passes"].append(time_graph_pass(gp, ids))
        print("pass:", report["passes"][-1], flush=True)
    save()
    if not opts.no_kernel_times:
        args = llama.model.params
        hidden = llama.model.layers[0].feed_forward.w2.in_features
        report["kernel_us"] = time_kernels(torch.device("cuda", 0), torch.float32, args.dim, args.n_heads,
                                           args.n_kv_heads, hidden, args.vocab_size, args.max_seq_len)
        print("kernels alone (us):", {k: round(v, 1) for k, v in report["kernel_us"].items()}, flush=True)
        save()
    for gp in _passes[llama.model].values():
        try:
            report["kernels"][gp.kind] = profile_stages(gp, ids)
        except Exception as e:  # the profiler is a bonus: keep the rest
            report["kernels"][gp.kind] = f"profiler failed: {e!r}"
        print("profile", gp.kind, json.dumps(report["kernels"][gp.kind])[:3000], flush=True)
        save()
    sets = {"copy-heavy": COPY_HEAVY, "held-out Austen": HELD_OUT, "held-out": HELD_OUT}
    report["results"] = []
    for name in opts.sets.split(","):
        for drafter, k in ((eagle, 4), (PromptLookup(), 4)):
            for r in run_set(llama, sets[name], drafter, [k], 48, opts.repeats):
                report["results"].append(dict(set=name, **r))
                print(name, r["method"], r["drafter"][:30], "x%.2f" % r["speed_up"], round(r["speculative_tok_s"]),
                      "plain", round(r["plain_tok_s"]), "ms/pass %.3f" % r["ms_per_pass"],
                      "tau %.2f" % r["mean_accepted_length"], "same", r["same_tokens"], flush=True)
                save()


if __name__ == "__main__":
    main()
