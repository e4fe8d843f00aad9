"""`GenerationConfig`: every control over how tokens are chosen and when a generation ends, checked once.

The defaults are Meta's (temperature 0.6, top_p 0.9, nothing else), so a call that sets nothing samples
exactly as the reference does. Every other control is off by default.
"""

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional, Tuple

# Meta's example defaults: used when neither a config nor an argument says otherwise.
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9


@dataclass(frozen=True)
class GenerationConfig:
    """How to choose tokens and when to stop. Build it once and pass it as `config=`, or pass any of its
    fields as keyword arguments to `generate`, `text_completion`, `chat_completion`, `generate_stream`.

    Attributes:
        temperature: 0 for greedy decoding; otherwise logits are divided by it before softmax.
        top_p: nucleus sampling: keep the most likely tokens until their mass reaches top_p; in (0, 1].
        top_k: keep only the k most likely tokens; 0 turns it off.
        min_p: drop tokens whose probability is below min_p times the most likely one's; 0 turns it off.
        repetition_penalty: > 1 discourages tokens already in the prompt or generation (logits above 0 are
            divided by it, those below multiplied); 1 turns it off.
        stop: strings that end the generation; the text ends just before the first one found.
        banned_words: strings the generation must not contain as these tokens: each word is encoded as
            written and with a leading space, and the last token of each encoding is banned after the others.
        banned_token_ids: token ids that are never generated.
        seed: a seed for this call alone (the global RNG is left untouched); the same seed gives the same
            output whatever else ran before. None: use torch's global RNG, as Meta's reference does.
        n: samples per prompt.
        min_new_tokens: stop tokens are banned until this many tokens were generated.
        max_new_tokens: most tokens generated per sample (the `max_gen_len` of Meta's API); None: up to
            max_seq_len.
        ignore_eos: do not stop at stop tokens (they are kept in the output like any token).

    Raises:
        ValueError: a value out of range, naming the field and the value.
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: Tuple[str, ...] = ()
    banned_words: Tuple[str, ...] = ()
    banned_token_ids: Tuple[int, ...] = ()
    seed: Optional[int] = None
    n: int = 1
    min_new_tokens: int = 0
    max_new_tokens: Optional[int] = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, lambda v: v >= 0, ">= 0")
        _check_number("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        _check_int("top_k", self.top_k, low=0)
        _check_number("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check_number("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "> 0")
        # A lone string would otherwise be read as a sequence of one-character stop strings.
        object.__setattr__(self, "stop", _strings("stop", self.stop))
        object.__setattr__(self, "banned_words", _strings("banned_words", self.banned_words))
        ids = (self.banned_token_ids,) if isinstance(self.banned_token_ids, int) else self.banned_token_ids
        try:
            ids = tuple(ids)
        except TypeError:
            raise ValueError(f"banned_token_ids must be a list of ints, got {self.banned_token_ids!r}") from None
        for token_id in ids:
            _check_int("banned_token_ids entry", token_id, low=0)
        object.__setattr__(self, "banned_token_ids", ids)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
        _check_int("n", self.n, low=1)
        _check_int("min_new_tokens", self.min_new_tokens, low=0)
        if self.max_new_tokens is not None:
            _check_int("max_new_tokens", self.max_new_tokens, low=1)
            if self.min_new_tokens > self.max_new_tokens:
                raise ValueError(
                    f"min_new_tokens={self.min_new_tokens} is more than max_new_tokens={self.max_new_tokens}"
                )
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    def updated(self, **changes: Any) -> "GenerationConfig":
        """A copy with `changes` applied (None values are skipped: they mean "not given"), checked again.

        Raises:
            ValueError: an unknown control name or a bad value.
        """
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown generation controls {unknown}; known: {sorted(known)}")
        given = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **given) if given else self


def resolve_config(config: Optional[GenerationConfig], **changes: Any) -> GenerationConfig:
    """`config` (default: Meta's defaults) with the given keyword controls applied; None means not given."""
    if config is None:
        config = GenerationConfig()
    elif not isinstance(config, GenerationConfig):
        raise ValueError(f"config must be a GenerationConfig, got {type(config).__name__}")
    return config.updated(**changes)


def _check_number(name: str, value: Any, in_range: Callable[[float], bool], wanted: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {wanted}, got {value!r}")
    if not in_range(value):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _strings(name: str, value: Any) -> Tuple[str, ...]:
    values = (value,) if isinstance(value, str) else value
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a list of strings, got {value!r}") from None
    for s in values:
        if not isinstance(s, str) or not s:
            raise ValueError(f"{name} must hold non-empty strings, got {s!r}")
    return values
