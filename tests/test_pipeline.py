"""Tiny end-to-end runs of train_rm.py, train_ppo.py and the final evaluation (seconds, not minutes)."""

import json

import pytest
import torch

from conftest import run
from nanorlhf import checkpoint
from nanorlhf.model import GPTConfig, ScalarModel


@pytest.fixture(scope="module")
def rm_run(workdir):
    return run("train_rm.py", "--n_prompts", 16, "--n_eval", 8, "--k", 3, "--max_new_tokens", 6,
               "--n_normalize", 8, "--batch_size", 4, cwd=workdir)


def test_train_rm(workdir, rm_run):
    assert rm_run.returncode == 0, rm_run.stderr[-3000:]
    assert "pairwise accuracy vs the labels: train" in rm_run.stdout and "ceiling" in rm_run.stdout
    ckpt = torch.load(workdir / "out" / "rm.pt", weights_only=False)
    assert ckpt["kind"] == "rm" and ckpt["model_config"]["n_embd"] == 16
    rankings = [json.loads(line) for line in open(workdir / "out" / "rankings_train.jsonl")]
    assert len(rankings) == 16 and all(len(r["responses"]) == 3 for r in rankings)


def test_train_ppo_and_evaluate(workdir, rm_run):
    assert rm_run.returncode == 0, rm_run.stderr[-3000:]
    ppo = run("train_ppo.py", "--iters", 2, "--batch_size", 8, "--minibatch_size", 4, "--ppo_epochs", 2,
              "--max_new_tokens", 6, "--eval_interval", 2, "--eval_n", 8, "--ptx_coef", 0.1, "--ent_coef", 0.01,
              "--lr", 2e-4, "--anneal_lr", "true",
              cwd=workdir)  # the entropy bonus path here; tests/test_resume.py runs the default (no bonus)
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    ckpt = torch.load(workdir / "out" / "ppo.pt", weights_only=False)
    assert ckpt["kind"] == "ppo" and len(ckpt["history"]) == 2
    assert [h["lr"] for h in ckpt["history"]] == pytest.approx([2e-4, 1e-4])  # annealed linearly towards 0
    rm = torch.load(workdir / "out" / "rm.pt", weights_only=False)["model"]
    value = ckpt["value"]  # starts as the RM; by default its token embeddings stay frozen, the rest trains
    assert torch.equal(value["gpt.transformer.wte.weight"], rm["gpt.transformer.wte.weight"])
    assert not torch.equal(value["gpt.transformer.h.0.mlp.c_fc.weight"], rm["gpt.transformer.h.0.mlp.c_fc.weight"])
    last = ckpt["history"][-1]
    for key in ("score", "kl", "beta", "entropy", "clip_frac", "approx_kl", "vf_loss", "explained_var",
                "resp_len", "no_eos", "gold", "time_s", "tokens_per_s"):
        assert key in last and last[key] == last[key], key  # present and not NaN
    ev = run("nanorlhf.evaluate", "--n", 8, "--max_new_tokens", 6, cwd=workdir)
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads((workdir / "out" / "eval.json").read_text())
    assert set(summary) >= {"SFT", "SFT best-of-4 (RM)", "PPO", "gain"}
    assert "| PPO |" in (workdir / "out" / "eval.md").read_text()


def test_value_embeddings_train_when_asked(workdir, rm_run, tmp_path):
    assert rm_run.returncode == 0, rm_run.stderr[-3000:]
    r = run("train_ppo.py", "--iters", 1, "--batch_size", 8, "--minibatch_size", 4, "--max_new_tokens", 6,
            "--eval_n", 0, "--value_embeddings", "true", "--out", tmp_path / "ppo.pt", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    value = torch.load(tmp_path / "ppo.pt", weights_only=False)["value"]
    rm = torch.load(workdir / "out" / "rm.pt", weights_only=False)["model"]
    assert not torch.equal(value["gpt.transformer.wte.weight"], rm["gpt.transformer.wte.weight"])


def test_mismatched_rm_is_refused(workdir, rm_run, tmp_path):
    other = GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=32)
    checkpoint.save(tmp_path / "rm.pt", ScalarModel(other), kind="rm")
    r = run("train_ppo.py", "--rm", tmp_path / "rm.pt", "--iters", 1, cwd=workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "does not match the policy's" in r.stderr and "n_embd=32" in r.stderr and "n_embd=16" in r.stderr


def test_nan_stops_with_the_iteration_and_saves_nothing(workdir, rm_run, tmp_path):
    out = tmp_path / "ppo.pt"
    r = run("train_ppo.py", "--lr", 1e30, "--grad_clip", 0, "--iters", 2, "--batch_size", 8, "--minibatch_size", 2,
            "--ppo_epochs", 2, "--max_new_tokens", 4, "--eval_n", 0, "--out", out, cwd=workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not finite at iteration 0" in r.stderr
    assert not out.exists()
