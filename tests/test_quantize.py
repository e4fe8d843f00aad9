"""int8 weight-only quantization (llama.fast.quantize, llama.checkpoints.quantized): the scheme as written here
from its definition, the layers against the dequantized weights, the model against float32 within a derived
tolerance, int8 checkpoints that reload bit for bit, and bad input refused before any loading."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.checkpoints.convert import convert
from llama.distributed import init_distributed
from llama.fast.quantize import Int8Linear, int8pack_mm_works, quantize_int8

from helpers import SMALL_GQA, SMALL_MHA, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
LINEAR = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
          "feed_forward.w3")
PARAMS = dict(SMALL_GQA, vocab_size=512)


def reference_quantize(w: torch.Tensor):
    """The scheme from its definition, in float32 as it says: scale = max|w| / 127 per row, q = w / scale
    rounded to the nearest integer (half to even), clamped to [-127, 127]; a zero row has scale 0 and q 0."""
    w = w.float()
    scale = w.abs().max(dim=1).values / 127
    q = torch.zeros(w.shape, dtype=torch.int8)
    for r in range(w.shape[0]):  # row by row, as the definition reads
        if scale[r] > 0:
            q[r] = torch.round(w[r] / scale[r]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantized(q, scale):
    return q.float() * scale[:, None]


def linear_names(params):
    names = [f"layers.{i}.{m}.weight" for i in range(params["n_layers"]) for m in LINEAR]
    return names + ["output.weight"]


def int8_layers(llama):
    return {name: m for name, m in llama.model.named_modules() if isinstance(m, Int8Linear)}


def test_quantize_int8_gives_the_definitions_values():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g) * torch.rand(96, 1, generator=g)  # rows of different ranges
    w[5] = 0  # a row of zeros stays zeros
    w[7, 3] = -w[7].abs().max() * 2  # a row whose extreme is negative maps it to -127
    q, scale = quantize_int8(w)
    q_ref, scale_ref = reference_quantize(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)
    assert q[5].eq(0).all() and scale[5] == 0 and q[7, 3] == -127
    assert (q.int().abs().amax(dim=1)[scale > 0] == 127).all()  # every nonzero row reaches the full range
    # Round to nearest: every weight within half a step of its dequantized value.
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("kernel", [True, False], ids=["int8pack_mm", "dequantize"])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 64), (2, 20, 64)], ids=["one-row", "batch", "prefill"])
def test_int8_linear_equals_f_linear_on_the_dequantized_weight(kernel, shape):
    if kernel and not int8pack_mm_works(torch.device("cpu"), torch.float32):
        pytest.skip("this torch has no CPU _weight_int8pack_mm")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g) / 8
    x = torch.randn(*shape, generator=g)
    q, scale = reference_quantize(w)
    init_distributed(torch.device("cpu"))  # one process, one rank (what Llama.build starts)
    layer = Int8Linear(q, scale, torch.float32)
    layer.use_kernel = kernel
    expected = F.linear(x.double(), dequantized(q, scale).double())  # float64: the exact product, nearly
    y = layer(x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_holds_metas_keys_with_the_dequantized_weights(tiny_checkpoint, tiny_llama):
    ckpt = tiny_checkpoint(PARAMS, seed=3)
    for fast in (True, False):
        llama = tiny_llama(PARAMS, seed=3, device="cpu", fast=fast, quantize="int8")
        sd = llama.model.state_dict()
        assert list(sd) == list(ckpt.state_dict)  # Meta's keys, in Meta's order
        for name in linear_names(PARAMS):
            assert torch.equal(sd[name], dequantized(*reference_quantize(ckpt.state_dict[name]))), name
        for name in ("tok_embeddings.weight", "norm.weight"):
            assert torch.equal(sd[name], ckpt.state_dict[name])  # not quantized


@pytest.mark.parametrize("params", [PARAMS, dict(SMALL_MHA, vocab_size=512)], ids=["gqa", "mha"])
def test_int8_model_gives_the_float_models_logits_on_the_dequantized_weights(tiny_checkpoint, tiny_llama, tmp_path,
                                                                             params):
    """An independent model: float32 weights Q * scale written to a checkpoint, loaded without quantization."""
    ckpt = tiny_checkpoint(params, seed=4)
    float_dir = tmp_path / "dequantized"
    shutil.copytree(ckpt.dir, float_dir)
    sd = dict(ckpt.state_dict)
    for name in linear_names(params):
        sd[name] = dequantized(*reference_quantize(sd[name]))
    torch.save(sd, float_dir / "consolidated.00.pth")
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = Llama.build(str(float_dir), None, 64, 2, device="cpu").model.forward(tokens, 0)
    for fast in (True, False):
        int8 = tiny_llama(params, seed=4, device="cpu", fast=fast, quantize="int8", max_batch_size=2)
        torch.testing.assert_close(int8.model.forward(tokens, 0), expected, rtol=1e-4, atol=1e-4)


def test_int8_logits_stay_within_the_quantization_error_of_the_float32_logits(tiny_llama):
    """The tolerance, derived: rounding moves each weight by at most scale / 2, uniformly, so by scale / sqrt(12)
    RMS, where scale = max|w_row| / 127. For these N(0, 1/fan_in) rows of 64..224 elements max|w| is about
    2.5-3 standard deviations, so each product's output moves by r = 3 / (127 sqrt(12)) = 0.7% of its RMS.
    The logits pass through 15 quantized products (7 per layer, 2 layers, and the output); with errors
    independent, at most sqrt(15) r = 2.6% of the logits' RMS (less: the residual stream carries the
    unquantized embedding too). The test allows 2x that, 5.3%, and checks the error is not zero."""
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    base = tiny_llama(PARAMS, seed=6, device="cpu").model.forward(tokens, 0)
    int8 = tiny_llama(PARAMS, seed=6, device="cpu", quantize="int8").model.forward(tokens, 0)
    bound = 2 * math.sqrt(15) * 3 / (127 * math.sqrt(12))
    relative_rms = ((int8 - base).pow(2).mean().sqrt() / base.pow(2).mean().sqrt()).item()
    assert 1e-4 < relative_rms < bound
    assert (int8.argmax(-1) == base.argmax(-1)).float().mean() > 0.9


def test_demo_model_int8_greedy_tokens_mostly_agree_with_float32():
    """Greedy continuations part for good at the first token that differs, so agreement is counted as each
    continuation's agreeing prefix. Measured: 99 of 128 tokens (3 of 4 continuations whole); bf16 against
    float32 parts as often (scripts/quantization_quality.py: 5/16 identical continuations, int8 9/16)."""
    from llama.cli.demo import DEMO_DIR

    prompts = ["It is a truth universally acknowledged, that", "Elizabeth could not help", "Mr. Knightley",
               "Emma Woodhouse, handsome, clever, and rich,"]
    runs = {}
    for quantize in (None, "int8"):
        llama = Llama.build(str(DEMO_DIR), None, 128, 4, device="cpu", quantize=quantize)
        tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        runs[quantize] = llama.generate(tokens, max_gen_len=32, temperature=0, ignore_eos=True)[0]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(*runs.values())]
    assert sum(prefix) >= 0.6 * 4 * 32, (prefix, runs)


@pytest.mark.parametrize("bad", ["int2", "INT8", "int-8", 8, "fp8"])
def test_unknown_quantize_value_is_refused_naming_it_and_the_choices_before_loading(bad, tmp_path):
    with pytest.raises(ValueError) as e:  # a missing checkpoint: any loading would raise FileNotFoundError
        Llama.build(str(tmp_path / "no-such-checkpoint"), None, 64, 1, quantize=bad)
    assert repr(bad) in str(e.value) and "'int8'" in str(e.value)
    with pytest.raises(ValueError, match=repr(bad)):
        convert(str(tmp_path / "no-such-checkpoint"), str(tmp_path / "out"), quantize=bad)


@pytest.fixture(scope="module")
def int8_dirs(tiny_checkpoint, tmp_path_factory):
    """A float checkpoint and its int8 conversions (1 and 2 shards) written by python -m llama.convert."""
    ckpt = tiny_checkpoint(PARAMS, seed=7)
    out = tmp_path_factory.mktemp("int8")
    for shards in (1, 2):
        run = subprocess.run(
            [sys.executable, "-m", "llama.convert", str(ckpt.dir), str(out / f"int8x{shards}"), "--quantize", "int8",
             "--shards", str(shards)], capture_output=True, text=True, cwd=ROOT, env=subprocess_env())
        assert run.returncode == 0, run.stderr
    return ckpt, out / "int8x1", out / "int8x2"


def test_converted_int8_checkpoint_holds_the_documented_layout(int8_dirs):
    ckpt, one, two = int8_dirs
    params = json.loads((one / "params.json").read_text())
    assert params == dict(ckpt.params, quantization={"type": "int8_weight_only", "group": "per_channel"})
    assert (one / "tokenizer.model").read_bytes() == ckpt.tokenizer.read_bytes()
    shard = torch.load(one / "consolidated.00.pth", weights_only=True)
    for name in linear_names(PARAMS):
        q, scale = reference_quantize(ckpt.state_dict[name])
        scale_key = name[: -len("weight")] + "scale"
        assert torch.equal(shard[name], q) and torch.equal(shard[scale_key], scale), name
    assert torch.equal(shard["tok_embeddings.weight"], ckpt.state_dict["tok_embeddings.weight"])
    halves = [torch.load(two / f"consolidated.0{r}.pth", weights_only=True) for r in (0, 1)]
    wq, wo = "layers.0.attention.wq", "layers.0.attention.wo"
    assert torch.equal(torch.cat([h[wq + ".weight"] for h in halves]), shard[wq + ".weight"])  # rows cut
    assert torch.equal(torch.cat([h[wq + ".scale"] for h in halves]), shard[wq + ".scale"])
    assert torch.equal(torch.cat([h[wo + ".weight"] for h in halves], dim=1), shard[wo + ".weight"])  # columns
    assert all(torch.equal(h[wo + ".scale"], shard[wo + ".scale"]) for h in halves)  # the full rows' scales


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_int8_checkpoint_reloads_bit_identical_with_identical_logits(int8_dirs, fast):
    ckpt, one, two = int8_dirs
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    quantized_here = Llama.build(str(ckpt.dir), None, 64, 2, device="cpu", fast=fast, quantize="int8")
    expected_layers = int8_layers(quantized_here)
    expected = quantized_here.model.forward(tokens, 0)
    for stored in (one, two):  # quantize=None: a stored int8 checkpoint loads int8 as it is
        llama = Llama.build(str(stored), None, 64, 2, device="cpu", fast=fast)
        layers = int8_layers(llama)
        assert layers.keys() == expected_layers.keys() and len(layers) == (9 if fast else 15)
        assert torch.equal(layers["output"].scale, reference_quantize(ckpt.state_dict["output.weight"])[1])
        for name, layer in layers.items():
            assert torch.equal(layer.weight, expected_layers[name].weight), name
            assert torch.equal(layer.scale, expected_layers[name].scale), name
        assert torch.equal(llama.model.forward(tokens, 0), expected)


def test_int8_checkpoint_refuses_to_be_quantized_again_or_written_for_hugging_face(int8_dirs, tmp_path):
    _, one, _ = int8_dirs
    with pytest.raises(ValueError, match="already int8"):
        convert(str(one), str(tmp_path / "again"), quantize="int8")
    with pytest.raises(ValueError, match="already int8"):
        convert(str(one), str(tmp_path / "hf"), to="hf")


def test_unknown_stored_quantization_is_refused_naming_it(int8_dirs, tmp_path):
    _, one, _ = int8_dirs
    bad = tmp_path / "bad"
    shutil.copytree(one, bad)
    params = json.loads((bad / "params.json").read_text())
    params["quantization"] = {"type": "int4_weight_only", "group": 32}
    (bad / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="int4_weight_only"):
        Llama.build(str(bad), None, 64, 1, device="cpu")


def test_int8_declared_checkpoint_with_float_weights_is_refused(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(PARAMS, seed=7)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt.dir, bad)
    params = dict(ckpt.params, quantization={"type": "int8_weight_only", "group": "per_channel"})
    (bad / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="missing tensors"):  # no scales
        Llama.build(str(bad), None, 64, 1, device="cpu")


def test_cli_takes_quantize(tiny_checkpoint):
    ckpt = tiny_checkpoint(PARAMS, seed=7)
    for quantize in ("int8", "int4"):
        run = subprocess.run(
            [sys.executable, "-m", "llama", "--ckpt_dir", str(ckpt.dir), "--prompt", "ab", "--temperature", "0",
             "--max_gen_len", "4", "--quantize", quantize, "--device", "cpu", "--no_progress"],
            capture_output=True, text=True, cwd=ROOT, env=subprocess_env())
        assert run.returncode == 0, run.stderr
    bad = subprocess.run([sys.executable, "-m", "llama", "--ckpt_dir", str(ckpt.dir), "--quantize", "int2"],
                         capture_output=True, text=True, cwd=ROOT, env=subprocess_env())
    assert bad.returncode == 2 and "int2" in bad.stderr and "int8" in bad.stderr and "int4" in bad.stderr


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_int8_logits(tiny_checkpoint, tmp_path):
    """Each rank quantizes its own slice; row-parallel layers all-reduce their rows' maxima first, so the two
    ranks hold exactly the one rank's int8 weights, and the logits differ by summation order only."""
    one_shard, two_shards = (tiny_checkpoint(PARAMS, seed=8, n_shards=n) for n in (1, 2))
    worker = str(ROOT / "tests" / "int8_mp_worker.py")
    env = subprocess_env(OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, worker, str(one_shard.dir), str(tmp_path / "one.pt")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             worker, str(two_shards.dir), str(tmp_path / "two.pt")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert double.returncode == 0, double.stderr[-4000:]
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert (one["world"], two["world"]) == (1, 2)
    (whole,), halves = one["ranks"], two["ranks"]
    assert whole.keys() == halves[0].keys() == halves[1].keys() and len(whole) == 15
    for name, (q, scale) in whole.items():
        (q0, scale0), (q1, scale1) = halves[0][name], halves[1][name]
        if name.endswith(("wo", "w2")):  # row-parallel: each rank a block of columns, the full rows' scales
            assert torch.equal(torch.cat([q0, q1], dim=1), q), name
            assert torch.equal(scale0, scale) and torch.equal(scale1, scale), name
        else:  # column-parallel: each rank a block of rows with their scales
            assert torch.equal(torch.cat([q0, q1]), q) and torch.equal(torch.cat([scale0, scale1]), scale), name
    rel = ((one["logits"] - two["logits"]).abs().max() / one["logits"].abs().max()).item()
    assert rel <= 1e-5
    assert one["generated"] == two["generated"]


@pytest.mark.slow
def test_compiled_int8_step_gives_the_eager_greedy_tokens_and_logprobs(tiny_llama):
    prompts = [[256, 5, 6, 7], [256, 1]]
    eager = tiny_llama(PARAMS, seed=6, device="cpu", quantize="int8", max_batch_size=2)
    compiled = tiny_llama(PARAMS, seed=6, device="cpu", quantize="int8", max_batch_size=2, compile=True)
    tokens, logprobs = eager.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    tokens_c, logprobs_c = compiled.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    assert tokens_c == tokens
    for row, row_c in zip(logprobs, logprobs_c):
        torch.testing.assert_close(torch.tensor(row_c), torch.tensor(row), rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_batch_one_int8_step_gives_the_eager_greedy_tokens(tiny_llama):
    """On CUDA the compiled one-row products are inductor's own reductions (not the eager kernel): the same
    float32 greedy tokens, log-probabilities to summation order."""
    prompts = [[256, 5, 6, 7]]
    kwargs = dict(params=PARAMS, seed=6, device="cuda", dtype=torch.float32, quantize="int8", max_batch_size=1)
    tokens, logprobs = tiny_llama(**kwargs).generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    compiled = tiny_llama(**kwargs, compile=True)
    tokens_c, logprobs_c = compiled.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    assert tokens_c == tokens
    torch.testing.assert_close(torch.tensor(logprobs_c[0]), torch.tensor(logprobs[0]), rtol=0, atol=1e-5)
