"""The audit of Meta's public API: every public function and class of Meta's `llama/` packages, Llama 3
(meta-llama/llama3: llama/{__init__,generation,model,tokenizer}.py) and Llama 2 (meta-llama/llama: the same
files), with its arguments as Meta's source spells them. A script written for Meta's packages must run
unchanged on ours: for each row, ours must accept every call Meta's accepts, with the same meaning (same
names, same positions, same defaults; extra arguments of ours must have defaults). Rows marked "differs" are
deliberate differences, with the reason; the test checks that they still differ, so that the table stays true.

The SIGNATURES table is the record of the audit: Meta's side of each row is a fact read from Meta's source.
"""

import ast
import importlib
import inspect
import typing

import pytest
import torch

from helpers import SMALL_GQA, real_tokenizer_path, train_sentencepiece, write_byte_tokenizer, write_checkpoint
from llama import Llama
from llama.config import GenerationConfig
from llama.model import FeedForward, ModelArgs, precompute_freqs_cis, precompute_rope, repeat_kv
from llama.model import reshape_for_broadcast
from llama.tokenizer import Tokenizer
from llama.tokenizer_llama2 import SentencePieceTokenizer

L3, L2 = "llama3", "llama2"
SAME, KEYWORDS, DIFFERS = "same", "keywords", "differs"

# (family, Meta's module:name, Meta's parameters as in its source, ours as module:name, status, why).
# For classes the parameters are those of __init__ (or of the dataclass), without self.
SIGNATURES = [
    # ---- llama/generation.py
    (L3, "llama.generation:Llama.build",
     "ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size=None, seed=1", None, SAME, ""),
    (L3, "llama.generation:Llama", "model, tokenizer", None, SAME, ""),
    (L3, "llama.generation:Llama.generate",
     "self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, logprobs=False, echo=False", None, SAME, ""),
    (L3, "llama.generation:Llama.text_completion",
     "self, prompts, temperature=0.6, top_p=0.9, max_gen_len=None, logprobs=False, echo=False", None, SAME, ""),
    (L3, "llama.generation:Llama.chat_completion",
     "self, dialogs, temperature=0.6, top_p=0.9, max_gen_len=None, logprobs=False", None, SAME, ""),
    (L3, "llama.generation:sample_top_p", "probs, p", None, SAME, ""),
    # Llama 2's generation.py: the same Llama methods (build's `seed` came in a later Llama 2 commit).
    (L2, "llama.generation:Llama.build",
     "ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size=None, seed=1", None, SAME, ""),
    (L2, "llama.generation:Llama", "model, tokenizer", None, SAME, ""),
    (L2, "llama.generation:Llama.generate",
     "self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, logprobs=False, echo=False", None, SAME, ""),
    (L2, "llama.generation:Llama.text_completion",
     "self, prompts, temperature=0.6, top_p=0.9, max_gen_len=None, logprobs=False, echo=False", None, SAME, ""),
    (L2, "llama.generation:Llama.chat_completion",
     "self, dialogs, temperature=0.6, top_p=0.9, max_gen_len=None, logprobs=False", None, SAME, ""),
    (L2, "llama.generation:sample_top_p", "probs, p", None, SAME, ""),
    # ---- llama/tokenizer.py
    (L3, "llama.tokenizer:Tokenizer", "model_path", None, SAME, ""),
    (L3, "llama.tokenizer:Tokenizer.encode",
     "self, s, *, bos, eos, allowed_special=set(), disallowed_special=()", None, SAME, ""),
    (L3, "llama.tokenizer:Tokenizer.decode", "self, t", None, SAME, ""),
    (L3, "llama.tokenizer:ChatFormat", "tokenizer", None, SAME, ""),
    (L3, "llama.tokenizer:ChatFormat.encode_header", "self, message", None, SAME, ""),
    (L3, "llama.tokenizer:ChatFormat.encode_message", "self, message", None, SAME, ""),
    (L3, "llama.tokenizer:ChatFormat.encode_dialog_prompt", "self, dialog", None, SAME, ""),
    # Llama 2's llama.tokenizer.Tokenizer is SentencePiece: ours is llama.tokenizer_llama2.SentencePieceTokenizer
    # (Llama.build picks it from the file); llama.tokenizer.Tokenizer is Llama 3's, as in Meta's llama3.
    (L2, "llama.tokenizer:Tokenizer", "model_path", "llama.tokenizer_llama2:SentencePieceTokenizer", SAME, ""),
    (L2, "llama.tokenizer:Tokenizer.encode", "self, s, bos, eos",
     "llama.tokenizer_llama2:SentencePieceTokenizer.encode", SAME, ""),
    (L2, "llama.tokenizer:Tokenizer.decode", "self, t",
     "llama.tokenizer_llama2:SentencePieceTokenizer.decode", SAME, ""),
    # ---- llama/model.py
    (L3, "llama.model:ModelArgs",
     "dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, vocab_size=-1, multiple_of=256, ffn_dim_multiplier=None,"
     " norm_eps=1e-5, rope_theta=500000, max_batch_size=32, max_seq_len=2048", None, SAME, ""),
    (L2, "llama.model:ModelArgs",
     "dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, vocab_size=-1, multiple_of=256, ffn_dim_multiplier=None,"
     " norm_eps=1e-5, max_batch_size=32, max_seq_len=2048", None, KEYWORDS,
     "positions follow Llama 3's ModelArgs, whose rope_theta sits before max_batch_size; keywords work"),
    (L3, "llama.model:RMSNorm", "dim, eps=1e-6", None, SAME, ""),
    (L3, "llama.model:RMSNorm.forward", "self, x", None, SAME, ""),
    (L3, "llama.model:precompute_freqs_cis", "dim, end, theta=10000.0", None, SAME, ""),
    (L3, "llama.model:reshape_for_broadcast", "freqs_cis, x", None, SAME, ""),
    (L3, "llama.model:repeat_kv", "x, n_rep", None, SAME, ""),
    (L3, "llama.model:apply_rotary_emb", "xq, xk, freqs_cis", None, DIFFERS,
     "ours rotates one tensor with real cos/sin tables (any backend, torch.compile): apply_rotary_emb(x, cos, sin)"),
    (L3, "llama.model:Attention", "args", None, SAME, ""),
    (L3, "llama.model:Attention.forward", "self, x, start_pos, freqs_cis, mask", None, DIFFERS,
     "takes the cos and sin tables in place of freqs_cis: forward(x, start_pos, cos, sin, mask)"),
    (L3, "llama.model:FeedForward", "dim, hidden_dim, multiple_of, ffn_dim_multiplier", None, SAME, ""),
    (L3, "llama.model:FeedForward.forward", "self, x", None, SAME, ""),
    (L3, "llama.model:TransformerBlock", "layer_id, args", None, SAME, ""),
    (L3, "llama.model:TransformerBlock.forward", "self, x, start_pos, freqs_cis, mask", None, DIFFERS,
     "takes the cos and sin tables in place of freqs_cis: forward(x, start_pos, cos, sin, mask)"),
    (L3, "llama.model:Transformer", "params", None, SAME, ""),
    (L3, "llama.model:Transformer.forward", "self, tokens, start_pos", None, SAME, ""),
]

# Other public names of Meta's modules, which a script may import (module, name).
NAMES = {
    L3: [("llama", n) for n in ("Llama", "ModelArgs", "Transformer", "Dialog", "Tokenizer")]
    + [("llama.generation", n) for n in ("CompletionPrediction", "ChatPrediction", "Llama", "sample_top_p",
                                         "ChatFormat", "Dialog", "Message", "Tokenizer", "ModelArgs", "Transformer")]
    + [("llama.tokenizer", n) for n in ("Role", "Message", "Dialog", "Tokenizer", "ChatFormat")],
    L2: [("llama", n) for n in ("Llama", "Dialog", "ModelArgs", "Transformer", "Tokenizer")]
    + [("llama.generation", n) for n in ("Role", "Message", "CompletionPrediction", "ChatPrediction", "Dialog",
                                         "B_INST", "E_INST", "B_SYS", "E_SYS", "SPECIAL_TAGS", "UNSAFE_ERROR",
                                         "Llama", "sample_top_p")],
}

# Ours says None for these where Meta writes its default; None means Meta's default (checked below).
NONE_MEANS_METAS = {"temperature": 0.6, "top_p": 0.9}


def meta_parameters(text):
    """(name, kind, has_default, default) for each parameter of `def f(<text>)`."""
    args = ast.parse(f"def f({text}): pass").body[0].args
    positional = [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in args.args]
    keyword = [(a.arg, inspect.Parameter.KEYWORD_ONLY) for a in args.kwonlyargs]
    defaults = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults) + list(args.kw_defaults)
    out = []
    for (name, kind), node in zip(positional + keyword, defaults):
        if node is None:
            out.append((name, kind, False, None))
        elif isinstance(node, ast.Call) and node.func.id == "set" and not node.args:
            out.append((name, kind, True, set()))
        else:
            out.append((name, kind, True, ast.literal_eval(node)))
    return out


def resolve(path):
    module, name = path.split(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def incompatibilities(meta_text, ours, positions=True):
    """Why a call that Meta's signature accepts would fail or mean something else with ours ([] if none)."""
    params = list(inspect.signature(ours).parameters.values())
    by_name = {p.name: p for p in params}
    problems = []
    meta = meta_parameters(meta_text)
    for i, (name, kind, has_default, default) in enumerate(meta):
        p = by_name.get(name)
        if p is None:
            problems.append(f"no parameter {name!r}")
            continue
        if positions and kind == inspect.Parameter.POSITIONAL_OR_KEYWORD and (
            params.index(p) != i or p.kind != inspect.Parameter.POSITIONAL_OR_KEYWORD
        ):
            problems.append(f"{name!r} is not positional argument {i}")
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
            problems.append(f"{name!r} cannot be passed by keyword")
        if has_default:
            if p.default is inspect.Parameter.empty:
                problems.append(f"{name!r} has no default (Meta's: {default!r})")
            elif p.default != default and not (p.default is None and NONE_MEANS_METAS.get(name) == default):
                problems.append(f"{name!r} defaults to {p.default!r}, Meta's to {default!r}")
    meta_names = {m[0] for m in meta}
    for p in params:
        required = p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if p.name not in meta_names and required:
            problems.append(f"ours requires {p.name!r}, which Meta's calls never pass")
    return problems


@pytest.mark.parametrize("family, meta, text, ours, status, why", SIGNATURES,
                         ids=[f"{row[0]}-{row[1]}" for row in SIGNATURES])
def test_every_call_metas_signature_accepts_means_the_same_with_ours(family, meta, text, ours, status, why):
    found = resolve(ours or meta)
    problems = incompatibilities(text, found, positions=status != KEYWORDS)
    if status == DIFFERS:
        assert why and problems, f"{meta} now takes Meta's calls: mark its row {SAME!r}"
    else:
        assert problems == [], f"{meta}({text}) vs ours {inspect.signature(found)}"


@pytest.mark.parametrize("family, module, name", [(f, m, n) for f, names in NAMES.items() for m, n in names])
def test_metas_public_names_import_from_the_same_modules(family, module, name):
    assert hasattr(importlib.import_module(module), name), f"from {module} import {name} fails ({family})"


def test_none_defaults_of_ours_resolve_to_metas_values():
    config = GenerationConfig()
    assert (config.temperature, config.top_p) == (NONE_MEANS_METAS["temperature"], NONE_MEANS_METAS["top_p"])


def test_prediction_and_message_types_hold_metas_keys():
    from llama.generation import ChatPrediction, CompletionPrediction, Message

    assert {"generation", "tokens", "logprobs"} <= set(typing.get_type_hints(CompletionPrediction))
    assert {"generation", "tokens", "logprobs"} <= set(typing.get_type_hints(ChatPrediction))
    assert {"role", "content"} <= Message.__required_keys__


# ---- Calls written as Meta's scripts write them, and the shapes of what comes back -------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("meta_calls")
    write_checkpoint(d / "ckpt", dict(SMALL_GQA, vocab_size=512), seed=5)
    return str(d / "ckpt"), str(write_byte_tokenizer(d / "tok.model"))


@pytest.fixture(scope="module")
def generator(files):
    ckpt, tok = files
    return Llama.build(ckpt, tok, 64, 4, None, 1)  # every argument by position, as Meta's signature allows


def test_generate_takes_metas_positional_arguments_and_returns_its_tuple(generator):
    prompts = [[256, 72, 105], [256, 5]]
    tokens, logprobs = generator.generate(prompts, 6, 0.0, 0.9, False, False)
    assert logprobs is None and [type(t) for row in tokens for t in row] == [int] * sum(map(len, tokens))
    tokens_lp, logprobs = generator.generate(prompts, 6, 0.0, 0.9, True, False)
    assert tokens_lp == tokens and [len(lp) for lp in logprobs] == [len(t) for t in tokens]
    assert all(isinstance(x, float) for row in logprobs for x in row)
    echoed, _ = generator.generate(prompts, 6, 0.0, 0.9, False, True)
    assert [e[: len(p)] for e, p in zip(echoed, prompts)] == prompts


def test_text_completion_takes_metas_positional_arguments_and_returns_its_dicts(generator):
    plain = generator.text_completion(["ab", "c"], 0.0, 0.9, 5)
    assert [set(r) for r in plain] == [{"generation"}] * 2 and all(isinstance(r["generation"], str) for r in plain)
    with_lp = generator.text_completion(["ab", "c"], 0.0, 0.9, 5, True, False)
    assert [set(r) for r in with_lp] == [{"generation", "tokens", "logprobs"}] * 2
    assert [r["generation"] for r in with_lp] == [r["generation"] for r in plain]
    assert all(len(r["tokens"]) == len(r["logprobs"]) for r in with_lp)


def test_chat_completion_takes_metas_positional_arguments_and_returns_its_dicts(generator):
    dialogs = [[{"role": "user", "content": "hi"}],
               [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]]
    plain = generator.chat_completion(dialogs, 0.0, 0.9, 5)
    assert [set(r) for r in plain] == [{"generation"}] * 2
    assert all(set(r["generation"]) == {"role", "content"} and r["generation"]["role"] == "assistant" for r in plain)
    with_lp = generator.chat_completion(dialogs, 0.0, 0.9, 5, True)
    assert [set(r) for r in with_lp] == [{"generation", "tokens", "logprobs"}] * 2


def test_llama3_tokenizer_takes_bos_and_eos_by_position_or_keyword():
    tok = Tokenizer(real_tokenizer_path())
    published = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]  # meta-llama/llama3 llama/test_tokenizer.py
    assert tok.encode("This is a test sentence.", True, True) == published
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == published


def test_llama3_tokenizer_decode_skips_metas_pad_id_minus_one():
    tok = Tokenizer(real_tokenizer_path())
    assert tok.decode([2028, -1, 374]) == "This is"


def test_llama2_tokenizer_takes_bos_and_eos_by_position_and_has_metas_attributes(tmp_path):
    import sentencepiece

    path = str(train_sentencepiece(tmp_path / "tokenizer.model"))
    tok = SentencePieceTokenizer(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    assert tok.encode("Hello there", True, True) == [1] + sp.encode("Hello there") + [2]
    assert tok.encode("Hello there", True, False) == tok.encode("Hello there", bos=True, eos=False)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (sp.vocab_size(), 1, 2, -1)
    assert tok.sp_model.encode("Hello") == sp.encode("Hello")


def test_llama3_tokenizer_attributes_follow_llama_3_1_where_they_differ_from_3_0():
    # Meta's llama3 (3.0) code: pad_id -1, stop tokens {128001, 128009}, 128008 "<|reserved_special_token_4|>".
    # Ours follows llama-models (3.1+), whose file is the same: documented in docs/tool-calls.md.
    tok = Tokenizer(real_tokenizer_path())
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (128256, 128000, 128001)
    assert tok.pad_id == 128004 and tok.stop_tokens == {128001, 128008, 128009}
    assert tok.special_tokens["<|eom_id|>"] == 128008 and tok.special_tokens["<|python_tag|>"] == 128010


def test_model_args_take_metas_llama3_positional_order():
    args = ModelArgs(64, 2, 8, 2, 512, 32, 1.3, 1e-5, 10000.0, 3, 100)
    assert (args.rope_theta, args.max_batch_size, args.max_seq_len) == (10000.0, 3, 100)
    assert args.use_scaled_rope is False


def test_feed_forward_built_as_metas_sizes_its_hidden_layer_as_meta(generator):
    # Meta's TransformerBlock calls FeedForward(dim, 4 * dim, multiple_of, ffn_dim_multiplier); 4 * 64 = 256:
    # int(2 * 256 / 3) = 170, int(1.3 * 170) = 221, rounded up to a multiple of 32: 224.
    assert FeedForward(64, 256, 32, 1.3).w1.weight.shape == (224, 64)
    assert FeedForward(64, 224).w1.weight.shape == (224, 64)  # ours: the hidden size itself


def test_precompute_freqs_cis_gives_metas_table_and_our_models_angles():
    dim, end, theta = 16, 10, 500000.0
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    table = precompute_freqs_cis(dim, end, theta)
    assert table.dtype == torch.complex64 and table.shape == (end, dim // 2)
    assert torch.equal(table, torch.polar(torch.ones_like(angles), angles))
    cos, sin = precompute_rope(dim, end, theta)
    assert torch.equal(table.real, cos) and torch.equal(table.imag, sin)


def test_repeat_kv_and_reshape_for_broadcast_give_metas_shapes():
    x = torch.randn(2, 5, 3, 4)
    repeated = repeat_kv(x, 2)
    expected = x[:, :, :, None, :].expand(2, 5, 3, 2, 4).reshape(2, 5, 6, 4)  # Meta's expand-and-reshape
    assert torch.equal(repeated, expected) and repeat_kv(x, 1) is x
    freqs = precompute_freqs_cis(8, 5)
    assert reshape_for_broadcast(freqs, torch.zeros(2, 5, 3, 4, dtype=torch.complex64)).shape == (1, 5, 1, 4)
    with pytest.raises(ValueError, match="does not fit"):
        reshape_for_broadcast(freqs, torch.zeros(2, 6, 3, 4))
