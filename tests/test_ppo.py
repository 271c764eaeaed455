import math

import pytest
import torch

from nanorlhf import ppo
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.rollout import generate, response_logprobs, response_mask


def test_gae_matches_a_plain_loop():
    torch.manual_seed(0)
    B, R, gamma, lam = 5, 7, 0.9, 0.8
    rewards, values = torch.randn(B, R), torch.randn(B, R)
    lengths = [7, 3, 1, 5, 6]
    mask = response_mask(torch.tensor(lengths), R).float()
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for b, L in enumerate(lengths):
        for t in range(R):
            if t >= L:
                assert adv[b, t] == 0 and ret[b, t] == 0
                continue
            expected = 0.0
            for k in range(t, L):  # A_t = sum_k (gamma lam)^(k-t) delta_k, with V after the end = 0
                v_next = values[b, k + 1].item() if k + 1 < L else 0.0
                delta = rewards[b, k].item() + gamma * v_next - values[b, k].item()
                expected += (gamma * lam) ** (k - t) * delta
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(expected + values[b, t].item(), abs=1e-5)


def test_whiten_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    w = ppo.whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (real - real.mean()) / real.std()
    torch.testing.assert_close(w[mask.bool()], expected, atol=1e-5, rtol=1e-5)
    assert w[0, 3] == 0 and w[1, 2] == 0 and w[1, 3] == 0
    kept = ppo.whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept[mask.bool()].mean(), real.mean(), atol=1e-5, rtol=1e-5)


def test_adaptive_kl_controller():
    # Ziegler et al.: e = clip(KL / target - 1, -0.2, 0.2), beta *= 1 + e * n_steps / horizon
    assert ppo.update_kl_coef(0.1, 6.0, 6.0, 10000, 64) == pytest.approx(0.1)
    assert ppo.update_kl_coef(0.1, 9.0, 6.0, 10000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))  # clipped
    assert ppo.update_kl_coef(0.1, 6.6, 6.0, 10000, 64) == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000))
    assert ppo.update_kl_coef(0.1, 0.0, 6.0, 100, 50) == pytest.approx(0.1 * (1 - 0.2 * 0.5))


def test_rewards_on_the_last_real_token():
    score = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).float()  # row 1 ends at token 1; token 2 is padding
    rewards, kl = ppo.kl_penalized_rewards(score, logp, ref, mask, beta=0.5)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 2.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.25, 0.0, 0.5 + 2.0], [-0.5, -1.0 - 1.0, 0.0]]))


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 2.0]]))  # ratios
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, clip_frac, approx_kl = ppo.policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: A>0, ratio 1.5 -> clipped to 1.2: max(-1.5, -1.2) = -1.2
    # token 1: A>0, ratio 0.5: max(-0.5, -0.8) = -0.5 (the pessimistic, unclipped term)
    # token 2: A<0, ratio 1.1 (inside the clip range): 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert clip_frac.item() == pytest.approx(1 / 3)
    r = torch.tensor([1.5, 0.5, 1.1])
    assert approx_kl.item() == pytest.approx(((r - 1) - r.log()).mean().item(), rel=1e-5)
    # gradient flows only through tokens that are not clipped
    logp = logp.clone().requires_grad_(True)
    ppo.policy_loss(logp, old, adv, mask, clip=0.2)[0].backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 3] == 0
    assert logp.grad[0, 1].item() == pytest.approx(-0.5 / 3)
    assert logp.grad[0, 2].item() == pytest.approx(1.1 / 3)


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, -1.0]])
    loss, clip_frac = ppo.value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: (1.1)^2 = 1.21 vs (1.1)^2
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2)
    assert clip_frac.item() == pytest.approx(0.5)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert ppo.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_logprobs_equal_sampling_logprobs(temperature):
    """So the PPO ratio is exactly 1 before the first update (no dropout, same temperature)."""
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=40, vocab_size=300, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    r = generate(policy.eval(), prompts, 12, temperature=temperature, eos_id=5,
                 generator=torch.Generator().manual_seed(0))
    P = r["prompt_len"]
    mask = response_mask(r["resp_len"], r["tokens"].shape[1] - P)
    policy.train()
    logp = response_logprobs(policy, r["tokens"], r["start"], P, mask, temperature)
    torch.testing.assert_close(logp, r["logprobs"], atol=2e-5, rtol=0)
    ratio = torch.exp(logp - r["logprobs"])[mask]
    assert (ratio - 1).abs().max() < 1e-4


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    # prompt 1: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; prompt 2: -1.5, -1.5, 3
    assert ppo.rloo_advantages(r, 3).tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]
    with pytest.raises(ValueError, match="k >= 2"):
        ppo.rloo_advantages(r, 1)


def test_grpo_advantages_and_the_dr_grpo_variant():
    r = torch.tensor([1.0, 3.0, 5.0, 2.0, 2.0, 2.0])  # k = 3: std of (1, 3, 5) is 2; the second group is flat
    adv = ppo.grpo_advantages(r, 3, eps=0.0)
    assert adv[:3].tolist() == [-1.0, 0.0, 1.0]
    assert ppo.grpo_advantages(r, 3)[3:].tolist() == [0.0, 0.0, 0.0]  # no spread: no signal, no division by 0
    assert ppo.grpo_advantages(r, 3, scale=False).tolist() == [-2.0, 0.0, 2.0, 0.0, 0.0, 0.0]


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0])
    # equal: 0; ref/pi = e: e - 1 - 1
    assert ppo.k3_kl(logp, ref).tolist() == pytest.approx([0.0, math.e - 2.0])


def test_grpo_loss_by_hand():
    # Two responses of lengths 2 and 1 (R = 2); at the first update ratio = 1, so the surrogate is A on each token.
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    ref = torch.tensor([[-1.0, -1.0], [-0.5, 0.0]])  # KL3 only on token (0, 1): e - 2
    adv = torch.tensor([1.0, -2.0])
    beta, kl = 0.5, math.e - 2.0
    loss, clip_frac, approx_kl = ppo.grpo_loss(logp, logp, ref, adv, mask, beta=beta)
    per_seq = [(-1.0 + (-1.0 + beta * kl)) / 2, 2.0 / 1]  # -(A - beta KL) per token, over each length
    assert loss.item() == pytest.approx(sum(per_seq) / 2)
    loss_dr, _, _ = ppo.grpo_loss(logp, logp, ref, adv, mask, beta=beta, max_len=2)
    assert loss_dr.item() == pytest.approx((-1.0 + (-1.0 + beta * kl) + 2.0) / 4)  # summed, over G * R = 4
    # Dr. GRPO's constant is the generation budget, not the batch's width: a process (or an iteration) whose
    # longest response is longer gets the same loss for the same responses (padding columns change nothing)
    wide = [torch.cat([x, torch.zeros(2, 3)], 1) for x in (logp, ref, mask)]
    loss_wide, _, _ = ppo.grpo_loss(wide[0], wide[0], wide[1], adv, wide[2], beta=beta, max_len=16)
    assert loss_wide.item() == pytest.approx(ppo.grpo_loss(logp, logp, ref, adv, mask, beta=beta, max_len=16)[0].item())
    assert loss_wide.item() == pytest.approx(loss_dr.item() * 4 / 32)
    assert clip_frac.item() == 0.0 and approx_kl.item() == 0.0  # pi = pi_old: nothing clipped, no step taken yet
