"""The Llama 2 tokenizer (a SentencePiece model) and the Llama 2 chat format ([INST] ... [/INST], <<SYS>>).

`sentencepiece` is imported only when a SentencePiece tokenizer is loaded.
"""

import os
from typing import List, Optional, Sequence

from llama.tokenizer import Dialog, check_dialog

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


class SentencePieceTokenizer:
    """Tokenizes and detokenizes text with a SentencePiece model, Llama 2 style: <s> (bos) and </s> (eos)
    are the model's own ids (1 and 2 in Meta's 32000-piece model), there is no pad token (-1), and eos is the
    only stop token."""

    def __init__(self, model_path: str):
        """Load `model_path`. Raises FileNotFoundError, ValueError (not a SentencePiece model) or ImportError."""
        try:
            import sentencepiece
        except ImportError:
            raise ImportError(
                f"{model_path!r} is a SentencePiece tokenizer (Llama 2); reading it needs the sentencepiece "
                "package: pip install sentencepiece"
            ) from None
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer file not found: {model_path!r}")
        try:
            self.model = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path!r} is not a valid SentencePiece model: {e}") from None
        self.n_words: int = self.model.vocab_size()
        self.bos_id: int = self.model.bos_id()
        self.eos_id: int = self.model.eos_id()
        self.pad_id: int = self.model.pad_id()  # -1: generation only ever fills, never reads, pad positions
        self.stop_tokens = {self.eos_id}
        self.special_tokens: dict = {}  # none beyond bos/eos: Llama 3's chat format cannot use this tokenizer

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Encode `s` into token ids, optionally with bos / eos around it (positional, as in Meta's Llama 2)."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        t = self.model.encode(s)
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t: Sequence[int]) -> str:
        return self.model.decode(list(t))

    @property
    def sp_model(self):
        """The SentencePieceProcessor, under the name Meta's Llama 2 Tokenizer gives it."""
        return self.model


class Llama2ChatFormat:
    """Llama 2 chat prompts. A leading system message joins the first user message inside <<SYS>> tags;
    each finished exchange is "[INST] user [/INST] answer " between bos and eos; the last user message is
    "[INST] user [/INST]" after bos, for the model to continue."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def fixed_reply(self, dialog: Dialog) -> Optional[str]:
        """Meta's answer to a dialog whose messages contain the format's own tags (a user could otherwise
        forge turns), given in place of the generated text; None for other dialogs."""
        if any(tag in message["content"] for message in dialog for tag in SPECIAL_TAGS):
            return UNSAFE_ERROR
        return None

    def check_dialog(self, dialog: Dialog) -> None:
        """Raise ValueError unless `dialog` is an optional system message, then user/assistant turns
        alternating, starting and ending with the user (Meta's Llama 2 rule)."""
        check_dialog(dialog)

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """Token ids of a dialog that check_dialog accepts."""
        if dialog[0]["role"] == "system":
            first_user = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
            dialog = [{"role": "user", "content": first_user}, *dialog[2:]]
        tokens: List[int] = []
        for user, answer in zip(dialog[::2], dialog[1::2]):
            text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
            tokens.extend(self.tokenizer.encode(text, bos=True, eos=True))
        last = f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}"
        tokens.extend(self.tokenizer.encode(last, bos=True, eos=False))
        return tokens
