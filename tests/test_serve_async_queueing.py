"""llama.serve.async_engine: a caller that leaves while the engine's thread has not yet queued its request (an
HTTP client that disconnects at once, the server's drain timeout) is dropped, and the thread serves on."""

import asyncio
import threading

import pytest

from helpers import SMALL_GQA
from llama.serve.async_engine import AsyncEngine
from llama.serve.engine import Engine

PARAMS = dict(SMALL_GQA, vocab_size=512)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return tiny_llama(PARAMS, seed=4, max_seq_len=64, max_batch_size=1, device="cpu")


def test_a_caller_cancelled_before_its_request_is_queued_is_dropped_and_the_engine_serves_on(llama):
    engine = Engine(llama, n_blocks=20, block_size=4)
    inside, gate = threading.Event(), threading.Event()
    step = engine.step

    def held_step():  # hold the thread inside its first step: it takes no command meanwhile
        inside.set()
        gate.wait(60)
        return step()

    engine.step = held_step
    served = AsyncEngine(engine)

    async def main():
        first = asyncio.ensure_future(served.complete([1, 2, 3], temperature=0, max_new_tokens=4))
        await asyncio.to_thread(inside.wait, 60)
        late = asyncio.ensure_future(served.complete([4, 5], temperature=0, max_new_tokens=4))
        await asyncio.sleep(0.05)  # it has sent its request to the (held) thread
        late.cancel()
        gate.set()
        out = await asyncio.wait_for(first, 60)
        again = await asyncio.wait_for(served.complete([6, 7], temperature=0, max_new_tokens=3), 60)
        return out, late, again

    try:
        out, late, again = asyncio.run(main())
        assert late.cancelled() and served.serving
        assert len(out.tokens) == 4 and len(again.tokens) == 3
        assert not engine.has_unfinished() and not engine.outputs  # the cancelled request never ran
        assert engine.cache.allocator.n_free == 20
    finally:
        gate.set()
        served.shutdown()
