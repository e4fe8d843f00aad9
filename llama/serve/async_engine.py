"""`AsyncEngine`: the Engine stepped by a thread of its own, for asyncio callers (the coming HTTP server).

Only that thread touches the Engine: callers send it commands (add a request, abort one) through a queue and
read their request's TokenEvents from an asyncio.Queue that the thread fills through the caller's event loop.
torch releases the GIL while it computes, so the event loop keeps serving while a step runs.

    engine = AsyncEngine(Engine(llama, n_blocks=512))
    async for event in engine.generate(tokens, temperature=0, max_new_tokens=32):
        print(event.text, end="")
    engine.shutdown()

Sessions: pass `session_id=` (any hashable id) with each turn of a chat, the prompt being the whole chat so far:
the engine keeps the session's blocks between turns and computes only what is new. One turn at a time per
session (a second raises ValueError); `await engine.stop_session(id)` ends the turn under way (its stream ends
with finish_reason "abort"; the history is kept), `await engine.end_session(id)` also lets go of its blocks.
"""

import asyncio
import concurrent.futures
import queue
import threading
from typing import Any, AsyncIterator, Dict, Hashable, List, Optional, Tuple

from llama.config import GenerationConfig
from llama.serve.engine import Engine, RequestOutput, TokenEvent


class AsyncEngine:
    """An Engine run by a background thread; any number of coroutines submit requests and stream them."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: "queue.SimpleQueue[Tuple[str, Any]]" = queue.SimpleQueue()
        self._wake = threading.Event()
        # request id -> (the caller's loop, its queue of events)
        self._streams: Dict[int, Tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llama-serve-engine", daemon=True)
        self._thread.start()

    # ---- the engine's thread ----

    def _run(self) -> None:
        while not self._stopping:
            self._take_commands()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # every caller hears of it rather than waiting forever
                for loop, q in self._streams.values():
                    loop.call_soon_threadsafe(q.put_nowait, e)
                self._streams.clear()
                raise
            self._deliver(events)

    def _take_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                (tokens, config, kwargs, loop, q, future) = payload
                if not future.set_running_or_notify_cancel():  # its caller left before it was queued
                    continue
                try:
                    request_id = self.engine.add_request(tokens, config, **kwargs)
                except Exception as e:  # a bad request: its caller gets the error
                    future.set_exception(e)
                    continue
                self._streams[request_id] = (loop, q)
                future.set_result(request_id)
                output = self.engine.outputs[request_id]
                if output.finished:  # nothing to generate: it ends at once
                    self._deliver([TokenEvent(request_id, None, "", None, output.finish_reason)])
            elif kind == "abort":
                self.engine.abort(payload)
                self._streams.pop(payload, None)
                self.engine.outputs.pop(payload, None)
            elif kind in ("stop_session", "end_session"):
                session_id, future = payload
                event = getattr(self.engine, kind)(session_id)
                if event is not None:  # the turn's caller hears its end
                    self._deliver([event])
                future.set_result(None)

    def _deliver(self, events: List[TokenEvent]) -> None:
        for event in events:
            stream = self._streams.get(event.request_id)
            output = None
            if event.finish_reason is not None:  # its last event carries its whole output
                output = self.engine.outputs.pop(event.request_id)
                self._streams.pop(event.request_id, None)
            if stream is not None:
                loop, q = stream
                loop.call_soon_threadsafe(q.put_nowait, (event, output))

    def _send(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wake.set()

    # ---- callers ----

    async def generate(self, prompt_tokens: List[int], config: Optional[GenerationConfig] = None,
                       **kwargs: Any) -> AsyncIterator[TokenEvent]:
        """Queue a request (arguments as Engine.add_request) and yield its TokenEvents as they come, the last
        with its finish_reason. A bad request raises (ValueError) at the first iteration; leaving the loop
        early, or the task being cancelled, aborts the request and frees its blocks."""
        async for event, _ in self._items(prompt_tokens, config, kwargs):
            yield event

    async def complete(self, prompt_tokens: List[int], config: Optional[GenerationConfig] = None,
                       **kwargs: Any) -> RequestOutput:
        """Run a request to its end and return its output (tokens, logprobs, text, finish reason)."""
        async for _, output in self._items(prompt_tokens, config, kwargs):
            if output is not None:
                return output
        raise RuntimeError("the request ended without an output")  # (the engine's thread broke off)

    async def _items(self, prompt_tokens: List[int], config: Optional[GenerationConfig],
                     kwargs: Dict[str, Any]) -> AsyncIterator[Tuple[TokenEvent, Optional[RequestOutput]]]:
        if self._stopping or not self._thread.is_alive():  # shut down, or a step raised (see the thread's error)
            raise RuntimeError("the engine's thread has stopped: no request can be served")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send("add", (list(prompt_tokens), config, kwargs, loop, q, future))
        try:
            request_id = await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # left while the thread was queueing it: abort it once it has an id
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or self._send("abort", f.result()))
            raise
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                finished = item[0].finish_reason is not None
                yield item
        finally:
            if not finished:
                self._send("abort", request_id)

    @property
    def serving(self) -> bool:
        """Whether requests are taken: not shut down, and the thread alive (a step that raised ends it)."""
        return not self._stopping and self._thread.is_alive()
    async def stop_session(self, session_id: Hashable) -> None:
        """Abort the session's turn under way, if any (its caller's stream ends with finish_reason "abort"),
        keeping the history for the next turn. Returns once the engine's thread has done it."""
        await self._session_command("stop_session", session_id)

    async def end_session(self, session_id: Hashable) -> None:
        """Stop the session and let go of its blocks. Returns once the engine's thread has done it."""
        await self._session_command("end_session", session_id)

    async def _session_command(self, kind: str, session_id: Hashable) -> None:
        if self._stopping or not self._thread.is_alive():
            raise RuntimeError("the engine's thread has stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send(kind, (session_id, future))
        await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Stop the thread after the step in progress (requests still running are left unfinished)."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
