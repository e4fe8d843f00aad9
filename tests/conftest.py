from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict

import pytest

# Tests import their helpers as a plain module and the package from the checkout.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

# CI must not fail on an example that a random search happens to find one day and not the next: there the
# property tests run a fixed (derandomized) set of examples; locally they keep exploring.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

import torch  # noqa: E402

from llama.fast.cpu_forms import cache_per_isa  # noqa: E402

# Under an emulated ISA (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine, docs/cpu-forms.md) the tests' own
# torch.compile calls need inductor's cache of that ISA, as the library's do: kernels an AVX-512 run cached
# gave wrong values under AVX2 (issue 18, seventh pass).
cache_per_isa()

from helpers import (  # noqa: E402
    SMALL_GQA, random_state_dict, real_tokenizer_path, train_sentencepiece, write_byte_tokenizer, write_checkpoint,
)

if TYPE_CHECKING:
    from llama import Llama

# The vocabulary each tokenizer kind brings; a checkpoint's params.json vocab_size defaults to it.
TOKENIZER_VOCAB = {"byte": 512, "llama3": 128256, "sentencepiece": 320}


@dataclass(frozen=True)
class TinyCheckpoint:
    """A random checkpoint in Meta's layout: `dir` holds params.json, consolidated.NN.pth and tokenizer.model
    (as Meta ships them); `state_dict` is the full, unsharded weights that were written. Shared by the
    tests that ask for the same one: read it, never change it (copy `dir` first, as test_errors does)."""

    dir: Path
    tokenizer: Path
    state_dict: Dict[str, torch.Tensor]
    params: Dict


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., TinyCheckpoint]:
    """tiny_checkpoint(params=SMALL_GQA, *, seed=0, n_shards=1, dtype=torch.float32, tokenizer="byte"):
    a random checkpoint of `params` (tests/helpers' shapes; vocab_size defaults to the tokenizer's) stored in
    `dtype`, cut into `n_shards` as Meta cuts them. The same seed gives the same weights whatever n_shards
    and however often it is asked for; each distinct checkpoint is written once per session.

    tokenizer: "byte" (256 byte tokens + 256 special), "llama3" (Meta's tokenizer.model) or "sentencepiece"
    (a small Llama 2-style model trained on tests/helpers' corpus). A params vocab_size of -1 is Llama 2's
    "take it from the tokenizer": the weights then get the tokenizer's vocabulary."""
    written: Dict[str, TinyCheckpoint] = {}

    def make(params: Dict = SMALL_GQA, *, seed: int = 0, n_shards: int = 1, dtype: torch.dtype = torch.float32,
             tokenizer: str = "byte") -> TinyCheckpoint:
        if tokenizer not in TOKENIZER_VOCAB:
            raise ValueError(f"tokenizer={tokenizer!r}: expected one of {sorted(TOKENIZER_VOCAB)}")
        params = dict(params)
        params.setdefault("vocab_size", TOKENIZER_VOCAB[tokenizer])
        key = repr((sorted(params.items()), seed, n_shards, dtype, tokenizer))
        if key not in written:
            ckpt_dir = tmp_path_factory.mktemp("tiny_checkpoint")
            weights_vocab = TOKENIZER_VOCAB[tokenizer] if params["vocab_size"] == -1 else params["vocab_size"]
            sd = random_state_dict(dict(params, vocab_size=weights_vocab), seed, dtype)
            write_checkpoint(ckpt_dir, params, n_shards=n_shards, sd=sd)
            tok = ckpt_dir / "tokenizer.model"
            if tokenizer == "byte":
                write_byte_tokenizer(tok)
            elif tokenizer == "llama3":
                shutil.copy(real_tokenizer_path(), tok)
            else:
                train_sentencepiece(tok, TOKENIZER_VOCAB["sentencepiece"])
            written[key] = TinyCheckpoint(ckpt_dir, tok, sd, params)
        return written[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoint) -> Callable[..., Llama]:
    """tiny_llama(params=SMALL_GQA, *, seed=0, n_shards=1, checkpoint_dtype=torch.float32, tokenizer="byte",
    max_seq_len=64, max_batch_size=4, **build_kwargs): Llama.build on tiny_checkpoint(...)'s files.

    Each call builds a new Llama, as Llama.build does (seeding torch's global RNG; the Llama holds a KV cache),
    so that no test inherits another's state by accident; the files are shared. build_kwargs (device, dtype,
    fast, compile, chat_format, ...) go to Llama.build as given: leave device out for Llama.build's own
    default."""
    from llama import Llama  # imported when first asked for: test files that build no model skip it

    def build(params: Dict = SMALL_GQA, *, seed: int = 0, n_shards: int = 1,
              checkpoint_dtype: torch.dtype = torch.float32, tokenizer: str = "byte", max_seq_len: int = 64,
              max_batch_size: int = 4, **build_kwargs) -> Llama:
        ckpt = tiny_checkpoint(params, seed=seed, n_shards=n_shards, dtype=checkpoint_dtype, tokenizer=tokenizer)
        return Llama.build(str(ckpt.dir), str(ckpt.tokenizer), max_seq_len, max_batch_size, **build_kwargs)

    return build
