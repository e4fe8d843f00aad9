"""The golden file: a header line, then one record per prompt, as JSON Lines (gzip when the name ends in .gz).

A record holds what one engine did with one prompt:

    {"id": "p0",
     "prompt": {"text": "..."} | {"dialog": [...]} | {"tokens": [...]},   # as the prompts file gave it
     "continuation": "..." | [ids],                                      # only in scoring mode
     "prompt_ids": [...],                                                # the prompt as the engine encoded it
     "greedy": {"ids": [...], "text": "...", "stop_reason": "stop_token" | "length",
                "logprobs": [...], "top_ids": [[...], ...], "top_logprobs": [[...], ...]},
     "scored": {"ids": [...], "logprobs": [...], "top_ids": [...], "top_logprobs": [...]}}

`greedy.ids` are the tokens chosen by greedy decoding after the prompt; when the engine stopped at a stop
token that token is the last id (so a missed or wrong stop shows as a difference). `greedy.logprobs[j]` is
the logprob of ids[j] given the prompt and ids[:j], and top_ids[j] / top_logprobs[j] the k most likely
tokens there, most likely first. `scored` is teacher forcing over ids = prompt_ids + continuation ids: its
lists have one entry per position 1 .. len(ids) - 1 (nothing predicts position 0), so logprobs[i] scores
ids[i + 1]. Logprobs are natural logs rounded to 6 decimals.
"""

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, TextIO, Tuple, Union

FORMAT = "llama-golden"
FORMAT_VERSION = 1
DIGITS = 6  # logprobs are stored rounded: far below every tolerance, and a third of the size of repr()


@dataclass
class Sequence:
    """Token ids with, per position, the logprob of the id there and the k most likely alternatives."""

    ids: List[int]
    logprobs: List[float]
    top_ids: List[List[int]] = field(default_factory=list)  # empty when the engine gave no alternatives
    top_logprobs: List[List[float]] = field(default_factory=list)
    text: Optional[str] = None
    stop_reason: Optional[str] = None  # greedy only: "stop_token" or "length" (None: not known)

    def top(self, j: int) -> Dict[int, float]:
        """Position j's alternatives as {id: logprob} (empty when not recorded)."""
        if j >= len(self.top_ids):
            return {}
        return dict(zip(self.top_ids[j], self.top_logprobs[j]))

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"ids": list(self.ids)}
        if self.text is not None:
            out["text"] = self.text
        if self.stop_reason is not None:
            out["stop_reason"] = self.stop_reason
        out["logprobs"] = [round(float(x), DIGITS) for x in self.logprobs]
        if self.top_ids:
            out["top_ids"] = [list(map(int, row)) for row in self.top_ids]
            out["top_logprobs"] = [[round(float(x), DIGITS) for x in row] for row in self.top_logprobs]
        return out

    @staticmethod
    def from_json(obj: Dict[str, Any], where: str) -> "Sequence":
        if not isinstance(obj, dict) or "ids" not in obj or "logprobs" not in obj:
            raise ValueError(f"{where}: expected an object with 'ids' and 'logprobs', got {_short(obj)}")
        seq = Sequence(
            ids=[int(t) for t in obj["ids"]],
            logprobs=[float(x) for x in obj["logprobs"]],
            top_ids=[[int(t) for t in row] for row in obj.get("top_ids") or []],
            top_logprobs=[[float(x) for x in row] for row in obj.get("top_logprobs") or []],
            text=obj.get("text"),
            stop_reason=obj.get("stop_reason"),
        )
        if len(seq.top_ids) != len(seq.top_logprobs):
            raise ValueError(f"{where}: top_ids and top_logprobs have different lengths")
        return seq


@dataclass
class Record:
    """One prompt and what an engine did with it (see the module docstring for the JSON)."""

    id: str
    prompt: Dict[str, Any]
    prompt_ids: Optional[List[int]] = None  # None: the engine did not say (compare then skips the check)
    greedy: Optional[Sequence] = None
    scored: Optional[Sequence] = None
    continuation: Any = None

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"id": self.id, "prompt": self.prompt}
        if self.continuation is not None:
            out["continuation"] = self.continuation
        if self.prompt_ids is not None:
            out["prompt_ids"] = list(self.prompt_ids)
        if self.greedy is not None:
            out["greedy"] = self.greedy.to_json()
        if self.scored is not None:
            out["scored"] = self.scored.to_json()
        return out

    @staticmethod
    def from_json(obj: Dict[str, Any], where: str) -> "Record":
        if not isinstance(obj, dict) or "id" not in obj:
            raise ValueError(f"{where}: a record needs an 'id', got {_short(obj)}")
        return Record(
            id=str(obj["id"]),
            prompt=obj.get("prompt") or {},
            prompt_ids=[int(t) for t in obj["prompt_ids"]] if obj.get("prompt_ids") is not None else None,
            greedy=Sequence.from_json(obj["greedy"], f"{where} greedy") if obj.get("greedy") else None,
            scored=Sequence.from_json(obj["scored"], f"{where} scored") if obj.get("scored") else None,
            continuation=obj.get("continuation"),
        )


@dataclass
class Golden:
    """A loaded golden file: its header (what produced the numbers) and its records in file order."""

    header: Dict[str, Any]
    records: List[Record]
    path: Optional[str] = None

    def by_id(self) -> Dict[str, Record]:
        return {r.id: r for r in self.records}

    @property
    def dtype(self) -> Optional[str]:
        return self.header.get("dtype")


def open_text(path: Union[str, Path], mode: str) -> TextIO:
    """Open a .jsonl or .jsonl.gz file as text ("r", "w" or "a"). Appending to a .gz adds a gzip member,
    which gzip readers (Python's included) read as one stream."""
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8", newline="\n")
    return open(path, mode, encoding="utf-8", newline="\n")


def read_lines(path: Union[str, Path]) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, object) for each complete JSON line; stops quietly at a cut-off tail (a crash while
    writing: a last line without its newline, or a gzip member without its end)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    with open_text(path, "r") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except (EOFError, gzip.BadGzipFile, OSError):  # a gzip member cut short
                return
            lineno += 1
            if not line:
                return
            if not line.endswith("\n"):
                return
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg}): {line[:80]!r}") from None


def is_golden_header(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_golden(path: Union[str, Path]) -> Golden:
    """Read a golden file written by `record` (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the first line is not a golden header, or a record is malformed.
    """
    lines = read_lines(path)
    first = next(lines, None)
    if first is None or not is_golden_header(first[1]):
        raise ValueError(
            f"{str(path)!r} is not a golden file: its first line should be a header with "
            f"\"format\": \"{FORMAT}\" (other engines' outputs go through llama.golden.formats.load_outputs)"
        )
    header = first[1]
    if header.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has golden format version {header['version']}; this reader knows "
                         f"up to {FORMAT_VERSION}")
    records = [Record.from_json(obj, f"{path}:{n}") for n, obj in lines]
    return Golden(header=header, records=records, path=str(path))


def write_line(f: TextIO, obj: Dict[str, Any]) -> None:
    """One JSON line, flushed so that a crash loses at most the record being written."""
    f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
    f.flush()


def _short(obj: Any) -> str:
    text = json.dumps(obj)[:80] if not isinstance(obj, str) else obj[:80]
    return text
