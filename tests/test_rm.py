import itertools
import math
import random

import pytest
import torch

from nanorlhf import tasks
from nanorlhf.config import UserError
from nanorlhf.data import END, load_preferences, preference_kind, write_jsonl
from nanorlhf.model import GPTConfig, ScalarModel, left_pad
from nanorlhf.reward import (accuracy, batches, choice_loss, encode_pair, group_scores, pairwise_accuracy, ranking_loss,
                             score_texts)


def test_k_way_loss_is_the_mean_over_all_pairs():
    torch.manual_seed(0)
    G, K = 3, 5
    scores = torch.randn(G * K, requires_grad=True)
    loss = ranking_loss(scores, K)
    s = scores.view(G, K)
    pairs = [-torch.nn.functional.logsigmoid(s[g, i] - s[g, j])
             for g in range(G) for i, j in itertools.combinations(range(K), 2)]
    assert len(pairs) == G * K * (K - 1) // 2
    torch.testing.assert_close(loss, torch.stack(pairs).mean())
    loss.backward()
    assert scores.grad.view(G, K)[:, 0].lt(0).all()  # the best response's score is pushed up
    assert scores.grad.view(G, K)[:, -1].gt(0).all()  # the worst one's down


def test_pairwise_loss_is_the_k2_case():
    s = torch.tensor([2.0, 0.5])
    assert ranking_loss(s, 2).item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(1.5)).item())


def test_centering_term_pulls_each_prompts_mean_to_zero():
    s = torch.tensor([3.0, 1.0, -2.0, -4.0], requires_grad=True)  # two groups of K = 2, means 2 and -3
    loss = ranking_loss(s, 2, center_coef=0.1)
    expected = ranking_loss(s, 2) + 0.1 * (2.0 ** 2 + 3.0 ** 2) / 2
    torch.testing.assert_close(loss, expected)
    shifted = torch.tensor([1.0, -1.0, 1.0, -1.0])  # same differences, group means 0: only the pairwise term left
    assert ranking_loss(shifted, 2, center_coef=0.1).item() == pytest.approx(ranking_loss(shifted, 2).item())


def test_pairwise_accuracy_skips_ties():
    scores = [[3.0, 1.0, 2.0]]
    acc, n = pairwise_accuracy(scores, [[0, 1, 2]])
    assert (acc, n) == (pytest.approx(2 / 3), 3)  # (0,1) right, (0,2) right, (1,2) wrong
    acc, n = pairwise_accuracy(scores, [[0, 1, 2]], values=[[1.0, 0.5, 0.5]])
    assert (acc, n) == (1.0, 2)  # responses 1 and 2 tie: no right order


def test_batches_keep_groups_of_equal_k_together():
    groups = [("p", ["a", "b"])] * 5 + [("q", ["a", "b", "c", "d"])] * 7
    out = batches(groups, 3, random.Random(0))
    assert sorted(len(b) for b in out) == [1, 2, 3, 3, 3]
    assert all(len({len(g[1]) for g in b}) == 1 for b in out)


def test_group_scores_read_the_end_token():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16)
    rm = ScalarModel(cfg).eval()
    batch = [("Sort: 3 1\nAnswer:", [" 1 3<|endoftext|>", " 3<|endoftext|>"])]
    with torch.no_grad():
        grouped, ids = group_scores(rm, batch, cfg.block_size, "cpu")
        single = score_texts(rm, ["Sort: 3 1\nAnswer:"] * 2, batch[0][1])
    torch.testing.assert_close(grouped, single, atol=1e-5, rtol=1e-5)
    assert ids.tolist() == [0, 1]


def test_group_scores_score_a_repeated_response_once_with_the_same_loss_and_gradient():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16)
    rm = ScalarModel(cfg)
    batch = [("Sort: 3 1\nAnswer:", [" 1 3", " 3 1", " 1 3", " 1 3"]),
             ("Count: 5 5 2\nAnswer:", [" 3", " 2", " 3", " 4"])]
    seen = []
    hook = rm.head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0]))
    scores, ids = group_scores(rm, batch, cfg.block_size, "cpu")
    hook.remove()
    assert seen == [5]  # 8 responses, 5 distinct (prompt, response) pairs through the RM
    assert ids.tolist() == [0, 1, 0, 0, 2, 3, 2, 4]
    loss = ranking_loss(scores, 4, center_coef=0.1)
    loss.backward()
    grad = [p.grad.clone() for p in rm.parameters()]
    rm.zero_grad()
    # The same loss with every copy sent through the RM on its own.
    prompts = [p for p, rs in batch for _ in rs]
    texts = [r for _, rs in batch for r in rs]
    idx, start = left_pad([encode_pair(p, r, cfg.block_size) for p, r in zip(prompts, texts)])
    every = rm(idx, start)[:, -1]  # (8,)
    torch.testing.assert_close(scores, every, atol=1e-5, rtol=1e-5)
    ranking_loss(every, 4, center_coef=0.1).backward()
    for g, p in zip(grad, rm.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_pairs_of_identical_responses_are_left_out_of_the_loss():
    # One group of K = 3: responses a, a, b (ranked in that order). The pair (a, a) is a tie: left out, the loss is
    # the mean of the two real pairs (a above b, twice), not of three terms with a constant log 2 among them.
    s = torch.tensor([1.0, 1.0, -0.5], requires_grad=True)
    ids = torch.tensor([0, 0, 1])
    loss = ranking_loss(s, 3, ids=ids)
    expected = -torch.nn.functional.logsigmoid(torch.tensor(1.5)).item()  # both real pairs: 1.0 - (-0.5)
    assert loss.item() == pytest.approx(expected)
    diluted = ranking_loss(s, 3)  # with the tie: (2 * expected + log 2) / 3
    assert diluted.item() == pytest.approx((2 * expected + math.log(2)) / 3)
    # A group with nothing but copies has no pair and does not count; the other group's loss is unchanged.
    two = torch.tensor([1.0, 1.0, -0.5, 0.3, 0.3, 0.3])
    assert ranking_loss(two, 3, ids=torch.tensor([0, 0, 1, 2, 2, 2])).item() == pytest.approx(expected)
    assert ranking_loss(two[3:], 3, ids=torch.tensor([2, 2, 2])).item() == 0.0
    loss.backward()
    assert s.grad[0] == s.grad[1] != 0  # the copies get the same gradient, from the real pairs only


def test_choice_loss_is_the_softmax_cross_entropy_of_the_pick():
    # Ziegler et al. eq. 1: one group of K = 3, the labeler's pick stored first.
    s = torch.tensor([2.0, 1.0, 0.0])
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.0) + 1.0))
    assert choice_loss(s, 3).item() == pytest.approx(expected)
    # A copy of the pick is the same option: -log((e^2 + e^2) / (e^2 + e^2 + 1)).
    s2 = torch.tensor([2.0, 2.0, 0.0])
    copies = choice_loss(s2, 3, ids=torch.tensor([0, 0, 1])).item()
    assert copies == pytest.approx(-math.log(2 * math.exp(2.0) / (2 * math.exp(2.0) + 1.0)), rel=1e-5)
    assert choice_loss(s2, 3).item() > copies  # without ids the copy would count against the pick
    two = torch.cat([s, s2])
    assert choice_loss(two, 3, center_coef=0.5).item() == pytest.approx(
        (expected + choice_loss(s2, 3).item()) / 2 + 0.5 * (1.0 ** 2 + (4 / 3) ** 2) / 2)


def test_choice_data_loads_best_first_and_its_accuracy_counts_only_known_pairs(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Largest: 3 9\nAnswer:", "responses": [" 3", " 9", " 9"], "best": 1}])
    assert preference_kind(tmp_path / "c.jsonl") == "choice"
    groups = load_preferences(tmp_path / "c.jsonl")
    assert groups == [("Largest: 3 9\nAnswer:", [" 9" + END, " 3" + END, " 9" + END])]
    torch.manual_seed(0)
    rm = ScalarModel(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    result = accuracy(rm, groups, choice=True)
    assert result["acc_labels"][1] == 1  # (best, " 3"); the copy of the best and the others' order are unknown
    assert result["acc_labels_vs_gold"] == (1.0, 1)  # the pick was right, on the one pair it orders
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b"], "best": 2}])
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'best' is 2"):
        load_preferences(tmp_path / "bad.jsonl")


def test_the_scripted_labeler_picks_by_softmax_of_gold():
    prompt = "Largest: 3 9 4\nAnswer:"
    responses = [" 9<|endoftext|>", " 4<|endoftext|>", " 3 9<|endoftext|>"]
    assert tasks.choose_best(prompt, responses, random.Random(0), noise=0) == 0
    rng = random.Random(1)
    picks = [tasks.choose_best(prompt, responses, rng, noise=0.5) for _ in range(4000)]
    g = [tasks.gold_score(prompt, r) for r in responses]
    p = [math.exp(x / 0.5) for x in g]
    for i in range(3):
        assert picks.count(i) / 4000 == pytest.approx(p[i] / sum(p), abs=0.03)
