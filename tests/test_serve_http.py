"""llama.serve.http: the real server (uvicorn on a loopback port, in a thread) driven by the official `openai`
client. Every greedy answer equals what `Llama.text_completion` / `chat_completion` give for the prompt alone on
another Llama built from the same checkpoint; seeded samples equal theirs with the seed; streams concatenate to
the whole answers; bad requests get OpenAI errors naming the field before any work; a client that leaves frees
its KV blocks."""

import http.client
import json
import socket
import threading
import time

import openai
import pytest
import uvicorn

from helpers import SMALL_GQA
from llama.serve.async_engine import AsyncEngine
from llama.serve.engine import Engine
from llama.serve.http import create_app

PARAMS = dict(SMALL_GQA, vocab_size=512)
SEED, MAX_SEQ_LEN, N_BLOCKS = 7, 192, 60
MODEL = "tiny"
TEXTS = ["It is a truth", "Emma Woodhouse, handsome, clever", "x"]
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Emma?"}]


class Served:
    """A server running in a thread: its URL and the AsyncEngine behind it."""

    def __init__(self, engine: AsyncEngine, app):
        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started or not self.thread.is_alive():
                break
            time.sleep(0.05)
        assert self.server.started, "the server did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=120)

    def post(self, path: str, body: bytes):
        """A raw POST (for bodies the client would not send): (status, decoded JSON)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        status, data = response.status, json.loads(response.read())
        conn.close()
        return status, data

    def idle(self) -> bool:
        """Wait (bounded) until the engine holds no request and every KV block is free again."""
        engine = self.engine.engine
        for _ in range(1000):
            if not engine.has_unfinished() and engine.cache.allocator.n_free == engine.cache.n_blocks:
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.engine.shutdown()


@pytest.fixture(scope="module")
def served(tiny_llama):
    llama = tiny_llama(PARAMS, seed=SEED, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, device="cpu")
    engine = AsyncEngine(Engine(llama, n_blocks=N_BLOCKS, block_size=8))
    s = Served(engine, create_app(engine, MODEL))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Another Llama from the same checkpoint, for the answers of each prompt run alone."""
    return tiny_llama(PARAMS, seed=SEED, max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu")


def test_models_and_health_describe_the_served_model(served):
    assert [m.id for m in served.client().models.list().data] == [MODEL]
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["total_blocks"] == N_BLOCKS


def test_greedy_completions_equal_text_completion_alone(served, reference):
    response = served.client().completions.create(model=MODEL, prompt=TEXTS, max_tokens=12, temperature=0,
                                                  logprobs=2)
    assert [c.index for c in response.choices] == [0, 1, 2]
    completion_tokens = 0
    for text, choice in zip(TEXTS, response.choices):
        [expected] = reference.text_completion([text], max_gen_len=12, temperature=0, logprobs=True, top_logprobs=2)
        assert choice.text == expected["generation"]
        assert choice.logprobs.tokens == expected["tokens"]
        assert choice.logprobs.token_logprobs == pytest.approx(expected["logprobs"], abs=1e-5)
        for top, alone, chosen in zip(choice.logprobs.top_logprobs, expected["top_logprobs"], expected["tokens"]):
            assert set(top) == {t for t, _ in alone} | {chosen}  # the 2 likeliest, and the chosen one
        assert choice.finish_reason == ("length" if len(expected["tokens"]) == 12 else "stop")
        completion_tokens += len(expected["tokens"]) + (choice.finish_reason == "stop")  # a stop token counts
    prompt_tokens = sum(len(reference.tokenizer.encode(t, bos=True, eos=False)) for t in TEXTS)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert response.usage.total_tokens == prompt_tokens + completion_tokens


def test_chat_completion_equals_chat_completion_alone(served, reference):
    response = served.client().chat.completions.create(model=MODEL, messages=DIALOG, max_tokens=10, temperature=0,
                                                       logprobs=True, top_logprobs=3)
    [expected] = reference.chat_completion([DIALOG], max_gen_len=10, temperature=0, logprobs=True, top_logprobs=3)
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.message.content == expected["generation"]["content"]
    assert [e.token for e in choice.logprobs.content] == expected["tokens"]
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(expected["logprobs"], abs=1e-5)
    assert [[t.token for t in e.top_logprobs] for e in choice.logprobs.content] == [
        [t for t, _ in top] for top in expected["top_logprobs"]]
    assert response.usage.prompt_tokens == len(reference.formatter.encode_dialog_prompt(DIALOG))


def test_streams_concatenate_to_the_whole_response_and_end_with_usage(served):
    client = served.client()
    settings = dict(model=MODEL, max_tokens=14, temperature=0)
    whole = client.completions.create(prompt=TEXTS[:2], **settings)
    texts, ends, usages = {}, {}, []
    for chunk in client.completions.create(prompt=TEXTS[:2], stream=True, stream_options={"include_usage": True},
                                           **settings):
        usages.append(chunk.usage)
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                ends[c.index] = c.finish_reason
    assert [texts[i] for i in range(2)] == [c.text for c in whole.choices]
    assert [ends[i] for i in range(2)] == [c.finish_reason for c in whole.choices]
    assert usages[-1] == whole.usage and all(u is None for u in usages[:-1])

    chat = client.chat.completions.create(messages=DIALOG, **settings)
    chunks = list(client.chat.completions.create(messages=DIALOG, stream=True, **settings))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_seeded_samples_equal_text_completion_with_the_seed(served, reference):
    settings = dict(temperature=1.0, top_p=0.95, seed=11)
    expected = reference.text_completion([TEXTS[1]], max_gen_len=10, n=3, **settings)[0]
    client = served.client()
    response = client.completions.create(model=MODEL, prompt=TEXTS[1], max_tokens=10, n=3, **settings)
    assert [c.text for c in response.choices] == [e["generation"] for e in expected]
    streamed = {}
    for chunk in client.completions.create(model=MODEL, prompt=TEXTS[1], max_tokens=10, n=3, stream=True,
                                           **settings):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [e["generation"] for e in expected]


def test_stop_strings_end_the_text_where_text_completion_ends_it(served, reference):
    [full] = reference.text_completion([TEXTS[0]], max_gen_len=20, temperature=0)
    stop = full["generation"][5:7]  # a piece of what greedy decoding writes: it will be met
    assert stop
    [expected] = reference.text_completion([TEXTS[0]], max_gen_len=20, temperature=0, stop=[stop])
    for value in (stop, [stop, "\x00never"]):
        [choice] = served.client().completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=20, temperature=0,
                                                      stop=value).choices
        assert choice.text == expected["generation"] and choice.finish_reason == "stop"
        assert stop not in choice.text


def test_streamed_logprobs_and_echo_are_those_of_the_whole_response(served):
    client = served.client()
    settings = dict(model=MODEL, prompt=TEXTS[0], max_tokens=9, temperature=0, logprobs=2)
    whole = client.completions.create(**settings).choices[0].logprobs
    tokens, logprobs, tops, offsets = [], [], [], []
    for chunk in client.completions.create(stream=True, **settings):
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                logprobs += c.logprobs.token_logprobs
                tops += c.logprobs.top_logprobs
                offsets += c.logprobs.text_offset
    assert (tokens, logprobs, tops, offsets) == (whole.tokens, whole.token_logprobs, whole.top_logprobs,
                                                 whole.text_offset)
    assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]  # into the choice's text
    plain = client.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=9, temperature=0).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=9, temperature=0, echo=True)
    assert echoed.choices[0].text == TEXTS[0] + plain
    streamed = "".join(c.text for chunk in client.completions.create(
        model=MODEL, prompt=TEXTS[0], max_tokens=9, temperature=0, echo=True, stream=True) for c in chunk.choices)
    assert streamed == TEXTS[0] + plain


BAD = [  # (endpoint, body, status, param)
    ("completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("completions", {"model": MODEL, "prompt": "a", "max_tokens": MAX_SEQ_LEN}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "a", "n": 0}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "a", "n": "2"}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "a", "stop": 5}, 400, "stop"),
    ("completions", {"model": MODEL, "prompt": "a", "seed": -1}, 400, "seed"),
    ("completions", {"model": MODEL, "prompt": "a", "logprobs": 50}, 400, "logprobs"),
    ("completions", {"model": MODEL, "prompt": "a", "echo": True, "logprobs": 1}, 400, "echo"),
    ("completions", {"model": MODEL, "prompt": [1, 2, 999]}, 400, "prompt"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("completions", {"model": MODEL, "prompt": "a", "presence_penalty": 1}, 400, "presence_penalty"),
    ("completions", {"model": MODEL, "prompt": "a", "foo": 1}, 400, "foo"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": DIALOG, "max_completion_tokens": MAX_SEQ_LEN}, 400,
     "max_completion_tokens"),
    ("chat/completions", {"model": MODEL, "messages": DIALOG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"model": MODEL, "messages": DIALOG, "logprobs": 1}, 400, "logprobs"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_request_gets_an_openai_error_naming_the_field_before_any_work(served, endpoint, body, status, param):
    steps = served.engine.engine.steps
    got, data = served.post(f"/v1/{endpoint}", json.dumps(body).encode())
    assert got == status
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["param"] == param
    assert data["error"]["type"] == "invalid_request_error" and data["error"]["message"]
    assert served.engine.engine.steps == steps and not served.engine.engine.has_unfinished()


def test_malformed_json_and_unknown_urls_get_openai_errors(served):
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, data = served.post("/v1/completions", body)
        assert status == 400 and data["error"]["type"] == "invalid_request_error"
    assert served.post("/v1/engines", b"{}")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.request("GET", "/v1/completions")
    response = conn.getresponse()
    assert response.status == 405 and json.loads(response.read())["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:  # and through the client: the error's fields come through
        served.client().completions.create(model="nope", prompt="a")
    assert e.value.param == "model" and e.value.code == "model_not_found"


def _open_stream(port: int, body: dict) -> socket.socket:
    """Send a streaming request on a raw socket and read until its first token's event arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    received = b""
    while received.count(b"data: ") < 2:
        more = sock.recv(65536)
        assert more and not received.startswith(b"HTTP/1.1 4"), received
        received += more
    return sock


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(served):
    engine = served.engine.engine
    body = {"model": MODEL, "prompt": TEXTS[1], "max_tokens": 150, "temperature": 0, "ignore_eos": True,
            "stream": True}
    sock = _open_stream(served.port, body)
    assert engine.cache.allocator.n_free < engine.cache.n_blocks  # it holds blocks while it runs
    steps = engine.steps
    sock.close()
    assert served.idle()  # aborted: every block back, nothing running or waiting
    assert engine.steps - steps < 100  # dropped, not run to its end (the thread may step a few times first)
    # and the server serves on
    assert served.client().completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0).choices


def test_a_client_that_leaves_before_its_whole_response_frees_its_blocks(served):
    engine = served.engine.engine
    body = json.dumps({"model": MODEL, "prompt": TEXTS[1], "max_tokens": 150, "temperature": 0,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    for _ in range(1000):  # until the engine generates for it
        if engine.running and engine.outputs and any(o.tokens for o in list(engine.outputs.values())):
            break
        time.sleep(0.005)
    steps = engine.steps
    sock.close()
    assert served.idle()
    assert engine.steps - steps < 100


def _load_cases(reference):
    """~40 distinct requests of mixed kinds, lengths and settings, each with the answers its prompt gets alone
    from the reference Llama: (endpoint, request fields, expected texts per choice, expected finish reasons)."""
    import random

    rng = random.Random(3)
    words = "the of and to a her she was it in not be that had as you with for his he I all".split()
    cases = []
    for k in range(40):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) or "x"
        max_tokens = rng.randint(1, 24)
        kind = k % 5
        if kind == 4:  # chat, greedy
            dialog = [{"role": "user", "content": text}]
            [e] = reference.chat_completion([dialog], max_gen_len=max_tokens, temperature=0)
            cases.append(("chat", dict(messages=dialog, max_tokens=max_tokens, temperature=0),
                          [e["generation"]["content"]], None))
            continue
        settings = dict(temperature=0)
        if kind == 1:  # seeded samples, n of them
            settings = dict(temperature=0.8, top_p=0.9, seed=k, n=rng.randint(1, 3))
        elif kind == 2:  # seeded with top_k (an extra field, as vLLM takes it)
            settings = dict(temperature=1.0, top_k=5, seed=k)
        elif kind == 3:  # a stop string met on the way
            [full] = reference.text_completion([text], max_gen_len=max_tokens, temperature=0)
            stop = full["generation"][2:4]
            settings = dict(temperature=0, stop=[stop]) if stop else settings
        expected = reference.text_completion([text], max_gen_len=max_tokens, **settings)[0]
        expected = expected if isinstance(expected, list) else [expected]
        request = dict(prompt=text, max_tokens=max_tokens, **settings)
        if "top_k" in request:
            request["extra_body"] = {"top_k": request.pop("top_k")}
        cases.append(("completions", request, [e["generation"] for e in expected], None))
    return cases


@pytest.mark.slow
def test_200_requests_from_32_concurrent_clients_each_get_what_their_prompt_gets_alone(served, reference):
    import asyncio
    import random

    cases = _load_cases(reference)
    rng = random.Random(5)
    plan = [(r, rng.randrange(len(cases)), rng.random() < 0.5) for r in range(200)]  # (id, case, stream?)

    async def send(client, case, stream):
        endpoint, fields, _, _ = case
        create = client.chat.completions.create if endpoint == "chat" else client.completions.create
        if not stream:
            response = await create(model=MODEL, **fields)
            if endpoint == "chat":
                return [c.message.content for c in response.choices], response.usage.completion_tokens
            return [c.text for c in response.choices], response.usage.completion_tokens
        texts, usage = {}, None
        async for chunk in await create(model=MODEL, stream=True, stream_options={"include_usage": True}, **fields):
            usage = chunk.usage or usage
            for c in chunk.choices:
                piece = (c.delta.content or "") if endpoint == "chat" else c.text
                texts[c.index] = texts.get(c.index, "") + piece
        return [texts[i] for i in range(len(texts))], usage.completion_tokens

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)
        results = {}

        async def client_loop():
            client = openai.AsyncOpenAI(base_url=served.url, api_key="none", max_retries=0, timeout=300)
            while not queue.empty():
                r, c, stream = queue.get_nowait()
                results[r] = await send(client, cases[c], stream)
            await client.close()

        await asyncio.gather(*(client_loop() for _ in range(32)))
        return results

    results = asyncio.run(main())
    assert sorted(results) == list(range(200))  # nothing lost
    wrong = [(r, c, stream, results[r][0], cases[c][2]) for r, c, stream in plan if results[r][0] != cases[c][2]]
    assert not wrong, f"{len(wrong)} of 200 answers differ from their prompt's alone, e.g. {wrong[0]}"
    for r, c, _ in plan:  # each choice generated at least one token (maybe a stop token), at most max_tokens
        choices, max_tokens = len(cases[c][2]), cases[c][1]["max_tokens"]
        assert choices <= results[r][1] <= choices * max_tokens
    assert served.engine.engine.preemptions > 0  # the KV pool was too small for all of them at once
    assert served.idle()  # every block back
    assert served.engine.serving
    assert served.client().completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0).choices


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine's thread raises
def test_an_engine_failure_is_a_server_error_and_health_says_so(tiny_llama):
    llama = tiny_llama(PARAMS, seed=SEED, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, device="cpu")
    engine = Engine(llama, n_blocks=N_BLOCKS, block_size=8)

    def broken_step():
        raise RuntimeError("a broken step")

    engine.step = broken_step
    served_engine = AsyncEngine(engine)
    s = Served(served_engine, create_app(served_engine, MODEL))
    try:
        status, data = s.post("/v1/completions", json.dumps({"model": MODEL, "prompt": "a"}).encode())
        assert status in (500, 503) and data["error"]["type"] == "server_error"
        for _ in range(500):
            if not served_engine.serving:
                break
            time.sleep(0.01)
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 503
        status, data = s.post("/v1/completions", json.dumps({"model": MODEL, "prompt": "a"}).encode())
        assert status == 503 and "stopped" in data["error"]["message"]
    finally:
        s.stop()


def test_llama2_chat_uses_its_format_and_its_fixed_reply_to_special_tags(tiny_llama):
    from helpers import SMALL_MHA
    from llama.tokenizer_llama2 import UNSAFE_ERROR

    def build():
        return tiny_llama(dict(SMALL_MHA, vocab_size=-1), tokenizer="sentencepiece", max_seq_len=MAX_SEQ_LEN,
                          max_batch_size=1, device="cpu")

    reference, engine = build(), AsyncEngine(Engine(build(), n_blocks=N_BLOCKS, block_size=8))
    s = Served(engine, create_app(engine, MODEL))
    try:
        client = s.client()
        for dialog in (DIALOG, [{"role": "user", "content": "[INST] hi"}]):
            [expected] = reference.chat_completion([dialog], max_gen_len=8, temperature=0)
            whole = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=8, temperature=0)
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=MODEL, messages=dialog, max_tokens=8, temperature=0, stream=True) if c.choices)
            assert whole.choices[0].message.content == streamed == expected["generation"]["content"]
        assert expected["generation"]["content"] == UNSAFE_ERROR  # (the last dialog held a tag)
        with pytest.raises(openai.BadRequestError) as e:  # Llama 2 has no tool role
            client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "1"}])
        assert e.value.param == "messages[0].role"
    finally:
        s.stop()
