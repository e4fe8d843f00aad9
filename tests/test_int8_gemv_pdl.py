"""How the int8 GEMV is launched (llama.fast.int8_gemv): as a programmatic dependent launch (PDL;
LLAMA_INT8_GEMV_PDL, the op's `pdl` argument off CUDA: ignored, torch's product; on a Hopper GPU the kernel
launched so gives the bits of its plain launch, alone and in chains where each kernel reads what the one before
it wrote: a kernel that read its input before `gdc_wait` would read it stale there, the race these tests guard),
and with the RMSNorm in a kernel of its own before the product (LLAMA_INT8_GEMV_NORM_APART; its numbers are
bounded with the fused norm's in tests/test_int8_gemv_fused.py)."""

import math

import pytest
import torch

from llama.fast import int8_gemv as G
from llama.fast.quantize import Int8Linear, quantize_int8

from helpers import SMALL_GQA

needs_pdl = pytest.mark.skipif(not G.pdl_supported(torch.device("cuda")),
                               reason="needs CUDA, Triton and a GPU with programmatic dependent launch (Hopper+)")
CFG = G.GemvConfig(2, 2048, 1, 4)
# Every form, and a split-K block shape (its sum kernel is launched plainly after the dependent one).
CONFIGS = (CFG, G.GemvConfig(8, 512, 1, 4), G.GemvConfig(16, 256, 1, 4), G.GemvConfig(4, 1024, 2, 4),
           G.GemvConfig(8, 512, 7, 4))


def random_weight(n: int, k: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    """Q (N, K) int8 and its scales in dtype, from a quantized N(0, 1/K) weight."""
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int8(torch.randn(n, k, generator=g) / math.sqrt(k))
    return q.to(device), scale.to(device, dtype)


def test_pdl_setting_takes_auto_or_off_and_rejects_other_values(monkeypatch):
    monkeypatch.setenv(G.PDL_ENV, "off")
    assert not G.pdl_runs_on(torch.device("cuda"))
    monkeypatch.setenv(G.PDL_ENV, "auto")
    assert not G.pdl_runs_on(torch.device("cpu"))  # no kernel there
    assert G.pdl_runs_on(torch.device("cuda")) == G.pdl_supported(torch.device("cuda"))
    monkeypatch.setenv(G.PDL_ENV, "on")
    with pytest.raises(ValueError, match="LLAMA_INT8_GEMV_PDL"):
        G.pdl_runs_on(torch.device("cuda"))


def test_ops_off_cuda_ignore_pdl():
    q, scale = random_weight(24, 64, torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    x, res, norm_weight = torch.randn(1, 64, generator=g), torch.randn(1, 24, generator=g), torch.rand(64, generator=g)
    gate_up = torch.randn(1, 128, generator=g)
    assert torch.equal(G.int8_gemv(x, q, scale, *CFG, res, True), G.int8_gemv(x, q, scale, *CFG, res, False))
    assert torch.equal(G.rms_norm_int8_gemv(x, norm_weight, 1e-5, q, scale, *CFG, True),
                       G.rms_norm_int8_gemv(x, norm_weight, 1e-5, q, scale, *CFG, False))
    q2, scale2 = random_weight(24, 64, torch.float32, seed=3)
    assert torch.equal(G.swiglu_int8_gemv(gate_up, q2, scale2, *CFG, res, True),
                       G.swiglu_int8_gemv(gate_up, q2, scale2, *CFG, res, False))


def test_layer_product_passes_its_pdl_and_norm_on_to_the_op(monkeypatch):
    seen = []
    # The ops' arguments after the block shape: int8_gemv and swiglu_int8_gemv (residual, pdl),
    # rms_norm_int8_gemv (pdl, norm_apart).
    monkeypatch.setattr(G, "int8_gemv", lambda *args: seen.append(("plain", args[-1])))
    monkeypatch.setattr(G, "rms_norm_int8_gemv", lambda *args: seen.append(("norm", args[-2:])))
    monkeypatch.setattr(G, "swiglu_int8_gemv", lambda *args: seen.append(("swiglu", args[-1])))
    x = torch.zeros(1, 8)
    for pdl, apart in ((True, False), (False, True)):
        gemv = G.Int8Gemv(CFG, G.RMS_NORM, pdl=pdl, norm_apart=apart)
        gemv(x, None, None)
        gemv.after_norm(x, None, 1e-5, None, None)
        gemv.after_swiglu(x, None, None)
    assert seen == [("plain", True), ("norm", (True, False)), ("swiglu", True),
                    ("plain", False), ("norm", (False, True)), ("swiglu", False)]


def chain(x: torch.Tensor, w: dict, pdl: bool) -> list:
    """Five products, each reading what the one before wrote (as a decode step's do): a = x Q1 (plain), b =
    RMSNorm(a) Q2 (2K wide), c = silu(b's gate) * b's up Q3 + a, d = c Q1 + c (the residual read from the
    kernel just before), e = RMSNorm(d) Q2 with the norm in a kernel of its own (norm_apart)."""
    a = G.int8_gemv(x, *w["q1"], *CFG, None, pdl)
    b = G.rms_norm_int8_gemv(a, w["norm"], 1e-5, *w["q2"], *CFG, pdl)
    c = G.swiglu_int8_gemv(b, *w["q3"], *CFG, a, pdl)
    d = G.int8_gemv(c, *w["q1"], *CFG, c, pdl)
    e = G.rms_norm_int8_gemv(d, w["norm"], 1e-5, *w["q2"], *CFG, pdl, True)
    return [a, b, c, d, e]


def chain_weights(k: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(7)
    return {"q1": random_weight(k, k, dtype, seed=8, device="cuda"),
            "q2": random_weight(2 * k, k, dtype, seed=9, device="cuda"),
            "q3": random_weight(k, k, dtype, seed=10, device="cuda"),
            "norm": (0.5 + torch.rand(k, generator=g)).to("cuda", dtype)}


@needs_pdl
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dependent_launch_gives_the_bits_of_a_plain_launch(dtype):
    n, k = 3000, 4096  # N not a multiple of every block's rows: the masked path too
    g = torch.Generator().manual_seed(11)
    x, res = torch.randn(1, k, generator=g).to("cuda", dtype), torch.randn(1, n, generator=g).to("cuda", dtype)
    gate_up = torch.randn(1, 2 * k, generator=g).to("cuda", dtype)
    norm_weight = (0.5 + torch.rand(k, generator=g)).to("cuda", dtype)
    q, scale = random_weight(n, k, dtype, seed=12, device="cuda")
    for cfg in CONFIGS:
        for pdl_arg in (False, True):
            got = [G.int8_gemv(x, q, scale, *cfg, res, pdl_arg), G.int8_gemv(x, q, scale, *cfg, None, pdl_arg),
                   G.rms_norm_int8_gemv(x, norm_weight, 1e-5, q, scale, *cfg, pdl_arg),
                   G.swiglu_int8_gemv(gate_up, q, scale, *cfg, res, pdl_arg)]
            if not pdl_arg:
                expected = got
        for y, e in zip(got, expected):
            assert torch.equal(y, e), cfg


@needs_pdl
@pytest.mark.parametrize("in_graph", [False, True])
def test_cuda_chain_of_dependent_launches_reads_each_input_after_it_is_written(in_graph):
    """Each input changes between runs, so a kernel that read its input before the kernel before it wrote
    it would see the last run's values (or the allocator's leftovers) and differ from the plain launches."""
    k, dtype = 8192, torch.bfloat16  # 64 MB a square weight: each kernel runs long after its dependent starts
    w = chain_weights(k, dtype)
    x = torch.empty(1, k, device="cuda", dtype=dtype)
    if in_graph:
        x.normal_()
        chain(x, w, True)  # compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = chain(x, w, True)
    g = torch.Generator().manual_seed(13)
    for _ in range(6):
        x.copy_(torch.randn(1, k, generator=g).to(dtype))
        if in_graph:
            graph.replay()
            got = [o.clone() for o in outs]
        else:
            got = chain(x, w, True)
        expected = chain(x, w, False)
        for i, (y, e) in enumerate(zip(got, expected)):
            assert torch.equal(y, e), f"product {i} of the chain"


@pytest.mark.parametrize("setting", ["auto", "on", "off"])
def test_norm_apart_setting_picks_where_each_product_after_a_norm_norms_x(tiny_llama, monkeypatch, setting):
    """"on": every product after an RMSNorm norms x in a kernel of its own first; "off": in its own kernel;
    "auto": whichever the load-time timing found faster (here a made-up timing: apart faster for w13 only)."""
    llama = tiny_llama(dict(SMALL_GQA, vocab_size=512), seed=6, device="cpu", quantize="int8")
    layers = {p: m for p, m in llama.model.named_modules() if isinstance(m, Int8Linear)}
    w13_shape = next(m for p, m in layers.items() if p.endswith("w13")).weight.shape

    def pick(layers, prologue=G.PLAIN, pdl=False, norm_apart=False, candidates=None):
        m = layers[0]
        faster = norm_apart == ((m.out_features, m.in_features) == tuple(w13_shape))
        G.PICK_TIMES[(m.out_features, m.in_features, str(m.dtype), prologue, pdl, norm_apart)] = {
            G.CANDIDATES[0]: 1.0 if faster else 2.0}
        return G.CANDIDATES[0]

    monkeypatch.setattr(G, "kernel_runs_on", lambda device: True)
    monkeypatch.setattr(G, "pick_config", pick)
    monkeypatch.setattr(G, "PICK_TIMES", {})
    monkeypatch.setenv(G.ENV, "all")
    monkeypatch.setenv(G.FUSE_ENV, "auto")
    monkeypatch.setenv(G.NORM_APART_ENV, setting)
    G.use_int8_gemv(layers, fused_forms=True)
    apart = {p.rpartition(".")[2] for p, m in layers.items() if m.gemv.norm_apart}
    assert apart == {"on": {"wqkv", "w13", "output"}, "off": set(), "auto": {"w13"}}[setting]
    assert all(m.gemv.prologue == G.RMS_NORM for p, m in layers.items() if p.rpartition(".")[2] in apart)


def test_norm_apart_setting_rejects_other_values(monkeypatch):
    monkeypatch.setenv(G.NORM_APART_ENV, "yes")
    with pytest.raises(ValueError, match="LLAMA_INT8_GEMV_NORM_APART"):
        G.norm_apart_setting()


def test_op_off_cuda_norms_apart_as_in_the_kernel():
    q, scale = random_weight(24, 64, torch.float32, seed=1)
    g = torch.Generator().manual_seed(4)
    x, norm_weight = torch.randn(1, 64, generator=g), torch.rand(64, generator=g)
    assert torch.equal(G.rms_norm_int8_gemv(x, norm_weight, 1e-5, q, scale, *CFG, False, True),
                       G.rms_norm_int8_gemv(x, norm_weight, 1e-5, q, scale, *CFG, False, False))
