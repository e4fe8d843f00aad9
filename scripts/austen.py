"""Jane Austen's six novels, read from the Debian package r-cran-janeaustenr without R.

The package stores the novels as an R "lazy-load database" (data/Rdata.rdb): one record per novel, each a
4-byte big-endian length followed by a zlib stream holding an R-serialised character vector, one string per
line of the book. Reading that needs a few lines of Python, not R. The novels are in the public domain; the
package is MIT-licensed (Julia Silge).

Get it on any Debian or Ubuntu machine, without root and without installing R:

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb corpus
    # the file is then corpus/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb
"""

import hashlib
import struct
import zlib
from pathlib import Path
from typing import List, Tuple

INSTALLED_PATH = "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"  # after apt-get install
EXTRACTED_PATH = "corpus/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"  # after the two commands above
# Rdata.rdb of r-cran-janeaustenr 1.0.0-1 (Debian 12), the file the demo model was trained on.
RDATA_SHA256 = "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21"

GET_CORPUS = "apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb corpus"

STRSXP, CHARSXP = 16, 9  # R's type codes for a character vector and for one string in it


def find_rdata(path: str = "") -> Path:
    """`path` if given, else the installed or extracted package file. Raises FileNotFoundError."""
    candidates = [path] if path else [EXTRACTED_PATH, INSTALLED_PATH]
    for candidate in candidates:
        if Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        f"Jane Austen corpus not found (looked for {candidates}). Get it with:\n    {GET_CORPUS}"
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unserialize_strings(data: bytes, source: str) -> List[str]:
    """Decode an R-serialised character vector (XDR format, version 2 or 3)."""
    if data[:2] != b"X\n":
        raise ValueError(f"{source}: not an R XDR serialisation (starts {data[:2]!r})")
    pos = 2
    version = struct.unpack_from(">i", data, pos)[0]
    pos += 12  # format version, the writer's R version, the oldest R version that can read it
    if version == 3:
        (encoding_len,) = struct.unpack_from(">i", data, pos)
        pos += 4 + encoding_len  # the native encoding's name
    flags, length = struct.unpack_from(">ii", data, pos)
    pos += 8
    if flags & 0xFF != STRSXP:
        raise ValueError(f"{source}: expected a character vector (type {STRSXP}), found type {flags & 0xFF}")
    lines = []
    for _ in range(length):
        flags, n = struct.unpack_from(">ii", data, pos)
        pos += 8
        if flags & 0xFF != CHARSXP:
            raise ValueError(f"{source}: expected a string (type {CHARSXP}), found type {flags & 0xFF}")
        if n == -1:  # NA_character_
            lines.append("")
            continue
        lines.append(data[pos : pos + n].decode("utf-8"))
        pos += n
    return lines


def read_novels(path: Path) -> List[Tuple[str, str]]:
    """(title, text) of each novel in file order (alphabetical: Emma ... Sense and Sensibility)."""
    blob = path.read_bytes()
    novels = []
    pos = 0
    while pos < len(blob):
        (size,) = struct.unpack_from(">I", blob, pos)
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(blob[pos + 4 :])
        except zlib.error as e:
            raise ValueError(f"{path}: record at byte {pos} is not zlib data ({e})") from None
        if len(data) != size or not inflater.eof:
            raise ValueError(f"{path}: record at byte {pos} is truncated")
        lines = _unserialize_strings(data, f"{path} record at byte {pos}")
        text = "\n".join(lines).strip() + "\n"
        title = next(line for line in lines if line.strip()).strip().title()
        novels.append((title, text))
        pos = len(blob) - len(inflater.unused_data)
    return novels


def paragraphs(text: str) -> List[str]:
    """Paragraphs of a novel, each on one line (the book's line breaks are only for width)."""
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def is_pure_speech(paragraph: str) -> bool:
    """A paragraph that is one quotation and nothing else: "...", with no narration around it."""
    return (
        len(paragraph) > 2
        and paragraph[0] == '"'
        and paragraph[-1] == '"'
        and paragraph.count('"') == 2
    )


def conversations(text: str, max_turns: int = 4) -> List[List[str]]:
    """Runs of consecutive pure-speech paragraphs (quotes removed), cut into conversations of 2..max_turns
    turns. In the novels such a run is mostly two people answering each other."""
    result: List[List[str]] = []
    run: List[str] = []
    for p in paragraphs(text) + [""]:
        if is_pure_speech(p):
            run.append(p[1:-1].strip())
            continue
        for start in range(0, len(run) - 1, max_turns):
            piece = run[start : start + max_turns]
            if len(piece) >= 2:
                result.append(piece)
        run = []
    return result


def split_holdout(text: str, fraction: float) -> Tuple[str, str]:
    """(train, held_out): the last `fraction` of the novel, cut at a paragraph break, is held out."""
    cut = text.find("\n\n", int(len(text) * (1 - fraction)))
    cut = len(text) if cut == -1 else cut
    return text[:cut], text[cut:].lstrip("\n")


if __name__ == "__main__":
    rdata = find_rdata()
    print(rdata, sha256(rdata) == RDATA_SHA256)
    for title, text in read_novels(rdata):
        convs = conversations(text)
        print(f"{title:25s} {len(text):9,d} chars, {len(convs):5d} conversations, e.g. {convs[3]}")
