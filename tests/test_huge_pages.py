"""llama.fast.huge_pages: a weight copy on transparent huge pages holds the same values, and the kernel really
maps it with huge pages where it can; elsewhere the tensor comes back as it is."""

import pytest
import torch

from llama.fast import huge_pages
from llama.fast.blocked import BlockedProduct
from llama.fast.huge_pages import HUGE_PAGE, MIN_BYTES, on_huge_pages


def huge_kb_at(address: int) -> int:
    """AnonHugePages (kB) of this process's mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


needs_thp = pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages here")


@needs_thp
def test_a_large_weight_is_copied_onto_huge_pages():
    w = torch.randn(MIN_BYTES // 16 + 1234, 5)[:, 1:]  # float32, strided, past MIN_BYTES, not whole huge pages
    copy = on_huge_pages(w)
    assert copy.is_contiguous() and copy.dtype == w.dtype and copy.shape == w.shape
    assert torch.equal(copy, w)
    assert copy.data_ptr() % HUGE_PAGE == 0
    assert huge_kb_at(copy.data_ptr()) >= (copy.numel() * 4 // HUGE_PAGE) * HUGE_PAGE // 1024  # its whole pages


@pytest.mark.slow  # compiles (inductor)
@needs_thp
def test_blocked_weights_sit_on_huge_pages_and_multiply_as_before():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (MIN_BYTES // 512 + 128, 512), dtype=torch.int8, generator=g)
    scale = torch.rand(q.shape[0], generator=g) / 100
    form = BlockedProduct(q, scale, words=False)
    assert form.blocks.data_ptr() % HUGE_PAGE == 0 and huge_kb_at(form.blocks.data_ptr()) > 0
    assert torch.equal(form.dense_weight(), q)
    x = torch.randn(1, 512, generator=g)
    exact = (x.double() @ q.double().T) * scale.double()
    bound = 512 * 2**-23 * (x.double().abs() @ q.double().abs().T) * scale.double() + 1e-30  # float32 summation
    assert ((form(x).double() - exact).abs() <= bound).all()


def test_small_tensors_and_the_off_setting_keep_the_tensor(monkeypatch):
    small = torch.ones(MIN_BYTES // 4 - 1)
    assert on_huge_pages(small) is small
    large = torch.ones(MIN_BYTES // 4)
    monkeypatch.setenv(huge_pages.ENV, "off")
    assert on_huge_pages(large) is large


def test_a_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV, "yes")
    with pytest.raises(ValueError, match="LLAMA_HUGE_PAGES must be 'auto' or 'off', got 'yes'"):
        on_huge_pages(torch.ones(MIN_BYTES // 4))
