"""The Llama 3 tokenizer (tiktoken BPE plus 256 special tokens) and the Llama 3 chat format."""

import base64
import os
import re
from typing import (
    AbstractSet, Collection, Dict, Iterator, List, Literal, NotRequired, Optional, Sequence, TypedDict, Union
)

import tiktoken

from llama.tool_calls import ToolCall, check_tool_fields

# "ipython" (Llama 3.1+) carries a tool's output back to the model.
Role = Literal["system", "user", "assistant", "ipython"]


class Message(TypedDict):
    role: Role
    content: str
    # An assistant turn that called a tool (Llama 3.1+; llama.tool_calls): the calls parsed from `content`,
    # whether the model began it with <|python_tag|>, and how it ended: "end_of_message" (<|eom_id|>: the
    # model waits for the tool's answer) or "end_of_turn" (<|eot_id|>). Re-encoded exactly as the model wrote.
    tool_calls: NotRequired[List[ToolCall]]
    python_tag: NotRequired[bool]
    stop_reason: NotRequired[Literal["end_of_message", "end_of_turn"]]


Dialog = Sequence[Message]

# tiktoken's regex engine fails on very long inputs, so text is encoded in windows of at most this many
# characters, each cut so that no run of spaces or of non-spaces is longer than the second limit (Meta's).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

NUM_RESERVED_SPECIAL_TOKENS = 256

# The named special tokens (Llama 3.1+ names); the remaining ids up to 256 are reserved_special_token_N.
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model waits for a tool's answer
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]

# Meta's pre-tokenisation pattern: contractions, words with one leading non-letter, numbers of up to three
# digits, punctuation runs, newlines, other whitespace.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def load_bpe_ranks(model_path: str) -> Dict[bytes, int]:
    """Read a tiktoken BPE file: one "base64(token) rank" pair per line. Errors name the file and line."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"tokenizer file not found: {model_path!r}")
    ranks: Dict[bytes, int] = {}
    with open(model_path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(
                    f"{model_path!r} is not a tiktoken BPE file: line {lineno} is {line[:60]!r} ({e})"
                ) from None
    if not ranks:
        raise ValueError(f"tokenizer file {model_path!r} is empty")
    return ranks


class Tokenizer:
    """Tokenizes and detokenizes text with a tiktoken BPE file, Llama 3 style.

    The 256 special tokens are appended after the file's base vocabulary, so with Meta's tokenizer.model
    (128000 ranks) <|begin_of_text|> is 128000 and n_words is 128256; any smaller BPE file works too.
    """

    special_tokens: Dict[str, int]
    num_reserved_special_tokens = NUM_RESERVED_SPECIAL_TOKENS
    pat_str = PAT_STR

    def __init__(self, model_path: str):
        """Load `model_path` (a tiktoken BPE file). Raises FileNotFoundError or ValueError."""
        mergeable_ranks = load_bpe_ranks(model_path)
        num_base_tokens = len(mergeable_ranks)
        reserved = [
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(self.num_reserved_special_tokens - len(NAMED_SPECIAL_TOKENS))
        ]
        self.special_tokens = {
            token: num_base_tokens + i for i, token in enumerate(NAMED_SPECIAL_TOKENS + reserved)
        }
        self.model = tiktoken.Encoding(
            name=os.path.basename(model_path),
            pat_str=self.pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = num_base_tokens + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.stop_tokens = {self.eos_id, self.eom_id, self.eot_id}

    def encode(
        self,
        s: str,
        bos: bool,
        eos: bool,
        *,
        allowed_special: Union[Literal["all"], AbstractSet[str]] = set(),
        disallowed_special: Union[Literal["all"], Collection[str]] = (),
    ) -> List[int]:
        """Encode `s` into token ids, optionally with <|begin_of_text|> / <|end_of_text|> around it.

        By default text that looks like a special token is encoded as ordinary text; pass its name in
        `allowed_special` to get the special id. Inputs of any length work.
        """
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        t: List[int] = [self.bos_id] if bos else []
        for window_start in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            window = s[window_start : window_start + TIKTOKEN_MAX_ENCODE_CHARS]
            for piece in _split_long_runs(window, MAX_NO_WHITESPACES_CHARS):
                t.extend(
                    self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
                )
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t: Sequence[int]) -> str:
        """Decode token ids to text (bytes that are not valid UTF-8 become U+FFFD). Ids of -1 (Meta's Llama 3
        pad id) are skipped, as Meta's decode skips them."""
        return self.model.decode([token for token in t if token != -1])


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut `s` so that no piece holds a run of more than `max_run` whitespace or non-whitespace characters."""
    if not re.search(r"\s{%d}|\S{%d}" % (max_run + 1, max_run + 1), s):
        yield s  # the common case, without a Python loop over every character
        return
    start = 0
    run_length = 0
    in_space = s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != in_space:
            in_space = not in_space
            run_length = 1
        else:
            run_length += 1
            if run_length > max_run:
                yield s[start:i]
                start = i
                run_length = 1
    yield s[start:]


class ChatFormat:
    """Llama 3 chat prompts: each message is a header, its content and <|eot_id|>.

    With `strip` (the default, as Meta's llama3 package) message text is stripped of surrounding whitespace;
    strip=False writes it as given, as Meta's llama-models package (Llama 3.1+) does. An assistant message
    holding a tool call (llama.tool_calls) is always written as given, after <|python_tag|> if the model
    wrote one and ending with <|eom_id|> where the model ended with it, so that it re-encodes byte for byte.
    """

    def __init__(self, tokenizer: Tokenizer, *, strip: bool = True):
        self.tokenizer = tokenizer
        self.strip = strip

    def encode_header(self, message: Message) -> List[int]:
        tokens = [self.tokenizer.special_tokens["<|start_header_id|>"]]
        tokens.extend(self.tokenizer.encode(message["role"], bos=False, eos=False))
        tokens.append(self.tokenizer.special_tokens["<|end_header_id|>"])
        tokens.extend(self.tokenizer.encode("\n\n", bos=False, eos=False))
        return tokens

    def encode_message(self, message: Message) -> List[int]:
        # Content is always plain text: "<|eot_id|>" typed by a user stays ordinary characters.
        tokens = self.encode_header(message)
        if message.get("python_tag"):
            tokens.append(self.tokenizer.special_tokens["<|python_tag|>"])
        text = message["content"]
        if self.strip and "tool_calls" not in message:
            text = text.strip()
        tokens.extend(self.tokenizer.encode(text, bos=False, eos=False))
        end = "<|eom_id|>" if message.get("stop_reason") == "end_of_message" else "<|eot_id|>"
        tokens.append(self.tokenizer.special_tokens[end])
        return tokens

    def fixed_reply(self, dialog: Dialog) -> Optional[str]:
        """An answer that replaces the generated text: never, in Llama 3's format (Llama 2's has one)."""
        return None

    def check_dialog(self, dialog: Dialog) -> None:
        """Raise ValueError unless `dialog` is: an optional system message, then user, assistant and ipython
        (tool output) messages in any order (Meta's own tool examples hold two user messages in a row),
        ending with a user or ipython message for the assistant to answer."""
        _check_messages(dialog, ("system", "user", "assistant", "ipython"))
        roles = [m["role"] for m in dialog]
        if "system" in roles[1:] or roles[-1] not in ("user", "ipython"):
            raise ValueError(
                "a Llama 3 dialog must be an optional system message, then user, assistant and ipython messages "
                f"ending with user (or ipython, a tool's output); got roles {roles}"
            )

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """<|begin_of_text|>, every message, then an empty assistant header for the model to continue."""
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            tokens.extend(self.encode_message(message))
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens


def _check_messages(dialog: Dialog, roles: Sequence[str]) -> None:
    """Raise ValueError unless `dialog` is a non-empty list of messages with a str content and a role in `roles`
    (and, on assistant messages, well-formed tool-call fields)."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"a dialog must be a non-empty list of messages, got {dialog!r:.80}")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be a dict with a str 'content', got {message!r:.80}")
        if message.get("role") not in roles:
            raise ValueError(f"message {i} has unknown role {message.get('role')!r}; expected {', '.join(roles)}")
        check_tool_fields(message, i)


def check_dialog(dialog: Dialog) -> None:
    """Raise ValueError unless `dialog` is: an optional system message, then user/assistant turns
    alternating, starting and ending with the user (the Llama 2 format's rule; ChatFormat.check_dialog
    gives Llama 3's, which also takes ipython messages)."""
    _check_messages(dialog, ("system", "user", "assistant"))
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    roles = [m["role"] for m in turns]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if roles != expected or not roles or roles[-1] != "user":
        raise ValueError(
            "a dialog must be an optional system message, then turns alternating user/assistant starting and "
            f"ending with user; got roles {[m['role'] for m in dialog]}"
        )
