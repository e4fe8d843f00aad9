"""The engine's fast decode step: every running sequence feeds one token, attention reads the paged cache in
place (llama.serve.paged_attention), and on CUDA the whole step is replayed from a CUDA graph.

A decode step of the simple path (llama.serve.forward.paged_forward) costs, per layer, a gather of every
sequence's blocks and a masked attention whose shapes change with every step, and about a thousand kernel
launches from Python per step: at the 8B shape on a GPU the host, not the device, sets the pace. Here a
step's shapes depend only on the number of rows, rounded up to a bucket (1, 2, 4, 8, then multiples of 8)
with padding rows that write nothing and read nothing; the block tables are padded to one width (the blocks
of max_seq_len positions). So each bucket's step is captured once as a CUDA graph and replayed: one launch a
step, its inputs copied in as one small tensor.

StepForward is what the engine calls: decode-only steps go here, steps with prefill chunks to paged_forward.
"""

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

from llama.fast.layers import FastAttention
from llama.model import Transformer, apply_rotary_emb
from llama.serve.forward import Chunk, paged_forward, project_qkv
from llama.serve.kv_cache import PagedKVCache
from llama.serve.paged_attention import decode_attention, has_triton_kernels, write_kv

# How a step runs: "simple" (paged_forward: gather + SDPA), "kernel" (this file's step, eager), "graphs"
# (this file's step replayed from CUDA graphs), or "auto" (graphs on CUDA with Triton, else simple).
DECODE_MODES = ("auto", "simple", "kernel", "graphs")

# Columns of a step's input rows: token, position, slot of the position, length (position + 1), then the
# block table.
TOKEN, POSITION, SLOT, LENGTH, TABLE = 0, 1, 2, 3, 4


def bucket(n_rows: int) -> int:
    """The batch size a step of n_rows runs at: 1, 2, 4, 8, then the next multiple of 8."""
    if n_rows <= 8:
        return 1 << (n_rows - 1).bit_length()
    return 8 * math.ceil(n_rows / 8)


def rotated_qkv(attention: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Queries and keys rotated to their rows' positions, and values, each (B, heads, head_dim), of x
    (1, B, dim). The fast layers' fused product is rotated in one go, queries and keys together (views into
    it: the kernels take row strides)."""
    if isinstance(attention, FastAttention):
        n_q, n_kv = attention.n_local_heads, attention.n_local_kv_heads
        xqkv = attention.wqkv(x).view(x.shape[1], n_q + 2 * n_kv, attention.head_dim)
        xqk = apply_rotary_emb(xqkv[None, :, : n_q + n_kv], cos, sin)[0]
        return xqk[:, :n_q], xqk[:, n_q:], xqkv[:, n_q + n_kv :]
    xq, xk, xv = project_qkv(attention, x)  # (1, B, heads, head_dim) each
    return apply_rotary_emb(xq, cos, sin)[0], apply_rotary_emb(xk, cos, sin)[0], xv[0]


def decode_forward(model: Transformer, cache: PagedKVCache, rows: torch.Tensor, use_triton: bool) -> torch.Tensor:
    """One decode step over `rows` (B, 4 + width) (columns TOKEN .. TABLE; padding rows have slot -1 and
    length 0): appends each row's token to its blocks, returns float32 next-token logits (B, vocab_size).

    The layers are the model's own (fast or reference), as in paged_forward; only the attention differs.
    """
    tokens, positions, slots, lengths = rows[:, TOKEN], rows[:, POSITION], rows[:, SLOT], rows[:, LENGTH]
    tables = rows[:, TABLE:]  # (B, width)
    cos = model.rope_cos[positions]  # (B, head_dim)
    sin = model.rope_sin[positions]
    h = model.tok_embeddings(tokens[None])  # (1, B, dim)
    for i, layer in enumerate(model.layers):
        attention = layer.attention
        xq, xk, xv = rotated_qkv(attention, layer.attention_norm(h), cos, sin)  # (B, heads, head_dim) each
        write_kv(cache.keys[i], cache.values[i], xk, xv, slots, use_triton)
        out = decode_attention(xq, cache.keys[i], cache.values[i], tables, lengths, cache.block_size, use_triton)
        h = h + attention.wo(out.reshape(1, out.shape[0], -1))  # out: (B, n_heads, head_dim)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h))[0].float()  # (B, vocab_size)


class DecodeRunner:
    """Runs decode steps through decode_forward at bucketed batch sizes, from CUDA graphs when `graphs`.

    The input rows of every bucket live in one device buffer (max_rows, 4 + width); a bucket of B rows reads
    its first B rows. Graphs are captured the first time a bucket is used (or ahead, with `capture`).
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, max_rows: int, use_triton: bool, graphs: bool):
        if graphs and not (use_triton and model.rope_cos.device.type == "cuda"):
            raise ValueError("CUDA graphs need a CUDA device and the Triton kernels (write_kv has no "
                             "graph-safe torch form)")
        self.model, self.cache = model, cache
        self.use_triton, self.graphs = use_triton, graphs
        self.device = model.rope_cos.device
        self.width = math.ceil(model.params.max_seq_len / cache.block_size)
        self.max_rows = bucket(max_rows)
        self.buffer = torch.zeros((self.max_rows, TABLE + self.width), dtype=torch.long, device=self.device)
        # The rows are written on the host, then copied in one go. A row's block table changes only when its
        # sequence takes a block or another sequence takes its row: those rows alone are rewritten.
        pin = self.device.type == "cuda"
        self.host = torch.zeros((self.max_rows, TABLE + self.width), dtype=torch.long, pin_memory=pin)
        self.host_rows = self.host.numpy()  # the same memory: numpy takes Python lists far faster
        self.host_tables: List[Optional[List[int]]] = [None] * self.max_rows  # the table each host row holds
        self.copied = torch.cuda.Event() if pin else None  # the last copy out of the host rows
        self.captured: Dict[int, Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _fill(self, chunks: List[Chunk]) -> int:
        """Copy the chunks' rows (and padding rows up to the bucket) into the buffer; returns the bucket."""
        n = bucket(len(chunks))
        bs, rows, tables = self.cache.block_size, self.host_rows, self.host_tables
        if self.copied is not None:
            self.copied.synchronize()  # (done long ago in the engine, which reads each step's tokens back)
        scalars = []
        for r, c in enumerate(chunks):
            p = c.start  # the position of the row's one new token
            scalars.append((c.tokens[0], p, c.table[p // bs] * bs + p % bs, p + 1))
            if tables[r] != c.table:
                # (Entries past the table's end may be stale: they lie past the row's length, never read.)
                rows[r, TABLE : TABLE + len(c.table)] = c.table
                tables[r] = list(c.table)
        scalars.extend([(0, 0, -1, 0)] * (n - len(chunks)))  # padding rows: write nothing, read nothing
        rows[:n, :TABLE] = scalars
        self.buffer[:n].copy_(self.host[:n], non_blocking=self.copied is not None)
        if self.copied is not None:
            self.copied.record()
        return n

    def _run(self, n: int) -> torch.Tensor:
        return decode_forward(self.model, self.cache, self.buffer[:n], self.use_triton)

    def _capture(self, n: int) -> None:
        # Padding rows throughout while capturing: the warm-up run (which compiles the Triton kernels and
        # lets cuBLAS pick its kernels outside the capture) writes nothing to the cache.
        self.buffer[:n] = 0
        self.buffer[:n, SLOT] = -1
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._run(n)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine may run on a thread of its own (AsyncEngine) while others do other work
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._run(n)
        self.captured[n] = (graph, logits)

    @torch.inference_mode()
    def capture(self, n_rows: List[int]) -> None:
        """Capture the graphs of the buckets of these batch sizes now (a step would, the first time)."""
        for n in sorted({bucket(k) for k in n_rows}, reverse=True):
            if self.graphs and n not in self.captured:
                self._capture(n)

    @torch.inference_mode()
    def __call__(self, chunks: List[Chunk]) -> torch.Tensor:
        """(len(chunks), vocab_size) float32 logits; every chunk holds one token."""
        if len(chunks) > self.max_rows:
            raise ValueError(f"a decode step of {len(chunks)} rows, more than the {self.max_rows} prepared for")
        if not self.graphs:
            return self._run(self._fill(chunks))[: len(chunks)]
        n = bucket(len(chunks))
        if n not in self.captured:
            self._capture(n)
        self._fill(chunks)
        graph, logits = self.captured[n]
        graph.replay()
        return logits[: len(chunks)].clone()  # the next replay overwrites the graph's output


class StepForward:
    """The engine's forward: `(chunks) -> (len(chunks), vocab_size) float32 logits` at each chunk's last token.

    mode (DECODE_MODES): decode-only steps run through a DecodeRunner ("kernel": eager; "graphs": CUDA
    graphs) or, like every step with a prefill chunk, through paged_forward ("simple"). "auto" picks
    "graphs" on CUDA where Triton is installed, "simple" elsewhere (on the CPU the simple path is the faster).
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, max_rows: int, mode: str = "auto"):
        if mode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {mode!r}")
        device = model.rope_cos.device
        triton_ok = has_triton_kernels(device)
        if mode == "auto":
            mode = "graphs" if device.type == "cuda" and triton_ok else "simple"
        self.model, self.cache, self.mode = model, cache, mode
        self.runner: Optional[DecodeRunner] = None
        if mode != "simple":
            self.runner = DecodeRunner(model, cache, max_rows, use_triton=triton_ok, graphs=mode == "graphs")

    def __call__(self, chunks: List[Chunk]) -> torch.Tensor:
        if self.runner is not None and all(len(c.tokens) == 1 for c in chunks):
            return self.runner(chunks)
        return paged_forward(self.model, self.cache, chunks)
