import math

import pytest
import torch

from nanorlhf import dpo


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
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert dpo.sequence_logprobs(torch.tensor([[-1.0, -2.0, -9.0]]), mask).tolist() == [-3.0]
