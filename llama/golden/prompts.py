"""The prompts file: JSON Lines, one prompt per line, each one of

    {"prompt": "text"}                                  # encoded with <|begin_of_text|>, as text_completion does
    {"dialog": [{"role": "user", "content": "..."}]}    # encoded in the chat format, as chat_completion does
    {"tokens": [128000, 791, ...]}                      # token ids, used as given

with an optional "id" (default: the line's index among the prompts, "0", "1", ...) and an optional
"continuation" (text, encoded without <|begin_of_text|>, or a list of ids) to score by teacher forcing after
the prompt. Blank lines and lines starting with # are skipped.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

KINDS = ("prompt", "dialog", "tokens")


@dataclass
class Prompt:
    """One prompt of a prompts file (or of a golden file's records)."""

    id: str
    kind: str  # "text", "dialog" or "tokens"
    value: Any  # the text, the list of messages, or the list of ids
    continuation: Union[str, List[int], None] = None

    def as_json(self) -> Dict[str, Any]:
        """How a golden record stores the prompt: {"text": ...} | {"dialog": ...} | {"tokens": ...}."""
        return {self.kind: self.value}

    @staticmethod
    def from_record(record_id: str, prompt: Dict[str, Any], continuation: Any = None) -> "Prompt":
        """The prompt a golden record was made from."""
        if not isinstance(prompt, dict) or len(prompt) != 1 or next(iter(prompt)) not in ("text", "dialog", "tokens"):
            raise ValueError(f"record {record_id!r}: 'prompt' must be one of {{text|dialog|tokens: ...}}, "
                             f"got {prompt!r:.80}")
        kind, value = next(iter(prompt.items()))
        return Prompt(record_id, kind, value, continuation)


def parse_prompt(obj: Any, index: int, where: str) -> Prompt:
    """Check one line of a prompts file and return it as a Prompt; ValueError names the line and problem."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    given = [k for k in KINDS if k in obj]
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of {list(KINDS)}, got keys {sorted(obj)}")
    unknown = sorted(set(obj) - set(KINDS) - {"id", "continuation"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {list(KINDS) + ['id', 'continuation']}")
    key = given[0]
    value = obj[key]
    if key == "prompt" and not isinstance(value, str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {value!r:.80}")
    if key == "dialog":
        ok = isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
        if not ok:
            raise ValueError(f"{where}: 'dialog' must be a non-empty list of {{role, content}} strings, "
                             f"got {value!r:.80}")
    if key == "tokens":
        if not isinstance(value, list) or not value or not all(_is_id(t) for t in value):
            raise ValueError(f"{where}: 'tokens' must be a non-empty list of token ids, got {value!r:.80}")
    continuation = obj.get("continuation")
    if continuation is not None:
        ok = (isinstance(continuation, str) and continuation) or (
            isinstance(continuation, list) and continuation and all(_is_id(t) for t in continuation))
        if not ok:
            raise ValueError(f"{where}: 'continuation' must be a non-empty string or list of token ids, "
                             f"got {continuation!r:.80}")
    prompt_id = obj.get("id", str(index))
    if not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool):
        raise ValueError(f"{where}: 'id' must be a string, got {prompt_id!r}")
    return Prompt(str(prompt_id), "text" if key == "prompt" else key, value, continuation)


def read_prompts(path: Union[str, Path]) -> List[Prompt]:
    """All prompts of a prompts file, checked before any model is loaded.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not JSON or not a prompt, a repeated id, or no prompts at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file {str(path)!r}")
    prompts: List[Prompt] = []
    seen: Dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg}): {line[:80]!r}") from None
        prompt = parse_prompt(obj, len(prompts), where)
        if prompt.id in seen:
            raise ValueError(f"{where}: id {prompt.id!r} was already used on line {seen[prompt.id]}")
        seen[prompt.id] = lineno
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{str(path)!r} holds no prompts")
    return prompts


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def prompt_key(prompt: Prompt) -> Optional[str]:
    """A canonical string of what the prompt asks, to tell on resume whether a record is for this prompt."""
    return json.dumps([prompt.as_json(), prompt.continuation], sort_keys=True, ensure_ascii=False)
