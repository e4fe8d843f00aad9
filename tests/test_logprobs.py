"""logprobs extras: top-k alternatives per position, prompt logprobs with echo, and `Llama.score`.

Expected values come from one full forward pass over the finished sequence (or from single-token steps
through the KV cache), not from the decode loop under test."""

import math

import pytest
import torch

from llama import Llama, PromptError
from helpers import SMALL_GQA


@pytest.fixture(scope="module")
def llama(tiny_llama) -> Llama:
    return tiny_llama(dict(SMALL_GQA, vocab_size=512), seed=3, max_seq_len=48, max_batch_size=4, device="cpu")


def forward_logprobs(llama: Llama, tokens) -> torch.Tensor:
    """log_softmax of the logits at every position of one sequence, from a single forward pass."""
    return torch.log_softmax(llama.model.forward(torch.tensor([tokens]), 0)[0], dim=-1)


def stepwise_logprobs(llama: Llama, tokens):
    """The logprob of each token after the first, feeding one token at a time through the KV cache."""
    out = []
    for pos in range(len(tokens) - 1):
        logits = llama.model.forward(torch.tensor([[tokens[pos]]]), pos)[0, -1]
        out.append(torch.log_softmax(logits, -1)[tokens[pos + 1]].item())
    return out


def test_top_logprobs_are_the_most_likely_tokens_at_each_position(llama):
    prompt = llama.tokenizer.encode("alternatives", bos=True, eos=False)
    c = llama.complete([prompt], 10, temperature=0.9, seed=0, top_logprobs=3, ignore_eos=True)[0][0]
    reference = forward_logprobs(llama, prompt + c.tokens)
    for k, (token, position) in enumerate(zip(c.tokens, c.top_logprobs)):
        values, ids = reference[len(prompt) - 1 + k].topk(3)
        assert [t for t, _ in position] == ids.tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in position]), values)
        assert c.logprobs[k] == pytest.approx(reference[len(prompt) - 1 + k, token].item(), abs=1e-5)


def test_greedy_tokens_are_their_own_first_alternative(llama):
    result = llama.text_completion(["greedy"], temperature=0, max_gen_len=6, top_logprobs=2, ignore_eos=True)[0]
    assert len(result["top_logprobs"]) == len(result["tokens"]) == 6
    for token, logprob, position in zip(result["tokens"], result["logprobs"], result["top_logprobs"]):
        assert position[0][0] == token and position[0][1] == pytest.approx(logprob, abs=1e-6)
        assert position[0][1] >= position[1][1]


def test_echo_returns_the_prompt_tokens_with_their_logprobs(llama):
    prompt = llama.tokenizer.encode("echo me", bos=True, eos=False)
    tokens, logprobs = llama.generate([prompt], 4, temperature=0, logprobs=True, echo=True, ignore_eos=True)
    assert tokens[0][: len(prompt)] == prompt and len(tokens[0]) == len(prompt) + 4
    reference = forward_logprobs(llama, tokens[0])
    expected = [0.0] + [reference[i - 1, t].item() for i, t in enumerate(tokens[0]) if i > 0]
    torch.testing.assert_close(torch.tensor(logprobs[0]), torch.tensor(expected))
    with_alternatives = llama.complete([prompt], 4, temperature=0, top_logprobs=2, echo=True, ignore_eos=True)
    positions = with_alternatives[0][0].top_logprobs
    assert positions[0] == [] and len(positions) == len(prompt) + 4  # nothing predicts the first token
    assert [t for t, _ in positions[1]] == reference[0].topk(2).indices.tolist()


def test_score_gives_log_likelihood_and_perplexity_of_each_sequence(llama):
    texts = ["the first text", "a second, longer text to score", "xy"]
    scores = llama.score(texts)
    for text, s in zip(texts, scores):
        tokens = llama.tokenizer.encode(text, bos=True, eos=False)
        expected = stepwise_logprobs(llama, tokens)
        assert s["n_tokens"] == len(tokens) - 1 == len(s["logprobs"])
        torch.testing.assert_close(torch.tensor(s["logprobs"]), torch.tensor(expected), rtol=1e-4, atol=1e-4)
        assert s["log_likelihood"] == pytest.approx(sum(expected), abs=1e-3)
        assert s["perplexity"] == pytest.approx(math.exp(-sum(expected) / len(expected)), rel=1e-3)


def test_score_runs_any_number_of_sequences_and_reports_the_ones_it_cannot_score(llama):
    texts = ["one", "", "two", "z" * 60, "three", "four", "five"]  # more than max_batch_size=4
    with pytest.raises(PromptError) as caught:
        llama.score(texts)
    assert sorted(caught.value.errors) == [1, 3]
    assert "at least 2 tokens" in caught.value.errors[1] and "max_seq_len=48" in caught.value.errors[3]
    results = caught.value.results
    assert results[1] is None and results[3] is None
    alone = llama.score(["five"])[0]
    assert results[6]["log_likelihood"] == pytest.approx(alone["log_likelihood"], abs=1e-4)
    assert llama.score([[1, 2, 3]])[0]["n_tokens"] == 2  # token lists are scored as given
