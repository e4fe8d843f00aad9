"""Llama.generate and the completions: Meta's semantics, checked against a naive loop over Hugging Face
transformers' model (no KV cache, no batching) on the same weights."""

import pytest
import torch

from llama.sampling import sample_top_p

from helpers import SMALL_GQA
from hf_reference import hf_model

PARAMS = dict(SMALL_GQA, vocab_size=512)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tiny_llama):
    llama = tiny_llama(PARAMS, seed=11, max_seq_len=48, max_batch_size=4, device="cpu")
    return llama, hf_model(PARAMS, tiny_checkpoint(PARAMS, seed=11).state_dict)


def naive_greedy(hf, prompt, n):
    """Greedy decoding by recomputing the whole sequence every step: shares nothing with our model."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[256, 72, 105], [256, 10, 20, 30, 40, 50, 60, 70], [256, 5], [256, 99, 98, 97, 96]]


def test_greedy_generation_matches_a_naive_transformers_loop(setup):
    llama, hf = setup
    out, _ = llama.generate(PROMPTS, max_gen_len=12, temperature=0)
    for prompt, tokens in zip(PROMPTS, out):
        expected = naive_greedy(hf, prompt, 12)
        stops = [i for i, t in enumerate(expected) if t in llama.tokenizer.stop_tokens]
        assert tokens == expected[: stops[0] if stops else 12]


def test_a_prompt_alone_equals_the_same_prompt_in_a_batch_of_different_lengths(setup):
    llama, _ = setup
    batch, _ = llama.generate(PROMPTS, max_gen_len=10, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        alone, _ = llama.generate([prompt], max_gen_len=10, temperature=0)
        assert alone[0] == batch[i]


def test_temperature_zero_is_deterministic(setup):
    llama, _ = setup
    assert llama.generate(PROMPTS, 10, temperature=0) == llama.generate(PROMPTS, 10, temperature=0)


def test_sampling_is_reproducible_from_the_seed(setup):
    llama, _ = setup
    torch.manual_seed(5)
    first = llama.generate(PROMPTS, 10, temperature=1.0, top_p=0.95)
    torch.manual_seed(5)
    assert llama.generate(PROMPTS, 10, temperature=1.0, top_p=0.95) == first


def test_logprobs_are_the_log_softmax_of_the_reference_logits(setup):
    llama, hf = setup
    prompt = PROMPTS[1]
    tokens, logprobs = llama.generate([prompt], max_gen_len=6, temperature=0, logprobs=True)
    full = prompt + tokens[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].double(), dim=-1)
    expected = [ref[i - 1, full[i]].item() for i in range(len(prompt), len(full))]
    assert logprobs[0] == pytest.approx(expected, abs=1e-4)
    assert len(logprobs[0]) == len(tokens[0])


def test_echo_returns_the_prompt_and_its_logprobs_first(setup):
    llama, hf = setup
    prompt = PROMPTS[1]
    plain, _ = llama.generate([prompt], max_gen_len=5, temperature=0)
    echoed, logprobs = llama.generate([prompt], max_gen_len=5, temperature=0, logprobs=True, echo=True)
    assert echoed[0] == prompt + plain[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([echoed[0]])).logits[0].double(), dim=-1)
    assert logprobs[0][0] == 0.0  # the first token has nothing before it
    expected = [ref[i - 1, echoed[0][i]].item() for i in range(1, len(echoed[0]))]
    assert logprobs[0][1:] == pytest.approx(expected, abs=1e-4)


def test_generation_stops_before_the_first_stop_token(setup, monkeypatch):
    llama, _ = setup
    free, _ = llama.generate(PROMPTS, max_gen_len=12, temperature=0)
    # Declare the 5th token of row 0 a stop token: every row must end right before its first occurrence.
    stop = free[0][4]
    monkeypatch.setattr(llama.tokenizer, "stop_tokens", {stop})
    cut, _ = llama.generate(PROMPTS, max_gen_len=12, temperature=0)
    for row_free, row_cut in zip(free, cut):
        expected = row_free[: row_free.index(stop)] if stop in row_free else row_free
        assert row_cut == expected
    assert len(cut[0]) == free[0].index(stop) <= 4


def test_total_length_is_capped_by_max_seq_len(setup):
    llama, _ = setup
    long_prompt = [256] + list(range(1, 40))  # 40 tokens; max_seq_len is 48
    out, _ = llama.generate([long_prompt, [256, 1]], max_gen_len=100, temperature=0)
    assert len(out[0]) <= 8 and len(out[1]) <= 46


def test_a_prompt_of_max_seq_len_tokens_is_scored_not_extended(setup):
    llama, hf = setup
    prompt = [256] + [(7 * i) % 256 for i in range(47)]  # exactly max_seq_len
    out, logprobs = llama.generate([prompt], max_gen_len=5, temperature=0, logprobs=True, echo=True)
    assert out[0] == prompt
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), dim=-1)
    expected = [0.0] + [ref[i - 1, prompt[i]].item() for i in range(1, 48)]
    assert logprobs[0] == pytest.approx(expected, abs=1e-4)


def test_text_completion_returns_decoded_text_and_per_token_pieces(setup):
    llama, _ = setup
    results = llama.text_completion(["Hi", "abc"], max_gen_len=5, temperature=0, logprobs=True)
    assert len(results) == 2
    for prompt, result in zip(["Hi", "abc"], results):
        tokens, _ = llama.generate([llama.tokenizer.encode(prompt, bos=True, eos=False)], 5, temperature=0)
        assert result["generation"] == llama.tokenizer.decode(tokens[0])
        assert result["tokens"] == [llama.tokenizer.decode([t]) for t in tokens[0]]
        assert len(result["logprobs"]) == len(tokens[0])
    plain = llama.text_completion(["Hi"], max_gen_len=5, temperature=0)
    assert set(plain[0]) == {"generation"}


def test_text_completion_echo_starts_with_the_prompt(setup):
    llama, _ = setup
    result = llama.text_completion(["Hello"], max_gen_len=4, temperature=0, echo=True)[0]
    assert result["generation"].startswith("<|begin_of_text|>Hello")


def test_chat_completion_answers_as_the_assistant(setup):
    llama, _ = setup
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    result = llama.chat_completion([dialog], max_gen_len=5, temperature=0)[0]
    tokens, _ = llama.generate([llama.formatter.encode_dialog_prompt(dialog)], 5, temperature=0)
    assert result == {"generation": {"role": "assistant", "content": llama.tokenizer.decode(tokens[0])}}


# ---- sample_top_p: Meta's nucleus sampler ----


def test_sample_top_p_keeps_exactly_the_nucleus():
    # Sorted mass: 0.5, 0.8 (crosses p=0.6, so kept), then 0.15 and 0.05 are dropped.
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_top_p(probs.clone(), 0.6, g)) for _ in range(400)}
    assert draws == {1, 3}


def test_sample_top_p_with_p_one_keeps_every_token_and_tiny_p_is_argmax():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample_top_p(probs.clone(), 1.0, g)) for _ in range(400)} == {0, 1, 2, 3}
    assert {int(sample_top_p(probs.clone(), 1e-6, g)) for _ in range(50)} == {3}


def test_sample_top_p_draws_in_proportion_inside_the_nucleus():
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    g = torch.Generator().manual_seed(1)
    draws = torch.cat([sample_top_p(probs.clone(), 0.8, g) for _ in range(3000)]).flatten()
    share_of_0 = (draws == 0).float().mean().item()
    assert abs(share_of_0 - 2 / 3) < 0.04 and not (draws == 2).any()


# ---- Llama.build ----


def test_build_twice_in_one_process_gives_two_working_generators(tiny_llama):
    first = tiny_llama(PARAMS, seed=11, max_seq_len=32, max_batch_size=2, device="cpu")
    second = tiny_llama(PARAMS, seed=11, max_seq_len=16, max_batch_size=1, device="cpu")
    assert first.generate(PROMPTS[:2], 6, temperature=0)[0][0] == second.generate(PROMPTS[:1], 6, temperature=0)[0][0]
