"""llama.checkpoints.gguf: the GGUF file holds our weights and hyper-parameters, and llama.cpp runs it as we do.

The first tests read the file back with the gguf package's own reader (a parser we did not write). The
llama.cpp tests run it (llama-cpp-python, installed by hand; they skip without it): llama.cpp's logits for
every position of a random prompt, and its greedy tokens, against ours on the same weights. That is what
shows the layout is right: a wrong RoPE pairing or a swapped w1/w3 changes the logits by far more than
float32 rounding.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from helpers import SMALL_GQA, SMALL_SCALED, random_state_dict

gguf = pytest.importorskip("gguf")

from llama.distributed import init_distributed  # noqa: E402
from llama.checkpoints.gguf import write_gguf  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402

# llama.cpp's tensor names for Meta's (from llama.cpp's "llama" architecture), written out here rather than
# taken from the exporter.
NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
         "output.weight": "output.weight"}
for _i in range(2):
    for _meta, _cpp in [("attention_norm", "attn_norm"), ("attention.wq", "attn_q"), ("attention.wk", "attn_k"),
                        ("attention.wv", "attn_v"), ("attention.wo", "attn_output"), ("ffn_norm", "ffn_norm"),
                        ("feed_forward.w1", "ffn_gate"), ("feed_forward.w3", "ffn_up"),
                        ("feed_forward.w2", "ffn_down")]:
        NAMES[f"layers.{_i}.{_meta}.weight"] = f"blk.{_i}.{_cpp}.weight"

MAX_SEQ_LEN = 40


def model_args(params, vocab_size=300):
    return ModelArgs.from_params(dict(params, vocab_size=vocab_size), max_seq_len=MAX_SEQ_LEN, max_batch_size=1)


def field(reader, key):
    return reader.get_field(key).contents()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_tensor_reads_back_bit_for_bit_under_llamacpp_names(tmp_path, dtype):
    """Matrices in the asked dtype, norms in float32 (exact for 16-bit values), shapes innermost first."""
    params = dict(SMALL_GQA, vocab_size=300)
    sd = random_state_dict(params, seed=1, dtype=dtype)
    path = write_gguf(tmp_path / "m.gguf", model_args(SMALL_GQA), sd, dtype)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(NAMES.values())
    want_type = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    for meta, cpp in NAMES.items():
        t, source = tensors[cpp], sd[meta]
        assert list(t.shape) == list(reversed(source.shape)), cpp  # GGUF lists dims innermost first
        if source.dim() == 1:
            assert t.tensor_type.name == "F32"
            assert np.array_equal(np.asarray(t.data).reshape(-1), source.float().numpy()), cpp
        else:
            assert t.tensor_type.name == want_type
            bits = source.contiguous().view(torch.int16) if dtype == torch.bfloat16 else source.contiguous()
            assert np.asarray(t.data).tobytes() == bits.numpy().tobytes(), cpp


def test_metadata_holds_the_hyper_parameters(tmp_path):
    args = model_args(SMALL_GQA)
    path = write_gguf(tmp_path / "m.gguf", args, random_state_dict(dict(SMALL_GQA, vocab_size=300)), torch.float32)
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "tokenizer.ggml.model") == "no_vocab"
    # SMALL_GQA: dim 64, 2 layers, 8 heads, 2 KV heads, FFN hidden int(int(2 * 256 / 3) * 1.3) = 221,
    # rounded up to a multiple of 32: 224
    expected = {"context_length": MAX_SEQ_LEN, "embedding_length": 64, "block_count": 2,
                "feed_forward_length": 224, "attention.head_count": 8, "attention.head_count_kv": 2,
                "rope.dimension_count": 8, "vocab_size": 300}
    for key, value in expected.items():
        assert field(reader, f"llama.{key}") == value, key
    assert field(reader, "llama.rope.freq_base") == 500000.0
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5, rel=1e-7)  # float32
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}


def test_scaled_rope_becomes_llamacpp_frequency_factors(tmp_path):
    """Llama 3.1 scaling, as factors dividing each pair's frequency: 1 for short wavelengths (< 8192 / 4
    positions), 8 for long ones (> 8192), in between for the rest. SMALL_SCALED's head_dim 8 and theta
    500000 give wavelengths 2*pi * 500000^(i/4): 6.3, 167, 4443, 118000 positions."""
    args = model_args(SMALL_SCALED)
    path = write_gguf(tmp_path / "m.gguf", args, random_state_dict(dict(SMALL_SCALED, vocab_size=300)),
                      torch.float32)
    [factors] = [t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight"]
    f = np.asarray(factors.data).reshape(-1)
    assert f.shape == (4,)
    assert f[0] == 1 and f[1] == 1 and f[3] == pytest.approx(8.0, rel=1e-6)
    smooth = (8192 / (2 * np.pi * 500000 ** 0.5) - 1) / (4 - 1)  # Meta's blend for the third pair
    assert f[2] == pytest.approx(1 / ((1 - smooth) / 8 + smooth), rel=1e-5)


def test_a_state_dict_that_does_not_fit_is_refused_by_name(tmp_path):
    args = model_args(SMALL_GQA)
    sd = random_state_dict(dict(SMALL_GQA, vocab_size=300))
    del sd["layers.1.ffn_norm.weight"]
    with pytest.raises(ValueError, match="layers.1.ffn_norm.weight"):
        write_gguf(tmp_path / "m.gguf", args, sd, torch.float32)
    sd = random_state_dict(dict(SMALL_GQA, vocab_size=299))
    with pytest.raises(ValueError, match="tok_embeddings.weight"):
        write_gguf(tmp_path / "m.gguf", args, sd, torch.float32)
    with pytest.raises(ValueError, match="int8"):
        write_gguf(tmp_path / "m.gguf", args, random_state_dict(dict(SMALL_GQA, vocab_size=300)), torch.int8)


# ---- llama.cpp runs the file as we run the weights (llama-cpp-python installed by hand; skipped without) ----

# float32 tolerance on logits of size ~1 (output rows ~ N(0, 1/dim) against a normalised state): llama.cpp
# and torch sum the same products in different orders, each dot product of <= 224 terms rounding to a few
# 1e-7 relative, a few 1e-6 after two layers. A layout mistake (RoPE pairs, w1/w3, heads) moves logits by
# 0.01 to 1: the tests below check that too, so that this tolerance cannot hide one. (Measured here: 2e-6.)
LOGITS_ATOL = 1e-4


def our_logits(args, sd, prompt):
    """Our reference loop's float32 logits for every position of `prompt`: (len, vocab)."""
    from bench.run import build_ours

    init_distributed(torch.device("cpu"))
    ours = build_ours(args, sd, torch.device("cpu"), torch.float32, fast=False, compile=False)
    with torch.inference_mode():
        return ours.model(torch.tensor([prompt]), 0)[0]


def llamacpp_logits(path, prompt):
    """llama.cpp's float32 logits for every position of `prompt`, KV cache in float32: (len, vocab)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=MAX_SEQ_LEN, n_batch=MAX_SEQ_LEN, n_ubatch=MAX_SEQ_LEN,
                          n_threads=torch.get_num_threads(), logits_all=True, type_k=0, type_v=0, verbose=False)
    llm.eval(prompt)
    return torch.from_numpy(np.array(llm.scores[: len(prompt)]))


@pytest.mark.parametrize("params", [SMALL_GQA, SMALL_SCALED], ids=["gqa", "scaled-rope"])
def test_llamacpp_gives_our_logits_at_every_position(tmp_path, params):
    pytest.importorskip("llama_cpp")
    args = model_args(params)
    sd = random_state_dict(dict(params, vocab_size=300), seed=3)
    prompt = torch.randint(0, 300, (32,), generator=torch.Generator().manual_seed(4)).tolist()
    want = our_logits(args, sd, prompt)
    got = llamacpp_logits(write_gguf(tmp_path / "m.gguf", args, sd, torch.float32), prompt)
    torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_ATOL)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_llamacpp_tells_the_layouts_apart(tmp_path):
    """The tolerance above is far below what a wrong layout costs: Hugging Face's RoPE layout (q and k rows
    permuted per head), w1 and w3 swapped, or Llama 3.1's RoPE scaling left out of the file miss our logits
    by more than 100 times the tolerance (measured here: 1.6, and 0.012 for the scaling, against 2e-6)."""
    pytest.importorskip("llama_cpp")
    from bench.run import permute_for_hf

    args = model_args(SMALL_SCALED)
    sd = random_state_dict(dict(SMALL_SCALED, vocab_size=300), seed=3)
    prompt = torch.randint(0, 300, (32,), generator=torch.Generator().manual_seed(4)).tolist()
    want = our_logits(args, sd, prompt)
    permuted, swapped = dict(sd), dict(sd)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        permuted[p + "attention.wq.weight"] = permute_for_hf(sd[p + "attention.wq.weight"], args.n_heads)
        permuted[p + "attention.wk.weight"] = permute_for_hf(sd[p + "attention.wk.weight"], args.n_kv_heads)
        swapped[p + "feed_forward.w1.weight"] = sd[p + "feed_forward.w3.weight"]
        swapped[p + "feed_forward.w3.weight"] = sd[p + "feed_forward.w1.weight"]
    unscaled = dataclasses.replace(args, use_scaled_rope=False)
    for name, wrong_args, wrong in [("hf-rope", args, permuted), ("w1-w3", args, swapped),
                                    ("no-scaling", unscaled, sd)]:
        got = llamacpp_logits(write_gguf(tmp_path / f"{name}.gguf", wrong_args, wrong, torch.float32), prompt)
        assert (got - want).abs().max() > 100 * LOGITS_ATOL, name


def test_bench_llamacpp_generates_our_greedy_tokens_run_after_run(tmp_path):
    """The bench's contender: from the same prompt, the tokens our fast loop chooses greedily, the same in
    every run (each run starts from an empty cache), and one prompt at a time."""
    pytest.importorskip("llama_cpp")
    from bench.run import build_ours
    from bench.llamacpp import build_llamacpp

    args = model_args(SMALL_SCALED)
    sd = random_state_dict(dict(SMALL_SCALED, vocab_size=300), seed=5)
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(6))
    init_distributed(torch.device("cpu"))
    ours = build_ours(args, sd, torch.device("cpu"), torch.float32, fast=True, compile=False)
    want, _ = ours.generate(prompt.tolist(), max_gen_len=30, temperature=0.0)
    generate = build_llamacpp(args, sd, torch.float32, threads=torch.get_num_threads())
    assert generate(prompt, 30).tolist() == want
    assert generate(prompt, 1).tolist() == [want[0][:1]]
    assert generate(prompt, 30).tolist() == want
    with pytest.raises(ValueError, match="batch of 2"):
        generate(prompt.repeat(2, 1), 5)


def test_bench_adds_llamacpp_at_batch_1_only(tmp_path, monkeypatch):
    """`python -m llama.bench --llamacpp`: llama.cpp beside ours at batch 1, with our tokens, a ratio and a
    table column; left out at batch 2."""
    pytest.importorskip("llama_cpp")
    import bench.run as bench

    monkeypatch.setitem(bench.SHAPES, "tiny", dict(SMALL_SCALED, vocab_size=300))
    out = tmp_path / "b.json"
    bench.main(["--shape", "tiny", "--batch", "1", "2", "--dtype", "float32", "--new-tokens", "6",
                "--prompt-len", "5", "--repeats", "2", "--device", "cpu", "--llamacpp", "--out", str(out),
                "--chart", ""])
    one, two = json.loads(out.read_text())["results"]
    assert one["rows_matching_llamacpp"] == 1 and one["leading_tokens_matching_llamacpp"] == 6
    assert one["llama.cpp"]["decode_tok_s"] > 0 and len(one["llama.cpp"]["runs_total_s"]) == 2
    assert one["ratio_llamacpp"] == pytest.approx(one["ours"]["decode_tok_s"] / one["llama.cpp"]["decode_tok_s"])
    assert "llama.cpp" not in two and "ratio_llamacpp" not in two and two["rows_matching_transformers"] == 2
    table = bench.markdown_table(json.loads(out.read_text())).splitlines()
    assert table[0].endswith("llama.cpp tok/s (ours / llama.cpp) |") and table[3].endswith("| - |")
    assert f"({one['ratio_llamacpp']:.2f}x; median round {one['median_round_ratio_llamacpp']:.2f}x) |" in table[2]
    assert one["median_round_ratio_llamacpp"] > 0
