"""Train the bundled demo model: a small Llama 3 architecture model on Jane Austen's six novels.

Everything the model needs is made here, reproducibly (fixed seed, fixed step count): a byte-level BPE
tokenizer (scripts/train_bpe.py), then the model itself, `llama.model.Transformer`, trained on the novels'
text and on their conversations written in the Llama 3 chat format, so that `chat_completion` has turns to
answer. The result is written in Meta's layout (consolidated.00.pth in bf16, params.json, tokenizer.model,
checklist.chk), reloaded through `Llama.build` to measure the held-out loss, and sampled from.

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb corpus
    python scripts/train_demo.py            # about 20 minutes on one CPU core; writes models/demo/

The last 5% of each novel is held out: neither the tokenizer nor the model sees it during training.
"""

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

import austen  # noqa: E402  (scripts/austen.py, beside this file)
import train_bpe  # noqa: E402
from llama.distributed import init_distributed  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama.model import ModelArgs, Transformer, apply_rotary_emb  # noqa: E402
from llama.tokenizer import PAT_STR, ChatFormat, Tokenizer  # noqa: E402

# The recipe of the shipped model. Changing any of these changes the model (and tests/test_demo.py's text).
BPE_VOCAB = 4096  # byte-level tokens; the Tokenizer appends the 256 special ones
PARAMS = dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, multiple_of=64, norm_eps=1e-5, rope_theta=500000.0)
SEQ_LEN = 256  # positions per training sequence (<|begin_of_text|> included); the demo's context length
BATCH = 16
STEPS = 1000
PEAK_LR, FINAL_LR, WARMUP = 2e-3, 2e-4, 100
WEIGHT_DECAY = 0.1
HOLDOUT = 0.05
DIALOG_WEIGHT = 4.0  # a conversation is this many times likelier than a paragraph to start a sequence


def training_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (bsz, seqlen, vocab) for whole sequences, with gradients and without the KV cache.

    `Transformer.forward` is the inference path (inference_mode, cache writes). This runs the same modules
    and weights with causal attention over the sequence; `check_same_as_inference` proves the two agree.
    """
    bsz, seqlen = tokens.shape
    h = model.tok_embeddings(tokens)  # (bsz, seqlen, dim)
    cos, sin = model.rope_cos[:seqlen], model.rope_sin[:seqlen]
    for layer in model.layers:
        attn = layer.attention
        x = layer.attention_norm(h)
        q = attn.wq(x).view(bsz, seqlen, attn.n_local_heads, attn.head_dim)
        k = attn.wk(x).view(bsz, seqlen, attn.n_local_kv_heads, attn.head_dim)
        v = attn.wv(x).view(bsz, seqlen, attn.n_local_kv_heads, attn.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (bsz, heads, seqlen, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + attn.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()


def init_weights(model: Transformer, n_layers: int) -> None:
    """GPT-2 style: normal(0, 0.02), the projections into the residual stream scaled by 1/sqrt(2 layers)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))
        else:
            torch.nn.init.normal_(p, std=0.02)


class Corpus:
    """Token ids of one split, laid end to end, and where a training sequence may start: at each paragraph
    of the novels and at each conversation (in the chat format). Sequences are <|begin_of_text|> followed
    by the text from such a start, as prompts are at inference."""

    def __init__(self, tokenizer: Tokenizer, novels: List[Tuple[str, str]]):
        formatter = ChatFormat(tokenizer)
        ids: List[int] = []
        self.starts: List[int] = []
        self.weights: List[float] = []
        for _, text in novels:
            for paragraph in austen.paragraphs(text):
                self.starts.append(len(ids))
                self.weights.append(1.0)
                ids.extend(tokenizer.encode(paragraph + "\n\n", bos=False, eos=False))
            ids.append(tokenizer.eos_id)
        self.n_text_tokens = len(ids)
        for _, text in novels:
            for turns in austen.conversations(text):
                self.starts.append(len(ids))
                self.weights.append(DIALOG_WEIGHT)
                for i, turn in enumerate(turns):
                    ids.extend(formatter.encode_message({"role": "user" if i % 2 == 0 else "assistant",
                                                         "content": turn}))
        self.ids = torch.tensor(ids)
        self.bos = tokenizer.bos_id
        self.n_dialogs = sum(1 for w in self.weights if w == DIALOG_WEIGHT)

    def batch(self, bsz: int, generator: torch.Generator) -> torch.Tensor:
        """(bsz, SEQ_LEN + 1) sequences from random starts: inputs are [:, :-1], targets [:, 1:]."""
        picks = torch.multinomial(torch.tensor(self.weights), bsz, replacement=True, generator=generator)
        rows = []
        for p in picks.tolist():
            start = min(self.starts[p], len(self.ids) - SEQ_LEN)
            rows.append(torch.cat([torch.tensor([self.bos]), self.ids[start : start + SEQ_LEN]]))
        return torch.stack(rows)

    def eval_batches(self, text_only: bool = True) -> List[torch.Tensor]:
        """The split cut into consecutive, non-overlapping sequences (each after <|begin_of_text|>)."""
        ids = self.ids[: self.n_text_tokens] if text_only else self.ids[self.n_text_tokens :]
        rows = [torch.cat([torch.tensor([self.bos]), ids[i : i + SEQ_LEN]]) for i in range(0, len(ids), SEQ_LEN)]
        rows = [r for r in rows if len(r) > 1]
        return [torch.nn.utils.rnn.pad_sequence(rows[i : i + BATCH], batch_first=True, padding_value=-1)
                for i in range(0, len(rows), BATCH)]


def mean_loss(logits_fn, batches: List[torch.Tensor]) -> float:
    """Mean cross-entropy in nats per predicted token; padding (-1) is ignored."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            inputs, targets = b[:, :-1].clamp(min=0), b[:, 1:]
            logits = logits_fn(inputs)
            total += F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1, reduction="sum").item()
            count += int((targets != -1).sum())
    return total / count


def lr_at(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay from PEAK_LR to FINAL_LR at `steps`."""
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return FINAL_LR + 0.5 * (PEAK_LR - FINAL_LR) * (1 + math.cos(math.pi * progress))


def write_checkpoint(model: Transformer, params: Dict, out_dir: Path) -> None:
    """consolidated.00.pth (bf16, Meta's names), params.json and checklist.chk (md5, as Meta ships)."""
    state = {name: p.detach().to(torch.bfloat16).clone() for name, p in model.named_parameters()}
    torch.save(state, out_dir / "consolidated.00.pth")
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    lines = []
    for name in ("consolidated.00.pth", "params.json", "tokenizer.model"):
        lines.append(f"{hashlib.md5((out_dir / name).read_bytes()).hexdigest()}  {name}")
    (out_dir / "checklist.chk").write_text("\n".join(lines) + "\n")


def main(corpus: str = "", out_dir: str = str(REPO / "models" / "demo"), seed: int = 1234, threads: int = 1,
         steps: int = STEPS):
    """Train the demo model on the Jane Austen corpus (see scripts/austen.py) and write it to `out_dir`.

    One thread by default: the weights then do not depend on the machine's core count, and on a busy
    2-core machine a second thread mostly waits for the first. `steps` other than STEPS is for trying
    the script out; the shipped model is the default recipe."""
    start_time = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    rdata = austen.find_rdata(corpus)
    if austen.sha256(rdata) != austen.RDATA_SHA256:
        print(f"warning: {rdata} is not the file the shipped model was trained on; the result will differ")
    novels = austen.read_novels(rdata)
    splits = [austen.split_holdout(text, HOLDOUT) for _, text in novels]
    train_novels = [(title, s[0]) for (title, _), s in zip(novels, splits)]
    held_novels = [(title, s[1]) for (title, _), s in zip(novels, splits)]
    print(f"corpus: {rdata}: {', '.join(t for t, _ in novels)} ({sum(len(t) for _, t in novels):,} characters)")

    print(f"training a {BPE_VOCAB}-token byte-level BPE on the training split ...")
    train_text = ["\n\n".join(austen.paragraphs(text)) for _, text in train_novels]
    vocab = train_bpe.train_bpe(train_bpe.count_chunks(train_text, PAT_STR), BPE_VOCAB)
    train_bpe.write_tiktoken_file(vocab, str(out / "tokenizer.model"))
    tokenizer = Tokenizer(str(out / "tokenizer.model"))
    sample = train_text[0][:20000]
    if tokenizer.decode(tokenizer.encode(sample, bos=False, eos=False)) != sample:
        raise RuntimeError("the trained tokenizer does not round-trip the corpus")

    train, held = Corpus(tokenizer, train_novels), Corpus(tokenizer, held_novels)
    print(f"tokens: train {len(train.ids):,} ({train.n_dialogs} conversations), held out {len(held.ids):,}; "
          f"{sum(len(t.encode()) for t in train_text) / train.n_text_tokens:.2f} bytes per token")

    params = dict(PARAMS, vocab_size=tokenizer.n_words)
    init_distributed(torch.device("cpu"))
    model = Transformer(ModelArgs.from_params(params, max_seq_len=SEQ_LEN, max_batch_size=1))
    init_weights(model, params["n_layers"])
    for p in model.parameters():
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {params}, {n_params / 1e6:.2f}M parameters; {steps} steps of {BATCH}x{SEQ_LEN} tokens")

    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=PEAK_LR, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    held_batches = held.eval_batches()

    def bf16_logits(inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return training_forward(model, inputs)

    train_start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        batch = train.batch(BATCH, generator)
        # bf16 autocast: matrix products in bf16 (2x faster on CPUs that have it), the rest in float32.
        logits = bf16_logits(batch[:, :-1])
        loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.time() - train_start
            rate = (step + 1) * BATCH * SEQ_LEN / elapsed
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(f"step {step:5d}/{steps}  loss {loss.item():.3f}  lr {lr_at(step, steps):.2e}  "
                  f"{rate:,.0f} tok/s  {elapsed / 60:.1f} min, {eta / 60:.1f} min to go", flush=True)
        if (step + 1) % 250 == 0:
            model.eval()
            print(f"  held-out loss {mean_loss(bf16_logits, held_batches):.3f}", flush=True)
            model.train()
    train_minutes = (time.time() - train_start) / 60

    write_checkpoint(model, params, out)
    print(f"wrote {out}: " + ", ".join(f"{f.name} {f.stat().st_size / 1e6:.2f} MB" for f in sorted(out.iterdir())))
    evaluate(out, held, train_minutes, time.time() - start_time)


def evaluate(out: Path, held: "Corpus", train_minutes: float, total_seconds: float) -> None:
    """Reload the written files through Llama.build, check the inference path against `training_forward`,
    report the held-out loss and show a few samples."""
    generator = Llama.build(str(out), str(out / "tokenizer.model"), max_seq_len=SEQ_LEN, max_batch_size=BATCH,
                            device="cpu", dtype=torch.float32)
    model = generator.model
    batches = held.eval_batches()
    text_loss = mean_loss(lambda x: model.forward(x, 0), batches)
    check = mean_loss(lambda x: training_forward(model, x), batches[:2])
    first = mean_loss(lambda x: model.forward(x, 0), batches[:2])
    if abs(check - first) > 1e-4:
        raise RuntimeError(f"training and inference paths disagree: {check} vs {first}")
    dialog_loss = mean_loss(lambda x: model.forward(x, 0), held.eval_batches(text_only=False))
    print(f"held-out loss (float32, Llama.build): text {text_loss:.3f} nats/token "
          f"(perplexity {math.exp(text_loss):.1f}), conversations {dialog_loss:.3f}")
    prompts = ["It is a truth universally acknowledged, that", "Elizabeth could not help", "Mr. Knightley"]
    for prompt, result in zip(prompts, generator.text_completion(prompts, temperature=0.6, max_gen_len=48)):
        print(f"  {prompt}{result['generation']!r}")
    dialogs = [[{"role": "user", "content": "Do you dance, Mr. Darcy?"}],
               [{"role": "user", "content": "What do you think of Bath?"}]]
    for dialog, result in zip(dialogs, generator.chat_completion(dialogs, temperature=0.6, max_gen_len=64)):
        print(f"  {dialog[-1]['content']!r} -> {result['generation']['content']!r}")
    print(f"trained in {train_minutes:.1f} minutes; {total_seconds / 60:.1f} minutes in all")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
