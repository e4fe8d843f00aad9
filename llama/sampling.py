"""Choosing the next token from the model's logits.

Two kinds of small functions shape the last-position logits (bsz, vocab) before a token is chosen:
- logits processors, built from a GenerationConfig, look at the tokens so far (repetition penalty, banned
  tokens and words, no stop token before min_new_tokens); they run on the raw logits;
- filters (top_k, min_p) only look at the logits; they run after the division by the temperature.
`Sampler` chains them and draws; with Meta's defaults it is exactly `next_token`.
"""

from typing import Callable, List, Optional, Sequence

import torch

from llama.config import GenerationConfig

# A logits processor: (logits (bsz, vocab), context (bsz, tokens so far), n_generated (bsz,)) -> logits.
# Processors never modify their input in place: the same logits also give the reported logprobs.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose probability mass reaches p.

    The token whose probability carries the running total past p is kept; the set is renormalised before
    the draw. probs: (bsz, vocab), rows summing to 1. Returns (bsz, 1) token ids.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # Mass strictly before each token; a token is dropped when that alone already exceeds p.
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The next token of each row from last-position logits (bsz, vocab): greedy when temperature is 0,
    else top-p sampling at that temperature. Returns (bsz,)."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p, generator).reshape(-1)
    return torch.argmax(logits, dim=-1)


# ---- logits processors (on raw logits, knowing the tokens so far) ----


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """Make every token already in a row's context less likely (CTRL's penalty, as in Hugging Face):
    a positive logit is divided by `penalty`, a negative one multiplied by it."""

    def process(logits: torch.Tensor, context: torch.Tensor, n_generated: torch.Tensor) -> torch.Tensor:
        seen = torch.gather(logits, 1, context)  # (bsz, context_len): each context token's logit
        seen = torch.where(seen > 0, seen / penalty, seen * penalty)
        return logits.scatter(1, context, seen)  # repeated tokens write the same value twice

    return process


def ban_tokens(token_ids: Sequence[int]) -> LogitsProcessor:
    """Never choose these token ids."""
    banned = list(token_ids)

    def process(logits: torch.Tensor, context: torch.Tensor, n_generated: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(1, torch.tensor(banned, device=logits.device), float("-inf"))

    return process


def ban_sequences(sequences: Sequence[Sequence[int]]) -> LogitsProcessor:
    """Never complete one of these token sequences: a sequence's last token is banned in rows whose
    context ends with the rest of it (one-token sequences are always banned)."""
    always = sorted({seq[0] for seq in sequences if len(seq) == 1})
    longer = [list(seq) for seq in sequences if len(seq) > 1]

    def process(logits: torch.Tensor, context: torch.Tensor, n_generated: torch.Tensor) -> torch.Tensor:
        if always:
            logits = ban_tokens(always)(logits, context, n_generated)
        for seq in longer:
            prefix = seq[:-1]
            if context.shape[1] < len(prefix):
                continue
            tail = context[:, -len(prefix) :]  # (bsz, len(prefix))
            matches = (tail == torch.tensor(prefix, device=context.device)).all(dim=1)  # (bsz,)
            column = torch.where(matches, float("-inf"), logits[:, seq[-1]])
            logits = logits.index_copy(1, torch.tensor([seq[-1]], device=logits.device), column[:, None])
        return logits

    return process


def min_new_tokens(stop_tokens: Sequence[int], minimum: int) -> LogitsProcessor:
    """Ban the stop tokens in rows that have generated fewer than `minimum` tokens."""
    stop_ids = sorted(stop_tokens)

    def process(logits: torch.Tensor, context: torch.Tensor, n_generated: torch.Tensor) -> torch.Tensor:
        too_early = (n_generated < minimum)[:, None]  # (bsz, 1)
        banned = ban_tokens(stop_ids)(logits, context, n_generated)
        return torch.where(too_early, banned, logits)

    return process


# ---- filters (on temperature-scaled logits) ----


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept too); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]  # (bsz, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop the tokens whose probability is below min_p times that of the row's most likely token."""
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (bsz, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def build_processors(
    config: GenerationConfig, stop_tokens: Sequence[int], banned_sequences: Sequence[Sequence[int]]
) -> List[LogitsProcessor]:
    """The processors `config` asks for, in the order they run; empty for the defaults."""
    processors: List[LogitsProcessor] = []
    if config.repetition_penalty != 1.0:
        processors.append(repetition_penalty(config.repetition_penalty))
    if config.banned_token_ids:
        processors.append(ban_tokens(config.banned_token_ids))
    if banned_sequences:
        processors.append(ban_sequences(banned_sequences))
    if config.min_new_tokens > 0 and not config.ignore_eos:
        processors.append(min_new_tokens(stop_tokens, config.min_new_tokens))
    return processors


def row_generators(seed: int, sample_indices: Sequence[int], device: torch.device) -> List[torch.Generator]:
    """One random generator per row, seeded from (seed, the row's sample number): a row's draws depend on
    neither the other rows of the batch nor anything run before, and the n samples of a prompt differ."""
    generators = []
    for j in sample_indices:
        g = torch.Generator(device=device)
        g.manual_seed((seed + j * 0x9E3779B97F4A7C15) % 2**63)  # spread sample numbers over the seed space
        generators.append(g)
    return generators


class Sampler:
    """Chooses each row's next token from last-position logits: processors, then greedy (temperature 0) or
    temperature, top_k, min_p and top_p sampling. With no processors, filters or generators this is
    exactly `next_token`, so Meta's defaults sample bit for bit as the reference."""

    def __init__(
        self,
        config: GenerationConfig,
        processors: Sequence[LogitsProcessor] = (),
        generators: Optional[Sequence[torch.Generator]] = None,
    ):
        self.temperature = config.temperature
        self.top_p = config.top_p
        self.top_k = config.top_k
        self.min_p = config.min_p
        self.processors = list(processors)
        self.generators = generators  # None: torch's global RNG, one draw for the whole batch

    def __call__(self, logits: torch.Tensor, context: torch.Tensor, n_generated: torch.Tensor) -> torch.Tensor:
        """logits (bsz, vocab), context (bsz, tokens so far), n_generated (bsz,). Returns (bsz,) token ids."""
        for process in self.processors:
            logits = process(logits, context, n_generated)
        if self.temperature == 0:
            return torch.argmax(logits, dim=-1)
        if self.top_k == 0 and self.min_p == 0 and self.generators is None:
            return next_token(logits, self.temperature, self.top_p)
        logits = min_p_filter(top_k_filter(logits / self.temperature, self.top_k), self.min_p)
        probs = torch.softmax(logits, dim=-1)
        if self.generators is None:
            return sample_top_p(probs, self.top_p).reshape(-1)
        # Rows still reading their prompt (n_generated < 0) draw nothing: each row's random stream then
        # depends on its own prompt only, not on the lengths of the other prompts in the batch.
        choices = torch.argmax(probs, dim=-1)
        for i, (g, active) in enumerate(zip(self.generators, (n_generated >= 0).tolist())):
            if active:
                choices[i] = sample_top_p(probs[i : i + 1], self.top_p, g)[0, 0]
        return choices
