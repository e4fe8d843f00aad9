"""The fast path (llama.fast.loop, llama.fast.layers, the prefiltered top-p) against the reference path it
replaces: the same greedy tokens, logits and log-probabilities within 1e-5 in float32, rows cut at the same
stop tokens, and top-p draws bit for bit the same as the full sort's."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama.generation as generation
import llama.sampling as sampling
from llama import Llama
from llama.fast.layers import FastAttention, can_pack, use_fast_layers
from llama.fast.step import fast_forward
from llama.model import Attention, ModelArgs, Transformer
from llama.sampling import GREEDY_CHUNK, greedy, next_token, sample_top_p, sample_top_p_prefiltered

from helpers import SMALL_GQA, SMALL_MHA, SMALL_SCALED

SHAPES = {"gqa": SMALL_GQA, "mha": SMALL_MHA, "scaled_rope": SMALL_SCALED}
MAX_SEQ_LEN = 40


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tiny_llama):
    """(fast, reference) Llamas built from one random checkpoint."""
    params = dict(SHAPES[request.param], vocab_size=512)
    build = lambda fast: tiny_llama(params, seed=5, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu", fast=fast)
    return build(True), build(False)


def random_prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def assert_same_outputs(a, b):
    (tokens_a, logprobs_a), (tokens_b, logprobs_b) = a, b
    assert tokens_a == tokens_b
    for row_a, row_b in zip(logprobs_a, logprobs_b):
        assert len(row_a) == len(row_b)
        torch.testing.assert_close(torch.tensor(row_a), torch.tensor(row_b), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "lengths, max_gen_len",
    [([6], 10), ([3, 11], 12), ([3, 11, 7, 1], 9), ([9, 9, 9], 8), ([2, 30, 5, 17], 25), ([39, 4], 5)],
    ids=["one", "two-mixed", "four-mixed", "equal", "past-max-seq-len", "full-context"],
)
@pytest.mark.parametrize("echo", [False, True], ids=["generation", "echo"])
def test_fast_and_reference_paths_give_the_same_greedy_tokens_and_logprobs(pair, lengths, max_gen_len, echo):
    fast, reference = pair
    prompts = random_prompts(lengths, seed=len(lengths) + max_gen_len)
    assert_same_outputs(
        fast.generate(prompts, max_gen_len, temperature=0, logprobs=True, echo=echo),
        reference.generate(prompts, max_gen_len, temperature=0, logprobs=True, echo=echo),
    )


@pytest.mark.parametrize("stop_check_every", [1, 3], ids=["looking-every-step", "looking-late-every-3rd"])
def test_stop_tokens_end_rows_exactly_where_the_reference_ends_them(pair, stop_check_every, monkeypatch):
    fast, reference = pair
    # On accelerators greedy decoding looks at the stop flags only every few steps, each look reading the
    # flags of the look before (decoding.StopWatch): force that on the CPU too.
    decode = generation.decode
    monkeypatch.setattr(
        generation, "decode", lambda *a, **k: decode(*a, **dict(k, stop_check_every=stop_check_every))
    )
    prompts = random_prompts([4, 12, 7, 2], seed=3)
    saved = [llama.tokenizer.stop_tokens for llama in (fast, reference)]
    try:
        reference.tokenizer.stop_tokens = set()
        free, _ = reference.generate(prompts, 20, temperature=0)
        # Stop tokens that the rows would produce at different steps (the 3rd token of one row, the 8th of
        # another...), each possibly also earlier in other rows.
        chosen = {free[0][2], free[1][7], free[2][12]}
        for llama in (fast, reference):
            llama.tokenizer.stop_tokens = chosen
        got = fast.generate(prompts, 20, temperature=0, logprobs=True)
        want = reference.generate(prompts, 20, temperature=0, logprobs=True)
    finally:
        for llama, stops in zip((fast, reference), saved):
            llama.tokenizer.stop_tokens = stops
    assert_same_outputs(got, want)
    for row, full in zip(got[0], free):
        cut = next((i for i, t in enumerate(full) if t in chosen), len(full))
        assert row == full[:cut]  # each row ends before its own first stop token
    assert len(got[0][0]) <= 2 and len(got[0][1]) <= 7 and len(got[0][2]) <= 12


def test_fast_path_samples_the_same_tokens_as_the_reference_from_the_same_seed(pair):
    """Equal prompt lengths: both loops draw from torch's global stream at the same steps. Mixed lengths
    with per-row generators (a seed): each row's draws depend on its own tokens only."""
    fast, reference = pair
    equal, mixed = random_prompts([6, 6, 6], seed=8), random_prompts([3, 9, 5], seed=9)
    results = []
    for llama in (fast, reference):
        torch.manual_seed(123)
        # Two calls in a row: the first must leave the random stream where the reference leaves it.
        runs = [llama.generate(equal, n, temperature=0.8, top_p=0.9) for n in (15, 10)]
        runs.append(llama.generate(mixed, 12, temperature=0.9, top_p=0.8, seed=5, logprobs=True))
        results.append(runs)
    assert results[0][:2] == results[1][:2]
    assert_same_outputs(results[0][2], results[1][2])


def test_sampling_mixed_lengths_from_the_global_stream_runs_the_reference_loop(pair, monkeypatch):
    fast, reference = pair
    import llama.generation as generation

    calls = []
    real = generation.decode
    monkeypatch.setattr(generation, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast.generate(random_prompts([3, 9], seed=1), 4, temperature=0.8)
    assert calls == []  # the reference loop ran
    fast.generate(random_prompts([3, 9], seed=1), 4, temperature=0)
    assert calls == [1]


def test_per_row_positions_give_the_logits_of_a_shared_position(pair):
    """The fast loop's step, each row at its own position after a padded prefill, against the reference
    model (fairscale's layers) run on each row alone with an int position."""
    fast, reference = pair
    tokens = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(0))
    lens = [5, 12, 8]
    new = torch.tensor([7, 8, 9])
    fast.model.forward(tokens, 0)  # rows shorter than 12 cache junk past their length: masked, then overwritten
    with torch.inference_mode():
        got = fast_forward(fast.model, new[:, None], torch.tensor(lens), kv_len=13)[:, 0]  # (3, vocab)
    for i, n in enumerate(lens):
        reference.model.forward(tokens[i : i + 1, :n], 0)
        want = reference.model.forward(new[i : i + 1, None], n)[0, 0]
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)


def test_fast_layers_give_the_reference_logits_in_float32(pair):
    fast, reference = pair
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fast.model.forward(tokens, 0), reference.model.forward(tokens, 0), rtol=0, atol=1e-5)
    assert isinstance(fast.model.layers[0].attention, FastAttention)
    assert isinstance(reference.model.layers[0].attention, Attention)


def test_state_dict_has_metas_keys_shapes_and_values_in_both_modes(pair):
    """Fused and (on the CPU) oneDNN-packed weights still read back as Meta's tensors, in Meta's order."""
    fast, reference = pair
    want, got = reference.model.state_dict(), fast.model.state_dict()
    assert list(got) == list(want)
    assert list(want)[:3] == ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wk.weight"]
    for key, value in want.items():
        assert got[key].shape == value.shape and torch.equal(got[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_layers_hold_the_reference_weights_packed_or_fused(dtype):
    """The swap changes how weights are held, not what they are: every fast module's state equals the
    reference module's, packed for oneDNN or not."""
    torch.manual_seed(0)
    for pack in (False, True):
        model = Transformer(ModelArgs(**dict(SMALL_GQA, vocab_size=64), max_seq_len=16, max_batch_size=2))
        with torch.no_grad():  # (fairscale leaves the weights uninitialised: they come from files)
            for weight in model.parameters():
                weight.normal_()
        model.to(dtype)
        want = {k: v.clone() for k, v in model.state_dict().items()}
        use_fast_layers(model, pack=pack)
        use_fast_layers(model, pack=pack)  # a second call changes nothing
        got = model.state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
        assert (model.output.packed is not None) == (pack and can_pack(torch.device("cpu"), dtype))


def test_cpu_attention_reads_grouped_kv_heads_in_place(pair):
    """Decode attention with 4 query heads per K/V head: SDPA's CPU kernel, no repeated K/V copies."""
    fast, _ = pair
    if fast.model.params.n_kv_heads is None:
        pytest.skip("multi-head attention: no grouped heads")
    fast.model.forward(torch.tensor([[1, 2, 3, 4]]), 0)
    with torch.profiler.profile() as prof, torch.inference_mode():
        fast_forward(fast.model, torch.tensor([[5]]), torch.tensor([4]), kv_len=5)
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert not names & {"aten::repeat_interleave", "aten::repeat"}  # how a math fallback would copy K/V


def test_kv_cache_holds_as_many_elements_as_metas(pair):
    fast, _ = pair
    args = fast.model.params
    n_kv = args.n_kv_heads or args.n_heads
    cache = [b for n, b in fast.model.named_buffers() if n.endswith(("cache_k", "cache_v"))]
    assert len(cache) == 2 * args.n_layers
    assert all(b.numel() == args.max_batch_size * args.max_seq_len * n_kv * args.head_dim for b in cache)


# ---- top-p sampling -------------------------------------------------------------------------------------


@st.composite
def distributions(draw):
    """Rows of probabilities: peaked or flat, often with exact ties (few distinct logit values)."""
    bsz = draw(st.integers(1, 4))
    vocab = draw(st.integers(2, 600))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.5, 2.0, 6.0]))
    levels = draw(st.sampled_from([0, 3, 20]))  # 0: continuous logits, else that many distinct values
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(bsz, vocab, generator=g) * scale
    if levels:
        logits = torch.round(logits * levels / (3 * scale)) / levels * 3 * scale
    return torch.softmax(logits, dim=-1)


@settings(max_examples=300, deadline=None)
@given(
    probs=distributions(),
    p=st.one_of(st.floats(0.01, 1.0), st.sampled_from([0.5, 0.9, 0.95, 1.0])),
    candidates=st.sampled_from([1, 2, 5, 16, 64, 256]),
    seed=st.integers(0, 2**31 - 1),
)
def test_prefiltered_top_p_draws_exactly_what_the_full_sort_draws(probs, p, candidates, seed):
    want = sample_top_p(probs.clone(), p, torch.Generator().manual_seed(seed))
    got = sample_top_p_prefiltered(probs.clone(), p, torch.Generator().manual_seed(seed), candidates=candidates)
    assert torch.equal(got, want)


@settings(max_examples=100, deadline=None)
@given(probs=distributions(), p=st.floats(0.05, 0.95), seed=st.integers(0, 2**31 - 1))
def test_top_p_draws_only_from_the_nucleus(probs, p, seed):
    """The nucleus computed independently in float64: tokens by decreasing probability (ties by id), kept
    while the mass before them is at most p. Boundary tokens within rounding of p are not judged."""
    token = sample_top_p_prefiltered(probs, p, torch.Generator().manual_seed(seed))[:, 0]
    for row, t in zip(probs.double().tolist(), token.tolist()):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        rank = order.index(t)
        before = sum(row[i] for i in order[:rank])
        assert before <= p + 1e-6


def test_prefilter_avoids_the_full_sort_when_the_nucleus_is_small(monkeypatch):
    probs = torch.softmax(torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)) * 8, dim=-1)

    def full_sort(*args, **kwargs):
        raise AssertionError("fell back to the full sort")

    monkeypatch.setattr(sampling, "sample_top_p", full_sort)
    assert sample_top_p_prefiltered(probs, 0.9).shape == (3, 1)


@settings(max_examples=300, deadline=None)
@given(
    bsz=st.integers(1, 5),
    chunks=st.integers(1, 12),
    extra=st.sampled_from([0, 0, 0, 1, 100]),  # 0: a whole number of chunks (the chunked search)
    levels=st.sampled_from([0, 2, 5]),  # 0: continuous logits, else that many distinct values (ties)
    specials=st.lists(st.tuples(st.integers(0, 4), st.floats(0, 1), st.sampled_from(["nan", "inf", "-inf"])),
                      max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_greedy_picks_what_torch_argmax_picks(bsz, chunks, extra, levels, specials, seed):
    """Ties (the first wins), NaN (counts as the largest), infinities, whole chunks or not."""
    vocab = chunks * GREEDY_CHUNK + extra
    logits = torch.randn(bsz, vocab, generator=torch.Generator().manual_seed(seed))
    if levels:
        logits = torch.round(logits * levels)
    for row, where, value in specials:
        if row < bsz:
            logits[row, int(where * (vocab - 1))] = float(value)
    assert torch.equal(greedy(logits), torch.argmax(logits, dim=-1))


def test_next_token_with_and_without_prefilter_agree():
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(2)) * 4
    for temperature, top_p in [(0.0, 0.9), (0.6, 0.9), (1.0, 0.5), (1.3, 1.0)]:
        a = next_token(logits, temperature, top_p, torch.Generator().manual_seed(9), prefilter=True)
        b = next_token(logits, temperature, top_p, torch.Generator().manual_seed(9))
        assert torch.equal(a, b)


# ---- options and the benchmark ---------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_step_gives_the_reference_greedy_tokens_and_logprobs(tiny_llama):
    """compile=True (torch.compile; CUDA graphs and tuned kernels on a GPU, inductor's C++ on the CPU) on
    mixed prompt lengths and one length: the reference loop's tokens, logprobs within 1e-5 in float32; rows
    end exactly at the reference's stop tokens, and the loop soon after they all have."""
    params = dict(SMALL_GQA, vocab_size=512)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    build = lambda **kw: tiny_llama(params, seed=6, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device=device,
                                    dtype=torch.float32, **kw)
    compiled, reference = build(compile=True), build(fast=False)
    steps = []
    step = compiled.decode_step
    compiled.decode_step = lambda *a: steps.append(1) or step(*a)  # counts the decode steps after the prefill
    for lengths in ([3, 11, 7], [5, 5]):
        prompts = random_prompts(lengths, seed=11)
        assert_same_outputs(
            compiled.generate(prompts, 9, temperature=0, logprobs=True),
            reference.generate(prompts, 9, temperature=0, logprobs=True),
        )
        # Every row's third token a stop token (maybe also earlier in other rows): each row ends before its
        # first one, and the loop soon after they all have (on a GPU it sees the flags up to 7 steps late).
        free, _ = reference.generate(prompts, 25, temperature=0)
        chosen = {row[2] for row in free}
        saved = compiled.tokenizer.stop_tokens
        compiled.tokenizer.stop_tokens = chosen
        steps.clear()
        try:
            got, _ = compiled.generate(prompts, 25, temperature=0)
        finally:
            compiled.tokenizer.stop_tokens = saved
        assert got == [next((row[:i] for i, t in enumerate(row) if t in chosen), row) for row in free]
        assert all(len(row) <= 2 for row in got) and len(steps) <= (2 if device == "cpu" else 2 + 7)


def test_compile_needs_the_fast_loop(pair):
    fast, _ = pair
    with pytest.raises(ValueError, match="fast=True"):
        Llama(fast.model, fast.tokenizer, fast=False, compile=True)


@pytest.mark.slow  # the benchmark end to end: GiB-sized bandwidth probes and timed rounds
def test_bench_runs_both_systems_on_the_same_weights(tmp_path, monkeypatch):
    """A tiny run of `python -m llama.bench`: transformers on the converted weights produces our tokens."""
    import bench.run as bench

    monkeypatch.setitem(bench.SHAPES, "tiny", dict(SMALL_SCALED, vocab_size=300))
    out, chart = tmp_path / "b.json", tmp_path / "b.png"
    bench.main(["--shape", "tiny", "--batch", "1", "3", "--dtype", "float32", "--new-tokens", "6",
                "--prompt-len", "5", "--repeats", "2", "--simple", "--device", "cpu", "--out", str(out),
                "--chart", str(chart)])
    report = json.loads(out.read_text())
    assert [(r["dtype"], r["batch"]) for r in report["results"]] == [("float32", 1), ("float32", 3)]
    for r in report["results"]:
        assert r["rows_matching_transformers"] == r["batch"]
        for name in ("ours", "ours-simple", "transformers"):
            assert r[name]["decode_tok_s"] > 0 and len(r[name]["runs_total_s"]) == 2
        assert r["kv_cache_bytes"] == 2 * 2 * 3 * 2 * 11 * 8 * 4  # K and V, layers, batch, kv heads, seq, head_dim
        assert 0 < r["ours"]["fraction_of_read_bandwidth"] and 0 < r["ours"]["median_round_fraction_of_read_bandwidth"]
        assert len(r["round_read_bandwidths_bytes_s"]) == 2
        # Each run against the bandwidth read just before and after it: the median of those fractions (a run's
        # decode time floored at 1 ns: at this size a 6-token run can time shorter than a 1-token one).
        o = r["ours"]
        assert len(o["bracketing_read_bandwidths_bytes_s"]) == 2 and min(o["bracketing_read_bandwidths_bytes_s"]) > 0
        fractions = [o["bytes_per_decode_step"] * 5 / max(full - ttft, 1e-9) / bw for full, ttft, bw in
                     zip(o["runs_total_s"], o["runs_ttft_s"], o["bracketing_read_bandwidths_bytes_s"])]
        assert o["median_fraction_of_bracketing_read_bandwidth"] == pytest.approx(sum(fractions) / 2)
        # No one passes the roofline: transformers' fraction of it bounds any ratio against transformers.
        assert r["largest_possible_ratio"] == pytest.approx(1 / r["transformers"]["fraction_of_read_bandwidth"])
    assert report["read_bandwidth_bytes_s"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fast_loop_keeps_every_generation_control_of_the_reference(pair):
    """Processors (repetition penalty, banned tokens, min_new_tokens), top logprobs, stop strings and
    streaming, on prompts of mixed lengths: the same completions and stream events from both loops."""
    fast, reference = pair
    prompts = random_prompts([4, 10, 7], seed=4)
    free = reference.complete(prompts, 12, temperature=0)
    stop = free[1][0].text[3:5]  # a stop string that one row meets after a few tokens
    controls = dict(temperature=0, repetition_penalty=1.3, banned_token_ids=[7, 8], min_new_tokens=2,
                    top_logprobs=3, stop=[stop])
    got, want = fast.complete(prompts, 12, **controls), reference.complete(prompts, 12, **controls)
    for [a], [b] in zip(got, want):
        assert (a.tokens, a.text, a.stop_reason) == (b.tokens, b.text, b.stop_reason)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
        assert [[t for t, _ in pos] for pos in a.top_logprobs] == [[t for t, _ in pos] for pos in b.top_logprobs]
    assert any(c.stop_reason == "stop_string" for [c] in want)

    def stream(llama):  # each row's events in order (rows interleave differently: the loops step differently)
        events = list(llama.generate_stream(prompts, 12, temperature=0))
        return [[tuple(e) for e in events if e.row == row] for row in range(len(prompts))]

    assert stream(fast) == stream(reference)
