"""The held-out gold score, and the final comparison table of `make demo`.

    python -m nanorlhf.evaluate      # SFT vs SFT best-of-4 (reranked by the RM) vs PPO on held-out prompts

Each policy samples one response per prompt at the same temperature. For each we report the mean gold score
(the scripted labeler's judgment: the quantity RLHF is meant to raise) with its standard error, and the mean RM
score (the proxy PPO optimises). KL(PPO || SFT) is the mean over PPO's samples of sum_t log pi_PPO(y_t) - log
pi_SFT(y_t), an unbiased estimate of the KL between the two response distributions.
"""

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanorlhf import checkpoint, cpu, tasks
from nanorlhf.config import (UserError, at_least, check_room, check_writable, file_name, finite, positive, require,
                             run, seed_range)
from nanorlhf.data import load_prompts, write_text
from nanorlhf.model import GPT, ScalarModel
from nanorlhf.reward import score_texts
from nanorlhf.rollout import as_response, rollouts, sample_responses


def mean_stderr(xs):
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / max(1, n - 1)
    return m, math.sqrt(var / n)


def gold(prompt, text, ended):
    """The gold score of a sample; a response that never produced <|endoftext|> did not finish and scores 0."""
    return tasks.gold_score(prompt, text) if ended else 0.0


def gold_eval(model, prompts, max_new_tokens, temperature=1.0, batch_size=64, seed=0):
    """Mean gold score and its standard error of sampled responses on prompts of the built-in task."""
    prompts = [p for p in prompts if tasks.is_task_prompt(p)]
    if not prompts:
        return None
    g = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    samples = sample_responses(model, prompts, max_new_tokens, temperature, batch_size, g)
    return mean_stderr([gold(p, t, e) for p, (t, e) in zip(prompts, samples)])


# ------------------------------------------------------------------------------------------------------------------
# The final table

@dataclass
class EvalConfig:
    """Compare SFT, SFT best-of-n reranked by the RM, and PPO on held-out prompts of the built-in task."""

    sft: str = "out/sft.pt"
    """SFT checkpoint"""
    rm: str = "out/rm.pt"
    """reward model checkpoint (scores, and picks the best of n)"""
    ppo: str = "out/ppo.pt"
    """PPO checkpoint"""
    prompts: str = "data/prompts_eval.jsonl"
    """held-out prompts"""
    n: int = 500
    """prompts evaluated"""
    best_of: int = 4
    """samples the RM chooses among for best-of-n"""
    temperature: float = 1.0
    """sampling temperature (the one PPO trained at)"""
    max_new_tokens: int = 16
    """longest response"""
    no_eos_penalty: float = -5.0
    """RM score of a response without <|endoftext|> (as in train_ppo.py)"""
    out: str = "out/eval.md"
    """where the table goes (and a .json beside it)"""
    seed: int = 1234
    """sampling seed"""

    def __post_init__(self):  # ranges of the flags, checked whenever an EvalConfig is made (nanorlhf/config.py)
        finite(self)
        file_name(self, "sft", "rm", "ppo", "prompts", "out")
        require(Path(self.out).suffix != ".json", f"--out must not end in .json (the .json goes beside it), got "
                                                   f"{self.out!r}")
        at_least(self, 1, "n", "best_of", "max_new_tokens")
        positive(self, "temperature")  # the KL to SFT is a difference of log-probs at this temperature
        seed_range(self)


def main(cfg: EvalConfig):
    t0 = time.time()
    for path in (cfg.out, Path(cfg.out).with_suffix(".json")):
        check_writable(path, "--out")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu.keep_freed_memory(device)  # CPU: reuse freed buffers instead of page-faulting fresh ones (nanorlhf/cpu.py)
    models = {}
    for name, path, made_by, kind in (("sft", cfg.sft, "train_sft.py", "sft"), ("ppo", cfg.ppo, "train_ppo.py", "ppo")):
        ckpt = checkpoint.load(path, made_by=made_by, kind=kind)
        models[name] = GPT(checkpoint.model_config(ckpt)).to(device).eval()
        models[name].load_state_dict(ckpt["model"])
        check_room(cfg.max_new_tokens, models[name].config.block_size, path)
    same = [replace(models[n].config, dropout=0.0) for n in ("ppo", "sft")]  # PPO drops SFT's dropout
    if same[0] != same[1]:  # the KL to SFT compares the two on the same tokens
        raise UserError(f"the PPO policy ({cfg.ppo}: {models['ppo'].config}) does not match the SFT model "
                        f"({cfg.sft}: {models['sft'].config}); evaluate the PPO run of this SFT checkpoint")
    rm_ckpt = checkpoint.load(cfg.rm, made_by="train_rm.py", kind="rm")
    rm = ScalarModel(checkpoint.model_config(rm_ckpt)).to(device).eval()
    rm.load_state_dict(rm_ckpt["model"])
    prompts = [p for p in load_prompts(cfg.prompts) if tasks.is_task_prompt(p)][:cfg.n]
    if not prompts:
        raise UserError(f"{cfg.prompts}: none of its prompts is one of the built-in task's (the gold score needs "
                        f"them)")
    g = torch.Generator(device=device).manual_seed(cfg.seed)

    def rm_scores(samples, prompts_):
        s = score_texts(rm, prompts_, [as_response(t, e) for t, e, _ in samples])
        return [x if e else cfg.no_eos_penalty for x, (_, e, _) in zip(s.tolist(), samples)]

    rows = {}
    sft = rollouts(models["sft"], prompts, cfg.max_new_tokens, cfg.temperature, generator=g)
    rows["SFT"] = ([gold(p, t, e) for p, (t, e, _) in zip(prompts, sft)], rm_scores(sft, prompts), None)
    many = rollouts(models["sft"], [p for p in prompts for _ in range(cfg.best_of)], cfg.max_new_tokens,
                    cfg.temperature, generator=g)
    many_rm = rm_scores(many, [p for p in prompts for _ in range(cfg.best_of)])
    best_gold, best_rm = [], []
    for i, p in enumerate(prompts):
        j = max(range(cfg.best_of), key=lambda k: many_rm[i * cfg.best_of + k])
        t, e, _ = many[i * cfg.best_of + j]
        best_gold.append(gold(p, t, e))
        best_rm.append(many_rm[i * cfg.best_of + j])
    rows[f"SFT best-of-{cfg.best_of} (RM)"] = (best_gold, best_rm, None)
    ppo = rollouts(models["ppo"], prompts, cfg.max_new_tokens, cfg.temperature, generator=g, ref=models["sft"])
    rows["PPO"] = ([gold(p, t, e) for p, (t, e, _) in zip(prompts, ppo)], rm_scores(ppo, prompts),
                   sum(k for _, _, k in ppo) / len(ppo))

    lines = [f"Held-out evaluation: {len(prompts)} prompts, temperature {cfg.temperature}, "
             f"one sample per prompt ({time.time() - t0:.0f} s)", "",
             "| policy | gold score (mean ± s.e.) | RM score | KL to SFT (nats) |", "|---|---|---|---|"]
    summary = {}
    for name, (golds, rms, kl) in rows.items():
        m, se = mean_stderr(golds)
        summary[name] = dict(gold=m, gold_se=se, rm=sum(rms) / len(rms), kl=kl)
        lines.append(f"| {name} | {m:.3f} ± {se:.3f} | {sum(rms) / len(rms):+.3f} | "
                     f"{'' if kl is None else f'{kl:.2f}'} |")
    # The PPO - SFT gain, with its standard error (independent samples: the errors add in quadrature).
    (g_sft, se_sft), (g_ppo, se_ppo) = mean_stderr(rows["SFT"][0]), mean_stderr(rows["PPO"][0])
    gain, se_gain = g_ppo - g_sft, math.sqrt(se_sft ** 2 + se_ppo ** 2)
    lines += ["", f"PPO - SFT gold score: {gain:+.3f} ± {se_gain:.3f} ({gain / max(se_gain, 1e-12):.1f} standard errors)"]
    summary["gain"], summary["gain_se"] = gain, se_gain
    text = "\n".join(lines)
    print(text)
    write_text(Path(cfg.out).with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    write_text(cfg.out, text + "\n")


if __name__ == "__main__":
    run(main, EvalConfig)
