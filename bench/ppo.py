"""The PPO speed workload: train_ppo.py itself, on random GPT-2-shaped models, timed per phase.

    python -m bench.ppo                 # 4-layer 128-wide models, 64 prompts x 32 new tokens, 4 epochs of 16
    python -m bench.ppo --iters 10 --n_layer 12 --n_embd 768 --n_head 12 --block_size 1024   # GPT-2 124M's shape

Writes random sft.pt / rm.pt checkpoints and a prompts file into a temporary folder, runs `train_ppo.py` on them as
a user would (a subprocess: the loop measured is the training loop, with no benchmark branch in it), and reads the
per-iteration phase times that the run logs to its metrics.jsonl (t_rollout, t_score, t_update). Random weights
almost never sample <|endoftext|> (1 in 50,257 per token), so every response runs to max_new_tokens and the work per
iteration is fixed. The first iteration (warm-up: allocator, caches) is left out of the medians.
"""

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from nanorlhf import checkpoint
from nanorlhf.config import DTYPES, UserError, at_least, one_of, require, run, seed_range
from nanorlhf.data import write_jsonl
from nanorlhf.model import GPT, GPTConfig, ScalarModel
from nanorlhf.tokenizer import EOT, decode

ROOT = Path(__file__).resolve().parents[1]
PHASES = (("rollout", "t_rollout"), ("scoring", "t_score"), ("update", "t_update"), ("iteration", "time_s"))


@dataclass
class Config:
    """Time PPO iterations of train_ppo.py on random models of a given shape."""

    iters: int = 6
    """PPO iterations to run (the first is left out of the medians)"""
    n_layer: int = 4
    """transformer blocks of all four models"""
    n_head: int = 4
    """attention heads"""
    n_embd: int = 128
    """width"""
    block_size: int = 64
    """context length"""
    prompt_len: int = 16
    """tokens per prompt"""
    batch_size: int = 64
    """rollouts per iteration"""
    minibatch_size: int = 16
    """rollouts per gradient step"""
    ppo_epochs: int = 4
    """passes over each batch of rollouts"""
    max_new_tokens: int = 32
    """response length (random models almost never end earlier)"""
    threads: int = 2
    """torch CPU threads of the run"""
    dtype: str = "auto"
    """autocast dtype: auto (bfloat16 on a GPU that has it, else float32), bfloat16 or float32"""
    seed: int = 0
    """seed of the random weights and prompts"""

    def __post_init__(self):  # ranges of the flags, checked whenever a Config is made (nanorlhf/config.py)
        at_least(self, 1, "iters", "n_layer", "n_head", "n_embd", "block_size", "prompt_len", "batch_size",
                 "minibatch_size", "ppo_epochs", "max_new_tokens")
        at_least(self, 0, "threads")
        require(self.n_embd % self.n_head == 0, f"--n_embd must be a multiple of --n_head {self.n_head}, "
                                                 f"got {self.n_embd}")
        require(self.minibatch_size <= self.batch_size, f"--minibatch_size must be at most --batch_size "
                                                        f"{self.batch_size}, got {self.minibatch_size}")
        require(self.prompt_len + self.max_new_tokens <= self.block_size, f"--prompt_len {self.prompt_len} + "
                f"--max_new_tokens {self.max_new_tokens} must fit in --block_size {self.block_size}")
        one_of(self, "dtype", DTYPES)
        seed_range(self)


def write_workload(cfg: Config, d: Path) -> None:
    """Random policy/RM checkpoints and batch_size prompts of prompt_len random tokens into folder d."""
    model_cfg = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    torch.manual_seed(cfg.seed)
    checkpoint.save(d / "sft.pt", GPT(model_cfg), kind="sft")
    checkpoint.save(d / "rm.pt", ScalarModel(model_cfg), kind="rm")
    rng = random.Random(cfg.seed)
    prompts = [decode([rng.randrange(EOT) for _ in range(cfg.prompt_len)]) for _ in range(cfg.batch_size)]
    write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p in prompts])


def run_ppo(cfg: Config, d: Path) -> list[dict]:
    """train_ppo.py on the workload in d; its metrics records, one per iteration."""
    cmd = [sys.executable, str(ROOT / "train_ppo.py"), "--sft", d / "sft.pt", "--rm", d / "rm.pt",
           "--prompts", d / "prompts.jsonl", "--eval_prompts", "", "--out", d / "ppo.pt", "--iters", cfg.iters,
           "--batch_size", cfg.batch_size, "--minibatch_size", cfg.minibatch_size, "--ppo_epochs", cfg.ppo_epochs,
           "--max_new_tokens", cfg.max_new_tokens, "--threads", cfg.threads, "--dtype", cfg.dtype,
           "--ckpt_interval", 0, "--seed", cfg.seed]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}"
        raise UserError(f"train_ppo.py failed: {last}")
    return [json.loads(line) for line in open(d / "ppo" / "metrics.jsonl")]


def main(cfg: Config):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_workload(cfg, d)
        records = run_ppo(cfg, d)
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
    timed = records[1:] or records  # the first iteration warms up
    kernels = os.environ.get("NANORLHF_KERNELS", "auto")
    print(f"PPO iteration of train_ppo.py: {cfg.n_layer} layers x {cfg.n_embd} wide (policy, reference, RM, value), "
          f"{cfg.batch_size} prompts of {cfg.prompt_len} tokens, {cfg.max_new_tokens} new tokens, {cfg.ppo_epochs} "
          f"epochs of minibatch {cfg.minibatch_size}; torch {torch.__version__}, {cfg.threads} threads, "
          f"kernels {kernels}; median over iterations 2..{len(records)}")
    print("")
    print("| phase | median s | min s | max s |")
    print("|---|---|---|---|")
    for name, key in PHASES:
        xs = [r[key] for r in timed]
        print(f"| {name} | {statistics.median(xs):.3f} | {min(xs):.3f} | {max(xs):.3f} |")
    print("")
    tokens_s = statistics.median(r["tokens_per_s"] for r in timed)
    print(f"tokens per second (prompt + response, median): {tokens_s:.0f}; peak RSS of the run {rss_mb:.0f} MB")
    return dict(records=records, peak_rss_mb=rss_mb)


if __name__ == "__main__":
    run(main, Config)
