import json
import math

import pytest
import torch

from conftest import run
from nanorlhf import dpo
from nanorlhf.data import write_jsonl
from nanorlhf.model import GPT, GPTConfig


def test_dpo_loss_by_hand():
    # Pair 1: the policy raised y_w by 1 nat and lowered y_l by 1 over the reference: margin beta * 2.
    # Pair 2: the reverse: margin -beta * 2.
    logp_w, ref_w = torch.tensor([-2.0, -4.0]), torch.tensor([-3.0, -3.0])
    logp_l, ref_l = torch.tensor([-4.0, -2.0]), torch.tensor([-3.0, -3.0])
    beta = 0.1
    loss, acc = dpo.dpo_loss(logp_w, logp_l, ref_w, ref_l, beta)
    expected = (-math.log(1 / (1 + math.exp(-0.2))) - math.log(1 / (1 + math.exp(0.2)))) / 2
    assert loss.item() == pytest.approx(expected) and acc.item() == 0.5
    # At the start (pi = pi_ref) every margin is 0 and the loss is log 2.
    loss0, _ = dpo.dpo_loss(ref_w, ref_l, ref_w, ref_l, beta)
    assert loss0.item() == pytest.approx(math.log(2))


def test_implicit_reward_and_its_gradient():
    logp = torch.tensor([-1.0, -5.0], requires_grad=True)
    r = dpo.implicit_reward(logp, torch.tensor([-2.0, -2.0]), beta=0.5)
    assert r.tolist() == [0.5, -1.5]
    # d loss / d log pi(y_w) = -beta * sigmoid(-margin): pushes the preferred response up
    loss, _ = dpo.dpo_loss(logp[:1], logp[1:], torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    loss.backward()
    g = -0.5 * (1 / (1 + math.exp(2.0)))
    assert logp.grad.tolist() == pytest.approx([g, -g])


def test_ranking_pairs_leave_out_identical_responses():
    assert dpo.ranking_pairs(["a", "b", "c"]) == [(0, 1), (0, 2), (1, 2)]
    assert dpo.ranking_pairs(["a", "b", "a"]) == [(0, 1), (1, 2)]


def test_a_best_of_k_choice_gives_only_the_pairs_of_the_best():
    assert dpo.ranking_pairs(["a", "b", "c"], choice=True) == [(0, 1), (0, 2)]
    assert dpo.ranking_pairs(["a", "b", "a", "c"], choice=True) == [(0, 1), (0, 3)]
    groups = [("Count: 1 2\nAnswer:", [" 2<|endoftext|>", " 3<|endoftext|>", " 1<|endoftext|>"])]
    examples, pairs = dpo.pair_examples(groups, 32, choice=True)
    assert len(examples) == 3 and pairs == [(0, 1), (0, 2)]


def test_sequence_logprobs_sum_the_response_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).eval()
    examples = [([5, 6, 7, 8], 2), ([9, 10, 11], 1)]  # (tokens, response tokens at the end)
    got = dpo.sequence_logprobs(model, examples, "cpu")
    for b, (toks, n) in enumerate(examples):
        idx = torch.tensor([toks])
        logp = torch.log_softmax(model.lm_logits(model(idx)), -1)[0]  # (T, V)
        want = sum(logp[t - 1, toks[t]].item() for t in range(len(toks) - n, len(toks)))
        assert got[b].item() == pytest.approx(want, abs=1e-4)


def test_pair_examples_encode_each_response_once():
    groups = [("Count: 1 2\nAnswer:", [" 2<|endoftext|>", " 3<|endoftext|>", " 2<|endoftext|>"])]
    examples, pairs = dpo.pair_examples(groups, 32)
    assert len(examples) == 2 and pairs == [(0, 1), (1, 0)]  # (0, 2) is a pair of copies: left out


def test_train_dpo_end_to_end(workdir, tmp_path):
    rankings = [{"prompt": f"Sort: {a} {b}\nAnswer:", "responses": [f" {min(a, b)} {max(a, b)}", f" {a}", f" {b} {b}"]}
                for a, b in ((3, 1), (2, 5), (7, 4), (9, 0), (6, 8), (1, 2))]
    write_jsonl(tmp_path / "train.jsonl", rankings[:4])
    write_jsonl(tmp_path / "eval.jsonl", rankings[4:])
    r = run("train_dpo.py", "--data", tmp_path / "train.jsonl", "--eval_data", tmp_path / "eval.jsonl",
            "--batch_size", 4, "--epochs", 3, "--lr", 1e-3, "--eval_n", 4, "--max_new_tokens", 4,
            "--out", tmp_path / "dpo.pt", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DPO: 12 pairs of 12 responses" in r.stdout and "acc_labels" in r.stdout and "gold" in r.stdout
    ckpt = torch.load(tmp_path / "dpo.pt", weights_only=False)
    sft = torch.load(workdir / "out" / "sft.pt", weights_only=False)
    assert ckpt["kind"] == "dpo" and not torch.equal(ckpt["model"]["lm_head.weight"], sft["model"]["lm_head.weight"])
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "dpo" / "metrics.jsonl") if "loss" in line]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and losses[-1] < losses[0]  # starts at log 2 (pi = ref)


def test_train_dpo_on_best_of_k_choices(workdir, tmp_path):
    """A choice {"prompt", "responses", "best": i} gives DPO the pairs (best, other), K - 1 of them: 4 x 2 here."""
    choices = [{"prompt": f"Sort: {a} {b}\nAnswer:", "responses": [f" {a}", f" {min(a, b)} {max(a, b)}", f" {b} {b}"],
                "best": 1} for a, b in ((3, 1), (2, 5), (7, 4), (9, 0), (6, 8), (1, 2))]
    write_jsonl(tmp_path / "train.jsonl", choices[:4])
    write_jsonl(tmp_path / "eval.jsonl", choices[4:])
    r = run("train_dpo.py", "--data", tmp_path / "train.jsonl", "--eval_data", tmp_path / "eval.jsonl",
            "--batch_size", 4, "--epochs", 1, "--eval_n", 0, "--max_new_tokens", 4, "--out", tmp_path / "dpo.pt",
            cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DPO: 8 pairs of 12 responses" in r.stdout
