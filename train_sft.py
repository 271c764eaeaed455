"""Stage 1 of RLHF: supervised fine-tuning (SFT) on demonstrations.

InstructGPT §3.5: fine-tune the language model on labeler-written (prompt, response) pairs with the ordinary
next-token loss. Only the response tokens are scored, the prompt is context:

    L_SFT = - 1/|R| sum_{t in response} log pi(y_t | prompt, y_<t)

Reads  data/sft.jsonl (made from the built-in task if missing), data/prompts_eval.jsonl (held-out gold score)
Writes out/sft.pt

    python train_sft.py                      # the built-in task, a fresh 4-layer GPT, about 3 minutes on 2 cores
    python train_sft.py --max_iters 50 --lr 3e-4 --data my_demos.jsonl
"""

import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from nanorlhf import checkpoint, ops, tasks
from nanorlhf.config import UserError, run
from nanorlhf.data import load_prompts
from nanorlhf.datasets import load_demonstrations
from nanorlhf.metrics import MetricsLog
from nanorlhf.evaluate import gold_eval
from nanorlhf.model import GPT, GPTConfig, left_pad
from nanorlhf.optim import adamw, lr_at, set_lr
from nanorlhf.tokenizer import encode


@dataclass
class Config:
    """Supervised fine-tuning on demonstrations, loss on response tokens only."""

    data: str = "data/sft.jsonl"
    """demonstrations {"prompt", "response"}; the default is written from the built-in task if missing"""
    eval_prompts: str = "data/prompts_eval.jsonl"
    """held-out prompts for the gold score ("" to skip; only prompts of the built-in task are scored)"""
    out: str = "out/sft.pt"
    """where the checkpoint goes"""
    init_from: str = ""
    """"" for a fresh GPT of the size below; a checkpoint (.pt) to continue from; or GPT-2 weights: a Hugging Face
    directory (config.json + model.safetensors) or a hub name such as gpt2"""
    n_layer: int = 4
    """fresh GPT: transformer blocks"""
    n_head: int = 4
    """fresh GPT: attention heads"""
    n_embd: int = 128
    """fresh GPT: width"""
    block_size: int = 64
    """fresh GPT: context length; a longer example loses prompt tokens from the left"""
    dropout: float = 0.0
    """dropout while training SFT"""
    batch_size: int = 64
    """examples per step"""
    max_iters: int = 400
    """optimizer steps"""
    lr: float = 2e-3
    """peak learning rate"""
    min_lr: float = 1e-4
    """learning rate at the end of the cosine decay"""
    warmup_iters: int = 30
    """linear warm-up steps"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices"""
    grad_clip: float = 1.0
    """clip the gradient's global norm to this (0: off)"""
    val_fraction: float = 0.02
    """fraction of the demonstrations held out for the validation loss"""
    eval_interval: int = 200
    """steps between evaluations (and at the end)"""
    eval_n: int = 200
    """held-out prompts sampled for the gold score"""
    temperature: float = 1.0
    """sampling temperature for the gold score (the one PPO samples at)"""
    max_new_tokens: int = 16
    """longest sampled response"""
    seed: int = 0
    """random seed"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""


def encode_example(prompt, response, block_size):
    """(tokens, number of response tokens). Too long for block_size: prompt tokens go first, from the left."""
    p, r = encode(prompt), encode(response)
    if len(r) >= block_size:
        return None  # the response alone does not fit: the caller reports it
    keep = block_size - len(r)
    return p[-keep:] + r, len(r)


def make_batch(examples, device):
    """Left-padded batch: idx (B, T), start (B,), and the mask of target columns (B, T - 1) for the response."""
    idx, start = left_pad([toks for toks, _ in examples], device=device)  # (B, T), (B,)
    T = idx.shape[1]
    n_resp = torch.tensor([n for _, n in examples], device=device)  # (B,)
    # Left padding puts every response at the right end: column c is a response token iff c >= T - n_resp.
    # The hidden state at column c - 1 predicts the token at column c.
    target_cols = torch.arange(1, T, device=device)  # (T - 1,)
    mask = target_cols[None, :] >= (T - n_resp)[:, None]  # (B, T - 1)
    return idx, start, mask


def sft_loss(model, idx, start, mask):
    """Mean -log pi(y_t) over the response tokens of the batch (the LM head only runs on them)."""
    hidden = model(idx, start)  # (B, T, C)
    h = hidden[:, :-1][mask]  # (N, C): states that predict a response token
    y = idx[:, 1:][mask]  # (N,): the tokens they predict
    logp = ops.token_logprobs(h, model.lm_head.weight, y)  # (N,)
    return -logp.mean(), y.numel()


@torch.no_grad()
def val_loss(model, examples, batch_size, device):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = sft_loss(model, *make_batch(examples[i:i + batch_size], device))
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count


def main(cfg: Config):
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # Model: fresh, or from a checkpoint.
    if cfg.init_from and not cfg.init_from.endswith(".pt"):
        model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
    elif cfg.init_from:
        ckpt = checkpoint.load(cfg.init_from, made_by="train_sft.py")
        if ckpt["kind"] not in ("sft", "ppo"):
            raise UserError(f"{cfg.init_from} is a {ckpt['kind']!r} checkpoint; --init_from takes a GPT (sft or ppo)")
        model = GPT(replace(checkpoint.model_config(ckpt), dropout=cfg.dropout))
        model.load_state_dict(ckpt["model"])
    else:
        model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              dropout=cfg.dropout))
    model.to(device)
    block_size = model.config.block_size

    # Data: the default path is written from the built-in task the first time.
    if not Path(cfg.data).exists() and cfg.data == Config.data:
        print(f"{cfg.data} not found: writing the built-in task's data (python -m nanorlhf.tasks)")
        tasks.write_default_data(tasks.TaskConfig(out=str(Path(cfg.data).parent)))
    pairs = load_demonstrations(cfg.data)  # ours {prompt, response}, or HH / TL;DR style (README)

    examples = []
    for i, (prompt, response) in enumerate(pairs):
        ex = encode_example(prompt, response, block_size)
        if ex is None:
            raise UserError(f"{cfg.data}: record {i + 1}: the response alone is longer than block_size "
                            f"{block_size} tokens")
        examples.append(ex)
    rng.shuffle(examples)
    n_val = max(1, int(cfg.val_fraction * len(examples))) if len(examples) > 1 else 0
    val, train = examples[:n_val], examples[n_val:]
    eval_prompts = load_prompts(cfg.eval_prompts)[:cfg.eval_n] if cfg.eval_prompts else []
    print(f"SFT: {len(train)} train / {len(val)} val demonstrations, GPT {model.num_params() / 1e6:.2f}M params "
          f"({model.config.n_layer} layers, {model.config.n_embd} wide), device {device}")

    optimizer = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.99))
    order, pos = list(range(len(train))), len(train)
    t0, tokens_seen = time.time(), 0
    metrics = MetricsLog(Path(cfg.out).with_suffix(""), fresh=True)  # out/sft.pt -> out/sft/metrics.jsonl
    history = [dict(iter=0, val_loss=val_loss(model, val, 256, device))] if val else []
    bar = tqdm(range(cfg.max_iters), desc="sft", dynamic_ncols=True, mininterval=1.0)
    for it in bar:
        if pos + cfg.batch_size > len(order):  # a new epoch: reshuffle
            rng.shuffle(order)
            pos = 0
        batch = [train[i] for i in order[pos:pos + cfg.batch_size]]
        pos += cfg.batch_size
        set_lr(optimizer, lr_at(it, cfg.lr, cfg.warmup_iters, cfg.max_iters, cfg.min_lr))
        idx, start, mask = make_batch(batch, device)
        loss, _ = sft_loss(model, idx, start, mask)
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} at step {it}: lower --lr (nothing was saved)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        tokens_seen += int((start.numel() * idx.shape[1]) - start.sum())
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_seen / (time.time() - t0):.0f}")

        if (it + 1) % cfg.eval_interval == 0 or it + 1 == cfg.max_iters:
            record = dict(iter=it + 1, train_loss=loss.item(), time_s=time.time() - t0)
            if val:
                record["val_loss"] = val_loss(model, val, 256, device)
            gold = gold_eval(model, eval_prompts, cfg.max_new_tokens, cfg.temperature) if eval_prompts else None
            if gold is not None:
                record["gold"], record["gold_se"] = gold
            history.append(record)
            metrics.log(it + 1, **{k: v for k, v in record.items() if k != "iter"})
            msg = f"iter {it + 1}: train loss {loss.item():.3f}"
            if "val_loss" in record:
                msg += f", val loss {record['val_loss']:.3f}"
            if gold is not None:
                msg += f", held-out gold score {gold[0]:.3f} ± {gold[1]:.3f} ({len(eval_prompts)} prompts, T={cfg.temperature})"
            tqdm.write(msg)
    bar.close()
    elapsed = time.time() - t0
    checkpoint.save(cfg.out, model, kind="sft", train_config=vars(cfg), history=history)
    print(f"SFT done in {elapsed:.0f} s; wrote {cfg.out}")


if __name__ == "__main__":
    run(main, Config)
