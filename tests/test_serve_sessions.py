"""Sessions and prefix sharing in the serving engine (llama.serve.prefix_cache): turn N of a chat computes only
what is new, concurrent requests share a common prompt prefix by block, idle sessions give their blocks back
before any running request is preempted; and whatever is reused, every request still gets what
`Llama.generate` gives its whole prompt alone (greedy tokens equal, logprobs within 1e-5).

Expected values come from `Llama.generate` on each prompt alone, one call each, never from the engine."""

from typing import Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from helpers import SMALL_GQA
from llama.serve.engine import Engine
from llama.serve.kv_cache import BlockAllocator
from llama.serve.prefix_cache import block_keys

PARAMS = dict(SMALL_GQA, vocab_size=512)
MAX_SEQ_LEN = 64
GREEDY = dict(temperature=0, ignore_eos=True)
_alone: Dict[Tuple, Tuple[List[int], List[float]]] = {}


@pytest.fixture(scope="module", params=["fast", "reference"])
def llama(request, tiny_llama):
    return tiny_llama(PARAMS, seed=1, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, device="cpu",
                      fast=request.param == "fast")


@pytest.fixture(scope="module")
def fast_llama(tiny_llama):
    return tiny_llama(PARAMS, seed=1, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, device="cpu")


def tokens(n: int, seed: int) -> List[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(llama, prompt: List[int], max_new: int) -> Tuple[List[int], List[float]]:
    key = (id(llama), tuple(prompt), max_new)
    if key not in _alone:
        out, logprobs = llama.generate([prompt], max_new, logprobs=True, **GREEDY)
        _alone[key] = (out[0], logprobs[0])
    return _alone[key]


def assert_as_alone(llama, prompt, out, max_new):
    """out's tokens and logprobs are those of prompt alone (for a turn stopped early: their beginning)."""
    expected, logprobs = alone(llama, prompt, max_new)
    n = len(out.tokens) if out.finish_reason == "abort" else len(expected)
    assert out.tokens == expected[:n]
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(logprobs[:n]), rtol=0, atol=1e-5)


def run_turn(engine, prompt, max_new, session_id=None):
    prefill_before = engine.prefill_tokens
    rid = engine.add_request(prompt, logprobs=True, max_new_tokens=max_new, session_id=session_id, **GREEDY)
    for _ in range(4 * MAX_SEQ_LEN):  # bounded: a request that is never admitted fails rather than hangs
        if not engine.has_unfinished():
            break
        engine.step()
    assert engine.outputs[rid].finished
    return engine.outputs[rid], engine.prefill_tokens - prefill_before


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "session-only"])
def test_turn_n_of_a_session_prefills_only_its_new_tokens_and_answers_as_the_whole_chat_alone(
        llama, prefix_caching):
    engine = Engine(llama, n_blocks=40, block_size=4, prefix_caching=prefix_caching)
    prompt, previous = tokens(9, 0), None
    for turn in range(3):
        if previous is not None:  # the conversation so far, then the new message
            prompt = prompt + previous.tokens + tokens(5, turn)
        out, prefilled = run_turn(engine, prompt, 6, session_id="chat")
        assert_as_alone(llama, prompt, out, 6)
        if previous is None:
            assert out.cached_tokens == 0 and prefilled == len(prompt)
        else:
            # Everything the last turn fed is held: all but its last generated token (sampled, never fed).
            held = len(previous.prompt_tokens) + len(previous.tokens) - 1
            assert out.cached_tokens == held
            assert prefilled == len(prompt) - held == 5 + 1
        previous = out
    assert engine.preemptions == 0


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "session-only"])
def test_a_turn_that_rewrites_the_history_reuses_only_the_prefix_it_still_shares(llama, prefix_caching):
    engine = Engine(llama, n_blocks=40, block_size=4, prefix_caching=prefix_caching)
    first = tokens(14, 0)
    out, _ = run_turn(engine, first, 6, session_id="chat")
    edited = first[:6] + [(t + 1) % 256 for t in first[6:]] + out.tokens + tokens(3, 1)  # from position 6 on
    out, prefilled = run_turn(engine, edited, 6, session_id="chat")
    # Blocks 0 (positions 0-3) and 1 (4-7, only the session holds it: written past 6) are reused up to 6.
    assert out.cached_tokens == 6 and prefilled == len(edited) - 6
    assert_as_alone(llama, edited, out, 6)


def test_a_turn_that_rewrites_a_block_another_session_shares_never_writes_into_it(llama):
    engine = Engine(llama, n_blocks=40, block_size=4)
    common = tokens(8, 3)  # blocks 0 and 1, computed by a's first turn, reused by b's
    first = {"a": common + tokens(3, 4), "b": common + tokens(5, 6)}
    outs = {s: run_turn(engine, p, 5, session_id=s)[0] for s, p in first.items()}
    assert outs["b"].cached_tokens == 8
    edited = common[:6] + [7, 7] + tokens(4, 8)  # a rewrites positions 6 and 7, inside block 1 that b holds
    out_a, _ = run_turn(engine, edited, 5, session_id="a")
    assert out_a.cached_tokens == 4  # block 1 is recomputed in a block of a's own, not written over
    nxt = first["b"] + outs["b"].tokens + tokens(2, 9)
    out_b, _ = run_turn(engine, nxt, 5, session_id="b")
    assert out_b.cached_tokens == len(first["b"]) + 5 - 1
    assert_as_alone(llama, edited, out_a, 5)
    assert_as_alone(llama, nxt, out_b, 5)


def test_without_a_session_or_the_prefix_cache_every_turn_prefills_the_whole_chat(llama):
    engine = Engine(llama, n_blocks=40, block_size=4, prefix_caching=False)
    first, _ = run_turn(engine, tokens(9, 0), 6)
    prompt = tokens(9, 0) + first.tokens + tokens(5, 1)
    out, prefilled = run_turn(engine, prompt, 6)
    assert out.cached_tokens == 0 and prefilled == len(prompt)


def test_concurrent_requests_sharing_a_prompt_prefix_compute_its_full_blocks_once(llama):
    engine = Engine(llama, n_blocks=48, block_size=4)
    common = tokens(22, 7)  # 5 full blocks of 4, then 2 positions of a block nobody shares
    prompts = [common + tokens(3 + k, 10 + k) for k in range(4)]
    ids = [engine.add_request(prompts[0], logprobs=True, max_new_tokens=10, **GREEDY)]
    engine.step()  # the first prefills: its full blocks are registered
    for prompt in prompts[1:]:
        ids.append(engine.add_request(prompt, logprobs=True, max_new_tokens=10, **GREEDY))
        engine.step()  # the others arrive while it decodes
    list(engine.run())
    for prompt, rid in zip(prompts, ids):
        assert_as_alone(llama, prompt, engine.outputs[rid], 10)
    assert [engine.outputs[r].cached_tokens for r in ids] == [0, 20, 20, 20]
    assert engine.cache.allocator.n_free == 48 and not any(engine.cache.allocator.refs)


def test_a_block_is_shared_only_by_prompts_equal_up_to_its_end_not_by_its_own_tokens_alone(llama):
    engine = Engine(llama, n_blocks=48, block_size=4)
    shared_block = tokens(4, 3)
    first = tokens(4, 1) + shared_block + tokens(6, 2)
    second = tokens(4, 9) + shared_block + tokens(6, 2)  # the same second block after another first one
    out_first, _ = run_turn(engine, first, 8)
    out_second, prefilled = run_turn(engine, second, 8)
    assert out_second.cached_tokens == 0 and prefilled == len(second)
    assert_as_alone(llama, first, out_first, 8)
    assert_as_alone(llama, second, out_second, 8)


def test_block_keys_name_every_token_up_to_the_block_end():
    keys = block_keys(list(range(12)), 4)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert block_keys([9, 9, 9, 9] + list(range(4, 12)), 4)[1:] != keys[1:]  # the same tokens after others
    assert block_keys(list(range(12)) + [5], 4) == keys  # a partial block has no key
    assert block_keys(list(range(12)), 4, keys[:1]) == keys  # extended from the first key


def test_stop_session_ends_the_turn_early_and_the_next_turn_reuses_what_it_computed(llama):
    engine = Engine(llama, n_blocks=40, block_size=4)
    prompt = tokens(11, 4)
    rid = engine.add_request(prompt, logprobs=True, max_new_tokens=30, session_id=7, **GREEDY)
    for _ in range(6):
        engine.step()
    event = engine.stop_session(7)
    stopped = engine.outputs[rid]
    assert event.finish_reason == stopped.finish_reason == "abort" and 0 < len(stopped.tokens) < 30
    assert_as_alone(llama, prompt, stopped, 30)  # what it generated is the beginning of the whole answer
    assert engine.stop_session(7) is None  # nothing under way any more
    nxt = prompt + stopped.tokens + tokens(4, 5)
    out, prefilled = run_turn(engine, nxt, 8, session_id=7)
    assert out.cached_tokens == len(prompt) + len(stopped.tokens) - 1 and prefilled == 4 + 1
    assert_as_alone(llama, nxt, out, 8)


def test_end_session_lets_go_of_every_block_and_the_id_starts_afresh(llama):
    engine = Engine(llama, n_blocks=40, block_size=4)
    out, _ = run_turn(engine, tokens(10, 1), 7, session_id="s")
    assert engine.cache.allocator.n_held > 0  # held between turns
    engine.add_request(tokens(10, 1) + out.tokens, max_new_tokens=20, session_id="s", **GREEDY)
    engine.step()
    event = engine.end_session("s")  # ends the turn under way too
    assert event.finish_reason == "abort" and "s" not in engine.sessions and not engine.has_unfinished()
    assert engine.cache.allocator.n_free == 40 and not any(engine.cache.allocator.refs)
    assert engine.end_session("s") is None  # ending twice is harmless
    again, _ = run_turn(engine, tokens(6, 2), 4, session_id="s")  # a new session under the old id
    assert again.cached_tokens == 0


def test_a_second_turn_while_one_is_under_way_is_refused(llama):
    engine = Engine(llama, n_blocks=40, block_size=4)
    rid = engine.add_request(tokens(5, 0), max_new_tokens=5, session_id="a", **GREEDY)
    with pytest.raises(ValueError, match=rf"session 'a' already has a turn under way \(request {rid}\)"):
        engine.add_request(tokens(5, 0), max_new_tokens=5, session_id="a", **GREEDY)
    with pytest.raises(ValueError, match=r"session_id must be hashable"):
        engine.add_request(tokens(5, 0), session_id=["a"], **GREEDY)


def test_idle_sessions_are_evicted_before_any_running_request_is_preempted_and_then_recompute(llama):
    # 16 blocks of 4: three idle sessions hold 4 blocks each; a request needing 10 blocks takes theirs.
    engine = Engine(llama, n_blocks=16, block_size=4, prefix_caching=False)
    firsts = {}
    for s in range(3):
        prompt = tokens(10, 20 + s)
        firsts[s] = (prompt, run_turn(engine, prompt, 7, session_id=s)[0])
    assert engine.cache.allocator.n_held == 12
    big = tokens(30, 40)
    out, _ = run_turn(engine, big, 10)  # 39 positions: 10 blocks
    assert_as_alone(llama, big, out, 10)
    assert engine.preemptions == 0 and engine.session_evictions >= 2
    assert engine.sessions[0].evictions == 1  # the least recently used went first
    for s, (prompt, first) in firsts.items():  # evicted or not, the next turn answers as the chat alone
        nxt = prompt + first.tokens + tokens(3, s)
        out, prefilled = run_turn(engine, nxt, 5, session_id=s)
        assert_as_alone(llama, nxt, out, 5)
        assert (out.cached_tokens == 0) == (engine.sessions[s].evictions == 1)


def test_a_tiny_budget_with_sessions_and_shared_prefixes_preempts_and_still_gives_every_answer_alone(llama):
    engine = Engine(llama, n_blocks=14, block_size=4)
    common = tokens(12, 50)
    prompts = [common + tokens(4 + k, 60 + k) for k in range(5)]
    ids = [engine.add_request(p, logprobs=True, max_new_tokens=14, session_id=k, **GREEDY)
           for k, p in enumerate(prompts)]
    list(engine.run())
    assert engine.preemptions > 0
    for p, rid in zip(prompts, ids):
        assert_as_alone(llama, p, engine.outputs[rid], 14)
    for k, (p, rid) in enumerate(zip(prompts, ids)):  # second turns, all at once, through evictions
        prompts[k] = p + engine.outputs[rid].tokens + tokens(2, k)
        ids[k] = engine.add_request(prompts[k], logprobs=True, max_new_tokens=8, session_id=k, **GREEDY)
    list(engine.run())
    for p, rid in zip(prompts, ids):
        assert_as_alone(llama, p, engine.outputs[rid], 8)
    for k in range(5):
        engine.end_session(k)
    assert engine.cache.allocator.n_free == 14 and not any(engine.cache.allocator.refs)


def test_a_block_stays_held_until_its_last_holder_lets_go():
    alloc = BlockAllocator(4)
    [b] = alloc.allocate(1)
    alloc.register(b, b"key")
    alloc.hold(b)  # a second sequence shares it
    alloc.release([b])
    assert alloc.refs[b] == 1 and b not in alloc.free and b not in alloc.cached
    assert alloc.allocate(3) != [] and alloc.n_free == 0  # the held block is not handed out again
    alloc.release([b])
    assert alloc.lookup(b"key") == b and alloc.n_free == 1  # cached: still found by its key
    with pytest.raises(RuntimeError, match=r"KV blocks \[0\] released twice"):
        alloc.release([b])
    [again] = alloc.allocate(1)  # the cached block is evicted: its key forgotten
    assert again == b and alloc.lookup(b"key") is None and alloc.evictions == 1


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mix_of_sessions_shared_prefixes_stops_and_tiny_budgets_leaves_every_answer_as_alone(
        fast_llama, data):
    """Random sessions (several turns, some stopped mid-turn), plain requests sharing the sessions' opening
    prefix, arrival steps, block sizes, step token budgets and block budgets down to the least that fits the
    largest request: every answer is its whole prompt's alone, and ending the sessions frees every block."""
    block_size = data.draw(st.sampled_from([1, 2, 4, 8]), label="block_size")
    max_step_tokens = data.draw(st.integers(1, 32), label="max_step_tokens")
    prefix = tokens(data.draw(st.integers(0, 10), label="shared prefix"), 77)
    sessions = data.draw(st.lists(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6), st.booleans()),
                                           min_size=1, max_size=3), min_size=1, max_size=3), label="turns")
    plain = data.draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(0, 6)), max_size=3),
                      label="plain requests")
    # Each request holds at most prompt + new - 1 <= 64 - 1 positions; the budget: the largest alone, or more.
    biggest = -(-(MAX_SEQ_LEN - 1) // block_size)
    n_blocks = data.draw(st.integers(biggest, 2 * biggest), label="n_blocks")
    engine = Engine(fast_llama, n_blocks=n_blocks, block_size=block_size, max_step_tokens=max_step_tokens)

    checks = []  # (prompt, request id, max_new)
    state = {s: dict(prompt=None, turn=0, rid=None, stop_at=None) for s in range(len(sessions))}
    pending_plain = list(enumerate(plain))
    step = 0
    while True:
        for s, turns in enumerate(sessions):
            st_ = state[s]
            if st_["rid"] is not None and engine.outputs[st_["rid"]].finished:
                st_["prompt"] = st_["prompt"] + engine.outputs[st_["rid"]].tokens
                st_["rid"] = None
            if st_["rid"] is None and st_["turn"] < len(turns):
                new, max_new, stop = turns[st_["turn"]]
                head = prefix + tokens(4, 100 + s) if st_["prompt"] is None else st_["prompt"]
                prompt = head + tokens(new, 1000 * s + st_["turn"])
                max_new = min(max_new, MAX_SEQ_LEN - len(prompt) - 6 * (len(turns) - st_["turn"]))
                if max_new < 1:
                    st_["turn"] = len(turns)
                    continue
                st_["prompt"], st_["turn"] = prompt, st_["turn"] + 1
                st_["rid"] = engine.add_request(prompt, logprobs=True, max_new_tokens=max_new, session_id=s,
                                                **GREEDY)
                st_["stop_at"] = step + 2 if stop else None
                checks.append((prompt, st_["rid"], max_new))
            elif st_["rid"] is not None and st_["stop_at"] == step:
                engine.stop_session(s)
        for k, (new, max_new, arrival) in list(pending_plain):
            if arrival <= step:
                prompt = prefix + tokens(4, 100 + k) + tokens(new, 5000 + k)
                checks.append((prompt, engine.add_request(prompt, logprobs=True, max_new_tokens=max_new,
                                                          **GREEDY), max_new))
                pending_plain.remove((k, (new, max_new, arrival)))
        busy = any(st_["rid"] is not None or st_["turn"] < len(sessions[s]) for s, st_ in state.items())
        if not (busy or pending_plain or engine.has_unfinished()):
            break
        engine.step()
        step += 1
    for prompt, rid, max_new in checks:
        assert_as_alone(fast_llama, prompt, engine.outputs[rid], max_new)
    for s in state:
        engine.end_session(s)
    assert engine.cache.allocator.n_free == n_blocks and not any(engine.cache.allocator.refs)


def test_a_seeded_turn_resumed_from_its_session_samples_what_the_whole_chat_samples_alone(llama):
    sampling = dict(temperature=0.9, top_p=0.95, seed=5, ignore_eos=True)
    engine = Engine(llama, n_blocks=40, block_size=4)
    first = tokens(10, 11)
    rid = engine.add_request(first, max_new_tokens=6, session_id="s", **sampling)
    list(engine.run())
    nxt = first + engine.outputs[rid].tokens + tokens(3, 12)
    rid = engine.add_request(nxt, logprobs=True, max_new_tokens=8, session_id="s", **sampling)
    engine.add_request(tokens(9, 13), max_new_tokens=8, temperature=1.0, seed=99)  # a neighbour
    list(engine.run())
    out = engine.outputs[rid]
    expected, logprobs = llama.generate([nxt], 8, logprobs=True, **sampling)
    assert out.cached_tokens == len(first) + 5 and out.tokens == expected[0]
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(logprobs[0]), rtol=0, atol=1e-5)
