"""Checkpoints on disk: find and check the files (Meta's consolidated.NN.pth shards, a Hugging Face
directory, Meta's files under a Hugging Face repo's original/ folder, the tokenizer), read params.json,
load safely (weights_only, mmap), give a model-parallel rank its share whatever the number of shards, put
the tensors into a model strictly, and write Meta shards for any number of ranks."""

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from llama.model import ModelArgs
from llama.checkpoints.quantized import check_int8_shard, stored_quantization, with_scales, without_quantization
from llama.checkpoints.reshard import Layout, Source, check_split, full_shapes, rank_state
from llama.params import check_param_types, unknown_keys_hint
from llama.checkpoints.rope_freqs import check_rope_freqs

# Tensors found in some checkpoints that are not parameters: Llama 2's precomputed RoPE frequencies
# (checked against params.json by MetaShards, then left out).
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
    """The dict in `ckpt_dir`/params.json. Raises FileNotFoundError, ValueError, or TypeError for a value
    of the wrong type (naming the key, the value and the file)."""
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"params.json not found in checkpoint directory {ckpt_dir!r}")
    try:
        params = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(params).__name__}")
    check_param_types(params, ModelArgs, str(path))
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
    int8 tensors (quantized weights, llama.checkpoints.quantized) stay int8.
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
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        setattr(module, param_name, nn.Parameter(value, requires_grad=False))


def _model_args(params: Dict[str, Any]) -> ModelArgs:
    """ModelArgs for the shapes only: unknown keys are left for Llama.build to warn about, once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ModelArgs.from_params(params)


class MetaShards:
    """The consolidated.NN.pth files of a Meta checkpoint as a resharding Source. The files are
    memory-mapped: a rank reads only the slices it takes."""

    def __init__(self, files: List[Path], params: Dict[str, Any]):
        """Open every shard and check that each holds the tensors of the model params.json describes, in the
        shapes a cut into len(files) pieces gives. Raises ValueError naming the file and the tensor."""
        self.files = files
        # An int8 checkpoint (llama.checkpoints.quantized) also holds scales; its params key is no ModelArgs field.
        quantized = stored_quantization(params, str(files[0].parent / "params.json")) is not None
        params = without_quantization(params)
        self.shards = [load_shard(f) for f in files]
        args = _model_args(params)
        n = len(files)
        n_kv_heads = args.n_kv_heads or args.n_heads
        # Llama 3 cuts the embedding by vocabulary (dim 0), Llama 2 by embedding dim (dim 1): shapes say which.
        embedding = self.shards[0].get("tok_embeddings.weight")
        if embedding is None or embedding.dim() != 2:
            raise ValueError(f"{str(files[0])!r} has no 2-d tensor 'tok_embeddings.weight'")
        if n == 1 or embedding.shape[1] == args.dim:
            embedding_dim, vocab_size = 0, embedding.shape[0] * n
        elif embedding.shape[1] * n == args.dim:
            embedding_dim, vocab_size = 1, embedding.shape[0]
        else:
            raise ValueError(
                f"{str(files[0])!r}: tensor 'tok_embeddings.weight' has shape {tuple(embedding.shape)}, which is "
                f"neither (vocab / {n}, dim={args.dim}) nor (vocab, dim / {n}) for a {n}-shard checkpoint"
                + unknown_keys_hint(params, ModelArgs)
            )
        if args.vocab_size > 0 and vocab_size != args.vocab_size:
            raise ValueError(
                f"params.json says vocab_size={args.vocab_size} but tensor 'tok_embeddings.weight' of "
                f"{str(files[0])!r} holds {vocab_size} tokens"
            )
        self.layout = Layout(n, n_kv_heads, args.head_dim, embedding_dim)
        self._shapes = full_shapes(args, vocab_size)
        if quantized:
            self._shapes = with_scales(self._shapes)
        for part, (path, shard) in enumerate(zip(files, self.shards)):
            found = set(shard) - IGNORED_KEYS
            missing = sorted(set(self._shapes) - found)
            unexpected = sorted(found - set(self._shapes))
            if missing or unexpected:
                raise ValueError(
                    f"{str(path)!r} does not hold the model params.json describes: missing tensors "
                    f"{missing[:10]}, unexpected tensors {unexpected[:10]}{unknown_keys_hint(params, ModelArgs)}"
                )
            wrong = []
            for name, full in self._shapes.items():
                expected = self.layout.local_shape(name, full, part)
                if tuple(shard[name].shape) != expected:
                    wrong.append(f"{name}: checkpoint {tuple(shard[name].shape)} vs model {expected}")
            if wrong:
                raise ValueError(
                    f"checkpoint file {str(path)!r} (shard {part} of {n}) has tensors of the wrong shape for the "
                    "model params.json describes: " + "; ".join(wrong[:10]) + unknown_keys_hint(params, ModelArgs)
                )
            if quantized:
                check_int8_shard(shard, str(path))
            if "rope.freqs" in shard:
                check_rope_freqs(shard["rope.freqs"], args, f"checkpoint file {str(path)!r}")

    def names(self) -> List[str]:
        return list(self._shapes)

    def full_shape(self, name: str) -> Tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, part: int, dim: int, start: int, end: int) -> torch.Tensor:
        return self.shards[part][name].narrow(dim, start, end - start)


def open_checkpoint(ckpt_dir: str) -> Tuple[Source, Dict[str, Any]]:
    """The checkpoint in `ckpt_dir` and its Meta-style params, whichever layout it has: Meta shards with
    params.json, a Hugging Face directory (config.json and safetensors), or Meta's files in `original/`.

    Raises FileNotFoundError when no checkpoint is there, ValueError for a directory that mixes layouts or
    for files that do not match their params.
    """
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir!r}")
    shards = sorted(path.glob("consolidated.*.pth"))
    hf_files = sorted(p.name for p in path.glob("*.safetensors"))
    has_config = (path / "config.json").is_file()
    if shards and (hf_files or has_config):
        raise ValueError(
            f"{ckpt_dir!r} mixes a Meta checkpoint ({[p.name for p in shards]}) with Hugging Face files "
            f"({(['config.json'] if has_config else []) + hf_files}); keep each checkpoint in its own directory"
        )
    if hf_files:
        if not has_config:
            raise FileNotFoundError(f"{ckpt_dir!r} holds safetensors files {hf_files} but no config.json")
        from llama.checkpoints.hf import HFSource

        source = HFSource(path)
        return source, source.params
    if not shards and any((path / "original").glob("consolidated.*.pth")):
        return open_checkpoint(str(path / "original"))  # a Hugging Face repo's copy of Meta's files
    if has_config:
        raise FileNotFoundError(
            f"{ckpt_dir!r} has a config.json but no *.safetensors files (only safetensors checkpoints are read, "
            "not pytorch_model*.bin)"
        )
    shards = find_shards(ckpt_dir)
    params = read_params(ckpt_dir)
    return MetaShards(shards, params), params


def load_checkpoint(
    ckpt_dir: str, model_parallel_size: int, model_parallel_rank: int
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """This rank's tensors (Meta names, cut for `model_parallel_size` ranks whatever the number of files on
    disk) and the model's params, from a checkpoint in any layout `open_checkpoint` reads."""
    source, params = open_checkpoint(ckpt_dir)
    args = _model_args(params)
    check_split(args, source.full_shape("tok_embeddings.weight")[0], model_parallel_size, repr(ckpt_dir))
    target = Layout(model_parallel_size, source.layout.n_kv_heads, source.layout.head_dim)
    return rank_state(source, target, model_parallel_rank), params


def write_meta(
    source: Source, params: Dict[str, Any], out_dir: Path, shards: int, embedding_dim: int = 0
) -> None:
    """Write `source` as Meta shards consolidated.00.pth ... for `shards` model-parallel ranks, and
    params.json. `embedding_dim` is the dim tok_embeddings is cut along: 0 (Llama 3) or 1 (Llama 2).
    Memory: one rank's share at a time."""
    vocab_size = source.full_shape("tok_embeddings.weight")[0]
    check_split(_model_args(params), vocab_size, shards, "the checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = Layout(shards, source.layout.n_kv_heads, source.layout.head_dim, embedding_dim)
    for rank in range(shards):
        # clone(): torch.save writes a view's whole underlying storage, i.e. the whole source tensor.
        state = {name: t.clone() for name, t in rank_state(source, target, rank).items()}
        torch.save(state, out_dir / f"consolidated.{rank:02d}.pth")
        del state
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")


def tokenizer_kind(path: str) -> str:
    """'tiktoken' for a BPE text file of "base64(token) rank" lines (Llama 3), 'sentencepiece' for a
    SentencePiece model, a protobuf (Llama 2). Raises FileNotFoundError or ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path!r}")
    with open(path, "rb") as f:
        head = f.read(1024)
    first_line = head.lstrip(b"\r\n").split(b"\n", 1)[0]
    if re.fullmatch(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?", first_line):
        return "tiktoken"
    # A protobuf starting with field 1 (the pieces), length-delimited: how every SentencePiece model starts.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    raise ValueError(
        f"{path!r} is neither a tiktoken BPE file nor a SentencePiece model (it starts with {head[:20]!r})"
    )


def find_tokenizer(ckpt_dir: str) -> str:
    """The tokenizer.model beside a checkpoint: in `ckpt_dir` or its original/ folder (Hugging Face repos).
    Raises FileNotFoundError naming the directory when it does not exist, else the tokenizer."""
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir!r}")
    for candidate in (Path(ckpt_dir) / "tokenizer.model", Path(ckpt_dir) / "original" / "tokenizer.model"):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"no tokenizer.model in {ckpt_dir!r} or its original/ folder: pass tokenizer_path explicitly"
    )
