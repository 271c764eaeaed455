import json

import pytest
import torch

from conftest import TINY, run
from nanorlhf import checkpoint, compare
from nanorlhf.config import UserError
from nanorlhf.data import write_jsonl
from nanorlhf.model import ScalarModel


def test_settings_are_checked():
    assert compare.numbers(compare.Config(bon="1,4"), "bon") == [1, 4]
    assert compare.estimators(compare.Config(rl_estimators="gae, drgrpo")) == ["gae", "drgrpo"]
    for field, bad in (("bon", "0"), ("bon", "2.5"), ("ppo_betas", "-1"), ("dpo_betas", "a"), ("rl_estimators", "ppo"),
                       ("samples_per_prompt", 1)):
        with pytest.raises(UserError, match=f"--{field} must be"):
            compare.Config(**{field: bad})


def test_compare_end_to_end(workdir, tmp_path):
    torch.manual_seed(3)
    checkpoint.save(tmp_path / "rm.pt", ScalarModel(TINY), kind="rm")
    write_jsonl(tmp_path / "rankings.jsonl", [{"prompt": f"Sort: {a} {b}\nAnswer:",
                                               "responses": [f" {min(a, b)} {max(a, b)}", f" {a}", f" {b} {b}"]}
                                              for a, b in ((3, 1), (2, 5), (7, 4), (9, 0))])
    r = run("nanorlhf.compare", "--rm", tmp_path / "rm.pt", "--rankings", tmp_path / "rankings.jsonl", "--n", 6,
            "--bon", "1,2,4", "--ppo_betas", "0.1", "--dpo_betas", "0.1", "--max_new_tokens", 4,
            "--rl_estimators", "gae,rloo", "--samples_per_prompt", 2,
            "--ppo_args", "--iters 1 --batch_size 4 --minibatch_size 2 --eval_n 0",
            "--dpo_args", "--batch_size 4 --eval_n 0 --eval_data ''", "--out", tmp_path / "cmp", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "cmp" / "table.json").read_text())
    assert [(x["method"], x["setting"]) for x in rows] == [("best-of-N", "N = 1"), ("best-of-N", "N = 2"),
                                                            ("best-of-N", "N = 4"), ("PPO", "β = 0.1"),
                                                            ("RLOO", "β = 0.1, k = 2"), ("DPO", "β = 0.1")]
    assert rows[0]["kl"] == 0.0 and rows[3]["tokens"] > 0 and all(x["wall_s"] > 0 for x in rows)
    # the same sample budget for every RL run: 1 iteration x 4 responses, PPO's of 4 prompts, RLOO's of 2 x k = 2
    assert [(x["iters"], x["batch_size"], x["k"]) for x in rows[3:5]] == [(1, 4, 1), (1, 4, 2)]
    assert rows[3]["tokens"] > 0 and rows[4]["tokens"] > 0
    text = (tmp_path / "cmp" / "table.md").read_text()
    assert "Each method at its best gold" in text and "| RLOO | β = 0.1, k = 2 |" in text
    assert ("Every RL run samples as many responses: --iters 1 x --batch_size 4 = 4 (per iteration PPO 4 prompts x 1, "
            "RLOO 2 prompts x 2).") in text
    assert "value" in torch.load(tmp_path / "cmp" / "ppo_beta0.1.pt", weights_only=False)
    assert "value" not in torch.load(tmp_path / "cmp" / "rloo_beta0.1.pt", weights_only=False)
    assert (tmp_path / "cmp" / "frontier.png").stat().st_size > 0
    # a second comparison (one more PPO beta) with the first one's points: one table and plot of all seven
    r = run("nanorlhf.compare", "--rm", tmp_path / "rm.pt", "--rankings", tmp_path / "rankings.jsonl", "--n", 6,
            "--bon", "", "--ppo_betas", "0.5", "--dpo_betas", "", "--rl_estimators", "gae", "--max_new_tokens", 4,
            "--ppo_args", "--iters 1 --batch_size 4 --minibatch_size 2 --eval_n 0",
            "--include", tmp_path / "cmp" / "table.json", "--out", tmp_path / "more", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    more = json.loads((tmp_path / "more" / "table.json").read_text())
    assert more[:6] == rows and [(x["method"], x["setting"]) for x in more[6:]] == [("PPO", "β = 0.5")]
    assert "| PPO | β = 0.5 |" in (tmp_path / "more" / "table.md").read_text()


def test_the_budget_line_says_when_rl_runs_sampled_unequally():
    rows = [dict(method="best-of-N", setting="N = 4"), dict(method="PPO", setting="β = 1", iters=2, batch_size=8, k=1),
            dict(method="GRPO", setting="β = 1, k = 4", iters=3, batch_size=8, k=4)]
    assert compare.budget_line(rows) == ("RL runs of unequal sample budgets: PPO β = 1: --iters 2 x --batch_size 8, "
                                         "GRPO β = 1, k = 4: --iters 3 x --batch_size 8.")
    assert compare.budget_line(rows[:1]) == ""  # no RL run
