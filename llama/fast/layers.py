"""The fast path's layers, swapped in from outside once the weights are loaded (`use_fast_layers`): the same
weights and the same results (to float32 rounding) as the reference modules of llama.model, cheaper to run.

- On the CPU each weight is packed once into oneDNN's blocked layout. `F.linear` reorders a bf16 weight into
  that layout at every call (reading and writing it once more than needed) and runs a float32 product with
  one row on one thread; a decode step, which reads every weight once to multiply a few rows, then runs at
  a fraction of memory bandwidth. Packed, bf16 results are bit-identical to `F.linear`'s and float32 ones
  differ by rounding only (another summation order, about 1e-6 relative).
- The query, key and value projections become one matrix product (FastAttention.wqkv), and so do the SwiGLU's
  w1 and w3 (FastFeedForward.w13): fewer, larger products, which split better over cores.
- FastAttention also takes one new token per row at each row's own cache position (the batched decode loop of
  llama.fast.loop), and runs a CPU decode step's attention in float32 (faster there than bf16/fp16, and
  closer to exact). A compiled CUDA decode step of one row may run a Triton kernel instead of SDPA, picked at
  load (llama.fast.decode_attention), which may also take over the step's rotation and cache writes.
- With one model-parallel rank the layers skip fairscale's no-op autograd functions, whose bookkeeping costs
  time at every call and which torch.compile cannot trace. With several ranks they all-reduce and gather
  exactly as fairscale does.

Whatever is fused or packed, `model.state_dict()` still holds Meta's keys, shapes and values, in Meta's order.
"""

from typing import Callable, List, Optional, Sequence, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from torch import nn

from llama.fast.collectives import traced_across_ranks
from llama.fast.decode_attention import MAX_ROWS as DECODE_ATTENTION_MAX_ROWS
from llama.model import Attention, FeedForward, Transformer, TransformerBlock, apply_rotary_emb

# Where new tokens go in the KV cache: one int for every row (the reference's start_pos), or a (bsz,) tensor
# of per-row positions, one new token per row.
Positions = Union[int, torch.Tensor]

# The number of rows oneDNN tunes a packed weight for (any number works): from 4 rows up, the float32 kernels
# it picks stream weights faster than those for 1 row, even for products with 1 row.
PACK_FOR_ROWS = 16
# Products of up to this many rows take a layer's decode_form, where one was picked.
DECODE_FORM_MAX_ROWS = 16


def decode_form(layer: nn.Module, rows: int) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The form picked at load (llama.fast.cpu_forms) that a product of `rows` rows takes, or None for the
    layer's own path. Inside torch.compile, the form's torch operations (`traced`), where it has them: the
    CPU step compiled whole (llama.fast.cpu_step) inlines them; its own call is an opaque compiled kernel."""
    form = layer.decode_form
    if form is None or rows > DECODE_FORM_MAX_ROWS:
        return None
    if torch.compiler.is_compiling():
        return getattr(form, "traced", None)
    return form


def computed_once(x: torch.Tensor) -> torch.Tensor:
    """x, as a buffer of its own inside a step compiled whole (llama.fast.cpu_step): the identity on values.

    A picked form's `traced` product is a loop over weight rows, each summed against x. Left to itself,
    inductor inlines whatever makes x (the RMSNorm before wqkv, w13 and the output projection, SiLU(gate) * up
    before w2, the conversion to float32) into that loop, so it is recomputed for every weight row: for
    bf16 and int8 weights, whose rows are read fast, that work rather than the memory bounded the product
    (bench/results, docs/cpu-step.md: the step 1.08-1.28x faster with x computed once). `as_strided` to x's
    own size and strides changes nothing, but inductor's lowering of it stores its input in a buffer first,
    which the loop then reads: one barrier per product, where inductor's global realize thresholds would
    also split the products' own sums (measured: the blocked int8 form 7x slower)."""
    return torch.as_strided(x, x.shape, x.stride())


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """True where weights can be packed for oneDNN: the CPU, float32, or bf16 on processors with native bf16."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def across_ranks(y: torch.Tensor, reduce: bool, gather: bool) -> torch.Tensor:
    """A rank's product made whole as fairscale makes it: all-reduced (row-parallel layers) or gathered
    (column-parallel layers with gather_output). Under torch.compile, with torch's functional collectives
    (llama.fast.collectives: fairscale's do not compile)."""
    if (reduce or gather) and torch.compiler.is_compiling():
        return traced_across_ranks(y, reduce, gather)
    if reduce:
        y = reduce_from_model_parallel_region(y)
    if gather:
        y = gather_from_model_parallel_region(y)
    return y


def save_as_meta(destination: dict, prefix: str, weight: torch.Tensor, parts: Sequence[Tuple[str, int]]) -> None:
    """Write a layer's (out_features, in_features) weight into a state dict under Meta's names: as its own
    "weight", or for a fused product each part under its own name beside the layer."""
    if not parts:
        destination[prefix + "weight"] = weight
        return
    owner = prefix[: prefix.rstrip(".").rfind(".") + 1]  # "layers.0.attention.wqkv." -> "layers.0.attention."
    for (name, _), part in zip(parts, weight.split([rows for _, rows in parts])):
        destination[f"{owner}{name}.weight"] = part


def normed_product(linear: nn.Module, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(norm(x)), the product of an RMSNorm's output. A layer with an `after_norm` form takes x and the
    norm together (llama.fast.quantize.Int8Linear: on a GPU, one kernel that norms x as it reads it)."""
    after_norm = getattr(linear, "after_norm", None)
    return linear(norm(x)) if after_norm is None else after_norm(x, norm)


def added_product(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x), a product added to the block's residual stream. A layer with a `plus_residual`
    form takes the residual in (llama.fast.quantize.Int8Linear: on a GPU, added in the product's kernel)."""
    plus_residual = getattr(linear, "plus_residual", None)
    return residual + linear(x) if plus_residual is None else plus_residual(x, residual)


# From this many rows, a CPU product in 2-byte floats where half_products_in_float32 holds is made in float32:
# below it torch's own half-precision product was the faster (F.linear, w13, emulated AVX2: 1 row 0.09
# against 0.18 ms, 4 rows 0.49 against 0.97; 8 rows 1.84 against 0.57, 32 rows 6.9 against 1.05).
HALF_IN_FLOAT32_MIN_ROWS = 8


def half_products_in_float32(dtype: torch.dtype) -> bool:
    """Whether a many-row (prefill) CPU product in 2-byte floats is better made in float32 on converted
    copies: float16 always (no fp16 matrix product of torch's was fast on the project's CPUs), bf16 where
    torch's CPU vectors are narrower than AVX-512's (oneDNN's bf16 product needs AVX-512; torch otherwise
    runs generic loops). Measured on the bench's small shape, 32 rows, 2 threads (docs/cpu-step.md, eighth
    pass): w13 (3584 x 512) bf16 under emulated AVX2 as blocks 35.8 ms, as F.linear 4.9 ms, in float32 with
    the conversion 1.35 ms; float16 on AVX-512 (Zen 5) 32.3 / 3.8 / 1.0 ms; bf16 with AVX-512 the bf16
    product was the faster (0.31 against 0.83 ms). The sums are float32 either way; the result is rounded to
    `dtype` once. Used by FastLinear and llama.fast.blocked's prefill."""
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and "AVX512" not in torch.backends.cpu.get_cpu_capability()


class FastLinear(nn.Module):
    """y = x W^T for this rank's slice W (out_features, in_features), then fairscale's all-reduce (row-parallel
    layers) or gather (column-parallel layers with gather_output) when there are several ranks.

    With `pack`, W is held packed for oneDNN (an opaque tensor: no parameter or buffer, so .to() leaves it
    alone). A fused product is several of Meta's layers side by side: `parts` names them with their rows, in
    order, and state_dict() writes each under its own name beside this module (Meta's keys and values).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        reduce: bool = False,
        gather: bool = False,
        pack: bool = False,
        parts: Sequence[Tuple[str, int]] = (),
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.parts = list(parts)
        several_ranks = fs_init.get_model_parallel_world_size() > 1
        self.reduce = reduce and several_ranks
        self.gather = gather and several_ranks
        self.packed: Optional[torch.Tensor] = None
        # Another form of the product for decode steps' few rows, picked at load (llama.fast.cpu_forms).
        self.decode_form: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        if pack:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_FOR_ROWS)
            self.weight = None
        else:
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        form = decode_form(self, x.numel() // self.in_features)
        if form is not None:
            y = form(x)  # picked at load for decode steps (llama.fast.cpu_forms)
        elif self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        elif (self.weight is not None and x.is_cpu and x.numel() >= HALF_IN_FLOAT32_MIN_ROWS * self.in_features
              and half_products_in_float32(x.dtype)):
            y = F.linear(x.float(), self.weight.float()).to(x.dtype)  # no fast bf16 product here
        elif self.weight is not None:
            y = F.linear(x, self.weight)  # (..., out_features)
        else:
            y = self.decode_form.full(x)  # the blocked form holds the only copy of W (llama.fast.blocked)
        return across_ranks(y, self.reduce, self.gather)

    def dense_weight(self) -> torch.Tensor:
        """W as a plain (out_features, in_features) tensor (unpacked from oneDNN's layout, exactly; or rebuilt
        from the blocked form's copy, llama.fast.blocked)."""
        if self.packed is not None:
            return self.packed.to_dense()
        return self.weight.detach() if self.weight is not None else self.decode_form.dense_weight()

    def held(self) -> torch.Tensor:
        """The tensor that holds W, whichever form it is in (the parameter, oneDNN's packed copy, or a blocked
        form's blocks): for its dtype and device."""
        if self.weight is not None:
            return self.weight
        return self.packed if self.packed is not None else self.decode_form.blocks

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        weight = self.weight if keep_vars and self.weight is not None else self.dense_weight()
        save_as_meta(destination, prefix, weight, self.parts)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.packed is not None}"


class FastEmbedding(nn.Module):
    """A VocabParallelEmbedding: with one rank a plain lookup; with several, fairscale's (this rank's rows
    of the table, vocab_start on; zeros for tokens outside them; summed over the ranks) written without
    in-place masking, so that torch.compile traces it."""

    def __init__(self, weight: torch.Tensor, vocab_start: int = 0, reduce: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.vocab_start = vocab_start
        self.reduce = reduce

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.reduce:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return across_ranks(h, reduce=True, gather=False)  # (..., dim): each token's row from its rank


def _fast(linear: nn.Module, pack: bool) -> FastLinear:
    if linear.bias is not None:
        raise ValueError("the fast layers take bias-free linear layers only (Llama has no biases)")
    if isinstance(linear, RowParallelLinear):
        if not linear.input_is_parallel:
            raise ValueError("the fast layers need row-parallel layers with input_is_parallel=True")
        return FastLinear(linear.weight, reduce=True, pack=pack)
    return FastLinear(linear.weight, gather=linear.gather_output, pack=pack)


def _fused(named: List[Tuple[str, nn.Module]], pack: bool) -> FastLinear:
    """One column-parallel FastLinear whose output is the named layers' outputs side by side."""
    layers = [m for _, m in named]
    if any(not isinstance(m, ColumnParallelLinear) or m.gather_output or m.bias is not None for m in layers):
        raise ValueError("only column-parallel, bias-free layers without gather_output can be fused")
    weight = torch.cat([m.weight.detach() for m in layers], dim=0)  # (sum of out_features, in_features)
    return FastLinear(weight, pack=pack, parts=[(name, m.weight.shape[0]) for name, m in named])


class FastAttention(nn.Module):
    """llama.model.Attention with one product for queries, keys and values, and per-row positions.

    forward takes what the reference's takes, or a (bsz,) tensor `start_pos`, each row's first new token's
    own position: then `mask` (bsz, 1, seqlen, kv_len) says which of the first kv_len cache positions each
    new token may read. The KV cache is the reference module's own (same buffers, same layout).
    """

    def __init__(self, attention: Attention, pack: bool):
        super().__init__()
        self.n_local_heads = attention.n_local_heads
        self.n_local_kv_heads = attention.n_local_kv_heads
        self.head_dim = attention.head_dim
        self.wqkv = _fused([("wq", attention.wq), ("wk", attention.wk), ("wv", attention.wv)], pack)
        self.wo = _fast(attention.wo, pack)
        self.register_buffer("cache_k", attention.cache_k, persistent=False)
        self.register_buffer("cache_v", attention.cache_v, persistent=False)
        # On CUDA, a compiled decode step's attention kernel, given at load where it timed faster than SDPA
        # (llama.fast.decode_attention); it takes each row's position instead of the mask.
        self.decode_attention: Optional[Callable[..., torch.Tensor]] = None

    def forward(
        self, x: torch.Tensor, start_pos: Positions, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
        norm: Optional[nn.Module] = None, residual: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """norm: an RMSNorm x has not been through yet, handed on to the product that takes x; residual: added
        to the output, handed on to wo (fast_block)."""
        bsz, seqlen, _ = x.shape
        n_qk = self.n_local_heads + self.n_local_kv_heads
        xqkv = self.wqkv(x) if norm is None else normed_product(self.wqkv, norm, x)  # (bsz, seqlen, qkv dims)
        xqkv = xqkv.view(bsz, seqlen, n_qk + self.n_local_kv_heads, self.head_dim)
        # A compiled CUDA decode step of one row may take the decode attention kernel: it reads the cache up to
        # each row's position (the mask unused).
        kernel = self.decode_attention
        if not (seqlen == 1 and not isinstance(start_pos, int) and bsz <= DECODE_ATTENTION_MAX_ROWS):
            kernel = None
        if kernel is not None and getattr(kernel, "rotary", False):
            # The kernel also rotates the new query and key and writes the new key and value to the caches.
            xnew = xqkv[:, 0]  # (bsz, n_heads + 2 n_kv_heads, head_dim), not rotated
            out = kernel.with_rotary(xnew[:, : self.n_local_heads], xnew[:, self.n_local_heads : n_qk],
                                     xnew[:, n_qk:], cos[:, 0], sin[:, 0], self.cache_k, self.cache_v, start_pos,
                                     mask.shape[-1])[:, :, None]  # (bsz, n_heads, 1, head_dim)
        else:
            out = self._attend(xqkv, start_pos, cos, sin, mask, kernel)
        out = out.type_as(x).transpose(1, 2).reshape(bsz, seqlen, -1)  # (bsz, seqlen, n_heads * head_dim)
        return self.wo(out) if residual is None else added_product(self.wo, out, residual)

    def _attend(self, xqkv: torch.Tensor, start_pos: Positions, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor], kernel: Optional[Callable[..., torch.Tensor]]) -> torch.Tensor:
        """Rotate, write the new keys and values to the cache, attend (the kernel where given, else SDPA):
        xqkv (bsz, seqlen, n_heads + 2 n_kv_heads, head_dim) -> (bsz, n_heads, seqlen, head_dim)."""
        bsz, seqlen = xqkv.shape[:2]
        n_qk = self.n_local_heads + self.n_local_kv_heads
        xqk = apply_rotary_emb(xqkv[:, :, :n_qk], cos, sin)  # queries and keys rotated in one go
        xq, xk, xv = xqk[:, :, : self.n_local_heads], xqk[:, :, self.n_local_heads :], xqkv[:, :, n_qk:]

        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)  # (bsz, heads, seqlen, head_dim)
        if isinstance(start_pos, int):
            end_pos = start_pos + seqlen
            self.cache_k[:bsz, :, start_pos:end_pos] = xk
            self.cache_v[:bsz, :, start_pos:end_pos] = xv
        elif seqlen == 1:  # row i's one new token goes to position start_pos[i]
            rows = torch.arange(bsz, device=xqkv.device)
            self.cache_k[rows, :, start_pos] = xk[:, :, 0]  # (bsz, n_kv_heads, head_dim)
            self.cache_v[rows, :, start_pos] = xv[:, :, 0]
            end_pos = mask.shape[-1]
        else:  # row i's tokens go to positions start_pos[i] .. + seqlen - 1
            rows = torch.arange(bsz, device=xqkv.device)[:, None]  # (bsz, 1)
            at = start_pos[:, None] + torch.arange(seqlen, device=xqkv.device)  # (bsz, seqlen)
            self.cache_k[rows, :, at] = xk.transpose(1, 2)  # (bsz, seqlen, n_kv_heads, head_dim)
            self.cache_v[rows, :, at] = xv.transpose(1, 2)
            end_pos = mask.shape[-1]
        if kernel is not None:
            return kernel(xq[:, :, 0], self.cache_k, self.cache_v, start_pos, end_pos)[:, :, None]
        keys = self.cache_k[:bsz, :, :end_pos]  # (bsz, n_kv_heads, end_pos, head_dim)
        values = self.cache_v[:bsz, :, :end_pos]
        if seqlen == 1 and xqkv.device.type == "cpu" and xqkv.dtype != torch.float32:
            # A decode step on the CPU: the float32 kernel, on upcast copies, is several times faster for
            # one query than the bf16/fp16 one (and rounds less).
            xq, keys, values = xq.float(), keys.float(), values.float()
        return F.scaled_dot_product_attention(
            xq, keys, values, attn_mask=mask, enable_gqa=self.n_local_heads != self.n_local_kv_heads
        )  # (bsz, n_heads, seqlen, head_dim)


class FastFeedForward(nn.Module):
    """llama.model.FeedForward with one product for w1 and w3: w2(silu(w1 x) * w3 x). A w2 with an
    `after_swiglu` form (llama.fast.quantize.Int8Linear) takes w13's output and forms silu(gate) * up itself."""

    def __init__(self, feed_forward: FeedForward, pack: bool):
        super().__init__()
        self.w13 = _fused([("w1", feed_forward.w1), ("w3", feed_forward.w3)], pack)
        self.w2 = _fast(feed_forward.w2, pack)

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """norm: an RMSNorm x has not been through yet, handed on to w13; residual: added to the output, handed
        on to w2 (fast_block)."""
        gate_up = self.w13(x) if norm is None else normed_product(self.w13, norm, x)  # (..., 2 * hidden)
        after_swiglu = getattr(self.w2, "after_swiglu", None)
        if after_swiglu is not None:
            return after_swiglu(gate_up, residual)
        gate, up = gate_up.chunk(2, dim=-1)
        swiglu = F.silu(gate) * up
        return self.w2(swiglu) if residual is None else added_product(self.w2, swiglu, residual)


def fast_block(
    layer: TransformerBlock, x: torch.Tensor, start_pos: Positions, cos: torch.Tensor, sin: torch.Tensor,
    mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """layer(x, start_pos, cos, sin, mask), llama.model.TransformerBlock.forward, on the fast layers, with each
    RMSNorm handed on to the product after it (normed_product) and each residual add to the product before it
    (added_product), which may take them into its own kernel."""
    h = layer.attention(x, start_pos, cos, sin, mask, norm=layer.attention_norm, residual=x)  # x + attention
    return layer.feed_forward(h, norm=layer.ffn_norm, residual=h)  # h + feed-forward


def is_fast(model: Transformer) -> bool:
    """True once use_fast_layers has swapped `model`'s layers."""
    return all(isinstance(layer.attention, FastAttention) for layer in model.layers)


@torch.no_grad()
def use_fast_layers(model: Transformer, pack: bool = True) -> None:
    """Swap, in place, `model`'s reference layers for fast ones holding the same weights; the old layers and
    their dense weights are released. Call it once the weights are loaded and the model is on its device in
    its final dtype (a second call does nothing). pack: pack weights for oneDNN where can_pack allows (not
    for torch.compile, which cannot take pre-packed weights).

    `model.state_dict()` keeps Meta's keys, shapes and values, in the reference model's order.
    """
    if is_fast(model):
        return
    meta_keys = list(model.state_dict().keys())
    weight = model.output.weight
    pack = pack and can_pack(weight.device, weight.dtype)
    for layer in model.layers:
        layer.attention = FastAttention(layer.attention, pack)
        layer.feed_forward = FastFeedForward(layer.feed_forward, pack)
    model.output = _fast(model.output, pack)
    if isinstance(model.tok_embeddings, VocabParallelEmbedding):
        embedding = model.tok_embeddings
        model.tok_embeddings = FastEmbedding(embedding.weight, embedding.vocab_start_index,
                                             reduce=fs_init.get_model_parallel_world_size() > 1)

    def in_meta_order(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        for key in meta_keys:  # fused layers write their parts together: put every key back in Meta's place
            state.move_to_end(prefix + key)

    model.register_state_dict_post_hook(in_meta_order)
