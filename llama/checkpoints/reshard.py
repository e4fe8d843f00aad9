"""Resharding: give model-parallel rank r of M exactly the tensors it needs from a checkpoint saved as N
files, for any N and M the model's sizes allow.

fairscale cuts each weight along one dimension or keeps it whole: column-parallel layers (wq, wk, wv, w1,
w3, output) along dim 0, their output rows; row-parallel layers (wo, w2) along dim 1, their input columns;
norms are replicated. Think of a cut weight in its full, unsharded form: each file holds an interval of it
along the cut dimension, and each rank needs an interval. A rank's tensor is its interval, cut out of the
files that hold it. Files are memory-mapped, and a slice of a memory-mapped tensor reads only the pages it
covers, so no rank reads the whole checkpoint.

Two twists:
- KV heads. With more parts than KV heads, every part keeps a copy of the one KV head its query heads read
  (Meta ships Llama 3.1 405B for 16 GPUs so, and the model does the same on more ranks than KV heads).
  Files may hold such copies too; any copy will do.
- The embedding. Llama 3 cuts tok_embeddings by vocabulary (dim 0), Llama 2 by the embedding dim (dim 1);
  a checkpoint's choice shows in its shard shapes. The model here always cuts it by vocabulary.

A checkpoint format plugs in as a `Source`: Meta's shards (llama.checkpoints.meta.MetaShards) and Hugging Face
safetensors (llama.checkpoints.hf.HFSource) both are.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Tuple

import torch

from llama.model import ModelArgs

COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")
KV_WEIGHTS = ("attention.wk", "attention.wv")


def module_of(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'attention.wq'; 'output.weight' -> 'output'."""
    base = name.rsplit(".", 1)[0]
    return base.split(".", 2)[2] if base.startswith("layers.") else base


def full_shapes(args: ModelArgs, vocab_size: int) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of the model with its full (unsharded) shape, in Meta's names and order."""
    dim, hidden, head_dim = args.dim, args.ffn_hidden_dim, args.head_dim
    n_kv_heads = args.n_kv_heads or args.n_heads
    shapes = {"tok_embeddings.weight": (vocab_size, dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (args.n_heads * head_dim, dim)
        shapes[p + "attention.wk.weight"] = (n_kv_heads * head_dim, dim)
        shapes[p + "attention.wv.weight"] = (n_kv_heads * head_dim, dim)
        shapes[p + "attention.wo.weight"] = (dim, args.n_heads * head_dim)
        shapes[p + "feed_forward.w1.weight"] = (hidden, dim)
        shapes[p + "feed_forward.w2.weight"] = (dim, hidden)
        shapes[p + "feed_forward.w3.weight"] = (hidden, dim)
        shapes[p + "attention_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
    shapes["norm.weight"] = (dim,)
    shapes["output.weight"] = (vocab_size, dim)
    return shapes


def check_split(args: ModelArgs, vocab_size: int, parts: int, source: str) -> None:
    """Raise ValueError unless the model can be cut into `parts` model-parallel parts."""
    n_kv_heads = args.n_kv_heads or args.n_heads
    problems = [
        f"{what}={size} is not divisible by {parts}"
        for what, size in (
            ("n_heads", args.n_heads),
            ("FFN hidden size", args.ffn_hidden_dim),
            ("vocab_size", vocab_size),
        )
        if size % parts
    ]
    if n_kv_heads % parts and parts % n_kv_heads:
        problems.append(f"n_kv_heads={n_kv_heads} neither divides nor is a multiple of {parts}")
    if problems:
        raise ValueError(f"cannot split {source} over {parts} model-parallel ranks: " + "; ".join(problems))


@dataclass(frozen=True)
class Layout:
    """How a model's weights are cut over `parts` files or ranks."""

    parts: int
    n_kv_heads: int
    head_dim: int
    embedding_dim: int = 0  # the dim tok_embeddings is cut along: 0 (vocabulary, Llama 3), 1 (Llama 2)

    def split_dim(self, name: str) -> Optional[int]:
        """The dimension `name` is cut along, or None if every part holds all of it."""
        module = module_of(name)
        if name.endswith(".scale"):  # an int8 weight's per-row scales (llama.checkpoints.quantized): cut with
            return 0 if module in COLUMN_PARALLEL else None  # its rows; a row-parallel one's are whole rows'
        if module == "tok_embeddings":
            return self.embedding_dim
        if module in COLUMN_PARALLEL:
            return 0
        if module in ROW_PARALLEL:
            return 1
        return None

    def interval(self, name: str, full_size: int, part: int) -> Tuple[int, int]:
        """[start, end) of the full tensor `name`, along its cut dimension, that `part` holds."""
        if module_of(name) in KV_WEIGHTS and self.parts > self.n_kv_heads:
            # Copies of one KV head sit on neighbouring parts, as the query heads that read it do.
            head = part // (self.parts // self.n_kv_heads)
            return head * self.head_dim, (head + 1) * self.head_dim
        size = full_size // self.parts
        return part * size, (part + 1) * size

    def local_shape(self, name: str, full_shape: Tuple[int, ...], part: int) -> Tuple[int, ...]:
        """The shape of `part`'s piece of a tensor whose full shape is `full_shape`."""
        dim = self.split_dim(name)
        if dim is None:
            return tuple(full_shape)
        start, end = self.interval(name, full_shape[dim], part)
        return tuple(end - start if d == dim else n for d, n in enumerate(full_shape))


class Source(Protocol):
    """A checkpoint seen as Meta-named tensors cut by `layout`, read a slice at a time."""

    layout: Layout

    def names(self) -> List[str]:
        """The parameter names, in Meta's naming."""
        ...

    def full_shape(self, name: str) -> Tuple[int, ...]:
        """The unsharded shape of tensor `name`."""
        ...

    def read(self, name: str, part: int, dim: int, start: int, end: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, end) of `part`'s piece of `name`."""
        ...


def rank_tensor(source: Source, name: str, target: Layout, rank: int) -> torch.Tensor:
    """The piece of tensor `name` that part `rank` of `target` holds, read from `source`."""
    full = source.full_shape(name)
    dim = target.split_dim(name)
    if dim is None:
        return source.read(name, 0, 0, 0, full[0])
    start, end = target.interval(name, full[dim], rank)
    layout = source.layout
    source_dim = layout.split_dim(name)
    if layout.parts > 1 and source_dim != dim:
        # An embedding cut the other way on disk (Llama 2's by columns, wanted by rows, or back): every file
        # holds a block of the wanted slice.
        pieces = [source.read(name, part, dim, start, end) for part in range(layout.parts)]
        return torch.cat(pieces, dim=source_dim)
    pieces = []
    pos = start
    while pos < end:
        # The first file holding position `pos`: where files hold copies of a KV head, one copy is read.
        for part in range(layout.parts):
            part_start, part_end = layout.interval(name, full[dim], part)
            if part_start <= pos < part_end:
                break
        else:
            raise AssertionError(f"no part of {name} holds position {pos}")
        stop = min(end, part_end)
        pieces.append(source.read(name, part, dim, pos - part_start, stop - part_start))
        pos = stop
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def rank_state(source: Source, target: Layout, rank: int) -> Dict[str, torch.Tensor]:
    """Every tensor of part `rank` of `target`. Slices of memory-mapped files stay views where they are
    contiguous (whole rows), so memory is only touched when the model uses the weights."""
    return {name: rank_tensor(source, name, target, rank).contiguous() for name in source.names()}
