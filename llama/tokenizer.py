"""The Llama 3 tokenizer (tiktoken BPE plus 256 special tokens) and the Llama 3 chat format."""

import base64
import os
import re
from typing import AbstractSet, Collection, Dict, Iterator, List, Literal, Optional, Sequence, TypedDict, Union

import tiktoken

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


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
        *,
        bos: bool,
        eos: bool,
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
        """Decode token ids to text (bytes that are not valid UTF-8 become U+FFFD)."""
        return self.model.decode(list(t))


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
    """Llama 3 chat prompts: each message is a header, its stripped content and <|eot_id|>."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, message: Message) -> List[int]:
        tokens = [self.tokenizer.special_tokens["<|start_header_id|>"]]
        tokens.extend(self.tokenizer.encode(message["role"], bos=False, eos=False))
        tokens.append(self.tokenizer.special_tokens["<|end_header_id|>"])
        tokens.extend(self.tokenizer.encode("\n\n", bos=False, eos=False))
        return tokens

    def encode_message(self, message: Message) -> List[int]:
        # Content is always plain text: "<|eot_id|>" typed by a user stays ordinary characters.
        tokens = self.encode_header(message)
        tokens.extend(self.tokenizer.encode(message["content"].strip(), bos=False, eos=False))
        tokens.append(self.tokenizer.eot_id)
        return tokens

    def fixed_reply(self, dialog: Dialog) -> Optional[str]:
        """An answer that replaces the generated text: never, in Llama 3's format (Llama 2's has one)."""
        return None

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """<|begin_of_text|>, every message, then an empty assistant header for the model to continue."""
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            tokens.extend(self.encode_message(message))
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens


def check_dialog(dialog: Dialog) -> None:
    """Raise ValueError unless `dialog` is: an optional system message, then user/assistant turns
    alternating, starting and ending with the user."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"a dialog must be a non-empty list of messages, got {dialog!r:.80}")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be a dict with a str 'content', got {message!r:.80}")
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(
                f"message {i} has unknown role {message.get('role')!r}; expected system, user or assistant"
            )
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    roles = [m["role"] for m in turns]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if roles != expected or not roles or roles[-1] != "user":
        raise ValueError(
            "a dialog must be an optional system message, then turns alternating user/assistant starting and "
            f"ending with user; got roles {[m['role'] for m in dialog]}"
        )
