"""The decode attention of a compiled CUDA step (llama.fast.decode_attention; its kernels in
llama.fast.decode_attention_kernels): the op against float64 within a bound derived from its float32 arithmetic
(the Triton kernel on CUDA, every candidate block shape, bf16 and float32, several kv_len, GQA groups and rows
at different positions, whatever lies in the cache past them; torch's float32 attention elsewhere), the fast
layer's dispatch to it (one row of a decode step only), LLAMA_DECODE_ATTENTION and its load-time pick, the
dependent launch reading the cache after it is written, and compiled steps through the custom op."""

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import pytest
import torch

from llama.fast import decode_attention as A
from llama.fast import decode_attention_kernels as AK
from llama.fast.int8_gemv_kernels import pdl_supported
from llama.fast.layers import FastAttention, use_fast_layers
from llama.fast.step import DecodeStep

from helpers import SMALL_GQA

U32 = 2.0**-24  # float32's unit roundoff
UNIT = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
EX2 = 2.0**-21  # a bound on the relative error of the GPU's float32 2**x (ex2.approx: 2 ulp)
needs_kernel = pytest.mark.skipif(not AK.kernel_runs_on(torch.device("cuda")), reason="needs CUDA and Triton")
needs_pdl = pytest.mark.skipif(not pdl_supported(torch.device("cuda")),
                               reason="needs CUDA, Triton and a GPU with programmatic dependent launch (Hopper+)")
# (n_heads, n_kv_heads, head_dim): the 8B model's, the tests' tiny model's (head_dim 8), no GQA, one KV head.
HEADS = [(32, 8, 128), (8, 2, 8), (4, 4, 64), (8, 1, 32)]


def random_attention(bsz: int, heads: tuple, max_seq: int, dtype: torch.dtype, seed: int, device: str = "cpu",
                     positions=None, spread: float = 1.0):
    """q (bsz, n_heads, head_dim) and caches (bsz + 1, n_kv_heads, max_seq, head_dim) in dtype, N(0, spread**2)
    (the cache's extra row: a row the op must not read), and positions (bsz,) (default: max_seq - 1 for all).
    Every cache entry is random, past each row's position too: a kernel that read them would be far off."""
    n_heads, n_kv_heads, head_dim = heads
    g = torch.Generator().manual_seed(seed)
    q = spread * torch.randn(bsz, n_heads, head_dim, generator=g)
    cache_k = spread * torch.randn(bsz + 1, n_kv_heads, max_seq, head_dim, generator=g)
    cache_v = torch.randn(bsz + 1, n_kv_heads, max_seq, head_dim, generator=g)
    if positions is None:
        positions = [max_seq - 1] * bsz
    to = dict(device=device, dtype=dtype)
    return q.to(**to), cache_k.to(**to), cache_v.to(**to), torch.tensor(positions, device=device)


def attention_bound(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor,
                    kv_len: int, out_dtype: torch.dtype):
    """(exact, bound): softmax(q K^T / sqrt(head_dim)) V over positions 0 .. min(positions[b], kv_len - 1) of
    row b in float64 (bsz, n_heads, head_dim), and a bound on a computed output's error, element by element.

    The bound, derived to first order in u = 2**-24 (1% added for the rest). With c = log2(e) / sqrt(head_dim),
    each base-2 score t_j = c q.k_j is computed with an error under (D + 2) u c A_j, A_j = sum |q_d k_jd| (q
    scaled: one rounding; D products: one rounding each; D - 1 additions). 2**(t_j - m) then errs relatively
    by ln2 (that error + u |t_j - m|) + EX2 (the error in the maximum m is one factor for every weight: it
    cancels). The online softmax's rescaling by 2**(m_old - m_new) (the same for the weighted sum and for
    the sum of weights, but not for later terms) adds, over the steps, ln2 u (sum of |m_old - m_new|) + EX2 a
    step, at most ln2 u 2T + n EX2, T = c max_j A_j; the split's merge one more of each. So every weight
    p_j is off by at most eta = ln2 u (D + 10) T + (n + 2) EX2 relatively. Then the weighted sum of V and the
    sum of weights: n products and about n + 4 additions or rescalings a term, (2n + 8) u of W = sum p_j
    |v_j| / sum p_j; the weights' error moves numerator and denominator: 2 eta W. One division (u) and one
    rounding to out's dtype (u_out of the result)."""
    bsz, n_heads, head_dim = q.shape
    group = n_heads // cache_k.shape[1]
    c = math.log2(math.e) / math.sqrt(head_dim)
    exact = torch.empty(bsz, n_heads, head_dim, dtype=torch.float64)
    bound = torch.empty_like(exact)
    for b in range(bsz):
        n = min(int(positions[b]), kv_len - 1) + 1
        k = cache_k[b, :, :n].double().cpu().repeat_interleave(group, 0)  # (n_heads, n, D): each head's KV head
        v = cache_v[b, :, :n].double().cpu().repeat_interleave(group, 0)
        qd = q[b].double().cpu()[:, :, None]  # (n_heads, D, 1)
        t = c * (k @ qd)[..., 0]  # (n_heads, n) base-2 scores
        big_t = c * (k.abs() @ qd.abs())[..., 0].amax(1)  # (n_heads,)
        p = torch.exp2(t - t.amax(1, keepdim=True))
        total = p.sum(1, keepdim=True)
        exact[b] = (p[:, None] @ v)[:, 0] / total
        w = (p[:, None] @ v.abs())[:, 0] / total  # (n_heads, D)
        eta = math.log(2) * U32 * (head_dim + 10) * big_t + (n + 2) * EX2  # (n_heads,)
        bound[b] = (2 * eta[:, None] + (2 * n + 9) * U32) * w
    bound = 1.01 * bound
    return exact, bound + UNIT[out_dtype] * (exact.abs() + bound)


def assert_within(out: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    """out within attention_bound's bound of the exact attention; for float32 also a relative error over the
    whole output under 1e-5 (far under the worst case)."""
    got = out.double().cpu()
    assert torch.isfinite(got).all()
    worst = ((got - exact).abs() / bound).max().item()
    assert worst <= 1, f"error {worst:.3g} of its bound"
    if out.dtype == torch.float32:
        assert ((got - exact).norm() / exact.norm()).item() < 1e-5


def assert_within_bound(out: torch.Tensor, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                        positions: torch.Tensor, kv_len: int) -> None:
    """out against the exact attention within attention_bound's bound (and assert_within's)."""
    assert_within(out, *attention_bound(q, cache_k, cache_v, positions, kv_len, out.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_off_cuda_gives_the_float32_attention_within_its_bound(dtype):
    q, cache_k, cache_v, positions = random_attention(3, (8, 2, 16), 40, dtype, seed=1, positions=[39, 0, 17])
    out = A.decode_attention(q, cache_k, cache_v, positions, 40, 16, 4)  # on the CPU: torch, whatever the shape
    assert out.shape == q.shape and out.dtype == dtype
    assert_within_bound(out, q, cache_k, cache_v, positions, 40)


def test_op_off_cuda_reads_no_further_than_kv_len():
    q, cache_k, cache_v, positions = random_attention(2, (4, 2, 8), 30, torch.float32, seed=2, positions=[29, 3])
    out = A.decode_attention(q, cache_k, cache_v, positions, 20, 16, 4)
    assert_within_bound(out, q, cache_k, cache_v, positions, 20)


class Recording:
    """A DecodeAttention stand-in that records each call's rows and kv_len and computes the reference."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, cache_k, cache_v, positions, kv_len):
        self.calls.append((q.shape[0], kv_len))
        return A.decode_attention_reference(q, cache_k, cache_v, positions, kv_len)


def test_fast_layer_sends_one_row_decode_steps_to_the_op_and_the_rest_to_sdpa(tiny_llama):
    """With the op given, a one-row decode step's layers call it (and give SDPA's logits within float32
    rounding); two rows, and the prompt's pass, stay on SDPA."""
    for run in steps_with_and_without(tiny_llama, Recording):
        assert run.prompt_calls == []
        assert run.step_calls == ([(1, 5)] * run.n_layers if run.rows == 1 else [])
        torch.testing.assert_close(run.got, run.expected, rtol=0, atol=1e-5)


@dataclass
class DispatchRun:
    """One run of steps_with_and_without, at `rows` rows."""

    rows: int
    n_layers: int
    prompt_calls: list  # what the layers' decode_attention recorded in the prompt's pass
    step_calls: list  # ... and in the decode step after it
    expected: torch.Tensor  # the decode step's logits on SDPA (no decode_attention)
    got: torch.Tensor  # the same step's logits with the recording decode_attention given
    expected_caches: list  # each layer's (cache_k, cache_v) after the SDPA step
    got_caches: list  # ... and after the step with the recording


def steps_with_and_without(tiny_llama, make_recording) -> list:
    """For 1 and 2 rows of a tiny float32 model (SMALL_GQA): the prompt's pass (4 tokens) and one decode step
    (token 9 at position 4, cache length 5), first with no decode_attention (SDPA with the mask), then, the
    caches zeroed, with `make_recording()` given to every layer: what it recorded, the logits and the caches
    of both. The layers are given no decode_attention again at the end."""
    llama = tiny_llama(dict(SMALL_GQA, vocab_size=512), seed=3, device="cpu", dtype=torch.float32)
    model = llama.model
    step = DecodeStep(model)
    layers = [m for m in model.modules() if isinstance(m, FastAttention)]
    prompt = torch.tensor([[256, 5, 6, 7]])
    runs = []
    for rows in (1, 2):
        recording = make_recording()
        tokens = prompt.expand(rows, -1)
        for m in layers:
            m.decode_attention = None
            m.cache_k.zero_(), m.cache_v.zero_()
        model.forward(tokens, 0)
        expected = step(torch.tensor([9] * rows), torch.tensor([4] * rows), 5)  # SDPA with the mask
        expected_caches = [(m.cache_k.clone(), m.cache_v.clone()) for m in layers]
        for m in layers:
            m.decode_attention = recording
            m.cache_k.zero_(), m.cache_v.zero_()
        model.forward(tokens, 0)  # the prompt's pass (int start_pos): SDPA
        prompt_calls = list(recording.calls)
        got = step(torch.tensor([9] * rows), torch.tensor([4] * rows), 5)
        runs.append(DispatchRun(rows, len(layers), prompt_calls, recording.calls[len(prompt_calls):], expected,
                                got, expected_caches, [(m.cache_k.clone(), m.cache_v.clone()) for m in layers]))
    for m in layers:
        m.decode_attention = None
    return runs


@pytest.mark.slow  # compiles (inductor)
def test_compiled_step_through_the_op_gives_the_eager_step_logits(tiny_llama):
    """torch.compile traces the layer's call of the custom op (its fake gives the shape) and runs it as one
    opaque call: on the CPU the op's torch reference, so the compiled step's logits are the eager step's
    within float32 rounding."""
    llama = tiny_llama(dict(SMALL_GQA, vocab_size=512), seed=3, device="cpu", dtype=torch.float32,
                       max_batch_size=1, fast=False)
    model = llama.model
    use_fast_layers(model, pack=False)  # (inductor takes no weights packed for oneDNN)
    for m in model.modules():
        if isinstance(m, FastAttention):
            m.decode_attention = A.DecodeAttention(AK.AttentionConfig(16, 4))
    model.forward(torch.tensor([[256, 5, 6, 7]]), 0)
    step = DecodeStep(model)
    compiled = torch.compile(step._step, fullgraph=True, dynamic=False)
    tokens, positions = torch.tensor([9]), torch.tensor([4])
    expected = step(tokens, positions, model.params.max_seq_len)
    with torch.no_grad():
        got = compiled(tokens, positions, model.params.max_seq_len)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for m in model.modules():
        if isinstance(m, FastAttention):
            m.decode_attention = None


def test_setting_takes_auto_on_or_off_and_rejects_other_values(monkeypatch):
    for value in ("auto", "on", "off"):
        monkeypatch.setenv(A.ENV, value)
        assert A.setting() == value
    monkeypatch.setenv(A.ENV, "yes")
    with pytest.raises(ValueError, match="LLAMA_DECODE_ATTENTION"):
        A.setting()
    monkeypatch.setenv(A.PDL_ENV, "off")
    assert not A.pdl_runs_on(torch.device("cuda"))
    monkeypatch.setenv(A.PDL_ENV, "on")
    with pytest.raises(ValueError, match="LLAMA_DECODE_ATTENTION_PDL"):
        A.pdl_runs_on(torch.device("cuda"))


def test_pick_keeps_sdpa_unless_the_fastest_candidate_beats_it():
    fast, slow = AK.AttentionConfig(16, 4), AK.AttentionConfig(32, 4, 4)
    assert A.pick({fast: 2e-6, slow: 3e-6, A.SDPA: 7e-6}, "auto") == fast
    assert A.pick({fast: 8e-6, slow: 9e-6, A.SDPA: 7e-6}, "auto") is None
    assert A.pick({fast: 8e-6, slow: 9e-6, A.SDPA: 7e-6}, "on") == fast
    assert A.pick({A.SDPA: 7e-6}, "on") is None  # no candidate fitted (a long cache)


def test_block_shapes_must_fit_the_kernel_the_group_and_the_cache():
    AK.check_config(AK.AttentionConfig(32, 4, 4), group=4, kv_len=512)
    for bad in (AK.AttentionConfig(24, 4), AK.AttentionConfig(32, 3), AK.AttentionConfig(32, 4, 3),
                AK.AttentionConfig(32, 32), AK.AttentionConfig(0, 4)):
        with pytest.raises(ValueError, match="block shape"):
            AK.check_config(bad, group=4)
    with pytest.raises(ValueError, match="does not divide"):
        AK.check_config(AK.AttentionConfig(32, 4, 4), group=2)
    with pytest.raises(ValueError, match="more than 16 blocks"):  # the combine kernel's limit
        AK.check_config(AK.AttentionConfig(32, 4), group=4, kv_len=513)


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_setting_gives_the_kernel_to_int8_gemv_models_only_unless_on(tiny_llama, monkeypatch, mode):
    """"auto": the kernel where the model's products run the int8 GEMV and the timing finds it faster than
    SDPA (here a made-up timing); a model of inductor's products keeps SDPA, untimed. "on": every model, the
    fastest candidate. "off": none. The timing's random caches are zeroed again."""
    fast = AK.AttentionConfig(16, 2)
    timed = []

    def fake_times(caches, n_heads, kv_len, pdl):
        timed.append(kv_len)
        return {fast: 1e-6, AK.AttentionConfig(32, 4): 2e-6, A.SDPA: 5e-6}

    monkeypatch.setattr(A, "kernel_runs_on", lambda device: True)
    monkeypatch.setattr(A, "time_candidates", fake_times)
    monkeypatch.setenv(A.ENV, mode)
    llama = tiny_llama(dict(SMALL_GQA, vocab_size=512), seed=3, device="cpu", dtype=torch.float32)
    model = llama.model
    layers = [m for m in model.modules() if isinstance(m, FastAttention)]
    for with_gemv in (False, True):
        if with_gemv:
            model.output.gemv = "an int8 GEMV"  # what use_int8_gemv sets on a CUDA int8 layer
        chosen = A.use_decode_attention(model)
        expect = mode == "on" or (mode == "auto" and with_gemv)
        assert (chosen is not None) == expect
        assert all(m.decode_attention is chosen for m in layers)
        assert chosen is None or chosen.cfg == fast
        assert all(float(m.cache_k.abs().max()) == 0 for m in layers)
    assert timed == {"auto": [64], "on": [64, 64], "off": []}[mode]  # kv_len: max_seq_len
    for m in layers:
        m.decode_attention = None


def test_models_off_cuda_keep_sdpa(tiny_llama, monkeypatch):
    monkeypatch.setenv(A.ENV, "on")
    llama = tiny_llama(dict(SMALL_GQA, vocab_size=512), seed=3, device="cpu", dtype=torch.float32)
    assert A.use_decode_attention(llama.model) is None
    assert A.picked_attention(llama.model) == A.SDPA


# ---- CUDA ---------------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS)
def test_cuda_kernel_gives_the_attention_within_its_bound(dtype, heads):
    """Every candidate block shape (and the group's heads a program), one row and three rows at different
    positions (the first, the last, one inside a block), kv_len from 1 to 160 (500 for the 8B model's heads);
    the output poisoned first."""
    group = heads[0] // heads[1]
    configs = [c for c in A.CANDIDATES + (AK.AttentionConfig(64, 8), AK.AttentionConfig(16, 4, group))
               if group % c.heads == 0]
    seed = 10
    cases = [(1, 8, [0]), (17, 20, [16]), (160, 160, [159]), (160, 160, [0, 159, 77])]
    if heads == HEADS[0]:  # the 8B model's heads: a longer cache too (500 positions: 16 blocks of 32)
        cases.append((500, 512, [499, 250, 31]))
    for kv_len, max_seq, positions in cases:
        seed += 1
        q, cache_k, cache_v, pos = random_attention(len(positions), heads, max_seq, dtype, seed, "cuda", positions)
        exact, bound = attention_bound(q, cache_k, cache_v, pos, kv_len, dtype)
        for cfg in configs:
            if kv_len > cfg.block_n * AK.MAX_BLOCKS:
                continue
            out = torch.full_like(q, float("nan"))
            AK.launch(q, cache_k, cache_v, pos, kv_len, cfg, out=out)
            assert_within(out, exact, bound)


@needs_kernel
def test_cuda_kernel_stays_within_its_bound_on_large_scores():
    """Scores spread over hundreds (q and K scaled by 8): the blocks' maxima far apart when merged."""
    heads = (32, 8, 128)
    q, cache_k, cache_v, pos = random_attention(2, heads, 256, torch.float32, 20, "cuda", [255, 130], spread=8.0)
    exact, bound = attention_bound(q, cache_k, cache_v, pos, 256, torch.float32)
    for cfg in A.CANDIDATES:
        assert_within(AK.launch(q, cache_k, cache_v, pos, 256, cfg), exact, bound)


@needs_kernel
def test_cuda_op_takes_a_strided_query():
    """The fast layer hands the op a view (its heads out of the rotated projection): any strides but the last."""
    q, cache_k, cache_v, pos = random_attention(1, (8, 2, 64), 64, torch.bfloat16, 21, "cuda", [40])
    wide = torch.randn(1, 3, 8, 64, device="cuda", dtype=torch.bfloat16)
    wide[:, 1] = q
    view = wide[:, 1]  # (1, 8, 64), row stride 3 * 8 * 64
    out = A.decode_attention(view, cache_k, cache_v, pos, 64, 16, 4)
    assert torch.equal(out, A.decode_attention(q, cache_k, cache_v, pos, 64, 16, 4))


@needs_pdl
@pytest.mark.parametrize("in_graph", [False, True])
def test_cuda_dependent_launch_reads_the_cache_after_it_is_written(in_graph):
    """The cache and the query change between runs, written by a large copy just before the kernel: a
    dependent launch that read them before its wait would see the last run's values."""
    heads, kv_len = (32, 8, 128), 512
    q, cache_k, cache_v, pos = random_attention(1, heads, kv_len, torch.bfloat16, 22, "cuda", [kv_len - 1])
    big = torch.empty(64, 2**20, device="cuda", dtype=torch.bfloat16)  # 128 MB copied before each write
    big_to = torch.empty_like(big)
    new_k, new_v, new_q = torch.empty_like(cache_k), torch.empty_like(cache_v), torch.empty_like(q)
    cfgs = (AK.AttentionConfig(32, 4), AK.AttentionConfig(32, 4, 4))

    def run(pdl):
        big_to.copy_(big)
        cache_k.copy_(new_k), cache_v.copy_(new_v), q.copy_(new_q)
        return [AK.launch(q, cache_k, cache_v, pos, kv_len, cfg, pdl=pdl) for cfg in cfgs]

    dependent_runs_match_plain_ones(run, (big, new_k, new_v, new_q), in_graph)


def dependent_runs_match_plain_ones(run: Callable[[bool], Sequence[torch.Tensor]], sources: Sequence[torch.Tensor],
                                    in_graph: bool) -> None:
    """run(pdl) launches with the dependent launch or without and returns its outputs. Four times, `sources`
    (what run copies in just before the kernel) get new random values; the dependent run (replayed in a CUDA
    graph where in_graph) must give the plain run's outputs, bit for bit."""
    if in_graph:
        run(True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = run(True)
    g = torch.Generator().manual_seed(23)
    for _ in range(4):
        for t in sources:
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
        if in_graph:
            graph.replay()
            got = [o.clone() for o in outs]
        else:
            got = run(True)
        expected = run(False)
        for y, e in zip(got, expected):
            assert torch.equal(y, e)


@needs_kernel
def test_cuda_compiled_step_on_the_kernel_gives_the_sdpa_greedy_tokens(tiny_llama, monkeypatch):
    """A compiled CUDA step with the kernel (LLAMA_DECODE_ATTENTION=on) against one without (off): the same
    float32 greedy tokens, log-probabilities within 1e-5; the kernel was taken."""
    prompts = [[256, 5, 6, 7]]
    kwargs = dict(params=dict(SMALL_GQA, vocab_size=512), seed=6, device="cuda", dtype=torch.float32,
                  max_batch_size=1, compile=True)
    results = {}
    for value in ("off", "on"):
        monkeypatch.setenv(A.ENV, value)
        llama = tiny_llama(**kwargs)
        assert (A.picked_attention(llama.model) == A.SDPA) == (value == "off")
        results[value] = llama.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    (tokens, logprobs), (tokens_k, logprobs_k) = results["off"], results["on"]
    assert tokens_k == tokens
    torch.testing.assert_close(torch.tensor(logprobs_k[0]), torch.tensor(logprobs[0]), rtol=0, atol=1e-5)


@needs_kernel
def test_cuda_auto_times_the_kernel_against_sdpa_and_keeps_the_faster(tiny_llama, monkeypatch):
    """An int8 model on the GEMV ("auto" leaves others on SDPA): both timed, the faster kept; caches zeroed."""
    monkeypatch.setenv(A.ENV, "auto")
    monkeypatch.setattr(A, "PICK_TIMES", {})
    llama = tiny_llama(dict(SMALL_GQA, vocab_size=512), seed=6, device="cuda", dtype=torch.bfloat16,
                       max_batch_size=1, compile=True, quantize="int8")
    (times,) = A.PICK_TIMES.values()
    assert A.SDPA in times and len(times) > 1
    best = A.pick(times, "auto")
    assert A.picked_attention(llama.model) == (A.SDPA if best is None else repr(llama.model.layers[0].attention
                                                                                 .decode_attention))
    assert best is None or llama.model.layers[0].attention.decode_attention.cfg == best
    assert all(float(m.cache_k.abs().max()) == 0 for m in llama.model.modules() if isinstance(m, FastAttention))
