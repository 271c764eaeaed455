"""Online data collection's parts (nanorlhf/online.py); train_ppo.py's online mode runs in test_pipeline.py."""

import contextlib
import random

import pytest
import torch

from conftest import TINY
from nanorlhf import online, tasks
from nanorlhf.model import GPT, ScalarModel
from nanorlhf.optim import adamw
from nanorlhf.reward import accuracy, score_texts


def test_labelled_records_become_the_rms_groups_best_first():
    assert online.as_group({"prompt": "p", "responses": ["a", "b", "c"]}) == ("p", ["a", "b", "c"])
    assert online.as_group({"prompt": "p", "responses": ["a", "b", "c"], "best": 2}) == ("p", ["c", "a", "b"])


@pytest.mark.parametrize("choose", [False, True])
def test_sample_and_label_ranks_k_samples_of_the_policy(choose):
    torch.manual_seed(0)
    policy = GPT(TINY)
    prompts = ["Largest: 3 9\nAnswer:", "Sort: 2 1\nAnswer:"]
    g = torch.Generator().manual_seed(0)
    records = online.sample_and_label(policy, prompts, 3, 0.0, 1.0, 4, random.Random(0), g, choose=choose)
    assert [r["prompt"] for r in records] == prompts and all(len(r["responses"]) == 3 for r in records)
    for r in records:  # noise 0: the labeler's order is the gold order
        gold = [tasks.gold_score(r["prompt"], x) for x in r["responses"]]
        if choose:
            assert gold[r["best"]] == max(gold)
        else:
            assert gold == sorted(gold, reverse=True)


def test_rm_steps_learn_the_labels_and_renormalise_restores_mean_0_std_1():
    """A few RM steps on a consistent preference (the right answer above two wrong ones) make the RM order it; the
    renormalisation then gives the reference samples mean 0 and std 1 again."""
    torch.manual_seed(0)
    rm = ScalarModel(TINY)
    groups = [(f"Largest: {a} {b}\nAnswer:", [f" {max(a, b)}<|endoftext|>", f" {min(a, b)}<|endoftext|>",
                                               " 0 0<|endoftext|>"]) for a in range(1, 9) for b in range(1, 9) if a != b]
    before = accuracy(rm, groups)["acc_labels"][0]
    opt = adamw(rm, 3e-3)
    loss = online.train_rm_steps(rm, opt, groups, 60, 8, random.Random(0), "cpu", contextlib.nullcontext)
    after = accuracy(rm, groups)["acc_labels"][0]
    assert loss > 0 and after > 0.9 and after > before + 0.2
    prompts, responses = [p for p, _ in groups[:20]], [rs[1] for _, rs in groups[:20]]
    online.renormalise(rm, list(zip(prompts, responses)))
    s = score_texts(rm, prompts, responses)
    assert abs(s.mean().item()) < 1e-4 and s.std().item() == pytest.approx(1.0, abs=1e-4)
    assert accuracy(rm, groups)["acc_labels"][0] == after  # a positive gain and a bias keep every order


def test_renormalise_follows_the_rm_runs_norm_demos_and_unit_std():
    """As train_rm.py normalised: with --norm_demos the demonstrations get mean 0 (the samples keep std 1); without
    --unit_std the scale is left alone and only the mean moves."""
    torch.manual_seed(0)
    rm = ScalarModel(TINY)
    with torch.no_grad():
        rm.head.weight.mul_(50.0)  # a spread of scores far from std 1
        rm.head.bias.fill_(3.0)
    norm = [(f"Sort: {a} {b}\nAnswer:", f" {a} {b}<|endoftext|>") for a in range(5) for b in range(5)]
    demos = [(f"Sort: {a} {b}\nAnswer:", f" {min(a, b)} {max(a, b)}<|endoftext|>") for a in range(5) for b in range(4)]
    scores = lambda pairs: score_texts(rm, [p for p, _ in pairs], [r for _, r in pairs])  # noqa: E731
    online.renormalise(rm, norm, demos)
    assert abs(scores(demos).mean().item()) < 1e-4 and abs(scores(norm).mean().item()) > 1e-2
    assert scores(norm).std().item() == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        rm.head.weight.mul_(7.0)
        rm.head.bias.add_(2.0)
    std_before = scores(norm).std().item()
    online.renormalise(rm, norm, unit_std=False)
    assert abs(scores(norm).mean().item()) < 1e-4
    assert scores(norm).std().item() == pytest.approx(std_before, rel=1e-4)


def test_rm_steps_on_choices_use_the_softmax_loss(monkeypatch):
    from nanorlhf import reward
    used = []
    monkeypatch.setattr(reward, "ranking_loss", lambda *a, **k: pytest.fail("ranking loss on choices"))
    real = reward.choice_loss
    monkeypatch.setattr(reward, "choice_loss", lambda *a, **k: used.append(1) or real(*a, **k))
    torch.manual_seed(0)
    rm = ScalarModel(TINY)
    groups = [("Largest: 3 9\nAnswer:", [" 9<|endoftext|>", " 3<|endoftext|>"])] * 4
    online.train_rm_steps(rm, adamw(rm, 1e-3), groups, 3, 2, random.Random(0), "cpu", contextlib.nullcontext,
                          choice=True)
    assert len(used) == 3


def test_the_normalisation_samples_are_those_ppo_scores():
    """Samples that ended (PPO gives the rest its no-end penalty); all of them if fewer than 2 ended, since one
    score has no std (a single ended sample would have made the online renormalisation NaN)."""
    prompts = ["a", "b", "c"]
    assert online.scored_pairs(prompts, [(" 1", True), (" 2", False), (" 3", True)]) == [
        ("a", " 1<|endoftext|>"), ("c", " 3<|endoftext|>")]
    assert online.scored_pairs(prompts, [(" 1", True), (" 2", False), (" 3", False)]) == [
        ("a", " 1<|endoftext|>"), ("b", " 2"), ("c", " 3")]
