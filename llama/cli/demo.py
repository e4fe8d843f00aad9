"""The bundled demo model: a small Llama 3 architecture model trained on Jane Austen's novels, shipped in
Meta's layout in models/demo/ so that the examples run on a fresh clone, with no download and no GPU.

It is a real checkpoint (consolidated.00.pth, params.json, tokenizer.model, checklist.chk) loaded by the same
`Llama.build` as Meta's; this module only finds it, checks it against its checklist and, when it is missing
or damaged, says how to get it back. scripts/train_demo.py made it.
"""

import hashlib
from pathlib import Path
from typing import Optional, Union

from llama.generation import Llama

DEMO_DIR = Path(__file__).resolve().parents[2] / "models" / "demo"
DEMO_FILES = ("consolidated.00.pth", "params.json", "tokenizer.model")
DEMO_MAX_SEQ_LEN = 256  # the context it was trained on: positions beyond it were never seen

RETRAIN = (
    "apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb corpus\n"
    "    .venv/bin/python scripts/train_demo.py   (make venv creates .venv)"
)


class DemoModelError(RuntimeError):
    """The demo checkpoint is missing or damaged; the message says how to restore or retrain it."""


def _fail(ckpt_dir: Path, problem: str) -> DemoModelError:
    return DemoModelError(
        f"the demo model in {str(ckpt_dir)!r} is unusable: {problem}.\n"
        f"Restore it from git (git checkout -- models/demo) or retrain it (about 20 minutes on one CPU core) "
        f"from the repository root with:\n    {RETRAIN}"
    )


def check_demo_files(ckpt_dir: Path = DEMO_DIR) -> None:
    """Raise DemoModelError unless every demo file is present and matches the md5 in checklist.chk."""
    checklist = ckpt_dir / "checklist.chk"
    missing = [name for name in DEMO_FILES + ("checklist.chk",) if not (ckpt_dir / name).is_file()]
    if missing:
        raise _fail(ckpt_dir, f"missing {', '.join(missing)}")
    expected = {}
    for line in checklist.read_text().splitlines():
        if line.strip():
            md5, _, name = line.partition("  ")
            expected[name.strip()] = md5.strip()
    for name in DEMO_FILES:
        if name not in expected:
            raise _fail(ckpt_dir, f"checklist.chk has no line for {name}")
        actual = hashlib.md5((ckpt_dir / name).read_bytes()).hexdigest()
        if actual != expected[name]:
            raise _fail(ckpt_dir, f"{name} is damaged (md5 {actual}, checklist.chk says {expected[name]})")


def build_demo(
    max_seq_len: int = DEMO_MAX_SEQ_LEN,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    ckpt_dir: Union[str, Path] = DEMO_DIR,
) -> Llama:
    """`Llama.build` on the demo model after checking its files. Raises DemoModelError (with the commands
    that restore it) when a file is missing, damaged or does not load."""
    ckpt_dir = Path(ckpt_dir)
    check_demo_files(ckpt_dir)
    try:
        return Llama.build(
            ckpt_dir=str(ckpt_dir),
            tokenizer_path=str(ckpt_dir / "tokenizer.model"),
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            device=device,
        )
    except (FileNotFoundError, ValueError) as e:
        raise _fail(ckpt_dir, str(e)) from e



def demo_description(generator: Llama) -> str:
    """One line for the examples to print, so that nobody mistakes the demo for a real Llama."""
    # Counted from the shape, not model.parameters(): the fast path holds its weights packed or fused.
    args = generator.model.params
    n_kv_heads = args.n_kv_heads or args.n_heads
    attention = 2 * args.dim * args.dim + 2 * args.dim * n_kv_heads * args.head_dim  # wq, wo, wk, wv
    layer = attention + 3 * args.dim * args.ffn_hidden_dim + 2 * args.dim  # + w1, w2, w3 and two norms
    n_params = 2 * args.vocab_size * args.dim + args.n_layers * layer + args.dim  # + embeddings, output, norm
    return (
        f"Demo model: a {n_params / 1e6:.1f}M-parameter Llama trained on Jane Austen's novels "
        f"(models/demo; see the README). Pass --ckpt_dir to use a real checkpoint."
    )
