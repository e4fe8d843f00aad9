"""Meta's checkpoint layout on disk: find and check the files, read params.json, load this rank's shard
safely (weights_only, mmap) and put its tensors into a model, strictly."""

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn

# Tensors found in some checkpoints that are not parameters: Llama 2's precomputed RoPE frequencies.
IGNORED_KEYS = {"rope.freqs"}


def find_shards(ckpt_dir: str) -> List[Path]:
    """The `consolidated.NN.pth` files of `ckpt_dir`, sorted. Raises FileNotFoundError."""
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir!r}")
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"no consolidated.*.pth checkpoint files in {ckpt_dir!r}")
    return shards


def read_params(ckpt_dir: str) -> Dict[str, Any]:
    """The dict in `ckpt_dir`/params.json. Raises FileNotFoundError or ValueError."""
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"params.json not found in checkpoint directory {ckpt_dir!r}")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(params).__name__}")
    return params


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """Load one shard to the CPU with `weights_only=True` (a pickle cannot run code) and `mmap=True`
    (tensors are paged in from the file as they are used). Errors name the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors (weights_only=True): {e}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt or truncated: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint file {str(path)!r} does not hold a dict of tensors")
    return state


def load_into(
    model: nn.Module, state: Dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, source: str
) -> None:
    """Replace `model`'s parameters by the tensors of `state`, converted to `device` and `dtype`.

    Strict: a missing or unexpected tensor, or a shape that differs, raises ValueError naming the tensors,
    the shapes and `source`. Tensors are converted one at a time, so peak memory stays near the model's size.
    """
    expected = dict(model.named_parameters())
    found = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source!r} does not match the model: missing tensors {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected tensors {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in found.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise ValueError(f"checkpoint {source!r} has tensors of the wrong shape: " + "; ".join(wrong[:10]))
    for name, tensor in found.items():
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = tensor.to(device=device, dtype=dtype)
        setattr(module, param_name, nn.Parameter(value, requires_grad=False))
