"""Train a byte-level BPE vocabulary and write it as a tiktoken file in Meta's tokenizer.model format.

Byte-level BPE, the scheme behind Llama 3's tokenizer: text is cut into chunks by Meta's split pattern
(words with their leading space, numbers of up to three digits, punctuation runs, whitespace), each chunk is
a sequence of bytes, and training repeatedly fuses the most frequent adjacent pair of tokens into a new
token. Merges never cross chunk boundaries. The file lists every token (the 256 single bytes, then one per
merge) as "base64(token) rank"; tiktoken encodes by fusing, within each chunk, the pair whose fused bytes
have the lowest rank, which replays the merges in training order.

    python scripts/train_bpe.py --corpus FILE.txt --vocab_size 4096 --out tokenizer.model
"""

import base64
import heapq
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Set, Tuple

import regex  # the `regex` module: Meta's pattern needs \p{L} and \p{N}

Pair = Tuple[int, int]


def count_chunks(texts: Iterable[str], pat_str: str) -> Counter:
    """How often each pre-tokenised chunk (as UTF-8 bytes) occurs in `texts`."""
    pattern = regex.compile(pat_str)
    counts: Counter = Counter()
    for text in texts:
        counts.update(m.encode("utf-8") for m in pattern.findall(text))
    return counts


def train_bpe(chunk_counts: Dict[bytes, int], vocab_size: int, verbose: bool = True) -> List[bytes]:
    """The vocabulary in rank order: the 256 single bytes, then `vocab_size - 256` merged tokens.

    Each step fuses the most frequent adjacent pair (ties: the pair with the smaller token ids, so training
    is deterministic). Pair counts are updated only in the chunks that hold the fused pair, and a heap with
    lazy deletion finds the most frequent pair, so a few thousand merges take seconds, not hours.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the single bytes), got {vocab_size}")
    vocab: List[bytes] = [bytes([b]) for b in range(256)]
    words: List[List[int]] = [list(chunk) for chunk in chunk_counts]  # each chunk as token ids
    freqs: List[int] = list(chunk_counts.values())

    pair_counts: Counter = Counter()
    where: Dict[Pair, Set[int]] = defaultdict(set)  # pair -> chunks that hold it (may be stale)
    for w, (ids, freq) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += freq
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale entry: the count changed after it was pushed
        if -neg_count < 2:
            break  # nothing left that occurs twice: more merges would only memorise single chunks
        new_id = len(vocab)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        changed: Set[Pair] = set()
        for w in where.pop(pair):
            ids, freq = words[w], freqs[w]
            merged = _merge(ids, pair, new_id)
            if len(merged) == len(ids):
                continue  # a stale index entry: this chunk no longer holds the pair
            for old in zip(ids, ids[1:]):
                pair_counts[old] -= freq
                changed.add(old)
            for new in zip(merged, merged[1:]):
                pair_counts[new] += freq
                where[new].add(w)
                changed.add(new)
            words[w] = merged
        for p in changed:
            count = pair_counts[p]
            if count <= 0:
                del pair_counts[p]
            elif p != pair:
                heapq.heappush(heap, (-count, p))
        pair_counts.pop(pair, None)
        if verbose and (new_id - 255) % 500 == 0:
            print(f"  merge {new_id - 255:5d}: {vocab[new_id]!r} ({-neg_count} times)", flush=True)
    return vocab


def _merge(ids: List[int], pair: Pair, new_id: int) -> List[int]:
    """`ids` with every non-overlapping occurrence of `pair`, left to right, replaced by `new_id`."""
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def write_tiktoken_file(vocab: List[bytes], path: str) -> None:
    """Write Meta's tokenizer.model format: one "base64(token) rank" line per token."""
    if len(set(vocab)) != len(vocab):
        raise ValueError("the vocabulary holds the same token twice")
    with open(path, "w") as f:
        for rank, token in enumerate(vocab):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


def main(corpus: str, out: str, vocab_size: int = 4096) -> None:
    """Train on the UTF-8 text file `corpus` and write the tiktoken file `out`."""
    from llama.tokenizer import PAT_STR

    with open(corpus, encoding="utf-8") as f:
        counts = count_chunks([f.read()], PAT_STR)
    vocab = train_bpe(counts, vocab_size)
    write_tiktoken_file(vocab, out)
    print(f"wrote {len(vocab)} tokens to {out}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
