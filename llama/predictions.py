"""What the public calls return: Meta's prediction dicts (and how a Completion becomes one), and PromptError
for a batch in which some prompts could not run (raised after the others ran, carrying their results)."""

from typing import Any, Callable, Dict, List, Optional, Tuple, TypedDict

from llama.completion import Completion
from llama.tokenizer import Message, Tokenizer
from llama.tool_calls import reply_message


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # each token decoded on its own; only with logprobs=True
    logprobs: List[float]  # only with logprobs=True
    top_logprobs: List[List[Tuple[str, float]]]  # per token, the likeliest (token, logprob); top_logprobs > 0
    speculative: Dict[str, Any]  # with speculative=...: drafted, accepted, mean accepted length, by position


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # only with logprobs=True
    logprobs: List[float]  # only with logprobs=True
    top_logprobs: List[List[Tuple[str, float]]]  # only with top_logprobs > 0
    speculative: Dict[str, Any]  # only with speculative=...


def to_prediction(
    completion: Completion,
    tokenizer: Tokenizer,
    wrap: Callable[[Completion], Any],
    logprobs: bool,
    top_logprobs: bool,
) -> Dict[str, Any]:
    """Meta's prediction dict: {"generation": wrap(completion)} (its text, or a chat message), with logprobs
    also "tokens" (each decoded on its own) and "logprobs", with top_logprobs also "top_logprobs" as
    (token text, logprob) pairs."""
    prediction: Dict[str, Any] = {"generation": wrap(completion)}
    if logprobs or top_logprobs:
        prediction["tokens"] = [tokenizer.decode([t]) for t in completion.tokens]
        prediction["logprobs"] = completion.logprobs
    if top_logprobs:
        prediction["top_logprobs"] = [
            [(tokenizer.decode([t]), lp) for t, lp in position] for position in completion.top_logprobs
        ]
    if completion.speculative is not None:  # only with speculative decoding (llama.speculative)
        prediction["speculative"] = completion.speculative.as_dict()
    return prediction


def to_predictions(
    results: List[Optional[List[Completion]]],
    tokenizer: Tokenizer,
    wrap: Callable[[str], Any],
    logprobs: bool,
    top_logprobs: int,
) -> list:
    """Meta's prediction dicts for each prompt's samples: one, or a list of n (None for a failed prompt)."""
    out: list = []
    for samples in results:
        if samples is None:
            out.append(None)
            continue
        predictions = [to_prediction(c, tokenizer, wrap, logprobs, top_logprobs > 0) for c in samples]
        out.append(predictions if len(predictions) > 1 else predictions[0])
    return out


def chat_predictions(
    results: List[Optional[List[Completion]]],
    tokenizer: Tokenizer,
    replies: List[Optional[str]],
    logprobs: bool,
    top_logprobs: int,
) -> list:
    """Meta's chat predictions: each sample's assistant message (with its tool calls, llama.tool_calls), or,
    where `replies` holds a fixed answer for a dialog (Llama 2's to a dialog holding its tags), that answer as
    the content, beside the generated tokens and logprobs."""
    out = []
    for samples, reply in zip(results, replies):
        if reply is None:
            wrap = lambda c: reply_message(c, tokenizer.special_tokens)  # noqa: E731
        else:
            wrap = lambda c, reply=reply: {"role": "assistant", "content": reply}  # noqa: E731
        out.extend(to_predictions([samples], tokenizer, wrap, logprobs, top_logprobs))
    return out


class PromptError(ValueError):
    """Some prompts of a batch were invalid. The valid ones were still completed: `results` holds their
    predictions in order (None where a prompt failed) and `errors` maps each failed index to its message."""

    def __init__(self, errors: Dict[int, str], results: list):
        self.errors = errors
        self.results = results
        details = "; ".join(f"prompt {i}: {msg}" for i, msg in sorted(errors.items()))
        super().__init__(f"{len(errors)} of {len(results)} prompts failed ({details})")
