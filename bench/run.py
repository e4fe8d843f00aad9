"""Benchmark: our decode loop against Hugging Face transformers' `generate` (and llama.cpp) on the same weights.

    python -m llama.bench --shape small --batch 1 4 --dtype bfloat16 float32 --new-tokens 64
    python -m llama.bench --shape llama3-8b --device cuda --batch 1 64 --dtype bfloat16 [--compile]
    python -m llama.bench --ckpt-dir ~/models/Llama3.2-1B --batch 1
    python -m llama.bench --batch 1 --llamacpp   # also llama.cpp (llama-cpp-python, installed by hand)
    python -m llama.bench --no-hf --quantize int8  # also ours with int8 weights ("ours-int8"), same run
    python -m llama.bench --device cuda --no-hf --quantize int8 int4  # "ours-int8" and "ours-int4" too

Random weights at a named shape (or a real checkpoint, in any layout) are loaded once into our Transformer and,
converted to Hugging Face's layout (sharing every tensor it can), into `LlamaForCausalLM`. For each dtype
and batch size both generate greedily from the same random prompt, the same number of tokens (stop tokens
are ignored by both), alternating run by run in this one process so that both see the same machine. Per
system it measures the time to first token (a 1-token run: prefill plus one choice), the whole run, and
from the two: prefill tokens/s and decode tokens/s; also the peak memory of the run and whether the two
systems produced the same tokens. The decode step's bytes read (every weight but the embedding table, plus
the KV cache so far) times its steps per second is the effective bandwidth, set against the device's read
bandwidth measured here (bench.bandwidth; the best of measurements at the start, in every round and at the
end; also, less exposed to the luck of one quiet moment, each round's decode against that round's
measurement, the median over rounds); that bandwidth over the bytes per step is the roofline, the decode
speed no program can pass here, and the roofline over transformers' speed the largest ratio any program
could reach against it. Writes JSON and, with matplotlib installed, a PNG chart.

With --llamacpp, llama.cpp runs as a third system on a GGUF file of the same weights, at batch 1 only
(bench.llamacpp); with --quantize int8 too, also on those weights as its Q8_0, beside our int8.

Needs transformers (a test dependency) unless --no-hf; matplotlib for the chart; llama-cpp-python and gguf
for --llamacpp.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from bench.bandwidth import measure_read_bandwidth, synchronize
from bench.llamacpp import NAME as LLAMACPP, NAME_Q8_0 as LLAMACPP_Q8_0, build_llamacpp, import_llama_cpp
from bench.report import chart, markdown_table, summary_line
from llama.checkpoints.hf import LAYER_NAMES, TOP_NAMES, permute_rows as permute_for_hf
from llama.checkpoints.meta import load_checkpoint, load_into
from llama.distributed import default_dtype, init_distributed, pick_device
from llama.generation import Llama
from llama.cli.interrupt import report_interrupt
from llama.model import ModelArgs, Transformer
from llama.tokenizer import ChatFormat
from llama.fast.cpu_forms import ENV as CPU_FORMS_ENV, picked_forms
from llama.fast import decode_attention
from llama.fast.int8_gemv import picked_gemvs
from llama.fast.layers import use_fast_layers
from llama.fast.quantize import QUANTIZE_CHOICES, use_int8_layers
from llama.fast.quantize_int4 import int4_group, use_int4_layers

_COMMON = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0)
SHAPES: Dict[str, Dict[str, Any]] = {
    "small": dict(_COMMON, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, multiple_of=256, ffn_dim_multiplier=1.3),
    "llama3.2-1b": dict(_COMMON, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
                        ffn_dim_multiplier=1.5, use_scaled_rope=True),
    "llama3-8b": dict(_COMMON, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                      ffn_dim_multiplier=1.3),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Timed reads of the bandwidth measured between the systems' runs (fewer than the run's main measurements:
# there are len(systems) of them a round).
BRACKET_REPEATS = 3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- weights ---------------------------------------------------------------------------------------------


def random_weights(args: ModelArgs, dtype: torch.dtype, device: torch.device, seed: int) -> Dict[str, torch.Tensor]:
    """Random weights in Meta's layout, made on `device`: linear weights ~ N(0, 1/fan_in), embeddings
    ~ N(0, 1), norms near 1."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_kv = args.n_kv_heads or args.n_heads
    dim, hd, hidden = args.dim, args.head_dim, args.ffn_hidden_dim

    def w(rows: int, cols: int, std: Optional[float] = None) -> torch.Tensor:
        t = torch.randn(rows, cols, generator=g, device=device, dtype=torch.float32)
        return t.mul_(cols**-0.5 if std is None else std).to(dtype)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(dim, generator=g, device=device)).to(dtype)

    sd = {"tok_embeddings.weight": w(args.vocab_size, dim, std=1.0), "norm.weight": norm()}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(args.n_heads * hd, dim)
        sd[p + "attention.wk.weight"] = w(n_kv * hd, dim)
        sd[p + "attention.wv.weight"] = w(n_kv * hd, dim)
        sd[p + "attention.wo.weight"] = w(dim, args.n_heads * hd)
        sd[p + "feed_forward.w1.weight"] = w(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = w(hidden, dim)
        sd[p + "attention_norm.weight"] = norm()
        sd[p + "ffn_norm.weight"] = norm()
    sd["output.weight"] = w(args.vocab_size, dim)
    return sd


class NoStopTokenizer:
    """What `Llama.generate` asks of a tokenizer, with no stop tokens: every run makes the same number of
    tokens (Hugging Face's is run with eos_token_id=None alike)."""

    pad_id = 0
    stop_tokens: set = set()

    def decode(self, ids) -> str:
        return ""


def build_ours(
    args: ModelArgs, sd: Dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, fast: bool, compile: bool,
    quantize: Optional[str] = None, default_forms: bool = False,
) -> Llama:
    """Our model on `sd`, as Llama.build makes it (with quantize="int8" or "int4": its weights in `dtype`,
    quantized). default_forms: every product in its layer's default form, none picked (LLAMA_CPU_FORMS=off)."""
    if default_forms:
        previous = os.environ.get(CPU_FORMS_ENV)
        os.environ[CPU_FORMS_ENV] = "off"
        try:
            return build_ours(args, sd, device, dtype, fast, compile, quantize)
        finally:
            os.environ.pop(CPU_FORMS_ENV) if previous is None else os.environ.update({CPU_FORMS_ENV: previous})
    with default_dtype(dtype):
        model = Transformer(args)
    load_into(model, sd, device, dtype, source="bench weights")
    model.to(device).eval()
    if quantize == "int4":
        use_int4_layers(model, dtype, fast=fast)
    elif quantize:
        use_int8_layers(model, dtype, fast=fast)
    if fast:
        use_fast_layers(model, pack=not compile)
    tokenizer = NoStopTokenizer()
    return Llama(model, tokenizer, ChatFormat(tokenizer), fast=fast, compile=compile)  # type: ignore[arg-type]


def build_hf(args: ModelArgs, sd: Dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """transformers' LlamaForCausalLM holding the same tensors (q and k rows permuted copies)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    n_kv = args.n_kv_heads or args.n_heads
    rope: Dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:  # the constants our model uses (factor 32 for Llama 3.2 1B/3B: llama.params)
        rope = {"rope_type": "llama3", "rope_theta": args.rope_theta, "factor": args.rope_scaling_factor,
                "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                "original_max_position_embeddings": args.rope_original_context}
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=n_kv,
        rms_norm_eps=args.norm_eps, rope_parameters=rope, max_position_embeddings=max(args.max_seq_len, 8192),
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, dtype=dtype,
    )
    hf_sd = {f"{TOP_NAMES[name]}.weight": sd[f"{name}.weight"] for name in TOP_NAMES}
    for key, value in sd.items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            name = rest.rsplit(".", 1)[0]
            if name == "attention.wq":
                value = permute_for_hf(value, args.n_heads)
            elif name == "attention.wk":
                value = permute_for_hf(value, n_kv)
            hf_sd[f"model.layers.{i}.{LAYER_NAMES[name]}.weight"] = value
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in hf_sd.items()}, strict=False, assign=True)
    model.eval()
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    return model


# ---- timing ----------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of one run: the CUDA allocator's peak, or the process's peak resident set (VmHWM, reset
    through /proc/self/clear_refs) on the CPU. Both as bytes above what was in use when the run began."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak resident set to the current one
            self.base = self._status("VmRSS")

    def stop(self) -> Dict[str, Optional[int]]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._status("VmHWM")
        if peak is None or self.base is None:
            return {"peak_bytes": None, "peak_above_start_bytes": None}
        return {"peak_bytes": peak, "peak_above_start_bytes": peak - self.base}

    @staticmethod
    def _status(field: str) -> Optional[int]:
        with contextlib.suppress(OSError):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        return None


def timed(fn: Callable[[], Any], device: torch.device) -> tuple:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


class System:
    """One contender: a name and `generate(prompts (bsz, len) tensor, n_tokens) -> (bsz, n_tokens) ids`."""

    def __init__(self, name: str, generate: Callable[[torch.Tensor, int], torch.Tensor]):
        self.name = name
        self.generate = generate
        self.ttft: List[float] = []
        self.full: List[float] = []
        self.memory: List[Dict[str, Optional[int]]] = []
        self.tokens: Optional[torch.Tensor] = None
        # Per round: the read bandwidth measured just before and just after this system's runs, averaged.
        self.bracketing_bandwidths: List[float] = []


def ours_system(name: str, llama: Llama) -> System:
    def generate(prompts: torch.Tensor, n: int) -> torch.Tensor:
        out, _ = llama.generate(prompts.tolist(), max_gen_len=n, temperature=0.0)
        return torch.tensor(out)

    system = System(name, generate)
    system.llama = llama  # type: ignore[attr-defined]
    return system


def step_description(llama: Llama) -> Dict[str, Any]:
    """Which decode step `llama` runs (DecodeStep, or CompiledCPUStep: the CPU step compiled whole), with the
    compile time and the load-time comparison where there was one."""
    step = llama.decode_step
    return {"step": type(step).__name__, "compile_s": getattr(step, "compile_seconds", None),
            "probe": getattr(llama.model, "cpu_step_probe", None)}


def hf_system(model) -> System:
    def generate(prompts: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False)
        return out[:, prompts.shape[1]:].cpu()

    return System("transformers", generate)


def same_tokens(res: Dict[str, Any], ours: torch.Tensor, other: torch.Tensor, key: str) -> None:
    """Record how many rows of `other` equal ours, and how many leading tokens of the first row do."""
    res[f"rows_matching_{key}"] = int((ours == other).all(dim=1).sum())
    differ = (ours[0] != other[0]).nonzero()
    res[f"leading_tokens_matching_{key}"] = int(differ[0, 0]) if len(differ) else ours.shape[1]


def measure(systems: List[System], prompts: torch.Tensor, n_tokens: int, repeats: int, warmup: int,
            device: torch.device, label: str) -> List[float]:
    """Warm up, then alternate the systems run by run: a 1-token run (time to first token) and a full run
    (with its peak memory), `repeats` times each; the order of the systems flips every round. Every round
    also measures the read bandwidth, so that the ceiling is sampled as often, and as disturbed by other
    work on the machine, as the systems are: returns each round's first measurement. The bandwidth is also
    measured between the systems' runs, and each system keeps the mean of the measurements just before
    and just after its runs (`bracketing_bandwidths`): the machine's read speed moves in phases lasting
    seconds to minutes (docs/cpu-step.md), so a round's one measurement can miss a run's moment."""
    memory = PeakMemory(device)
    for system in systems:
        for _ in range(warmup):
            system.generate(prompts, n_tokens)
            system.generate(prompts, 1)
    bandwidths = []
    for r in range(repeats):
        bandwidths.append(measure_read_bandwidth(device))
        before = bandwidths[-1]
        for system in systems if r % 2 == 0 else systems[::-1]:
            t1, _ = timed(lambda: system.generate(prompts, 1), device)
            memory.start()
            t, out = timed(lambda: system.generate(prompts, n_tokens), device)
            system.memory.append(memory.stop())
            system.ttft.append(t1)
            system.full.append(t)
            system.tokens = out
            after = measure_read_bandwidth(device, repeats=BRACKET_REPEATS)
            system.bracketing_bandwidths.append((before + after) / 2)
            before = after
            log(f"  {label}  round {r + 1}/{repeats}  {system.name:<13} first token {t1 * 1e3:7.1f} ms"
                f"  {n_tokens} tokens {t:6.3f} s")
    return bandwidths


def median_fraction(system: System, step_bytes: float, n_tokens: int, bandwidths: List[float]) -> float:
    """Each round's decode (its full run less its 1-token run, floored at 1 ns) against that round's reading
    in `bandwidths`, as a fraction of it: the median over rounds."""
    return statistics.median(step_bytes * (n_tokens - 1) / max(full - ttft, 1e-9) / bw
                             for full, ttft, bw in zip(system.full, system.ttft, bandwidths))


def summarise(system: System, bsz: int, prompt_len: int, n_tokens: int) -> Dict[str, Any]:
    """Figures from the fastest runs (the least disturbed by other work on the machine), medians beside."""
    ttft, full = min(system.ttft), min(system.full)
    decode_s = max(full - ttft, 1e-9)
    median_decode_s = max(statistics.median(system.full) - statistics.median(system.ttft), 1e-9)
    peaks = [m["peak_above_start_bytes"] for m in system.memory if m["peak_above_start_bytes"] is not None]
    return {
        "time_to_first_token_s": ttft,
        "total_s": full,
        "prefill_tok_s": bsz * prompt_len / ttft,
        "decode_tok_s": bsz * (n_tokens - 1) / decode_s,
        "decode_steps_s": (n_tokens - 1) / decode_s,
        "end_to_end_tok_s": bsz * n_tokens / full,
        "median_decode_tok_s": bsz * (n_tokens - 1) / median_decode_s,
        "median_time_to_first_token_s": statistics.median(system.ttft),
        "peak_memory_above_start_bytes": max(peaks) if peaks else None,
        "peak_memory_bytes": max((m["peak_bytes"] or 0) for m in system.memory) or None,
        "runs_ttft_s": system.ttft,
        "runs_total_s": system.full,
    }


def bytes_per_decode_step(sd: Dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype, bsz: int,
                          prompt_len: int, n_tokens: int, int8: bool = False, q8_0: bool = False,
                          int4: bool = False) -> Dict[str, float]:
    """What one decode step must read, on average over the run: every weight except the embedding table
    (of which it reads one row per sequence), and the keys and values cached so far. int8: linear weights
    are 1 byte each, plus a scale per row in `dtype`; q8_0 (llama.cpp's): 34 bytes per 32 weights; int4
    (llama.fast.quantize_int4): half a byte each, plus a scale and a zero in `dtype` per group."""
    size = torch.empty((), dtype=dtype).element_size()
    weights = bsz * args.dim * size
    for k, v in sd.items():
        if k == "tok_embeddings.weight":
            continue
        if int8 and v.dim() == 2:
            weights += v.numel() + v.shape[0] * size
        elif int4 and v.dim() == 2:
            weights += v.numel() // 2 + v.numel() // int4_group(v.shape[1]) * 2 * size
        elif q8_0 and v.dim() == 2:
            weights += v.numel() // 32 * 34
        else:
            weights += v.numel() * size
    n_kv = args.n_kv_heads or args.n_heads
    mean_len = prompt_len + n_tokens / 2  # positions attended to, averaged over the decode steps
    kv = 2 * args.n_layers * bsz * n_kv * args.head_dim * mean_len * size
    return {"weight_bytes": weights, "kv_bytes": kv, "total_bytes": weights + kv}


# ---- the run ---------------------------------------------------------------------------------------------


def cpu_description() -> Dict[str, Any]:
    """What `lscpu` says of the CPU (its model name and flags), the ISA torch's kernels use, and the
    environment that limits them (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA; LLAMA_CPP_LIB_PATH, another
    llama.cpp build): recorded beside every CPU figure, since the fastest form of a product depends on them."""
    info: Dict[str, Any] = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "LLAMA_CPP_LIB_PATH"):
        info[name] = os.environ.get(name)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["lscpu_model_name"] = fields.get("Model name", "").strip() or None
        info["lscpu_flags"] = fields.get("Flags", "").strip() or None
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    return info


def machine_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    info["cpus"] = os.cpu_count()
    info.update(cpu_description())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    return info


def load_weights(opts: argparse.Namespace, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                 max_batch_size: int) -> tuple:
    """(ModelArgs, Meta-layout state dict on `device` in `dtype`) from --ckpt-dir or --shape. A checkpoint
    may have any layout Llama.build reads (Meta shards, however many; a Hugging Face directory): it is put
    together whole, for one process."""
    if opts.ckpt_dir:
        state, params = load_checkpoint(opts.ckpt_dir, model_parallel_size=1, model_parallel_rank=0)
        # Llama 2's params.json says vocab_size -1 (the tokenizer's); the embedding holds the number.
        params = dict(params, vocab_size=state["tok_embeddings.weight"].shape[0])
        args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        sd = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    else:
        args = ModelArgs.from_params(SHAPES[opts.shape], max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        sd = random_weights(args, dtype, device, opts.seed)
    return args, sd


def run(opts: argparse.Namespace) -> Dict[str, Any]:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = pick_device(opts.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    log(f"measuring {device} read bandwidth ...")
    bandwidth = measure_read_bandwidth(device)
    log(f"  {bandwidth / 1e9:.1f} GB/s")
    report: Dict[str, Any] = {
        "machine": machine_info(device), "model": opts.ckpt_dir or opts.shape, "prompt_len": opts.prompt_len,
        "new_tokens": opts.new_tokens, "repeats": opts.repeats, "compile": opts.compile,
        "read_bandwidth_bytes_s": bandwidth, "results": [], "picked_forms": {},
        "command": "python -m llama.bench " + " ".join(sys.argv[1:]),
    }
    max_seq_len = opts.prompt_len + opts.new_tokens
    max_batch = max(opts.batch)
    g = torch.Generator().manual_seed(opts.seed)
    for dtype_name in opts.dtype:
        dtype = DTYPES[dtype_name]
        log(f"building {report['model']} in {dtype_name} on {device} ...")
        args, sd = load_weights(opts, device, dtype, max_seq_len, max_batch)
        ours = build_ours(args, sd, device, dtype, True, opts.compile)
        kv_cache_bytes = sum(
            b.numel() * b.element_size() for n, b in ours.model.named_buffers() if n.endswith(("cache_k", "cache_v"))
        )
        built = [ours_system("ours", ours)]
        forms = {"ours": picked_forms(ours.model)}
        attention = {"ours": decode_attention.picked_attention(ours.model)}
        for quantize in opts.quantize:
            quantized = build_ours(args, sd, device, dtype, True, opts.compile, quantize)
            built.append(ours_system(f"ours-{quantize}", quantized))
            forms[f"ours-{quantize}"] = picked_forms(quantized.model)
            attention[f"ours-{quantize}"] = decode_attention.picked_attention(quantized.model)
        if device.type == "cuda" and opts.compile:  # llama.fast.decode_attention's pick and its timings
            report.setdefault("decode_attention", {})[dtype_name] = attention
            report["decode_attention_times_us"] = [
                {"key": list(map(str, key)), "us": {str(c): 1e6 * t for c, t in times.items()}}
                for key, times in decode_attention.PICK_TIMES.items()]
            log(f"  {dtype_name} decode attention: {attention}")
            if device.type == "cuda" and quantize == "int8":  # llama.fast.int8_gemv's picks
                report["int8_gemv_picks"] = picked_gemvs(quantized.model)
                log("  ours-int8 GEMV picks: " + "; ".join(f"{k} {v}" for k, v in report["int8_gemv_picks"].items()))
        if device.type == "cpu":  # the form each product took for decode steps (llama.fast.cpu_forms)
            report["picked_forms"][dtype_name] = forms
            # ... and the step: eager, or compiled whole where that won at load (llama.fast.cpu_step)
            report.setdefault("decode_steps", {})[dtype_name] = {
                s.name: step_description(s.llama) for s in built if hasattr(s, "llama")}
            log(f"  {dtype_name} decode steps: {report['decode_steps'][dtype_name]}")
            for name, picked in forms.items():
                log(f"  {name} {dtype_name} decode forms: " + ", ".join(f"{k} {v}" for k, v in picked.items()))
        if opts.default_forms and device.type == "cpu":
            built.append(ours_system("ours-default", build_ours(args, sd, device, dtype, True, opts.compile,
                                                                default_forms=True)))
            for quantize in opts.quantize:
                built.append(ours_system(f"ours-{quantize}-default", build_ours(
                    args, sd, device, dtype, True, opts.compile, quantize, default_forms=True)))
        if opts.simple:
            built.append(ours_system("ours-simple", build_ours(args, sd, device, dtype, False, False)))
        if not opts.no_hf:
            built.append(hf_system(build_hf(args, sd, device, dtype)))
        if opts.llamacpp:
            # The CPU features its build uses (e.g. "AVX512 = 0" for a build without AVX-512).
            report["llamacpp_system_info"] = import_llama_cpp().llama_print_system_info().decode(errors="replace")
            log("writing the weights as GGUF and loading them into llama.cpp ...")
            built.append(System(LLAMACPP, build_llamacpp(args, sd, dtype, torch.get_num_threads(),
                                                         gpu=device.type == "cuda")))
            if "int8" in opts.quantize:  # its Q8_0 on the same weights, beside our int8
                built.append(System(LLAMACPP_Q8_0, build_llamacpp(args, sd, dtype, torch.get_num_threads(),
                                                                  gpu=device.type == "cuda", quantize="q8_0")))
        for bsz in opts.batch:
            label = f"{dtype_name} batch {bsz}"
            prompts = torch.randint(0, args.vocab_size, (bsz, opts.prompt_len), generator=g).to(device)
            systems = [System(s.name, s.generate) for s in built if bsz == 1 or not s.name.startswith(LLAMACPP)]
            if opts.llamacpp and bsz > 1:
                log(f"  {label}: llama.cpp left out (llama-cpp-python decodes one sequence at a time)")
            # Other work on the machine slows the probe as much as the contenders: keep the best seen.
            round_bandwidths = measure(systems, prompts, opts.new_tokens, opts.repeats, opts.warmup, device, label)
            bandwidth = max([bandwidth] + round_bandwidths)
            res: Dict[str, Any] = {"dtype": dtype_name, "batch": bsz}
            with contextlib.suppress(OSError):
                res["load_average"] = os.getloadavg()  # other work on the machine while this was measured
            for s in systems:
                res[s.name] = summarise(s, bsz, opts.prompt_len, opts.new_tokens)
            traffic = bytes_per_decode_step(sd, args, dtype, bsz, opts.prompt_len, opts.new_tokens)
            res["bytes_per_decode_step"] = traffic
            int8_traffic = bytes_per_decode_step(sd, args, dtype, bsz, opts.prompt_len, opts.new_tokens, int8=True)
            q8_0_traffic = bytes_per_decode_step(sd, args, dtype, bsz, opts.prompt_len, opts.new_tokens, q8_0=True)
            int4_traffic = (bytes_per_decode_step(sd, args, dtype, bsz, opts.prompt_len, opts.new_tokens, int4=True)
                            if "int4" in opts.quantize else None)
            res["kv_cache_bytes"] = kv_cache_bytes
            res["round_read_bandwidths_bytes_s"] = round_bandwidths
            for s in systems:
                step_bytes = (int8_traffic if s.name.startswith("ours-int8")
                              else int4_traffic if s.name.startswith("ours-int4")
                              else q8_0_traffic if s.name == LLAMACPP_Q8_0 else traffic)["total_bytes"]
                res[s.name]["bytes_per_decode_step"] = step_bytes
                res[s.name]["effective_bandwidth_bytes_s"] = step_bytes * res[s.name]["decode_steps_s"]
                # Against the bandwidth measured in each round: both sides seen under the same load (the
                # best-of figures may come from different moments); and against the readings just before
                # and after the system's own runs.
                res[s.name]["median_round_fraction_of_read_bandwidth"] = median_fraction(
                    s, step_bytes, opts.new_tokens, round_bandwidths)
                res[s.name]["median_fraction_of_bracketing_read_bandwidth"] = median_fraction(
                    s, step_bytes, opts.new_tokens, s.bracketing_bandwidths)
                res[s.name]["bracketing_read_bandwidths_bytes_s"] = s.bracketing_bandwidths
            tokens = {s.name: s.tokens for s in systems}
            if "transformers" in res:
                res["ratio_decode"] = res["ours"]["decode_tok_s"] / res["transformers"]["decode_tok_s"]
                res["ratio_end_to_end"] = res["ours"]["end_to_end_tok_s"] / res["transformers"]["end_to_end_tok_s"]
                same_tokens(res, tokens["ours"], tokens["transformers"], "transformers")
            for mine, theirs, key in (("ours", LLAMACPP, "llamacpp"), ("ours-int8", LLAMACPP_Q8_0, "llamacpp_q8_0")):
                if theirs not in res or mine not in res:
                    continue
                res[f"ratio_{key}"] = res[mine]["decode_tok_s"] / res[theirs]["decode_tok_s"]
                res[f"ratio_{key}_end_to_end"] = res[mine]["end_to_end_tok_s"] / res[theirs]["end_to_end_tok_s"]
                # Round by round (both under the same load), the decode-time ratio; the median over rounds. A
                # round whose 1-token run outlasted its full run (noise, at a few tokens) counts as ~0, not < 0.
                o, c = (next(s for s in systems if s.name == name) for name in (mine, theirs))
                res[f"median_round_ratio_{key}"] = statistics.median(
                    [max(cf - ct, 1e-9) / max(of - ot, 1e-9)
                     for of, ot, cf, ct in zip(o.full, o.ttft, c.full, c.ttft)])
                same_tokens(res, tokens[mine], tokens[theirs], key)
            for name in ("ours", "ours-int8"):  # what picking the forms at load gained, round by round
                if f"{name}-default" in res:
                    o, d = (next(s for s in systems if s.name == n) for n in (name, f"{name}-default"))
                    res[f"median_round_ratio_{name}_picked_forms"] = statistics.median(
                        [(df - dt) / max(of - ot, 1e-9) for of, ot, df, dt in zip(o.full, o.ttft, d.full, d.ttft)])
            for quantize in opts.quantize:  # greedy agreement of the quantized weights with this dtype's
                same_tokens(res, tokens["ours"], tokens[f"ours-{quantize}"], quantize)
            report["results"].append(res)
            log(f"  {label}: " + ", ".join(f"{s.name} {res[s.name]['decode_tok_s']:.1f} tok/s" for s in systems))
        del ours, built, sd
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bandwidth = max(bandwidth, measure_read_bandwidth(device))
    report["read_bandwidth_bytes_s"] = bandwidth
    for res in report["results"]:
        for name in ("ours", "ours-simple", "ours-int8", "ours-int4", "ours-default", "ours-int8-default",
                     "ours-int4-default", "transformers", LLAMACPP, LLAMACPP_Q8_0):
            if name in res:
                res[name]["fraction_of_read_bandwidth"] = res[name]["effective_bandwidth_bytes_s"] / bandwidth
        # The roofline: no decode loop reads its bytes faster than the memory delivers them.
        res["roofline_decode_tok_s"] = res["batch"] * bandwidth / res["bytes_per_decode_step"]["total_bytes"]
        if "transformers" in res:
            res["largest_possible_ratio"] = res["roofline_decode_tok_s"] / res["transformers"]["decode_tok_s"]
        log(summary_line(res))
    return report


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama.bench", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", choices=sorted(SHAPES), default="small", help="random weights at this shape")
    src.add_argument("--ckpt-dir", help="a checkpoint instead (Meta's layout, any number of shards, or a "
                     "Hugging Face directory)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bfloat16", "float32"])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per system (the best is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="compile our decode step (CUDA graphs)")
    p.add_argument("--simple", action="store_true", help="also run our reference loop (fast=False)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, nargs="+", default=[],
                   help="also run ours with int8 (ours-int8) and/or int4 weights (ours-int4)")
    p.add_argument("--default-forms", action="store_true", help="also run ours (and ours-int8) with every "
                   "product in its default form, none picked at load (ours-default; the CPU only)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--llamacpp", action="store_true",
                   help="also run llama.cpp on the same weights, batch 1 only (needs llama-cpp-python and gguf)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json", help="JSON report path")
    p.add_argument("--chart", default="bench.png", help="PNG chart path ('' for none)")
    opts = p.parse_args(argv)
    for name in ("prompt_len", "new_tokens", "repeats"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is measured past the first token)")
    if min(opts.batch) < 1:
        p.error(f"--batch sizes must be positive, got {opts.batch}")
    if opts.ckpt_dir and not os.path.isdir(opts.ckpt_dir):
        p.error(f"checkpoint directory not found: {opts.ckpt_dir!r}")
    if opts.llamacpp:
        try:
            import_llama_cpp()
        except ImportError as e:
            p.error(str(e))
    if not opts.no_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            p.error("the comparison with Hugging Face needs transformers (pip install transformers); "
                    "or pass --no-hf to time this library alone")
    return opts


def main(argv: Optional[List[str]] = None) -> None:
    """Run the bench. A missing or unreadable checkpoint exits with status 2 and a message; Ctrl-C with 130."""
    opts = parse_args(argv)
    try:
        report = run(opts)
    except (OSError, ValueError, TypeError) as e:
        log(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(report_interrupt())
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=2)
    log(f"wrote {opts.out}")
    if opts.chart:
        log(f"wrote {opts.chart}" if chart(report, opts.chart) else "matplotlib is not installed: no chart")
    print(markdown_table(report))


if __name__ == "__main__":
    main()
