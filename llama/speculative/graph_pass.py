"""A whole speculative pass on the device, replayed as one CUDA graph: draft, verify, accept, advance.

The general loop (llama.speculative.generate) runs a pass as the host sees it: the drafter returns Python
ints, the verify pass's logits come back for acceptance, the accepted tokens go back in as a new tensor.
On a GPU with a compiled step that costs more than the arithmetic: for the demo model the host work and the
device-to-host syncs of a pass (the EAGLE chain alone syncs once per draft) took longer than the verify
pass's graph replay (docs/speculative.md). Here, for greedy decoding of one row, a pass is fixed-shape
work on static device buffers, captured once as a CUDA graph of three compiled stages:

1. draft: k tokens into `fed[1:]` (`valid` marks real drafts), from the device state alone:
   - the EAGLE-style head (llama.speculative.eagle): the first draft from the head's predicted feature of
     the last accepted position, then k - 1 head steps, each fed its own predicted feature and the draft it
     gave; each step writes the head's KV cache at its position (a tensor) and attends over the whole cache,
     masked to the positions at or before its own (as the compiled decode step reads the model's cache);
   - prompt lookup, on the device: the latest earlier match of the last 3, 2, then 1 tokens in `history`
     (the prompt and every accepted token), and what followed it: PromptLookup's proposal, computed by
     comparing every window of the history at once;
   - nothing (k = 0): plain decoding through the same pass.
2. verify: the model on `fed` (the last accepted token and the drafts) at positions pos .. pos + k, reading
   the whole KV cache under a mask (llama.fast.step.fast_forward's computation, features kept for the head);
   greedy acceptance on the device: argmax per position, drafts compared with it, the count of the leading
   matches (cumprod, sum). `result` = [accepted n, drafts, argmax at each position]: the pass's tokens are
   the first n + 1 argmaxes (the accepted drafts equal them), its only device-to-host copy.
3. advance: the head fed the pairs (model feature at pos + i, argmax at pos + i) for i = 0 .. k at head
   positions pos .. pos + k, keeping its prediction at row n (the new last position's feature); the lookup
   history gets the argmaxes at pos + 1 ..; fed[0] = the new last token; pos += n + 1. Rows past n are the
   rejected positions' entries: beyond the new end, overwritten by the next pass before anything reads
   them (the rollback argument of llama.speculative.generate, for the head's cache and the history alike).

Nothing in a pass depends on the host, so the host queues the next pass before reading the last one's
result (`run_row`): the device runs passes back to back while the host tracks stop tokens and strings,
the end of the row and the statistics one pass behind. A pass queued after the row has ended writes only
cache entries past the row's end. Near the end of the context (a pass must fit in max_seq_len) the last
tokens are plain steps.

Without CUDA (the CPU tests) the same three stages run eagerly, in the same order, on the same buffers.
"""

import weakref
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F

from llama.fast.layers import FastLinear
from llama.model import Transformer, apply_rotary_emb
from llama.speculative.drafters import Drafter, PromptLookup
from llama.speculative.eagle import EagleDrafter
from llama.speculative.forward import forward_all, forward_features, forward_last
from llama.streaming import StreamEvent


def graph_kind(drafter: Drafter, k: int) -> Optional[str]:
    """"eagle", "lookup" or "none" where GraphPass drafts as `drafter` does (the same proposals); None
    for drafters it cannot run on the device (those go through the general loop)."""
    if k == 0:
        return "none"
    if type(drafter) is PromptLookup:
        return "lookup"
    if type(drafter) is EagleDrafter and drafter.lean and not drafter.min_confidence:
        return "eagle"
    return None


def _head_step(drafter: EagleDrafter, features: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
               kv_len: int) -> torch.Tensor:
    """EagleDrafter._lean_step with fixed shapes: n pairs (features (n, dim), token ids (n,)) at head cache
    positions `positions` (n,) (a tensor, increasing), each attending to the first kv_len cache positions at
    or before its own -> predicted features (n, dim)."""
    head, model = drafter.head, drafter.target.model
    layer = head.layers[0]
    attn, ffn = layer.attention, layer.feed_forward
    n_q, n_kv, head_dim = attn.n_local_heads, attn.n_local_kv_heads, attn.head_dim
    n, dim = features.shape
    embeddings = F.embedding(ids, model.tok_embeddings.weight)  # (n, dim)
    x = head.fc(torch.cat([features, embeddings], dim=-1).to(drafter.head_dtype))  # (n, dim)
    a = F.rms_norm(x, (dim,), layer.attention_norm.weight, layer.attention_norm.eps)
    qkv = attn.wqkv(a).view(n, n_q + 2 * n_kv, head_dim).to(attn.cache_k.dtype)
    # RoPE as the model applies it (real tables: torch.compile takes them, not the complex product).
    rotated = apply_rotary_emb(qkv[None, :, : n_q + n_kv], head.rope_cos[positions], head.rope_sin[positions])[0]
    attn.cache_k[0, :, positions] = rotated[:, n_q:].transpose(0, 1)  # (n_kv, n, head_dim)
    attn.cache_v[0, :, positions] = qkv[:, n_q + n_kv :].transpose(0, 1)
    cols = torch.arange(kv_len, device=features.device)
    mask = (cols[None, :] <= positions[:, None])[None, None]  # (1, 1, n, kv_len)
    queries = rotated[:, :n_q].transpose(0, 1)[None]  # (1, n_q, n, head_dim)
    out = F.scaled_dot_product_attention(queries, attn.cache_k[:1, :, :kv_len], attn.cache_v[:1, :, :kv_len],
                                         attn_mask=mask, enable_gqa=n_q != n_kv)  # (1, n_q, n, head_dim)
    h = x + attn.wo(out[0].transpose(0, 1).reshape(n, n_q * head_dim).to(drafter.head_dtype))
    gate, up = ffn.w13(F.rms_norm(h, (dim,), layer.ffn_norm.weight, layer.ffn_norm.eps)).chunk(2, dim=-1)
    return (h + ffn.w2(F.silu(gate) * up)).to(features.dtype)  # (n, dim)


def lookup_drafts(history: torch.Tensor, length: torch.Tensor, k: int, max_ngram: int = 3, min_ngram: int = 1,
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """PromptLookup.propose on the device: history (size,) holds the text at 0 .. length - 1 (length a (1,)
    tensor; what lies beyond is ignored). Returns (drafts (k,), valid (k,) bool): the tokens that followed
    the latest earlier occurrence of the last n tokens, n from max_ngram down, valid where proposed."""
    size = history.shape[0]
    device = history.device
    starts = torch.arange(size, device=device)  # every candidate start of a match
    best = torch.full_like(length, -1)  # the match's start, -1: none yet
    ngram = torch.zeros_like(length)
    for n in range(max_ngram, min_ngram - 1, -1):
        offsets = torch.arange(n, device=device)
        pattern = history[(length - n + offsets).clamp(min=0)]  # (n,): the last n tokens
        windows = history[(starts[:, None] + offsets).clamp(max=size - 1)]  # (size, n)
        # A match ends before the last token (a token follows it); n is at most length - 1.
        found = (windows == pattern).all(dim=1) & (starts <= length - n - 1) & (length - 1 >= n)
        latest = torch.where(found, starts, -1).max().view(1)
        take = (best < 0) & (latest >= 0)
        best, ngram = torch.where(take, latest, best), torch.where(take, n, ngram)
    at = best + ngram + torch.arange(k, device=device)  # (k,)
    valid = (best >= 0) & (at < length)
    drafts = torch.where(valid, history[at.clamp(0, size - 1)], 0)
    return drafts, valid


@contextmanager
def few_row_products(on: bool = True) -> Iterator[None]:
    """While torch.compile traces (inside this block), FastLinear products of at most 8 rows become one
    multiply-and-sum over the input dimension, which inductor generates as a single reduction kernel,
    instead of cuBLAS's. For float32 products of a few rows cuBLAS picks split-K kernels (a product of 4
    to 11 microseconds and a reduction, on an H200 for the demo's shapes, where one row takes a 2.6 us
    gemv): a 5-token verify pass of the demo costs 1.9x a 1-token one, 1.4x with this. Only for models
    that small: the reduction reads each weight once per row, where cuBLAS reads it once. The sums run in
    another order than cuBLAS's: logits differ by float32 rounding (as a several-row product's do from a
    one-row one). Measured: docs/speculative.md."""
    if not on:
        yield
        return
    plain_forward = FastLinear.forward

    def forward(self: FastLinear, x: torch.Tensor) -> torch.Tensor:
        if (torch.compiler.is_compiling() and self.weight is not None and not (self.reduce or self.gather)
                and x.numel() <= 8 * self.in_features):
            return (x.unsqueeze(-2) * self.weight).sum(dim=-1)  # (..., 1, in) * (out, in) -> (..., out)
        return plain_forward(self, x)

    FastLinear.forward = forward
    try:
        yield
    finally:
        FastLinear.forward = plain_forward


class GraphPass:
    """The device-side speculative pass of `llama` with `drafter` (graph_kind must name it) and k drafts,
    greedy, one row at cache row 0. `capture=True` (CUDA) compiles each stage (torch.compile, the verify
    step's inductor options without its CUDA graphs) and captures the pass as one CUDA graph; otherwise
    the stages run eagerly."""

    def __init__(self, llama: Any, drafter: Drafter, k: int, capture: bool = False, compile: bool = True,
                 row_products: bool = False):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        kind = graph_kind(drafter, k)
        if kind is None:
            raise ValueError(f"GraphPass drafts with prompt lookup, the EAGLE-style chain or nothing, got {drafter!r}")
        self.llama, self.model, self.drafter, self.k, self.kind = llama, llama.model, drafter, k, kind
        self.row_products = row_products  # compiled stages: few-row products as reductions (few_row_products)
        model: Transformer = llama.model
        device = model.rope_cos.device
        self.max_seq_len = model.params.max_seq_len
        with torch.inference_mode(False):  # static buffers: ordinary tensors, which compiled code takes
            self.pos = torch.zeros(1, dtype=torch.long, device=device)  # the last accepted token's position
            self.fed = torch.zeros(k + 1, dtype=torch.long, device=device)  # that token, then the drafts
            self.valid = torch.zeros(k, dtype=torch.bool, device=device)  # which drafts are real
            self.result = torch.zeros(k + 3, dtype=torch.long, device=device)  # [n, drafts, argmax (k + 1)]
            dim = model.params.dim
            dtype = model.tok_embeddings.weight.dtype
            self.feature = torch.zeros(1, dim, device=device, dtype=dtype)  # the head's predicted feature
            self.feats = torch.zeros(k + 1, dim, device=device, dtype=dtype)  # the model's, of the verified positions
            self.history = torch.zeros(self.max_seq_len + k + 2, dtype=torch.long, device=device)
        self.stages: List[Callable[[], None]] = [self._draft, self._verify, self._advance]
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.stage_graphs: List[torch.cuda.CUDAGraph] = []
        if capture:
            self._capture(compile)

    # --- the three stages (each mutates the static buffers only) ---

    def _draft(self) -> None:
        k = self.k
        if self.kind == "lookup":
            drafts, valid = lookup_drafts(self.history, self.pos + 1, k, self.drafter.max_ngram, self.drafter.min_ngram)
        elif self.kind == "eagle":
            d, model = self.drafter, self.model
            feature, chain = self.feature, []
            for i in range(k):
                normed = F.rms_norm(feature, (feature.shape[-1],), model.norm.weight, model.norm.eps)
                best = d.draft_logits(normed).argmax(dim=-1)  # (1,)
                chain.append(best if d.draft_ids is None else d.draft_ids[best])
                if i < k - 1:  # the pair (feature, draft) sits at head position pos + i
                    feature = _head_step(d, feature, chain[-1], self.pos + i, self.max_seq_len)
            drafts, valid = torch.cat(chain), torch.ones(k, dtype=torch.bool, device=self.pos.device)
        else:
            return
        self.fed[1:].copy_(drafts)
        self.valid.copy_(valid)

    def _verify(self) -> None:
        model, k = self.model, self.k
        tokens = self.fed[None]  # (1, k + 1)
        pos = self.pos[:, None] + torch.arange(k + 1, device=tokens.device)  # (1, k + 1)
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]  # (1, k + 1, head_dim)
        cols = torch.arange(self.max_seq_len, device=tokens.device)
        mask = (cols[None, None, :] <= pos[:, :, None])[:, None]  # (1, 1, k + 1, max_seq_len)
        h = model.tok_embeddings(tokens)  # (1, k + 1, dim)
        for layer in model.layers:
            h = layer(h, self.pos, cos, sin, mask)
        choices = model.output(model.norm(h)).float()[0].argmax(dim=-1)  # (k + 1,)
        matches = (self.fed[1:] == choices[:-1]) & self.valid  # (k,)
        accepted = matches.long().cumprod(dim=0).sum().view(1)  # the leading matches
        self.result.copy_(torch.cat([accepted, self.valid.long().sum().view(1), choices]))
        if self.kind == "eagle":
            self.feats.copy_(h[0])

    def _advance(self) -> None:
        k = self.k
        accepted, choices = self.result[:1], self.result[2:]
        at = self.pos + torch.arange(k + 1, device=self.pos.device)  # (k + 1,)
        if self.kind == "eagle":  # pairs (f_j, t_{j + 1}): the accepted ones are real, the rest past the end
            predicted = _head_step(self.drafter, self.feats, choices, at, self.max_seq_len)  # (k + 1, dim)
            self.feature.copy_(predicted.index_select(0, accepted))
        elif self.kind == "lookup":
            self.history.index_copy_(0, at + 1, choices)
        self.fed[:1].copy_(choices.index_select(0, accepted))
        self.pos.add_(accepted + 1)

    def run_pass(self) -> None:
        """Queue one pass (a graph replay on CUDA; the stages, eagerly, elsewhere)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            for stage in self.stages:
                stage()

    def _capture(self, compile: bool) -> None:
        if compile:
            from llama.speculative import verify_step  # its compile_options (a bench may swap them)

            options = {**verify_step.compile_options(), "triton.cudagraphs": False}
            self.stages = [torch.compile(s, options=options, fullgraph=True, dynamic=False) for s in self.stages]
        # (few_row_products holds through the capture too: compiled code is guarded on what it traced)
        with torch.inference_mode(False), torch.no_grad(), few_row_products(compile and self.row_products):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles, tunes and warms up before capture (its writes are junk)
                    for stage in self.stages:
                        stage()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for stage in self.stages:
                    stage()
            # Each stage alone too, for timing (bench/graph_pass_timing.py); captured here, where the
            # compiled stages' guards hold (grad mode off: inference_mode(False) alone would turn it on).
            self.stage_graphs = []
            for stage in self.stages:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    stage()
                self.stage_graphs.append(graph)
        torch.cuda.synchronize()

    # --- one row ---

    def start(self, prompt: Sequence[int]) -> None:
        """Prefill the prompt but its last token (positions 0 .. len - 2) and set the pass's state: the last
        token at position len - 1; the head fed the prompt's pairs; the history holding the prompt."""
        model, device = self.model, self.pos.device
        length = len(prompt)
        prefix = torch.tensor([list(prompt[:-1])], dtype=torch.long, device=device)  # (1, length - 1)
        if self.kind == "eagle":
            _, features = forward_features(model, prefix, 0, logits=False)  # (1, length - 1, dim)
            ids = torch.tensor(list(prompt[1:]), dtype=torch.long, device=device)
            predicted = self.drafter._lean_step(features[0], ids, 0)  # (length - 1, dim): through the head's cache
            self.feature.copy_(predicted[-1:])
        elif length > 1:
            forward_last(model, prefix, 0)
        if self.kind == "lookup":
            self.history[:length] = torch.tensor(list(prompt), dtype=torch.long, device=device)
        self.pos.fill_(length - 1)
        self.fed[0] = prompt[-1]

    def fits(self, length: int) -> bool:
        """Whether a pass after `length` tokens (the last at length - 1) stays inside the context."""
        return length - 1 + self.k + 1 <= self.max_seq_len

    def run_row(self, prompt: Sequence[int], end: int, take: Callable[[int, List[int]], Tuple[List[StreamEvent], bool]],
                record: Callable[[int, int], None], ahead: int = 1) -> Iterator[List[StreamEvent]]:
        """Greedy decoding of one row at positions len(prompt) .. end - 1 (len(prompt) >= 2 for the EAGLE
        head, and a first pass that fits). Each pass's tokens go to `take(first_pos, tokens)`, which
        returns (stream events, done); `record(drafted, accepted)` counts each pass, as the general loop
        counts it (drafts past the row's end not counted). Up to `ahead` passes are queued beyond the one
        being read."""
        tokens = list(prompt)
        self.start(prompt)
        cuda = self.graph is not None
        with torch.inference_mode(False):
            slots = [torch.empty(self.k + 3, dtype=torch.long, pin_memory=cuda) for _ in range(ahead + 1)]
        events = [torch.cuda.Event() if cuda else None for _ in slots]
        queued: deque = deque()
        launched = 0

        def queue() -> None:
            nonlocal launched
            slot = launched % len(slots)
            self.run_pass()
            slots[slot].copy_(self.result, non_blocking=cuda)  # the pass's one device-to-host copy
            if cuda:
                events[slot].record()
            queued.append(slot)
            launched += 1

        while len(tokens) < end:
            # Queue while a pass could still be needed and surely fits: each queued pass yields 1 to k + 1 tokens.
            while (len(queued) <= ahead and len(tokens) + len(queued) < end
                   and self.fits(len(tokens) + len(queued) * (self.k + 1))):
                queue()
            if not queued:
                break  # too near the end of the context for a pass: plain steps below
            slot = queued.popleft()
            if cuda:
                events[slot].synchronize()
            row = slots[slot].tolist()
            accepted, drafted, choices = row[0], row[1], row[2:]
            room = end - len(tokens) - 1  # drafts the general loop would have verified here
            record(min(drafted, room), min(accepted, room))
            emitted = choices[: accepted + 1]
            stream_events, done = take(len(tokens), emitted)
            tokens.extend(emitted)
            yield stream_events
            if done:
                return
        while len(tokens) < end:  # plain greedy steps, eagerly
            feed = torch.tensor([tokens[-1:]], dtype=torch.long, device=self.pos.device)
            token = int(forward_all(self.model, feed, len(tokens) - 1)[0, -1].argmax())
            record(0, 0)
            stream_events, done = take(len(tokens), [token])
            tokens.append(token)
            yield stream_events
            if done:
                return


# Whether a captured pass's stages are compiled by torch.compile first (else eager kernels are captured),
# and whether their few-row products are compiled as reductions (few_row_products).
COMPILE_STAGES = True
ROW_PRODUCTS = False

# The graph passes of each model, by pass_key: each built once (a capture compiles).
_passes: "weakref.WeakKeyDictionary[Transformer, Dict[tuple, GraphPass]]" = weakref.WeakKeyDictionary()
# Models whose speculative loop uses the graph pass without CUDA graphs (the CPU tests: the same stages).
_eager: "weakref.WeakSet[Transformer]" = weakref.WeakSet()


def use_graph_pass(llama: Any, on: bool = True) -> None:
    """Run `llama`'s greedy speculative decoding through GraphPass's stages even without a compiled step
    (eagerly, no CUDA graph): what the CPU tests check. With Llama.build(..., compile=True) on CUDA the
    loop uses the captured pass whatever this says."""
    if on:
        _eager.add(llama.model)
    else:
        _eager.discard(llama.model)


def graph_pass_for(llama: Any, drafter: Drafter, k: int, prompt: Sequence[int], greedy: bool, plain_rows: bool
                   ) -> Optional[GraphPass]:
    """The GraphPass to decode this row with, or None for the general loop: greedy decoding, no logits
    processors, no logprobs (`plain_rows`), a drafter it runs (graph_kind), a prompt the first pass fits
    after, one model-parallel rank, and a compiled decode step on CUDA (or use_graph_pass)."""
    model = llama.model
    capture = model.rope_cos.device.type == "cuda" and getattr(llama.decode_step, "compiled", None) is not None
    if not (greedy and plain_rows and (capture or model in _eager)):
        return None
    if torch.distributed.is_initialized() and fs_init.get_model_parallel_world_size() > 1:
        return None  # model-parallel ranks: the general loop (a captured pass holds no collectives)
    kind = graph_kind(drafter, k)
    if kind is None or (kind == "eagle" and len(prompt) < 2) or len(prompt) - 1 + k + 1 > model.params.max_seq_len:
        return None
    known = _passes.setdefault(model, {})
    key = pass_key(drafter, k, capture)
    if key not in known or (kind == "eagle" and known[key].drafter is not drafter):
        known[key] = GraphPass(llama, drafter, k, capture=capture, compile=COMPILE_STAGES, row_products=ROW_PRODUCTS)
    return known[key]


def pass_key(drafter: Drafter, k: int, capture: bool) -> tuple:
    """What makes two GraphPasses the same: an EAGLE head drafter itself (its head and caches), prompt
    lookup's n-gram sizes, nothing for no drafts; k; captured or not."""
    kind = graph_kind(drafter, k)
    if kind == "eagle":
        return kind, id(drafter), k, capture
    if kind == "lookup":
        return kind, (drafter.max_ngram, drafter.min_ngram), k, capture
    return kind, None, k, capture
