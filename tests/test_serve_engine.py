"""The serving engine (llama.serve): whatever else runs beside it, and however the paged KV cache is shared
out, a request gets what `Llama.generate` gives for its prompt alone.

Expected values come from `Llama.generate` on the same weights, one prompt per call (the fast loop on the
model's own contiguous cache, or Meta's reference loop), not from the engine."""

from typing import List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from helpers import SMALL_GQA
from llama.serve.engine import Engine
from llama.serve.kv_cache import PagedKVCache, blocks_for_budget, bytes_per_block

PARAMS = dict(SMALL_GQA, vocab_size=512)
MAX_SEQ_LEN = 64
LENGTHS = (5, 17, 33, 3, 40, 9)
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["fast", "reference"])
def llama(request, tiny_llama):
    """The tiny model on the fast layers (fused, packed products) and on Meta's reference modules."""
    return tiny_llama(PARAMS, seed=1, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, device="cpu",
                      fast=request.param == "fast")


def prompts(lengths=LENGTHS, seed=0) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def alone(llama, prompt, max_new, **settings):
    tokens, logprobs = llama.generate([prompt], max_new, logprobs=True, **settings)
    return tokens[0], logprobs[0]


def assert_as_alone(llama, prompt, out, max_new, **settings):
    tokens, logprobs = alone(llama, prompt, max_new, **settings)
    assert out.tokens == tokens
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(logprobs), rtol=0, atol=1e-5)


def test_greedy_requests_of_mixed_lengths_get_the_tokens_and_logprobs_of_each_prompt_alone(llama):
    engine = Engine(llama, n_blocks=64, block_size=16)
    outs = engine.generate(prompts(), logprobs=True, max_new_tokens=20, **GREEDY)
    assert engine.preemptions == 0
    for prompt, out in zip(prompts(), outs):
        assert len(out.tokens) == 20 and out.finish_reason == "length"
        assert_as_alone(llama, prompt, out, 20, **GREEDY)


def test_requests_arriving_mid_decode_get_what_they_get_alone(llama):
    engine = Engine(llama, n_blocks=64, block_size=8)
    ps = prompts()
    ids = [engine.add_request(ps[0], logprobs=True, max_new_tokens=24, **GREEDY)]
    for k, prompt in enumerate(ps[1:], start=1):
        for _ in range(k):  # the earlier ones are decoding when this one arrives
            engine.step()
        ids.append(engine.add_request(prompt, logprobs=True, max_new_tokens=12 + k, **GREEDY))
    list(engine.run())
    for k, (prompt, i) in enumerate(zip(ps, ids)):
        assert_as_alone(llama, prompt, engine.outputs[i], 24 if k == 0 else 12 + k, **GREEDY)


def test_a_tiny_block_budget_preempts_and_recomputes_without_changing_any_output(llama):
    # 14 blocks of 4 positions: the longest request alone needs 14 (40 + 16 - 1 positions); six together
    # need far more, so running requests are preempted, and later recomputed, many times.
    engine = Engine(llama, n_blocks=14, block_size=4)
    outs = engine.generate(prompts(), logprobs=True, max_new_tokens=16, **GREEDY)
    assert engine.preemptions > 0 and sum(o.preemptions > 0 for o in outs) >= 2
    for prompt, out in zip(prompts(), outs):
        assert_as_alone(llama, prompt, out, 16, **GREEDY)
    assert engine.cache.allocator.n_free == 14  # every block back


def test_long_prompts_prefilled_in_chunks_give_what_they_give_whole(llama):
    engine = Engine(llama, n_blocks=64, block_size=4, max_step_tokens=7)  # 40 tokens: 6 chunks
    outs = engine.generate(prompts(), logprobs=True, max_new_tokens=10, **GREEDY)
    for prompt, out in zip(prompts(), outs):
        assert_as_alone(llama, prompt, out, 10, **GREEDY)


def test_a_stop_token_ends_a_request_where_it_ends_the_prompt_alone(tiny_llama):
    llama = tiny_llama(PARAMS, seed=1, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, device="cpu")
    prompt = prompts()[1]
    free, _ = alone(llama, prompt, 12, **GREEDY)
    llama.tokenizer.stop_tokens = set(llama.tokenizer.stop_tokens) | {free[5]}  # greedy meets it at token 5
    engine = Engine(llama, n_blocks=32, block_size=4)
    ids = [engine.add_request(p, logprobs=True, max_new_tokens=12, temperature=0) for p in prompts()]
    list(engine.run())
    out = engine.outputs[ids[1]]
    assert out.finish_reason == "stop_token" and out.stop_token == free[5]
    assert out.tokens == free[: free.index(free[5])]
    for prompt, i in zip(prompts(), ids):  # every request stops where it stops alone
        assert_as_alone(llama, prompt, engine.outputs[i], 12, temperature=0)


def test_stop_strings_and_streamed_text_are_those_of_the_prompt_alone(llama):
    # Byte tokens: the greedy texts hold split UTF-8 characters (held back until complete, or U+FFFD).
    ps = prompts(seed=2)
    texts = [llama.complete([p], 16, **GREEDY)[0][0].text for p in ps]
    stops = [t[4:6] for t in texts]  # a stop string that each greedy text meets
    engine = Engine(llama, n_blocks=40, block_size=4)
    ids = [engine.add_request(p, max_new_tokens=16, stop=[s], **GREEDY) for p, s in zip(ps, stops)]
    streamed = {i: "" for i in ids}
    for event in engine.run():
        streamed[event.request_id] += event.text
    for prompt, stop, i in zip(ps, stops, ids):
        expected = llama.complete([prompt], 16, stop=[stop], **GREEDY)[0][0]
        out = engine.outputs[i]
        assert (out.tokens, out.text, out.finish_reason) == (expected.tokens, expected.text, expected.stop_reason)
        assert streamed[i] == out.text and out.finish_reason == "stop_string"


@pytest.mark.parametrize("settings", [
    dict(temperature=0.8, seed=3),
    dict(temperature=1.3, top_p=1.0, top_k=20, seed=11),
    dict(temperature=0.7, top_p=0.95, repetition_penalty=1.3, seed=0),
])
def test_a_seeded_request_samples_what_the_prompt_samples_alone_beside_any_neighbours(llama, settings):
    settings = dict(settings, ignore_eos=True)
    ps = prompts(seed=5)
    engine = Engine(llama, n_blocks=16, block_size=4)  # tight: preemptions happen too
    ids = []
    for k, prompt in enumerate(ps):
        # Neighbours: greedy, or sampling with other seeds, arriving while the others decode.
        neighbour = GREEDY if k % 2 else dict(temperature=1.0, seed=100 + k, ignore_eos=True)
        ids.append(engine.add_request(prompt, logprobs=True, max_new_tokens=12, **settings))
        engine.add_request(prompts([7], seed=k)[0], max_new_tokens=8, **neighbour)
        engine.step()
    list(engine.run())
    assert engine.preemptions > 0
    for prompt, i in zip(ps, ids):
        assert_as_alone(llama, prompt, engine.outputs[i], 12, **settings)


def test_sample_index_picks_the_stream_of_that_sample_of_an_n_sample_call(llama):
    prompt = prompts()[2]
    settings = dict(temperature=1.0, top_p=1.0, seed=7, ignore_eos=True)
    tokens, _ = llama.generate([prompt], 10, n=1, **settings)  # max_batch_size=1: sample 0 only, then check 1
    engine = Engine(llama, n_blocks=32, block_size=8)
    first = engine.add_request(prompt, max_new_tokens=10, sample_index=0, **settings)
    second = engine.add_request(prompt, max_new_tokens=10, sample_index=1, **settings)
    list(engine.run())
    assert engine.outputs[first].tokens == tokens[0]
    assert engine.outputs[second].tokens != tokens[0]  # another stream


def test_an_aborted_request_frees_its_blocks_and_the_others_carry_on(llama):
    engine = Engine(llama, n_blocks=32, block_size=4)
    ps = prompts()
    ids = [engine.add_request(p, logprobs=True, max_new_tokens=10, **GREEDY) for p in ps]
    for _ in range(3):
        engine.step()
    engine.abort(ids[2])
    list(engine.run())
    assert engine.outputs[ids[2]].finish_reason == "abort"
    assert engine.cache.allocator.n_free == 32
    for k, (prompt, i) in enumerate(zip(ps, ids)):
        if k != 2:
            assert_as_alone(llama, prompt, engine.outputs[i], 10, **GREEDY)


def test_a_prompt_that_fills_the_context_finishes_with_nothing_generated(llama):
    engine = Engine(llama, n_blocks=8, block_size=16)
    [out] = engine.generate([prompts([MAX_SEQ_LEN])[0]], **GREEDY)
    assert out.tokens == [] and out.finish_reason == "length"


def test_the_budget_buys_whole_blocks_of_every_layers_keys_and_values(llama):
    cache = PagedKVCache(llama.model, n_blocks=3, block_size=16)
    held = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert held == 3 * bytes_per_block(llama.model, 16)
    # SMALL_GQA: 2 layers x 2 kv heads x head_dim 8 x 16 positions x (K, V) x 4 bytes = 4096 bytes a block.
    assert bytes_per_block(llama.model, 16) == 4096
    assert blocks_for_budget(llama.model, 16, memory_bytes=4096 * 5 + 100) == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(), r"give exactly one of n_blocks, memory_bytes, memory_fraction; got none"),
    (dict(n_blocks=4, memory_bytes=100), r"give exactly one .*\['memory_bytes', 'n_blocks'\]"),
    (dict(memory_bytes=100), r"buys 0 blocks of 4096 bytes"),
    (dict(memory_fraction=0.5), r"memory_fraction needs a CUDA device"),
    (dict(n_blocks=4, block_size=0), r"block_size must be a positive integer, got 0"),
    (dict(n_blocks=4, max_step_tokens=0), r"max_step_tokens must be a positive integer, got 0"),
])
def test_a_bad_budget_is_refused_naming_it(llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(llama, **kwargs)


@pytest.mark.parametrize("prompt, settings, message", [
    ([], {}, r"prompt: the prompt is empty"),
    ([1, 600], {}, r"token ids \[600\] are outside the vocabulary \[0, 512\)"),
    ([1] * 40, dict(max_new_tokens=30), r"40 tokens generating up to 24 needs 16 KV blocks, more than the cache's 12"),
    ([1, 2], dict(n=2), r"got n=2: add n requests with sample_index"),
    ([1, 2], dict(temperature=-1), r"temperature must be >= 0, got -1"),
])
def test_a_bad_request_is_refused_before_it_runs(llama, prompt, settings, message):
    engine = Engine(llama, n_blocks=12, block_size=4)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, **settings)
    assert not engine.has_unfinished()


def run_random_schedule(llama, data, block_sizes: List[int], max_requests: int, **engine_settings) -> None:
    """Draw a block size, a step token budget, requests (prompt length, new tokens, arrival step, which
    prompt) and a block budget from the least that fits the largest request; run them through an Engine
    (engine_settings, e.g. decode=...) and check every request against the same prompt alone and that
    every block is free again. Shared by the hypothesis tests of each decode mode."""
    block_size = data.draw(st.sampled_from(block_sizes), label="block_size")
    max_step_tokens = data.draw(st.integers(1, 48), label="max_step_tokens")
    requests = data.draw(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12), st.integers(0, 8),
                                            st.integers(0, 3)), min_size=1, max_size=max_requests),
                         label="requests")
    biggest = max(-(-(n + new - 1) // block_size) for n, new, _, _ in requests)
    n_blocks = data.draw(st.integers(biggest, 2 * sum(-(-(n + new) // block_size) for n, new, _, _ in requests)),
                         label="n_blocks")
    engine = Engine(llama, n_blocks=n_blocks, block_size=block_size, max_step_tokens=max_step_tokens,
                    **engine_settings)
    pool = prompts([30] * 4, seed=9)
    ids, step = {}, 0
    while len(ids) < len(requests) or engine.has_unfinished():
        for k, (n, new, arrival, which) in enumerate(requests):
            if k not in ids and arrival <= step:
                ids[k] = engine.add_request(pool[which][:n], logprobs=True, max_new_tokens=new, **GREEDY)
        engine.step()
        step += 1
    for k, (n, new, _, which) in enumerate(requests):
        assert_as_alone(llama, pool[which][:n], engine.outputs[ids[k]], new, **GREEDY)
    assert engine.cache.allocator.n_free == n_blocks


@pytest.fixture(scope="module")
def fast_llama(tiny_llama):
    return tiny_llama(PARAMS, seed=1, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, device="cpu")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_schedule_of_arrivals_budgets_and_chunks_leaves_every_request_as_it_is_alone(fast_llama, data):
    """Random arrival steps, block sizes, block budgets (from the least that fits the largest request) and
    step token budgets: every request still gets its greedy tokens and logprobs alone."""
    run_random_schedule(fast_llama, data, block_sizes=[1, 2, 4, 8, 16], max_requests=5)


def test_top_logprobs_are_those_of_the_prompt_alone(llama):
    engine = Engine(llama, n_blocks=32, block_size=4)
    ids = [engine.add_request(p, top_logprobs=3, max_new_tokens=8, **GREEDY) for p in prompts()[:4]]
    list(engine.run())
    for prompt, i in zip(prompts(), ids):
        out = engine.outputs[i]
        [[expected]] = llama.complete([prompt], 8, top_logprobs=3, **GREEDY)
        assert out.tokens == expected.tokens and len(out.logprobs) == 8  # top_logprobs implies logprobs
        for got, want in zip(out.top_logprobs, expected.top_logprobs):
            assert [t for t, _ in got] == [t for t, _ in want]
            torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]),
                                       rtol=0, atol=1e-5)
