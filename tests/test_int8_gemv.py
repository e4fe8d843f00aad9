"""The split-K int8 GEMV (llama.fast.int8_gemv; its kernels in llama.fast.int8_gemv_kernels): the op against
float64 on the dequantized weight within its float32 summation bound (the Triton kernel on CUDA, torch's
product elsewhere), the layer's dispatch to it (one row only), the block shapes it takes, LLAMA_INT8_GEMV, and
compiled steps through the custom op."""

import math

import pytest
import torch
import torch.nn.functional as F

from llama.distributed import init_distributed
from llama.fast import int8_gemv as G
from llama.fast import int8_gemv_kernels as GK
from llama.fast.quantize import Int8Linear, quantize_int8

from helpers import SMALL_GQA

PARAMS = dict(SMALL_GQA, vocab_size=512)
U32 = 2.0**-24  # float32's unit roundoff
UNIT = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
needs_kernel = pytest.mark.skipif(not G.kernel_runs_on(torch.device("cuda")), reason="needs CUDA and Triton")


def random_product(n: int, k: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    """x (1, K) in dtype, Q (N, K) int8 and its scales in dtype, from a quantized N(0, 1/K) weight."""
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int8(torch.randn(n, k, generator=g) / math.sqrt(k))
    x = torch.randn(1, k, generator=g)
    return x.to(device, dtype), q.to(device), scale.to(device, dtype)


def assert_within_summation_bound(y: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """y against sum_k x[k] Q[n, k] scale[n] in float64. The bound, derived: each product x[k] Q[n, k] is
    rounded at most once to float32 (exactly, for bf16 x), the K products are added in float32 in some order
    (at most K - 1 roundings on the way, each of at most u = 2**-24 of a partial sum bounded by S =
    sum |x[k] Q[n, k] scale[n]|), the sum is scaled (one more rounding): together under (K + 1) u S (to first
    order; 1% added for the rest). Then one rounding to y's dtype: u_out of the result. Separately, the
    relative error over the whole output (for float32, far under the worst case): under 1e-5."""
    k = x.shape[-1]
    terms = x.double().reshape(1, k) * q.double() * scale.double()[:, None]  # (N, K)
    exact = terms.sum(1)
    first = 1.01 * (k + 1) * U32 * terms.abs().sum(1)
    bound = first + UNIT[y.dtype] * (exact.abs() + first)
    err = (y.double().reshape(-1) - exact).abs()
    assert torch.isfinite(y).all()
    worst = (err / bound).max().item()
    assert worst <= 1, f"error {worst:.3g} of its bound"
    if y.dtype == torch.float32:
        assert ((y.double().reshape(-1) - exact).norm() / exact.norm()).item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_off_cuda_gives_the_float32_product_within_its_summation_bound(dtype):
    x, q, scale = random_product(48, 200, dtype, seed=1)
    y = G.int8_gemv(x, q, scale, 4, 64, 2, 4)  # on the CPU: torch's product, whatever the block shape
    assert y.shape == (1, 48) and y.dtype == dtype
    assert_within_summation_bound(y, x, q, scale)


def test_op_keeps_the_leading_dimensions_of_x():
    x, q, scale = random_product(24, 64, torch.float32, seed=2)
    y = G.int8_gemv(x.view(1, 1, 64), q, scale, 4, 64, 1, 4)
    assert y.shape == (1, 1, 24)
    torch.testing.assert_close(y.view(1, 24), F.linear(x, q.float()) * scale, rtol=1e-6, atol=1e-6)


class Recording:
    """An Int8Gemv stand-in that counts its calls and computes the reference product."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, q, scale):
        self.calls += 1
        return G.int8_gemv_reference(x.reshape(-1, x.shape[-1]), q, scale).view(*x.shape[:-1], q.shape[0])


def test_int8_linear_sends_one_row_to_its_gemv_and_more_rows_to_its_own_product():
    init_distributed(torch.device("cpu"))
    x, q, scale = random_product(32, 64, torch.float32, seed=3)
    layer = Int8Linear(q, scale, torch.float32)
    layer.gemv = Recording()
    expected = F.linear(x.double(), q.double() * scale.double()[:, None])
    torch.testing.assert_close(layer(x.view(1, 1, 64)).double().view(1, 32), expected, rtol=1e-5, atol=1e-6)
    assert layer.gemv.calls == 1
    layer(torch.randn(3, 1, 64))  # three rows (a batch of 3): the layer's own product
    assert layer.gemv.calls == 1


@pytest.mark.parametrize("k", [64, 200, 4096, 14336])
@pytest.mark.parametrize("cfg", G.CANDIDATES + (G.GemvConfig(2, 32, 3, 1), G.GemvConfig(1, 16, 7, 2)))
def test_every_accepted_block_shape_splits_k_into_nonempty_slices_that_cover_it(k, cfg):
    try:
        GK.check_config(cfg, k)
    except ValueError:
        assert cfg.split_k > 1  # only a split can leave a slice empty; one slice always fits
        return
    per = GK.k_per_split(k, cfg)
    assert per % cfg.block_k == 0
    starts = [s * per for s in range(cfg.split_k)]
    assert all(start < k for start in starts) and per * cfg.split_k >= k


@pytest.mark.parametrize("cfg", [(3, 64, 1, 4), (4, 8, 1, 4), (4, 64, 0, 4), (4, 64, 1, 32), (4, 64, 1, 3),
                                 (4, 64, 1, 4, 7)])
def test_block_shapes_the_kernel_cannot_take_are_refused_naming_them(cfg):
    cfg = GK.GemvConfig(*cfg)  # (the loop, where not given: Q_AHEAD)
    with pytest.raises(ValueError, match=str(tuple(cfg)).replace("(", r"\(").replace(")", r"\)")):
        GK.check_config(cfg, 256)


def test_layer_product_passes_its_loop_on_to_the_op(monkeypatch):
    """The loop picked with the block shape (GemvConfig.loop) reaches each op, after num_warps."""
    seen = []
    monkeypatch.setattr(G, "int8_gemv", lambda *args: seen.append(args[7]))
    monkeypatch.setattr(G, "rms_norm_int8_gemv", lambda *args: seen.append(args[9]))
    monkeypatch.setattr(G, "swiglu_int8_gemv", lambda *args: seen.append(args[7]))
    x = torch.zeros(1, 8)
    for loop in GK.LOOPS:
        gemv = G.Int8Gemv(GK.GemvConfig(2, 256, 1, 4, loop), G.RMS_NORM)
        gemv(x, None, None)
        gemv.after_norm(x, None, 1e-5, None, None)
        gemv.after_swiglu(x, None, None)
    assert seen == [loop for loop in GK.LOOPS for _ in range(3)]


def test_a_split_that_leaves_a_slice_empty_is_refused():
    with pytest.raises(ValueError, match="split_k=8 leaves a slice of K=256 empty"):
        GK.check_config(GK.GemvConfig(4, 64, 8, 4), 256)


def test_the_environment_picks_the_layers(monkeypatch):
    monkeypatch.delenv(G.ENV, raising=False)
    assert G.gemv_roles() == G.DEFAULT_ROLES
    for setting, roles in (("off", ()), ("all", None), ("w2, wo", ["w2", "wo"])):
        monkeypatch.setenv(G.ENV, setting)
        assert G.gemv_roles() == roles
    monkeypatch.setenv(G.ENV, "w2,w4")
    with pytest.raises(ValueError, match="w2,w4"):
        G.gemv_roles()


@pytest.mark.parametrize("setting, expected", [("auto", ("wqkv", "wo", "w13", "w2", "output")), ("wo", ("wo",)),
                                               ("off", ()),
                                               ("all", ("wqkv", "wo", "w13", "w2", "output"))])
def test_the_setting_gives_the_kernel_to_the_layers_it_names(tiny_llama, monkeypatch, setting, expected):
    """The choice of layers alone (the kernel's device check and the timing stubbed out), on the fast layers."""
    llama = tiny_llama(PARAMS, seed=6, device="cpu", quantize="int8")
    layers = {p: m for p, m in llama.model.named_modules() if isinstance(m, Int8Linear)}
    monkeypatch.setattr(G, "kernel_runs_on", lambda device: True)
    monkeypatch.setattr(G, "pick_config", lambda layers, **kw: G.CANDIDATES[0])
    monkeypatch.setenv(G.ENV, setting)
    picked = G.use_int8_gemv(layers)
    assert {p.rpartition(".")[2] for p in picked} == set(expected)
    assert all((m.gemv is not None) == (p in picked) for p, m in layers.items())
    assert len(picked) == sum(p.rpartition(".")[2] in expected for p in layers)


def test_cpu_models_keep_their_own_products(tiny_llama):
    llama = tiny_llama(PARAMS, seed=6, device="cpu", quantize="int8")
    layers = [m for m in llama.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.gemv is None for m in layers)


@pytest.mark.slow
def test_compiled_step_through_the_custom_op_gives_the_eager_tokens_and_logprobs(tiny_llama, monkeypatch):
    """The op traced whole by torch.compile (fullgraph; its fake implementation gives the shapes): on the CPU
    it runs torch's product, so this checks the tracing and the layer's dispatch, not the kernel. The step is
    compiled as on a GPU (DecodeStep), not as the CPU's whole-step compile (llama.fast.cpu_step), which
    re-forms the int8 layers for the CPU."""
    monkeypatch.setattr("llama.generation.compiles_on_cpu", lambda model: False)
    prompts = [[256, 5, 6, 7]]
    kwargs = dict(params=PARAMS, seed=6, device="cpu", quantize="int8", max_batch_size=1)
    tokens, logprobs = tiny_llama(**kwargs).generate(prompts, max_gen_len=10, temperature=0, logprobs=True)
    compiled = tiny_llama(**kwargs, compile=True)
    layers = [m for m in compiled.model.modules() if isinstance(m, Int8Linear)]
    for m in layers:
        m.gemv = G.Int8Gemv(G.CANDIDATES[0])
    tokens_c, logprobs_c = compiled.generate(prompts, max_gen_len=10, temperature=0, logprobs=True)
    assert tokens_c == tokens
    torch.testing.assert_close(torch.tensor(logprobs_c[0]), torch.tensor(logprobs[0]), rtol=0, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 200), (6144, 4096), (4096, 14336), (1000, 3000)])
def test_cuda_kernel_gives_the_product_within_its_summation_bound(shape, dtype):
    n, k = shape
    configs = list(G.CANDIDATES) + [G.GemvConfig(1, 16, 1, 1), G.GemvConfig(2, 256, 7, 2), G.GemvConfig(16, 64, 3, 4)]
    for i, cfg in enumerate(configs):
        try:
            G.check_config(cfg, k)
        except ValueError:
            continue
        x, q, scale = random_product(n, k, dtype, seed=10 + i, device="cuda")  # fresh inputs for every shape
        y = G.int8_gemv(x, q, scale, *cfg)
        assert y.shape == (1, n) and y.dtype == dtype
        assert_within_summation_bound(y.cpu(), x.cpu(), q.cpu(), scale.cpu())


@needs_kernel
def test_cuda_int8_model_takes_the_kernel_and_gives_the_logits_of_its_own_products(tiny_llama, monkeypatch):
    kwargs = dict(params=PARAMS, seed=6, device="cuda", dtype=torch.float32, quantize="int8", max_batch_size=1)
    monkeypatch.setenv(G.ENV, "off")
    plain = tiny_llama(**kwargs)
    monkeypatch.setenv(G.ENV, "all")
    gemv = tiny_llama(**kwargs)
    layers = [m for m in gemv.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(isinstance(m.gemv, G.Int8Gemv) for m in layers)
    tokens = torch.tensor([[256, 5, 6, 7, 9]], device="cuda")
    with torch.inference_mode():
        expected = plain.model.forward(tokens[:, :4], 0)
        got = gemv.model.forward(tokens[:, :4], 0)  # 4 rows: the layers' own products
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        expected = plain.model.forward(tokens[:, 4:], 4)
        got = gemv.model.forward(tokens[:, 4:], 4)  # one row: the kernel
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_picked_gemvs_names_each_layer_name_and_shape_once_with_its_kernel():
    layers = torch.nn.ModuleDict({"a": torch.nn.ModuleDict({"wo": torch.nn.Linear(64, 32)}),
                                  "b": torch.nn.ModuleDict({"wo": torch.nn.Linear(64, 32),
                                                            "w2": torch.nn.Linear(8, 4)})})
    layers["a"]["wo"].gemv = G.Int8Gemv(GK.GemvConfig(2, 256, 1, 4, GK.Q8_AHEAD2), residual=True)
    layers["b"]["wo"].gemv = G.Int8Gemv(GK.GemvConfig(8, 512, 1, 4))
    assert G.picked_gemvs(layers) == {"wo 32x64": "Int8Gemv(2, 256, 1, 4, 2), plus the residual"}
