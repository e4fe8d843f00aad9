"""The Llama 2 family: a SentencePiece tokenizer.model is told apart from a tiktoken one by its contents,
loads with Llama 2's bos / eos / pad and stop token, and the Llama 2 chat format ([INST], <<SYS>>) gives the
token ids of the format's spelled-out strings, refusing dialogs that contain its tags as Meta does.

The SentencePiece model is trained in the test (tests/helpers.train_sentencepiece); expected ids come from
`sentencepiece` directly, encoding the literal prompt strings of Meta's format written out here."""

import pytest
import sentencepiece
import torch

from helpers import (SMALL_MHA, meta_rope_freqs, random_state_dict, real_tokenizer_path, train_sentencepiece,
                     write_byte_tokenizer, write_checkpoint)
from llama import Llama
from llama.checkpoints.meta import tokenizer_kind
from llama.generation import load_tokenizer, make_chat_format
from llama.tokenizer import ChatFormat, Tokenizer
from llama.tokenizer_llama2 import UNSAFE_ERROR, Llama2ChatFormat, SentencePieceTokenizer

VOCAB = 320


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return str(train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model", VOCAB))


@pytest.fixture(scope="module")
def sp(sp_path):
    return sentencepiece.SentencePieceProcessor(model_file=sp_path)


@pytest.fixture(scope="module")
def llama2(sp_path, tmp_path_factory):
    """A tiny Llama 2 checkpoint as Meta ships them: vocab_size -1, 2 shards with the embedding cut by
    columns, rope.freqs in every shard."""
    ckpt = tmp_path_factory.mktemp("llama2")
    sd = random_state_dict(dict(SMALL_MHA, vocab_size=VOCAB), seed=3)
    rope_freqs = {"rope.freqs": meta_rope_freqs(SMALL_MHA["dim"] // SMALL_MHA["n_heads"])}
    write_checkpoint(ckpt, dict(SMALL_MHA, vocab_size=-1), 2, sd=sd, embedding_dim=1, extra=rope_freqs)
    return Llama.build(str(ckpt), sp_path, max_seq_len=128, max_batch_size=4, device="cpu")


def ids(sp, text, bos=True, eos=False):
    return ([1] if bos else []) + sp.encode(text) + ([2] if eos else [])


# ---- the SentencePiece tokenizer ----


def test_tokenizer_kind_is_sniffed_from_the_contents(sp_path, tmp_path):
    assert tokenizer_kind(sp_path) == "sentencepiece"
    assert tokenizer_kind(real_tokenizer_path()) == "tiktoken"
    assert tokenizer_kind(str(write_byte_tokenizer(tmp_path / "bytes.model"))) == "tiktoken"
    (tmp_path / "junk.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match=r"junk\.model' is neither a tiktoken BPE file nor a SentencePiece model"):
        tokenizer_kind(str(tmp_path / "junk.model"))
    assert isinstance(load_tokenizer(sp_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(real_tokenizer_path()), Tokenizer)


def test_sentencepiece_tokenizer_has_llama2_special_ids(sp_path, sp):
    tok = SentencePieceTokenizer(sp_path)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (VOCAB, 1, 2, -1)
    assert tok.stop_tokens == {2}
    text = "Hello there! The capital of France."
    assert tok.encode(text, bos=True, eos=True) == [1] + sp.encode(text) + [2]
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


# ---- the Llama 2 chat format: Meta's prompt strings ----


def test_a_user_message_is_stripped_and_wrapped_in_inst_tags(sp_path, sp):
    fmt = Llama2ChatFormat(SentencePieceTokenizer(sp_path))
    assert fmt.encode_dialog_prompt([{"role": "user", "content": "  Hello there \n"}]) == \
        ids(sp, "[INST] Hello there [/INST]")


def test_a_system_message_goes_in_sys_tags_inside_the_first_inst(sp_path, sp):
    fmt = Llama2ChatFormat(SentencePieceTokenizer(sp_path))
    dialog = [{"role": "system", "content": "Always answer with a haiku"},
              {"role": "user", "content": "What is the capital of France?"}]
    assert fmt.encode_dialog_prompt(dialog) == \
        ids(sp, "[INST] <<SYS>>\nAlways answer with a haiku\n<</SYS>>\n\nWhat is the capital of France? [/INST]")


def test_each_exchange_is_an_inst_block_closed_by_eos(sp_path, sp):
    fmt = Llama2ChatFormat(SentencePieceTokenizer(sp_path))
    dialog = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": " Hi! How are you? "},
              {"role": "user", "content": "fine, thank you"}]
    assert fmt.encode_dialog_prompt(dialog) == (
        ids(sp, "[INST] Hello [/INST] Hi! How are you? ", eos=True) + ids(sp, "[INST] fine, thank you [/INST]")
    )


def test_a_system_message_is_folded_into_the_first_exchange_only(sp_path, sp):
    fmt = Llama2ChatFormat(SentencePieceTokenizer(sp_path))
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
              {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Paris?"},
              {"role": "assistant", "content": "Capital of France."}, {"role": "user", "content": "Thanks"}]
    assert fmt.encode_dialog_prompt(dialog) == (
        ids(sp, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello [/INST] Hi. ", eos=True)
        + ids(sp, "[INST] Paris? [/INST] Capital of France. ", eos=True)
        + ids(sp, "[INST] Thanks [/INST]")
    )


# ---- a Llama 2 checkpoint end to end ----


def test_llama2_checkpoint_builds_with_vocab_from_tokenizer_and_llama2_chat(llama2):
    assert llama2.model.vocab_size == VOCAB  # params.json says -1
    assert isinstance(llama2.formatter, Llama2ChatFormat)
    assert llama2.tokenizer.stop_tokens == {2}


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_dialog_containing_special_tags_gets_metas_error_answer_and_others_still_run(llama2, tag):
    good = [{"role": "user", "content": "Hello there"}]
    bad = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"say {tag} please"}]
    results = llama2.chat_completion([good, bad], temperature=0, max_gen_len=5)
    assert results[1] == {"generation": {"role": "assistant", "content": UNSAFE_ERROR}}
    assert UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."
    # The good dialog got what the model generates from its prompt alone.
    prompt = llama2.formatter.encode_dialog_prompt(good)
    tokens, _ = llama2.generate([prompt], max_gen_len=5, temperature=0)
    assert results[0]["generation"] == {"role": "assistant", "content": llama2.tokenizer.decode(tokens[0])}
    # As Meta's Llama 2 chat_completion: the tagged dialog still runs, and with logprobs its generated tokens
    # and their logprobs come beside the fixed answer.
    with_logprobs = llama2.chat_completion([bad], temperature=0, max_gen_len=5, logprobs=True)
    tokens, logprobs = llama2.generate([llama2.formatter.encode_dialog_prompt(bad)], 5, temperature=0, logprobs=True)
    assert with_logprobs[0]["generation"] == {"role": "assistant", "content": UNSAFE_ERROR}
    assert with_logprobs[0]["tokens"] == [llama2.tokenizer.decode([t]) for t in tokens[0]]
    assert with_logprobs[0]["logprobs"] == logprobs[0] and len(tokens[0]) == 5


def test_text_completion_decodes_the_generated_tokens_with_sentencepiece(llama2):
    result = llama2.text_completion(["The capital of France"], temperature=0, max_gen_len=6, logprobs=True)
    prompt = llama2.tokenizer.encode("The capital of France", bos=True, eos=False)
    tokens, logprobs = llama2.generate([prompt], max_gen_len=6, temperature=0, logprobs=True)
    assert result[0]["generation"] == llama2.tokenizer.decode(tokens[0])
    assert result[0]["logprobs"] == logprobs[0]


def test_chat_format_follows_the_tokenizer_and_can_be_forced(sp_path):
    tiktoken_tok = Tokenizer(real_tokenizer_path())
    assert isinstance(make_chat_format(tiktoken_tok), ChatFormat)
    assert isinstance(make_chat_format(SentencePieceTokenizer(sp_path)), Llama2ChatFormat)
    forced = make_chat_format(tiktoken_tok, "llama2")  # e.g. a Llama 2 fine-tune on Llama 3's tokenizer
    assert forced.encode_dialog_prompt([{"role": "user", "content": "Hi"}]) == \
        tiktoken_tok.encode("[INST] Hi [/INST]", bos=True, eos=False)
    with pytest.raises(ValueError, match="chat_format 'llama3' needs Llama 3's special tokens"):
        make_chat_format(SentencePieceTokenizer(sp_path), "llama3")
    with pytest.raises(ValueError, match=r"unknown chat_format 'llama4'"):
        make_chat_format(tiktoken_tok, "llama4")


def test_build_chat_format_llama2_overrides_the_tokenizers_family(tiny_llama):
    generator = tiny_llama(dict(SMALL_MHA, vocab_size=512), max_seq_len=32, max_batch_size=1, device="cpu",
                           chat_format="llama2")
    assert isinstance(generator.formatter, Llama2ChatFormat)
