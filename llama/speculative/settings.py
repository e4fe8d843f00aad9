"""Naming a speculative setting: the `speculative=` argument of Llama's calls and the CLI's `--speculative`.

A setting is a Speculation (a drafter and k), or a string "NAME" or "NAME:PATH":

    "lookup"              prompt lookup (no weights)
    "draft:PATH"          a draft model: the Llama checkpoint at PATH (any layout Llama.build loads)
    "eagle" / "eagle:DIR" the EAGLE-style draft head (llama.speculative.eagle; default: the demo model's)
    "eagle-tree[:DIR]"    the same head drafting a tree (llama.speculative.eagle_tree)
    "plain"               no drafts, one token per pass through the same loop: the baseline
                          (EAGLE's naivegenerate)

More drafters register a name with `register_drafter`.
A string is resolved once per Llama and name: the drafter (a draft model's weights) is kept and reused.
"""

import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from llama.speculative.drafters import DraftModel, Drafter, PromptLookup
from llama.speculative.generate import Speculation

DEFAULT_K = 4


@dataclass(frozen=True)
class DrafterKind:
    """A drafter that can be named in a setting string."""

    make: Callable[[Any, Optional[str]], Drafter]  # (the target Llama, PATH or None) -> a Drafter
    needs_path: bool  # "NAME:PATH" required (a checkpoint); otherwise PATH is optional
    k: int = DEFAULT_K  # drafts per pass when the caller gives no k
    help: str = ""


DRAFTERS: Dict[str, DrafterKind] = {}


def register_drafter(name: str, kind: DrafterKind) -> None:
    """Make `name` usable in settings ("name" or "name:PATH") and in the CLI's --speculative."""
    DRAFTERS[name] = kind


def build_draft_model(target: Any, path: Optional[str]) -> Drafter:
    """A DraftModel from the checkpoint at `path`, built by Llama.build for the target's context length,
    device, dtype and model-parallel ranks (under torchrun it is split as the target is)."""
    from llama.generation import Llama  # (not at import time: generation imports llama.speculative)

    dtype = target.model.tok_embeddings.weight.dtype
    draft = Llama.build(str(path), None, max_seq_len=target.model.params.max_seq_len, max_batch_size=1,
                        device=str(target.device), dtype=dtype, fast=target.fast)
    return DraftModel(draft)


register_drafter("lookup", DrafterKind(lambda target, path: PromptLookup(), needs_path=False,
                                       help="prompt lookup: continue the latest match of the last tokens"))
register_drafter("draft", DrafterKind(build_draft_model, needs_path=True,
                                      help="a smaller Llama sharing the tokenizer: draft:CKPT_DIR"))
register_drafter("plain", DrafterKind(lambda target, path: Drafter(), needs_path=False, k=0,
                                      help="no drafts (the baseline through the same loop)"))


def build_eagle_drafter(target: Any, path: Optional[str], tree: bool = False) -> Drafter:
    """The EAGLE-style head at `path` (default: the demo model's, models/demo-eagle) for the target, drafting
    with eagle_draft_options (measured on the demo: docs/speculative.md); with `tree`, a draft tree of
    TREE_BRANCH x TREE_NODES (llama.speculative.eagle_tree)."""
    from llama.cli.demo import DEMO_DIR  # (not at import time: llama.cli imports llama.generation)
    from llama.speculative.eagle import EagleDrafter
    from llama.speculative.eagle_tree import EagleTreeDrafter

    head_dir = path or DEMO_DIR.parent / "demo-eagle"
    options = eagle_draft_options(head_dir, target.model.tok_embeddings.weight.device)
    if tree:
        return EagleTreeDrafter(head_dir, target, branch=TREE_BRANCH, nodes=TREE_NODES, **options)
    return EagleDrafter(head_dir, target, **options)


EAGLE_DRAFT_VOCAB = 2048  # the most frequent tokens drafted (of the demo's 4352: 94% of its training text)
TREE_BRANCH, TREE_NODES, TREE_DEPTH = 3, 10, 4  # the named tree's shape (measured: docs/speculative.md, third slice)


def eagle_draft_options(head_dir: Any, device: Any = None) -> Dict[str, Any]:
    """EagleDrafter's options for a named setting: the head's EAGLE_DRAFT_VOCAB most frequent tokens where it
    ships draft_vocab.json with that many (else the whole vocabulary); on a CPU (`device`: the target's) whose
    torch runs int8 products for bf16 activations, the head's products in int8 (a quarter of float32's
    bytes: faster drafting, the same drafts on the demo: docs/speculative.md); elsewhere in the model's dtype
    (bf16 ones, with their casts, measured slower for the demo on the CPU)."""
    import torch

    from llama.fast.quantize import int8pack_mm_works
    from llama.speculative.draft_int8 import INT8_COLUMNS
    from llama.speculative.eagle import DRAFT_VOCAB_FILE, head_args

    options: Dict[str, Any] = {}
    if device is not None and torch.device(device).type == "cpu" and int8pack_mm_works(torch.device("cpu"),
                                                                                       torch.bfloat16):
        params_file = Path(head_dir) / "params.json"  # (a missing one: EagleDrafter's own error, later)
        args = head_args(json.loads(params_file.read_text()), 1) if params_file.is_file() else None
        if args is not None and args.dim % INT8_COLUMNS == 0 and args.ffn_hidden_dim % INT8_COLUMNS == 0:
            options["draft_dtype"] = torch.int8
    vocab_file = Path(head_dir) / DRAFT_VOCAB_FILE
    if vocab_file.is_file() and len(json.loads(vocab_file.read_text())) >= EAGLE_DRAFT_VOCAB:
        options["draft_vocab"] = EAGLE_DRAFT_VOCAB
    return options


register_drafter("eagle", DrafterKind(build_eagle_drafter, needs_path=False,
                                      help="the EAGLE-style draft head (eagle:HEAD_DIR; default models/demo-eagle)"))
register_drafter("eagle-tree", DrafterKind(lambda target, path: build_eagle_drafter(target, path, tree=True),
                                           needs_path=False, k=TREE_DEPTH,
                                           help="the EAGLE-style head drafting a tree, verified in one pass "
                                                "(eagle-tree:HEAD_DIR)"))

# Strings already resolved, per Llama: a draft model is loaded once.
_resolved: "weakref.WeakKeyDictionary[Any, Dict[tuple, Speculation]]" = weakref.WeakKeyDictionary()


def drafter_names() -> List[str]:
    return sorted(DRAFTERS)


def parse_setting(setting: str, k: Optional[int] = None) -> tuple:
    """"NAME[:PATH]" -> (name, path or None, k); ValueError naming the setting and the known names."""
    name, _, path = setting.partition(":")
    kind = DRAFTERS.get(name)
    if kind is None:
        raise ValueError(f"unknown speculative setting {setting!r}: expected one of "
                         f"{', '.join(drafter_names())} (as NAME or NAME:PATH)")
    if kind.needs_path and not path:
        raise ValueError(f"speculative setting {setting!r} needs a path: {name}:PATH")
    return name, path or None, kind.k if k is None else k


def resolve_speculation(setting: Union[None, str, Speculation], llama: Any, k: Optional[int] = None
                        ) -> Optional[Speculation]:
    """The Speculation a setting names, checked against `llama` (ValueError if the drafter cannot draft
    for it); None for None. `k` overrides a named drafter's default number of drafts per pass."""
    if setting is None:
        return None
    if isinstance(setting, Speculation):
        return setting.check(llama)
    if not isinstance(setting, str):
        raise TypeError(f"speculative must be a Speculation or a string such as 'lookup' or 'draft:PATH', "
                        f"got {type(setting).__name__}")
    name, path, k = parse_setting(setting, k)
    known = _resolved.setdefault(llama, {})
    key = (name, path, k)
    if key not in known:
        known[key] = Speculation(DRAFTERS[name].make(llama, path), k).check(llama)
    return known[key]
