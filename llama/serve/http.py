"""The OpenAI-compatible HTTP server: Starlette endpoints over an `AsyncEngine`, run by uvicorn.

    GET  /health                  200 while the engine's thread serves (with the engine's counts), else 503
    GET  /v1/models               the one served model
    POST /v1/completions          text (or token-id) prompts: llama.serve.protocol.parse_completion
    POST /v1/chat/completions     messages in the model family's chat format: parse_chat

Every request is read and checked in full (llama.serve.protocol) before anything is queued; a bad one gets
OpenAI's error object with a 4xx status. Each choice (prompt x n) is one engine request with sample_index =
its sample number, so a seeded request gives what `text_completion(..., seed=s, n=n)` gives. A client that
goes away, mid-stream or while waiting for a whole response, has its engine requests aborted (their KV
blocks freed) at once. `serve` runs uvicorn; SIGTERM or Ctrl-C stops accepting connections, lets the
running requests finish for up to `drain_timeout` seconds, cancels what is left and returns; a second
signal stops at once. See docs/serving.md.
"""

import asyncio
import contextlib
import json
import signal
import threading
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # the core package runs without them: only the server needs them
    raise ImportError(
        f"the HTTP server needs starlette and uvicorn ({e}): pip install 'starlette>=1.0' 'uvicorn>=0.30' "
        "(or pip install -e '.[serve]' in the repository)") from e

from llama.serve.async_engine import AsyncEngine
from llama.serve.engine import RequestOutput, TokenEvent
from llama.serve.protocol import Job, ModelInfo, RequestError, parse_chat, parse_completion
from llama.serve.responses import (
    Stamp, chat_choice, chat_delta, chat_logprobs, completion_choice, completion_logprobs, token_text, usage,
)
from llama.tool_calls import reply_message

DEFAULT_DRAIN_TIMEOUT = 30.0  # seconds running requests get to finish after SIGTERM / Ctrl-C


class _ClientGone(Exception):
    """The client closed its connection before its whole response was ready."""


def _error(status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
           code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(RequestError(message, param, code, status, type).body(), status_code=status)


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed when the response ends, finished or not: closing
    it aborts the engine requests it streams (Starlette cancels the stream when the client disconnects)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class OpenAIServer:
    """The endpoints' state: the engine, the model's description, the requests in flight."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.llama = engine.engine.llama
        cache = engine.engine.cache
        params = self.llama.model.params
        self.info = ModelInfo(model_name, params.max_seq_len, params.vocab_size, cache.block_size, cache.n_blocks,
                              self.llama.tokenizer, self.llama.formatter)
        self.active = 0  # HTTP generation requests being served

    # ---- endpoints ----

    async def health(self, request: Request) -> Response:
        engine = self.engine.engine
        status = "ok" if self.engine.serving else "engine stopped"
        return JSONResponse({"status": status, "model": self.info.name, "active_requests": self.active,
                             "running": len(engine.running), "waiting": len(engine.waiting),
                             "free_blocks": engine.cache.allocator.n_free, "total_blocks": engine.cache.n_blocks},
                            status_code=200 if self.engine.serving else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.info.name, "object": "model", "created": 0, "owned_by": "llama",
             "max_model_len": self.info.max_seq_len}]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat)

    # ---- one generation request ----

    async def _generate(self, request: Request, parse: Callable[[Any, ModelInfo], Job]) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"could not parse the JSON body of the request: {e}", code="invalid_json") from None
        job = parse(body, self.info)
        if not self.engine.serving:
            return _error(503, "the engine has stopped: no request can be served", "server_error")
        stamp = Stamp(job.chat, self.info.name)
        if job.stream:
            return EventStream(self._stream(job, stamp), headers={"Cache-Control": "no-cache"})
        self.active += 1
        try:
            outputs = await _until_disconnected(request, self._complete_all(job))
        except _ClientGone:
            return Response(status_code=499)  # (nobody reads it)
        except Exception:
            if not self.engine.serving:  # the engine's thread stopped (a step raised, or shut down) meanwhile
                return _error(503, "the engine has stopped: no request can be served", "server_error")
            raise
        finally:
            self.active -= 1
        return JSONResponse(self._body(job, stamp, outputs))

    def _submissions(self, job: Job) -> List[Dict[str, Any]]:
        """Engine arguments of each choice, in choice order (prompt i, sample j)."""
        return [dict(prompt_tokens=job.prompts[i], config=job.config.updated(max_new_tokens=job.max_new[i]),
                     logprobs=job.logprobs, top_logprobs=job.top_logprobs, sample_index=j)
                for i in range(len(job.prompts)) for j in range(job.n)]

    async def _complete_all(self, job: Job) -> List[RequestOutput]:
        tasks = [asyncio.ensure_future(self.engine.complete(**s)) for s in self._submissions(job)]
        try:
            return list(await asyncio.gather(*tasks))
        except ValueError as e:  # refused by the engine after our checks: still the request's fault
            raise RequestError(str(e)) from None
        finally:  # cancelled (client gone) or one failed: abort the others
            for task in tasks:
                task.cancel()

    def _completion_tokens(self, outputs: List[RequestOutput]) -> int:
        return sum(len(o.tokens) + (o.stop_token is not None) for o in outputs)

    def _body(self, job: Job, stamp: Stamp, outputs: List[RequestOutput]) -> Dict[str, Any]:
        tokenizer = self.llama.tokenizer
        choices = []
        for k, out in enumerate(outputs):
            i = k // job.n
            if job.chat:
                content = job.fixed_replies[i]
                if content is None:  # as chat_completion's message (a Llama 3.1 tool call loses its tag)
                    content = reply_message(out, tokenizer.special_tokens)["content"]
                lps = chat_logprobs(tokenizer, out.tokens, out.logprobs, out.top_logprobs) if job.logprobs else None
                choices.append(chat_choice(k, content, out.finish_reason, lps))
            else:
                prefix = job.prompt_texts[i] if job.echo else ""
                lps = None
                if job.logprobs:
                    lps = completion_logprobs(tokenizer, out.tokens, out.logprobs, out.top_logprobs, len(prefix))
                choices.append(completion_choice(k, prefix + out.text, out.finish_reason, lps))
        return stamp.body(choices, usage(sum(map(len, job.prompts)), self._completion_tokens(outputs)))

    async def _stream(self, job: Job, stamp: Stamp) -> AsyncIterator[str]:
        """The response's server-sent events; closing it early (the client left) aborts every choice."""
        queue: asyncio.Queue = asyncio.Queue()
        self.active += 1
        tasks = [asyncio.ensure_future(_pump(k, self.engine.generate(**s), queue))
                 for k, s in enumerate(self._submissions(job))]
        tokenizer = self.llama.tokenizer
        counts = [0] * len(tasks)  # generated tokens per choice (usage)
        offsets = [len(job.prompt_texts[k // job.n]) if job.echo else 0 for k in range(len(tasks))]

        def chunk(choice: Dict[str, Any]) -> str:
            return _sse(stamp.body([choice], None, chunk=True, with_usage=job.include_usage))

        try:
            for k in range(len(tasks)):  # each choice opens with its role (chat) or its echoed prompt
                if job.chat:
                    yield chunk(chat_delta(k, {"role": "assistant", "content": ""}))
                elif job.echo:
                    yield chunk(completion_choice(k, job.prompt_texts[k // job.n], None))
            left = len(tasks)
            while left:
                item = await queue.get()
                if isinstance(item, Exception):  # the engine failed: say so in the stream, then end it
                    status = 400 if isinstance(item, ValueError) else 500
                    kind = "invalid_request_error" if status == 400 else "server_error"
                    yield _sse(RequestError(str(item), status=status, type=kind).body())
                    break
                k, event = item
                for piece in self._pieces(job, k, event, tokenizer, counts, offsets):
                    yield chunk(piece)
                left -= event.finish_reason is not None
            else:
                if job.include_usage:
                    yield _sse(stamp.body([], usage(sum(map(len, job.prompts)), sum(counts)), chunk=True))
            yield "data: [DONE]\n\n"
        finally:
            self.active -= 1
            for task in tasks:
                task.cancel()

    def _pieces(self, job: Job, k: int, event: TokenEvent, tokenizer: Any, counts: List[int],
                offsets: List[int]) -> List[Dict[str, Any]]:
        """The chunks' choices for one engine event of choice k."""
        fixed = job.fixed_replies[k // job.n]
        if event.token is not None:
            counts[k] += 1
            if job.chat:
                lps = chat_logprobs(tokenizer, [event.token], [event.logprob],
                                    [event.top_logprobs] if event.top_logprobs else None) if job.logprobs else None
                text = "" if fixed is not None else event.text
                return [chat_delta(k, {"content": text}, None, lps)] if text or lps else []
            lps = None
            if job.logprobs:
                lps = completion_logprobs(tokenizer, [event.token], [event.logprob],
                                          [event.top_logprobs] if event.top_logprobs else None, offsets[k])
                offsets[k] += len(token_text(tokenizer, event.token))
            return [completion_choice(k, event.text, None, lps)] if event.text or lps else []
        counts[k] += event.finish_reason == "stop_token"  # generated, though not shown
        if not job.chat:
            return [completion_choice(k, event.text, event.finish_reason)]
        rest = fixed if fixed is not None else event.text
        return ([chat_delta(k, {"content": rest})] if rest else []) + [chat_delta(k, {}, event.finish_reason)]


async def _pump(k: int, events: AsyncIterator[TokenEvent], queue: asyncio.Queue) -> None:
    """Copy one choice's events into the response's queue (an engine error too, as the item)."""
    try:
        async for event in events:
            queue.put_nowait((k, event))
    except Exception as e:
        queue.put_nowait(e)


async def _until_disconnected(request: Request, work) -> Any:
    """Await `work`; if the client disconnects first, cancel it (aborting its engine requests) and raise
    _ClientGone."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _request_error(request: Request, e: RequestError) -> Response:
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(request: Request, e: HTTPException) -> Response:
    message = e.detail
    if e.status_code == 404:
        message = f"unknown request URL: {request.method} {request.url.path}"
    elif e.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return _error(e.status_code, message)


async def _server_error(request: Request, e: Exception) -> Response:
    return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def create_app(engine: AsyncEngine, model_name: str) -> Starlette:
    """The ASGI app serving `engine` under the model id `model_name`."""
    server = OpenAIServer(engine, model_name)
    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={RequestError: _request_error, HTTPException: _http_error,
                                                       Exception: _server_error})
    app.state.server = server
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, with serve()'s signal handling instead of its own (which re-raises the signal after
    shutting down, so that a drained SIGTERM would still end the process as killed), and a line saying where
    it listens once it does (the port is the one bound, also when 0 asked for any)."""

    def capture_signals(self):
        return contextlib.nullcontext()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"llama.serve: listening on http://{host}:{port}", flush=True)


def serve(app: Starlette, host: str = "127.0.0.1", port: int = 8000, *,
          drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, log_level: str = "info") -> None:
    """Run `app` with uvicorn until SIGTERM or Ctrl-C (SIGINT), then drain: stop accepting connections, let
    running requests finish for up to drain_timeout seconds, cancel (abort) the rest, return. A second
    signal stops at once. Call it from the main thread."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=drain_timeout)
    server = _Server(config)

    def on_signal(signum, frame) -> None:
        if server.should_exit:
            server.force_exit = True
            return
        server.should_exit = True
        active = app.state.server.active
        print(f"llama.serve: {signal.Signals(signum).name}: draining {active} request(s) "
              f"(at most {drain_timeout:g} s; signal again to stop now)", flush=True)

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve() installs signal handlers: call it from the main thread")
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(server.serve())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
