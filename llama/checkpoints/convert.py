"""Convert checkpoints between Meta's layout and Hugging Face's, or reshard a Meta checkpoint.

    python -m llama.convert META_DIR HF_DIR                  # Meta -> Hugging Face (safetensors)
    python -m llama.convert HF_DIR META_DIR                  # Hugging Face -> Meta (one consolidated.00.pth)
    python -m llama.convert SRC_DIR META_DIR --shards 8      # either -> Meta, cut for 8 model-parallel ranks
    python -m llama.convert SRC_DIR INT8_DIR --quantize int8 # either -> Meta, int8 weights (docs/quantization.md)

Tensors are copied bit for bit (only the order of the q/k rows within each head changes between layouts),
so a round trip gives back identical tensors. --quantize int8 quantizes the linear weights as
Llama.build(..., quantize="int8") does (the same int8 tensors and scales; docs/quantization.md). The source
can be any layout `Llama.build` reads; the tokenizer.model beside it is copied where the target layout keeps
it. Memory: one output file at a time.
"""

import argparse
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from llama.checkpoints.meta import MetaShards, find_tokenizer, open_checkpoint, tokenizer_kind, write_meta
from llama.checkpoints.hf import write_hf
from llama.checkpoints.quantized import INT8_PARAMS, PARAMS_KEY, QuantizedSource, stored_quantization
from llama.fast.quantize import QUANTIZE_CHOICES, check_quantize
from llama.params import hf_context_length
from llama.model import ModelArgs

# params.json keys Meta's files never carry: written only when a Hugging Face config differs from what the
# file implies without them (Meta's constants; factor 32 for Llama 3.2 1B/3B).
ROPE_KEYS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context")


SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 2**30 bytes; plain numbers are bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 1000000)")
    number, unit = match.groups()
    return int(float(number) * SIZE_UNITS[unit.upper()])


def default_max_position_embeddings(args: ModelArgs) -> int:
    """The context Meta's Hugging Face configs state: 131072 (3.1+), 8192 (3), 16384 (CodeLlama), 4096 (2)."""
    return hf_context_length(args.rope_theta, args.use_scaled_rope)


def meta_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """`params` without the RoPE scaling keys whose values the rest of the file implies anyway, so that a
    converted params.json reads like Meta's (whose files never carry those keys)."""
    without = {k: v for k, v in params.items() if k not in ROPE_KEYS}
    implied = _quiet_args(without)
    return {k: v for k, v in params.items() if k not in ROPE_KEYS or getattr(implied, k) != v}


def _quiet_args(params: Dict[str, Any]) -> ModelArgs:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys are warned about where the model is built
        return ModelArgs.from_params(params)


def convert(
    src: str,
    dst: str,
    to: Optional[str] = None,
    shards: Optional[int] = None,
    max_shard_size: str = "5GB",
    max_position_embeddings: Optional[int] = None,
    embedding_split: Optional[str] = None,
    quantize: Optional[str] = None,
) -> str:
    """Write the checkpoint in `src` to the new directory `dst`; return the target layout ("meta" or "hf").

    Args:
        to: "meta" or "hf"; default the other layout than the source's ("meta" when `shards` is given).
        shards: Meta target only: the number of consolidated.NN.pth files (model-parallel ranks); default 1.
        max_shard_size: Hugging Face target only: the largest safetensors file.
        max_position_embeddings: Hugging Face target only: the context stated in config.json.
        embedding_split: Meta target only: cut tok_embeddings by "vocab" (Llama 3) or "dim" (Llama 2);
            default as the source does, or "dim" for a Hugging Face source with a SentencePiece tokenizer.
        quantize: "int8": write int8 linear weights with their scales (Meta target only; the default then).

    Raises FileNotFoundError, ValueError (bad options, a non-empty `dst`, a source that does not load).
    """
    check_quantize(quantize)
    if quantize == "int4":
        raise ValueError("int4 checkpoints are not written (quantize='int4' is offered at load only: "
                         "Llama.build(..., quantize='int4') or --quantize int4 on the command line)")
    source, params = open_checkpoint(src)
    is_meta = isinstance(source, MetaShards)
    to = to or ("meta" if shards or quantize or not is_meta else "hf")
    if to not in ("meta", "hf"):
        raise ValueError(f"--to must be 'meta' or 'hf', got {to!r}")
    stored = stored_quantization(params, f"{src}/params.json")
    if stored and (quantize or to == "hf"):
        raise ValueError(f"{src!r} is already {stored}: it can be resharded (--to meta, --shards), not quantized "
                         "again or written as Hugging Face files; convert the float checkpoint instead")
    if quantize and to == "hf":
        raise ValueError("--quantize writes Meta checkpoints (consolidated.NN.pth with scales): leave out --to hf")
    if quantize:
        source, params = QuantizedSource(source), dict(params, **{PARAMS_KEY: INT8_PARAMS})
    if to == "hf" and shards is not None:
        raise ValueError("--shards applies to Meta checkpoints only (Hugging Face files are not model-parallel)")
    out = Path(dst)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {dst!r} exists and is not empty")
    try:
        tokenizer: Optional[str] = find_tokenizer(src)
    except FileNotFoundError:
        tokenizer = None
    kind = tokenizer_kind(tokenizer) if tokenizer else None

    if to == "meta":
        if embedding_split is None:
            embedding_dim = source.layout.embedding_dim if is_meta else int(kind == "sentencepiece")
        elif embedding_split in ("vocab", "dim"):
            embedding_dim = int(embedding_split == "dim")
        else:
            raise ValueError(f"--embedding_split must be 'vocab' or 'dim', got {embedding_split!r}")
        write_meta(source, meta_params(params), out, shards or 1, embedding_dim)
        if tokenizer:
            shutil.copyfile(tokenizer, out / "tokenizer.model")
        return to

    args = ModelArgs.from_params(params)  # warns about keys params.json has that the model does not use
    bos = eos = None
    if kind == "sentencepiece":
        from llama.tokenizer_llama2 import SentencePieceTokenizer

        tok: Any = SentencePieceTokenizer(tokenizer)
        bos, eos = tok.bos_id, tok.eos_id
    elif kind == "tiktoken":
        from llama.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer)
        bos, eos = tok.bos_id, tok.eos_id
    write_hf(
        source,
        args,
        out,
        max_shard_bytes=parse_size(max_shard_size),
        max_position_embeddings=max_position_embeddings or default_max_position_embeddings(args),
        bos_token_id=bos,
        eos_token_id=eos,
    )
    if tokenizer:
        # Hugging Face's Llama 2 repos keep the SentencePiece model at the top; Llama 3 repos keep Meta's
        # tiktoken file under original/.
        target = out / "tokenizer.model" if kind == "sentencepiece" else out / "original" / "tokenizer.model"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(tokenizer, target)
    return to


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="a Meta checkpoint, a Hugging Face directory, or a Hugging Face repo")
    parser.add_argument("dst", help="the new directory")
    parser.add_argument("--to", choices=("meta", "hf"), help="target layout (default: the other one)")
    parser.add_argument("--shards", type=int, help="Meta target: number of model-parallel files (default 1)")
    parser.add_argument("--max_shard_size", default="5GB", help="Hugging Face target: largest file (default 5GB)")
    parser.add_argument("--max_position_embeddings", type=int, help="Hugging Face target: context in config.json")
    parser.add_argument("--embedding_split", choices=("vocab", "dim"), help="Meta target: tok_embeddings cut")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="Meta target: int8 linear weights with per-row scales (int4 is refused: load only)")
    opts = parser.parse_args(argv)
    try:
        to = convert(**vars(opts))
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {'Meta' if to == 'meta' else 'Hugging Face'} checkpoint to {opts.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
