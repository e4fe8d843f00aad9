"""Checks of a params.json dict against the fields of a dataclass (ModelArgs): each value of the type its
field declares (`"n_layers": "6"` would otherwise fail deep inside the model with a traceback), and the keys
the dataclass does not know, named with the field each is closest to (a misspelt key leaves its field at the
default, which shows up only later, as missing or misshapen tensors)."""

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
