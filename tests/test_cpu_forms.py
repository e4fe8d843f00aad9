"""llama.fast.cpu_forms: every form a decode product can take computes the product with the layer's weights
(against float64 on the dequantized weights, within a bound derived from float32 summation), and whatever
the picker picks, the model's greedy tokens are the reference loop's."""

import math
import os

import pytest
import torch

from llama import Llama
from llama.distributed import init_distributed
from llama.fast import blocked, cpu_forms
from llama.fast.blocked import BlockedProduct, block_rows
from llama.fast.cpu_forms import CompiledProduct, pick_cpu_forms, picked_forms
from llama.fast.layers import FastLinear, half_products_in_float32
from llama.fast.quantize import Int8Linear, quantize_int8

from helpers import SMALL_GQA

PARAMS = dict(SMALL_GQA, vocab_size=512)
U32 = 2.0**-24  # float32's unit roundoff
# The result's rounding to the activations' dtype.
U_OUT = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def bound(x64: torch.Tensor, w64: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """|float32 sum of K products - exact| <= gamma_K * sum |x_k w_k| (products exact in float32 for int8 or
    bf16 operands, rounded once for float32 ones: K + 1 roundings), then one rounding to the output dtype;
    a scale multiplies in one more rounding. Per output element (M, N)."""
    k = x64.shape[-1] + 2
    gamma = k * U32 / (1 - k * U32)
    exact = x64 @ w64.T
    return gamma * (x64.abs() @ w64.abs().T) * (1 + U_OUT[out_dtype]) + U_OUT[out_dtype] * exact.abs() + 1e-30


@pytest.mark.slow  # compiles (inductor)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_compiled_form_is_the_product_within_float32_summation_error(dtype, rows, int8):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 96, generator=g) / 10
    x = torch.randn(2, rows, 96, generator=g).to(dtype)  # (batch, rows, K): the form flattens the leading dims
    if int8:
        q, scale = quantize_int8(w)
        scale = scale.to(dtype)  # as Int8Linear hands it over (scale_act)
        form = CompiledProduct(q, scale)
        w64 = q.double() * scale.double()[:, None]
    else:
        w = w.to(dtype)
        form = CompiledProduct(w)
        w64 = w.double()
    y = form(x)
    assert y.shape == (2, rows, 40) and y.dtype == dtype
    x64 = x.double().reshape(-1, 96)
    err = (y.double().reshape(-1, 40) - x64 @ w64.T).abs()
    assert (err <= bound(x64, w64, dtype)).all(), float((err / bound(x64, w64, dtype)).max())


@pytest.mark.slow  # compiles (inductor)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("blocks", [2, 1.5], ids=["whole-blocks", "padded"])
@pytest.mark.parametrize("int8", [False, True, "words"], ids=["float", "int8", "int8-words"])
def test_blocked_form_is_the_product_within_float32_summation_error(dtype, rows, blocks, int8):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(1000, 96, generator=g) / 10
    if int8:
        q, scale = quantize_int8(w[:int(blocks * block_rows(torch.int8))])
        scale = scale.to(dtype)  # as Int8Linear hands it over (scale_act)
        form, held = BlockedProduct(q, scale, words=int8 == "words"), q
        assert form.blocks.dtype == (torch.int32 if int8 == "words" else torch.int8)
        w64 = q.double() * scale.double()[:, None]
    else:
        held = w[:int(blocks * block_rows(dtype))].to(dtype)
        form = BlockedProduct(held)
        w64 = held.double()
    out_features = held.shape[0]
    assert form.blocks.shape[:2] == (math.ceil(blocks), 96)  # (blocks, K, ...) with 128 bytes of weights a k
    assert form.blocks[0, 0].numel() * form.blocks.element_size() == 128
    assert torch.equal(form.dense_weight(), held)  # the blocks hold the weight, and give it back
    x = torch.randn(2, rows, 96, generator=g).to(dtype)
    y = form(x)
    assert y.shape == (2, rows, out_features) and y.dtype == dtype
    x64 = x.double().reshape(-1, 96)
    err = (y.double().reshape(-1, out_features) - x64 @ w64.T).abs()
    assert (err <= bound(x64, w64, dtype)).all(), float((err / bound(x64, w64, dtype)).max())
    # Columns a sum covers, bf16 16 or 32 (AVX2 / AVX-512), float32 and int8 8 or 16 without AVX-512
    # (torch's vector there is 8 wide): the same sums, bit for bit. (float32 and int8 with AVX-512: 16.)
    if (dtype == torch.bfloat16 and not int8) or form.lanes == 8:
        assert form.lanes == blocked.lanes(held.dtype)
        form.lanes = {8: 16, 16: 32, 32: 16}[form.lanes]
        assert torch.equal(form(x), y)
    if not int8:  # a prefill's product over the blocks as held: F.linear's, to its own rounding
        full = form.full(x)
        assert full.shape == (2, rows, out_features) and full.dtype == dtype
        torch.testing.assert_close(full, torch.nn.functional.linear(x, held), rtol=U_OUT[dtype] * 4, atol=1e-6)


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_many_row_products_in_2_byte_floats_run_in_float32_where_torch_has_no_fast_one(monkeypatch, capability,
                                                                                        dtype):
    """A prefill's products (many rows: FastLinear's plain weight, the blocked form's full(), Int8Linear's) in
    float16 always, and in bf16 without AVX-512, are made in float32 on converted copies (torch's own bf16 and
    fp16 products there ran 4-35x slower); either way each is the product to float32 summation error, rounded
    to the activations' dtype (Int8Linear: rounded, then times the scale, rounded again), in that dtype."""
    init_distributed(torch.device("cpu"))  # (FastLinear asks fairscale for its ranks)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert half_products_in_float32(dtype) == (dtype == torch.float16 or (dtype == torch.bfloat16
                                                                         and capability == "AVX2"))
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 96, generator=g).to(dtype)
    x = torch.randn(2, 16, 96, generator=g).to(dtype)
    x64, w64 = x.double().reshape(-1, 96), w.double()
    for y in (FastLinear(w)(x), BlockedProduct(w).full(x)):
        assert y.shape == (2, 16, 200) and y.dtype == dtype
        err = (y.double().reshape(-1, 200) - x64 @ w64.T).abs()
        assert (err <= bound(x64, w64, dtype)).all(), float((err / bound(x64, w64, dtype)).max())
    q, scale = quantize_int8(w.float())
    layer = Int8Linear(q, scale, dtype)
    layer.use_kernel = False
    # Under HALF_IN_FLOAT32_MIN_ROWS rows torch's own product in the dtype stays (the faster there): the
    # dtypes F.linear is called with, for 1 row and for 32.
    linear, seen = torch.nn.functional.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, b: seen.append(a.dtype) or linear(a, b))
    for product in (FastLinear(w), layer):
        seen.clear()
        product(x[:1, :1]), product(x)
        assert seen == [dtype, torch.float32 if half_products_in_float32(dtype) else dtype]
    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    y = layer(x)
    assert y.dtype == dtype
    q64 = q.double() * layer.scale_act.double()[:, None]  # the weight as the layer applies it
    err = (y.double().reshape(-1, 200) - x64 @ q64.T).abs()
    assert (err <= 2 * bound(x64, q64, dtype)).all(), float((err / bound(x64, q64, dtype)).max())


def test_int8_blocks_are_words_that_hold_every_byte_value():
    """An int8 block is held as int32 words, four rows' bytes each (whole-register loads on AVX2 too): every
    value -128..127 in every byte position comes back out, from the dense weight and from the kernel's own
    byte extraction, and each byte lands on its row."""
    w = torch.arange(256 * 3 * 4, dtype=torch.int32).remainder(256).sub(128).to(torch.int8).view(256 * 3, 4)
    w = w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))]  # (768, 4)
    words = blocked.to_blocks(w, words=True)
    assert words.dtype == torch.int32 and words.shape == (6, 4, 32)
    assert torch.equal(blocked.from_blocks(words, 768), w)
    for c in range(blocked.WORD_ROWS):  # byte c of word j of block b = row 128 b + 32 c + j
        rows = torch.arange(6)[:, None] * 128 + 32 * c + torch.arange(32)  # (6, 32)
        assert torch.equal(blocked.word_byte(words, c), w[rows].permute(0, 2, 1).to(torch.int32))


def test_an_isa_chosen_by_aten_cpu_capability_compiles_into_its_own_inductor_cache(monkeypatch):
    """torch's cache of compiled graphs does not tell ISAs apart: code generated under ATEN_CPU_CAPABILITY=avx2
    and then built for AVX-512 wrote past its buffers. So such a process gets a directory of its own, unless
    the caller chose one."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    default = os.path.abspath(default_cache_dir())
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cpu_forms.cache_per_isa()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default + "_avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)  # as inductor leaves it once it has compiled
    cpu_forms.cache_per_isa()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default + "_avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/mine")  # the caller's choice stands
    cpu_forms.cache_per_isa()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/mine"
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    cpu_forms.cache_per_isa()  # no ISA chosen: inductor's own default
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def _build(tiny_checkpoint, dtype, quantize=None):
    ckpt = tiny_checkpoint(PARAMS)
    return Llama.build(ckpt.dir, ckpt.tokenizer, max_seq_len=48, max_batch_size=2, device="cpu", dtype=dtype,
                       quantize=quantize)


def test_small_models_keep_their_default_forms(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv(cpu_forms.ENV, raising=False)
    llama = _build(tiny_checkpoint, torch.float32)  # far below PROBE_MIN_BYTES: nothing timed or compiled
    assert set(picked_forms(llama.model).values()) <= {"packed", "linear"}
    assert all(m.decode_form is None for m in llama.model.modules() if isinstance(m, FastLinear))


def test_an_unknown_llama_cpu_forms_setting_is_refused(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(cpu_forms.ENV, "fastest")
    with pytest.raises(ValueError, match="LLAMA_CPU_FORMS.*'fastest'"):
        _build(tiny_checkpoint, torch.float32)


@pytest.mark.slow  # compiles (inductor)
@pytest.mark.parametrize("quantize,how", [(None, "compiled"), (None, "blocked"), (None, "probe"), ("int8", "compiled"),
                                          ("int8", "blocked"), ("int8", "probe")])
def test_picked_forms_keep_the_greedy_tokens_and_meta_weights(tiny_checkpoint, monkeypatch, quantize, how):
    """fp32: the contract is the reference loop's greedy tokens and logits equal to float32 rounding."""
    monkeypatch.setenv(cpu_forms.ENV, "off")
    base = _build(tiny_checkpoint, torch.float32, quantize)  # default forms
    picked = _build(tiny_checkpoint, torch.float32, quantize)
    before = {k: v.clone() for k, v in picked.model.state_dict().items()}
    forms = pick_cpu_forms(picked.model, force=how) if how != "probe" else None
    if how == "probe":
        monkeypatch.setenv(cpu_forms.ENV, "probe")
        forms = pick_cpu_forms(picked.model)
        assert set(forms.values()) <= {"packed", "linear", "int8pack", "dequantize", "compiled", "blocked"}
    else:
        assert set(forms.values()) == {how}
    if how == "blocked":  # the blocks replace the weight (int8 or float, packed or not): it is held once
        assert all(m.weight is None and getattr(m, "packed", None) is None
                   for m in picked.model.modules() if getattr(m, "form_name", "") == "blocked")
    after = picked.model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)

    prompts = [[1, 5, 9, 200, 31], [7, 7, 300, 2]]
    ref, ref_lp = base.generate(prompts, max_gen_len=12, temperature=0.0, logprobs=True)
    ref_simple, _ = Llama(base.model, base.tokenizer, fast=False).generate(prompts, max_gen_len=12, temperature=0.0)
    out, lp = picked.generate(prompts, max_gen_len=12, temperature=0.0, logprobs=True)
    assert out == ref == ref_simple
    assert max(abs(a - b) for r1, r2 in zip(lp, ref_lp) for a, b in zip(r1, r2)) < 1e-4


@pytest.mark.slow  # compiles (inductor)
def test_a_form_that_cannot_be_built_is_left_out_with_a_warning(monkeypatch):
    init_distributed(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    layer = FastLinear(torch.randn(32, 64, generator=g), pack=True)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpu_forms, "compiled_kernel", broken)
    monkeypatch.setattr(blocked, "blocked_kernel", broken)
    monkeypatch.setenv(cpu_forms.ENV, "probe")
    model = torch.nn.Sequential(layer)
    with pytest.warns(UserWarning) as warned:
        forms = pick_cpu_forms(model)
    messages = [str(w.message) for w in warned]
    for name in ("compiled", "blocked"):
        assert any(f"'{name}' form" in m and "cannot be built here" in m for m in messages), messages
    assert list(forms.values()) == ["packed"] and layer.packed is not None


def test_q8_0_gguf_holds_the_weights_within_half_a_block_step(tmp_path):
    gguf = pytest.importorskip("gguf")
    from llama.checkpoints.gguf import write_gguf
    from llama.model import ModelArgs

    from helpers import random_state_dict

    params = dict(SMALL_GQA, vocab_size=300)
    sd = random_state_dict(params)
    path = write_gguf(tmp_path / "q.gguf", ModelArgs.from_params(params, max_seq_len=32), sd, torch.float32,
                      quantize="q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # read a row at a time
    t = tensors["blk.0.ffn_gate.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    w = sd["layers.0.feed_forward.w1.weight"]
    got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(w.shape)
    # Q8_0 by its definition: blocks of 32 of a row, d = max|w| / 127 stored as float16, q = round(w / d).
    blockmax = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True)
    step = (blockmax / 127).expand(-1, -1, 32).reshape(w.shape)
    assert ((got - w).abs() <= step / 2 + blockmax.expand(-1, -1, 32).reshape(w.shape) * 2.0**-10).all()
    with pytest.raises(ValueError, match="'q4_0'"):
        write_gguf(tmp_path / "x.gguf", ModelArgs.from_params(params, max_seq_len=32), sd, torch.float32,
                   quantize="q4_0")
    assert not math.isnan(float(got.sum()))


@pytest.mark.slow  # the benchmark end to end, compiling (inductor) and, where installed, llama.cpp
def test_bench_records_the_picked_forms_the_cpu_and_llamacpp_q8_0_beside_int8(tmp_path, monkeypatch):
    import json

    import bench.run as bench

    from helpers import SMALL_SCALED

    llamacpp = []
    try:
        import llama_cpp  # noqa: F401

        llamacpp = ["--llamacpp"]
    except ImportError:
        pass
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(SMALL_SCALED, vocab_size=320))
    monkeypatch.setenv(cpu_forms.ENV, "probe")  # the tiny model is below PROBE_MIN_BYTES
    out = tmp_path / "b.json"
    bench.main(["--shape", "tiny", "--batch", "1", "--dtype", "float32", "--new-tokens", "6", "--prompt-len", "5",
                "--repeats", "2", "--no-hf", "--quantize", "int8", "--default-forms", "--device", "cpu",
                "--threads", "1", "--out", str(out), "--chart", "", *llamacpp])
    report = json.loads(out.read_text())
    machine = report["machine"]
    assert machine["lscpu_model_name"] and "sse2" in machine["lscpu_flags"].split()
    assert machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    forms = report["picked_forms"]["float32"]
    assert set(forms) == {"ours", "ours-int8"}
    assert all(f in ("packed", "linear", "compiled", "blocked") for f in forms["ours"].values())
    assert all(f in ("int8pack", "dequantize", "compiled", "blocked") for f in forms["ours-int8"].values())
    [res] = report["results"]
    for name in ("ours", "ours-int8", "ours-default", "ours-int8-default"):
        assert res[name]["decode_tok_s"] > 0
    assert res["median_round_ratio_ours_picked_forms"] > 0 and len(res["load_average"]) == 3
    if llamacpp:
        assert res["llama.cpp-q8_0"]["decode_tok_s"] > 0 and res["ratio_llamacpp_q8_0"] > 0
        # Q8_0: 34 bytes per 32 weights, against our 1 byte per weight plus a scale per row.
        assert res["llama.cpp-q8_0"]["bytes_per_decode_step"] != res["ours-int8"]["bytes_per_decode_step"]
        assert "AVX2" in report["llamacpp_system_info"]
