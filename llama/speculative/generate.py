"""Speculative generation for one prompt: a drafter guesses up to k tokens, the model verifies them all in one
forward pass over k + 1 positions of its KV cache, and every accepted token (and the model's own next one)
is kept. The output is the model's: greedy, token for token what `Llama.generate(..., temperature=0)` gives;
sampling, the same distribution as plain sampling (llama.speculative.verify has the rule).

Rolling the KV cache back costs nothing. A verify pass writes keys and values for the last accepted token and
every draft, positions start .. start + k; when only j drafts are accepted, positions start + j + 1 ..
start + k hold the rejected drafts' entries. The next pass starts at start + j + 1 and writes its own tokens
there before its attention reads anything (the model writes the new positions into the cache first, then
attends over positions 0 .. its end), and a token at position p attends only to positions <= p (the causal
mask): a stale entry beyond the current end is never read. Moving the position back is the whole rollback.
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch

from llama.config import GenerationConfig, resolve_config
from llama.speculative.drafters import Drafter
from llama.speculative.forward import forward_all, forward_features, forward_last
from llama.speculative.verify import accept_greedy, accept_sampled, target_probs

# GenerationConfig controls speculative generation follows exactly; every other control must keep its default.
SUPPORTED_CONTROLS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_new_tokens", "ignore_eos")


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

    def record(self, n_drafted: int, n_accepted: int) -> None:
        """One verify pass that checked n_drafted drafts and accepted the first n_accepted."""
        self.steps += 1
        self.drafted += n_drafted
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

    def summary(self) -> str:
        by_pos = ", ".join("-" if r is None else f"{r:.2f}" for r in self.acceptance_by_position)
        return (f"{self.steps} steps, drafted {self.drafted}, accepted {self.accepted} "
                f"({self.acceptance_rate:.0%}), mean accepted length {self.mean_accepted_length:.2f}, "
                f"by position [{by_pos}]")


def check_controls(cfg: GenerationConfig) -> None:
    """Raise ValueError naming the controls of `cfg` that speculative generation does not follow yet."""
    defaults = GenerationConfig()
    unsupported = [
        f"{name}={getattr(cfg, name)!r}"
        for name in ("repetition_penalty", "stop", "banned_words", "banned_token_ids", "n", "min_new_tokens")
        if getattr(cfg, name) != getattr(defaults, name)
    ]
    if unsupported:
        raise ValueError(
            f"speculative generation does not support {', '.join(unsupported)} yet; it follows "
            f"{', '.join(SUPPORTED_CONTROLS)}"
        )


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
    """Generate for one prompt with drafts from `drafter`, verified k at a time: the output of
    `llama.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs)` (greedy: the same tokens;
    sampling: the same distribution, not the same draws) and statistics of the drafts.

    Args:
        llama: a built Llama (its model and tokenizer).
        prompt_tokens: a batch of one prompt, [[ids]] (batch > 1 is not supported yet).
        max_gen_len: most tokens to generate (None: config.max_new_tokens, else max_seq_len - 1).
        drafter: a Drafter (PromptLookup(), DraftModel(small_llama), ...).
        k: most drafts verified per forward pass; 0 runs plain decoding through the same loop.
        temperature, top_p: as for generate, but without a `config` temperature defaults to 0 (greedy);
            top_p defaults to Meta's 0.9.
        logprobs: also return each generated token's log-probability under the model's raw logits.
        config, **controls: other GenerationConfig controls; top_k, min_p, seed, max_new_tokens and ignore_eos
            are followed, the others raise ValueError. Arguments given win over `config`.

    Returns:
        (tokens, logprobs, stats): [generated ids], cut before the first stop token; [their logprobs] or
        None; a SpeculativeStats.

    Raises:
        ValueError: a batch of other than one prompt, a bad prompt, k or setting, an unsupported control, a
            drafter that does not fit the model or proposes ids outside the vocabulary.
        TypeError: a drafter without `propose`.
    """
    from llama.generation import check_prompt, check_settings  # (not at import time: generation imports us)

    if len(prompt_tokens) != 1:
        raise ValueError(
            f"speculative generation runs one prompt at a time (batch size 1); got a batch of {len(prompt_tokens)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k (drafts per step) must be an integer >= 0, got {k!r}")
    if not callable(getattr(drafter, "propose", None)):
        raise TypeError(f"drafter must have a propose(tokens, k) method, got {type(drafter).__name__}")
    params = llama.model.params
    if config is None:
        config = GenerationConfig(temperature=0.0)
    controls = dict(controls, temperature=temperature, top_p=top_p)  # None: not given
    cfg, max_gen_len = check_settings(params, 1, config, max_gen_len, controls)
    check_controls(cfg)
    problem = check_prompt(prompt_tokens[0], params)
    if problem:
        raise ValueError(f"prompt 0: {problem}")
    if hasattr(drafter, "check"):
        drafter.check(llama)
    if hasattr(drafter, "reset"):
        drafter.reset()
    with torch.inference_mode():
        tokens, token_logprobs, stats = _run(llama, list(prompt_tokens[0]), max_gen_len, drafter, k, cfg, logprobs)
    return [tokens], ([token_logprobs] if logprobs else None), stats


def _run(llama: Any, prompt: List[int], max_gen_len: int, drafter: Drafter, k: int, cfg: GenerationConfig,
         logprobs: bool) -> Tuple[List[int], List[float], SpeculativeStats]:
    model = llama.model
    device = model.rope_cos.device
    vocab_size = model.vocab_size
    stop_ids = set() if cfg.ignore_eos else set(llama.tokenizer.stop_tokens)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
    stats = SpeculativeStats(k)
    total_len = min(model.params.max_seq_len, len(prompt) + max_gen_len)
    tokens = list(prompt)  # the prompt, then every accepted token; the last one is not in the cache yet
    out_logprobs: List[float] = []
    # A drafter with observe_features (EAGLE-style) is handed the model's features of every accepted position.
    observe = getattr(drafter, "observe_features", None)
    if len(prompt) > 1 and total_len > len(prompt):
        # The prompt but its last token: positions 0 .. len - 2. The last one is fed with the first drafts.
        prefix = torch.tensor([prompt[:-1]], dtype=torch.long, device=device)
        if observe:
            observe(0, forward_features(model, prefix, 0, logits=False)[1][0])
        else:
            forward_last(model, prefix, 0)

    while len(tokens) < total_len:
        n_draft = min(k, total_len - len(tokens) - 1)  # a pass yields at most n_draft + 1 tokens
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
        if cfg.temperature == 0:
            emitted = accept_greedy(logits, drafts)
        else:
            probs = target_probs(logits, cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p)
            emitted = accept_sampled(probs, drafts, generator)
        stats.record(len(drafts), len(emitted) - 1)
        if observe:  # the fed tokens accepted: the last one and len(emitted) - 1 drafts
            observe(start, features[0, : len(emitted)])
        if logprobs:  # of the raw logits, as plain decoding reports them
            lp = torch.log_softmax(logits[: len(emitted)], dim=-1)
            new_lps = lp[torch.arange(len(emitted), device=device), torch.tensor(emitted, device=device)].tolist()
        for i, token in enumerate(emitted):
            if token in stop_ids:  # cut before the first stop token, as plain decoding does
                return tokens[len(prompt):], out_logprobs, stats
            tokens.append(token)
            if logprobs:
                out_logprobs.append(new_lps[i])
    return tokens[len(prompt):], out_logprobs, stats


@dataclass
class Speculation:
    """Speculative settings for `Llama.generate(..., speculative=Speculation(PromptLookup(), k=4))`: the
    call then runs speculative_generate with generate's own defaults (Meta's temperature 0.6 and top_p 0.9
    unless given), and `stats` holds its statistics afterwards."""

    drafter: Drafter
    k: int = 4
    stats: Optional[SpeculativeStats] = None  # the last call's

    def generate(self, llama: Any, prompt_tokens: List[List[int]], max_gen_len: Optional[int],
                 temperature: Optional[float], top_p: Optional[float], logprobs: bool, echo: bool,
                 config: Optional[GenerationConfig], controls: dict
                 ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """`Llama.generate`'s arguments -> its return value."""
        if echo:
            raise ValueError("speculative generation does not support echo=True yet")
        cfg = resolve_config(config)  # Meta's defaults where the caller's config says nothing
        tokens, token_logprobs, self.stats = speculative_generate(
            llama, prompt_tokens, max_gen_len, self.drafter, self.k, temperature, top_p, logprobs,
            config=cfg, **controls,
        )
        return tokens, token_logprobs
