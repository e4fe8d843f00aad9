"""Llama 3 or Llama 2: the tokenizer a file holds, and the chat format that goes with it (or is asked for)."""

from functools import partial
from typing import Optional, Union

from llama.checkpoints.meta import tokenizer_kind
from llama.tokenizer import ChatFormat, Tokenizer
from llama.tokenizer_llama2 import Llama2ChatFormat, SentencePieceTokenizer

AnyTokenizer = Union[Tokenizer, SentencePieceTokenizer]
AnyChatFormat = Union[ChatFormat, Llama2ChatFormat]
# "llama3" strips each message's text, as Meta's llama3 package does; "llama3.1" writes it as given, as Meta's
# llama-models package (Llama 3.1+) does, and so reproduces its published prompts byte for byte.
CHAT_FORMATS = {"llama3": ChatFormat, "llama3.1": partial(ChatFormat, strip=False), "llama2": Llama2ChatFormat}


def load_tokenizer(path: str) -> AnyTokenizer:
    """Llama 3's tiktoken tokenizer or Llama 2's SentencePiece one, whichever the file holds."""
    if tokenizer_kind(path) == "sentencepiece":
        return SentencePieceTokenizer(path)
    return Tokenizer(path)


def make_chat_format(tokenizer: AnyTokenizer, name: Optional[str] = None) -> AnyChatFormat:
    """The chat format `name` ("llama3", "llama3.1" or "llama2"); by default the one of the tokenizer's family."""
    if name is None:
        name = "llama2" if isinstance(tokenizer, SentencePieceTokenizer) else "llama3"
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat_format {name!r}; expected one of {sorted(CHAT_FORMATS)}")
    if name.startswith("llama3") and "<|start_header_id|>" not in tokenizer.special_tokens:
        raise ValueError(f"chat_format {name!r} needs Llama 3's special tokens, which this tokenizer lacks")
    return CHAT_FORMATS[name](tokenizer)
