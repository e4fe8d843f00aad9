"""Train the EAGLE-style draft head of the bundled demo model (llama/speculative/eagle.py) from its own features.

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb corpus
    python scripts/train_eagle.py --device cuda --batch 64 --depth 3 --text-windows 1024 --distilled 3072 \
        --data-batch 128 --steps 1000 --save-every 250   # the shipped head (models/demo-eagle/README.md)
    python scripts/train_eagle.py --steps 200        # the CPU with the defaults (the first head's recipe)

Data: 256-token windows of the demo's training split (train_demo's split: the last 5% of each novel is held
out, unseen here too), half of them Austen's text and half the demo model's own greedy continuation of a
training-split opening (what the head meets when drafting for greedy decoding). For each window the model
(float32) gives its features f_j (the hidden state before the final norm) and its own next token g_j (argmax
of its logits) at every position.

Loss (EAGLE's): the head, given (f_j + noise, embedding of the window's token j + 1), predicts f_{j+1}:
smooth L1 to the real f_{j+1}, plus 0.1 x cross-entropy of the model's norm and output layer on the
prediction against g_{j+1}. Drafting feeds predictions back, so training does too (EAGLE-3's "training-time
test"): at depth d the head's input at position j is its depth d - 1 prediction for j, and its attention
sees what it would see while drafting: the real pairs up to position j - d + 1, then its own predicted pairs
for the positions after (a mask over the keys of every depth). The losses of depths 1..DEPTH are averaged.

Seeded and reproducible (bit for bit with the same torch, device and thread count). Prints, on held-out
windows, how often the head's draft at depth d equals the model's greedy token when depths before it did.
"""

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `import llama` from this checkout, installed or not
sys.path.insert(0, str(REPO / "scripts"))

import austen  # noqa: E402
from train_demo import HOLDOUT, Corpus  # noqa: E402  (the demo's own split and windows)
from llama.generation import Llama  # noqa: E402
from llama.model import TransformerBlock  # noqa: E402
from llama.speculative.eagle import DRAFT_VOCAB_FILE, EagleHead, head_args, rotated_qkv  # noqa: E402
from llama.speculative.forward import forward_features  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

# The recipe of the shipped head. The block: the demo's shape with a smaller FFN (512, not 704).
HEAD_PARAMS = dict(dim=256, n_layers=1, n_heads=8, n_kv_heads=4, multiple_of=64, ffn_dim_multiplier=0.75,
                   norm_eps=1e-5, rope_theta=500000.0, vocab_size=4352)
SEQ_LEN = 256  # positions per window, <|begin_of_text|> included
TEXT_WINDOWS = 256  # windows of Austen's text
DISTILLED = 512  # windows of the model's own greedy continuations
OPENING = 32  # tokens of a training-split opening that the model continues
BATCH = 8
STEPS = 1000
DEPTH = 2  # training-time test: chains of this many predictions
PEAK_LR, WARMUP = 1e-3, 50  # then lr = PEAK_LR * sqrt(WARMUP / step): a run of N steps is a prefix of a longer run
WEIGHT_DECAY = 0.01
NOISE = 0.1  # uniform noise on the real features, times their RMS
CE_WEIGHT = 0.1


def novels_split() -> Tuple[list, list]:
    novels = austen.read_novels(austen.find_rdata())
    splits = [austen.split_holdout(text, HOLDOUT) for _, text in novels]
    return ([(t, s[0]) for (t, _), s in zip(novels, splits)], [(t, s[1]) for (t, _), s in zip(novels, splits)])


def distilled_windows(llama: Llama, corpus: Corpus, n: int, generator: torch.Generator, bsz: int) -> torch.Tensor:
    """(n, SEQ_LEN): <|begin_of_text|>, OPENING tokens of the split, then the model's greedy continuation
    (stop tokens ignored)."""
    rows = []
    for i in range(0, n, bsz):
        openings = corpus.batch(min(bsz, n - i), generator)[:, : OPENING + 1].tolist()
        out, _ = llama.generate(openings, SEQ_LEN - OPENING - 1, temperature=0, ignore_eos=True)
        rows += [torch.tensor(o + g) for o, g in zip(openings, out)]
    return torch.stack(rows)


@torch.no_grad()
def model_view(llama: Llama, windows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model's features (bsz, SEQ_LEN, dim) and greedy next tokens (bsz, SEQ_LEN) on windows."""
    with torch.inference_mode():
        logits, features = forward_features(llama.model, windows, 0)
    return features.clone(), logits.argmax(-1)


def attend_depths(layer: TransformerBlock, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  keys: List[torch.Tensor], values: List[torch.Tensor]) -> torch.Tensor:
    """The block at depth d = len(keys) + 1 over whole sequences: its query at position j reads depth 1's
    keys at positions <= j - d + 1 and depth e's key at position j - d + e (e = 2..d), as drafting does.
    Appends this depth's keys and values to `keys`, `values`."""
    bsz, seqlen, _ = h.shape
    attn = layer.attention
    q, k, v = rotated_qkv(layer, h, cos, sin)  # each (bsz, heads, seqlen, head_dim)
    keys.append(k)
    values.append(v)
    depth = len(keys)
    rows = torch.arange(seqlen, device=h.device)[:, None]
    cols = torch.arange(seqlen, device=h.device)[None, :]
    masks = [cols <= rows - depth + 1] + [cols == rows - depth + e for e in range(2, depth + 1)]
    mask = torch.cat(masks, dim=1)  # (seqlen, depth * seqlen)
    out = F.scaled_dot_product_attention(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), attn_mask=mask,
                                         enable_gqa=attn.n_local_heads != attn.n_local_kv_heads)
    h = h + attn.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
    return h + layer.feed_forward(layer.ffn_norm(h))


def head_losses(head: EagleHead, llama: Llama, windows: torch.Tensor, features: torch.Tensor,
                greedy: torch.Tensor, noise: float, depth: int, ce_weight: float = CE_WEIGHT
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(loss, [per depth: (bsz, SEQ_LEN - 1) bool, draft equals the model's greedy token])."""
    model = llama.model
    emb = model.tok_embeddings(windows[:, 1:])  # (bsz, S - 1, dim): token j + 1 for pair j
    real = features[:, :-1]  # f_j, j = 0 .. S - 2
    target_f, target_t = features[:, 1:], greedy[:, 1:]  # f_{j+1}, g_{j+1}
    if noise:
        scale = real.pow(2).mean().sqrt() * noise
        real = real + (torch.rand_like(real) * 2 - 1) * scale
    seqlen = real.shape[1]
    cos, sin = head.rope_cos[:seqlen], head.rope_sin[:seqlen]
    caches = [([], []) for _ in head.layers]
    feat, total, right = real, 0.0, []
    for d in range(depth):
        h = head.fc(torch.cat([feat, emb], dim=-1))
        for layer, (keys, values) in zip(head.layers, caches):
            h = attend_depths(layer, h, cos, sin, keys, values)
        logits = model.output(model.norm(h)).float()  # the model's own norm and output layer
        total = total + F.smooth_l1_loss(h, target_f) + ce_weight * F.cross_entropy(logits.transpose(1, 2), target_t)
        right.append(logits.argmax(-1) == target_t)
        feat = torch.cat([real[:, :1], h[:, :-1]], dim=1)  # position j's input at the next depth: prediction j
    return total / depth, right


def accept_rates(right: List[torch.Tensor]) -> List[float]:
    """Per depth d: P(draft d right | drafts 1..d-1 right). A chain started at position j - d + 1 reaches
    position j at depth d, so its earlier drafts are depth e's at position j - d + e."""
    rates, chain = [], None
    for d, r in enumerate(right):
        now = r[:, d:]  # (bsz, S - 1 - d): chains starting at 0 .. ; depth d + 1 at position start + d
        before = torch.ones_like(now)
        for e in range(d):
            before &= right[e][:, e : e + now.shape[1]]
        rates.append(float((now & before).sum() / before.sum().clamp(min=1)))
    return rates


def lr_at(step: int) -> float:
    """Linear warm-up, then inverse square root: independent of the run's length."""
    return PEAK_LR * min((step + 1) / WARMUP, math.sqrt(WARMUP / (step + 1)))


def dataset(llama: Llama, corpus: Corpus, n_text: int, n_distilled: int, generator: torch.Generator,
            bsz: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows (n, SEQ_LEN), the model's features on them (n, SEQ_LEN, dim) in bf16 (to halve the memory)
    and its greedy next tokens (n, SEQ_LEN): computed once, then sampled from."""
    parts = [corpus.batch(n_text, generator)[:, :SEQ_LEN]] if n_text else []
    if n_distilled:
        parts.append(distilled_windows(llama, corpus, n_distilled, generator, bsz))
    windows = torch.cat(parts)
    feats, greedy = [], []
    for chunk in windows.split(bsz):
        f, g = model_view(llama, chunk.to(llama.model.rope_cos.device))
        feats.append(f.to(torch.bfloat16))
        greedy.append(g)
    return windows, torch.cat(feats), torch.cat(greedy)


def write_head(head: EagleHead, params: Dict, out: Path) -> None:
    """consolidated.00.pth (bf16, Meta-style names), params.json, checklist.chk (md5, as Meta ships)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu", torch.bfloat16).clone() for name, t in head.state_dict().items()}
    torch.save(state, out / "consolidated.00.pth")
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    write_checklist(out)


def write_checklist(out: Path) -> None:
    names = [n for n in ("consolidated.00.pth", "params.json", DRAFT_VOCAB_FILE) if (out / n).is_file()]
    lines = [f"{hashlib.md5((out / n).read_bytes()).hexdigest()}  {n}" for n in names]
    (out / "checklist.chk").write_text("\n".join(lines) + "\n")


def write_draft_vocab(corpus: Corpus, out: Path) -> None:
    """draft_vocab.json: every token id the training split holds, the most frequent first (ties by id): the
    drafter's reduced vocabulary is its first N (EAGLE-3's draft vocabulary; EagleDrafter(draft_vocab=N))."""
    counts = torch.bincount(corpus.ids, minlength=HEAD_PARAMS["vocab_size"])
    order = sorted((i for i in range(len(counts)) if counts[i] > 0), key=lambda i: (-int(counts[i]), i))
    out.mkdir(parents=True, exist_ok=True)
    (out / DRAFT_VOCAB_FILE).write_text(json.dumps(order) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--text-windows", type=int, default=TEXT_WINDOWS)
    p.add_argument("--distilled", type=int, default=DISTILLED)
    p.add_argument("--depth", type=int, default=DEPTH)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=100, help="also write the head every this many steps")
    p.add_argument("--ce-weight", type=float, default=CE_WEIGHT, help="weight of the cross-entropy term")
    p.add_argument("--ffn-multiplier", type=float, default=HEAD_PARAMS["ffn_dim_multiplier"],
                   help="the block's ffn_dim_multiplier (0: none, Meta's SwiGLU size for dim 256: 704)")
    p.add_argument("--data-batch", type=int, default=32, help="windows per forward pass of the model (data)")
    p.add_argument("--data-cache", default="",
                   help="load the data (windows, features, greedy tokens, the generator's state) from this file "
                        "if it exists, else compute and save it there: runs of one recipe share it")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="stop training after this many seconds (then save), 0: no limit")
    p.add_argument("--checkpoint", default="", help="also save the head's state dict here at every save")
    p.add_argument("--out", default=str(REPO / "models" / "demo-eagle"))
    p.add_argument("--report", default="", help="also write the figures printed to this JSON file")
    p.add_argument("--draft-vocab-only", action="store_true",
                   help="write only draft_vocab.json (token ids by training-split frequency) and the checklist")
    opts = p.parse_args()
    if opts.draft_vocab_only:
        tokenizer = Tokenizer(str(REPO / "models" / "demo" / "tokenizer.model"))
        write_draft_vocab(Corpus(tokenizer, novels_split()[0]), Path(opts.out))
        write_checklist(Path(opts.out))
        return
    t0 = time.time()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    demo = REPO / "models" / "demo"
    # fast=False: the fast layers' packed products have no backward, and the head's loss runs through the
    # model's output layer.
    llama = Llama.build(str(demo), str(demo / "tokenizer.model"), max_seq_len=SEQ_LEN, max_batch_size=max(32, opts.data_batch),
                        device=opts.device, dtype=torch.float32, fast=False)
    for param in llama.model.parameters():
        param.requires_grad_(False)
    train_novels, held_novels = novels_split()
    train, held = Corpus(llama.tokenizer, train_novels), Corpus(llama.tokenizer, held_novels)
    write_draft_vocab(train, Path(opts.out))
    generator = torch.Generator().manual_seed(opts.seed)
    cache = Path(opts.data_cache) if opts.data_cache else None
    if cache is not None and cache.is_file():
        data = torch.load(cache, weights_only=True)
        generator.set_state(data["generator"])
        windows, features, greedy = data["train"]
        held_windows, held_features, held_greedy = data["held"]
    else:
        windows, features, greedy = dataset(llama, train, opts.text_windows, opts.distilled, generator,
                                            opts.data_batch)
        held_windows, held_features, held_greedy = dataset(llama, held, 16, 16, torch.Generator().manual_seed(1),
                                                           opts.data_batch)
        if cache is not None:
            torch.save({"generator": generator.get_state(), "train": (windows, features, greedy),
                        "held": (held_windows, held_features, held_greedy)}, cache)
    print(f"data: {len(windows)} training windows ({opts.distilled} distilled), {len(held_windows)} held-out "
          f"({time.time() - t0:.0f} s)", flush=True)

    params = dict(HEAD_PARAMS, ffn_dim_multiplier=opts.ffn_multiplier or None)
    if params["ffn_dim_multiplier"] is None:
        del params["ffn_dim_multiplier"]
    head = EagleHead(head_args(params, SEQ_LEN)).to(device)
    for name, param in head.named_parameters():  # GPT-2 style, as train_demo
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(param)
        else:
            torch.nn.init.normal_(param, std=0.02)
    decay = [q for q in head.parameters() if q.dim() == 2]
    no_decay = [q for q in head.parameters() if q.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=PEAK_LR, betas=(0.9, 0.95))
    n_params = sum(q.numel() for q in head.parameters())
    print(f"head: {params}, {n_params / 1e6:.2f} M parameters; {opts.steps} steps of {opts.batch} x "
          f"{SEQ_LEN}, depth {opts.depth}, cross-entropy weight {opts.ce_weight}", flush=True)

    def losses(idx: torch.Tensor, data: Tuple, noise: float, depth: int):
        w, f, g = (t[idx].to(device) for t in data)
        # bf16 autocast: the matrix products in bf16 (twice as fast on CPUs that have it), the rest float32.
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return head_losses(head, llama, w, f.float(), g, noise, depth, opts.ce_weight)

    def held_rates() -> List[float]:
        head.eval()
        with torch.no_grad():
            rights = [losses(idx, (held_windows, held_features, held_greedy), 0.0, 4)[1]
                      for idx in torch.arange(len(held_windows)).split(opts.batch)]
        head.train()
        return accept_rates([torch.cat(r) for r in zip(*rights)])

    def report(done: int) -> None:
        if not opts.report:
            return
        rates = history[-1]["held_out_accept_by_depth"] if history else []
        Path(opts.report).write_text(json.dumps({
            "device": str(device), "torch": torch.__version__, "threads": opts.threads, "steps": done,
            "steps_asked": opts.steps, "batch": opts.batch, "depth": opts.depth, "seed": opts.seed,
            "text_windows": opts.text_windows, "distilled": opts.distilled, "ce_weight": opts.ce_weight,
            "params": params, "n_params": n_params, "data_seconds": train_start - t0,
            "train_seconds": time.time() - train_start, "total_seconds": time.time() - t0,
            "held_out_accept_by_depth": rates, "expected_mean_accepted_length_k4": expected_length(rates),
            "history": history,
        }, indent=1))

    train_start = time.time()
    history: List[Dict] = []
    steps = opts.steps
    for step in range(opts.steps):
        if opts.time_limit and time.time() - train_start > opts.time_limit and step % opts.save_every == 0:
            steps = step  # stopped by the time limit, just after a save (or at step 0)
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(len(windows), (opts.batch,), generator=generator)
        loss, right = losses(idx, (windows, features, greedy), NOISE, opts.depth)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == opts.steps - 1:
            elapsed = time.time() - train_start
            print(f"step {step:5d}/{opts.steps}  loss {loss.item():.4f}  train accept "
                  f"{[round(r, 3) for r in accept_rates(right)]}  {elapsed:.0f} s ({elapsed / (step + 1):.2f} s/step)",
                  flush=True)
        if (step + 1) % opts.save_every == 0 or step == opts.steps - 1:
            rates = held_rates()
            history.append({"step": step + 1, "loss": loss.item(), "held_out_accept_by_depth": rates})
            print(f"  step {step + 1}: held-out accept by depth {[round(r, 3) for r in rates]}, "
                  f"mean accepted length (4 drafts) about {expected_length(rates):.2f}; written", flush=True)
            write_head(head, params, Path(opts.out))
            if opts.checkpoint:
                torch.save({name: t.detach().to("cpu", torch.bfloat16).clone()
                            for name, t in head.state_dict().items()}, opts.checkpoint)
            report(step + 1)
    print(f"trained {steps} steps in {time.time() - train_start:.0f} s, {time.time() - t0:.0f} s in all; "
          f"wrote {opts.out}")
    report(steps)


def expected_length(rates: List[float]) -> float:
    """Tokens a verify pass of a chain of len(rates) drafts yields if each draft is right with these
    conditional odds: 1 + the sum of the chain's cumulative products."""
    tau, chain = 1.0, 1.0
    for r in rates:
        chain *= r
        tau += chain
    return tau


if __name__ == "__main__":
    main()
