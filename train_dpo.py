"""DPO (Rafailov et al. 2023): the policy trained on the RM's rankings directly, with no reward model and no RL.

The alternative to stages 2 and 3 that replaced them in many libraries: from the SFT model (also the frozen
reference), minimise over every C(K, 2) pair (y_w above y_l) of each ranking

    L_DPO = -E log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

(nanorlhf/dpo.py). It reads the very rankings the RM trains on, so the two can be compared at the same labels.

Reads  out/sft.pt; out/rankings_train.jsonl and out/rankings_eval.jsonl (written by train_rm.py) or --data
Writes out/dpo.pt (the policy, as a GPT checkpoint that nanorlhf.sample and nanorlhf.evaluate read)

    python train_dpo.py
    python train_dpo.py --beta 0.3 --data my_rankings.jsonl --eval_prompts ""
"""

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nanorlhf import checkpoint, cpu, dist, dpo
from nanorlhf.config import (DTYPES, UserError, at_least, checkpoint_name, file_name, finite, one_of, positive, run,
                             seed_range)
from nanorlhf.data import load_preferences, load_prompts, preference_kind
from nanorlhf.evaluate import gold_eval
from nanorlhf.metrics import MetricsLog
from nanorlhf.model import GPT
from nanorlhf.optim import adamw, lr_at, set_lr


@dataclass
class Config:
    """Direct preference optimisation of the SFT policy on rankings, every pair of each."""

    sft: str = "out/sft.pt"
    """SFT checkpoint: the policy's start and the frozen reference pi_ref"""
    data: str = "out/rankings_train.jsonl"
    """rankings {"prompt", "responses": [best first]} or any preference format (README "Data formats")"""
    eval_data: str = "out/rankings_eval.jsonl"
    """held-out rankings for the implicit reward's pairwise accuracy ("" to skip)"""
    eval_prompts: str = "data/prompts_eval.jsonl"
    """held-out prompts for the gold score ("" to skip; only the built-in task's prompts are scored)"""
    out: str = "out/dpo.pt"
    """where the checkpoint goes"""
    beta: float = 0.1
    """DPO's beta: the strength of the implicit KL constraint to the reference (Rafailov et al.: 0.1 to 0.5)"""
    epochs: int = 1
    """passes over the pairs"""
    batch_size: int = 64
    """pairs per step and process"""
    lr: float = 1e-4
    """peak learning rate (warm-up, then cosine decay to a tenth of it)"""
    warmup_iters: int = 20
    """linear warm-up steps"""
    grad_clip: float = 1.0
    """clip the gradient's global norm (0: off)"""
    eval_n: int = 200
    """held-out prompts for the gold score"""
    max_new_tokens: int = 16
    """longest sampled response for the gold score"""
    temperature: float = 1.0
    """sampling temperature for the gold score"""
    dtype: str = "auto"
    """autocast dtype of forward passes: auto (bfloat16 on a GPU that has it, else float32), bfloat16 or float32"""
    seed: int = 0
    """random seed"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""

    def __post_init__(self):  # ranges of the flags, checked whenever a Config is made (nanorlhf/config.py)
        finite(self)
        file_name(self, "sft", "data")
        checkpoint_name(self)
        positive(self, "beta", "lr", "temperature")
        at_least(self, 1, "epochs", "batch_size", "max_new_tokens")
        at_least(self, 0, "warmup_iters", "grad_clip", "eval_n", "threads")
        one_of(self, "dtype", DTYPES)
        seed_range(self)


def load_pairs(path, block_size):
    """The encoded responses and the (chosen, rejected) pairs of a preference file (of a best-of-K choice: (best,
    other) only)."""
    try:
        return dpo.pair_examples(load_preferences(path), block_size, preference_kind(path) == "choice")
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


@torch.no_grad()
def reference_logprobs(model, examples, device, batch_size=256):
    """log pi(y|x) of every example (E,), without gradient (the frozen reference's, once for the whole run)."""
    return torch.cat([dpo.sequence_logprobs(model, examples[i:i + batch_size], device)
                      for i in range(0, len(examples), batch_size)])


@torch.no_grad()
def pair_accuracy(policy, ref_logp, examples, pairs, beta, device):
    """Fraction of held-out pairs whose implicit rewards beta * (log pi - log pi_ref) are in the labelled order."""
    policy.eval()
    logp = reference_logprobs(policy, examples, device)
    policy.train()
    r = dpo.implicit_reward(logp, ref_logp, beta)  # (E,)
    w, l = torch.tensor(pairs).T
    return (r[w] > r[l]).float().mean().item()


def main(cfg: Config):
    """Train with DPO; a run that fails before it saves leaves the previous run's files as they were."""
    with checkpoint.Staged() as staged:  # metrics.jsonl: beside the previous run's until this run saves
        return train_dpo(cfg, staged)


def train_dpo(cfg: Config, staged: checkpoint.Staged):
    checkpoint.check_outputs(cfg.out)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dist.setup()
    cpu.keep_freed_memory(device)
    amp = dist.autocast(device, cfg.dtype)

    # 1. The policy and the frozen reference, both the SFT model.
    sft = checkpoint.load(cfg.sft, made_by="train_sft.py", kind="sft")
    policy, ref = GPT(checkpoint.model_config(sft)), GPT(checkpoint.model_config(sft))
    policy.load_state_dict(sft["model"])
    ref.load_state_dict(sft["model"])
    policy.to(device).train()
    ref.to(device).eval().requires_grad_(False)
    block_size = policy.config.block_size

    # 2. The pairs: every C(K, 2) pair of each ranking (of a best-of-K choice: (best, other)), the RM's labels.
    examples, pairs = load_pairs(cfg.data, block_size)
    held_out = load_pairs(cfg.eval_data, block_size) if cfg.eval_data else None
    eval_prompts = load_prompts(cfg.eval_prompts)[:cfg.eval_n] if cfg.eval_prompts else []
    if not pairs:
        raise UserError(f"{cfg.data}: no pair of two different responses to learn from")

    # 3. The reference's log-probs of every response, once: pi_ref is frozen.
    t0 = time.time()
    with amp():
        ref_logp = reference_logprobs(ref, examples, device)  # (E,)
        held_ref = reference_logprobs(ref, held_out[0], device) if held_out else None
    dist.print0(f"DPO: {len(pairs)} pairs of {len(examples)} responses, beta {cfg.beta}, GPT "
                f"{policy.num_params() / 1e6:.2f}M, {device} [reference log-probs {time.time() - t0:.0f} s]")

    # 4. Train: each step, a batch of pairs through the policy; the loss of nanorlhf/dpo.py.
    optimizer = adamw(policy, cfg.lr, betas=(0.9, 0.95))
    train_policy = dist.wrap(policy, device)
    global_batch = cfg.batch_size * dist.world_size()
    plan = []
    for _ in range(cfg.epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        plan += [order[i:i + global_batch] for i in range(0, len(order), global_batch)]
    metrics = MetricsLog(Path(cfg.out).with_suffix(""), fresh=True, staged=staged) if dist.is_main() else None
    history = []
    bar = tqdm(range(len(plan)), desc="dpo", dynamic_ncols=True, mininterval=1.0, disable=not dist.is_main())
    for it in bar:
        batch = dist.shard([pairs[i] for i in plan[it]])
        if not batch:
            continue
        set_lr(optimizer, lr_at(it, cfg.lr, cfg.warmup_iters, len(plan), 0.1 * cfg.lr))
        ids = sorted({i for pair in batch for i in pair})  # each response of the batch through the policy once
        where = {e: n for n, e in enumerate(ids)}
        with amp():
            logp = dpo.sequence_logprobs(train_policy, [examples[i] for i in ids], device)  # (U,)
        w = torch.tensor([where[a] for a, _ in batch], device=device)
        lo = torch.tensor([where[b] for _, b in batch], device=device)
        rw, rl = torch.tensor([a for a, _ in batch], device=device), torch.tensor([b for _, b in batch], device=device)
        loss, acc = dpo.dpo_loss(logp[w], logp[lo], ref_logp[rw], ref_logp[rl], cfg.beta)
        scaled, loss = dist.global_mean_loss(loss, len(batch))
        if not torch.isfinite(loss):
            raise UserError(f"the DPO loss became {loss.item()} at step {it}: lower --lr (nothing was saved)")
        optimizer.zero_grad(set_to_none=True)
        scaled.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
        if metrics:
            metrics.log(it + 1, loss=loss.item(), reward_acc=acc.item(), lr=optimizer.param_groups[0]["lr"])

    # 5. Held-out: the implicit reward's pairwise accuracy, and the gold score of samples.
    if dist.is_main():
        record = dict(step=len(plan))
        with amp():
            if held_out:
                record["acc_labels"] = pair_accuracy(policy, held_ref, *held_out, cfg.beta, device)
            gold = gold_eval(policy, eval_prompts, cfg.max_new_tokens, cfg.temperature) if eval_prompts else None
        if gold is not None:
            record["gold"], record["gold_se"] = gold
        history.append(record)
        metrics.log(len(plan), **{k: v for k, v in record.items() if k != "step"})
        print("DPO: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k != "step"))
        staged.commit()
        checkpoint.save(cfg.out, policy, kind="dpo", train_config=vars(cfg), history=history, step=len(plan))
        print(f"DPO done in {time.time() - t0:.0f} s; wrote {cfg.out}")
    dist.cleanup()
    return dict(policy=policy)


if __name__ == "__main__":
    run(main, Config)
