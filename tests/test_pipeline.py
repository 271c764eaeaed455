"""Tiny end-to-end runs of train_rm.py, train_ppo.py and the final evaluation (seconds, not minutes)."""

import json
from dataclasses import replace

import pytest
import torch

from conftest import TINY, load_script, run
from nanorlhf import checkpoint, evaluate
from nanorlhf.data import load_demonstrations
from nanorlhf.model import GPT, GPTConfig, ScalarModel
from nanorlhf.reward import choice_loss, score_texts


@pytest.fixture(scope="module")
def rm_run(workdir):
    return run("train_rm.py", "--n_prompts", 16, "--n_eval", 8, "--k", 3, "--max_new_tokens", 6,
               "--n_normalize", 8, "--batch_size", 4, cwd=workdir)


def test_train_rm(workdir, rm_run):
    assert rm_run.returncode == 0, rm_run.stderr[-3000:]
    assert "pairwise accuracy vs the labels: train" in rm_run.stdout and "ceiling" in rm_run.stdout
    assert "memory per process (estimate): weights " in rm_run.stdout
    # the random SFT model never ends a reply: the score's zero would be set on cut replies, said at once
    assert "warning: 100% of the SFT samples did not end within --max_new_tokens 6" in rm_run.stderr
    ckpt = torch.load(workdir / "out" / "rm.pt", weights_only=False)
    assert ckpt["kind"] == "rm" and ckpt["model_config"]["n_embd"] == 16
    rankings = [json.loads(line) for line in open(workdir / "out" / "rankings_train.jsonl")]
    assert len(rankings) == 16 and all(len(r["responses"]) == 3 for r in rankings)


def test_rm_normalised_on_demonstrations_scores_them_mean_0(workdir, tmp_path):
    # InstructGPT's normalisation: a bias so that the labelers' demonstrations score 0 on average.
    r = run("train_rm.py", "--n_prompts", 8, "--n_eval", 4, "--k", 3, "--max_new_tokens", 6, "--n_normalize", 8,
            "--batch_size", 4, "--epochs", 1, "--norm_demos", "data/sft.jsonl", "--out", tmp_path / "rm.pt",
            cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "normalised: demonstrations' mean score" in r.stdout
    rm = ScalarModel(TINY)
    rm.load_state_dict(torch.load(tmp_path / "rm.pt", weights_only=False)["model"])
    demos = load_demonstrations(workdir / "data" / "sft.jsonl")[:8]
    scores = score_texts(rm.eval(), [p for p, _ in demos], [x for _, x in demos])
    assert abs(scores.mean().item()) < 1e-4 and scores.std().item() > 0
    # online PPO trains this RM further and normalises it again the same way: the demonstrations stay at mean 0
    r = run("train_ppo.py", "--iters", 1, "--batch_size", 8, "--minibatch_size", 4, "--max_new_tokens", 6,
            "--eval_n", 0, "--online_every", 1, "--online_prompts", 6, "--rm", tmp_path / "rm.pt",
            "--out", tmp_path / "ppo.pt", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    rm.load_state_dict(torch.load(tmp_path / "ppo.pt", weights_only=False)["rm"])
    after = score_texts(rm.eval(), [p for p, _ in demos], [x for _, x in demos])
    assert abs(after.mean().item()) < 1e-4 and not torch.allclose(after, scores, atol=1e-3)


def test_train_ppo_and_evaluate(workdir, rm_run):
    assert rm_run.returncode == 0, rm_run.stderr[-3000:]
    ppo = run("train_ppo.py", "--iters", 2, "--batch_size", 8, "--minibatch_size", 4, "--ppo_epochs", 2,
              "--max_new_tokens", 6, "--eval_interval", 2, "--eval_n", 8, "--ptx_coef", 0.1, "--ent_coef", 0.01,
              "--lr", 2e-4, "--anneal_lr", "true",
              cwd=workdir)  # the entropy bonus path here; tests/test_resume.py runs the default (no bonus)
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    assert "memory per process (estimate): weights " in ppo.stdout
    # the random SFT model never ends a reply: every score would be the penalty, said at the first iteration
    assert ppo.stderr.count("warning: 100% of the first rollouts did not end within --max_new_tokens 6: each scores "
                            "--no_eos_penalty -5.0") == 1
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


def write_gpt2_dir(directory, model):
    """model's weights as a Hugging Face GPT-2 directory (config.json, pytorch_model.bin; Conv1D weights (in, out))."""
    directory.mkdir()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    tensors = {k.removeprefix("transformer."): (v.t() if k.endswith(conv1d) else v).contiguous()
               for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(tensors, directory / "pytorch_model.bin")
    c = model.config
    (directory / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_layer=c.n_layer, n_head=c.n_head,
                                                           n_embd=c.n_embd, n_positions=c.block_size,
                                                           vocab_size=c.vocab_size)))


@pytest.mark.parametrize("source", ["checkpoint", "gpt2-dir"])
def test_an_rm_of_another_size_than_the_policy(workdir, rm_run, tmp_path, source):
    """InstructGPT pairs a 6B RM with its 175B policy: train_rm.py --init_from starts the RM from another model (the
    data still sampled from the SFT policy), and train_ppo.py takes it, with a value function of its size."""
    torch.manual_seed(3)
    other = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    if source == "checkpoint":
        init_from = tmp_path / "other.pt"
        checkpoint.save(init_from, other, kind="sft")
    else:
        write_gpt2_dir(init_from := tmp_path / "gpt2-other", other)
    rm = run("train_rm.py", "--init_from", init_from, "--n_prompts", 8, "--n_eval", 4, "--k", 2, "--max_new_tokens", 6,
             "--n_normalize", 4, "--batch_size", 4, "--out", tmp_path / "rm.pt", cwd=workdir)
    assert rm.returncode == 0, rm.stderr[-3000:]
    assert "sampling 2 responses for 8 train prompts" in rm.stdout  # from the SFT policy (its block_size: 48)
    saved = torch.load(tmp_path / "rm.pt", weights_only=False)
    assert saved["model_config"] == dict(vars(other.config))
    assert not torch.equal(saved["model"]["gpt.transformer.h.1.mlp.c_fc.weight"],
                           other.state_dict()["transformer.h.1.mlp.c_fc.weight"])  # trained from there
    ppo = run("train_ppo.py", "--rm", tmp_path / "rm.pt", "--iters", 1, "--batch_size", 4, "--minibatch_size", 2,
              "--max_new_tokens", 4, "--eval_n", 0, "--out", tmp_path / "ppo.pt", cwd=workdir)
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ppo.pt", weights_only=False)
    assert ckpt["model_config"]["n_embd"] == 16 and ckpt["value"]["head.weight"].shape == (1, 32)


def test_an_rm_whose_context_is_shorter_than_the_policys_is_refused(workdir, tmp_path):
    checkpoint.save(tmp_path / "rm.pt", ScalarModel(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)),
                    kind="rm")
    r = run("train_ppo.py", "--rm", tmp_path / "rm.pt", "--iters", 1, cwd=workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: the reward model's context ({tmp_path / 'rm.pt'}: block_size 32) is shorter than the policy's "
        f"(out/sft.pt: 48), so it could not score every rollout")


def test_dropout_of_sft_and_rm_stays_out_of_ppo(workdir, tmp_path):
    """SFT may train with dropout (InstructGPT's does), the RM too; the four RL models run without (the PPO ratio
    is exactly 1 before the first step), and the evaluation still pairs the PPO policy with its SFT model."""
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "sft.pt", GPT(replace(TINY, dropout=0.1)), kind="sft")
    checkpoint.save(tmp_path / "rm.pt", ScalarModel(replace(TINY, dropout=0.1)), kind="rm")
    train_ppo = load_script("train_ppo")
    threads = torch.get_num_threads()
    result = train_ppo.main(train_ppo.Config(
        sft=str(tmp_path / "sft.pt"), rm=str(tmp_path / "rm.pt"), prompts=str(workdir / "data/prompts_train.jsonl"),
        eval_prompts="", out=str(tmp_path / "ppo.pt"), iters=1, batch_size=8, minibatch_size=8, max_new_tokens=6))
    torch.set_num_threads(threads)
    for model in (result["policy"], result["value"]):
        assert model.config.dropout == 0.0
        assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ckpt = torch.load(tmp_path / "ppo.pt", weights_only=False)
    assert ckpt["model_config"]["dropout"] == 0.0
    first = ckpt["history"][0]  # one minibatch, the whole batch: the ratio is 1 up to float rounding
    assert first["clip_frac"] == 0.0 and first["approx_kl"] < 1e-9
    evaluate.main(evaluate.EvalConfig(sft=str(tmp_path / "sft.pt"), rm=str(tmp_path / "rm.pt"),
                                      ppo=str(tmp_path / "ppo.pt"), prompts=str(workdir / "data/prompts_eval.jsonl"),
                                      n=4, best_of=2, max_new_tokens=4, out=str(tmp_path / "eval.md")))
    assert "| PPO |" in (tmp_path / "eval.md").read_text()


@pytest.mark.parametrize("name", ["pretraining.txt", "pretraining.jsonl"])
def test_ppo_ptx_on_plain_text(workdir, rm_run, tmp_path, name):
    text = "The cat sat on the mat, and the dog lay on the rug by the door. " * 8
    path = tmp_path / name
    path.write_text(text if name.endswith(".txt") else json.dumps({"text": text}) + "\n")
    r = run("train_ppo.py", "--ptx_coef", 0.5, "--ptx_data", path, "--iters", 1, "--batch_size", 4,
            "--minibatch_size", 2, "--max_new_tokens", 4, "--eval_n", 0, "--out", tmp_path / "ppo.pt", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    # the LM loss of the random SFT model: about ln(50,257) = 10.8 nats per token
    assert torch.load(tmp_path / "ppo.pt", weights_only=False)["history"][0]["ptx_loss"] == pytest.approx(10.8, abs=1)


def test_nan_stops_with_the_iteration_and_saves_nothing(workdir, rm_run, tmp_path):
    out = tmp_path / "ppo.pt"
    r = run("train_ppo.py", "--lr", 1e30, "--grad_clip", 0, "--iters", 2, "--batch_size", 8, "--minibatch_size", 2,
            "--ppo_epochs", 2, "--max_new_tokens", 4, "--eval_n", 0, "--out", out, cwd=workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not finite at iteration 0" in r.stderr
    assert not out.exists()


def test_rm_on_best_of_k_choices(workdir, tmp_path, monkeypatch):
    """Ziegler et al.'s 4-way choices: the built-in labeler writes {"prompt", "responses", "best"}, and a choices
    file (the built-in one or the user's) trains with the softmax loss over the K, never the ranking loss (which
    would read an order into the unpicked responses)."""
    r = run("train_rm.py", "--labels", "choose", "--n_prompts", 8, "--n_eval", 4, "--k", 4, "--max_new_tokens", 6,
            "--n_normalize", 8, "--batch_size", 4, "--epochs", 1, "--out", tmp_path / "rm.pt", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "rankings_train.jsonl")]
    assert len(records) == 8 and all(len(x["responses"]) == 4 and 0 <= x["best"] < 4 for x in records)
    assert "RM: 8 rankings (24 pairs) to train on" in r.stdout  # K - 1 known pairs per choice, not C(K, 2) = 6
    rm = load_script("train_rm")
    calls = []
    monkeypatch.setattr(rm, "ranking_loss", lambda *a, **k: pytest.fail("the ranking loss on choice data"))
    monkeypatch.setattr(rm, "choice_loss", lambda *a, **k: calls.append(1) or choice_loss(*a, **k))
    cfg = rm.Config(data=str(tmp_path / "rankings_train.jsonl"), eval_data=str(tmp_path / "rankings_eval.jsonl"),
                    sft=str(workdir / "out" / "sft.pt"), out=str(tmp_path / "rm2.pt"), max_new_tokens=6,
                    n_normalize=8, batch_size=4, epochs=1)
    rm.main(cfg)
    assert len(calls) == 2  # 8 choices in steps of 4


def test_online_ppo_labels_the_policys_samples_and_trains_the_rm(workdir, rm_run, tmp_path):
    """Ziegler et al.'s online collection: rounds at iterations 0 and 2 label 6 prompts x K samples of the policy,
    append them to the labels so far, train the RM on them and renormalise it; the run's RM is saved with it."""
    assert rm_run.returncode == 0, rm_run.stderr[-3000:]
    out = tmp_path / "ppo.pt"
    r = run("train_ppo.py", "--iters", 3, "--batch_size", 8, "--minibatch_size", 4, "--max_new_tokens", 6,
            "--eval_n", 4, "--online_every", 2, "--online_prompts", 6, "--out", out, cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "online: 16 labels from" in r.stdout and "2 rounds of 6 prompts x K = 3" in r.stdout
    rows = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert [row.get("online_labels") for row in rows] == [6, None, 12]
    assert [row.get("labels") for row in rows if "labels" in row] == [22, 28]
    labels = [json.loads(line) for line in open(tmp_path / "ppo" / "labels.jsonl")]
    assert len(labels) == 12 and all(len(x["responses"]) == 3 for x in labels)
    policy_prompts = {json.loads(line)["prompt"] for line in open(workdir / "data" / "prompts_train.jsonl")}
    assert {x["prompt"] for x in labels} <= policy_prompts
    ppo, rm = torch.load(out, weights_only=False), torch.load(workdir / "out" / "rm.pt", weights_only=False)
    assert ppo["rm"].keys() == rm["model"].keys()
    assert not torch.equal(ppo["rm"]["gpt.transformer.h.0.attn.c_attn.weight"],
                           rm["model"]["gpt.transformer.h.0.attn.c_attn.weight"])  # the RM learned
    # offline (the default) saves no RM and writes no labels
    r = run("train_ppo.py", "--iters", 1, "--batch_size", 8, "--minibatch_size", 4, "--max_new_tokens", 6,
            "--eval_n", 4, "--out", tmp_path / "off.pt", cwd=workdir)
    assert r.returncode == 0 and "rm" not in torch.load(tmp_path / "off.pt", weights_only=False)
    assert not (tmp_path / "off" / "labels.jsonl").exists()
