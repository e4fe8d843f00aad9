"""llama.serve.pipeline: texts and dialogs through the engine give what Llama's text_completion and
chat_completion give for each prompt alone; streams concatenate to the same texts and share the engine."""

import itertools

import pytest

from helpers import SMALL_GQA
from llama.serve.pipeline import Response, pipeline

PARAMS = dict(SMALL_GQA, vocab_size=512)
TEXTS = ["It is a truth", "Emma", "universally acknowledged, that a single man", "x"]
DIALOGS = [[{"role": "user", "content": "Hello"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Emma?"}]]
GREEDY = dict(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return tiny_llama(PARAMS, seed=2, max_seq_len=96, max_batch_size=2, device="cpu")


@pytest.fixture()
def pipe(llama):
    return pipeline(llama, n_blocks=24, block_size=4)


def test_text_prompts_get_the_text_completion_of_each_prompt_alone(pipe, llama):
    responses = pipe(TEXTS, logprobs=True, **GREEDY)
    for text, response in zip(TEXTS, responses):
        [expected] = llama.text_completion([text], max_gen_len=12, temperature=0, logprobs=True)
        assert response.text == expected["generation"]
        assert [llama.tokenizer.decode([t]) for t in response.tokens] == expected["tokens"]
        assert response.logprobs == pytest.approx(expected["logprobs"], abs=1e-5)
    assert isinstance(pipe(TEXTS[0], **GREEDY), Response)  # one prompt alone: one Response


def test_streamed_logprobs_and_top_logprobs_are_those_of_the_call(pipe):
    called = pipe(TEXTS[:2], top_logprobs=2, **GREEDY)
    chunks = [c for c in pipe.stream(TEXTS[:2], top_logprobs=2, **GREEDY) if c.token is not None]
    for i, response in enumerate(called):
        mine = [c for c in chunks if c.index == i]
        assert [c.token for c in mine] == response.tokens
        # The stream reuses the call's cached prompt blocks (only its last token is computed again, in
        # another shape of product): equal to float32 rounding, not bit for bit.
        assert [c.logprob for c in mine] == pytest.approx(response.logprobs, abs=1e-5)
        for got, want in zip([c.top_logprobs for c in mine], response.top_logprobs):
            assert [t for t, _ in got] == [t for t, _ in want] and len(want) == 2
            assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-5)


def test_dialogs_get_the_chat_completion_of_each_dialog_alone(pipe, llama):
    responses = pipe(DIALOGS, **GREEDY)
    for dialog, response in zip(DIALOGS, responses):
        [expected] = llama.chat_completion([dialog], max_gen_len=12, temperature=0)
        assert response.text == expected["generation"]["content"]
    assert pipe(DIALOGS[0], **GREEDY).text == responses[0].text


def test_n_seeded_samples_are_those_of_text_completion(pipe, llama):
    settings = dict(temperature=1.0, top_p=0.95, seed=4, n=2, max_new_tokens=10)
    samples = pipe([TEXTS[2]], **settings)[0]
    [expected] = llama.text_completion([TEXTS[2]], max_gen_len=10, temperature=1.0, top_p=0.95, seed=4, n=2)
    assert [s.text for s in samples] == [e["generation"] for e in expected]


def test_interleaved_streams_each_get_their_own_rows_and_concatenate_to_the_call(pipe):
    streams = {"t": pipe.stream(TEXTS[:2], **GREEDY), "d": pipe.stream(DIALOGS, **GREEDY)}
    texts, ends = {}, {}
    for pair in itertools.zip_longest(streams["t"], streams["d"]):  # read in turns: one engine runs both
        for key, chunk in zip(streams, pair):
            if chunk is not None:
                texts[key, chunk.index] = texts.get((key, chunk.index), "") + chunk.text
                if chunk.finish_reason:
                    ends[key, chunk.index] = chunk.finish_reason
    assert [texts["t", i] for i in range(2)] == [r.text for r in pipe(TEXTS[:2], **GREEDY)]
    assert [texts["d", i] for i in range(2)] == [r.text for r in pipe(DIALOGS, **GREEDY)]
    assert len(ends) == 4 and pipe.engine.cache.allocator.n_free == 24


def test_a_stream_closed_early_frees_its_blocks(pipe):
    stream = pipe.stream(TEXTS, max_new_tokens=40, temperature=0)
    for _ in range(6):
        next(stream)
    assert pipe.engine.cache.allocator.n_free < 24
    stream.close()
    assert pipe.engine.cache.allocator.n_free == 24 and not pipe.engine.has_unfinished()


@pytest.mark.parametrize("prompts, error, message", [
    ([], ValueError, r"no prompts given"),
    ([["a", "b"]], TypeError, r"a prompt is a string or a dialog"),
    (["ok", "y" * 200], ValueError, r"prompt 1: prompt: the prompt has 201 tokens, more than max_seq_len=96"),
    ([[{"role": "assistant", "content": "hi"}]], ValueError, r"."),
])
def test_a_bad_prompt_is_refused_and_nothing_stays_queued(pipe, prompts, error, message):
    with pytest.raises(error, match=message):
        pipe(prompts, **GREEDY)
    assert not pipe.engine.has_unfinished() and not pipe.engine.outputs


def test_a_chat_session_answers_each_turn_as_chat_completion_on_the_whole_dialog_prefilling_only_new_messages(
        tiny_llama):
    # Byte tokens: an answer of random bytes re-encodes to up to 3 tokens a byte, so the chat grows fast.
    llama = tiny_llama(PARAMS, seed=2, max_seq_len=256, max_batch_size=1, device="cpu")
    pipe = pipeline(llama, n_blocks=80, block_size=4)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Emma?"}]
    for turn, question in enumerate(["And Harriet?", "Thank you."]):
        before = pipe.engine.prefill_tokens
        response = pipe(dialog, session_id="chat", logprobs=True, **GREEDY)
        prefilled = pipe.engine.prefill_tokens - before
        [expected] = llama.chat_completion([dialog], max_gen_len=12, temperature=0, logprobs=True)
        assert response.text == expected["generation"]["content"]
        assert response.logprobs == pytest.approx(expected["logprobs"], abs=1e-5)
        assert prefilled == response.prompt_len - response.cached_tokens
        if turn:  # the dialog so far is held: the last turn's prompt and (re-encoded) answer, bar a few tokens
            assert response.cached_tokens >= len(pipe.encode(dialog[:-2])) - 2
        dialog = dialog + [{"role": "assistant", "content": response.text}, {"role": "user", "content": question}]
    pipe.end_session("chat")
    assert pipe.engine.cache.allocator.n_free == 80


def test_a_stopped_session_stream_ends_with_abort_and_the_session_carries_on(pipe, llama):
    stream = pipe.stream(TEXTS[2], session_id=1, max_new_tokens=30, temperature=0)
    chunks = [next(stream) for _ in range(3)]
    pipe.stop_session(1)
    rest = list(stream)
    assert rest[-1].finish_reason == "abort" and all(c.finish_reason is None for c in chunks)
    response = pipe(TEXTS[2] + " again", session_id=1, **GREEDY)
    [expected] = llama.text_completion([TEXTS[2] + " again"], max_gen_len=12, temperature=0)
    assert response.text == expected["generation"] and response.cached_tokens > 0


@pytest.mark.parametrize("prompts, session_id, message", [
    (TEXTS[0], ["a"], r"session_id: give one id for one prompt"),
    (TEXTS[:2], "a", r"session_id: give one id for one prompt, or a list of one per prompt \(2 here\)"),
    (TEXTS[:2], ["a", "a"], r"a session runs one turn at a time"),
])
def test_bad_session_ids_are_refused_before_anything_runs(pipe, prompts, session_id, message):
    with pytest.raises(ValueError, match=message):
        pipe(prompts, session_id=session_id, **GREEDY)
    with pytest.raises(ValueError, match=r"n must be 1 with session_id, got n=2"):
        pipe(TEXTS[0], session_id="b", n=2, temperature=1.0)
    assert not pipe.engine.has_unfinished() and not pipe.engine.outputs
