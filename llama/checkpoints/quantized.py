"""int8 checkpoints: Meta's layout with every linear weight stored quantized (llama.fast.quantize's scheme).

The layout (docs/quantization.md): consolidated.NN.pth shards as Meta cuts them, in which each linear layer's
`<name>.weight` (wq, wk, wv, wo, w1, w2, w3, output) is int8 and a float32 `<name>.scale` (one per output row)
stands beside it; the embedding and the norms stay as they were. params.json says so with one more key:

    "quantization": {"type": "int8_weight_only", "group": "per_channel"}

Scales follow their rows: a column-parallel layer's are cut with its rows; a row-parallel layer's (wo, w2) are
the full rows' and every shard holds all of them. So an int8 checkpoint reshards as a float one does, bit for
bit, and a rank's share is what quantizing the full float tensors and cutting them would give.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch

from llama.checkpoints.reshard import COLUMN_PARALLEL, ROW_PARALLEL, Layout, Source, module_of, rank_tensor
from llama.fast.quantize import quantize_int8, quantize_row_parallel

PARAMS_KEY = "quantization"
INT8_PARAMS = {"type": "int8_weight_only", "group": "per_channel"}
SCALE_SUFFIX = ".scale"


def is_quantized_weight(name: str) -> bool:
    """True for the weights int8 checkpoints quantize: every linear layer's, not the embedding or norms."""
    return name.endswith(".weight") and module_of(name) in COLUMN_PARALLEL + ROW_PARALLEL


def scale_name(weight_name: str) -> str:
    """'layers.0.attention.wq.weight' -> 'layers.0.attention.wq.scale'."""
    return weight_name[: -len(".weight")] + SCALE_SUFFIX


def stored_quantization(params: Dict[str, Any], source: str = "params.json") -> Optional[str]:
    """"int8" for a params.json that declares int8 weights (INT8_PARAMS), None for one without the key.
    Raises ValueError for any other declaration, naming it: its weights could not be read right."""
    declared = params.get(PARAMS_KEY)
    if declared is None:
        return None
    if declared != INT8_PARAMS:
        raise ValueError(f"{source}: unknown {PARAMS_KEY!r} {declared!r}; this reader knows {INT8_PARAMS!r} "
                         "only (int8 weight-only, one scale per output row)")
    return "int8"


def without_quantization(params: Dict[str, Any]) -> Dict[str, Any]:
    """params without the quantization key (ModelArgs does not know it, and would warn)."""
    return {k: v for k, v in params.items() if k != PARAMS_KEY}


def with_scales(shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """Full tensor shapes of an int8 checkpoint: `shapes` (a float one's) with each quantized weight's
    (rows,) scales after it."""
    out: Dict[str, Tuple[int, ...]] = {}
    for name, shape in shapes.items():
        out[name] = shape
        if is_quantized_weight(name):
            out[scale_name(name)] = (shape[0],)
    return out


def check_int8_shard(shard: Dict[str, torch.Tensor], path: str) -> None:
    """Raise ValueError unless a shard's quantized weights are int8 and their scales floating-point."""
    wrong = [f"{name}: {t.dtype}" for name, t in shard.items()
             if (is_quantized_weight(name) and t.dtype != torch.int8)
             or (name.endswith(SCALE_SUFFIX) and not t.is_floating_point())]
    if wrong:
        raise ValueError(f"{path!r} is declared int8 by params.json, but holds {', '.join(wrong[:5])} (linear "
                         "weights must be int8, scales floating-point)")


def split_scales(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove the scales from a rank's state (in place) and return them by name."""
    return {name: state.pop(name) for name in [n for n in state if n.endswith(SCALE_SUFFIX)]}


def quantize_state(state: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """Quantize this rank's float linear weights in `state` in place (int8, on `device`), from the values as
    stored, and return their scales by name. Row-parallel weights take their full rows' scales (an all-reduce
    over the model-parallel group: every rank must call this). The rest is left as it is."""
    scales = {}
    for name in [n for n in state if is_quantized_weight(n)]:
        weight = state[name].to(device)
        q, scale = quantize_row_parallel(weight) if module_of(name) in ROW_PARALLEL else quantize_int8(weight)
        state[name], scales[scale_name(name)] = q, scale
    return scales


class QuantizedSource:
    """A float checkpoint seen as an int8 one (a resharding Source): each linear weight quantized whole
    (every row complete, whatever the files' cut), then cut as asked; scales beside the weights. For
    `python -m llama.convert --quantize int8`. Memory: one full quantized tensor at a time."""

    def __init__(self, source: Source):
        self.source = source
        self.layout = Layout(1, source.layout.n_kv_heads, source.layout.head_dim, source.layout.embedding_dim)
        self._whole = Layout(1, source.layout.n_kv_heads, source.layout.head_dim)
        self._cached: Tuple[Optional[str], Dict[str, torch.Tensor]] = (None, {})

    def names(self) -> List[str]:
        return list(with_scales({n: self.source.full_shape(n) for n in self.source.names()}))

    def full_shape(self, name: str) -> Tuple[int, ...]:
        if name.endswith(SCALE_SUFFIX):
            return (self.source.full_shape(name[: -len(SCALE_SUFFIX)] + ".weight")[0],)
        return self.source.full_shape(name)

    def _quantized(self, weight_name: str) -> Dict[str, torch.Tensor]:
        if self._cached[0] != weight_name:
            q, scale = quantize_int8(rank_tensor(self.source, weight_name, self._whole, 0))
            self._cached = (weight_name, {weight_name: q, scale_name(weight_name): scale})
        return self._cached[1]

    def read(self, name: str, part: int, dim: int, start: int, end: int) -> torch.Tensor:
        if name.endswith(SCALE_SUFFIX):
            tensor = self._quantized(name[: -len(SCALE_SUFFIX)] + ".weight")[name]
        elif is_quantized_weight(name):
            tensor = self._quantized(name)[name]
        else:
            return rank_tensor(self.source, name, self._whole, 0).narrow(dim, start, end - start)
        return tensor.narrow(dim, start, end - start)


def int8_scales(
    state: Dict[str, torch.Tensor], params: Dict[str, Any], quantize: Optional[str], device: torch.device,
    source: str,
) -> Tuple[Dict[str, Any], Optional[Dict[str, torch.Tensor]]]:
    """For Llama.build: (params without the quantization key, the scales of this rank's int8 weights or None).

    A checkpoint stored int8 gives its scales (taken out of `state`; its weights stay int8, quantize=None or
    not). Otherwise quantize="int8" quantizes `state`'s float linear weights in place (on `device`) and gives
    their scales; quantize=None leaves everything as it is and gives None."""
    stored = stored_quantization(params, f"{source}/params.json")
    params = without_quantization(params)
    if stored:
        return params, split_scales(state)
    if quantize == "int8":
        return params, quantize_state(state, device)
    return params, None
