import itertools
import math
import random

import pytest
import torch

from nanorlhf.model import GPTConfig, ScalarModel, left_pad
from nanorlhf.reward import batches, encode_pair, group_scores, pairwise_accuracy, ranking_loss, score_texts


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
