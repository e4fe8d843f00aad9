"""Hugging Face's Llama layout: a config.json and safetensors files (one, or several with an index), read
as a resharding `Source` and written from one.

It differs from Meta's layout in three ways:
- names: `model.layers.{i}.self_attn.q_proj.weight` for `layers.{i}.attention.wq.weight`, and so on;
- the rows of wq and wk: Hugging Face's RoPE rotates the two halves of each head where Meta's rotates
  adjacent pairs, so each head's rows are permuted (`permute_rows`, `unpermute_rows`);
- a tied output: with `tie_word_embeddings` (Llama 3.2) there is no lm_head tensor; the embedding serves.

`safetensors` is imported only when a Hugging Face checkpoint is read or written.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from llama.model import ModelArgs
from llama.checkpoints.reshard import Layout, Source, full_shapes, module_of, rank_tensor

LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
# Tensors some exports carry that are not parameters (older transformers saved RoPE's inverse frequencies).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
ROTATED = ("attention.wq", "attention.wk")

# Meta's (multiple_of, ffn_dim_multiplier) pairs, tried first when a config's intermediate_size is turned back
# into params.json values, so that converted files read like Meta's.
META_FFN_PARAMS = ((256, None), (4096, 1.3), (1024, 1.3), (4096, 1.2), (256, 1.5), (256, 1.0))


def hf_name(name: str) -> str:
    """Meta name -> Hugging Face name: 'layers.0.attention.wq.weight' -> 'model.layers.0.self_attn.q_proj.weight'."""
    base, suffix = name.rsplit(".", 1)
    if base.startswith("layers."):
        _, layer, module = base.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[module]}.{suffix}"
    return f"{TOP_NAMES[base]}.{suffix}"


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> Hugging Face order of wq/wk rows: within each head, the first rows of the rotated pairs
    (0, 2, 4, ...) move to the first half and the second rows (1, 3, 5, ...) to the second half."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face -> Meta order of wq/wk rows: the inverse of `permute_rows`."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def ffn_params(dim: int, hidden_dim: int) -> Dict[str, Any]:
    """params.json's multiple_of and ffn_dim_multiplier that give an FFN hidden size of `hidden_dim`."""
    candidates = list(META_FFN_PARAMS) + [
        (2**k, m) for k in range(12, -1, -1) for m in (None, 1.0, 1.2, 1.3, 1.5)
    ]
    for multiple_of, multiplier in candidates:
        if ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).ffn_hidden_dim == hidden_dim:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    # Any other size: a multiplier that lands on it with no rounding (the +0.5 survives float error in int()).
    return {"multiple_of": 1, "ffn_dim_multiplier": (hidden_dim + 0.5) / int(2 * 4 * dim / 3)}


def read_config(path: Path) -> Tuple[Dict[str, Any], bool]:
    """Meta-style params (params.json keys, plus the RoPE scaling constants) from a Hugging Face config.json,
    and whether the output layer is tied to the embedding. Raises ValueError for other architectures and
    for Llama variants this model does not implement."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type != "llama" or (architectures and "LlamaForCausalLM" not in architectures):
        raise ValueError(
            f"{str(path)!r} describes model_type={model_type!r}, architectures={architectures}: only Llama "
            "checkpoints (model_type 'llama', LlamaForCausalLM) can be loaded"
        )
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {missing}")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    unsupported = []
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={config['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            unsupported.append(f"{key}=true")
    if config.get("head_dim") not in (None, dim // n_heads):
        unsupported.append(f"head_dim={config['head_dim']} (not hidden_size // num_attention_heads)")
    # transformers 5 writes rope_parameters (theta inside); older files rope_theta and rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        unsupported.append(f"rope type {rope_type!r}")
    if unsupported:
        raise ValueError(f"{str(path)!r}: this Llama variant is not supported: {', '.join(unsupported)}")

    params: Dict[str, Any] = {
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "vocab_size": config["vocab_size"],
        **ffn_params(dim, config["intermediate_size"]),
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
    }
    if rope_type == "llama3":
        params.update(
            use_scaled_rope=True,
            rope_scaling_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_context=int(rope["original_max_position_embeddings"]),
        )
    return params, bool(config.get("tie_word_embeddings", False))


def hf_config(
    args: ModelArgs,
    vocab_size: int,
    *,
    tie_word_embeddings: bool,
    dtype: torch.dtype,
    max_position_embeddings: int,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
) -> Dict[str, Any]:
    """A config.json for `args`, with the keys Meta's Hugging Face repos carry (read by transformers 4 and 5)."""
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_context,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "head_dim": args.head_dim,
        "vocab_size": vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _safe_open(path: Path):
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(
            "reading or writing Hugging Face checkpoints needs the safetensors package: pip install safetensors"
        ) from None
    return safe_open(str(path), framework="pt")


class HFSource:
    """A Hugging Face Llama directory as a resharding Source: Meta names, Meta's q/k row order, read a slice
    at a time from the safetensors files (which are memory-mapped)."""

    def __init__(self, hf_dir: Path):
        """Read config.json and the tensor index; check every tensor's name and shape. Raises
        FileNotFoundError or ValueError naming the file and the tensor."""
        self.dir = Path(hf_dir)
        self.params, self.tied = read_config(self.dir / "config.json")
        self._files = self._tensor_files()
        self._handles: Dict[Path, Any] = {}
        args = ModelArgs.from_params(self.params, source=str(self.dir / "config.json"))
        self.layout = Layout(1, args.n_kv_heads, args.head_dim)
        self._shapes = full_shapes(args, self.params["vocab_size"])
        self._names = {name: self._hf_name_of(name) for name in self._shapes}

        missing = sorted(hf for hf in self._names.values() if hf not in self._files)
        known = set(self._names.values())
        unexpected = sorted(k for k in self._files if k not in known and not k.endswith(IGNORED_SUFFIXES))
        if missing or unexpected:
            raise ValueError(
                f"Hugging Face checkpoint {str(self.dir)!r} does not match its config.json: missing tensors "
                f"{missing[:10]}, unexpected tensors {unexpected[:10]}"
            )
        wrong = []
        for name, shape in self._shapes.items():
            actual = tuple(self._slice(self._names[name]).get_shape())
            if actual != shape:
                wrong.append(f"{self._names[name]} in {self._files[self._names[name]].name}: {actual}, "
                             f"config.json implies {shape}")
        if wrong:
            raise ValueError(f"{str(self.dir)!r} has tensors of the wrong shape: " + "; ".join(wrong[:10]))

    def _hf_name_of(self, name: str) -> str:
        if name == "output.weight" and self.tied and "lm_head.weight" not in self._files:
            return "model.embed_tokens.weight"
        return hf_name(name)

    def _tensor_files(self) -> Dict[str, Path]:
        """Hugging Face tensor name -> the safetensors file holding it."""
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = {name: self.dir / file for name, file in weight_map.items()}
            absent = sorted({str(p.name) for p in files.values() if not p.is_file()})
            if absent:
                raise FileNotFoundError(f"{str(index)!r} lists files that are not there: {absent}")
            return files
        files = {}
        for path in sorted(self.dir.glob("*.safetensors")):
            for name in _safe_open(path).keys():
                if name in files:
                    raise ValueError(
                        f"tensor {name!r} is in both {files[name].name} and {path.name} in {str(self.dir)!r}: "
                        "files of two checkpoints are mixed (or an index file is missing)"
                    )
                files[name] = path
        return files

    def _slice(self, name: str):
        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = _safe_open(path)
        return self._handles[path].get_slice(name)

    def names(self) -> List[str]:
        return list(self._shapes)

    def full_shape(self, name: str) -> Tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, part: int, dim: int, start: int, end: int) -> torch.Tensor:
        index = tuple(slice(start, end) if d == dim else slice(None) for d in range(len(self._shapes[name])))
        tensor = self._slice(self._names[name])[index]
        if module_of(name) in ROTATED:
            assert dim == 0 and start % self.layout.head_dim == 0, "q/k rows are read whole heads at a time"
            tensor = unpermute_rows(tensor, (end - start) // self.layout.head_dim)
        return tensor


def _umask() -> int:
    """The process's umask (read by setting it, then setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_hf(
    source: Source,
    args: ModelArgs,
    out_dir: Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    max_position_embeddings: int,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
) -> None:
    """Write `source` as a Hugging Face directory: config.json and model.safetensors, or model-NNNNN-of-MMMMM
    files of at most `max_shard_bytes` each plus model.safetensors.index.json. The output layer is tied
    (not written) when it equals the embedding bit for bit, as in Llama 3.2. Memory: one file's tensors."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("writing Hugging Face checkpoints needs safetensors: pip install safetensors") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    whole = Layout(1, source.layout.n_kv_heads, source.layout.head_dim)
    head_dim = source.layout.head_dim
    written: List[List[str]] = []  # the tensor names of each file
    batch: Dict[str, torch.Tensor] = {}
    batch_bytes = 0
    embedding: Optional[torch.Tensor] = None
    tied = False
    dtype = None
    total = 0

    def flush() -> None:
        save_file(batch, str(out_dir / f"part-{len(written):05d}.tmp"), metadata={"format": "pt"})
        written.append(list(batch))
        batch.clear()

    for name in source.names():
        tensor = rank_tensor(source, name, whole, 0).contiguous()
        dtype = dtype or tensor.dtype
        if name == "tok_embeddings.weight":
            embedding = tensor
        if name == "output.weight" and embedding is not None and torch.equal(tensor, embedding):
            tied = True
            continue
        if module_of(name) in ROTATED:
            tensor = permute_rows(tensor, tensor.shape[0] // head_dim).contiguous()
        size = tensor.numel() * tensor.element_size()
        if batch and batch_bytes + size > max_shard_bytes:
            flush()
            batch_bytes = 0
        batch[hf_name(name)] = tensor
        batch_bytes += size
        total += size
    flush()

    # safetensors writes through a private temporary file (mode 0600): give each file the mode any new file
    # gets here (0644 under umask 022), as the config.json beside it has.
    mode = 0o666 & ~_umask()
    if len(written) == 1:
        (out_dir / "part-00000.tmp").rename(out_dir / "model.safetensors")
        (out_dir / "model.safetensors").chmod(mode)
    else:
        weight_map = {}
        for i, names in enumerate(written):
            file = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            (out_dir / f"part-{i:05d}.tmp").rename(out_dir / file)
            (out_dir / file).chmod(mode)
            weight_map.update({name: file for name in names})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = hf_config(
        args,
        source.full_shape("tok_embeddings.weight")[0],
        tie_word_embeddings=tied,
        dtype=dtype,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
