"""llama.serve.protocol: the request rules that the loopback tests do not reach (no server, no model): the KV
pool's limit, defaults for max_tokens, prompt forms, messages mapped to the chat format, refused fields."""

import pytest

from helpers import write_byte_tokenizer
from llama.serve.protocol import ModelInfo, RequestError, parse_chat, parse_completion
from llama.tokenizer import ChatFormat, Tokenizer


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    tokenizer = Tokenizer(str(write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")))
    # a context of 128 positions, a KV pool of 24 blocks of 4 = 96 positions
    return ModelInfo("m", 128, tokenizer.n_words, 4, 24, tokenizer, ChatFormat(tokenizer))


def refused(parse, body, info) -> RequestError:
    with pytest.raises(RequestError) as e:
        parse(dict(body, model="m"), info)
    return e.value


def test_max_tokens_is_refused_past_the_kv_pool_and_defaults_fit_in_it(info):
    e = refused(parse_completion, {"prompt": "abc", "max_tokens": 100}, info)  # 4 prompt tokens: 93 fit
    assert e.param == "max_tokens" and "KV cache" in e.message and e.code == "context_length_exceeded"
    assert parse_completion({"model": "m", "prompt": "abc", "max_tokens": 93}, info).max_new == [93]
    assert parse_completion({"model": "m", "prompt": "abc"}, info).max_new == [16]  # OpenAI's default
    chat = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, info)
    assert chat.max_new == [96 - len(chat.prompts[0]) + 1]  # as much as the pool holds
    assert refused(parse_completion, {"prompt": "x" * 100}, info).param == "prompt"  # the pool cannot hold it
    assert refused(parse_completion, {"prompt": "x" * 130}, info).code == "context_length_exceeded"


def test_token_prompts_are_taken_as_given_and_text_prompts_get_begin_of_text(info):
    bos = info.tokenizer.bos_id
    assert parse_completion({"model": "m", "prompt": [5, 6]}, info).prompts == [[5, 6]]
    assert parse_completion({"model": "m", "prompt": [[5], [6, 7]]}, info).prompts == [[5], [6, 7]]
    assert parse_completion({"model": "m", "prompt": ["a", "b"]}, info).prompts == [[bos, 97], [bos, 98]]
    for bad in ([], [1, "a"], [[]], [True], {"p": 1}, None):
        assert refused(parse_completion, {"prompt": bad}, info).param == "prompt"


def test_messages_become_the_chat_formats_dialog(info):
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": "x"},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    job = parse_chat({"model": "m", "messages": messages}, info)
    dialog = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "x"},
              {"role": "ipython", "content": "42"}]  # OpenAI's tool output is Llama 3's ipython message
    assert job.prompts == [info.formatter.encode_dialog_prompt(dialog)]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert refused(parse_chat, {"messages": image}, info).param == "messages[0].content"
    assert refused(parse_chat, {"messages": [{"role": "developer", "content": "x"}]}, info).param == \
        "messages[0].role"
    assert refused(parse_chat, {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
                   info).param == "messages[0].tool_calls"


def test_fields_the_server_does_not_implement_are_refused_unless_off(info):
    base = {"model": "m", "prompt": "a"}
    parse_completion(dict(base, logit_bias={}, presence_penalty=0, frequency_penalty=0.0, suffix=None, user="u"),
                     info)
    parse_chat({"model": "m", "messages": [{"role": "user", "content": "a"}], "response_format": {"type": "text"},
                "tool_choice": "none"}, info)
    for field, value in (("logit_bias", {"5": 10}), ("frequency_penalty", 0.5), ("suffix", "end"),
                         ("best_of", 3)):
        assert refused(parse_completion, dict(base, **{field: value}), info).param == field
    assert refused(parse_chat, {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]},
                   info).param == "tools"


def test_choices_are_capped_and_settings_become_the_generation_config(info):
    assert refused(parse_completion, {"prompt": ["a"] * 50, "n": 3}, info).param == "n"
    job = parse_completion({"model": "m", "prompt": "a", "n": 2, "seed": 3, "stop": "x", "top_k": 4, "min_p": 0.1,
                            "repetition_penalty": 1.2, "min_tokens": 2, "logprobs": 0, "stream": True,
                            "stream_options": {"include_usage": True}}, info)
    assert (job.n, job.logprobs, job.top_logprobs, job.stream, job.include_usage) == (2, True, 0, True, True)
    c = job.config
    assert (c.temperature, c.top_p, c.seed, c.stop, c.top_k, c.min_p, c.repetition_penalty, c.min_new_tokens) == \
        (0.6, 0.9, 3, ("x",), 4, 0.1, 1.2, 2)  # Meta's temperature and top_p where none is given
    assert refused(parse_completion, {"prompt": "a", "max_tokens": 2, "min_tokens": 3}, info).param == "min_tokens"
