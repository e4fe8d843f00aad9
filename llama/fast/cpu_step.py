"""The CPU decode step compiled whole: inductor's C++ for the step's ~200 operations, with no Python in it.

An eager CPU decode step calls ~200 small operations (norms, rotary embedding, the cache writes, attention,
SiLU, ...) between its products, each through torch's dispatcher and Python; on the bench's small shape, int8,
they were about a third of a 5.3 ms step (docs/cpu-step.md). Here the step (llama.fast.step.fast_forward at one
token per row) goes through torch.compile with inductor's CPU backend:

- `cpp_wrapper`: the compiled graph is called from generated C++, not from a generated Python function;
- after the first step of a batch size, the step calls inductor's compiled graph directly (DirectCall), not
  through torch.compile's frame, whose guards and argument gathering (~70 tensors from the model's modules)
  cost 0.1-0.2 ms a step with the caches cold from streaming the weights;
- the products keep the form the load-time probe picked (llama.fast.cpu_forms): a picked "compiled" or
  "blocked" form is inlined as its torch operations (its `traced` method), so inductor writes the same loop
  nest inside the step's graph; a layer left on oneDNN's packed weight takes the compiled form, unpacked
  (inductor cannot take oneDNN's opaque packed tensor, and `freezing`, which would pack a plain weight
  again, keeps a second copy of it); an int8 layer left on torch's int8 kernel takes the blocked form;
- the greedy pick (argmax of the logits) is made in the graph too, while the logits are in cache:
  `decode_and_pick`, which the decode loop takes where it would only take that pick;
- the batch size is static (another batch size compiles again); the cache length a step reads is dynamic, so
  one compilation serves every position and a step reads only the part of the cache filled so far.

Numerics are the eager fast path's: every product sums in float32 (the forms' own loops, in their order),
activations are never rounded beyond the model's dtype; inductor fuses the pointwise operations (and, with AVX2's
vectors, each multiply and add into an FMA: FMA_CONTRACT), which in float32 changes results by rounding only
(tests/test_cpu_step.py: the reference loop's greedy tokens, logits within a bound derived from float32
rounding).

`cpu_decode_step(model)` is what `Llama` calls: where the step compiled whole beats the eager step in a short
timed comparison at load (best of PROBE_ROUNDS rounds each, taking turns), it returns it, else None (the eager
step). It is left out where it cannot pay: models under PROBE_MIN_BYTES of linear weights (compiling costs
~10-25 s on 2 cores), another device, several model-parallel ranks, LLAMA_CPU_STEP=off. No C++ compiler (or
any failure of inductor): a warning, and the eager step.
"""

import os
import time
import types
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import torch
from torch import nn
from torch._inductor.compile_fx import compile_fx

from llama.fast.blocked import BlockedProduct
from llama.fast.cpu_forms import PROBE_MIN_BYTES, CompiledProduct, cache_per_isa, use_form
from llama.fast.layers import FastLinear, Positions
from llama.fast.quantize import Int8Linear
from llama.fast.step import DecodeStep, fast_forward
from llama.model import Transformer
from llama.sampling import greedy

ENV = "LLAMA_CPU_STEP"
# Timed rounds per side at load (the best of each counts), and steps per round.
PROBE_ROUNDS = 5
PROBE_STEPS = 4
# The eager step is kept only if it is at least this much faster than the compiled one; a tie keeps the
# compiled step. (Until issue 18's sixth pass a tie kept the eager one: on the bench's small shape, float32,
# Zen 5, the probe tied in 2 of 4 runs, 10.1 / 10.3 and 13.3 / 13.2 ms, and the eager step then decoded 68-80
# tok/s against 92-98 for the compiled one in the other runs; in one process, alternating, the eager step took
# 12.7-16.2 ms a step against 8.1-11.9 compiled. Compiling was already paid for by then.)
MIN_GAIN = 1.03
# A float product left on a form the step cannot inline takes the blocked form where it has at least this
# many times more rows than columns, else the compiled one. Measured on the bench's small shape (bf16, one
# process, alternating, 2 threads): the output projection (128256 x 512) and w13 (3584 x 512) blocked made the
# step 1.30x faster; blocking wqkv, wo and w2 as well, only 1.06x (docs/cpu-step.md).
BLOCKED_MIN_RATIO = 2
# Where torch's CPU vectors are these, the step is compiled with each multiply and the add after it fused
# into one FMA instruction (`-ffp-contract=fast`; inductor's default keeps them apart): one rounding instead
# of two, so each product's sum is as close to exact or closer. AVX2's products are bound by their arithmetic
# (int8 bytes taken out of words and converted, bf16 converted), not the memory: the step compiled with FMAs,
# against without, in one process, alternating, 30 rounds (emulated AVX2 on the AMD EPYC of issue 18's seventh
# pass, the bench's small shape): int8 0.88x (bf16 activations) and 0.91x (float32) of the time, float32 0.97x,
# bf16 0.98x. With AVX-512 (memory-bound) the int8 step took 1.035x: left as it was there.
FMA_CONTRACT = ("AVX2",)


def compile_options() -> Dict[str, object]:
    """Inductor's options for the CPU step: generated C++ calls the graph (no Python wrapper); where torch's
    vectors are AVX2's, multiplies and adds fused (FMA_CONTRACT). Not `freezing` (it packs plain weights for
    oneDNN again, a second copy of each), nor max_autotune (minutes of compiling on 2 cores; the products are
    the picked forms already)."""
    options: Dict[str, object] = {"cpp_wrapper": True}
    if torch.backends.cpu.get_cpu_capability() in FMA_CONTRACT:
        options["cpp.enable_floating_point_contract_flag"] = "fast"
    return options


class CompiledCPUStep:
    """A DecodeStep (same call) whose step is compiled whole by inductor for the CPU (see the module docstring).

    Building it gives every product a form inductor can inline: a float layer left on oneDNN's packed weight
    (or on F.linear) takes the blocked form where it has at least BLOCKED_MIN_RATIO times more rows than
    columns (short rows, many of them: the output projection, w13), else the compiled form, its weight
    unpacked (held once either way); an int8 layer left on torch's int8 kernel (which the graph would replace
    by a float copy of the weight at every step), the blocked one.
    The batch size is static (a new batch size compiles again), the cache length read dynamic.
    """

    def __init__(self, model: Transformer):
        self.model = model
        self.eager = DecodeStep(model)  # where compiling fails later (a new batch size), with a warning
        self.failed = False
        for m in model.modules():  # every product in a form inductor can inline (one with `traced`)
            if isinstance(m, FastLinear) and not hasattr(m.decode_form, "traced"):
                if m.out_features >= BLOCKED_MIN_RATIO * m.in_features:
                    use_form(m, "blocked", BlockedProduct(m.dense_weight()))
                else:  # (a packed layer's form is made by use_form, which unpacks the weight: held once)
                    use_form(m, "compiled", None if m.packed is not None else CompiledProduct(m.weight.detach()))
            elif isinstance(m, Int8Linear) and not hasattr(m.decode_form, "traced"):
                use_form(m, "blocked", BlockedProduct(m.int8_weight(), m.scale_act))
        # Dynamo keeps compiled graphs per code object, each behind guards it checks at every call: ~1,500
        # here, mostly on the model's modules (~0.5 ms a step, 8% of the small shape's bf16 step). This step's
        # model is fixed once built (its forms are in), so it gets a code object of its own (no other
        # instance, no other model, can reach its graphs) and guards only on its inputs and global state.
        step = types.FunctionType(CompiledCPUStep._step.__code__.replace(), globals(), "_step")
        self.options = compile_options()
        self.graph = torch.compile(types.MethodType(step, self), fullgraph=True, backend=self._inductor,
                                   options={"guard_filter_fn": _inputs_and_global_state})
        self.direct: Dict[Tuple[int, int], Optional[DirectCall]] = {}  # (batch size, threads) -> its graph
        self._last_call: Optional[tuple] = None  # (graph, its arguments, its outputs): the last through dynamo

    def _inductor(self, gm: torch.fx.GraphModule, example_inputs: List[torch.Tensor]) -> Callable:
        """torch.compile's backend: inductor with this step's options (what backend="inductor" does), its
        compiled graph's calls through dynamo recorded, for DirectCall."""
        graph = compile_fx(gm, example_inputs, config_patches=self.options)

        def call(*args):
            out = graph(*args)
            self._last_call = (graph, args, out)
            return out
        return call

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor,
              cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # cols: (kv_len,), only its length is read: a dimension torch.compile keeps symbolic (mark_dynamic)
        logits = fast_forward(self.model, tokens[:, None], positions, kv_len=cols.shape[0])[:, 0]  # (bsz, vocab)
        # The greedy pick, made here while the logits are in cache: after a step has streamed every weight
        # through the caches, the same pick made by the decode loop cost 0.1-0.15 ms a token (docs/cpu-step.md).
        return logits, pick(logits)  # (bsz, vocab), (bsz,)

    def __call__(self, tokens: torch.Tensor, positions: Positions, kv_len: int) -> torch.Tensor:
        """tokens: (bsz,); positions: (bsz,) or an int (every row there); kv_len: cache positions to read,
        beyond every row's position. Returns the logits (bsz, vocab). Where compiling fails (a new batch
        size), a warning, and from then on the eager step."""
        return self.decode_and_pick(tokens, positions, kv_len)[0]

    def decode_and_pick(self, tokens: torch.Tensor, positions: Positions,
                        kv_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The step's logits (bsz, vocab) and each row's greedy pick from them (bsz,): `greedy(logits)`, the
        first of equal maxima, a NaN counting as the largest."""
        if not self.failed:
            try:
                return self.run(tokens, positions, kv_len)
            except Exception as e:  # noqa: BLE001  (inductor raises many kinds: a compiler missing, a limit)
                warnings.warn(f"the compiled CPU decode step failed ({type(e).__name__}: {str(e)[:200]}); "
                              "decoding on the eager step")
                self.failed = True
        logits = self.eager(tokens, positions, kv_len)
        return logits, greedy(logits)

    def run(self, tokens: torch.Tensor, positions: Positions, kv_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The compiled step (compiled at the first call with a batch size), errors raised: logits, picks."""
        if isinstance(positions, int):
            positions = torch.full_like(tokens, positions)
        kv_len = max(kv_len, 2)  # a length of 1 would be taken as a constant
        key = (tokens.shape[0], torch.get_num_threads())
        direct = self.direct.get(key)
        if direct is not None and kv_len <= self.model.params.max_seq_len:
            return direct(tokens, positions, kv_len)
        # Through torch.compile (compiling at the first call with a batch size). Compiled code cannot take
        # inference tensors: run outside inference mode, on copies.
        with torch.inference_mode(False), torch.no_grad():
            tokens, positions = tokens.clone(), positions.clone()
            cols = torch.empty(kv_len, dtype=torch.int8)
            torch._dynamo.mark_dynamic(cols, 0)
            torch._dynamo.mark_static(tokens, 0)
            torch._dynamo.mark_static(positions, 0)
            self._last_call = None
            # Only the cache length is dynamic. Dynamo would otherwise make dimensions dynamic that it saw change
            # between compilations of the "same" code (keyed by file, line and name, so across models): found
            # with two models of different shapes in one process (sizes of the second's weights as symbols).
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                out = self.graph(tokens, positions, cols)
            if key not in self.direct:
                self.direct[key] = DirectCall.of(self._last_call, out, tokens, positions, kv_len)
            return out


class DirectCall:
    """The step's compiled graph called directly, without torch.compile's frame around it.

    Through torch.compile, each step checks the graph's guards and gathers its arguments: the step's tokens
    and positions, the cache length read, and ~70 tensors reached through the model's modules (its weights,
    the forms' blocks, the caches). With the caches cold from a step's stream of weights, that took 0.1-0.2 ms
    a step (docs/cpu-step.md). The arguments of one call through torch.compile are kept, and later calls
    change only the step's own three. What the guards would check is held fixed by the caller instead:
    the batch size and thread count (CompiledCPUStep keeps one DirectCall for each), grad mode off (the
    compiled graph runs no autograd either way), the cache length between 2 and max_seq_len (its guards'
    range), and the model not changed after the step is built (already assumed: the forms hold their own
    weight copies). Inference tensors may go in (the graph is called without dynamo's checks).
    """

    def __init__(self, graph: Callable, args: tuple, tokens_at: int, positions_at: int, kv_len_at: int):
        self.graph, self.args = graph, list(args)
        self.tokens_at, self.positions_at, self.kv_len_at = tokens_at, positions_at, kv_len_at

    @classmethod
    def of(cls, last_call: Optional[tuple], out: tuple, tokens: torch.Tensor, positions: torch.Tensor,
           kv_len: int) -> Optional["DirectCall"]:
        """The DirectCall for the graph of `last_call` (graph, args, outputs), the call through dynamo that
        gave `out` for these inputs; None where that call is not as DirectCall expects (the step's tokens and
        positions each one argument, the cache length the one int, the outputs handed back as they are):
        the step then stays on torch.compile's path."""
        if last_call is None:
            return None
        graph, args, graph_out = last_call
        tokens_at = [i for i, a in enumerate(args) if a is tokens]
        positions_at = [i for i, a in enumerate(args) if a is positions]
        ints = [i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)]
        passed_on = len(graph_out) == len(out) and all(g is o for g, o in zip(graph_out, out))
        if len(tokens_at) != 1 or len(positions_at) != 1 or len(ints) != 1 or args[ints[0]] != kv_len:
            return None
        return cls(graph, args, tokens_at[0], positions_at[0], ints[0]) if passed_on else None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> Tuple[torch.Tensor, ...]:
        args = self.args.copy()
        args[self.tokens_at], args[self.positions_at], args[self.kv_len_at] = tokens, positions, kv_len
        return tuple(self.graph(*args))


def pick(logits: torch.Tensor) -> torch.Tensor:
    """The greedy pick inside the compiled step: (bsz, vocab) -> (bsz,). Inductor's argmax, like torch's and
    `llama.sampling.greedy`, takes the first of equal maxima and lets a NaN win (tests/test_cpu_step.py)."""
    return torch.argmax(logits, dim=-1)


def _inputs_and_global_state(guards: Sequence) -> List[bool]:
    """Dynamo's guard filter for CompiledCPUStep: keep the guards on the step's arguments (a new batch size
    compiles again) and on global state (grad mode, ...), none on what it reads through `self`."""
    return [not guard.name.startswith("self") for guard in guards]


def compiles_on_cpu(model: Transformer) -> bool:
    """True where compile=True means this module's step: the model on the CPU, on one model-parallel rank."""
    return model.rope_cos.device.type == "cpu" and fs_init.get_model_parallel_world_size() == 1


def _layer_states(model: nn.Module) -> Dict[nn.Module, tuple]:
    """What CompiledCPUStep changes in each product's layer (its weight, packed weight and form), to put back."""
    return {m: (getattr(m, "packed", None), m.weight, m.decode_form, getattr(m, "form_name", None))
            for m in model.modules() if isinstance(m, (FastLinear, Int8Linear))}


def _restore(saved: Dict[nn.Module, tuple]) -> None:
    for m, (packed, weight, form, name) in saved.items():
        if isinstance(m, FastLinear):
            m.packed = packed
        m.decode_form = form
        m.weight = weight
        if name is None:
            m.__dict__.pop("form_name", None)
        else:
            m.form_name = name


def _time_round(step: Callable, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> float:
    """Seconds a step, over one round of PROBE_STEPS steps."""
    start = time.perf_counter()
    for _ in range(PROBE_STEPS):
        step(tokens, positions, kv_len)
    return (time.perf_counter() - start) / PROBE_STEPS


def _compare(steps: Dict[str, Callable], states: Dict[str, Dict[nn.Module, tuple]], tokens: torch.Tensor,
             positions: torch.Tensor, kv_len: int) -> Dict[str, float]:
    """The best seconds a step of each of `steps` over PROBE_ROUNDS rounds, the steps taking turns round by
    round (the order reversed every round), each run on its own layers (`states`, put in place before its
    round): a change in the machine's speed (other work, its memory's read speed, which swings by a third
    within minutes on the project's machine) then falls on both. (Until issue 18's seventh pass the eager
    rounds all ran before the compiled ones; the float32 step then lost at load in runs where it won the
    bench, and decoded 0.76x of llama.cpp on the eager step instead of 0.87-0.89x.)"""
    best = {name: float("inf") for name in steps}
    with torch.inference_mode():  # as the decode loop runs them
        for r in range(PROBE_ROUNDS):
            for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                _restore(states[name])
                best[name] = min(best[name], _time_round(steps[name], tokens, positions, kv_len))
    return best


@torch.no_grad()
def cpu_decode_step(model: Transformer, compile: bool = False) -> Optional[CompiledCPUStep]:
    """The decode step compiled whole for `model` on the CPU, or None for the eager DecodeStep.

    compile=True (Llama's compile=True on the CPU): compiled, untimed. Otherwise (LLAMA_CPU_STEP=auto, the
    default) only for models of PROBE_MIN_BYTES of linear weights or more, and unless a timed comparison at
    load finds the eager step at least MIN_GAIN times faster (the two take turns round by round, each on its
    own layers: compiling unpacks the packed weights, which are put back for the eager rounds and kept if the
    eager step wins); =probe: the
    comparison whatever the size; =off: never; =on: always, untimed. Not on another device, nor over several
    model-parallel ranks (the compiled step there is DecodeStep's). A compiler missing or failing: a warning,
    the model as it was, and None.
    """
    cache_per_isa()
    setting = os.environ.get(ENV, "auto")
    if setting not in ("auto", "off", "probe", "on"):
        raise ValueError(f"{ENV} must be 'auto', 'off', 'probe' or 'on', got {setting!r}")
    linears = [m for m in model.modules() if isinstance(m, (FastLinear, Int8Linear))]
    if not linears or not compiles_on_cpu(model):
        return None
    if model.params.max_seq_len < 3:
        return None  # the step reads at least 2 positions; nothing to gain on so short a context
    if not compile:
        weight_bytes = sum(m.out_features * m.in_features * _element_size(m) for m in linears)
        if setting == "off" or (setting == "auto" and weight_bytes < PROBE_MIN_BYTES):
            return None
    timed = not compile and setting in ("auto", "probe")
    tokens = torch.zeros(1, dtype=torch.long)
    kv_len = min(16, model.params.max_seq_len - 1)
    positions = torch.full((1,), kv_len - 1)  # what the probe writes in the cache, a prefill overwrites
    saved = _layer_states(model)
    start = time.perf_counter()
    try:
        step = CompiledCPUStep(model)
        step.run(tokens, positions, kv_len)  # compiles
    except Exception as e:  # noqa: BLE001  (a compiler missing or failing: inductor raises many kinds)
        _restore(saved)
        warnings.warn(f"the CPU decode step cannot be compiled here ({type(e).__name__}: {str(e)[:200]}); "
                      "it runs eagerly", stacklevel=2)
        return None
    step.compile_seconds = time.perf_counter() - start
    if not timed:
        return step
    compiled = _layer_states(model)
    best = _compare({"eager": DecodeStep(model), "compiled": step.run}, {"eager": saved, "compiled": compiled},
                    tokens, positions, kv_len)
    # What was measured, kept on the model whichever step won (the bench records it).
    model.cpu_step_probe = {"eager_step_s": best["eager"], "compiled_step_s": best["compiled"],
                            "compile_s": step.compile_seconds}
    if best["eager"] * MIN_GAIN <= best["compiled"]:
        _restore(saved)
        return None
    _restore(compiled)
    return step


def _element_size(layer: nn.Module) -> int:
    if isinstance(layer, Int8Linear):
        return 1
    return torch.empty((), dtype=layer.held().dtype).element_size()
