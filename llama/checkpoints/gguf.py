"""Write Meta-layout Llama weights as a GGUF file that llama.cpp runs (its "llama" architecture).

    from llama.checkpoints.gguf import write_gguf
    write_gguf("model.gguf", args, state_dict, torch.bfloat16)

Used by the benchmark (`python -m llama.bench --llamacpp`) to run llama.cpp on exactly the weights our model
runs. GGUF is a header of key/value metadata, a table of tensor names, shapes and types, then the tensor
data; the `gguf` package (pip install gguf) writes it.

The layout needs no rearranging:
- llama.cpp's "llama" architecture rotates adjacent pairs (2i, 2i+1) of each head with RoPE, as Meta's code
  does, so wq and wk go in as Meta stores them. (Hugging Face's checkpoints rotate halves; llama.cpp's own
  converter undoes that permutation for them, which is why Meta's layout is the one it wants.)
- GGUF lists a tensor's dimensions innermost first, and the gguf package reverses numpy's shape to write
  them, so a PyTorch weight (out_features, in_features) is stored as it is.
- Llama 3.1's RoPE scaling is not a formula in llama.cpp but a tensor, "rope_freqs.weight": one factor per
  rotated pair, by which it divides that pair's frequency. The factors are our unscaled frequencies over our
  scaled ones (llama.model.apply_scaling), so both sides turn at the same angles.

No tokenizer goes in ("no_vocab"): llama.cpp then takes `vocab_size` token ids and cannot turn text into
tokens or back, which is all the benchmark needs (it feeds token ids). Matrices are stored in the dtype
asked for (F32, F16 or BF16); 1-D tensors (the norms, the RoPE factors) in F32, as llama.cpp's converter
stores them: bf16 and fp16 values are exact in float32, so the numbers are the same.
"""

import os
from typing import Dict, Optional, Union

import torch

from llama.model import ModelArgs, apply_scaling, rope_frequencies
from llama.checkpoints.reshard import full_shapes

ARCH = "llama"

# Meta's names -> llama.cpp's, per layer ("layers.N." -> "blk.N.") and outside the layers.
LAYER_NAMES = {
    "attention_norm": "attn_norm",
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "ffn_norm": "ffn_norm",
    "feed_forward.w1": "ffn_gate",  # SwiGLU: w2(silu(w1 x) * w3 x)
    "feed_forward.w3": "ffn_up",
    "feed_forward.w2": "ffn_down",
}
TOP_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


def gguf_name(meta_name: str) -> str:
    """llama.cpp's name for one of Meta's tensors: "layers.3.attention.wq.weight" -> "blk.3.attn_q.weight".

    Raises:
        KeyError: for a name that a Llama 3 checkpoint does not have.
    """
    module, suffix = meta_name.rsplit(".", 1)
    if module.startswith("layers."):
        _, layer, rest = module.split(".", 2)
        return f"blk.{layer}.{LAYER_NAMES[rest]}.{suffix}"
    return f"{TOP_NAMES[module]}.{suffix}"


def rope_freq_factors(args: ModelArgs) -> torch.Tensor:
    """Llama 3.1 RoPE scaling as llama.cpp reads it: per pair, unscaled frequency / scaled frequency,
    (head_dim // 2,) float32 (1 where apply_scaling keeps the frequency, up to its scale factor)."""
    freqs = rope_frequencies(args.head_dim, args.rope_theta)
    scaled = apply_scaling(freqs, args.rope_scaling_factor, args.rope_low_freq_factor,
                           args.rope_high_freq_factor, args.rope_original_context)
    return freqs / scaled


def write_gguf(path: Union[str, os.PathLike], args: ModelArgs, sd: Dict[str, torch.Tensor],
               dtype: torch.dtype, quantize: Optional[str] = None) -> str:
    """Write `sd` (Meta's names and layout, one unsharded checkpoint) as a llama.cpp GGUF file.

    Args:
        path: the file to write.
        args: the model's hyper-parameters; `args.max_seq_len` is recorded as its context length.
        sd: every weight of the model in Meta's layout ("rope.freqs", if present, is ignored: it is
            recomputed from `args`).
        dtype: torch.float32, torch.bfloat16 or torch.float16, the type of the matrices in the file.
        quantize: "q8_0": every linear weight (not the embedding table) as llama.cpp's Q8_0 instead, blocks
            of 32 values of a row with one float16 scale each (max |w| / 127), quantized from the values in
            `dtype` by the gguf package's quantizer (bit-exact with ggml's own, as that package says).

    Returns:
        `path`, as a string.

    Raises:
        ImportError: the gguf package is missing (the message names the pip command).
        ValueError: an unsupported dtype or quantize, or a state dict whose names or shapes do not fit
            `args`.
    """
    try:
        import gguf
    except ImportError as e:
        raise ImportError("writing GGUF files needs the gguf package: pip install gguf==0.19.0") from e
    types = {torch.float32: (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
             torch.float16: (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
             torch.bfloat16: (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}
    if dtype not in types:
        raise ValueError(f"GGUF export supports {sorted(str(t) for t in types)}, got {dtype}")
    tensor_type, file_type = types[dtype]
    if quantize not in (None, "q8_0"):
        raise ValueError(f"GGUF export quantizes to 'q8_0' only (or None), got {quantize!r}")
    if quantize:
        file_type = gguf.LlamaFileType.MOSTLY_Q8_0
        if args.dim % 32 or args.ffn_hidden_dim % 32:
            raise ValueError(f"Q8_0 quantizes rows in blocks of 32: dim {args.dim} and the hidden dimension "
                             f"{args.ffn_hidden_dim} must be multiples of 32")
    expected = full_shapes(args, args.vocab_size)
    names = set(sd) - {"rope.freqs"}
    if names != set(expected):
        raise ValueError(f"the state dict does not fit the model's shape: missing {sorted(set(expected) - names)}, "
                         f"unexpected {sorted(names - set(expected))}")
    wrong = {k: tuple(sd[k].shape) for k in names if tuple(sd[k].shape) != expected[k]}
    if wrong:
        raise ValueError(f"tensor shapes do not fit the model: {wrong} (expected "
                         f"{ {k: expected[k] for k in wrong} })")

    n_kv = args.n_kv_heads or args.n_heads
    writer = gguf.GGUFWriter(os.fspath(path), ARCH)  # also records general.architecture
    writer.add_name("llama (exported by llama.checkpoints.gguf)")
    writer.add_file_type(int(file_type))
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    writer.add_tokenizer_model("no_vocab")

    for name in sorted(names, key=_file_order):
        tensor = sd[name].detach().to("cpu").contiguous()
        if quantize and tensor.dim() == 2 and name != "tok_embeddings.weight":
            # Q8_0 bytes (rows, in_features / 32 * 34); the writer recovers the shape from the type.
            values = tensor.to(dtype).float().numpy()
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(values, q8), raw_dtype=q8)
        elif tensor.dim() == 1 or dtype == torch.float32:
            writer.add_tensor(gguf_name(name), tensor.float().numpy())
        else:
            # numpy has no bfloat16: hand over the 16-bit patterns and name their type.
            bits = tensor.to(dtype).view(torch.int16).numpy()
            writer.add_tensor(gguf_name(name), bits, raw_dtype=tensor_type)
    if args.use_scaled_rope:
        writer.add_tensor("rope_freqs.weight", rope_freq_factors(args).numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


def _file_order(name: str) -> tuple:
    """Embedding, then layer by layer (numerically), then the final norm and output: the order a reader
    of the file expects, and the order llama.cpp's converter writes."""
    if name.startswith("layers."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("tok_embeddings") else 2, 0, name)
