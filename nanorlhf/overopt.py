"""The over-optimisation curve (Gao, Schulman & Hilton 2022): gold and proxy (RM) score against the distance
d = sqrt(KL(pi || pi_SFT)) that a policy moved from SFT, for best-of-n sampling and for PPO along its run.

    python -m nanorlhf.overopt                                   # out/sft.pt, out/rm.pt, out/ppo.pt -> out/overopt.*
    python -m nanorlhf.overopt --ppo out/ppo.pt,runs/online/ppo.pt --labels offline,online

Best-of-n: N samples of SFT per held-out prompt, ranked by the RM. The expected gold (and proxy) score of the best
of n is estimated without bias from all subsets of size n of the N samples: with the samples sorted by RM score,
the i-th lowest (i = 1..N) is the best of a random n-subset with probability C(i-1, n-1) / C(N, n). Its KL from
SFT is known in closed form (Stiennon et al. 2020, appendix; Gao et al. eq. 3):

    KL_bon = log n - (n - 1) / n

PPO: the held-out gold scores its run logged (metrics.jsonl, every eval_interval iterations) against the KL of that
iteration's rollouts (sum over a response of log pi - log pi_SFT, the run's own estimate), and the RM's mean score
on those rollouts as the proxy. Or, with --endpoints, the last policies of runs at different fixed beta, one point
each: here PPO's KL reaches its level within a few iterations and gold then rises at that KL, so one run does not
trace the curve, while runs at many beta do (Gao et al. found the KL penalty to act much like early stopping).

    python -m nanorlhf.overopt --ppo "" --endpoints runs/b0.01.pt,runs/b0.05.pt,runs/b0.2.pt,runs/b1.pt

Gao et al.'s functional forms, fitted by least squares to R(d) - R(0) (both are linear in alpha and beta):

    best-of-n   R(d) = d (alpha - beta d)
    RL          R(d) = d (alpha - beta log d)

Writes OUT.png (matplotlib) and OUT.md: the measured points, the fitted coefficients and each fit's R^2.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from nanorlhf import checkpoint, cpu, tasks
from nanorlhf.config import UserError, at_least, check_writable, positive, run, seed_range
from nanorlhf.data import load_prompts
from nanorlhf.evaluate import gold, mean_stderr
from nanorlhf.metrics import read_metrics
from nanorlhf.model import GPT, ScalarModel
from nanorlhf.reward import score_texts
from nanorlhf.rollout import as_response, rollouts
from nanorlhf.tokenizer import encode


@dataclass
class Config:
    """Gold and RM score against sqrt(KL) for best-of-n and for PPO runs, with Gao et al.'s fitted forms."""

    sft: str = "out/sft.pt"
    """SFT checkpoint: best-of-n samples from it; d = 0"""
    rm: str = "out/rm.pt"
    """reward model checkpoint: the proxy score, and the ranking for best-of-n"""
    ppo: str = "out/ppo.pt"
    """PPO checkpoints, comma-separated; each one's run metrics (out/ppo.pt -> out/ppo/metrics.jsonl) give a curve"""
    labels: str = ""
    """names of the PPO curves, comma-separated ("" = the checkpoints' paths)"""
    endpoints: str = ""
    """PPO checkpoints of runs that differ in their fixed beta, comma-separated: each final policy is one point of a
    single curve (one sample per held-out prompt of --prompts), the RL form fitted across them"""
    prompts: str = "data/prompts_eval.jsonl"
    """held-out prompts of the built-in task"""
    n_prompts: int = 200
    """prompts for best-of-n"""
    max_n: int = 64
    """samples per prompt: best-of-n for n = 1, 2, 4, ... up to max_n"""
    max_new_tokens: int = 16
    """longest sampled response"""
    temperature: float = 1.0
    """sampling temperature (PPO's)"""
    no_eos_penalty: float = -5.0
    """RM score of a response without <|endoftext|> (as in train_ppo.py)"""
    out: str = "out/overopt"
    """where OUT.png and OUT.md go"""
    seed: int = 0
    """sampling seed"""

    def __post_init__(self):  # ranges of the flags, checked whenever a Config is made (nanorlhf/config.py)
        at_least(self, 1, "n_prompts", "max_new_tokens", "max_n")
        positive(self, "temperature")
        seed_range(self)


def bon_kl(n: int) -> float:
    """KL(best-of-n || base) in nats: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def best_of_n(rm_scores, values, n):
    """Expected value of the response the RM ranks best among n drawn without replacement from N, averaged over
    prompts. rm_scores, values: (P, N) -> float. Unbiased over all C(N, n) subsets (module docstring)."""
    P, N = rm_scores.shape
    order = rm_scores.argsort(dim=1)  # (P, N): lowest RM score first
    ranked = values.gather(1, order)  # (P, N)
    i = torch.arange(1, N + 1, dtype=torch.float64)  # rank from the lowest
    weight = torch.exp(torch.lgamma(i) - torch.lgamma(i - n + 1) - torch.lgamma(torch.tensor(float(n)))
                       - (math.lgamma(N + 1) - math.lgamma(n + 1) - math.lgamma(N - n + 1)))  # C(i-1,n-1)/C(N,n)
    weight = torch.where(i >= n, weight, torch.zeros_like(weight))  # (N,)
    return float((ranked.double() * weight).sum(1).mean())


def fit(d, r, form):
    """Least squares of r = d (alpha - beta * g(d)), g = d (best-of-n) or log d (RL), through r(0) = 0.
    Returns alpha, beta and R^2."""
    d, r = torch.tensor(d, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
    g = d if form == "bon" else torch.log(d.clamp(min=1e-12))
    X = torch.stack([d, -d * g], dim=1)  # (M, 2): r = alpha * d - beta * d g(d)
    coef = torch.linalg.lstsq(X, r[:, None]).solution.squeeze(1)  # (2,)
    resid = r - X @ coef
    total = ((r - r.mean()) ** 2).sum()
    r2 = 1 - float((resid ** 2).sum() / total) if total > 0 else float("nan")
    return float(coef[0]), float(coef[1]), r2


def sft_samples(cfg, sft, rm, prompts, n, device):
    """n samples of the SFT model per prompt (seed cfg.seed), scored: the RM's scores and the gold scores, (P, n)
    tensors each (a response without <|endoftext|> scores cfg.no_eos_penalty, as in PPO), and the tokens sampled
    (each sample's prompt and response). cfg: any config with max_new_tokens, temperature, no_eos_penalty, seed."""
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    flat = [p for p in prompts for _ in range(n)]
    samples = rollouts(sft, flat, cfg.max_new_tokens, cfg.temperature, batch_size=128, generator=g)
    scores = score_texts(rm, flat, [as_response(t, e) for t, e, _ in samples]).tolist()
    proxy = torch.tensor([s if e else cfg.no_eos_penalty for s, (_, e, _) in zip(scores, samples)])
    golds = torch.tensor([gold(p, t, e) for p, (t, e, _) in zip(flat, samples)])
    tokens = sum(len(encode(p)) + len(encode(t)) + e for p, (t, e, _) in zip(flat, samples))  # + <|endoftext|>
    return proxy.view(len(prompts), n), golds.view(len(prompts), n), tokens


def bon_curve(cfg, sft, rm, prompts, device):
    """[(n, KL, gold, proxy)] for n = 1, 2, 4, ..., max_n, from max_n samples of each prompt."""
    proxy, golds, _ = sft_samples(cfg, sft, rm, prompts, cfg.max_n, device)  # (P, N) each
    ns = [2 ** k for k in range(int(math.log2(cfg.max_n)) + 1)]
    return [(n, bon_kl(n), best_of_n(proxy, golds, n), best_of_n(proxy, proxy, n)) for n in ns]


def ppo_curve(path):
    """[("iteration i", KL, gold, proxy)] at the iterations a PPO run evaluated its held-out gold score."""
    records = read_metrics(Path(path).with_suffix(""))
    points = [(f"iteration {r['step']}", r["kl"], r["gold"], r["score"]) for r in records if "gold" in r and "kl" in r]
    if not points:
        raise UserError(f"{Path(path).with_suffix('')}/metrics.jsonl: no iteration with a held-out gold score")
    return points


def load_gpt(path, made_by, kind):
    """A GPT checkpoint's policy, in eval mode, and the config of the run that trained it."""
    ckpt = checkpoint.load(path, made_by=made_by, kind=kind)
    model = GPT(checkpoint.model_config(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt.get("train_config", {})


def evaluate_policy(cfg, policy, sft, rm, prompts, device):
    """One sample per prompt: gold mean and s.e., RM score, KL to SFT (nats per response)."""
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    samples = rollouts(policy, prompts, cfg.max_new_tokens, cfg.temperature, generator=g, ref=sft)
    scores = score_texts(rm, prompts, [as_response(t, e) for t, e, _ in samples]).tolist()
    rm_scores = [s if e else cfg.no_eos_penalty for s, (_, e, _) in zip(scores, samples)]
    m, se = mean_stderr([gold(p, t, e) for p, (t, e, _) in zip(prompts, samples)])
    return dict(gold=m, gold_se=se, rm=sum(rm_scores) / len(rm_scores), kl=sum(k for *_, k in samples) / len(samples))


def load_models(cfg, device):
    """The SFT policy and the reward model, in eval mode."""
    sft = load_gpt(cfg.sft, "train_sft.py", "sft")[0].to(device)
    rm_ckpt = checkpoint.load(cfg.rm, made_by="train_rm.py", kind="rm")
    rm = ScalarModel(checkpoint.model_config(rm_ckpt)).to(device).eval()
    rm.load_state_dict(rm_ckpt["model"])
    return sft, rm


def table(bon, runs, base_gold, base_proxy):
    """The markdown report: points and fits."""
    lines = ["| curve | point | KL (nats) | d = sqrt(KL) | gold | proxy (RM) |", "|---|---|---|---|---|---|"]
    lines += [f"| best-of-n | n = {n} | {kl:.3f} | {math.sqrt(kl):.3f} | {g:.3f} | {p:+.3f} |" for n, kl, g, p in bon]
    for label, pts in runs.items():
        lines += [f"| {label} | {point} | {kl:.3f} | {math.sqrt(max(kl, 0)):.3f} | {g:.3f} | {p:+.3f} |"
                  for point, kl, g, p in pts]
    lines += ["", "Fits to the gain over SFT (gold - gold_SFT, proxy - proxy_SFT), d > 0:", "",
              "| curve | score | form | alpha | beta | R^2 |", "|---|---|---|---|---|---|"]
    curves = {"best-of-n": ("bon", [(kl, g, p) for _, kl, g, p in bon[1:]])}
    curves.update({label: ("rl", [(kl, g, p) for _, kl, g, p in pts if kl > 0]) for label, pts in runs.items()})
    fits = {}
    for label, (form, pts) in curves.items():
        d = [math.sqrt(kl) for kl, _, _ in pts]
        for name, base, col in (("gold", base_gold, 1), ("proxy", base_proxy, 2)):
            if len(pts) < 3:
                continue  # two coefficients need more than two points to say anything
            a, b, r2 = fit(d, [p[col] - base for p in pts], form)
            fits[label, name] = (form, a, b)
            shape = "d (α − β d)" if form == "bon" else "d (α − β log d)"
            lines.append(f"| {label} | {name} | {shape} | {a:.4f} | {b:.4f} | {r2:.3f} |")
    return "\n".join(lines), fits


def draw(path, bon, runs, fits, base_gold, base_proxy):
    """gold (solid) and proxy (dashed) against d, each curve's points and its fitted form."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no PNG, the table only")
        return None
    fig, (ax_g, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = {"best-of-n": [(kl, g, p) for _, kl, g, p in bon]}
    curves.update({label: [(kl, g, p) for _, kl, g, p in pts] for label, pts in runs.items()})
    for k, (label, pts) in enumerate(curves.items()):
        color = f"C{k}"
        d = [math.sqrt(max(kl, 0)) for kl, _, _ in pts]
        for ax, col, name, base in ((ax_g, 1, "gold", base_gold), (ax_p, 2, "proxy", base_proxy)):
            ax.plot(d, [p[col] for p in pts], "o", color=color, label=label)
            if (label, name) in fits:
                form, a, b = fits[label, name]
                xs = torch.linspace(max(1e-3, min(d)), max(d) * 1.1, 100)
                ys = xs * (a - b * (xs if form == "bon" else torch.log(xs))) + base
                ax.plot(xs, ys, "-", color=color, alpha=0.6)
    for ax, name in ((ax_g, "gold score (held-out)"), (ax_p, "RM score (proxy)")):
        ax.set_xlabel("d = sqrt(KL(π ‖ π_SFT)), nats^½")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Over-optimisation: points measured, lines Gao et al.'s fitted forms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(cfg: Config):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu.keep_freed_memory(device)
    paths = [p for p in cfg.ppo.split(",") if p]
    labels = [x for x in cfg.labels.split(",") if x] or paths
    if len(labels) != len(paths):
        raise UserError(f"--labels names {len(labels)} curves, --ppo {len(paths)}")
    check_writable(Path(cfg.out).with_suffix(".md"), "--out")
    runs = {label: ppo_curve(p) for label, p in zip(labels, paths)}  # read first: a bad path fails fast
    ends = [load_gpt(p, "train_ppo.py", "ppo") for p in cfg.endpoints.split(",") if p]
    every = [p for p in load_prompts(cfg.prompts) if tasks.is_task_prompt(p)]
    prompts = every[:cfg.n_prompts]
    if not prompts:
        raise UserError(f"{cfg.prompts}: no prompt of the built-in task (the gold score exists only for those)")
    sft, rm = load_models(cfg, device)
    bon = bon_curve(cfg, sft, rm, prompts, device)
    if ends:  # each run's last policy: one curve across runs instead of along one, in the order of their KL
        points = []
        for policy, tc in ends:
            r = evaluate_policy(cfg, policy.to(device), sft, rm, every, device)
            beta = f"beta = {tc.get('init_kl_coef', float('nan')):g}" + (" (adaptive)" if tc.get("adaptive_kl") else "")
            points.append((beta, r["kl"], r["gold"], r["rm"]))
        runs["PPO, one run per beta"] = sorted(points, key=lambda x: x[1])
    base_gold, base_proxy = bon[0][2], bon[0][3]  # n = 1: SFT itself
    text, fits = table(bon, runs, base_gold, base_proxy)
    header = (f"Over-optimisation: best-of-n on {len(prompts)} held-out prompts x {cfg.max_n} SFT samples"
              + ("; PPO from its runs' held-out evaluations" if paths else "")
              + (f"; PPO's endpoints on {len(every)} held-out prompts, one sample each" if ends else "") + ".\n\n")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(header + text + "\n")
    png = draw(out.with_suffix(".png"), bon, runs, fits, base_gold, base_proxy)
    print(header + text)
    print(f"wrote {out.with_suffix('.md')}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    run(main, Config)
