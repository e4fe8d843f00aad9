"""The int8 GEMV with its input function taken in (llama.fast.int8_gemv's prologues): the RMSNorm before wqkv,
w13 and the output projection, and silu(gate) * up before w2. The fused ops against an independent unfused
composition (llama.model.RMSNorm, eager F.silu(gate) * up, the float64 product with the dequantized weight)
within a bound derived from their roundings: torch's functions off CUDA, the Triton kernel on CUDA; the fast
layers' hand-over of the norm, the SwiGLU and the residual add to the product; LLAMA_INT8_GEMV_FUSE; a small
model's greedy tokens fused and unfused on CUDA."""

import math

import pytest
import torch
import torch.nn.functional as F

from llama.distributed import init_distributed
from llama.fast import int8_gemv as G
from llama.fast.quantize import Int8Linear, quantize_int8
from llama.model import RMSNorm

from helpers import SMALL_GQA

PARAMS = dict(SMALL_GQA, vocab_size=512)
U32 = 2.0**-24  # float32's unit roundoff
UNIT = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
EPS = 1e-5
# x's scale: 1, where eps is a rounding error of the mean square, and 1e-3, where it outweighs it (mean square
# 1e-6): a norm that leaves eps out, or sums the squares over part of x, is then far out.
SCALES = (1.0, 1e-3)
needs_kernel = pytest.mark.skipif(not G.kernel_runs_on(torch.device("cuda")), reason="needs CUDA and Triton")


def random_weight(n: int, k: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    """Q (N, K) int8 and its scales in dtype, from a quantized N(0, 1/K) weight."""
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int8(torch.randn(n, k, generator=g) / math.sqrt(k))
    return q.to(device), scale.to(device, dtype)


def norm_inputs(k: int, dtype: torch.dtype, x_scale: float, seed: int, device: str = "cpu"):
    """x (1, K) un-normed and an RMSNorm (llama.model's) of width K with a weight near 1, in dtype."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, k, generator=g) * x_scale).to(device, dtype)
    norm = RMSNorm(k, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(k, generator=g))
    return x, norm.to(device, dtype)


def assert_within_bound(y: torch.Tensor, a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, delta: float) -> None:
    """y (1, N) against sum_k a[k] Q[n, k] scale[n] in float64, a (K,) the unfused composition's inputs to the
    product. The bound, derived: each input the fused op forms may differ from a[k] by delta |a[k]| (its
    roundings, where they land on the other side; 0 where it computes a exactly as the composition does);
    then the float32 sum of K products, scaled (as tests/test_int8_gemv.py derives it, (K + 1) u S to first
    order, S = sum_k |a[k] Q[n, k] scale[n]|, 1% added for the rest); then one rounding to y's dtype."""
    k = a.numel()
    terms = a.double().reshape(1, k) * q.double() * scale.double()[:, None]  # (N, K)
    exact = terms.sum(1)
    s = terms.abs().sum(1)
    first = 1.01 * ((k + 1) * U32 + delta * (1 + (k + 1) * U32)) * s
    bound = first + UNIT[y.dtype] * (exact.abs() + first)
    err = (y.double().reshape(-1) - exact).abs()
    assert torch.isfinite(y).all()
    worst = (err / bound).max().item()
    assert worst <= 1, f"error {worst:.3g} of its bound"


def test_the_norm_reference_is_the_models_rmsnorm_bit_for_bit():
    for dtype in (torch.float32, torch.bfloat16):
        x, norm = norm_inputs(256, dtype, 1.0, seed=0)
        x = torch.cat([x, 1e-3 * x, 30 * x])  # (3, K): rows of other scales
        assert torch.equal(G.rms_norm_reference(x, norm.weight, norm.eps), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_scale", SCALES)
def test_normed_op_off_cuda_is_the_norm_then_the_product(dtype, x_scale):
    q, scale = random_weight(48, 200, dtype, seed=1)
    x, norm = norm_inputs(200, dtype, x_scale, seed=2)
    y = G.rms_norm_int8_gemv(x.view(1, 1, 200), norm.weight, norm.eps, q, scale, 4, 64, 1, 4)
    assert y.shape == (1, 1, 48) and y.dtype == dtype
    assert_within_bound(y, norm(x).detach(), q, scale, delta=0.0)  # torch's norm: the same inputs exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_op_off_cuda_is_the_swiglu_then_the_product(dtype):
    q, scale = random_weight(40, 96, dtype, seed=3)
    gate_up = (2 * torch.randn(1, 192, generator=torch.Generator().manual_seed(4))).to(dtype)
    y = G.swiglu_int8_gemv(gate_up, q, scale, 4, 64, 1, 4)
    assert y.shape == (1, 40) and y.dtype == dtype
    a = F.silu(gate_up[:, :96]) * gate_up[:, 96:]  # eager torch, as the fast feed-forward computes it
    assert_within_bound(y, a, q, scale, delta=0.0)


class Recording:
    """An Int8Gemv stand-in with a prologue: records which form each call took, computes it with torch."""

    def __init__(self, prologue: int, calls: list, name: str, residual: bool = False):
        self.prologue, self.calls, self.name, self.residual = prologue, calls, name, residual

    def __call__(self, x, q, scale, residual=None):
        self.calls.append((self.name, "plain" if residual is None else "plain+residual"))
        return G.int8_gemv(x, q, scale, 4, 64, 1, 4, residual=residual)

    def after_norm(self, x, norm_weight, eps, q, scale):
        self.calls.append((self.name, "after_norm"))
        return G.rms_norm_int8_gemv(x, norm_weight, eps, q, scale, 4, 64, 1, 4)

    def after_swiglu(self, gate_up, q, scale, residual=None):
        self.calls.append((self.name, "after_swiglu" if residual is None else "after_swiglu+residual"))
        return G.swiglu_int8_gemv(gate_up, q, scale, 4, 64, 1, 4, residual=residual)


def test_fast_layers_hand_each_norm_swiglu_and_residual_to_the_product(tiny_llama):
    """At one row, wqkv, w13 and the output projection get x un-normed with the norm, w2 gets w13's output,
    wo and w2 get the block's residual to add: the logits are the model's own (its products, unfused) to
    float32 summation rounding. With more rows (a prefill) every layer takes its own path, none of the
    fused forms."""
    from llama.fast.step import fast_forward

    plain = tiny_llama(PARAMS, seed=6, device="cpu", quantize="int8", max_batch_size=1)
    fused = tiny_llama(PARAMS, seed=6, device="cpu", quantize="int8", max_batch_size=1)
    calls: list = []
    for path, m in fused.model.named_modules():
        if isinstance(m, Int8Linear):
            role = path.rpartition(".")[2]
            m.gemv = Recording(G.PROLOGUE_OF.get(role, G.PLAIN), calls, role, role in G.RESIDUAL_ROLES)
    tokens = torch.tensor([[256, 5, 6, 7]])
    with torch.no_grad():
        expected = fast_forward(plain.model, tokens, 0)
        got = fast_forward(fused.model, tokens, 0)  # 4 rows: no GEMV
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert calls == []
        expected = fast_forward(plain.model, torch.tensor([[9]]), 4)
        got = fast_forward(fused.model, torch.tensor([[9]]), 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    per_layer = [("wqkv", "after_norm"), ("wo", "plain+residual"), ("w13", "after_norm"),
                 ("w2", "after_swiglu+residual")]
    assert calls == per_layer * PARAMS["n_layers"] + [("output", "after_norm")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_off_cuda_add_the_residual_to_the_rounded_product(dtype):
    q, scale = random_weight(40, 96, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    x, gate_up = torch.randn(1, 96, generator=g).to(dtype), torch.randn(1, 192, generator=g).to(dtype)
    residual = torch.randn(1, 40, generator=g).to(dtype)
    assert torch.equal(G.int8_gemv(x, q, scale, 4, 64, 1, 4, residual=residual),
                       residual + G.int8_gemv(x, q, scale, 4, 64, 1, 4))
    assert torch.equal(G.swiglu_int8_gemv(gate_up, q, scale, 4, 64, 1, 4, residual=residual),
                       residual + G.swiglu_int8_gemv(gate_up, q, scale, 4, 64, 1, 4))


def test_a_layer_whose_gemv_takes_no_prologue_gets_the_normed_input():
    init_distributed(torch.device("cpu"))
    q, scale = random_weight(32, 64, torch.float32, seed=7)
    x, norm = norm_inputs(64, torch.float32, 1e-3, seed=8)
    layer = Int8Linear(q, scale, torch.float32)
    calls: list = []
    layer.gemv = Recording(G.PLAIN, calls, "wqkv")
    with torch.no_grad():
        y = layer.after_norm(x, norm)
        assert calls == [("wqkv", "plain")]
        assert_within_bound(y, norm(x), q, scale, delta=0.0)
        gate_up = torch.randn(1, 128)
        layer.after_swiglu(gate_up)
        assert calls[-1] == ("wqkv", "plain")


@pytest.mark.parametrize("fuse, expected", [("on", {"wqkv": G.RMS_NORM, "w13": G.RMS_NORM, "output": G.RMS_NORM,
                                                     "w2": G.SWIGLU, "wo": G.PLAIN}),
                                            ("auto", {"wqkv": G.RMS_NORM, "w13": G.RMS_NORM, "output": G.RMS_NORM,
                                                      "w2": G.PLAIN, "wo": G.PLAIN}),
                                            ("off", {r: G.PLAIN for r in ("wqkv", "wo", "w13", "w2", "output")})])
def test_the_fuse_setting_gives_the_fast_layers_their_prologues_and_epilogues(tiny_llama, monkeypatch, fuse,
                                                                               expected):
    llama = tiny_llama(PARAMS, seed=6, device="cpu", quantize="int8")
    layers = {p: m for p, m in llama.model.named_modules() if isinstance(m, Int8Linear)}
    monkeypatch.setattr(G, "kernel_runs_on", lambda device: True)
    monkeypatch.setattr(G, "pick_config", lambda layers, **kw: G.CANDIDATES[0])
    monkeypatch.setenv(G.ENV, "all")
    monkeypatch.setenv(G.FUSE_ENV, fuse)
    G.use_int8_gemv(layers, fused_forms=True)
    assert {p.rpartition(".")[2]: m.gemv.prologue for p, m in layers.items()} == expected
    residual = {p.rpartition(".")[2] for p, m in layers.items() if m.gemv.residual}
    assert residual == (set() if fuse == "off" else {"wo", "w2"})
    G.use_int8_gemv(layers, fused_forms=False)  # the reference layers hand nothing on
    assert all(m.gemv.prologue == G.PLAIN and not m.gemv.residual for m in layers.values())
    monkeypatch.setenv(G.FUSE_ENV, "rms_norm,residual")  # the forms one by one: here all but the SwiGLU
    G.use_int8_gemv(layers, fused_forms=True)
    assert {p.rpartition(".")[2]: m.gemv.prologue for p, m in layers.items()} == dict(
        {r: G.RMS_NORM for r in ("wqkv", "w13", "output")}, wo=G.PLAIN, w2=G.PLAIN)
    assert {p.rpartition(".")[2] for p, m in layers.items() if m.gemv.residual} == {"wo", "w2"}
    monkeypatch.setenv(G.FUSE_ENV, "yes")
    with pytest.raises(ValueError, match="'yes'"):
        G.use_int8_gemv(layers, fused_forms=True)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 200), (6144, 4096), (1000, 3000)])
def test_cuda_normed_kernel_gives_the_norm_then_the_product_within_its_bound(shape, dtype):
    """delta: each input is two roundings to dtype of x[k] / RMS(x) and its product with the weight; the
    kernel's 1/RMS differs from torch's by its float32 sum of squares in another order (at most K u32 of
    the mean, half of that in the reciprocal square root) and its rsqrt's few ulps, so each rounding may land
    one step (2 u) away: 4 u + (K / 2 + 8) u32."""
    n, k = shape
    configs = list(G.CANDIDATES) + [G.GemvConfig(1, 16, 1, 1), G.GemvConfig(16, 64, 3, 4)]
    delta = 4 * UNIT[dtype] + (k / 2 + 8) * U32
    # Normed in the product's kernel with every block shape, and by a kernel of its own before a few of them.
    runs = [(cfg, False) for cfg in configs] + [(cfg, True) for cfg in configs[:2]]
    for i, (cfg, norm_apart) in enumerate(runs):
        try:
            G.check_config(cfg, k)
        except ValueError:
            continue
        for x_scale in SCALES:
            q, scale = random_weight(n, k, dtype, seed=20 + i, device="cuda")
            x, norm = norm_inputs(k, dtype, x_scale, seed=40 + i, device="cuda")
            y = G.rms_norm_int8_gemv(x, norm.weight, norm.eps, q, scale, *cfg, False, norm_apart)
            assert y.shape == (1, n) and y.dtype == dtype
            with torch.no_grad():
                a = norm(x)  # the unfused composition's inputs, torch's RMSNorm on CUDA
            assert_within_bound(y.cpu(), a.cpu(), q.cpu(), scale.cpu(), delta)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 200), (4096, 14336), (1000, 3000)])
def test_cuda_swiglu_kernel_gives_the_swiglu_then_the_product_within_its_bound(shape, dtype):
    """delta: silu(gate) in float32 (the kernel's exp and division, a few ulps, and the exponent's argument
    rounded: |gate| u32 more, |gate| < 16 here), rounded to dtype, times up, rounded: each rounding may land
    one step (2 u) away: 4 u + 32 u32."""
    n, k = shape
    delta = 4 * UNIT[dtype] + 32 * U32
    for i, cfg in enumerate(G.SWIGLU_CANDIDATES + (G.GemvConfig(2, 256, 7, 2),)):
        try:
            G.check_config(cfg, k)
        except ValueError:
            continue
        q, scale = random_weight(n, k, dtype, seed=60 + i, device="cuda")
        gate_up = (2 * torch.randn(1, 2 * k, generator=torch.Generator().manual_seed(80 + i))).to("cuda", dtype)
        y = G.swiglu_int8_gemv(gate_up, q, scale, *cfg)
        assert y.shape == (1, n) and y.dtype == dtype
        a = F.silu(gate_up[:, :k]) * gate_up[:, k:]  # eager torch on CUDA
        assert_within_bound(y.cpu(), a.cpu(), q.cpu(), scale.cpu(), delta)
        residual = torch.randn(1, n, generator=torch.Generator().manual_seed(i)).to("cuda", dtype)
        # The residual added in the epilogue: torch's sum of the rounded product and the residual, exactly in
        # bf16 (the product is rounded to bf16 first); in float32 the compiler may fuse the scaling and the add
        # into one multiply-add (one rounding, not two): within a float32 rounding of each.
        for got, y_alone in ((G.swiglu_int8_gemv(gate_up, q, scale, *cfg, residual), y),
                             (G.int8_gemv(a, q, scale, *cfg, residual), G.int8_gemv(a, q, scale, *cfg))):
            if dtype == torch.float32:
                assert ((got - (residual + y_alone)).abs() <= 2 * U32 * (residual.abs() + y_alone.abs())).all()
            else:
                assert torch.equal(got, residual + y_alone)


@needs_kernel
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_model_fused_gives_the_unfused_greedy_tokens(tiny_llama, monkeypatch, compile):
    """Every product on the kernel, fused (LLAMA_INT8_GEMV_FUSE=on) and unfused (off): the same greedy tokens,
    log-probabilities within 1e-4 (float32)."""
    kwargs = dict(params=PARAMS, seed=6, device="cuda", dtype=torch.float32, quantize="int8", max_batch_size=1,
                  compile=compile)
    monkeypatch.setenv(G.ENV, "all")
    monkeypatch.setenv(G.FUSE_ENV, "off")
    plain = tiny_llama(**kwargs)
    monkeypatch.setenv(G.FUSE_ENV, "on")
    fused = tiny_llama(**kwargs)
    prologues = {p.rpartition(".")[2]: m.gemv.prologue for p, m in fused.model.named_modules()
                 if isinstance(m, Int8Linear)}
    assert prologues == {"wqkv": G.RMS_NORM, "w13": G.RMS_NORM, "output": G.RMS_NORM, "w2": G.SWIGLU, "wo": G.PLAIN}
    assert {p.rpartition(".")[2] for p, m in fused.model.named_modules() if getattr(m, "gemv", None)
            and m.gemv.residual} == {"wo", "w2"}
    prompts = [[256, 5, 6, 7]]
    tokens, logprobs = plain.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    tokens_f, logprobs_f = fused.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    assert tokens_f == tokens
    torch.testing.assert_close(torch.tensor(logprobs_f[0]), torch.tensor(logprobs[0]), rtol=0, atol=1e-4)
