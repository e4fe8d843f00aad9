"""The OpenAI request bodies the server takes, read and checked before any work: a `Job` (token prompts and
generation settings) or a `RequestError` naming the offending field, OpenAI-style.

Framework-free (plain dicts in, dataclasses out), so that every rule is testable without a server. The
response shapes are in llama/serve/responses.py, the endpoints in llama/serve/http.py.

Defaults where OpenAI's and Meta's differ: temperature 0.6 and top_p 0.9 (Meta's, as `text_completion` and
Llama 3's generation_config.json), max_tokens 16 for /v1/completions (OpenAI's) and "up to the context" for
chat (OpenAI's).
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from llama.config import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, GenerationConfig
from llama.tokenizer import ChatFormat

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs; completions' logprobs take the same here
MAX_CHOICES = 128  # prompts x n in one request (OpenAI caps n at 128)

# Fields accepted and ignored (they change nothing about the tokens).
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Fields the server does not implement: refused unless absent, null or the "off" value given here.
UNSUPPORTED_UNLESS = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
}
# Extra sampling fields (as vLLM takes them) mapped to GenerationConfig's controls.
EXTRA_CONTROLS = {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                  "ignore_eos": "ignore_eos", "min_tokens": "min_new_tokens"}
COMMON = {"model", "stream", "stream_options", "n", "stop", "seed", "max_tokens", "temperature", "top_p",
          "logprobs", *IGNORED, *UNSUPPORTED_UNLESS, *EXTRA_CONTROLS}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}


class RequestError(ValueError):
    """A request the server refuses: an HTTP status and OpenAI's error object naming the field (`param`)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ModelInfo:
    """What the checks need to know of the served model and its engine."""

    name: str  # the model id clients send
    max_seq_len: int
    vocab_size: int
    block_size: int  # the KV cache's: a request must fit in the whole pool alone
    n_blocks: int
    tokenizer: Any
    formatter: Any

    def blocks_needed(self, positions: int) -> int:
        return -(-positions // self.block_size)


@dataclass
class Job:
    """One checked request: its prompts (token ids) and how to generate from each, n samples each."""

    chat: bool
    prompts: List[List[int]]
    max_new: List[int]  # per prompt: tokens to generate at most
    config: GenerationConfig  # n=1; max_new_tokens set per prompt at submission
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    prompt_texts: List[str] = field(default_factory=list)  # for echo
    fixed_replies: List[Optional[str]] = field(default_factory=list)  # chat: Llama 2's answer to its tags


# ---- one field ----

def _int(body: Dict[str, Any], name: str, low: int, high: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {value!r:.80}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        wanted = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"'{name}' must be {wanted}, got {value}", name, "invalid_value")
    return value


def _number(body: Dict[str, Any], name: str, ok, wanted: str) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number, got {value!r:.80}", name, "invalid_type")
    if not ok(value):
        raise RequestError(f"'{name}' must be {wanted}, got {value}", name, "invalid_value")
    return float(value)


def _bool(body: Dict[str, Any], name: str) -> Optional[bool]:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {value!r:.80}", name, "invalid_type")
    return value


def _stop(body: Dict[str, Any]) -> Tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values):
        raise RequestError(f"'stop' must be a non-empty string or a list of them, got {value!r:.80}", "stop",
                           "invalid_type")
    return tuple(values)


# ---- the whole request ----

def _common(body: Any, info: ModelInfo, known: set) -> Dict[str, Any]:
    """The checks shared by both endpoints; returns the generation settings read."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0],
                           "unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(f"'model' must be a string naming the model, got {model!r:.80}", "model",
                           "invalid_type")
    if model != info.name:
        raise RequestError(f"the model '{model}' does not exist; this server serves '{info.name}'", "model",
                           "model_not_found", status=404)
    for name, allowed in UNSUPPORTED_UNLESS.items():
        if body.get(name) is not None and body[name] not in allowed:
            raise RequestError(f"'{name}' is not supported by this server (got {body[name]!r:.80})", name,
                               "unsupported_parameter")
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise RequestError("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError(f"'stream_options' must be an object with 'include_usage', got {options!r:.80}",
                               "stream_options", "invalid_type")
        include_usage = bool(_bool(options, "include_usage"))
    controls = dict(
        temperature=_number(body, "temperature", lambda v: v >= 0, ">= 0"),
        top_p=_number(body, "top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
        seed=_int(body, "seed", 0),
        top_k=_int(body, "top_k", 0),
        min_p=_number(body, "min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
        repetition_penalty=_number(body, "repetition_penalty", lambda v: v > 0, "> 0"),
        ignore_eos=_bool(body, "ignore_eos"),
        min_new_tokens=_int(body, "min_tokens", 0),
        stop=_stop(body),
    )
    if controls["temperature"] is None:
        controls["temperature"] = DEFAULT_TEMPERATURE
    if controls["top_p"] is None:
        controls["top_p"] = DEFAULT_TOP_P
    n = _int(body, "n", 1, MAX_CHOICES)
    return dict(controls=controls, n=n or 1, stream=stream, include_usage=include_usage)


def _lengths(prompts: List[List[int]], info: ModelInfo, max_tokens: Optional[int], param: str,
             default: Optional[int], prompt_param: str, min_new: int) -> List[int]:
    """Tokens each prompt may generate: max_tokens when given (refused if it does not fit), else `default`
    (None: as many as fit), cut to the context and the KV pool."""
    out = []
    for i, tokens in enumerate(prompts):
        where = f" (prompt {i})" if len(prompts) > 1 else ""
        room = info.max_seq_len - len(tokens)
        if room < 1:
            raise RequestError(f"the prompt{where} has {len(tokens)} tokens: nothing is left to generate in this "
                               f"model's context of {info.max_seq_len} tokens", prompt_param,
                               "context_length_exceeded")
        # A request holds at most prompt + max_new - 1 positions, and must fit in the whole pool alone.
        pool_room = info.n_blocks * info.block_size - len(tokens) + 1
        if pool_room < 1:
            raise RequestError(f"the prompt{where} has {len(tokens)} tokens, more than the KV cache's "
                               f"{info.n_blocks * info.block_size} positions", prompt_param,
                               "context_length_exceeded")
        if max_tokens is not None:
            if max_tokens > room:
                raise RequestError(f"'{param}' is {max_tokens} but the prompt{where} has {len(tokens)} tokens and "
                                   f"the context holds {info.max_seq_len}: at most {room} can be generated",
                                   param, "context_length_exceeded")
            if max_tokens > pool_room:
                raise RequestError(f"'{param}' is {max_tokens} but with the prompt{where} of {len(tokens)} tokens "
                                   f"the KV cache ({info.n_blocks} blocks of {info.block_size}) holds at most "
                                   f"{pool_room}", param, "context_length_exceeded")
            new = max_tokens
        else:
            new = min(room, pool_room, default or room)
        if min_new > new:
            raise RequestError(f"'min_tokens' is {min_new}, more than the {new} tokens this request may generate",
                               "min_tokens", "invalid_value")
        out.append(new)
    return out


def _config(settings: Dict[str, Any]) -> GenerationConfig:
    try:
        return GenerationConfig(**{k: v for k, v in settings["controls"].items() if v is not None})
    except ValueError as e:  # every field was checked above: this is a contradiction between fields
        raise RequestError(str(e)) from None


def parse_completion(body: Any, info: ModelInfo) -> Job:
    """Read a POST /v1/completions body. Raises RequestError naming the field."""
    settings = _common(body, info, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    tokenizer = info.tokenizer
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    else:
        texts = []
    if texts:
        prompts = [tokenizer.encode(t, bos=True, eos=False) for t in texts]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]  # token ids, taken as given (no <|begin_of_text|> added)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise RequestError("'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
                           f"of token ids (none empty), got {prompt!r:.80}", "prompt", "invalid_type")
    for i, tokens in enumerate(prompts):
        bad = [t for t in tokens if not 0 <= t < info.vocab_size]
        if bad:
            raise RequestError(f"prompt {i}: token ids {bad[:5]} are outside the vocabulary [0, {info.vocab_size})",
                               "prompt", "invalid_value")
    if not texts:
        texts = [tokenizer.decode(t) for t in prompts]
    n = settings["n"]
    best_of = _int(body, "best_of", 1)
    if best_of is not None and best_of != n:
        raise RequestError(f"'best_of' must equal n ({n}) here: choosing the best of several samples is not "
                           "supported", "best_of", "unsupported_parameter")
    if len(prompts) * n > MAX_CHOICES:
        raise RequestError(f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} choices", "n", "invalid_value")
    logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    echo = bool(_bool(body, "echo"))
    if echo and logprobs is not None:
        raise RequestError("'echo' with 'logprobs' (the prompt's logprobs) is not supported", "echo",
                           "unsupported_parameter")
    max_tokens = _int(body, "max_tokens", 1)
    max_new = _lengths(prompts, info, max_tokens, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt",
                       settings["controls"]["min_new_tokens"] or 0)
    return Job(chat=False, prompts=prompts, max_new=max_new, config=_config(settings), n=n,
               logprobs=logprobs is not None, top_logprobs=logprobs or 0, stream=settings["stream"],
               include_usage=settings["include_usage"], echo=echo, prompt_texts=texts,
               fixed_replies=[None] * len(prompts))


def _messages(value: Any, formatter: Any) -> List[Dict[str, str]]:
    """OpenAI messages as the chat format's dialog: text contents only; "tool" is Llama 3's "ipython"."""
    llama3 = isinstance(formatter, ChatFormat)
    roles = ("system", "user", "assistant", "tool") if llama3 else ("system", "user", "assistant")
    if not isinstance(value, list) or not value:
        raise RequestError(f"'messages' must be a non-empty list of messages, got {value!r:.80}", "messages",
                           "invalid_type" if not isinstance(value, list) else "invalid_value")
    dialog = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object, got {message!r:.80}", where, "invalid_type")
        extra = sorted(set(message) - {"role", "content", "name", "tool_call_id"})
        if extra:
            raise RequestError(f"{where}: {', '.join(extra)} not supported", f"{where}.{extra[0]}",
                               "unsupported_parameter")
        role = message.get("role")
        if role not in roles:
            raise RequestError(f"{where}.role is {role!r:.40}; expected one of {', '.join(roles)}", f"{where}.role",
                               "invalid_value")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                   "supported", f"{where}.content", "unsupported_parameter")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string or a list of text parts, got {content!r:.80}",
                               f"{where}.content", "invalid_type")
        dialog.append({"role": "ipython" if role == "tool" else role, "content": content})
    try:
        formatter.check_dialog(dialog)
    except ValueError as e:
        raise RequestError(f"'messages': {e}", "messages", "invalid_value") from None
    return dialog


def parse_chat(body: Any, info: ModelInfo) -> Job:
    """Read a POST /v1/chat/completions body. Raises RequestError naming the field."""
    settings = _common(body, info, CHAT_FIELDS)
    dialog = _messages(body.get("messages"), info.formatter)
    prompt = info.formatter.encode_dialog_prompt(dialog)
    logprobs = bool(_bool(body, "logprobs"))
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    param, max_tokens = "max_completion_tokens", _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        param, max_tokens = "max_tokens", _int(body, "max_tokens", 1)
    max_new = _lengths([prompt], info, max_tokens, param, None, "messages",
                       settings["controls"]["min_new_tokens"] or 0)
    return Job(chat=True, prompts=[prompt], max_new=max_new, config=_config(settings), n=settings["n"],
               logprobs=logprobs, top_logprobs=top or 0, stream=settings["stream"],
               include_usage=settings["include_usage"], fixed_replies=[info.formatter.fixed_reply(dialog)])
