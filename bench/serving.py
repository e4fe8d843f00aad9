"""Serving bench: N requests through the continuous-batching engine (llama.serve) against one static batch of
the same N prompts through Llama.generate, on the same weights, in one process, alternating round by round.

    python -m bench.serving                       # the CPU demo model, N = 8
    python -m bench.serving --n 64 --device cuda --shape llama3-8b --prompt-len 128 --new-tokens 128 \
        --max-seq-len 512 --decode simple graphs --profile --static-compile

Greedy, stop tokens ignored, so both produce the same number of tokens (checked equal, token for token).
Reports tokens/s of each (median over rounds), their ratio, the engine's time to first token and
inter-token latency (p50/p99) with every request arriving at once, and how many sequences of a length mix
fit in the memory of the static cache (N rows of max_seq_len) when the cache is paged instead.

Sessions (`--chats C --turns T`, the demo model or any with a chat format; `--sessions-only` skips the rest):
C chats of T turns in the Llama 3 chat format, all chats' turn t at once, greedy; the last turn's prefill
tokens and time with session reuse (each chat a session: its blocks kept between turns) against without (the
prefix cache off, no sessions: every turn prefills its whole dialog), alternating round by round on fresh
engines; the answers are checked equal.

--decode: the engine's decode modes to measure, each its own engine (llama.serve.decode.DECODE_MODES).
--profile (CUDA): where a decode step's time goes: each mode's median step (wall), the device time of its
    forward (CUDA events), the rest (the host's scheduling and sampling, not overlapped); and torch.profiler's
    top kernels of one step of the "simple" and "kernel" modes.
--static-compile: also the static batch with compile=True (CUDA graphs + inductor), rounds after the others
    (its compilation, minutes at 8B, happens in its warm-up).
"""

import argparse
import json
import math
import random
import statistics
import sys
import time
from typing import Dict, List

import torch

from llama import Llama
from llama.cli.demo import DEMO_DIR
from llama.serve.decode import DECODE_MODES
from llama.serve.engine import DEFAULT_MAX_STEP_TOKENS, Engine


def percentile(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class TimedForward:
    """The engine's forward with the device time of each call (CUDA events, read after the run)."""

    def __init__(self, forward):
        self.forward, self.calls = forward, []

    def __call__(self, chunks):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        logits = self.forward(chunks)
        end.record()
        self.calls.append((len(chunks), all(len(c.tokens) == 1 for c in chunks), begin, end))
        return logits


def run_engine(engine: Engine, prompts: List[List[int]], new_tokens: int) -> Dict:
    timed = engine.forward if isinstance(engine.forward, TimedForward) else None
    if timed:
        timed.calls.clear()
    start = time.perf_counter()
    ids = [engine.add_request(p, temperature=0, ignore_eos=True, max_new_tokens=new_tokens) for p in prompts]
    seen: Dict[int, List[float]] = {i: [] for i in ids}
    step_walls = []
    while engine.has_unfinished():
        begin = time.perf_counter()
        events = engine.step()
        now = time.perf_counter()
        step_walls.append(now - begin)
        for event in events:
            if event.token is not None:
                seen[event.request_id].append(now)
    elapsed = time.perf_counter() - start
    ttft = [times[0] - start for times in seen.values()]
    itl = [b - a for times in seen.values() for a, b in zip(times, times[1:])]
    tokens = [engine.outputs.pop(i).tokens for i in ids]
    result = dict(elapsed=elapsed, tokens=tokens, ttft=ttft, itl=itl)
    if timed:  # full-batch decode steps: wall time, the forward's device time, and the rest
        torch.cuda.synchronize()
        full = [(wall, begin.elapsed_time(end) / 1000) for wall, (rows, decode, begin, end)
                in zip(step_walls, timed.calls) if decode and rows == len(prompts)]
        if full:
            result["full_decode_steps"] = len(full)
            result["step_ms"] = 1000 * statistics.median(w for w, _ in full)
            result["forward_device_ms"] = 1000 * statistics.median(d for _, d in full)
            result["not_overlapped_host_ms"] = result["step_ms"] - result["forward_device_ms"]
        result["prefill_steps"] = sum(not decode for _, decode, _, _ in timed.calls)
        result["prefill_steps_s"] = sum(w for w, (_, decode, _, _) in zip(step_walls, timed.calls) if not decode)
    return result


def profile_decode_step(llama, prompts: List[List[int]], mode: str, block_size: int, max_seq_len: int) -> str:
    """torch.profiler's kernels of two full-batch decode steps of `mode`, the top ones by device time."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(llama, n_blocks=len(prompts) * math.ceil(max_seq_len / block_size), block_size=block_size,
                    prefix_caching=False, decode=mode)
    for p in prompts:
        engine.add_request(p, temperature=0, ignore_eos=True, max_new_tokens=64)
    while any(seq.n_pending > 1 for seq in engine.running) or engine.waiting:
        engine.step()
    engine.step()  # a warm one
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
    kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    del engine
    return f"== {mode}: 2 decode steps of {len(prompts)} rows, {kernels} device events ==\n{table}\n"


# The users' messages of the session bench (each chat starts at another one and goes round).
QUESTIONS = ["Who is Mr. Knightley?", "What did Emma say to Harriet about the letter?",
             "Tell me about the ball at the Crown.", "Why was Mr. Elton offended?",
             "What does Miss Bates talk about?", "Where does Jane Fairfax live?"]


def chat_rounds(llama: Llama, engine: Engine, chats: int, turns: int, answer_tokens: int, sessions: bool) -> Dict:
    """C chats through `engine`, all chats' turn t at once; figures of the last turn. sessions: each chat is a
    session (else plain requests)."""
    dialogs: List[List[Dict]] = [[] for _ in range(chats)]
    for t in range(turns):
        for k, dialog in enumerate(dialogs):
            dialog.append({"role": "user", "content": QUESTIONS[(k + t) % len(QUESTIONS)]})
        prompts = [llama.formatter.encode_dialog_prompt(d) for d in dialogs]
        before = engine.prefill_tokens
        start = time.perf_counter()
        ids = [engine.add_request(p, temperature=0, max_new_tokens=answer_tokens,
                                  session_id=k if sessions else None) for k, p in enumerate(prompts)]
        first: Dict[int, float] = {}
        for event in engine.run():
            if event.token is not None and event.request_id not in first:
                first[event.request_id] = time.perf_counter() - start
        elapsed = time.perf_counter() - start
        outs = [engine.outputs.pop(i) for i in ids]
        for dialog, out in zip(dialogs, outs):
            dialog.append({"role": "assistant", "content": out.text})
    return dict(prompt_tokens=sum(len(p) for p in prompts), prefill_tokens=engine.prefill_tokens - before,
                cached_tokens=sum(o.cached_tokens for o in outs), turn_s=elapsed,
                ttft_p50_s=percentile(list(first.values()), 0.5), answers=[o.tokens for o in outs])


def session_reuse(llama: Llama, chats: int, turns: int, answer_tokens: int, rounds: int, block_size: int) -> Dict:
    """The last turn's prefill tokens and time with sessions against without, alternating on fresh engines."""
    n_blocks = chats * math.ceil(llama.model.params.max_seq_len / block_size)
    runs: Dict[bool, List[Dict]] = {True: [], False: []}
    for _ in range(rounds + 1):  # the first round warms up
        for sessions in (True, False):
            engine = Engine(llama, n_blocks=n_blocks, block_size=block_size, prefix_caching=sessions)
            runs[sessions].append(chat_rounds(llama, engine, chats, turns, answer_tokens, sessions))
    with_, without = runs[True][1:], runs[False][1:]
    median = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    return dict(
        chats=chats, turns=turns, answer_tokens=answer_tokens, rounds=rounds,
        last_turn_prompt_tokens=with_[0]["prompt_tokens"],
        last_turn_prefill_tokens_with_sessions=with_[0]["prefill_tokens"],
        last_turn_prefill_tokens_without=without[0]["prefill_tokens"],
        last_turn_cached_tokens=with_[0]["cached_tokens"],
        last_turn_s_with_sessions=median(with_, "turn_s"), last_turn_s_without=median(without, "turn_s"),
        last_turn_ttft_p50_ms_with_sessions=1000 * median(with_, "ttft_p50_s"),
        last_turn_ttft_p50_ms_without=1000 * median(without, "ttft_p50_s"),
        same_answers=all(a["answers"] == b["answers"] for a, b in zip(with_, without)),
    )


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
    parser.add_argument("--max-step-tokens", type=int, default=DEFAULT_MAX_STEP_TOKENS)
    parser.add_argument("--decode", nargs="+", default=["auto"], choices=DECODE_MODES,
                        help="the engine's decode modes to measure (each its own engine)")
    parser.add_argument("--profile", action="store_true", help="CUDA: where a decode step's time goes")
    parser.add_argument("--profile-out", default=None, help="write torch.profiler's tables here")
    parser.add_argument("--static-compile", action="store_true", help="also the static batch with compile=True")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--chats", type=int, default=8, help="session bench: chats at once")
    parser.add_argument("--turns", type=int, default=4, help="session bench: turns of each chat")
    parser.add_argument("--answer-tokens", type=int, default=24, help="session bench: most tokens an answer")
    parser.add_argument("--sessions-only", action="store_true", help="only the session bench")
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
    sessions = None
    if not args.shape:  # a chat format needs the checkpoint's tokenizer
        sessions = session_reuse(llama, args.chats, args.turns, args.answer_tokens, args.rounds, args.block_size)
        sessions["load_average"] = open("/proc/loadavg").read().split()[:3] if args.device == "cpu" else None
        if args.sessions_only:
            print(json.dumps(sessions, indent=2))
            write(args.out, sessions)
            return
    vocab = llama.model.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, min(vocab, 256), (args.prompt_len,), generator=g).tolist() for _ in range(args.n)]
    n_blocks = args.n * math.ceil(args.max_seq_len / args.block_size)
    # Prefix caching off: every round sends the same prompts, and blocks cached by the round before would skip
    # the engine's prefill, which the static batch must do every time.
    engines = {mode: Engine(llama, n_blocks=n_blocks, block_size=args.block_size, decode=mode, prefix_caching=False,
                            max_step_tokens=args.max_step_tokens) for mode in args.decode}
    cuda = llama.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    modes = {mode: engine.forward.mode for mode, engine in engines.items()}  # "auto" resolved
    for engine in engines.values():
        if engine.forward.runner is not None:
            engine.forward.runner.capture(list(range(1, args.n + 1)))  # every bucket a run meets, beforehand
        if args.profile and cuda:
            engine.forward = TimedForward(engine.forward)

    static_s, engine_s, last = [], {m: [] for m in engines}, {}
    llama.generate(prompts, 4, temperature=0, ignore_eos=True)  # warm-up, all
    for engine in engines.values():
        run_engine(engine, prompts, 4)
    for _ in range(args.rounds):
        sync()
        start = time.perf_counter()
        static_tokens, _ = llama.generate(prompts, args.new_tokens, temperature=0, ignore_eos=True)
        sync()
        static_s.append(time.perf_counter() - start)
        for mode, engine in engines.items():
            last[mode] = run_engine(engine, prompts, args.new_tokens)
            engine_s[mode].append(last[mode]["elapsed"])
    total = args.n * args.new_tokens
    result = dict(
        device=str(llama.device), n=args.n, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        max_seq_len=args.max_seq_len, rounds=args.rounds, max_step_tokens=args.max_step_tokens,
        dtype=str(llama.model.norm.weight.dtype),
        static_tokens_per_s=total / statistics.median(static_s), static_round_s=static_s,
        capacity=paged_capacity(args.max_seq_len, args.n, args.block_size), engines={}, sessions=sessions,
    )
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(llama.device)
    result["torch"] = torch.__version__
    result["command"] = "python -m bench.serving " + " ".join(sys.argv[1:])
    for mode, engine in engines.items():
        got = last[mode]
        # bf16 on a GPU: the two programs sum in other orders, so near-ties may part (counted, not required equal)
        entry = dict(
            decode=modes[mode],
            tokens_per_s=total / statistics.median(engine_s[mode]), round_s=engine_s[mode],
            same_tokens=got["tokens"] == static_tokens,
            rows_differing=sum(a != b for a, b in zip(got["tokens"], static_tokens)),
            ttft_ms_p50=1000 * percentile(got["ttft"], 0.5), ttft_ms_p99=1000 * percentile(got["ttft"], 0.99),
            itl_ms_p50=1000 * percentile(got["itl"], 0.5), itl_ms_p99=1000 * percentile(got["itl"], 0.99),
            **{k: v for k, v in got.items() if k not in ("elapsed", "tokens", "ttft", "itl")},
        )
        entry["engine_over_static"] = entry["tokens_per_s"] / result["static_tokens_per_s"]
        result["engines"][mode] = entry
    print(json.dumps(result, indent=2), flush=True)
    write(args.out, result)

    if args.profile and cuda:
        tables = "".join(profile_decode_step(llama, prompts, mode, args.block_size, args.max_seq_len)
                         for mode in ("simple", "kernel"))
        print(tables, flush=True)
        if args.profile_out:
            with open(args.profile_out, "w") as f:
                f.write(tables)
    if args.static_compile:  # the static batch at its fastest: after the rest, which it cannot then delay
        compiled = Llama(llama.model, llama.tokenizer, llama.formatter, fast=True, compile=True)
        begin = time.perf_counter()
        compiled.generate(prompts, 4, temperature=0, ignore_eos=True)  # compiles (minutes at 8B)
        result["static_compile_warmup_s"] = time.perf_counter() - begin
        rounds = []
        for _ in range(args.rounds):
            sync()
            start = time.perf_counter()
            compiled.generate(prompts, args.new_tokens, temperature=0, ignore_eos=True)
            sync()
            rounds.append(time.perf_counter() - start)
        result["static_compiled_tokens_per_s"] = total / statistics.median(rounds)
        result["static_compiled_round_s"] = rounds
        for entry in result["engines"].values():
            entry["engine_over_static_compiled"] = entry["tokens_per_s"] / result["static_compiled_tokens_per_s"]
        print(json.dumps({k: v for k, v in result.items() if k.startswith("static")}, indent=2))
        write(args.out, result)


def write(path, result: Dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
