"""Stage 1 of RLHF: supervised fine-tuning (SFT) on demonstrations.

InstructGPT §3.5: fine-tune the language model on labeler-written (prompt, response) pairs with the ordinary
next-token loss. Only the response tokens are scored, the prompt is context:

    L_SFT = - 1/|R| sum_{t in response} log pi(y_t | prompt, y_<t)

Reads  data/sft.jsonl (made from the built-in task if missing), data/prompts_eval.jsonl (held-out gold score)
Writes out/sft.pt

    python train_sft.py                      # the built-in task, a fresh 4-layer GPT (~70 s on 2 CPU cores)
    python train_sft.py --max_iters 50 --lr 3e-4 --data my_demos.jsonl
    torchrun --standalone --nproc_per_node=4 train_sft.py     # 4 GPUs (DDP): 4 x batch_size examples per step
    python train_sft.py --init_from gpt2 --micro_batch_size 4 --activation_checkpointing    # less memory
"""

import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from nanorlhf import checkpoint, cpu, dist, tasks
from nanorlhf.config import (DTYPES, UserError, at_least, check_room, checkpoint_name, file_name, finite, in_range,
                             one_of, positive, require, run, seed_range)
from nanorlhf.data import encode_lm_data, load_prompts
from nanorlhf.evaluate import gold_eval
from nanorlhf.metrics import MetricsLog
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.optim import adamw, lr_at, set_lr
from nanorlhf.sft import make_batch, sft_loss, val_loss


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
    """examples per step and process (torchrun: the global batch is world_size x batch_size)"""
    micro_batch_size: int = 0
    """examples per forward and backward pass, summed into each step (0: all at once): less memory, the same step"""
    activation_checkpointing: bool = False
    """keep only each block's input for the backward pass, recompute the rest there: less memory, more compute"""
    fsdp: bool = False
    """torchrun: shard the model, its gradients and AdamW's moments over the processes (FSDP2) instead of DDP"""
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
    dtype: str = "auto"
    """autocast dtype of forward passes: auto (bfloat16 on a GPU that has it, else float32), bfloat16 or float32"""
    compile: bool = False
    """torch.compile the model being trained"""
    seed: int = 0
    """random seed"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    ckpt_interval: int = 100
    """steps between resumable checkpoints at --out (0: only the final one)"""
    resume: bool = False
    """continue the run from its checkpoint at --out"""

    def __post_init__(self):  # ranges of the flags, checked whenever a Config is made (nanorlhf/config.py)
        finite(self)
        file_name(self, "data")
        checkpoint_name(self)
        at_least(self, 1, "n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "eval_interval",
                 "max_new_tokens")
        require(self.n_embd % self.n_head == 0, f"--n_embd must be a multiple of --n_head {self.n_head}, got "
                                                f"{self.n_embd}")
        if not self.init_from:  # a fresh GPT of these sizes; loaded weights are checked when loaded
            check_room(self.max_new_tokens, self.block_size, "--block_size")
        in_range(self, "dropout", 0, 1, hi_open=True)
        positive(self, "lr")
        in_range(self, "min_lr", 0, self.lr)
        at_least(self, 0, "warmup_iters", "weight_decay", "grad_clip", "eval_n", "temperature", "threads",
                 "ckpt_interval", "micro_batch_size")
        require(not (self.fsdp and (self.ckpt_interval or self.resume)), "--fsdp needs --ckpt_interval 0, no --resume")
        in_range(self, "val_fraction", 0, 1, hi_open=True)
        one_of(self, "dtype", DTYPES)
        seed_range(self)


def main(cfg: Config):
    """Fine-tune; a run that fails before its first checkpoint leaves the previous run's files as they were."""
    with checkpoint.Staged() as staged:  # metrics.jsonl: beside the previous run's until this run's first checkpoint
        return train_sft(cfg, staged)


def train_sft(cfg: Config, staged: checkpoint.Staged):
    checkpoint.check_outputs(cfg.out)  # before anything is read or written (the flags were checked in Config)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dist.setup()  # under torchrun: join the process group, this process's GPU (nanorlhf/dist.py)
    cpu.keep_freed_memory(device)  # CPU: reuse freed buffers instead of page-faulting fresh ones every step
    amp = dist.autocast(device, cfg.dtype)
    resumed = checkpoint.load_resumable(cfg, "train_sft.py", kind="sft") if cfg.resume else None
    if cfg.resume and resumed is None:
        return  # that run had finished

    # 1. The model: a fresh GPT, GPT-2 weights, or a checkpoint.
    if resumed:  # as it was at the checkpoint; the optimizer, data order and random states are put back below
        model = GPT(replace(checkpoint.model_config(resumed), dropout=cfg.dropout))
        model.load_state_dict(resumed["model"])
    elif cfg.init_from:  # GPT-2 weights or a checkpoint (nanorlhf/checkpoint.py)
        model = checkpoint.init_gpt(cfg.init_from, dropout=cfg.dropout)
    else:
        model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              dropout=cfg.dropout))
    model.to(device)
    model.checkpointing = cfg.activation_checkpointing
    block_size = model.config.block_size
    check_room(cfg.max_new_tokens, block_size, cfg.init_from or cfg.out)

    # 2. The demonstrations (the default path is written from the built-in task the first time).
    if dist.is_main() and not Path(cfg.data).exists() and cfg.data == Config.data:
        print(f"{cfg.data} not found: writing the built-in task's data (python -m nanorlhf.tasks)")
        tasks.write_default_data(tasks.TaskConfig(out=str(Path(cfg.data).parent)))
    dist.barrier()  # the other processes read what rank 0 wrote
    examples = encode_lm_data(cfg.data, block_size, text=False)  # ours {prompt, response}, HH / TL;DR (README)
    rng.shuffle(examples)
    n_val = max(1, int(cfg.val_fraction * len(examples))) if len(examples) > 1 else 0
    val, train = examples[:n_val], examples[n_val:]
    dist.require_global_batch(len(train), cfg.batch_size * dist.world_size(), "training demonstrations", cfg.data,
                              f"--batch_size {cfg.batch_size}")
    eval_prompts = load_prompts(cfg.eval_prompts)[:cfg.eval_n] if cfg.eval_prompts else []
    dist.print0(f"SFT: {len(train)} train / {len(val)} val demonstrations, GPT {model.num_params() / 1e6:.2f}M params "
          f"({model.config.n_layer} layers, {model.config.n_embd} wide), device {device}")
    n_params = checkpoint.param_count(model.config)  # the gold score samples 64 prompts at a time
    micro = min(cfg.micro_batch_size or cfg.batch_size, cfg.batch_size)
    dist.print0(checkpoint.memory_line(checkpoint.memory_estimate(
        n_params, n_params, [(model.config, 64 * block_size)] if eval_prompts else [],
        [(model.config, micro * block_size)], dist.autocast_dtype(cfg.dtype, device), cfg.activation_checkpointing,
        dist.world_size() if cfg.fsdp else 1)))

    # 3. Train: the next-token loss on response tokens (nanorlhf/sft.py), warm-up then cosine learning rate;
    #    validation loss and held-out gold score every eval_interval steps.
    with amp():
        history = [dict(iter=0, val_loss=val_loss(model, val, 256, device))] if val and dist.is_main() else []
    train_model = dist.wrap(model, device, cfg.compile, cfg.fsdp)  # DDP or FSDP with several processes
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.99))  # after FSDP: its parameters are shards
    global_batch = cfg.batch_size * dist.world_size()
    order, pos = list(range(len(train))), len(train)
    t0, tokens_seen = time.time(), 0
    first_it = 0
    if resumed:  # go on from the checkpoint: optimizer, random states, data order and position, history
        state = resumed["resume"]
        optimizer.load_state_dict(state["optimizer"])
        checkpoint.set_rng_state(state["rng"], rng)
        order, pos, tokens_seen, t0 = state["order"], state["pos"], state["tokens_seen"], t0 - state["elapsed"]
        history, first_it = resumed["history"], resumed["step"]
    # out/sft.pt -> out/sft/metrics.jsonl; a resumed run drops the records after its checkpoint and appends
    metrics = (MetricsLog(Path(cfg.out).with_suffix(""), fresh=not resumed, upto=first_it, staged=staged)
               if dist.is_main() else None)
    bar = tqdm(range(first_it, cfg.max_iters), initial=first_it, total=cfg.max_iters, desc="sft", dynamic_ncols=True,
               mininterval=1.0, disable=not dist.is_main())
    for it in bar:
        if pos + global_batch > len(order):  # a new epoch: reshuffle
            rng.shuffle(order)
            pos = 0
        batch = dist.shard([train[i] for i in order[pos:pos + global_batch]])  # this process's part of the batch
        pos += global_batch
        set_lr(optimizer, lr_at(it, cfg.lr, cfg.warmup_iters, cfg.max_iters, cfg.min_lr))
        # In micro-batches (one by default), each mean weighed by its share of the global batch's response tokens.
        parts = [make_batch(batch[s], device) for s in dist.micro_batches(len(batch), cfg.micro_batch_size)]
        (shares,) = dist.shares([int(mask.sum()) for _, _, mask in parts])
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, (idx, start, mask) in dist.accumulate(parts, train_model):  # DDP: the last averages over processes
            with amp():
                loss, _ = sft_loss(train_model, idx, start, mask)
            (loss * shares[i]).backward()
            total += shares[i] * loss.item()
            tokens_seen += int((start.numel() * idx.shape[1]) - start.sum())
        loss = dist.mean_floats([total])[0]  # the mean over every process's response tokens
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} at step {it}: lower --lr (the last checkpoint and its "
                            f"metrics are left as they were)")
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_seen / (time.time() - t0):.0f}")

        evaluate = (it + 1) % cfg.eval_interval == 0 or it + 1 == cfg.max_iters
        dist.unshard(model, when=evaluate)  # FSDP: every process gathers the whole model for rank 0's evaluation
        if dist.is_main() and evaluate:  # rank 0 alone
            record = dict(iter=it + 1, train_loss=loss, time_s=time.time() - t0)
            with amp():
                if val:
                    record["val_loss"] = val_loss(model, val, 256, device)
                gold = gold_eval(model, eval_prompts, cfg.max_new_tokens, cfg.temperature) if eval_prompts else None
            if gold is not None:
                record["gold"], record["gold_se"] = gold
            history.append(record)
            metrics.log(it + 1, **{k: v for k, v in record.items() if k != "iter"})
            msg = f"iter {it + 1}: train loss {loss:.3f}"
            if "val_loss" in record:
                msg += f", val loss {record['val_loss']:.3f}"
            if gold is not None:
                msg += f", held-out gold score {gold[0]:.3f} ± {gold[1]:.3f} ({len(eval_prompts)} prompts, T={cfg.temperature})"
            tqdm.write(msg)
        dist.reshard(model)
        if dist.is_main() and cfg.ckpt_interval and (it + 1) % cfg.ckpt_interval == 0 and it + 1 < cfg.max_iters:
            staged.commit()  # this run's metrics replace the previous run's, with its first checkpoint
            checkpoint.save(cfg.out, model, kind="sft", train_config=vars(cfg), history=history, step=it + 1,
                            resume=dict(optimizer=optimizer.state_dict(), rng=checkpoint.rng_state(rng), order=order,
                                        pos=pos, tokens_seen=tokens_seen, elapsed=time.time() - t0))
    bar.close()

    # 4. Save the fine-tuned model: the policy's start and the reference of stages 2 and 3.
    elapsed = time.time() - t0
    dist.unshard(model)  # FSDP: the whole model in every process, for rank 0 to save
    if dist.is_main():
        staged.commit()
        checkpoint.save(cfg.out, model, kind="sft", train_config=vars(cfg), history=history, step=cfg.max_iters)
        print(f"SFT done in {elapsed:.0f} s; wrote {cfg.out}")
    dist.cleanup()
    return dict(model=model)  # the trained model (tests compare it across processes)


if __name__ == "__main__":
    run(main, Config)
