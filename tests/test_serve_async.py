"""llama.serve.async_engine: concurrent asyncio callers, arriving at different times, each get what their
prompt gets alone from Llama.generate; a caller that leaves early frees its blocks; bad requests raise."""

import asyncio

import pytest
import torch

from helpers import SMALL_GQA
from llama.serve.async_engine import AsyncEngine
from llama.serve.engine import Engine

PARAMS = dict(SMALL_GQA, vocab_size=512)
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return tiny_llama(PARAMS, seed=4, max_seq_len=64, max_batch_size=1, device="cpu")


@pytest.fixture()
def engine(llama):
    engine = AsyncEngine(Engine(llama, n_blocks=20, block_size=4))  # tight: preemptions happen
    yield engine
    engine.shutdown()


def prompts(n=6):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (int(k),), generator=g).tolist() for k in torch.randint(2, 30, (n,), generator=g)]


def test_concurrent_callers_arriving_at_different_times_get_what_they_get_alone(engine, llama):
    async def caller(k, prompt):
        await asyncio.sleep(0.002 * k)  # arrive while the others decode
        streamed = []
        async for event in engine.generate(prompt, logprobs=True, max_new_tokens=14, **GREEDY):
            if event.token is not None:
                streamed.append((event.token, event.logprob))
        return streamed

    async def main():
        return await asyncio.gather(*(caller(k, p) for k, p in enumerate(prompts())))

    for prompt, streamed in zip(prompts(), asyncio.run(main())):
        tokens, logprobs = llama.generate([prompt], 14, logprobs=True, **GREEDY)
        assert [t for t, _ in streamed] == tokens[0]
        torch.testing.assert_close(torch.tensor([lp for _, lp in streamed]), torch.tensor(logprobs[0]),
                                   rtol=0, atol=1e-5)


def test_complete_returns_the_whole_output(engine, llama):
    prompt = prompts()[0]
    out = asyncio.run(engine.complete(prompt, max_new_tokens=9, temperature=0.9, seed=3, ignore_eos=True))
    tokens, _ = llama.generate([prompt], 9, temperature=0.9, seed=3, ignore_eos=True)
    assert out.tokens == tokens[0] and out.finish_reason == "length"


def test_a_caller_that_leaves_early_frees_its_blocks(engine):
    async def leave_early():
        stream = engine.generate([7, 8], max_new_tokens=60, **GREEDY)
        async for event in stream:
            if event.token is not None:
                break
        await stream.aclose()
        left_at = engine.engine.steps
        for _ in range(500):  # the engine's thread takes the abort before its next step
            if engine.engine.cache.allocator.n_free == 20 and not engine.engine.has_unfinished():
                return engine.engine.steps - left_at
            await asyncio.sleep(0.01)
        return None

    steps_after = asyncio.run(leave_early())
    # Dropped, not run to its end (59 more steps): the thread may have run a few steps before it saw the abort.
    assert steps_after is not None and steps_after < 30
    assert not engine.engine.outputs


def test_a_bad_request_raises_in_its_caller_and_the_engine_serves_on(engine):
    async def main():
        with pytest.raises(ValueError, match=r"token ids \[999\] are outside the vocabulary"):
            await engine.complete([1, 999])
        return await engine.complete(prompts()[2], max_new_tokens=3, **GREEDY)

    assert len(asyncio.run(main()).tokens) == 3


def test_a_shut_down_engine_refuses_new_requests(llama):
    engine = AsyncEngine(Engine(llama, n_blocks=8, block_size=4))
    engine.shutdown()
    with pytest.raises(RuntimeError, match=r"the engine's thread has stopped"):
        asyncio.run(engine.complete([1, 2]))


def test_concurrent_sessions_resume_their_chats_and_answer_as_the_whole_chat_alone(llama):
    engine = AsyncEngine(Engine(llama, n_blocks=24, block_size=4))

    async def chat(k):
        prompt, saved = prompts()[k], []
        for turn in range(3):
            out = await engine.complete(prompt, logprobs=True, max_new_tokens=6, session_id=f"user{k}", **GREEDY)
            saved.append((prompt, out))
            prompt = prompt + out.tokens + [40 + turn, 41]
        return saved

    async def main():
        return await asyncio.gather(*(chat(k) for k in range(4)))

    try:
        chats = asyncio.run(main())
    finally:
        engine.shutdown()
    for saved in chats:
        for turn, (prompt, out) in enumerate(saved):
            tokens, logprobs = llama.generate([prompt], 6, logprobs=True, **GREEDY)
            assert out.tokens == tokens[0]
            torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(logprobs[0]), rtol=0, atol=1e-5)
    # Later turns reused what their session held (unless memory ran short and the session was evicted).
    assert sum(out.cached_tokens > 0 for saved in chats for _, out in saved[1:]) + engine.engine.session_evictions > 0
    assert sum(out.cached_tokens for saved in chats for _, out in saved[1:]) > 0


def test_stop_session_ends_the_callers_stream_and_end_session_frees_its_blocks(engine):
    async def main():
        ends = []

        async def caller():
            async for event in engine.generate([5, 6, 7], max_new_tokens=50, session_id="s", **GREEDY):
                ends.append(event.finish_reason)

        task = asyncio.create_task(caller())
        while len(ends) < 3:
            await asyncio.sleep(0.005)
        await engine.stop_session("s")
        await task
        held = engine.engine.cache.allocator.n_held
        await engine.end_session("s")
        return ends[-1], held, engine.engine.cache.allocator.n_free

    last, held, free = asyncio.run(main())
    assert last == "abort" and held > 0 and free == 20
