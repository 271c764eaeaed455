"""One comparison of the ways to turn the same labels into a better policy, on the built-in task's gold score:
best-of-N with the RM; RL against the RM: PPO (GAE, a value function) and the critic-free RLOO, GRPO and Dr. GRPO;
DPO on the RM's own rankings; each at several strengths of its pull towards the SFT model, drawn on one
gold-vs-KL(pi || pi_SFT) frontier (as in DPO's paper, Figure 2).

    python -m nanorlhf.compare                                    # after make demo: out/sft.pt, out/rm.pt, rankings
    python -m nanorlhf.compare --ppo_betas 0.05,0.2 --dpo_betas 0.1,0.5 --rl_estimators gae,grpo --out out/compare

Each setting trains from the same SFT model (RL with the same RM, DPO on the same rankings the RM learned from), as a
subprocess of its own script (`train_ppo.py --estimator E --samples_per_prompt k --adaptive_kl false --init_kl_coef
beta`, `train_dpo.py --beta beta`). Every RL run samples as many responses: the same --iters and --batch_size (those
of train_ppo.py or --ppo_args), PPO as batch_size prompts once each, the critic-free methods as batch_size / k prompts
k times each. Their beta weighs the KL in the reward (PPO, RLOO: k1 summed over the response) or in the loss (GRPO:
k3 per token), so equal betas are not equal pulls: the frontier compares them at the KL they reach.

Every policy is evaluated the same way: one sample per held-out prompt, its mean gold score ± s.e., its mean RM score
(a response without <|endoftext|> scores no_eos_penalty, as in PPO), and KL(pi || pi_SFT) as the mean over the
samples of sum_t log pi(y_t) - log pi_SFT(y_t). Best-of-N samples N from SFT per prompt; its KL is
log N - (N - 1) / N (nanorlhf/overopt.py). Wall time and tokens sampled are each method's own: a training run's
(its rollouts' prompt and response tokens), or best-of-N's N samples per prompt.

Writes OUT/frontier.png, OUT/table.md (every point, and each method at its best gold) and each run's checkpoint.
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanorlhf import cpu, tasks
from nanorlhf.config import UserError, at_least, check_writable, positive, run, seed_range
from nanorlhf.data import load_prompts
from nanorlhf.evaluate import mean_stderr
from nanorlhf.metrics import read_metrics
from nanorlhf.overopt import bon_kl, best_of_n, evaluate_policy, load_gpt, load_models, sft_samples

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"gae": "PPO", "rloo": "RLOO", "grpo": "GRPO", "drgrpo": "Dr. GRPO"}  # train_ppo.py --estimator: the name


@dataclass
class Config:
    """Best-of-N, RL (PPO, RLOO, GRPO, Dr. GRPO) and DPO from one SFT model and one set of labels, on one frontier."""

    sft: str = "out/sft.pt"
    """SFT checkpoint: every method's start and reference"""
    rm: str = "out/rm.pt"
    """reward model: best-of-N's ranker, RL's reward, and every policy's RM score"""
    rankings: str = "out/rankings_train.jsonl"
    """the labels the RM learned from: DPO's training pairs"""
    prompts: str = "data/prompts_eval.jsonl"
    """held-out prompts of the built-in task"""
    n: int = 500
    """held-out prompts evaluated per policy"""
    bon: str = "1,4,16,64"
    """best-of-N: the values of N"""
    ppo_betas: str = "0.05,0.2"
    """RL: KL coefficients (fixed, not adapted), one run of each estimator each ("" = no RL)"""
    rl_estimators: str = "gae,rloo,grpo,drgrpo"
    """RL: train_ppo.py's --estimator values to run: gae (PPO), rloo, grpo, drgrpo ("" = no RL)"""
    samples_per_prompt: int = 4
    """the critic-free estimators' k: responses per prompt (PPO's GAE samples each prompt once)"""
    dpo_betas: str = "0.1,0.5"
    """DPO: betas, one run each ("" = no DPO)"""
    ppo_args: str = ""
    """more flags for every train_ppo.py run (every estimator: so no GAE-only flag such as --gamma with a critic-free
    one), as a shell would split them, e.g. "--iters 100" """
    dpo_args: str = ""
    """more flags for every train_dpo.py run"""
    max_new_tokens: int = 16
    """longest sampled response"""
    temperature: float = 1.0
    """sampling temperature of every policy"""
    no_eos_penalty: float = -5.0
    """RM score of a response without <|endoftext|>"""
    out: str = "out/compare"
    """folder of the runs, the table and the plot"""
    include: str = ""
    """table.json files of earlier comparisons from the same SFT model, RM, prompts and seed (comma-separated): their
    points join this table and plot (e.g. more betas for one method)"""
    seed: int = 1234
    """evaluation sampling seed"""

    def __post_init__(self):  # ranges of the flags, checked whenever a Config is made (nanorlhf/config.py)
        at_least(self, 1, "n", "max_new_tokens")
        at_least(self, 2, "samples_per_prompt")
        estimators(self)
        positive(self, "temperature")
        seed_range(self)
        for name in ("bon", "ppo_betas", "dpo_betas"):
            numbers(self, name)


def numbers(cfg, name):
    """The comma-separated numbers of a field, checked: N >= 1 for bon, beta > 0 for the others."""
    text = getattr(cfg, name)
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if name == "bon" and not all(v >= 1 and v == int(v) for v in values):
        raise UserError(f"--{name} must be whole numbers >= 1, got {text!r}")
    if name != "bon" and not all(v > 0 and math.isfinite(v) for v in values):
        raise UserError(f"--{name} must be numbers > 0, got {text!r}")
    return [int(v) for v in values] if name == "bon" else values


def estimators(cfg):
    """--rl_estimators as a list, checked."""
    names = [x.strip() for x in cfg.rl_estimators.split(",") if x.strip()]
    if not set(names) <= set(METHODS):
        raise UserError(f"--rl_estimators must be among {', '.join(METHODS)}, got {cfg.rl_estimators!r}")
    return names


def best_of_n_points(cfg, sft, rm, prompts, device):
    """Best-of-N for each N of --bon, from max(N) SFT samples per prompt (unbiased over all N-subsets)."""
    ns = numbers(cfg, "bon")
    t0 = time.time()
    proxy, golds, tokens = sft_samples(cfg, sft, rm, prompts, max(ns), device)  # (P, N) each
    wall = time.time() - t0
    rows = []
    for n in ns:
        # s.e. of best-of-n's gold: the per-prompt expected values' spread over prompts
        per_prompt = [best_of_n(proxy[i:i + 1], golds[i:i + 1], n) for i in range(len(prompts))]
        m, se = mean_stderr(per_prompt)
        rows.append(dict(method="best-of-N", setting=f"N = {n}", gold=m, gold_se=se,
                         rm=best_of_n(proxy, proxy, n), kl=bon_kl(n), wall_s=wall * n / max(ns),
                         tokens=tokens * n / max(ns)))
    return rows


def train(script, args, out):
    """Run a training script; its wall time and, for PPO, the tokens its rollouts sampled."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args), "--out", str(out)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}"
        raise UserError(f"{script} {' '.join(map(str, args))} failed: {last}")
    wall = time.time() - t0
    records = read_metrics(Path(out).with_suffix(""))
    tokens = sum(x["tokens_per_s"] * x["time_s"] for x in records if "tokens_per_s" in x) or None
    return wall, tokens


def budget_line(rows):
    """What the RL runs sampled, in one sentence: the same number of responses for every run, or each run's."""
    rl = [r for r in rows if "iters" in r]
    budgets = {(r["iters"], r["batch_size"]) for r in rl}
    if not budgets:
        return ""
    if len(budgets) > 1:
        return "RL runs of unequal sample budgets: " + ", ".join(
            f"{r['method']} {r['setting']}: --iters {r['iters']} x --batch_size {r['batch_size']}" for r in rl) + "."
    (iters, batch), = budgets
    each = ", ".join(dict.fromkeys(f"{r['method']} {r['batch_size'] // r['k']} prompts x {r['k']}" for r in rl))
    return (f"Every RL run samples as many responses: --iters {iters} x --batch_size {batch} = {iters * batch:,} "
            f"(per iteration {each}).")


def table(rows):
    """Markdown rows of the comparison, a header first."""
    lines = ["| method | setting | gold (mean ± s.e.) | RM score | KL (nats) | wall time (s) | tokens sampled |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tokens = "" if r["tokens"] is None else f"{r['tokens']:,.0f}"
        lines.append(f"| {r['method']} | {r['setting']} | {r['gold']:.3f} ± {r['gold_se']:.3f} | {r['rm']:+.3f} | "
                     f"{r['kl']:.2f} | {r['wall_s']:.0f} | {tokens} |")
    return lines


def draw(path, rows):
    """Gold against KL, one line per method through its settings, s.e. bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no PNG, the table only")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((r["kl"], r["gold"], r["gold_se"]) for r in rows if r["method"] == method)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-", color=f"C{k}",
                    label=method, capsize=3)
    ax.set_xscale("symlog", linthresh=1.0)  # linear to 1 nat, where the good settings are; a runaway run fits too
    ax.set_xlabel("KL(π ‖ π_SFT), nats per response (linear to 1, then log)")
    ax.set_ylabel("held-out gold score")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Gold reached per nat of KL from SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(cfg: Config):
    out = Path(cfg.out)
    check_writable(out, "--out", directory=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu.keep_freed_memory(device)
    prompts = [p for p in load_prompts(cfg.prompts) if tasks.is_task_prompt(p)][:cfg.n]
    if not prompts:
        raise UserError(f"{cfg.prompts}: no prompt of the built-in task (the gold score exists only for those)")
    sft, rm = load_models(cfg, device)
    out.mkdir(parents=True, exist_ok=True)

    rows = best_of_n_points(cfg, sft, rm, prompts, device) if numbers(cfg, "bon") else []
    for path in (p.strip() for p in cfg.include.split(",") if p.strip()):
        try:
            rows += json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--include {path}: not a table.json of nanorlhf.compare ({e})") from None
    runs = []  # (method, script, kind, checkpoint name, setting, flags)
    for e in estimators(cfg):
        k = 1 if e == "gae" else cfg.samples_per_prompt
        runs += [(METHODS[e], "train_ppo.py", "ppo", f"{'ppo' if e == 'gae' else e}_beta{beta:g}",
                  f"β = {beta:g}" + (f", k = {k}" if k > 1 else ""),
                  ["--sft", cfg.sft, "--rm", cfg.rm, "--estimator", e, "--samples_per_prompt", k, "--adaptive_kl",
                   "false", "--init_kl_coef", beta, *shlex.split(cfg.ppo_args)]) for beta in numbers(cfg, "ppo_betas")]
    runs += [("DPO", "train_dpo.py", "dpo", f"dpo_beta{beta:g}", f"β = {beta:g}",
              ["--sft", cfg.sft, "--data", cfg.rankings, "--beta", beta, *shlex.split(cfg.dpo_args)])
             for beta in numbers(cfg, "dpo_betas")]
    for method, script, kind, name, setting, args in runs:
        path = out / f"{name}.pt"
        print(f"{method}, {setting}: training ({script})", flush=True)
        wall, tokens = train(script, args, path)
        policy, run = load_gpt(path, script, kind)
        budget = dict(iters=run["iters"], batch_size=run["batch_size"], k=run.get("samples_per_prompt", 1)
                      ) if kind == "ppo" else {}  # what the RL run sampled
        rows.append(dict(method=method, setting=setting, wall_s=wall, tokens=tokens, **budget,
                         **evaluate_policy(cfg, policy.to(device), sft, rm, prompts, device)))
        print("\n".join(table(rows[-1:])[2:]), flush=True)

    best = {}
    for r in rows:
        if r["method"] not in best or r["gold"] > best[r["method"]]["gold"]:
            best[r["method"]] = r
    text = "\n".join([f"Every method from {cfg.sft} on {len(prompts)} held-out prompts, one sample each "
                      f"(best-of-N: N samples); KL(π ‖ π_SFT) in nats per response. {budget_line(rows)}".strip(),
                      "", "All points:", "",
                      *table(rows), "", "Each method at its best gold:", "", *table(best.values())])
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    png = draw(out / "frontier.png", rows)
    print(text)
    print(f"wrote {out / 'table.md'}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    run(main, Config)
