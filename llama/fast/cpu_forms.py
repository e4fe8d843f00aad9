"""The form each of the fast path's products takes on the CPU for a decode step, picked at load by timing.

A decode step multiplies a few rows of activations by every weight once: it is bound by how fast the weights
are read, and the kernel that streams them fastest differs with the weight's dtype, the shape and the CPU
(AVX-512 or AVX2, native bf16 or not). torch offers several forms of the same product:

- "packed": oneDNN on a weight packed once into its blocked layout (FastLinear's default, float weights);
- "linear": F.linear on the weight as stored (float weights where oneDNN cannot pack them);
- "int8pack": torch's `aten._weight_int8pack_mm` (Int8Linear's default where it runs): int8 weights, but its
  x86 vector loops are for bf16 activations only, float32 ones take a scalar loop;
- "dequantize": F.linear on a float copy of the int8 weight, made at every call (int8 weights where
  int8pack does not run; never timed against it, see _candidates);
- "compiled": a kernel that inductor (torch.compile's compiler) generates in C++ for exactly this product:
  each weight row is read once, as stored (int8, bf16 or float32), converted to float32 in registers,
  multiplied by the activation rows and summed in float32 vectors; int8 rows are then scaled and the result
  rounded once to the activations' dtype. Inductor vectorises it for the ISA torch uses (AVX-512 or AVX2,
  ATEN_CPU_CAPABILITY) and splits the weight's rows over the threads.
- "blocked": all three, held as blocks of output rows transposed, summed by an inductor kernel with several
  independent accumulators (llama.fast.blocked): the compiled form's one chain of additions per row, and
  its horizontal sum at every row's end, cap a thread below the memory's speed where rows are short. A
  layer taking it gives up its row-major weight for the blocks (a float prefill multiplies the blocks).

`pick_cpu_forms(model)` groups the model's products by weight shape and dtype, times each group's
candidate forms on the group's own weights (one pass over every layer of the group, so the weights stream
from memory as in a step, not from cache), alternating the forms round by round and keeping each one's
best pass, and gives every layer of the group the fastest. Timing, not a rule keyed on CPU flags: the
winner depends on the cache sizes, the memory and the threads as much as on the ISA, and the probe sees the
machine it runs on. The picked form serves products of up to DECODE_FORM_MAX_ROWS (llama.fast.layers)
rows (decode steps); a prefill's many rows keep the layer's own path. The bench prints the picks
(`picked_forms`).

Numerics: every form computes the same product to float32 rounding of the dequantized weights (another
summation order; tests/test_cpu_forms.py checks each against float64 within a derived tolerance). Forms that
round activations (int8pack with float32 activations cast to bf16) or quantize them (torch._int_mm, fbgemm's
dynamic linear) compute another product, and are not candidates (figures: docs/cpu-forms.md).

Small models are left alone: below PROBE_MIN_BYTES of linear weights the weights stay in cache, a step is
dominated by per-call costs, and compiling costs more than it could save (and no C++ compiler is needed).
LLAMA_CPU_FORMS=off keeps every layer's default form; =probe probes whatever the size.
"""

import os
import platform
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import torch
from torch import nn

from llama.fast.blocked import BlockedProduct
from llama.fast.layers import FastLinear, computed_once
from llama.fast.quantize import Int8Linear

# Below this many bytes of linear weights the model is not probed (see the module docstring).
PROBE_MIN_BYTES = 32 * 2**20
# Timed passes per form; the best counts.
PROBE_ROUNDS = 5
# A group's timed passes run over its first layers holding at least this many bytes (all of them if fewer):
# enough to stream from memory, and it bounds what the candidates' own copies (the blocked form's) add at load.
PROBE_PASS_BYTES = 256 * 2**20
ENV = "LLAMA_CPU_FORMS"


def _multiply_sum(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor], out_dtype: torch.dtype
                  ) -> torch.Tensor:
    """x (M, K) float32 times w (N, K)ᵀ, each product and sum in float32, times scale (N,) if any -> (M, N) in
    out_dtype. Written with the weight's rows outermost, so each is read once for all of x's rows."""
    y = (w[:, None, :].to(torch.float32) * x[None]).sum(-1)  # (N, M)
    if scale is not None:
        y = y * scale[:, None].to(torch.float32)
    return y.t().to(out_dtype)  # (M, N)


_KERNELS: Dict[tuple, Callable] = {}


def compiled_kernel(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor], out_dtype: torch.dtype
                    ) -> Callable:
    """Inductor's kernel for _multiply_sum at exactly these shapes and dtypes (compiled once per process;
    inductor also caches it on disk). Called directly: no torch.compile guards on the way."""
    from torch.fx.experimental.proxy_tensor import make_fx

    key = (tuple(x.shape), tuple(w.shape), w.dtype, None if scale is None else scale.dtype, out_dtype)
    if key not in _KERNELS:
        args = [x, w] if scale is None else [x, w, scale]
        if scale is None:
            def fn(a, b):
                return _multiply_sum(a, b, None, out_dtype)
        else:
            def fn(a, b, c):
                return _multiply_sum(a, b, c, out_dtype)
        with torch.inference_mode(False), torch.no_grad():
            example = [torch.zeros(a.shape, dtype=a.dtype) for a in args]  # not inference tensors
            graph = make_fx(fn)(*example)
            _KERNELS[key] = torch._inductor.compile(graph, example)
    return _KERNELS[key]


class CompiledProduct:
    """The "compiled" form of a layer's product: `form(x (..., K)) -> (..., N)`, with a kernel per number of
    rows (compiled at the first call with that many). bf16/fp16 activations are converted to float32 before
    the kernel (the kernel would convert each again for every weight row; measured slower) and the result
    rounded back once: the same numbers as converting inside."""

    def __init__(self, weight: torch.Tensor, scale: Optional[torch.Tensor] = None):
        self.weight = weight
        self.scale = scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()  # (M, K)
        args = (x2, self.weight) if self.scale is None else (x2, self.weight, self.scale)
        y = compiled_kernel(x2, self.weight, self.scale, x.dtype)(*args)
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., N)

    def traced(self, x: torch.Tensor) -> torch.Tensor:
        """The same product as torch operations, for a step compiled whole (llama.fast.cpu_step): inductor
        makes the same loop nest of it inside the step's graph."""
        x2 = computed_once(x.reshape(-1, x.shape[-1]).to(torch.float32))  # (M, K), not recomputed per row
        y = _multiply_sum(x2, self.weight, self.scale, x.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., N)


def _default_form(layer: nn.Module) -> str:
    if isinstance(layer, Int8Linear):
        return "int8pack" if layer.use_kernel else "dequantize"
    return "packed" if layer.packed is not None else "linear"


def _candidates(layer: nn.Module) -> Dict[str, Callable[[], Optional[Callable]]]:
    """The forms a layer can take, by name, each as a builder: it returns the form (a callable), or None for
    the layer's own default path (its forward). Built only where timed or picked (the blocked form copies
    the weight)."""
    forms: Dict[str, Callable[[], Optional[Callable]]] = {_default_form(layer): lambda: None}
    if isinstance(layer, Int8Linear):
        # Not "dequantize" beside int8pack: it writes a float copy of the weight at every call. Timed alone
        # it won on emulated AVX2 (int8 weights, float32 activations), yet it made the whole step 2x slower
        # there (docs/cpu-forms.md): its allocations do not time alone as they run in a step.
        forms["compiled"] = lambda: CompiledProduct(layer.int8_weight(), layer.scale_act)
        forms["blocked"] = lambda: BlockedProduct(layer.int8_weight(), layer.scale_act)
    else:
        forms["compiled"] = lambda: CompiledProduct(layer.dense_weight())
        forms["blocked"] = lambda: BlockedProduct(layer.dense_weight())
    return forms


def use_form(layer: nn.Module, name: str, form: Optional[Callable]) -> None:
    """Give `layer` the form `name` for its decode products (None: its own default path). A float layer
    taking the compiled form gives up its packed copy (the kernel reads the plain weight; a prefill then
    runs F.linear on it); a layer taking the blocked form gives up its weight for the form's blocks (a float
    prefill multiplies the blocks: BlockedProduct.full; an int8 one rebuilds Q: Int8Linear.int8_weight), so
    the weight is held once."""
    if name == "compiled" and isinstance(layer, FastLinear) and layer.packed is not None:
        form = CompiledProduct(layer.dense_weight())
        layer.weight = nn.Parameter(form.weight, requires_grad=False)
        layer.packed = None
    layer.decode_form = form
    layer.form_name = name
    if name == "blocked":
        layer.weight = None
        if isinstance(layer, FastLinear):
            layer.packed = None


def _linears(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (FastLinear, Int8Linear))}


def picked_forms(model: nn.Module) -> Dict[str, str]:
    """{"<kind> <N>x<K>": form} for the model's products: kind is the weight's dtype, N x K its shape."""
    out = {}
    for m in _linears(model).values():
        out[_group_key(m)[1]] = getattr(m, "form_name", _default_form(m))
    return out


def _group_key(layer: nn.Module) -> Tuple[tuple, str]:
    if isinstance(layer, Int8Linear):
        kind, dtype = "int8", layer.dtype
    else:
        kind, dtype = str(_float_dtype(layer)).replace("torch.", ""), None
    label = f"{kind} {layer.out_features}x{layer.in_features}"
    return (kind, dtype, layer.out_features, layer.in_features), label


def _time_pass(layers: List[nn.Module], forms: List[Optional[Callable]], x: torch.Tensor) -> float:
    start = time.perf_counter()
    for layer, form in zip(layers, forms):
        if form is None:
            layer(x)
        else:
            form(x)
    return time.perf_counter() - start


@torch.no_grad()
def cache_per_isa() -> None:
    """Give inductor's on-disk cache a directory of its own for an ISA chosen by ATEN_CPU_CAPABILITY (the
    emulation docs/cpu-forms.md describes), unless the caller chose a directory: torch 2.13's cache of compiled
    graphs does not tell them apart, and code generated for AVX2 built for AVX-512 writes past its buffers
    (seen: heap corruption in the bench's small-shape step after an AVX2 run). Call before compiling."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if not capability:
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default):  # inductor writes its default there
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default}_{capability.lower()}"


def pick_cpu_forms(model: nn.Module, force: Optional[str] = None, rows: int = 1) -> Dict[str, str]:
    """Time each group of `model`'s products (same shape and dtype) in every form it can take, at `rows`
    activation rows, and give each layer its group's fastest (see the module docstring). Returns
    picked_forms(model). A form that cannot be built here (no C++ compiler for inductor) is left out, with a
    warning. force: a form name every layer that can take it takes, untimed (for tests and measurements);
    "default" gives every layer its own default path.

    Does nothing for a model on another device than the CPU or split over several model-parallel ranks
    (each would time its own share while the others run), or (unless forced) one with fewer than
    PROBE_MIN_BYTES of linear weights or with LLAMA_CPU_FORMS=off.
    """
    cache_per_isa()
    linears = _linears(model)
    setting = os.environ.get(ENV, "auto")
    if setting not in ("auto", "off", "probe"):
        raise ValueError(f"{ENV} must be 'auto', 'off' or 'probe', got {setting!r}")
    weight_bytes = sum(_weight_bytes(m) for m in linears.values())
    if not linears or _device(next(iter(linears.values()))).type != "cpu" or \
            fs_init.get_model_parallel_world_size() > 1:
        return picked_forms(model)
    if force is None and (setting == "off" or (setting == "auto" and weight_bytes < PROBE_MIN_BYTES)):
        _warn_if_scalar(linears.values())
        return picked_forms(model)
    groups: Dict[tuple, List[nn.Module]] = {}
    for m in linears.values():
        groups.setdefault(_group_key(m)[0], []).append(m)
    for key, layers in groups.items():
        dtype = layers[0].dtype if isinstance(layers[0], Int8Linear) else _float_dtype(layers[0])
        x = torch.randn(rows, layers[0].in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        names = list(_candidates(layers[0]))
        if force is not None:
            name = _default_form(layers[0]) if force == "default" else force
            if name in names:
                for m in layers:
                    use_form(m, name, _candidates(m)[name]())
            continue
        timed = _probe_layers(layers)
        per_layer = [{n: build() for n, build in _candidates(m).items()} for m in timed]
        usable = []
        for name in names:
            try:  # the first call builds the form (inductor compiles here) and warms it up
                _time_pass(timed, [f[name] for f in per_layer], x)
                usable.append(name)
            except Exception as e:  # noqa: BLE001  (a compiler missing or failing: inductor raises many kinds)
                warnings.warn(f"the {name!r} form of {_group_key(layers[0])[1]} products cannot be built here "
                              f"({type(e).__name__}: {str(e)[:200]}); it is left out")
        best = {name: float("inf") for name in usable}
        for r in range(PROBE_ROUNDS):
            for name in usable if r % 2 == 0 else usable[::-1]:
                best[name] = min(best[name], _time_pass(timed, [f[name] for f in per_layer], x))
        name = min(usable, key=best.__getitem__)
        del per_layer  # the forms not picked (and their copies) go
        for m in layers:  # one at a time: a layer's old weight goes before the next one's form is built
            use_form(m, name, _candidates(m)[name]())
    _warn_if_scalar(linears.values())
    return picked_forms(model)


def _probe_layers(layers: List[nn.Module]) -> List[nn.Module]:
    """The first of `layers` that hold PROBE_PASS_BYTES together (all of them if they hold less)."""
    total = 0
    for i, m in enumerate(layers):
        total += _weight_bytes(m)
        if total >= PROBE_PASS_BYTES:
            return layers[:i + 1]
    return layers


def _warn_if_scalar(layers) -> None:
    """Warn where int8 products with float32 activations are left to torch's int8 kernel on x86: its vector
    loops are for bf16 activations, float32 ones take a scalar loop, several times slower than float32
    weights (measured: docs/quantization.md)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    if any(isinstance(m, Int8Linear) and m.dtype == torch.float32 and m.use_kernel and m.decode_form is None
           and _device(m).type == "cpu" for m in layers):
        warnings.warn("int8 weights with float32 activations run torch's scalar int8 kernel on this CPU, several "
                      f"times slower than float32 weights: the compiled form was not picked ({ENV}=off, a model "
                      "under PROBE_MIN_BYTES, or no compiler); dtype=torch.bfloat16 or LLAMA_CPU_FORMS=probe",
                      stacklevel=3)


def _device(layer: nn.Module) -> torch.device:
    if isinstance(layer, Int8Linear):
        return layer.scale.device  # its weight may be held by its blocked form
    return layer.held().device


def _float_dtype(layer: nn.Module) -> torch.dtype:
    return layer.held().dtype


def _weight_bytes(layer: nn.Module) -> int:
    return layer.out_features * layer.in_features * (1 if isinstance(layer, Int8Linear) else
                                                     torch.empty((), dtype=_float_dtype(layer)).element_size())
