"""The OpenAI response bodies and stream chunks the server sends, as plain dicts (the shapes of the official
`openai` client's Completion, ChatCompletion and ChatCompletionChunk types).

    /v1/completions       {"id": "cmpl-..", "object": "text_completion", "created", "model",
                           "choices": [{"index", "text", "logprobs", "finish_reason"}], "usage"}
    /v1/chat/completions  {"id": "chatcmpl-..", "object": "chat.completion", "created", "model",
                           "choices": [{"index", "message": {"role", "content"}, "logprobs", "finish_reason"}],
                           "usage"}
    streamed              the same "id" in every chunk; completions' chunks have the response's shape, chat's
                          are "chat.completion.chunk" with a "delta" instead of a "message"

A choice's `index` is prompt * n + sample. finish_reason is "stop" (a stop token or a stop string) or
"length"; usage counts the prompt tokens once per prompt and every generated token, a final stop token
included (it was generated, though not shown).
"""

import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "length": "length"}


def finish_reason(reason: Optional[str]) -> Optional[str]:
    """OpenAI's name for an engine finish reason (None while running)."""
    return None if reason is None else FINISH_REASONS[reason]


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer: Any, token: int) -> str:
    """The token decoded on its own (as Meta's prediction dicts give "tokens")."""
    return tokenizer.decode([token])


def token_bytes(tokenizer: Any, token: int) -> List[int]:
    """The token's bytes: exact with tiktoken (a token may hold part of a UTF-8 character), else its text's."""
    exact = getattr(getattr(tokenizer, "model", None), "decode_single_token_bytes", None)
    raw = exact(token) if exact is not None else token_text(tokenizer, token).encode("utf-8")
    return list(raw)


def completion_logprobs(tokenizer: Any, tokens: List[int], logprobs: List[float],
                        tops: Optional[List[List[Tuple[int, float]]]], offset: int) -> Dict[str, Any]:
    """The legacy completions' logprobs object: each token's text and logprob, the `logprobs` likeliest at
    each position as {text: logprob} plus the chosen token (so up to logprobs + 1 entries, as OpenAI's), and
    each token's character offset in the choice's text (starting at `offset`)."""
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    top_dicts = []
    for i, token in enumerate(tokens):
        entry = {token_text(tokenizer, t): lp for t, lp in (tops[i] if tops else [])}
        entry.setdefault(texts[i], logprobs[i])
        top_dicts.append(entry)
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": top_dicts, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, tokens: List[int], logprobs: List[float],
                  tops: Optional[List[List[Tuple[int, float]]]]) -> List[Dict[str, Any]]:
    """Chat's logprobs "content" entries: per token its text, bytes, logprob and the likeliest alternatives."""
    def entry(token: int, lp: float) -> Dict[str, Any]:
        return {"token": token_text(tokenizer, token), "logprob": lp, "bytes": token_bytes(tokenizer, token)}

    return [dict(entry(t, lp), top_logprobs=[entry(a, alp) for a, alp in (tops[i] if tops else [])])
            for i, (t, lp) in enumerate(zip(tokens, logprobs))]


class Stamp:
    """The fields every body or chunk of one response shares: its id, creation time and model."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def body(self, choices: List[Dict[str, Any]], usage_: Optional[Dict[str, int]], chunk: bool = False,
             with_usage: bool = True) -> Dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        body: Dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                                "system_fingerprint": None, "choices": choices}
        if with_usage:
            body["usage"] = usage_
        return body


def completion_choice(index: int, text: str, reason: Optional[str],
                      logprobs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(reason)}


def chat_choice(index: int, content: str, reason: str, logprobs: Optional[List[Dict[str, Any]]]) -> Dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish_reason(reason)}


def chat_delta(index: int, delta: Dict[str, Any], reason: Optional[str] = None,
               logprobs: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    return {"index": index, "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish_reason(reason)}
