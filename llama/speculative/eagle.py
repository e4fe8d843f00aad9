"""An EAGLE-style draft head: a one-layer network that predicts the model's next top-layer feature.

The model's feature at position j, f_j, is its last hidden state before the final norm and output layer: the
model's logits there are output(norm(f_j)). The head takes f_j and the embedding of the token that follows it,
t_{j+1}, and predicts f_{j+1}:

    x_j = fc(concat(f_j, embed(t_{j+1})))            (2 * dim -> dim)
    f^_{j+1} = TransformerBlock(x_j)                 llama.model's own block, over the head's own KV cache
    draft token = argmax output(norm(f^_{j+1}))      the model's own norm and output layer, not copies

(EAGLE, Li et al. 2024.) Drafting a chain of k tokens feeds each predicted feature back with the token it
gave. Features of accepted positions come from the model's verify pass (the drafter's `observe_features`,
called by llama.speculative.generate), so every chain starts from real features; the predicted ones past
them are rewound as the model's own cache is, by moving the position back (llama.speculative.generate
says why nothing stale is ever read).

Files (models/demo-eagle/, made by scripts/train_eagle.py): `consolidated.00.pth` (fc.weight and
layers.0.* under Meta's names), `params.json` (Meta's keys: the block's shape; `dim` and `vocab_size` are
the model's, which `load_head` checks), `checklist.chk` (md5 of both).
"""

import hashlib
import json
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from llama.fast.layers import FastAttention, FastFeedForward, FastLinear, can_pack
from llama.model import ModelArgs, TransformerBlock, apply_rotary_emb, causal_mask, interleave_rope, precompute_rope
from llama.speculative.draft_int8 import Int8DraftProduct
from llama.speculative.drafters import Drafter

HEAD_FILES = ("consolidated.00.pth", "params.json")
DRAFT_VOCAB_FILE = "draft_vocab.json"  # optional: token ids by training-split frequency, most frequent first


class EagleHead(nn.Module):
    """fc (2 * dim -> dim), then n_layers of llama.model's TransformerBlock (EAGLE uses one).

    `forward(features, embeddings)`: whole sequences from position 0, causal, no cache (training);
    `forward(features, embeddings, start_pos)`: append to the KV cache at start_pos (drafting)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.params = args
        self.fc = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        cos, sin = precompute_rope(args.head_dim, args.max_seq_len * 2, args.rope_theta, args.use_scaled_rope,
                                   scale_factor=args.rope_scaling_factor, low_freq_factor=args.rope_low_freq_factor,
                                   high_freq_factor=args.rope_high_freq_factor,
                                   old_context_len=args.rope_original_context)
        cos, sin = interleave_rope(cos, sin)  # (max_seq_len * 2, head_dim) each
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, features: torch.Tensor, embeddings: torch.Tensor, start_pos: Optional[int] = None
                ) -> torch.Tensor:
        """features f_j and embeddings of t_{j+1}, (bsz, seqlen, dim) each, for j = start .. start + seqlen - 1
        -> predicted features f^_{j+1}, (bsz, seqlen, dim)."""
        h = self.fc(torch.cat([features, embeddings], dim=-1))  # (bsz, seqlen, dim)
        seqlen = h.shape[1]
        if start_pos is None:
            cos, sin = self.rope_cos[:seqlen], self.rope_sin[:seqlen]
            for layer in self.layers:
                h = _block_without_cache(layer, h, cos, sin)
            return h
        cos = self.rope_cos[start_pos : start_pos + seqlen]
        sin = self.rope_sin[start_pos : start_pos + seqlen]
        mask = causal_mask(seqlen, start_pos, h.device)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask)
        return h


def rotated_qkv(layer: TransformerBlock, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The block's queries, keys and values of h (bsz, seqlen, dim), keys and queries rotated by RoPE, each
    (bsz, heads, seqlen, head_dim): the first half of the block's attention over whole sequences, without the
    KV cache (for training and for the tests' whole-sequence pass)."""
    bsz, seqlen, _ = h.shape
    attn = layer.attention
    x = layer.attention_norm(h)
    q = attn.wq(x).view(bsz, seqlen, attn.n_local_heads, attn.head_dim)
    k = attn.wk(x).view(bsz, seqlen, attn.n_local_kv_heads, attn.head_dim)
    v = attn.wv(x).view(bsz, seqlen, attn.n_local_kv_heads, attn.head_dim)
    q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _block_without_cache(layer: TransformerBlock, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> torch.Tensor:
    """layer(h) over whole sequences with causal attention, with gradients and without the KV cache (the
    reference block's modules and weights; tests check it equals the cached path)."""
    bsz, seqlen, _ = h.shape
    attn = layer.attention
    q, k, v = rotated_qkv(layer, h, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                         enable_gqa=attn.n_local_heads != attn.n_local_kv_heads)
    h = h + attn.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
    return h + layer.feed_forward(layer.ffn_norm(h))


def head_args(params: dict, max_seq_len: int, source: str = "params.json") -> ModelArgs:
    """The head's ModelArgs from its params.json (Meta's keys; n_layers counts the head's blocks)."""
    return ModelArgs.from_params(params, source, max_seq_len=max_seq_len, max_batch_size=1)


def check_head_files(head_dir: Path) -> None:
    """Raise FileNotFoundError for a missing file, ValueError for one whose md5 is not checklist.chk's."""
    missing = [name for name in HEAD_FILES if not (head_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"draft head {str(head_dir)!r}: missing {', '.join(missing)}")
    checklist = head_dir / "checklist.chk"
    if not checklist.is_file():
        return  # a head just written by hand or by the training script before its checklist: nothing to check
    expected = dict(reversed(line.split(None, 1)) for line in checklist.read_text().splitlines() if line.strip())
    for name in HEAD_FILES + ((DRAFT_VOCAB_FILE,) if (head_dir / DRAFT_VOCAB_FILE).is_file() else ()):
        actual = hashlib.md5((head_dir / name).read_bytes()).hexdigest()
        if name in expected and expected[name].strip() != actual:
            raise ValueError(f"draft head {str(head_dir)!r}: {name} is damaged (md5 {actual}, checklist.chk "
                             f"says {expected[name].strip()})")


def load_draft_vocab(head_dir: Union[str, Path], size: int) -> List[int]:
    """The `size` most frequent token ids of the head's training text (its draft_vocab.json, written by
    scripts/train_eagle.py). Raises FileNotFoundError, or ValueError for a size the file cannot give."""
    path = Path(head_dir) / DRAFT_VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"draft_vocab={size} needs {str(path)!r} (scripts/train_eagle.py --draft-vocab-only "
                                f"writes it)")
    check_head_files(Path(head_dir))
    order = json.loads(path.read_text())
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= len(order):
        raise ValueError(f"draft_vocab must be an integer from 1 to {len(order)} (the ids in {str(path)!r}), "
                         f"got {size!r}")
    return order[:size]


def load_head(head_dir: Union[str, Path], target: Any) -> EagleHead:
    """The head in `head_dir` for `target` (a built Llama), on the target's device and in its dtype.

    Raises FileNotFoundError (a missing file), ValueError (a damaged file; a head for another model: its
    dim or vocabulary is not the target's; weights that do not fit its params.json)."""
    head_dir = Path(head_dir)
    check_head_files(head_dir)
    params = json.loads((head_dir / "params.json").read_text())
    model_args = target.model.params
    theirs = {"dim": model_args.dim, "vocab_size": model_args.vocab_size}
    ours = {name: params.get(name) for name in theirs}
    if ours != theirs:
        raise ValueError(f"draft head {str(head_dir)!r} was trained for a model with {ours}, but this model has "
                         f"{theirs}: a head drafts only for the model it was trained on")
    head = EagleHead(head_args(params, model_args.max_seq_len, str(head_dir / "params.json")))
    state = torch.load(head_dir / "consolidated.00.pth", map_location="cpu", weights_only=True)
    want = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in state.items()}
    if want != got:
        problems = sorted(set(want.items()) ^ set(got.items()))[:6]
        raise ValueError(f"draft head {str(head_dir)!r}: its weights do not fit its params.json "
                         f"(differing name/shape pairs, first few: {problems})")
    head.load_state_dict(state)
    weight = target.model.tok_embeddings.weight
    return head.to(device=weight.device, dtype=weight.dtype).eval()


def use_fast_head(head: EagleHead, pack: bool = False) -> None:
    """Swap the head's fc and blocks for llama.fast's layers (query/key/value and w1/w3 fused into one
    product each). Not for training (the reference path). pack: pack the weights for oneDNN where
    can_pack allows; off by default: for one row of these small products (dim 256) the packed kernel took
    twice F.linear's time here (21 against 10 microseconds), while for the model's 4352-row output layer
    it is faster (85 against 120)."""
    pack = pack and can_pack(head.fc.weight.device, head.fc.weight.dtype)
    head.fc = FastLinear(head.fc.weight, pack=pack)
    for layer in head.layers:
        layer.attention = FastAttention(layer.attention, pack)
        layer.feed_forward = FastFeedForward(layer.feed_forward, pack)


class EagleDrafter(Drafter):
    """Drafts a chain of up to k tokens with an EagleHead, from the model's features of the accepted text.

    llama.speculative.generate hands it the model's features of every position it accepts
    (`observe_features`); `propose` then feeds the head the pairs (feature, next token) it has not seen yet,
    in one call, and predicts k features one after another, each giving its draft through the model's own
    norm and output layer. Its KV cache holds pairs with real features only between calls: the predicted
    pairs of a chain sit past that end and are overwritten by the next call's real pairs before being read.
    """

    wants_features = True

    def __init__(self, head: Union[EagleHead, str, Path], target: Any, fast: bool = True,
                 min_confidence: float = 0.0, draft_vocab: Union[None, int, Sequence[int]] = None,
                 draft_dtype: Optional[torch.dtype] = None):
        """head: an EagleHead for `target`, or the directory of one (load_head); target: the built Llama it
        drafts for (its embedding, final norm and output layer are used, not copied); fast: draft with
        llama.fast's layers (use_fast_head) and a lean step; min_confidence: end a chain early after a draft
        to which the head gives less than this probability (its later drafts would mostly be rejected:
        each costs a head step). The chain stays a function of the text, so verification stays exact.
        draft_vocab: draft only these token ids, or (an int N, with `head` a directory) the N most frequent
        of the head's training text (its draft_vocab.json): EAGLE-3's reduced draft vocabulary. The head's
        output product then reads those rows of the model's output layer only (a copy); the verify pass,
        over the whole vocabulary, keeps the output exact. draft_dtype: the dtype of the head's products
        and of that copy (e.g. torch.bfloat16: half the bytes to read per draft; exact all the same), or
        torch.int8: each product held as int8 rows with per-row scales (llama.speculative.draft_int8: a
        quarter of float32's bytes; the CPU only, where torch runs its int8 kernel)."""
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence!r}")
        self.min_confidence = min_confidence
        if not hasattr(target, "model") or not hasattr(target, "tokenizer"):
            raise TypeError(f"EagleDrafter drafts for a Llama (Llama.build(...)), got {type(target).__name__}")
        if isinstance(draft_vocab, int) and not isinstance(draft_vocab, bool):
            if isinstance(head, EagleHead):
                raise ValueError("draft_vocab=N reads the head directory's draft_vocab.json: give the directory")
            draft_vocab = load_draft_vocab(head, draft_vocab)
        self.head = head if isinstance(head, EagleHead) else load_head(head, target)
        if self.head.params.dim != target.model.params.dim:
            raise ValueError(f"the head has dim={self.head.params.dim}, the model {target.model.params.dim}")
        if fast:
            use_fast_head(self.head)
        self.head_dtype = self.head.fc.weight.dtype  # the dtype its products run in
        int8 = draft_dtype == torch.int8
        if int8:
            if not fast or self.head.params.n_layers != 1:
                raise ValueError(f"draft_dtype=torch.int8 drafts with a one-block head on the fast layers (got "
                                 f"fast={fast}, {self.head.params.n_layers} blocks)")
            # Each product as int8 rows (llama.speculative.draft_int8); the rest stays in the model's dtype.
            layer = self.head.layers[0]
            self.head.fc = Int8DraftProduct(self.head.fc.dense_weight())
            attn, ffn = layer.attention, layer.feed_forward
            attn.wqkv, attn.wo = Int8DraftProduct(attn.wqkv.dense_weight()), Int8DraftProduct(attn.wo.dense_weight())
            ffn.w13, ffn.w2 = Int8DraftProduct(ffn.w13.dense_weight()), Int8DraftProduct(ffn.w2.dense_weight())
        elif draft_dtype is not None and fast and self.head.params.n_layers == 1:
            # The head's products in draft_dtype (fewer bytes to read); its cache, RoPE and attention stay
            # in the model's dtype, and _lean_step casts at the edges.
            layer = self.head.layers[0]
            for module in (self.head.fc, layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
                           layer.feed_forward.w2, layer.attention_norm, layer.ffn_norm):
                module.to(draft_dtype)
            self.head_dtype = draft_dtype
        self.target = target
        model = target.model
        self.draft_ids: Optional[torch.Tensor] = None  # (n,) the draft vocabulary, None: the whole vocabulary
        self.draft_weight = None  # its rows of the output layer, (n, dim), in draft_dtype
        if draft_vocab is not None or draft_dtype is not None:
            weight = model.output.dense_weight() if hasattr(model.output, "dense_weight") else model.output.weight
            if draft_vocab is not None:
                ids = sorted(set(int(i) for i in draft_vocab))
                if not ids or ids[0] < 0 or ids[-1] >= model.vocab_size:
                    raise ValueError(f"draft_vocab must hold ids in [0, {model.vocab_size}), got "
                                     f"{len(ids)} ids from {ids[:1]} to {ids[-1:]}")
                self.draft_ids = torch.tensor(ids, dtype=torch.long, device=weight.device)
                weight = weight[self.draft_ids]
            self.draft_weight = weight.to(weight.dtype if int8 else (draft_dtype or weight.dtype)).contiguous()
        self.draft_product = Int8DraftProduct(self.draft_weight) if int8 else None  # the output rows in int8
        self.features = torch.zeros(model.params.max_seq_len, model.params.dim,
                                    device=model.rope_cos.device, dtype=model.tok_embeddings.weight.dtype)
        self.n_real = 0  # features known for positions 0 .. n_real - 1 (the model's, of accepted tokens)
        self.head_len = 0  # the head's cache holds pairs (f_j, t_{j+1}) with real f_j for j < head_len
        self.lean = fast and self.head.params.n_layers == 1
        if self.lean:
            # RoPE as complex factors, one per position and pair: (max_seq_len * 2, head_dim // 2).
            self.cis = torch.complex(self.head.rope_cos[:, 0::2], self.head.rope_sin[:, 1::2])

    def reset(self) -> None:
        self.n_real = self.head_len = 0

    def check(self, target: Any) -> None:
        if target.model is not self.target.model:
            raise ValueError("this EagleDrafter drafts for another Llama: it uses that model's own embedding, "
                             "norm and output layer; make one for this model, EagleDrafter(head_dir, llama)")

    def observe_features(self, start_pos: int, features: torch.Tensor) -> None:
        """The model's features (n, dim) at positions start_pos .. start_pos + n - 1, all of accepted tokens."""
        if start_pos > self.n_real:
            raise ValueError(f"features from position {start_pos} leave a gap after position {self.n_real - 1}")
        n = features.shape[0]
        self.features[start_pos : start_pos + n] = features
        self.n_real = start_pos + n
        self.head_len = min(self.head_len, start_pos)  # pairs from start_pos on are fed again

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], k: int) -> List[int]:
        length = len(tokens)
        if k <= 0 or length < 2:  # the first draft needs the feature of the token before the last one
            return []
        model = self.target.model
        device = self.features.device
        feature = self._catch_up(tokens)  # (1, dim)
        drafts: List[int] = []
        norm = model.norm
        for i in range(k):
            normed = F.rms_norm(feature, (feature.shape[-1],), norm.weight, norm.eps)  # the model's final norm
            logits = self.draft_logits(normed)  # (1, vocab or draft vocabulary)
            best = logits.max(dim=-1)
            drafts.append(self.token_id(int(best.indices)))
            if i == k - 1:
                break
            if self.min_confidence and float((best.values - logits.logsumexp(-1)).exp()) < self.min_confidence:
                break
            ids = torch.tensor([drafts[-1]], dtype=torch.long, device=device)
            if self.lean:
                feature = self._lean_step(feature, ids, length - 1 + i)
            else:
                feature = self.head(feature[None], model.tok_embeddings(ids[None]), length - 1 + i)[0]
        return drafts

    def draft_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """The model's output layer on normed features (n, dim) -> (n, vocab); with a draft vocabulary or
        dtype, its copy: (n, len(draft_vocab)) logits, in draft_dtype."""
        if self.draft_product is not None:
            return self.draft_product(normed)
        if self.draft_weight is None:
            return self.target.model.output(normed)
        return F.linear(normed.to(self.draft_weight.dtype), self.draft_weight)

    def token_id(self, index: int) -> int:
        """The token id of column `index` of draft_logits."""
        return index if self.draft_ids is None else int(self.draft_ids[index])

    def _catch_up(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed the head the real pairs (f_j, t_{j+1}) it has not seen, j up to len(tokens) - 2 -> its
        predicted feature of the last token, (1, dim)."""
        length = len(tokens)
        if self.n_real < length - 1:
            raise ValueError(
                f"EagleDrafter has the model's features of {self.n_real} positions, {length - 1} needed: it "
                f"drafts only inside speculative_generate, which hands it the features of every accepted token")
        start = min(self.head_len, length - 2)
        ids = torch.tensor(list(tokens[start + 1 : length]), dtype=torch.long, device=self.features.device)  # (n,)
        if self.lean:
            predicted = self._lean_step(self.features[start : length - 1], ids, start)  # (n, dim)
        else:
            embeddings = self.target.model.tok_embeddings(ids[None])
            predicted = self.head(self.features[None, start : length - 1], embeddings, start)[0]
        self.head_len = length - 1
        return predicted[-1:]

    def _lean_step(self, features: torch.Tensor, ids: torch.Tensor, pos: int,
                   positions: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The head on n pairs (features (n, dim), token ids (n,)) at positions pos .. pos + n - 1, through
        its cache -> predicted features (n, dim): what `self.head(features, embeddings, pos)` computes, in
        half the operations (a drafting step costs what its operations cost, not its arithmetic: at dim 256
        each takes microseconds whatever it does). A draft tree (llama.speculative.eagle_tree) gives the
        pairs' own RoPE `positions` (n,) and `mask` (n, pos + n); they still go to cache slots pos ...."""
        layer = self.head.layers[0]
        attn, ffn = layer.attention, layer.feed_forward
        n_q, n_kv, head_dim = attn.n_local_heads, attn.n_local_kv_heads, attn.head_dim
        n, dim = features.shape
        embeddings = F.embedding(ids, self.target.model.tok_embeddings.weight)  # (n, dim)
        x = self.head.fc(torch.cat([features, embeddings], dim=-1).to(self.head_dtype))  # (n, dim)
        a = F.rms_norm(x, (dim,), layer.attention_norm.weight, layer.attention_norm.eps)
        qkv = attn.wqkv(a).view(n, n_q + 2 * n_kv, head_dim).to(attn.cache_k.dtype)
        pairs = torch.view_as_complex(qkv[:, : n_q + n_kv].reshape(n, n_q + n_kv, head_dim // 2, 2))
        cis = self.cis[pos : pos + n] if positions is None else self.cis[positions]  # (n, head_dim // 2)
        rotated = torch.view_as_real(pairs * cis[:, None]).view(n, n_q + n_kv, head_dim)
        attn.cache_k[0, :, pos : pos + n] = rotated[:, n_q:].transpose(0, 1)
        attn.cache_v[0, :, pos : pos + n] = qkv[:, n_q + n_kv :].transpose(0, 1)
        queries = rotated[:, :n_q].transpose(0, 1)[None]  # (1, n_q, n, head_dim)
        out = F.scaled_dot_product_attention(queries, attn.cache_k[:1, :, : pos + n], attn.cache_v[:1, :, : pos + n],
                                             attn_mask=causal_mask(n, pos, features.device) if mask is None
                                             else mask, enable_gqa=n_q != n_kv)  # (1, n_q, n, head_dim)
        h = x + attn.wo(out[0].transpose(0, 1).reshape(n, n_q * head_dim).to(self.head_dtype))
        gate, up = ffn.w13(F.rms_norm(h, (dim,), layer.ffn_norm.weight, layer.ffn_norm.eps)).chunk(2, dim=-1)
        return (h + ffn.w2(F.silu(gate) * up)).to(features.dtype)  # (n, dim)

    def __repr__(self) -> str:
        p = self.head.params
        return (f"EagleDrafter({p.n_layers} layer, dim {p.dim}, ffn {p.ffn_hidden_dim}"
                + (f", min_confidence={self.min_confidence}" if self.min_confidence else "")
                + (f", draft_vocab={len(self.draft_ids)}" if self.draft_ids is not None else "")
                + (", draft_dtype=int8" if self.draft_product is not None else
                   f", draft_dtype={str(self.head_dtype).replace('torch.', '')}"
                   if self.draft_weight is not None else "") + ")")
