"""Reading another engine's outputs: a golden file, or JSON Lines in a minimal schema, or OpenAI-style
logprobs. docs/golden.md documents the schemas; in short, one line per prompt, each with the golden
prompt's "id" and either

    minimal:  {"id": "0", "prompt_ids": [...], "ids": [...], "logprobs": [...],
               "top_logprobs": [[[id, logprob], ...], ...], "stop_reason": "stop_token" | "length",
               "scored": {"ids": [...], "logprobs": [...], "top_logprobs": [...]}}
              (only "id" and "ids" are required; scored logprobs has one entry per ids[1:])
    OpenAI:   {"id": "0", "response": <a chat or completions response, or one of its choices>}
              or {"id": "0", "logprobs": {"content": [{"token", "logprob", "top_logprobs": [...]}]}}
              or the completions form {"logprobs": {"tokens", "token_logprobs", "top_logprobs"}}

An optional first line {"header": {"dtype": "bfloat16", "engine": "..."}} gives the dtype that picks the
default tolerances. OpenAI-style records name tokens by their text, so reading them needs the tokenizer:
"bytes" (as OpenAI gives them) are matched exactly; a text alone is mapped to the first id that decodes to
it (a token that is not whole UTF-8 may then map to another such token, and the comparison shows it).
"""

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from llama.golden.schema import Golden, Record, Sequence, is_golden_header, load_golden, read_lines

Decoder = Callable[[List[int]], str]


class TokenIds:
    """Token text (or bytes) -> id, from a tokenizer (the table is built once, on first use).

    With `token_bytes` (id -> the token's bytes, e.g. tiktoken's decode_single_token_bytes), records that
    carry OpenAI's "bytes" are matched exactly; texts are matched to the first id that decodes to them.
    """

    def __init__(self, decode: Decoder, n_words: int, token_bytes: Optional[Callable[[int], bytes]] = None):
        self.decode, self.n_words, self.token_bytes = decode, n_words, token_bytes
        self._by_text: Optional[Dict[str, int]] = None
        self._by_bytes: Dict[bytes, int] = {}

    def _build(self) -> None:
        self._by_text = {}
        for i in range(self.n_words):
            self._by_text.setdefault(self.decode([i]), i)
            if self.token_bytes is not None:
                self._by_bytes.setdefault(self.token_bytes(i), i)

    def __call__(self, token: Union[str, bytes]) -> int:
        if self._by_text is None:
            self._build()
        if isinstance(token, bytes):
            if self._by_bytes:
                return self._by_bytes.get(token, -1)
            token = token.decode("utf-8", errors="replace")
        return self._by_text.get(token, -1)  # -1: no such token; never equal to a real id


def load_outputs(path: Union[str, Path], token_ids: Optional[Callable[[Union[str, bytes]], int]] = None) -> Golden:
    """Another engine's outputs in any of the accepted forms (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line in none of the forms, naming the line; OpenAI-style records without a tokenizer.
    """
    lines = list(read_lines(path))
    if lines and is_golden_header(lines[0][1]):
        return load_golden(path)
    header: Dict[str, Any] = {}
    records = []
    for n, obj in lines:
        where = f"{path}:{n}"
        if isinstance(obj, dict) and set(obj) == {"header"}:
            header = dict(obj["header"])
            continue
        records.append(parse_output(obj, where, token_ids))
    if not records:
        raise ValueError(f"{str(path)!r} holds no records")
    return Golden(header=header, records=records, path=str(path))


def parse_output(obj: Any, where: str, token_ids: Optional[Callable[[Union[str, bytes]], int]] = None
                 ) -> Record:
    """One line of another engine's outputs as a Record."""
    if not isinstance(obj, dict) or "id" not in obj:
        raise ValueError(f"{where}: each line needs the golden prompt's \"id\", got {str(obj)[:80]!r}")
    if "greedy" in obj or "scored" in obj and "ids" not in obj:  # our own record schema
        return Record.from_json(obj, where)
    if "ids" in obj:
        return _minimal(obj, where)
    if "response" in obj or "logprobs" in obj:
        if token_ids is None:
            raise ValueError(f"{where}: OpenAI-style records name tokens by their text: give the tokenizer "
                             f"(--tokenizer) to map them to ids")
        return _openai(obj, where, token_ids)
    raise ValueError(f"{where}: not a record: expected \"ids\" (minimal schema), \"logprobs\" or \"response\" "
                     f"(OpenAI style), or \"greedy\" (golden record); got keys {sorted(obj)}")


def _pairs(rows: Any, where: str):
    """[[[id, lp], ...], ...] -> (top_ids, top_logprobs)."""
    ids, lps = [], []
    for row in rows or []:
        try:
            ids.append([int(t) for t, _ in row])
            lps.append([float(lp) for _, lp in row])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: top_logprobs must be lists of [id, logprob] pairs, got {str(row)[:80]}")
    return ids, lps


def _minimal(obj: Dict[str, Any], where: str) -> Record:
    top_ids, top_lps = _pairs(obj.get("top_logprobs"), where)
    greedy = Sequence(ids=[int(t) for t in obj["ids"]], logprobs=[float(x) for x in obj.get("logprobs") or []],
                      top_ids=top_ids, top_logprobs=top_lps, stop_reason=obj.get("stop_reason"))
    scored = None
    if obj.get("scored"):
        s = obj["scored"]
        s_ids, s_lps = _pairs(s.get("top_logprobs"), where)
        scored = Sequence(ids=[int(t) for t in s["ids"]], logprobs=[float(x) for x in s.get("logprobs") or []],
                          top_ids=s_ids, top_logprobs=s_lps)
    prompt_ids = [int(t) for t in obj["prompt_ids"]] if obj.get("prompt_ids") is not None else None
    return Record(id=str(obj["id"]), prompt={}, prompt_ids=prompt_ids, greedy=greedy, scored=scored)


def _openai(obj: Dict[str, Any], where: str, token_ids: Callable[[Union[str, bytes]], int]) -> Record:
    body = obj.get("response", obj)
    finish = None
    if isinstance(body, dict) and body.get("choices"):
        body = body["choices"][0]
    if isinstance(body, dict):
        finish = body.get("finish_reason")
    logprobs = body.get("logprobs") if isinstance(body, dict) else None
    if not isinstance(logprobs, dict):
        raise ValueError(f"{where}: no \"logprobs\" object in the OpenAI-style record")
    ids: List[int] = []
    lps: List[float] = []
    top_ids: List[List[int]] = []
    top_lps: List[List[float]] = []
    if "content" in logprobs:  # chat completions: a list of {token, logprob, bytes, top_logprobs}
        for entry in logprobs["content"] or []:
            ids.append(token_ids(_text(entry)))
            lps.append(float(entry["logprob"]))
            alts = entry.get("top_logprobs") or []
            top_ids.append([token_ids(_text(a)) for a in alts])
            top_lps.append([float(a["logprob"]) for a in alts])
    elif "tokens" in logprobs:  # legacy completions: parallel lists, top_logprobs as {text: logprob}
        ids = [token_ids(t) for t in logprobs["tokens"]]
        lps = [float(x) for x in logprobs.get("token_logprobs") or []]
        for alts in logprobs.get("top_logprobs") or []:
            ordered = sorted((alts or {}).items(), key=lambda kv: -kv[1])
            top_ids.append([token_ids(t) for t, _ in ordered])
            top_lps.append([float(lp) for _, lp in ordered])
    else:
        raise ValueError(f"{where}: \"logprobs\" has neither \"content\" nor \"tokens\"")
    reason = {"stop": "stop_token", "length": "length"}.get(finish or "")
    greedy = Sequence(ids=ids, logprobs=lps, top_ids=top_ids, top_logprobs=top_lps, stop_reason=reason)
    return Record(id=str(obj["id"]), prompt={}, prompt_ids=None, greedy=greedy)


def _text(entry: Dict[str, Any]) -> Union[str, bytes]:
    """A token's bytes when given (OpenAI gives them: a token need not be whole UTF-8), else its text."""
    if entry.get("bytes") is not None:
        return bytes(entry["bytes"])
    return entry["token"]
