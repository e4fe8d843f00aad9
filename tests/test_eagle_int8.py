"""int8 products for the EAGLE-style head (llama.speculative.draft_int8, `EagleDrafter(draft_dtype=torch.int8)`,
the named settings' choice on the CPU): each product is the dequantized weight's, to bf16 rounding; the output
stays plain decoding's; on the demo model the int8 head drafts as well as the float32 one."""

import pytest
import torch
import torch.nn.functional as F

from llama.fast.quantize import int8pack_mm_works
from llama.speculative import speculative_generate
from llama.speculative.draft_int8 import Int8DraftProduct
from llama.speculative.eagle import EagleDrafter
from llama.speculative.eagle_tree import EagleTreeDrafter
from llama.speculative.settings import build_eagle_drafter, eagle_draft_options
from test_eagle import AUSTEN_PROMPTS, HEAD_DIR, demo, random_head  # noqa: F401  (fixtures)
from test_speculative import assert_same_as_plain

pytestmark = pytest.mark.skipif(not int8pack_mm_works(torch.device("cpu"), torch.bfloat16),
                                reason="this torch build has no _weight_int8pack_mm for bf16 on the CPU")


def test_an_int8_draft_product_is_the_dequantized_weights_product_to_bf16_rounding():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=g)
    weight[5] = 0.0  # a zero row stays zero
    x = torch.randn(3, 64, generator=g)
    product = Int8DraftProduct(weight)
    assert product.q.dtype == torch.int8 and product.q.abs().max() == 127
    # Written out independently: per-row scale max|W| / 127, Q = round(W / scale), the product of bf16 inputs.
    scale = weight.abs().amax(dim=1) / 127
    q = torch.round(weight / torch.where(scale > 0, scale, 1.0)[:, None])
    want = F.linear(x.bfloat16().double(), q.double()) * scale.bfloat16().double()
    got = product(x)
    assert got.dtype == torch.float32 and got.shape == (3, 48)
    assert torch.allclose(got.double(), want, rtol=1e-2, atol=1e-2)  # the result rounded to bf16 once
    assert (got[:, 5] == 0).all()
    assert (got - F.linear(x, weight)).abs().max() < 0.05 * F.linear(x, weight).abs().max()  # ~ the float one


@pytest.mark.parametrize("tree", [False, True])
def test_greedy_with_int8_drafts_gives_plain_decodings_tokens_and_logprobs(tiny_llama, random_head, tree):
    llama = tiny_llama(seed=0, max_seq_len=96, max_batch_size=1)
    head = random_head(llama)
    drafter = (EagleTreeDrafter(head, llama, branch=2, nodes=5, draft_dtype=torch.int8) if tree
               else EagleDrafter(head, llama, draft_dtype=torch.int8))
    assert drafter.draft_product is not None and "int8" in repr(drafter)
    for prompt, k in (([10, 20, 30, 40], 4), ([7, 8], 3), ([1, 2, 3, 1, 2, 3, 1, 2], 1)):
        assert_same_as_plain(llama, prompt, 40, drafter, k=k)


def test_int8_drafts_need_the_lean_one_block_head(tiny_llama, random_head):
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    with pytest.raises(ValueError, match="one-block head on the fast layers .*fast=False"):
        EagleDrafter(random_head(llama), llama, fast=False, draft_dtype=torch.int8)


def test_the_named_eagle_settings_draft_in_int8_on_the_cpu_only(demo):
    assert eagle_draft_options(HEAD_DIR, torch.device("cpu")) == {"draft_vocab": 2048, "draft_dtype": torch.int8}
    assert eagle_draft_options(HEAD_DIR, torch.device("cuda", 0)) == {"draft_vocab": 2048}
    assert eagle_draft_options(HEAD_DIR) == {"draft_vocab": 2048}
    assert "draft_dtype=int8" in repr(build_eagle_drafter(demo, None))
    assert "draft_dtype=int8" in repr(build_eagle_drafter(demo, None, tree=True))


def test_the_demo_head_in_int8_is_lossless_and_accepted_as_often_as_in_float32(demo):
    lengths = {}
    for name, dtype in (("float32", None), ("int8", torch.int8)):
        drafter = EagleDrafter(HEAD_DIR, demo, draft_vocab=2048, draft_dtype=dtype)
        total = None
        for text in AUSTEN_PROMPTS:
            prompt = demo.tokenizer.encode(text, bos=True, eos=False)
            stats = assert_same_as_plain(demo, prompt, 48, drafter, k=4)
            total = stats if total is None else total.add(stats)
        lengths[name] = total.mean_accepted_length
    assert lengths["int8"] > lengths["float32"] - 0.1, lengths


def test_widths_the_int8_kernel_cannot_take_are_refused_and_not_picked_by_the_named_settings(tiny_llama,
                                                                                               random_head):
    with pytest.raises(ValueError, match=r"multiple of 16, got a weight of shape \(8, 24\)"):
        Int8DraftProduct(torch.randn(8, 24))  # (torch's kernel crashes the process on such a width)
    llama = tiny_llama(seed=0, max_seq_len=64, max_batch_size=1)
    head = random_head(llama, multiple_of=8, ffn_dim_multiplier=0.4)  # FFN hidden 72: not a multiple of 16
    assert "draft_dtype" not in eagle_draft_options(head, torch.device("cpu"))
    with pytest.raises(ValueError, match="multiple of 16"):
        EagleDrafter(head, llama, draft_dtype=torch.int8)
    assert "draft_dtype" in eagle_draft_options(random_head(llama, seed=1), torch.device("cpu"))
