"""Reading a params.json as Meta ships it.

1. Its values are checked against the fields of ModelArgs: each value of the type its field declares
   (`"n_layers": "6"` would otherwise fail deep inside the model with a traceback), and the keys ModelArgs does
   not know are named with the field each is closest to (a misspelt key leaves its field at the default,
   which shows up only later, as missing or misshapen tensors).
2. What it leaves unsaid is filled family by family (`implied_params`, `hf_context_length`). Meta's files do
   not name their family, and each family's code filled the gaps its own way:
   - Llama 2's params.json has no `rope_theta` (Meta's Llama 2 code has no such field and always rotates with
     base 10000); every Llama 3 file carries `rope_theta: 500000.0`, CodeLlama's carry 1000000. So a missing
     `rope_theta` means 10000.
   - Llama 3.2 1B and 3B (`use_scaled_rope` with dim 2048 / 3072) do not say their RoPE scaling factor. Meta's
     code applies 8 to every 3.1+ model; Meta has since said 32 is right for 3.2 (llama-models issues 166 and
     241), and Hugging Face's 3.2 configs say 32. We take 32. An explicit `rope_scaling_factor` key in
     params.json wins over this.
   - The context Hugging Face's configs state (`max_position_embeddings`) is not in params.json at all: 4096 for
     Llama 2, 16384 for CodeLlama, 8192 for Llama 3, 131072 for Llama 3.1 and later.
"""

import dataclasses
import difflib
import typing
from typing import Any, Dict, Tuple


def _accepted(annotation: Any) -> Tuple[Tuple[type, ...], bool]:
    """The Python types a JSON value may have for a field annotated `annotation`, and whether null may stand
    for it. An int is accepted where a float is declared (JSON writes 500000.0 and 500000 alike)."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) is typing.Union and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else annotation
    return ((int, float) if base is float else (base,)), optional


def check_param_types(params: Dict[str, Any], cls: type, source: str) -> None:
    """Raise TypeError naming the key, the value and `source` (the file) for the first field of the dataclass
    `cls` whose value in `params` does not have the field's type. A JSON true/false is no number here (Python
    counts bool as an int). Unknown keys are not looked at."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in params:
            continue
        value = params[f.name]
        types, optional = _accepted(hints[f.name])
        if value is None and optional:
            continue
        if isinstance(value, types) and (bool in types or not isinstance(value, bool)):
            continue
        wanted = "a number" if float in types else {bool: "true or false", int: "an integer"}.get(
            types[0], f"a {types[0].__name__}")
        raise TypeError(
            f"{source}: {f.name!r} must be {wanted}{' or null' if optional else ''}, got {value!r} "
            f"({type(value).__name__})"
        )


def describe_unknown_keys(params: Dict[str, Any], cls: type) -> str:
    """'' when every key of `params` is a field of the dataclass `cls`; else the unknown keys, each with the
    field it is closest to where one is close: "'n_layer' (did you mean 'n_layers'?)"."""
    names = [f.name for f in dataclasses.fields(cls)]
    described = []
    for key in sorted(set(params) - set(names)):
        close = difflib.get_close_matches(key, names, n=1)
        described.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return ", ".join(described)


def unknown_keys_hint(params: Dict[str, Any], cls: type, source: str = "params.json") -> str:
    """'' when every key is known; else a clause naming the unknown keys as a likely cause, to end an error
    about the model's tensors or shapes with."""
    described = describe_unknown_keys(params, cls)
    if not described:
        return ""
    return (f"; {source} also holds keys this reader does not know and ignored: {described}; a misspelt key "
            "leaves its field at the default, which changes the model's shape")


LLAMA2_ROPE_THETA = 10000.0
LLAMA3_ROPE_THETA = 500000.0
# The `dim` of Llama 3.2 1B and 3B, the only scaled-RoPE models whose factor is not Meta's code's 8.
LLAMA32_DIMS = (2048, 3072)
LLAMA32_ROPE_SCALING_FACTOR = 32.0


def implied_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """The values `params` (a params.json dict) implies for the keys it leaves out; keys it has win."""
    implied: Dict[str, Any] = {}
    if "rope_theta" not in params:
        implied["rope_theta"] = LLAMA2_ROPE_THETA
    if params.get("use_scaled_rope") and params.get("dim") in LLAMA32_DIMS and "rope_scaling_factor" not in params:
        implied["rope_scaling_factor"] = LLAMA32_ROPE_SCALING_FACTOR
    return implied


def hf_context_length(rope_theta: float, use_scaled_rope: bool) -> int:
    """The `max_position_embeddings` Hugging Face's conversion states for a family: 131072 (Llama 3.1+,
    scaled RoPE), 8192 (Llama 3, base 500000), 4096 (Llama 2, base 10000), 16384 (any other base: CodeLlama's
    1000000; transformers' converter gives 16384 to every pre-Llama-3 base above 10000)."""
    if use_scaled_rope:
        return 131072
    if rope_theta == LLAMA3_ROPE_THETA:
        return 8192
    if rope_theta == LLAMA2_ROPE_THETA:
        return 4096
    return 16384
