"""The Llama Transformer: RMSNorm, rotary position embeddings, grouped-query attention with a KV cache,
a SwiGLU feed-forward network, all sharded over model-parallel ranks with fairscale as Meta shards them.

Shapes use these names: bsz (batch), seqlen (tokens in this call), start_pos (tokens already in the cache),
dim (model width), n_heads / n_kv_heads (query / key-value heads on this rank), head_dim = dim // n_heads.
"""

import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from llama.params import implied_params
from llama.params import check_param_types, describe_unknown_keys


@dataclass
class ModelArgs:
    """Hyper-parameters of a Llama model: the fields of Meta's params.json plus the cache size.

    `from_params` fills it from a params.json dict, ignoring (with a warning) keys it does not know.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: take it from the tokenizer (Llama 2's params.json says so)
    multiple_of: int = 256  # the FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    # Meta's Llama 3 default. `from_params` reads a params.json without the key as Llama 2's 10000 (see
    # llama.params).
    rope_theta: float = 500000
    # Keyword-only (after max_seq_len): positional arguments keep the order of Meta's llama3 ModelArgs.
    use_scaled_rope: bool = field(default=False, kw_only=True)  # Llama 3.1+: stretch low RoPE frequencies
    # The scaling's constants: Meta's code always uses these; `from_params` takes 32 for Llama 3.2 1B/3B.
    rope_scaling_factor: float = field(default=8.0, kw_only=True)
    rope_low_freq_factor: float = field(default=1.0, kw_only=True)
    rope_high_freq_factor: float = field(default=4.0, kw_only=True)
    rope_original_context: int = field(default=8192, kw_only=True)

    max_batch_size: int = 32
    max_seq_len: int = 2048

    @classmethod
    def from_params(cls, params: Dict[str, Any], source: str = "params.json", **overrides: Any) -> "ModelArgs":
        """Build from a params.json dict (plus overrides such as max_seq_len); unknown keys warn, never fail.

        Keys the file leaves out take its family's values, not the dataclass defaults: no `rope_theta` is
        Llama 2's base 10000; Llama 3.2 1B/3B scale RoPE by 32 (llama.params). Raises TypeError
        naming the key, the value and `source` (the file it came from) for a value that does not have its
        field's type, such as `"n_layers": "6"`."""
        check_param_types(params, cls, source)
        unknown = describe_unknown_keys(params, cls)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {unknown}", stacklevel=2)
        known = {f.name for f in fields(cls)}
        values = implied_params(params)
        values.update({k: v for k, v in params.items() if k in known})
        values.update(overrides)
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        return swiglu_hidden_dim(4 * self.dim, self.multiple_of, self.ffn_dim_multiplier)


def swiglu_hidden_dim(hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's SwiGLU sizing of a starting size (4 * dim): 2/3 of it, times ffn_dim_multiplier, rounded up to a
    multiple of multiple_of."""
    hidden = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 even for bf16/fp16 activations (the mean of squares overflows fp16),
        # cast back, then scale: the order Meta uses, so bf16 results match bit for bit.
        # (In-place ops on the fresh (bsz, seqlen, 1) tensor: the same values, fewer allocations.)
        xf = x.float()
        normed = xf * xf.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return normed.type_as(x) * self.weight


# ---- Rotary position embeddings -------------------------------------------------------------------------


def apply_scaling(
    freqs: torch.Tensor,
    scale_factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: float = 8192.0,
) -> torch.Tensor:
    """Llama 3.1 RoPE frequency scaling (defaults: Meta's constants): long wavelengths slowed
    `scale_factor` times, short ones kept, a smooth blend between."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """(head_dim // 2,) float32: pair i of a head turns by theta^(-2i/head_dim) per position."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))


def precompute_rope(
    head_dim: int, end: int, theta: float, use_scaled: bool = False, **scaling: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (end, head_dim // 2), in float32.

    Pair i of a head rotates by angle pos * theta^(-2i/head_dim). Meta stores these as complex numbers
    (torch.polar); real tables hold the same float32 values and work on every backend and in torch.compile.
    `scaling` overrides apply_scaling's constants (used only with `use_scaled`).
    """
    freqs = rope_frequencies(head_dim, theta)
    if use_scaled:
        freqs = apply_scaling(freqs, **scaling)
    t = torch.arange(end, dtype=torch.float32)
    angles = torch.outer(t, freqs)  # (end, head_dim // 2)
    # torch.polar, as Meta uses, rounds a few entries differently from torch.cos/sin (1 ulp): take its
    # values so that our tables equal Meta's bit for bit.
    cis = torch.polar(torch.ones_like(angles), angles)
    return cis.real.contiguous(), cis.imag.contiguous()


def interleave_rope(cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """precompute_rope's tables (..., head_dim // 2) laid out as apply_rotary_emb reads them, (..., head_dim):
    each cos twice, (cos_i, cos_i), and each sin signed, (-sin_i, sin_i)."""
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of each head: Meta's interleaved layout, computed in float32.

    x: (bsz, seqlen, heads, head_dim); cos, sin: interleave_rope's tables for the tokens' positions,
    (seqlen, head_dim) (or (bsz, seqlen, head_dim), one table per row: llama.fast uses that).
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # each pair (a, b) -> (b, a)
    # (a + ib)(cos + i sin) = (a cos - b sin) + i (b cos + a sin): x * (cos, cos) + swapped * (-sin, sin),
    # the same float32 products and sums, in the same rounding, as the complex product written out.
    out = xf * cos.unsqueeze(-2) + swapped * sin.unsqueeze(-2)  # tables broadcast over heads
    return out.type_as(x)


# ---- Attention ------------------------------------------------------------------------------------------


def causal_mask(seqlen: int, start_pos: int, device: torch.device) -> Optional[torch.Tensor]:
    """(seqlen, start_pos + seqlen) bool, True where new token i (at position start_pos + i) may attend: every
    cached position and the new tokens j <= i. None for a single new token: it sees everything, so decode
    steps need no mask."""
    if seqlen == 1:
        return None
    rows = torch.arange(seqlen, device=device)[:, None] + start_pos
    cols = torch.arange(start_pos + seqlen, device=device)[None, :]
    return cols <= rows


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads and a KV cache, sharded by heads.

    The cache is laid out (max_batch_size, n_kv_heads, max_seq_len, head_dim), the layout that
    scaled_dot_product_attention reads; it holds as many elements as Meta's. Query heads share key/value
    heads in groups (GQA) without the repeated K/V ever being copied.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        mp_size = fs_init.get_model_parallel_world_size()
        n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        if mp_size > n_kv_heads:
            # Fewer KV heads than ranks: each rank holds a copy of the one KV head its query heads read, as
            # if the model had mp_size KV heads (llama/checkpoints/reshard.py makes the copies when loading).
            if mp_size % n_kv_heads:
                raise ValueError(f"model-parallel size {mp_size} is not a multiple of n_kv_heads={n_kv_heads}")
            n_kv_heads = mp_size
        self.n_local_heads = args.n_heads // mp_size
        self.n_local_kv_heads = n_kv_heads // mp_size
        self.head_dim = args.head_dim

        # Column-parallel: each rank computes its own heads. Row-parallel: each rank multiplies its heads'
        # slice of wo and the partial sums are all-reduced. init_method is identity: weights come from disk.
        self.wq = ColumnParallelLinear(
            args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False, init_method=lambda x: x
        )
        self.wk = ColumnParallelLinear(
            args.dim, n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=lambda x: x
        )
        self.wv = ColumnParallelLinear(
            args.dim, n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=lambda x: x
        )
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=lambda x: x
        )

        cache_shape = (args.max_batch_size, self.n_local_kv_heads, args.max_seq_len, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(cache_shape), persistent=False)

    def forward(
        self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """x: (bsz, seqlen, dim), the tokens at positions start_pos .. start_pos + seqlen - 1; cos, sin: the
        RoPE tables at those positions; mask: (seqlen, start_pos + seqlen), True where a token may attend,
        or None (one new token sees everything)."""
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq = apply_rotary_emb(xq, cos, sin)
        xk = apply_rotary_emb(xk, cos, sin)

        # Heads before positions, as SDPA and the cache want them: (bsz, heads, seqlen, head_dim).
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        end_pos = start_pos + seqlen
        self.cache_k[:bsz, :, start_pos:end_pos] = xk
        self.cache_v[:bsz, :, start_pos:end_pos] = xv
        keys = self.cache_k[:bsz, :, :end_pos]  # (bsz, n_kv_heads, end_pos, head_dim)
        values = self.cache_v[:bsz, :, :end_pos]

        # enable_gqa lets each group of n_heads // n_kv_heads query heads read one K/V head in place.
        out = F.scaled_dot_product_attention(
            xq, keys, values, attn_mask=mask, enable_gqa=self.n_local_heads != self.n_local_kv_heads
        )  # (bsz, n_heads, seqlen, head_dim)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (bsz, seqlen, n_heads * head_dim)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), the hidden dimension split across ranks."""

    def __init__(
        self, dim: int, hidden_dim: int, multiple_of: Optional[int] = None, ffn_dim_multiplier: Optional[float] = None
    ):
        """hidden_dim: the hidden size. Given `multiple_of` (Meta's call, FeedForward(dim, 4 * dim, multiple_of,
        ffn_dim_multiplier)), hidden_dim is Meta's starting size, turned into the hidden size as Meta does."""
        super().__init__()
        if multiple_of is not None:
            hidden_dim = swiglu_hidden_dim(hidden_dim, multiple_of, ffn_dim_multiplier)
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=lambda x: x)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The whole decoder. `forward(tokens, start_pos)` appends tokens to the KV cache at start_pos and
    returns float32 logits for every position, (bsz, seqlen, vocab_size)."""

    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size <= 0:
            raise ValueError(f"ModelArgs.vocab_size must be set (got {params.vocab_size})")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        self.tok_embeddings = VocabParallelEmbedding(params.vocab_size, params.dim, init_method=lambda x: x)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=lambda x: x)

        # Tables for twice the context, as Meta's; always float32, whatever the weights' dtype.
        cos, sin = precompute_rope(
            params.head_dim,
            params.max_seq_len * 2,
            params.rope_theta,
            params.use_scaled_rope,
            scale_factor=params.rope_scaling_factor,
            low_freq_factor=params.rope_low_freq_factor,
            high_freq_factor=params.rope_high_freq_factor,
            old_context_len=params.rope_original_context,
        )
        # Laid out for apply_rotary_emb: (max_seq_len * 2, head_dim) each.
        cos, sin = interleave_rope(cos, sin)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Append `tokens` (bsz, seqlen) to the KV cache at positions start_pos .. start_pos + seqlen - 1 of
        every row and return float32 logits for every position, (bsz, seqlen, vocab_size)."""
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        cos = self.rope_cos[start_pos : start_pos + seqlen]  # (seqlen, head_dim)
        sin = self.rope_sin[start_pos : start_pos + seqlen]

        mask = causal_mask(seqlen, start_pos, tokens.device)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask)
        h = self.norm(h)
        return self.output(h).float()  # (bsz, seqlen, vocab_size)


# ---- Meta's helpers, for scripts that import them from llama.model --------------------------------------
# The model above keeps RoPE as real cos/sin tables and lets SDPA share K/V heads (enable_gqa); Meta's model
# uses these instead. They give Meta's values, for code written against Meta's llama.model.


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, use_scaled: bool = False) -> torch.Tensor:
    """Meta's RoPE table: (end, dim // 2) complex64, e^(i * pos * theta^(-2k/dim)); `use_scaled` applies Llama
    3.1's frequency scaling (as in Meta's llama-models). Equal to precompute_rope's cos + i sin."""
    freqs = rope_frequencies(dim, theta)
    if use_scaled:
        freqs = apply_scaling(freqs)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)  # (end, dim // 2)
    return torch.polar(torch.ones_like(angles), angles)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View freqs_cis (seqlen, d) as (1, seqlen, 1, ..., d) to multiply x (bsz, seqlen, ..., d)."""
    if x.ndim < 2 or freqs_cis.shape != (x.shape[1], x.shape[-1]):
        raise ValueError(f"freqs_cis of shape {tuple(freqs_cis.shape)} does not fit x of shape {tuple(x.shape)}")
    return freqs_cis.view(*[d if i in (1, x.ndim - 1) else 1 for i, d in enumerate(x.shape)])


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(bsz, seqlen, n_kv_heads, head_dim) -> (bsz, seqlen, n_kv_heads * n_rep, head_dim), each KV head
    repeated n_rep times in a row (the query heads that share it)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=2)
