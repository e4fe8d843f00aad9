"""Speculative generation of one row: a drafter guesses up to k tokens, the model verifies them all in one
forward pass over k + 1 positions of its KV cache, and every accepted token (and the model's own next one)
is kept (llama.speculative.rows runs a batch of rows through `_run`, as a decode loop of Llama). The output is the model's: greedy, token for token what `Llama.generate(..., temperature=0)` gives;
sampling, the same distribution as plain sampling (llama.speculative.verify has the rule).

Rolling the KV cache back costs nothing. A verify pass writes keys and values for the last accepted token and
every draft, positions start .. start + k; when only j drafts are accepted, positions start + j + 1 ..
start + k hold the rejected drafts' entries. The next pass starts at start + j + 1 and writes its own tokens
there before its attention reads anything (the model writes the new positions into the cache first, then
attends over positions 0 .. its end), and a token at position p attends only to positions <= p (the causal
mask): a stale entry beyond the current end is never read. Moving the position back is the whole rollback.
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from llama.completion import DecodeLoop
from llama.config import GenerationConfig
from llama.sampling import Context, LogitsProcessor
from llama.speculative.drafters import Drafter
from llama.speculative.forward import forward_all, forward_features, forward_last
from llama.speculative.graph_pass import GraphPass, graph_pass_for
from llama.speculative.tree import DraftTree, TreeAcceptance, accept_tree_greedy, tree_pass
from llama.speculative.tree_sampling import accept_tree_sampled
from llama.speculative.verify import accept_greedy, accept_sampled, target_probs
from llama.streaming import StreamEvent

@dataclass
class SpeculativeStats:
    """What one speculative generation drafted and accepted."""

    k: int  # the most drafts per step asked for
    steps: int = 0  # verify passes (forward passes of the model after the prompt)
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens accepted
    drafted_at: List[int] = field(default_factory=list)  # [i]: steps with a draft at position i (0-based)
    accepted_at: List[int] = field(default_factory=list)  # [i]: steps whose draft at position i was accepted

    def __post_init__(self) -> None:
        self.drafted_at = self.drafted_at or [0] * self.k
        self.accepted_at = self.accepted_at or [0] * self.k

    def record(self, n_drafted: int, n_accepted: int, nodes: Optional[int] = None) -> None:
        """One verify pass that checked n_drafted drafts and accepted the first n_accepted. For a draft tree
        n_drafted is its depth (positions drafted) and `nodes` its size (tokens drafted)."""
        self.steps += 1
        self.drafted += n_drafted if nodes is None else nodes
        self.accepted += n_accepted
        for i in range(n_drafted):
            self.drafted_at[i] += 1
            self.accepted_at[i] += i < n_accepted

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify pass yields on average: accepted drafts plus the model's own token (EAGLE's tau).
        1.0 is plain decoding's one token per forward pass."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_by_position(self) -> List[Optional[float]]:
        """[i]: the share of the drafts at position i (0-based) that were accepted, None where none was
        drafted. A draft counts as accepted only if every draft before it in its step was."""
        return [a / d if d else None for a, d in zip(self.accepted_at, self.drafted_at)]

    def add(self, other: "SpeculativeStats") -> "SpeculativeStats":
        """These statistics and `other`'s together (e.g. the rows of one call), as a new SpeculativeStats."""
        k = max(self.k, other.k)
        pad = lambda xs: list(xs) + [0] * (k - len(xs))  # noqa: E731
        return SpeculativeStats(
            k, self.steps + other.steps, self.drafted + other.drafted, self.accepted + other.accepted,
            [a + b for a, b in zip(pad(self.drafted_at), pad(other.drafted_at))],
            [a + b for a, b in zip(pad(self.accepted_at), pad(other.accepted_at))],
        )

    def as_dict(self) -> Dict[str, Any]:
        """The figures as plain values (what the prediction dicts carry under "speculative")."""
        return {"k": self.k, "steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "mean_accepted_length": self.mean_accepted_length,
                "acceptance_by_position": self.acceptance_by_position}

    def summary(self) -> str:
        by_pos = ", ".join("-" if r is None else f"{r:.2f}" for r in self.acceptance_by_position)
        return (f"{self.steps} steps, drafted {self.drafted}, accepted {self.accepted} "
                f"({self.acceptance_rate:.0%}), mean accepted length {self.mean_accepted_length:.2f}, "
                f"by position [{by_pos}]")


def speculative_generate(
    llama: Any,
    prompt_tokens: List[List[int]],
    max_gen_len: Optional[int],
    drafter: Drafter,
    k: int = 4,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    logprobs: bool = False,
    *,
    config: Optional[GenerationConfig] = None,
    **controls: Any,
) -> Tuple[List[List[int]], Optional[List[List[float]]], SpeculativeStats]:
    """Generate with drafts from `drafter`, verified k at a time: the output of
    `llama.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, config=config, **controls)`
    (greedy: the same tokens; sampling: the same distribution, not the same draws) and the statistics of
    the drafts (all rows together). EAGLE's reference calls this `eagenerate`; `naive_generate` is the
    baseline with the same signature.

    Args:
        llama: a built Llama (its model and tokenizer).
        prompt_tokens: one list of ids per prompt; each row is speculated on its own, one after another.
        max_gen_len: most tokens to generate (None: config.max_new_tokens, else max_seq_len - 1).
        drafter: a Drafter (PromptLookup(), DraftModel(small_llama), ...).
        k: most drafts verified per forward pass; 0 runs plain decoding through the same loop.
        temperature, top_p: as for generate, but without a `config` temperature defaults to 0 (greedy);
            top_p defaults to Meta's 0.9.
        logprobs: also return each generated token's log-probability under the model's raw logits.
        config, **controls: every other GenerationConfig control (stop strings, n, repetition_penalty,
            banned words, min_new_tokens, seed, ...), followed as plain decoding follows it.

    Returns:
        (tokens, logprobs, stats): as `generate` returns them, and a SpeculativeStats.

    Raises:
        ValueError: bad prompts, k or settings; a drafter that does not fit the model or proposes ids
            outside the vocabulary.
        TypeError: a drafter without `propose`.
    """
    speculation = Speculation(drafter, k)
    if config is None:
        config = GenerationConfig(temperature=0.0)
    tokens, token_logprobs = llama.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, config=config,
                                            speculative=speculation, **controls)
    return tokens, token_logprobs, speculation.stats


def naive_generate(
    llama: Any,
    prompt_tokens: List[List[int]],
    max_gen_len: Optional[int],
    drafter: Optional[Drafter] = None,
    k: int = 4,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    logprobs: bool = False,
    *,
    config: Optional[GenerationConfig] = None,
    **controls: Any,
) -> Tuple[List[List[int]], Optional[List[List[float]]], SpeculativeStats]:
    """The baseline of `speculative_generate`, with its signature (EAGLE's `naivegenerate`): the same loop
    with no drafts, one token per forward pass; `drafter` and `k` are ignored. Its statistics count the
    passes (mean accepted length 1.0)."""
    return speculative_generate(llama, prompt_tokens, max_gen_len, Drafter(), 0, temperature, top_p, logprobs,
                                config=config, **controls)


def _contexts(tokens: List[int], drafts: List[int], prompt_len: int, device: torch.device) -> Context:
    """The text before each verified position, as the logits processors see a batch of rows: row i holds
    `tokens` and the first i drafts (what the text is if those are accepted)."""
    seq = torch.tensor(tokens + drafts, dtype=torch.long, device=device)
    n = len(drafts) + 1
    lengths = len(tokens) + torch.arange(n, device=device)
    return Context(seq.expand(n, -1), lengths, torch.full((n,), prompt_len, device=device))


def check_tree(tree: DraftTree, depth: int, vocab_size: int, drafter: Drafter) -> None:
    """ValueError for a drafter's tree deeper than `depth` or with ids outside the vocabulary."""
    if not isinstance(tree, DraftTree):
        raise TypeError(f"{drafter!r}.propose_tree returned {type(tree).__name__}, not a DraftTree")
    if len(tree) and max(tree.depths()) > depth:
        raise ValueError(f"{drafter!r} proposed a tree of depth {max(tree.depths())}, at most {depth} asked for")
    bad = [t for t in tree.tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{drafter!r} proposed token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")


def _run(llama: Any, prompt: List[int], end: int, drafter: Drafter, k: int, cfg: GenerationConfig,
         out: Any, stats: SpeculativeStats, generator: Optional[torch.Generator] = None,
         processors: Sequence[LogitsProcessor] = ()) -> Iterator[List[StreamEvent]]:
    """Speculative decoding of one row at positions len(prompt) .. end - 1, on cache row 0 of the model.
    Each pass hands the tokens it emits to `out` (llama.speculative.rows.RowOutput: the loop's buffers,
    stop tokens and strings) and yields the stream events it returns, until `out` says the row is done.
    `processors` (repetition penalty, banned words...) shape each verified position's logits, given the
    text before it; `generator` is the row's random stream (None: torch's global one)."""
    model = llama.model
    # Greedy rows without processors or logprobs on a compiled CUDA step: the whole pass on the device.
    graph = graph_pass_for(llama, drafter, k, prompt, cfg.temperature == 0,
                           not processors and not out.wants_prompt_logits)
    if graph is not None:
        yield from _run_graph(graph, prompt, end, out, stats)
        return
    device = model.rope_cos.device
    vocab_size = model.vocab_size
    tokens = list(prompt)  # the prompt, then every accepted token; the last one is not in the cache yet
    # A drafter with observe_features (EAGLE-style) is handed the model's features of every accepted position.
    observe = getattr(drafter, "observe_features", None)
    if len(prompt) > 1 and (end > len(prompt) or out.wants_prompt_logits):
        # The prompt but its last token: positions 0 .. len - 2. The last one is fed with the first drafts.
        prefix = torch.tensor([prompt[:-1]], dtype=torch.long, device=device)
        if observe:
            prefix_logits, features = forward_features(model, prefix, 0, logits=out.wants_prompt_logits)
            observe(0, features[0])
        elif out.wants_prompt_logits:
            prefix_logits = forward_all(model, prefix, 0)
        else:
            forward_last(model, prefix, 0)
        if out.wants_prompt_logits:  # logits at positions 0 .. len - 2 give the logprobs of tokens 1 .. len - 1
            out.prompt_logits(prefix_logits[0])

    propose_tree = getattr(drafter, "propose_tree", None)  # a tree drafter (llama.speculative.tree)
    accept_tree: TreeAcceptance = accept_tree_greedy
    if cfg.temperature > 0:  # llama.speculative.tree_sampling: the multi-draft rule, with this row's stream
        distribution = partial(target_probs, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                               min_p=cfg.min_p)
        accept_tree = partial(accept_tree_sampled, distribution=distribution, generator=generator)
    while len(tokens) < end:
        n_draft = min(k, end - len(tokens) - 1)  # a pass yields at most n_draft + 1 tokens
        if propose_tree is not None:
            # Its nodes take cache slots after the root: len(tokens) .. max_seq_len - 1.
            tree = propose_tree(tokens, n_draft, model.params.max_seq_len - len(tokens))
            check_tree(tree, n_draft, vocab_size, drafter)
            emitted, logits, features = tree_pass(model, tokens, tree, len(prompt), processors, accept_tree)
            stats.record(max(tree.depths(), default=0), len(emitted) - 1, nodes=len(tree))
            if observe:
                observe(len(tokens) - 1, features)
            events, done = out.take(len(tokens), emitted, logits)
            tokens.extend(emitted)
            yield events
            if done:
                return
            continue
        drafts = [int(t) for t in drafter.propose(tokens, n_draft)][:n_draft] if n_draft > 0 else []
        bad = [t for t in drafts if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{drafter!r} proposed token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
        start = len(tokens) - 1
        feed = torch.tensor([[tokens[-1]] + drafts], dtype=torch.long, device=device)  # (1, 1 + drafts)
        if observe:
            logits, features = forward_features(model, feed, start)
        else:
            logits = forward_all(model, feed, start)
        logits = logits[0]  # (1 + drafts, vocab): row i predicts position start + 1 + i
        scores = logits
        for process in processors:  # each position given the text before it: the prompt, tokens, drafts
            scores = process(scores, _contexts(tokens, drafts, len(prompt), device))
        if cfg.temperature == 0:
            emitted = accept_greedy(scores, drafts)
        else:
            probs = target_probs(scores, cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p)
            emitted = accept_sampled(probs, drafts, generator)
        stats.record(len(drafts), len(emitted) - 1)
        if observe:  # the fed tokens accepted: the last one and len(emitted) - 1 drafts
            observe(start, features[0, : len(emitted)])
        events, done = out.take(len(tokens), emitted, logits)  # logprobs: of the raw logits, as plain decoding
        tokens.extend(emitted)
        yield events
        if done:
            return


def _run_graph(graph: GraphPass, prompt: List[int], end: int, out: Any, stats: SpeculativeStats
               ) -> Iterator[List[StreamEvent]]:
    """`_run` through a GraphPass (llama.speculative.graph_pass): stop tokens and strings tracked on the
    host as the passes' results come back, the row's tokens written to the loop's buffer once, at its end."""
    kept: List[int] = []

    def take(first_pos: int, emitted: List[int]) -> Tuple[List[StreamEvent], bool]:
        events, done, n = out.track(first_pos, emitted)
        kept.extend(emitted[:n])
        return events, done

    try:
        yield from graph.run_row(prompt, end, take, stats.record)
    finally:
        out.write(len(prompt), kept)


@dataclass
class Speculation:
    """Speculative settings for `Llama.generate` / `complete` / `text_completion` / `chat_completion` /
    `generate_stream(..., speculative=Speculation(PromptLookup(), k=4))`: each row is then decoded by
    drafting up to k tokens and verifying them in one pass, with the output of plain decoding. After a call,
    `stats` holds its statistics (all rows together; each Completion and prediction dict has its row's)."""

    drafter: Drafter
    k: int = 4
    stats: Optional[SpeculativeStats] = None  # the last call's

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k (drafts per step) must be an integer >= 0, got {self.k!r}")
        if not callable(getattr(self.drafter, "propose", None)):
            raise TypeError(f"drafter must have a propose(tokens, k) method, got {type(self.drafter).__name__}")

    def check(self, llama: Any) -> "Speculation":
        """Raise ValueError if the drafter cannot draft for `llama`; return self."""
        if hasattr(self.drafter, "check"):
            self.drafter.check(llama)
        return self

    def decode(self, llama: Any, rows: Any) -> DecodeLoop:
        """The decode loop of `llama` over `rows` (llama.completion.Rows), speculatively."""
        from llama.speculative.rows import decode_rows  # (rows imports this module)

        return decode_rows(llama, rows, self)
