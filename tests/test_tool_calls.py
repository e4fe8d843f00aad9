"""Llama 3.1+ tool calling: Meta's published prompt-format examples (tests/meta_prompt_formats.py) encode
byte for byte with Meta's real tokenizer, tool calls are read from hand-written token sequences of Meta's
published responses, an assistant turn holding a call re-encodes exactly as the model wrote it, and
chat_completion returns the call (here from a scripted model: the demo model cannot call tools)."""

import os
import re

import pytest
import torch

from helpers import SMALL_GQA, real_tokenizer_path, write_byte_tokenizer, write_checkpoint
from llama import Llama
from llama.completion import Completion
from llama.families import make_chat_format
from llama.tokenizer import ChatFormat, Tokenizer, check_dialog
from llama.tool_calls import parse_tool_calls, reply_message, system_prompt
from meta_prompt_formats import BOT, EOM, EOT, EXAMPLES, EXPECTED_CALLS, SYSTEM_3_1_TOOLS, header

SPECIAL = re.compile(r"<\|[a-z_0-9]+\|>")
PYTHON_TAG = "<|python_tag|>"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(real_tokenizer_path())


def dialog_of(prompt):
    """The messages a published prompt spells out: each header's role and the text up to its end token. An
    assistant turn that starts with <|python_tag|> or ends with <|eom_id|> is a tool call."""
    assert prompt.startswith(BOT) and prompt.endswith(header("assistant"))
    body = prompt[len(BOT) : -len(header("assistant"))]
    pattern = r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(<\|eot_id\|>|<\|eom_id\|>)"
    matches = list(re.finditer(pattern, body, re.DOTALL))
    assert "".join(m.group(0) for m in matches) == body
    dialog = []
    for m in matches:
        role, content, end = m.groups()
        message = {"role": role, "content": content}
        if role == "assistant" and (content.startswith(PYTHON_TAG) or end == EOM):
            python_tag = content.startswith(PYTHON_TAG)
            content = content[len(PYTHON_TAG) :] if python_tag else content
            message.update(content=content, tool_calls=parse_tool_calls(content, python_tag), python_tag=python_tag,
                           stop_reason="end_of_message" if end == EOM else "end_of_turn")
        dialog.append(message)
    return dialog


def metas_segmentation(text, tok):
    """Token ids of a prompt cut as Meta's ChatFormat encodes it: each special token, each role, the header's
    "\\n\\n" on its own, then each message's text."""
    ids, after = [], None
    for piece in re.split(f"({SPECIAL.pattern})", text):
        if SPECIAL.fullmatch(piece):
            ids.append(tok.special_tokens[piece])
            after = piece
        elif piece:
            if after == "<|end_header_id|>":
                assert piece.startswith("\n\n")
                ids += tok.encode("\n\n", bos=False, eos=False)
                piece = piece[2:]
            ids += tok.encode(piece, bos=False, eos=False) if piece else []
    return ids


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_metas_published_prompts_encode_byte_for_byte(tok, name):
    prompt = EXAMPLES[name][0]
    ids = make_chat_format(tok, "llama3.1").encode_dialog_prompt(dialog_of(prompt))
    assert tok.decode(ids) == prompt
    assert [t for t in ids if t >= 128000] == [tok.special_tokens[s] for s in SPECIAL.findall(prompt)]
    assert ids == metas_segmentation(prompt, tok)


def test_published_prompts_pin_the_header_ids_of_metas_test_vectors(tok):
    # meta-llama/llama3 llama/test_tokenizer.py: <|begin_of_text|>, then the system header is 128006 9125
    # 128007 271, the user header 128006 882 128007 271, the assistant header 128006 78191 128007 271.
    ids = make_chat_format(tok, "llama3.1").encode_dialog_prompt(dialog_of(EXAMPLES["3.1 builtin tool call"][0]))
    assert ids[:5] == [128000, 128006, 9125, 128007, 271] and ids[-4:] == [128006, 78191, 128007, 271]
    user = ids.index(882)
    assert ids[user - 2 : user + 3] == [128009, 128006, 882, 128007, 271]
    assert ids[5:10] == tok.encode("Environment: ipython\n", bos=False, eos=False)[:5]


def test_the_default_llama3_format_strips_message_text_as_metas_llama3_package(tok):
    # Meta's llama3 ChatFormat strips each message; llama-models (whose pages these are) does not. Only the
    # system text that ends in a newline differs.
    prompt = EXAMPLES["3.1 builtin tool call"][0]
    stripped = ChatFormat(tok).encode_dialog_prompt(dialog_of(prompt))
    assert tok.decode(stripped) == prompt.replace(SYSTEM_3_1_TOOLS + EOT, SYSTEM_3_1_TOOLS.rstrip("\n") + EOT)
    for name in ("3.1 code interpreter", "3.2 zero shot function calling", "3.2 zero shot function calling E2E"):
        prompt = EXAMPLES[name][0]
        assert tok.decode(ChatFormat(tok).encode_dialog_prompt(dialog_of(prompt))) == prompt


def test_system_prompt_writes_metas_tool_lines():
    assert system_prompt(["brave_search", "wolfram_alpha"], knowledge_date="December 2023",
                         today="21 September 2024", instructions="You are a helpful assistant.") + "\n" \
        == SYSTEM_3_1_TOOLS
    assert system_prompt() == "Environment: ipython"
    lines = "Environment: ipython\nTools: brave_search, wolfram_alpha\n"  # Meta's full-interaction example
    assert system_prompt(["brave_search", "wolfram_alpha"]) + "\n" == lines
    assert system_prompt(ipython=False, instructions="Be brief.") == "Be brief."
    with pytest.raises(ValueError, match=r"identifiers.*\['brave search'\]"):
        system_prompt(["brave search"])


def hand_written_reply(response, tok):
    """The ids a model emits for a published response: <|python_tag|> as its id, the text, and the stop token
    as a Completion cut at it (as the decode loop cuts)."""
    stop = SPECIAL.findall(response)[-1]
    assert response.endswith(stop) and stop in (EOM, EOT)
    text = response[: -len(stop)]
    ids = []
    if text.startswith(PYTHON_TAG):
        ids, text = [tok.special_tokens[PYTHON_TAG]], text[len(PYTHON_TAG) :]
    ids += tok.encode(text, bos=False, eos=False)
    return Completion(prompt_len=0, generated_len=len(ids), tokens=ids, text=tok.decode(ids),
                      stop_reason="stop_token", stop_token=tok.special_tokens[stop])


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_tool_calls_are_read_from_metas_published_responses(tok, name):
    response = EXAMPLES[name][1]
    message = reply_message(hand_written_reply(response, tok), tok.special_tokens)
    expected = EXPECTED_CALLS[name]
    if expected is None:
        assert message == {"role": "assistant", "content": response[: -len(EOT)]}
        return
    assert message["tool_calls"] == expected
    assert message["python_tag"] == response.startswith(PYTHON_TAG)
    assert message["stop_reason"] == ("end_of_message" if response.endswith(EOM) else "end_of_turn")
    # The turn goes back into the next prompt exactly as the model wrote it, with either format.
    for strip in (True, False):
        assert tok.decode(ChatFormat(tok, strip=strip).encode_message(message)) == header("assistant") + response


def test_more_call_forms_and_non_calls():
    assert parse_tool_calls("[get_user_info(user_id=7890, special='black')]") == [  # Meta's 3.2 example
        {"name": "get_user_info", "arguments": {"user_id": 7890, "special": "black"}}]
    assert parse_tool_calls('wolfram_alpha.call(query="x", n=-3)') == [
        {"name": "wolfram_alpha", "arguments": {"query": "x", "n": -3}}]
    assert parse_tool_calls('[weather.get(city="Paris", days=[1, 2])]') == [
        {"name": "weather.get", "arguments": {"city": "Paris", "days": [1, 2]}}]
    assert parse_tool_calls(' {"name": "f", "parameters": {}} ') == [{"name": "f", "arguments": {}}]
    for text in ("The answer is 7.", "[1, 2]", "[]", "[f(1)]", "[f(**kw)]", '{"name": "f"}', '{"name": 1, '
                 '"parameters": {}}', "<function=f>not json</function>", "f.call(1)", "a.b.call(x=1)", "x = 1"):
        assert parse_tool_calls(text) is None, text
    assert parse_tool_calls("x = 1", python_tag=True) == [{"name": "code_interpreter", "arguments": {"code": "x = 1"}}]


def test_calls_are_parsed_never_run(tmp_path):
    target = tmp_path / "ran"
    code = f"[f(a=__import__('os').system('touch {target}'))]"
    assert parse_tool_calls(code) is None and parse_tool_calls(f"f.call(a=open({str(target)!r}, 'w'))") is None
    assert not target.exists()


def test_llama3_dialogs_take_ipython_messages_and_llama2_dialogs_do_not(tok):
    fmt = ChatFormat(tok)
    fmt.check_dialog([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    fmt.check_dialog([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "f.call(x=1)", "tool_calls": [], "stop_reason": "end_of_message",
                       "python_tag": True}, {"role": "ipython", "content": "42"}])
    with pytest.raises(ValueError, match="ending with user"):
        fmt.check_dialog([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        fmt.check_dialog([{"role": "tool", "content": "a"}])
    with pytest.raises(ValueError, match="message 0: only assistant messages carry"):
        fmt.check_dialog([{"role": "user", "content": "a", "python_tag": True}])
    with pytest.raises(ValueError, match="'stop_reason' must be one of"):
        fmt.check_dialog([{"role": "assistant", "content": "a", "stop_reason": "eom"},
                          {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="unknown role 'ipython'"):
        check_dialog([{"role": "user", "content": "a"}, {"role": "ipython", "content": "b"}])  # Llama 2's rule


# ---- chat_completion on a scripted model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools")
    write_checkpoint(d / "ckpt", dict(SMALL_GQA, vocab_size=512), seed=2)
    tok_path = write_byte_tokenizer(d / "tok.model")
    return Llama.build(str(d / "ckpt"), str(tok_path), max_seq_len=128, max_batch_size=2, device="cpu", fast=False)


def scripted(tiny, prompt_len, script, fast, monkeypatch=None):
    """A Llama whose model, at every position from prompt_len - 1 on, predicts the next token of `script`
    (the fast loop, which runs the model through llama.fast.step.fast_forward, needs `monkeypatch`)."""
    model = tiny.model
    vocab = model.vocab_size

    def forward(tokens, start_pos, *, kv_len=None, last_pos=None):
        bsz, seqlen = tokens.shape
        if isinstance(start_pos, int):
            positions = torch.arange(start_pos, start_pos + seqlen).expand(bsz, seqlen)
        else:  # the fast loop: one token per row at its own position
            positions = start_pos[:, None].cpu()
        following = (positions + 1 - prompt_len).clamp(0, len(script) - 1)
        logits = torch.zeros(bsz, seqlen, vocab).scatter_(2, torch.tensor(script)[following][..., None], 100.0)
        return logits[torch.arange(bsz), last_pos][:, None] if last_pos is not None else logits

    model.forward = forward
    if fast:
        def fast_forward(model, tokens, start_pos, **positions):
            return forward(tokens, start_pos, **positions)

        monkeypatch.setattr("llama.fast.step.fast_forward", fast_forward)
        monkeypatch.setattr("llama.fast.loop.fast_forward", fast_forward)
    return Llama(model, tiny.tokenizer, fast=fast)


@pytest.fixture
def restore_forward(tiny):
    yield
    tiny.model.__dict__.pop("forward", None)  # back to Transformer.forward


@pytest.mark.parametrize("fast", [False, True], ids=["reference-loop", "fast-loop"])
def test_chat_completion_returns_the_tool_call_and_its_turn_reencodes_exactly(tiny, restore_forward, fast,
                                                                               monkeypatch):
    tok = tiny.tokenizer
    dialog = [{"role": "system", "content": system_prompt(["brave_search"])},
              {"role": "user", "content": "Price of gold?"}]
    prompt = tiny.formatter.encode_dialog_prompt(dialog)
    call = 'brave_search.call(query="gold price")'
    reply = [tok.special_tokens[PYTHON_TAG]] + tok.encode(call, bos=False, eos=False) + [tok.eom_id]
    llama = scripted(tiny, len(prompt), reply + [ord("x")] * 4, fast, monkeypatch)
    result = llama.chat_completion([dialog], temperature=0, max_gen_len=40)[0]
    assert result["generation"] == {
        "role": "assistant", "content": call, "python_tag": True, "stop_reason": "end_of_message",
        "tool_calls": [{"name": "brave_search", "arguments": {"query": "gold price"}}],
    }
    # The next round's prompt holds the model's own tokens, then the tool's output.
    next_round = dialog + [result["generation"], {"role": "ipython", "content": "2650 USD"}]
    ids = llama.formatter.encode_dialog_prompt(next_round)
    assert ids[: len(prompt) + len(reply)] == prompt + reply
    assert tok.decode(ids[len(prompt) + len(reply) :]) == header("ipython") + "2650 USD" + EOT + header("assistant")


def test_chat_completion_reads_a_function_call_ending_the_turn(tiny, restore_forward):
    tok = tiny.tokenizer
    dialog = [{"role": "user", "content": "Songs?"}]
    prompt = tiny.formatter.encode_dialog_prompt(dialog)
    reply = tok.encode('<function=trending_songs>{"n": 10}</function>', bos=False, eos=False) + [tok.eot_id]
    llama = scripted(tiny, len(prompt), reply, fast=False)
    result = llama.chat_completion([dialog], temperature=0, max_gen_len=60, logprobs=True)[0]
    assert result["generation"]["tool_calls"] == [{"name": "trending_songs", "arguments": {"n": 10}}]
    assert result["generation"]["stop_reason"] == "end_of_turn" and result["generation"]["python_tag"] is False
    assert len(result["tokens"]) == len(reply) - 1  # Meta's extras are unchanged: the stop token is cut
    plain = scripted(tiny, len(prompt), tok.encode("Hi there", bos=False, eos=False) + [tok.eot_id], fast=False)
    assert plain.chat_completion([dialog], temperature=0, max_gen_len=20)[0] == {
        "generation": {"role": "assistant", "content": "Hi there"}}


def test_the_flow_in_docs_tool_calls_md_runs_on_the_demo_model(monkeypatch, capsys):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "tool-calls.md")) as f:
        (code,) = re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)
    monkeypatch.chdir(root)  # the example loads models/demo
    exec(compile(code, "docs/tool-calls.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # the demo model's answer, after the hand-made tool call
