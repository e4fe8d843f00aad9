"""The decode attention kernel with the step's rotary embedding and cache writes folded in
(llama.fast.decode_attention.decode_attention_rotary, LLAMA_DECODE_ATTENTION_ROTARY): the caches it writes are
bit for bit those of the layer's own path (apply_rotary_emb, then the index writes), everything else in them
untouched; its output is within the float64 bound of tests/test_decode_attention.py over the rotated query and
those caches; the rotation agrees with Meta's complex-number form; the layer hands it one-row decode steps only;
compiled steps (inductor on the CPU, CUDA graphs on a GPU) give the unfolded step's numbers."""

import pytest
import torch

from llama.fast import decode_attention as A
from llama.fast import decode_attention_kernels as AK
from llama.fast.int8_gemv_kernels import pdl_supported
from llama.fast.layers import FastAttention, use_fast_layers
from llama.fast.step import DecodeStep
from llama.model import apply_rotary_emb, interleave_rope

from helpers import SMALL_GQA
from test_decode_attention import (HEADS, assert_within, attention_bound, dependent_runs_match_plain_ones,
                                   needs_kernel, needs_pdl, steps_with_and_without)

THETA = 500000.0


def rope_tables(positions: torch.Tensor, head_dim: int):
    """interleave_rope's tables (bsz, head_dim) float32 at each row's position (Llama 3's theta, no scaling),
    and the angles (bsz, head_dim // 2) in float64 for the complex-number check."""
    freqs = 1.0 / THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double().cpu()[:, None] * freqs[None, :]  # (bsz, head_dim // 2)
    cos, sin = interleave_rope(torch.cos(angles).float(), torch.sin(angles).float())
    return cos.to(positions.device), sin.to(positions.device), angles


def random_step(bsz: int, heads: tuple, max_seq: int, dtype: torch.dtype, seed: int, device: str, positions):
    """A decode step's inputs: the new query xq (bsz, n_heads, head_dim), key xk and value xv
    (bsz, n_kv_heads, head_dim), not rotated, as views of one (bsz, n_heads + 2 n_kv_heads, head_dim) tensor
    (as the layer hands them over); caches (bsz + 1, n_kv_heads, max_seq, head_dim) random everywhere, also at
    the positions the step writes (a kernel that read the old entry there would be far off); positions (bsz,);
    the tables cos, sin (bsz, head_dim)."""
    n_heads, n_kv_heads, head_dim = heads
    g = torch.Generator().manual_seed(seed)
    to = dict(device=device, dtype=dtype)
    xnew = torch.randn(bsz, n_heads + 2 * n_kv_heads, head_dim, generator=g).to(**to)
    xq, xk, xv = xnew[:, :n_heads], xnew[:, n_heads: n_heads + n_kv_heads], xnew[:, n_heads + n_kv_heads:]
    cache_k = torch.randn(bsz + 1, n_kv_heads, max_seq, head_dim, generator=g).to(**to)
    cache_v = torch.randn(bsz + 1, n_kv_heads, max_seq, head_dim, generator=g).to(**to)
    pos = torch.tensor(positions, device=device)
    cos, sin = rope_tables(pos, head_dim)[:2]
    return xq, xk, xv, cos, sin, cache_k, cache_v, pos


def layer_path(xq, xk, xv, cos, sin, cache_k, cache_v, positions):
    """What the fast layer does without the fold (llama.fast.layers.FastAttention._attend): the query and key
    rotated by apply_rotary_emb, the new key and value written by index to copies of the caches. Returns the
    rotated query and the caches after the writes."""
    bsz, n_heads, _ = xq.shape
    xqk = apply_rotary_emb(torch.cat([xq, xk], dim=1)[:, None], cos[:, None], sin[:, None])[:, 0]
    cache_k, cache_v = cache_k.clone(), cache_v.clone()
    rows = torch.arange(bsz, device=xq.device)
    cache_k[rows, :, positions] = xqk[:, n_heads:]
    cache_v[rows, :, positions] = xv
    return xqk[:, :n_heads], cache_k, cache_v


def check_rotary_launch(dtype: torch.dtype, heads: tuple, device: str, cases, configs) -> None:
    """For each case (kv_len, max_seq, positions) and block shape: launch with `rotary` on copies of random
    caches, the output poisoned first. The caches afterwards must equal layer_path's bit for bit, and the output
    must lie within attention_bound of the attention of layer_path's rotated query over them. (Also run by
    hand under Triton's interpreter on the CPU, float32: bf16 there is truncated, not rounded.)"""
    seed = 40
    for kv_len, max_seq, positions in cases:
        seed += 1
        xq, xk, xv, cos, sin, cache_k, cache_v, pos = random_step(len(positions), heads, max_seq, dtype, seed,
                                                                  device, positions)
        q, want_k, want_v = layer_path(xq, xk, xv, cos, sin, cache_k, cache_v, pos)
        exact, bound = attention_bound(q, want_k, want_v, pos, kv_len, dtype)
        for cfg in configs:
            if kv_len > cfg.block_n * AK.MAX_BLOCKS:
                continue
            got_k, got_v = cache_k.clone(), cache_v.clone()
            out = torch.full_like(xq, float("nan"))
            AK.launch(xq, got_k, got_v, pos, kv_len, cfg, out=out, rotary=AK.Rotary(cos, sin, xk, xv))
            assert torch.equal(got_k, want_k), f"{cfg}: the keys in the cache"
            assert torch.equal(got_v, want_v), f"{cfg}: the values in the cache"
            assert_within(out, exact, bound)


# ---- the CPU: the op's torch reference, the layer's dispatch, a compiled step ----------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_off_cuda_writes_the_layers_caches_and_attends_within_its_bound(dtype):
    heads = (8, 2, 16)
    xq, xk, xv, cos, sin, cache_k, cache_v, pos = random_step(3, heads, 40, dtype, 1, "cpu", [39, 0, 17])
    q, want_k, want_v = layer_path(xq, xk, xv, cos, sin, cache_k, cache_v, pos)
    out = A.decode_attention_rotary(xq, xk, xv, cos, sin, cache_k, cache_v, pos, 40, 16, 4)  # writes in place
    assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v)
    assert out.shape == xq.shape and out.dtype == dtype
    assert_within(out, *attention_bound(q, want_k, want_v, pos, 40, dtype))


def test_rotation_agrees_with_the_complex_number_form():
    """apply_rotary_emb on interleave_rope's tables (the layer's rotation, which the kernel repeats) against
    Meta's form, the pairs (2i, 2i + 1) as complex numbers times e^(i angle), in float64: within float32
    rounding, at a small and a large position."""
    positions = torch.tensor([7, 3000])
    cos, sin, angles = rope_tables(positions, 64)  # angles (bsz, 32)
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2))  # (bsz, heads, head_dim)
    got = apply_rotary_emb(x[:, None], cos[:, None], sin[:, None])[:, 0]
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())  # (bsz, heads, 32)
    want = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)
    assert (got.double() - want).abs().max().item() < 1e-5 * want.abs().max().item()


class Recording(A.DecodeAttention):
    """A DecodeAttention (rotary) that records each call's kind and computes the op's torch reference."""

    def __init__(self):
        super().__init__(AK.AttentionConfig(16, 4), rotary=True)
        self.calls = []

    def __call__(self, q, cache_k, cache_v, positions, kv_len):
        self.calls.append(("attention", q.shape[0]))
        return A.decode_attention_reference(q, cache_k, cache_v, positions, kv_len)

    def with_rotary(self, xq, xk, xv, cos, sin, cache_k, cache_v, positions, kv_len):
        self.calls.append(("rotary", xq.shape[0]))
        return A.rotary_attention_reference(xq, xk, xv, cos, sin, cache_k, cache_v, positions, kv_len)


def test_fast_layer_hands_one_row_decode_steps_its_rotation_and_cache_writes(tiny_llama):
    """With a rotary DecodeAttention given, a one-row decode step's layers call with_rotary only (no separate
    write, no plain call) and leave the caches and the logits as SDPA's path does (float32: the same
    rotation, bit for bit; logits within float32 rounding); two rows and the prompt's pass stay on SDPA."""
    for run in steps_with_and_without(tiny_llama, Recording):
        assert run.prompt_calls == []
        assert run.step_calls == ([("rotary", 1)] * run.n_layers if run.rows == 1 else [])
        torch.testing.assert_close(run.got, run.expected, rtol=0, atol=1e-5)
        for (k, v), (want_k, want_v) in zip(run.got_caches, run.expected_caches):
            assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.slow  # compiles (inductor)
def test_compiled_step_through_the_rotary_op_gives_the_eager_step_logits_and_caches(tiny_llama):
    """torch.compile traces the op that writes the caches (mutates_args) and runs it once a layer: on the CPU
    its torch reference. The compiled step's logits and the caches it leaves (the layers' own buffers: the
    compiled graph calls the op on them, no copies) are the eager unfolded step's within float32 rounding
    (inductor's products round differently from eager's)."""
    llama = tiny_llama(dict(SMALL_GQA, vocab_size=512), seed=3, device="cpu", dtype=torch.float32,
                       max_batch_size=1, fast=False)
    model = llama.model
    use_fast_layers(model, pack=False)  # (inductor takes no weights packed for oneDNN)
    layers = [m for m in model.modules() if isinstance(m, FastAttention)]
    model.forward(torch.tensor([[256, 5, 6, 7]]), 0)
    before = [(m.cache_k.clone(), m.cache_v.clone()) for m in layers]
    step = DecodeStep(model)
    tokens, positions = torch.tensor([9]), torch.tensor([4])
    expected = step(tokens, positions, model.params.max_seq_len)  # no kernel: the layer's own writes and SDPA
    written = [(m.cache_k.clone(), m.cache_v.clone()) for m in layers]
    for m, (k, v) in zip(layers, before):
        m.cache_k.copy_(k), m.cache_v.copy_(v)
        m.decode_attention = A.DecodeAttention(AK.AttentionConfig(16, 4), rotary=True)
    compiled = torch.compile(step._step, fullgraph=True, dynamic=False)
    with torch.no_grad():
        got = compiled(tokens, positions, model.params.max_seq_len)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for m, (k, v) in zip(layers, written):
        torch.testing.assert_close(m.cache_k, k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.cache_v, v, rtol=1e-5, atol=1e-6)
        assert not torch.equal(m.cache_k, before[layers.index(m)][0])  # written
        m.decode_attention = None


def test_rotary_setting_takes_auto_or_off_and_rejects_other_values(monkeypatch):
    monkeypatch.delenv(A.ROTARY_ENV, raising=False)
    assert A.rotary_runs_in()
    monkeypatch.setenv(A.ROTARY_ENV, "off")
    assert not A.rotary_runs_in()
    monkeypatch.setenv(A.ROTARY_ENV, "on")
    with pytest.raises(ValueError, match="LLAMA_DECODE_ATTENTION_ROTARY"):
        A.rotary_runs_in()


@pytest.mark.parametrize("value", ["auto", "off"])
def test_layers_take_the_fold_with_the_kernel_unless_off(tiny_llama, monkeypatch, value):
    monkeypatch.setattr(A, "kernel_runs_on", lambda device: True)
    monkeypatch.setattr(A, "time_candidates", lambda caches, n_heads, kv_len, pdl: {
        AK.AttentionConfig(16, 2): 1e-6, A.SDPA: 5e-6})
    monkeypatch.setenv(A.ENV, "on")
    monkeypatch.setenv(A.ROTARY_ENV, value)
    llama = tiny_llama(dict(SMALL_GQA, vocab_size=512), seed=3, device="cpu", dtype=torch.float32)
    chosen = A.use_decode_attention(llama.model)
    assert chosen is not None and chosen.rotary == (value == "auto")
    assert A.picked_attention(llama.model).endswith(", rotary and cache writes in") == (value == "auto")
    for m in llama.model.modules():
        if isinstance(m, FastAttention):
            m.decode_attention = None


# ---- CUDA ---------------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS)
def test_cuda_rotary_kernel_writes_the_layers_caches_and_attends_within_its_bound(dtype, heads):
    """Every candidate block shape (and the group's heads a program); one row and three rows at different
    positions (the first, the last, one inside a block, one at a block's first position); kv_len 1 to 160
    (500 for the 8B model's heads)."""
    group = heads[0] // heads[1]
    configs = [c for c in A.CANDIDATES + (AK.AttentionConfig(16, 4, group),) if group % c.heads == 0]
    cases = [(1, 8, [0]), (17, 20, [16]), (160, 160, [159]), (160, 160, [0, 159, 77]), (160, 160, [32, 16, 1])]
    if heads == HEADS[0]:
        cases.append((500, 512, [499, 250, 31]))
    check_rotary_launch(dtype, heads, "cuda", cases, configs)


@needs_pdl
@pytest.mark.parametrize("in_graph", [False, True])
def test_cuda_rotary_dependent_launch_reads_its_inputs_after_they_are_written(in_graph):
    """The step's new query, key and value, the tables and the caches change between runs, written by a large
    copy just before the kernel: a dependent launch that read them before its wait would see the last run's."""
    heads, kv_len = (32, 8, 128), 256
    xq, xk, xv, cos, sin, cache_k, cache_v, pos = random_step(1, heads, kv_len, torch.bfloat16, 22, "cuda",
                                                              [kv_len - 1])
    xnew = xq._base  # the one tensor the three are views of
    sources = [torch.empty_like(t) for t in (xnew, cos, sin, cache_k, cache_v)]
    big = torch.empty(64, 2**20, device="cuda", dtype=torch.bfloat16)  # 128 MB copied before each write
    big_to = torch.empty_like(big)
    cfg = AK.AttentionConfig(16, 4)

    def run(pdl):
        big_to.copy_(big)
        for t, src in zip((xnew, cos, sin, cache_k, cache_v), sources):
            t.copy_(src)
        out = AK.launch(xq, cache_k, cache_v, pos, kv_len, cfg, pdl=pdl, rotary=AK.Rotary(cos, sin, xk, xv))
        return out, cache_k[:, :, kv_len - 1].clone()

    dependent_runs_match_plain_ones(run, [big] + sources, in_graph)


@needs_kernel
def test_cuda_compiled_step_with_the_fold_gives_the_unfolded_greedy_tokens(tiny_llama, monkeypatch):
    """Compiled CUDA steps with the kernel and the fold, with the kernel alone, and with SDPA: the same float32
    greedy tokens, log-probabilities within 1e-5, and the same caches after generation within float32 rounding;
    each took what it was given."""
    prompts = [[256, 5, 6, 7]]
    kwargs = dict(params=dict(SMALL_GQA, vocab_size=512), seed=6, device="cuda", dtype=torch.float32,
                  max_batch_size=1, compile=True)
    results = {}
    for attention, rotary in (("off", "auto"), ("on", "off"), ("on", "auto")):
        monkeypatch.setenv(A.ENV, attention)
        monkeypatch.setenv(A.ROTARY_ENV, rotary)
        llama = tiny_llama(**kwargs)
        picked = A.picked_attention(llama.model)
        assert (picked == A.SDPA) == (attention == "off")
        assert picked.endswith("rotary and cache writes in") == (attention == "on" and rotary == "auto")
        tokens, logprobs = llama.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
        caches = [m.cache_k.clone() for m in llama.model.modules() if isinstance(m, FastAttention)]
        results[attention, rotary] = tokens, torch.tensor(logprobs[0]), caches
    tokens, logprobs, caches = results["off", "auto"]
    for key in (("on", "off"), ("on", "auto")):
        tokens_k, logprobs_k, caches_k = results[key]
        assert tokens_k == tokens
        torch.testing.assert_close(logprobs_k, logprobs, rtol=0, atol=1e-5)
        for k, want in zip(caches_k, caches):
            torch.testing.assert_close(k, want, rtol=1e-5, atol=1e-5)
