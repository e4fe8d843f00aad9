"""Choosing the next token from the model's logits.

Two kinds of small functions shape the last-position logits (bsz, vocab) before a token is chosen:
- logits processors, built from a GenerationConfig, look at each row's tokens so far, a `Context`
  (repetition penalty, banned tokens and words, no stop token before min_new_tokens); they run on the raw
  logits;
- filters (top_k, min_p) only look at the logits; they run after the division by the temperature.
`Sampler` chains them and draws; with Meta's defaults it is exactly `next_token`.
"""

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch

# The fast path's nucleus search looks first among this many most likely tokens.
PREFILTER_CANDIDATES = 256

# greedy() splits each row of logits into chunks of this many (on the CPU, when it divides the vocabulary:
# 128256 = 501 x 256, 32000 = 125 x 256).
GREEDY_CHUNK = 256

from llama.config import GenerationConfig


@dataclass
class Context:
    """The tokens each row has so far, whatever the decode loop's layout: row i holds
    tokens[i, :lengths[i]], its prompt (prompt_lens[i] tokens) then what it generated."""

    tokens: torch.Tensor  # (bsz, L)
    lengths: torch.Tensor  # (bsz,), each <= L
    prompt_lens: torch.Tensor  # (bsz,)

    @property
    def n_generated(self) -> torch.Tensor:
        """(bsz,) tokens generated so far; negative while a row is still being fed its prompt."""
        return self.lengths - self.prompt_lens

    def seen(self, vocab_size: int) -> torch.Tensor:
        """(bsz, vocab_size) True for every token id present in the row."""
        bsz, width = self.tokens.shape
        valid = torch.arange(width, device=self.tokens.device)[None, :] < self.lengths[:, None]
        ids = self.tokens.masked_fill(~valid, vocab_size)  # positions past the row's end: an extra column
        seen = torch.zeros((bsz, vocab_size + 1), dtype=torch.bool, device=self.tokens.device)
        return seen.scatter_(1, ids, True)[:, :vocab_size]

    def ends_with(self, suffix: Sequence[int]) -> torch.Tensor:
        """(bsz,) True for the rows whose last tokens are `suffix`."""
        k = len(suffix)
        offsets = torch.arange(k, device=self.tokens.device)[None, :] - k
        at = (self.lengths[:, None] + offsets).clamp(min=0)  # (bsz, k) positions of the last k tokens
        tail = torch.gather(self.tokens, 1, at)
        matches = (tail == torch.tensor(list(suffix), device=self.tokens.device)).all(dim=1)
        return matches & (self.lengths >= k)


# A logits processor: (logits (bsz, vocab), the rows' tokens so far) -> logits. Processors never modify
# their input in place: the same logits also give the reported logprobs.
LogitsProcessor = Callable[[torch.Tensor, Context], torch.Tensor]


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose probability mass reaches p.

    The token whose probability carries the running total past p is kept; the set is renormalised before
    the draw. Equally likely tokens are ordered by id (a stable sort), so the result is reproducible.
    probs: (bsz, vocab), rows summing to 1. Returns (bsz, 1) token ids.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # Mass strictly before each token; a token is dropped when that alone already exceeds p.
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def sample_top_p_prefiltered(
    probs: torch.Tensor,
    p: float,
    generator: Optional[torch.Generator] = None,
    candidates: int = PREFILTER_CANDIDATES,
) -> torch.Tensor:
    """`sample_top_p`, bit for bit (the same token for the same generator state), without sorting the whole
    vocabulary when the nucleus lies among the `candidates` most likely tokens.

    The candidates are every token at least as likely as the candidates-th most likely one, in the order of
    a stable descending sort: exactly the first entries of sample_top_p's sorted row. If the last candidate
    is dropped from the nucleus, every later token is too (running sums only grow, later probabilities are
    smaller), so the candidates decide it; otherwise this falls back to the full sort. The draw runs on a
    full-width row laid out as sample_top_p's (nucleus first, zeros after), consuming the generator alike.
    Reads one flag per row on the host: meant for the CPU.
    """
    bsz, vocab = probs.shape
    if candidates >= vocab:
        return sample_top_p(probs, p, generator)
    kth = torch.topk(probs, candidates, dim=-1, sorted=False).values.amin(dim=-1)  # (bsz,)
    probs_sort = torch.zeros_like(probs)
    ids = []
    for row in range(bsz):
        cand = torch.nonzero(probs[row] >= kth[row]).squeeze(1)  # (m,) ascending ids
        values, order = torch.sort(probs[row, cand], descending=True, stable=True)
        before = torch.cumsum(values, dim=0) - values  # the same sums as sample_top_p's first m
        dropped = before > p
        if not bool(dropped[-1]):
            return sample_top_p(probs, p, generator)  # the nucleus may reach past the candidates
        probs_sort[row, : len(values)] = values.masked_fill(dropped, 0.0)
        ids.append(cand[order])
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (bsz, 1)
    return torch.stack([ids[row][choice[row]] for row in range(bsz)])


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1), exactly: the first of equal maxima, a NaN counting as the largest.
    logits: (bsz, vocab) -> (bsz,) token ids.

    On the CPU torch.argmax walks a row one element at a time, while the largest value of chunks of a row is
    a vectorised reduction. So: the largest value of each chunk of GREEDY_CHUNK logits, the first chunk
    holding the row's largest (amax, like argmax, lets a NaN win), then the first largest within that chunk:
    the same index, faster. On GPUs torch.argmax is the faster: it is kept there (measured: bench/README.md,
    History).
    """
    bsz, vocab = logits.shape
    if logits.device.type != "cpu" or vocab % GREEDY_CHUNK or bsz == 0:
        return torch.argmax(logits, dim=-1)
    chunks = logits.reshape(bsz, vocab // GREEDY_CHUNK, GREEDY_CHUNK)
    best = chunks.amax(dim=-1).argmax(dim=-1, keepdim=True)  # (bsz, 1) the first chunk holding the largest
    within = torch.take_along_dim(chunks, best[:, :, None], dim=1).argmax(dim=-1)  # (bsz, 1) its position there
    # (take_along_dim and an in-place add: few small ops, as each costs more than its work here)
    return within.add_(best, alpha=GREEDY_CHUNK)[:, 0]


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: Optional[torch.Generator] = None,
    *,
    prefilter: bool = False,
) -> torch.Tensor:
    """The next token of each row from last-position logits (bsz, vocab): greedy when temperature is 0,
    else top-p sampling at that temperature (with `prefilter`, by sample_top_p_prefiltered: the same
    tokens, faster on the CPU). Returns (bsz,)."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        sample = sample_top_p_prefiltered if prefilter else sample_top_p
        return sample(probs, top_p, generator).reshape(-1)
    return greedy(logits)


# ---- logits processors (on raw logits, knowing the tokens so far) ----


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """Make every token already in a row's context less likely (CTRL's penalty, as in Hugging Face):
    a positive logit is divided by `penalty`, a negative one multiplied by it."""

    def process(logits: torch.Tensor, context: Context) -> torch.Tensor:
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        return torch.where(context.seen(logits.shape[-1]), penalised, logits)

    return process


def ban_tokens(token_ids: Sequence[int]) -> LogitsProcessor:
    """Never choose these token ids."""
    banned = list(token_ids)

    def process(logits: torch.Tensor, context: Context) -> torch.Tensor:
        return logits.index_fill(1, torch.tensor(banned, device=logits.device), float("-inf"))

    return process


def ban_sequences(sequences: Sequence[Sequence[int]]) -> LogitsProcessor:
    """Never complete one of these token sequences: a sequence's last token is banned in rows whose
    context ends with the rest of it (one-token sequences are always banned)."""
    always = sorted({seq[0] for seq in sequences if len(seq) == 1})
    longer = [list(seq) for seq in sequences if len(seq) > 1]

    def process(logits: torch.Tensor, context: Context) -> torch.Tensor:
        if always:
            logits = ban_tokens(always)(logits, context)
        for seq in longer:
            last = seq[-1]
            column = torch.where(context.ends_with(seq[:-1]), float("-inf"), logits[:, last])  # (bsz,)
            logits = logits.index_copy(1, torch.tensor([last], device=logits.device), column[:, None])
        return logits

    return process


def min_new_tokens(stop_tokens: Sequence[int], minimum: int) -> LogitsProcessor:
    """Ban the stop tokens in rows that have generated fewer than `minimum` tokens."""
    stop_ids = sorted(stop_tokens)

    def process(logits: torch.Tensor, context: Context) -> torch.Tensor:
        too_early = (context.n_generated < minimum)[:, None]  # (bsz, 1)
        return torch.where(too_early, ban_tokens(stop_ids)(logits, context), logits)

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
    exactly `next_token`, so Meta's defaults sample bit for bit as the reference. With `prefilter`, top-p
    draws go through sample_top_p_prefiltered (the same tokens, without a full sort when it can: CPU)."""

    def __init__(
        self,
        config: GenerationConfig,
        processors: Sequence[LogitsProcessor] = (),
        generators: Optional[Sequence[torch.Generator]] = None,
        prefilter: bool = False,
    ):
        self.temperature = config.temperature
        self.top_p = config.top_p
        self.top_k = config.top_k
        self.min_p = config.min_p
        self.processors = list(processors)
        self.generators = generators  # None: torch's global RNG, one draw for the whole batch
        self.prefilter = prefilter
        self.sample_top_p = sample_top_p_prefiltered if prefilter else sample_top_p

    @property
    def plain_greedy(self) -> bool:
        """True where the choice is greedy(logits) of the raw logits: temperature 0 and no processors. A decode
        step may then make the pick itself (llama.fast.cpu_step.CompiledCPUStep.decode_and_pick)."""
        return self.temperature == 0 and not self.processors

    def __call__(self, logits: torch.Tensor, context: Context) -> torch.Tensor:
        """logits (bsz, vocab) of each row's last position; context: each row's tokens so far.
        Returns (bsz,) token ids."""
        for process in self.processors:
            logits = process(logits, context)
        if self.temperature == 0:
            return greedy(logits)
        if self.top_k == 0 and self.min_p == 0 and self.generators is None:
            return next_token(logits, self.temperature, self.top_p, prefilter=self.prefilter)
        logits = min_p_filter(top_k_filter(logits / self.temperature, self.top_k), self.min_p)
        probs = torch.softmax(logits, dim=-1)
        if self.generators is None:
            return self.sample_top_p(probs, self.top_p).reshape(-1)
        # Rows still reading their prompt (n_generated < 0) draw nothing: each row's random stream then
        # depends on its own prompt only, not on the lengths of the other prompts in the batch.
        choices = torch.argmax(probs, dim=-1)
        for i, (g, active) in enumerate(zip(self.generators, (context.n_generated >= 0).tolist())):
            if active:
                choices[i] = self.sample_top_p(probs[i : i + 1], self.top_p, g)[0, 0]
        return choices


def make_sampler(
    cfg: GenerationConfig, tokenizer: Any, sample_index: List[int], device: torch.device, prefilter: bool
) -> Sampler:
    """The Sampler of one call: cfg's processors (banned words as the tokenizer spells them), per-row
    generators when cfg has a seed (row i draws from stream (seed, sample_index[i])), and with `prefilter`
    the prefiltered top-p where it pays (it reads a flag on the host at each draw: free on the CPU only)."""
    banned: List[List[int]] = []
    for word in cfg.banned_words:
        # A word is spelt by different tokens at the start of a text and after a space.
        for variant in dict.fromkeys([word, " " + word.lstrip(" ")]):
            banned.append(tokenizer.encode(variant, bos=False, eos=False))
    processors = build_processors(cfg, sorted(tokenizer.stop_tokens), banned)
    generators = row_generators(cfg.seed, sample_index, device) if cfg.seed is not None else None
    return Sampler(cfg, processors, generators, prefilter=prefilter and device.type == "cpu")
