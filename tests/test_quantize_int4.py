"""int4 weight-only quantization, group-wise (llama.fast.quantize_int4): the scheme against its definition
recomputed in float64, torch's int4 kernels (the CPU one here, the CUDA one on a GPU: tests named "cuda")
against the float64 product with the dequantized weight within derived bounds, and the tiny model against the
same model holding those dequantized weights in float."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.checkpoints.convert import convert
from llama.distributed import init_distributed
from llama.fast.quantize_int4 import (Int4Linear, dequantize_int4, int4_group, int4pack_mm_works, pack_nibbles,
                                      quantize_int4, unpack_nibbles)

from helpers import SMALL_GQA

PARAMS = dict(SMALL_GQA, vocab_size=512)  # in_features 64 (group 64) and 224 (w2: group 32)
LINEAR = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
          "feed_forward.w3")
CUDA = torch.cuda.is_available()
# Whether this torch has the CPU kernel at all (whether it works is what the tests check: no skip for that).
CPU_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


def linear_names(params):
    return [f"layers.{i}.{m}.weight" for i in range(params["n_layers"]) for m in LINEAR] + ["output.weight"]


def float64_dequantized(q, scale, zero):
    """The definition, in float64: W = (Q - 8) * scale + zero, scale and zero repeated over their group."""
    group = q.shape[1] // scale.shape[1]
    s = scale.double().repeat_interleave(group, dim=1)
    return (q.double() - 8) * s + zero.double().repeat_interleave(group, dim=1)


def float64_quantized(w, group):
    """The scheme recomputed in float64 from its definition, group by group: lo, hi the group's min and max,
    scale = (hi - lo) / 15, Q = round((w - lo) / scale) in 0..15 (0 where scale is 0), zero = lo + 8 scale."""
    w = w.double().view(w.shape[0], -1, group)
    lo, hi = w.amin(dim=2, keepdim=True), w.amax(dim=2, keepdim=True)
    scale = (hi - lo) / 15
    ratio = torch.where(scale > 0, (w - lo) / torch.where(scale > 0, scale, 1), 0)
    q = ratio.round().clamp(0, 15)
    return q.view(w.shape[0], -1), ratio.view(w.shape[0], -1), scale[..., 0], (lo + 8 * scale)[..., 0]


def int4_layers(llama):
    return {name: m for name, m in llama.model.named_modules() if isinstance(m, Int4Linear)}


def test_quantize_int4_gives_the_definitions_values_and_every_weight_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 512, generator=g) * torch.rand(96, 1, generator=g)  # rows of different ranges
    w[3, 128:256] = 0.25  # a constant group comes back exactly
    w[5, :128] = 0  # a group of zeros stays zeros
    q, scale, zero = quantize_int4(w, 128)
    assert q.dtype == torch.uint8 and q.shape == w.shape and scale.shape == zero.shape == (96, 4)
    q64, ratio, scale64, zero64 = float64_quantized(w, 128)
    torch.testing.assert_close(scale.double(), scale64, rtol=1e-6, atol=0)
    torch.testing.assert_close(zero.double(), zero64, rtol=1e-6, atol=4e-7 * w.abs().max().item())  # lo + 8 s: cancels
    # The codes agree except where float32 and float64 round a value lying on a half differently.
    near_half = ((ratio - ratio.floor()) - 0.5).abs() < 1e-4
    assert torch.equal(q.double()[~near_half], q64[~near_half]) and near_half.float().mean() < 1e-3
    assert q.max() == 15 and q.min() == 0  # each group reaches both ends of the range
    deq = dequantize_int4(q, scale, zero)  # float32, as the layers form it
    expected = float64_dequantized(q, scale, zero)
    torch.testing.assert_close(deq.double(), expected, rtol=0, atol=4e-7 * w.abs().max().item())
    half_step = scale.double().repeat_interleave(128, dim=1) / 2
    assert ((expected - w.double()).abs() <= half_step * (1 + 1e-5) + 1e-7).all()
    assert scale[3, 1] == 0 and torch.equal(deq[3, 128:256], w[3, 128:256])  # constant: exact
    assert scale[5, 0] == 0 and zero[5, 0] == 0 and deq[5, :128].eq(0).all()  # zeros: zeros


def test_int4_group_is_128_else_the_largest_of_64_and_32_dividing_in_features():
    assert [int4_group(k) for k in (4096, 14336, 704, 224, 96)] == [128, 128, 64, 32, 32]
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wo's in_features 48"):
        int4_group(48, "layers.0.attention.wo")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("kernel", [True, False], ids=["int4pack_mm_for_cpu", "dequantize"])
@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 5, 512), (2, 20, 512)], ids=["one-row", "batch", "prefill"])
def test_int4_linear_equals_the_float64_product_with_the_dequantized_weight(kernel, dtype, shape):
    if kernel and not CPU_KERNEL:
        pytest.skip("this torch has no CPU _weight_int4pack_mm_for_cpu")
    init_distributed(torch.device("cpu"))  # one process, one rank (what Llama.build starts)
    check_layer_product(torch.device("cpu"), dtype, shape, kernel)


def check_layer_product(device, dtype, shape, kernel):
    """The layer's product against float64 on the weight dequantized from its scales and zeros as it holds
    them (in `dtype`). The bound, derived: the dequantized weight (Q - 8) s + z is formed in float32 or in
    `dtype` (at most two roundings, each within u = the dtype's unit roundoff of |(Q - 8) s| <= 8 s and of
    |w|), the products summed in float32 (K 2^-24 relative to sum |x w| at worst), the output rounded to
    `dtype` (u |y|): |y - y64| <= 2u sum_k |x_k| (8 s_k + |w_k|) + K 2^-24 sum_k |x_k w_k| + u |y64|, twice
    that allowed."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, shape[-1], generator=g) / 8
    x = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    q, scale, zero = quantize_int4(w, 128)
    layer = Int4Linear(q.to(device), scale.to(device), zero.to(device), dtype)
    if kernel:
        assert layer.kernel is not None
    else:  # the layer without a kernel: codes two to a byte, the product with the dequantized weight
        layer.weight, layer.kernel = pack_nibbles(q.to(device)), None
    s_held, z_held = scale.to(dtype), zero.to(dtype)  # the scales and zeros as the layer holds them
    w64 = float64_dequantized(q, s_held, z_held)  # (out, in)
    x64 = x.double().cpu()
    y64 = F.linear(x64, w64)
    y = layer(x)
    assert y.shape == (*shape[:-1], 64) and y.dtype == dtype
    u = 2.0 ** -24 if dtype == torch.float32 else 2.0 ** -8
    s64 = s_held.double().repeat_interleave(128, dim=1)
    bound = (2 * u * F.linear(x64.abs(), 8 * s64 + w64.abs()) + shape[-1] * 2.0 ** -24 * F.linear(x64.abs(), w64.abs())
             + u * y64.abs())
    err = (y.double().cpu() - y64).abs()
    assert (err <= 2 * bound).all(), (err / bound).max()


def dequantized_checkpoint(ckpt, tmp_path, params):
    """An independent model: the checkpoint with every linear weight replaced by its int4-dequantized values
    (the scheme recomputed in float64, stored float32), loaded without quantization."""
    float_dir = tmp_path / "dequantized"
    shutil.copytree(ckpt.dir, float_dir)
    sd = dict(ckpt.state_dict)
    for name in linear_names(params):
        w = sd[name]
        q, _, scale, zero = float64_quantized(w, int4_group(w.shape[1]))
        sd[name] = float64_dequantized(q, scale, zero).float()
    torch.save(sd, float_dir / "consolidated.00.pth")
    return float_dir, sd


def test_int4_model_gives_the_greedy_tokens_of_the_float_model_on_the_dequantized_weights(tiny_checkpoint, tiny_llama,
                                                                                         tmp_path):
    ckpt = tiny_checkpoint(PARAMS, seed=4)
    float_dir, sd = dequantized_checkpoint(ckpt, tmp_path, PARAMS)
    expected = Llama.build(str(float_dir), None, 64, 2, device="cpu")
    prompts = [[1, 2, 3, 4], [300, 20, 7]]
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    want_tokens = expected.generate(prompts, max_gen_len=24, temperature=0, ignore_eos=True)[0]
    want_logits = expected.model.forward(tokens, 0)
    for fast in (True, False):
        int4 = tiny_llama(PARAMS, seed=4, device="cpu", fast=fast, quantize="int4", max_batch_size=2)
        assert all(m.kernel == ("cpu" if CPU_KERNEL else None) for m in int4_layers(int4).values())
        torch.testing.assert_close(int4.model.forward(tokens, 0), want_logits, rtol=1e-4, atol=1e-4)
        assert int4.generate(prompts, max_gen_len=24, temperature=0, ignore_eos=True)[0] == want_tokens, fast


def test_int4_fast_and_reference_paths_agree_and_keep_metas_state_dict(tiny_checkpoint, tiny_llama, tmp_path):
    ckpt = tiny_checkpoint(PARAMS, seed=5)
    _, dequantized = dequantized_checkpoint(ckpt, tmp_path, PARAMS)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = {}
    for fast in (True, False):
        llama = tiny_llama(PARAMS, seed=5, device="cpu", fast=fast, quantize="int4", max_batch_size=2)
        layers = int4_layers(llama)
        assert len(layers) == (9 if fast else 15) and all(m.group in (64, 32) for m in layers.values())
        sd = llama.model.state_dict()
        assert list(sd) == list(ckpt.state_dict)  # Meta's keys, in Meta's order
        for name in ckpt.state_dict:
            assert sd[name].shape == ckpt.state_dict[name].shape, name
        for name in linear_names(PARAMS):  # the dequantized weights, as the kernel reads them
            torch.testing.assert_close(sd[name], dequantized[name], rtol=0, atol=1e-6)
        for name in ("tok_embeddings.weight", "norm.weight"):
            assert torch.equal(sd[name], ckpt.state_dict[name])  # not quantized
        logits[fast] = llama.model.forward(tokens, 0)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_int4_refuses_a_model_whose_inputs_no_group_divides_naming_the_layer_before_loading(tiny_checkpoint,
                                                                                          monkeypatch):
    params = dict(dim=48, n_layers=1, n_heads=4, multiple_of=16, norm_eps=1e-5, vocab_size=512)
    ckpt = tiny_checkpoint(params, seed=1)

    def load_into(*args, **kwargs):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr("llama.generation.load_into", load_into)
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq's in_features 48") as e:
        Llama.build(str(ckpt.dir), None, 32, 1, device="cpu", quantize="int4")
    assert "128 or 64 or 32" in str(e.value)


def test_int4_bad_values_are_refused_with_the_offending_values(tmp_path):
    with pytest.raises(ValueError, match="int4 checkpoints are not written"):
        convert(str(tmp_path / "no-such-checkpoint"), str(tmp_path / "out"), quantize="int4")
    with pytest.raises(ValueError, match=r"torch.int32 \(8, 64\)"):
        quantize_int4(torch.zeros(8, 64, dtype=torch.int32), 32)
    with pytest.raises(ValueError, match="group 128 does not divide the weight's in_features 64"):
        quantize_int4(torch.zeros(8, 64), 128)
    q, scale, zero = quantize_int4(torch.randn(16, 64), 32)
    with pytest.raises(ValueError, match=r"\(16, 2\) and \(16, 1\)"):
        Int4Linear(q, scale, zero[:, :1], torch.float32)


def test_int4_refuses_a_checkpoint_stored_int8(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(PARAMS, seed=2)
    convert(str(ckpt.dir), str(tmp_path / "int8"), quantize="int8")
    with pytest.raises(ValueError, match="is stored int8: it cannot be quantized to int4"):
        Llama.build(str(tmp_path / "int8"), None, 32, 1, device="cpu", quantize="int4")


def test_unpack_nibbles_undoes_the_layer_s_byte_packing():
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    packed = pack_nibbles(q)
    assert packed.shape == (16, 32) and torch.equal(packed[0, 0], (q[0, 0] << 4) | q[0, 1])
    assert torch.equal(unpack_nibbles(packed), q)


# ---- CUDA: torch's tinygemm kernel (bf16 activations) ------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1, 4096), (2, 3, 4096), (1, 40, 14336)], ids=["one-row", "batch", "prefill"])
def test_cuda_int4_kernel_equals_the_float64_product_with_the_dequantized_weight(shape):
    init_distributed(torch.device("cuda"))
    assert int4pack_mm_works(torch.device("cuda"), torch.bfloat16)
    check_layer_product(torch.device("cuda"), torch.bfloat16, shape, kernel=True)


@needs_cuda
def test_cuda_int4_model_gives_the_greedy_tokens_of_the_bf16_model_on_its_dequantized_weights(tiny_checkpoint,
                                                                                              tiny_llama):
    """The int4 model (tinygemm on every product) against the same model in bf16 holding the int4 model's own
    dequantized weights (its state_dict): the same greedy tokens, eager and compiled."""
    prompts = [[1, 2, 3, 4], [300, 20, 7]]
    int4 = tiny_llama(PARAMS, seed=4, device="cuda", dtype=torch.bfloat16, quantize="int4", max_batch_size=2)
    assert all(m.kernel == "cuda" for m in int4_layers(int4).values())
    base = tiny_llama(PARAMS, seed=4, device="cuda", dtype=torch.bfloat16, fast=False, max_batch_size=2)
    base.model.load_state_dict(int4.model.state_dict())
    want = base.generate(prompts, max_gen_len=16, temperature=0, ignore_eos=True)[0]
    assert int4.generate(prompts, max_gen_len=16, temperature=0, ignore_eos=True)[0] == want
    compiled = tiny_llama(PARAMS, seed=4, device="cuda", dtype=torch.bfloat16, quantize="int4", max_batch_size=2,
                          compile=True)
    assert compiled.generate(prompts, max_gen_len=16, temperature=0, ignore_eos=True)[0] == want
