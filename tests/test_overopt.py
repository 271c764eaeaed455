import itertools
import json
import math

import pytest
import torch

from conftest import TINY, run
from nanorlhf import checkpoint, overopt
from nanorlhf.model import GPT, ScalarModel


def test_best_of_n_averages_over_every_subset():
    rm = torch.tensor([[0.3, 0.1, 0.2]])  # ranked by the RM: sample 1 < sample 2 < sample 0
    values = torch.tensor([[30.0, 10.0, 20.0]])
    assert overopt.best_of_n(rm, values, 1) == pytest.approx(20.0)  # the mean
    # subsets of 2: {1, 2} -> 20, {1, 0} -> 30, {2, 0} -> 30
    assert overopt.best_of_n(rm, values, 2) == pytest.approx((20 + 30 + 30) / 3)
    assert overopt.best_of_n(rm, values, 3) == pytest.approx(30.0)  # the RM's best of all
    # Brute force on random numbers: every subset of size n of 6 samples, 2 prompts
    g = torch.Generator().manual_seed(0)
    rm, values = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    for n in (2, 3, 5):
        brute = [sum(values[p, max(s, key=lambda i: rm[p, i])] for s in itertools.combinations(range(6), n))
                 / math.comb(6, n) for p in range(2)]
        assert overopt.best_of_n(rm, values, n) == pytest.approx(float(sum(brute) / 2), abs=1e-6)


def test_bon_kl_and_the_fits_recover_their_coefficients():
    assert overopt.bon_kl(1) == 0.0 and overopt.bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    d = [0.3, 0.6, 0.9, 1.2, 1.5]
    a, b, r2 = overopt.fit(d, [x * (0.5 - 0.2 * x) for x in d], "bon")
    assert (a, b, r2) == pytest.approx((0.5, 0.2, 1.0))
    a, b, r2 = overopt.fit(d, [x * (0.4 - 0.1 * math.log(x)) for x in d], "rl")
    assert (a, b, r2) == pytest.approx((0.4, 0.1, 1.0))
    *_, r2_wrong = overopt.fit(d, [1.0, -1.0, 1.0, -1.0, 1.0], "bon")
    assert r2_wrong < 0.5


def test_overopt_end_to_end(workdir, tmp_path):
    torch.manual_seed(2)
    checkpoint.save(tmp_path / "rm.pt", ScalarModel(TINY), kind="rm")
    (tmp_path / "ppo").mkdir()
    records = [{"step": s, "kl": kl, "gold": g, "score": p}
               for s, kl, g, p in ((1, 0.1, 0.05, 0.1), (2, 0.4, 0.1, 0.3), (3, 0.9, 0.12, 0.5), (4, 1.6, 0.1, 0.6))]
    (tmp_path / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = run("nanorlhf.overopt", "--sft", "out/sft.pt", "--rm", tmp_path / "rm.pt", "--ppo", tmp_path / "ppo.pt",
            "--labels", "offline", "--n_prompts", 4, "--max_n", 4, "--max_new_tokens", 4,
            "--out", tmp_path / "curve", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "curve.md").read_text()
    assert report.count("| best-of-n | n = ") == 3 and report.count("| offline | iteration ") == 4
    assert "| offline | gold | d (α − β log d) |" in report and (tmp_path / "curve.png").stat().st_size > 0
    bad = run("nanorlhf.overopt", "--ppo", tmp_path / "nope.pt", cwd=workdir)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "metrics.jsonl" in bad.stderr


def test_overopt_endpoints_fit_one_curve_across_runs(workdir, tmp_path):
    """--endpoints: each run's last policy is one point (its gold, RM score and KL to SFT on the held-out prompts),
    named by its beta, in the order of their KL, fitted with the RL form; --ppo "" draws no run's own curve."""
    torch.manual_seed(3)
    checkpoint.save(tmp_path / "rm.pt", ScalarModel(TINY), kind="rm")
    sft = torch.load(workdir / "out" / "sft.pt", weights_only=False)
    paths = []
    for i, beta in enumerate((0.5, 0.05, 0.2)):
        policy = GPT(TINY)
        policy.load_state_dict(sft["model"])
        with torch.no_grad():  # moved from SFT by a different amount each
            policy.lm_head.weight.add_(torch.randn_like(policy.lm_head.weight) * 0.5 * (3 - i))
        paths.append(tmp_path / f"b{beta}.pt")
        checkpoint.save(paths[-1], policy, kind="ppo", train_config=dict(init_kl_coef=beta, adaptive_kl=False))
    r = run("nanorlhf.overopt", "--sft", "out/sft.pt", "--rm", tmp_path / "rm.pt", "--ppo", "", "--endpoints",
            ",".join(map(str, paths)), "--n_prompts", 4, "--max_n", 4, "--max_new_tokens", 4, "--out",
            tmp_path / "curve", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "curve.md").read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| PPO, one run per beta | beta")]
    assert sorted(row[1] for row in rows) == ["beta = 0.05", "beta = 0.2", "beta = 0.5"]
    kls = [float(row[2]) for row in rows]
    assert kls == sorted(kls) and kls[0] > 0  # in the order of their KL to SFT (the reverse of the flag's order)
    assert [row[1] for row in rows] == ["beta = 0.2", "beta = 0.05", "beta = 0.5"]
    assert "| PPO, one run per beta | gold | d (α − β log d) |" in report and "iteration" not in report
    assert "PPO's endpoints on 20 held-out prompts" in report
