"""train_ppo.py's advantage estimators: GAE (PPO's, with a value function) and the critic-free RLOO, GRPO and
Dr. GRPO (nanorlhf/ppo.py). Each against numbers worked out by hand, then each in a tiny run of train_ppo.py.
PPO's own math (GAE, the clipped losses, the group advantages alone) is in tests/test_ppo.py; --resume of a
critic-free run in tests/test_resume.py."""

import json
import math

import pytest
import torch

from conftest import TINY, load_script, run
from nanorlhf import checkpoint, ppo
from nanorlhf.model import GPT, ScalarModel
from nanorlhf.tokenizer import EOT


def test_rloo_puts_the_kl_penalty_in_the_sequence_reward():
    # Two prompts, k = 2 each (group-major rows); rows 1 and 3 end after one token.
    score = torch.tensor([1.0, 3.0, 0.0, 2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0], [-1.0, 0.0], [-0.5, -1.0], [-2.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0], [-1.0, 0.0], [-1.0, -2.0], [-1.0, 0.0]])
    # sum_t log pi - log pi_ref: 0.5, 0, 0.5 + 1 = 1.5, -1; beta = 0.5:
    # R = 1 - 0.25 = 0.75, 3 - 0 = 3, 0 - 0.75 = -0.75, 2 + 0.5 = 2.5
    rewards, _ = ppo.kl_penalized_rewards(score, logp, ref, mask, beta=0.5)  # what train_ppo.py sums per response
    assert rewards.sum(1).tolist() == [0.75, 3.0, -0.75, 2.5]
    adv = ppo.rloo_advantages(rewards.sum(1), 2)  # k = 2: the baseline is the other sample's R
    assert adv.tolist() == [0.75 - 3.0, 3.0 - 0.75, -0.75 - 2.5, 2.5 + 0.75]
    # PPO's surrogate over tokens, each token carrying its response's A; at ratio 1 the loss is -mean_t A:
    # tokens -2.25, -2.25 | 2.25 | -3.25, -3.25 | 3.25 -> mean -5.5 / 6
    loss, clip_frac, approx_kl = ppo.policy_loss(logp, logp, adv[:, None] * mask, mask)
    assert loss.item() == pytest.approx(5.5 / 6) and clip_frac.item() == 0.0 and approx_kl.item() == 0.0


def test_grpo_loss_clips_and_charges_the_k3_kl_by_hand():
    # One group of two responses (lengths 2 and 1), advantages +1 and -1, after a step: ratios 1.5, 0.9 | 0.5.
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.0]])).requires_grad_(True)
    ref = logp.detach() + torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # k3 KL on token (0, 1) only: e - 1 - 1
    adv, beta, kl = torch.tensor([1.0, -1.0]), 0.1, math.e - 2.0
    loss, clip_frac, approx_kl = ppo.grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=beta)
    # (0, 0): A > 0, ratio 1.5 -> min(1.5, 1.2) = 1.2 (clipped); (0, 1): 0.9, inside; (1, 0): A < 0, ratio 0.5 ->
    # min(-0.5, -0.8) = -0.8 (clipped). Per token -(surrogate - beta KL3); GRPO: each response's mean, then theirs.
    row0, row1 = [-1.2, -(0.9 - beta * kl)], [0.8]
    assert loss.item() == pytest.approx((sum(row0) / 2 + sum(row1) / 1) / 2)
    assert clip_frac.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx(sum(r - 1 - math.log(r) for r in (1.5, 0.9, 0.5)) / 3)
    loss.backward()  # no gradient through a clipped token; token (0, 1): d/dlogp of -(ratio A - beta KL3), / 2 / 2
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0 and logp.grad[1, 1] == 0
    assert logp.grad[0, 1].item() == pytest.approx((-0.9 + beta * (1 - math.e)) / 4)
    # Dr. GRPO: the same token terms summed, over G * R = 4 for every response
    loss_dr, _, _ = ppo.grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=beta, max_len=2)
    assert loss_dr.item() == pytest.approx((sum(row0) + sum(row1)) / 4)


def test_grpo_and_dr_grpo_advantages_of_two_groups():
    score = torch.tensor([0.0, 4.0, 1.0, 1.0, 1.0, 4.0])  # k = 3: (0, 4, 1) mean 5/3; (1, 1, 4) mean 2
    dr = ppo.grpo_advantages(score, 3, scale=False)
    assert dr.tolist() == pytest.approx([-5 / 3, 7 / 3, -2 / 3, -1.0, -1.0, 2.0])
    std1 = math.sqrt(((5 / 3) ** 2 + (7 / 3) ** 2 + (2 / 3) ** 2) / 2)  # unbiased, over the group
    std2 = math.sqrt((1 + 1 + 4) / 2)
    grpo = ppo.grpo_advantages(score, 3, eps=0.0)
    assert grpo.tolist() == pytest.approx([-5 / 3 / std1, 7 / 3 / std1, -2 / 3 / std1, -1 / std2, -1 / std2,
                                           2 / std2])


# ------------------------------------------------------------------------------------------------------------------
# Tiny runs of train_ppo.py with each estimator.

@pytest.fixture(scope="module")
def world(workdir):
    """workdir, a random RM, and an SFT model that ends each reply with probability ~1/2 per token: responses of
    several lengths, so their RM scores differ within a group and the critic-free advantages are not all 0."""
    torch.manual_seed(0)
    sft = GPT(TINY)
    with torch.no_grad():  # the final LayerNorm's output ~ its bias e_0; the tied <|endoftext|> row reads it
        sft.transformer.ln_f.weight.fill_(0.5)
        sft.transformer.ln_f.bias.zero_()[0] = 1.0
        sft.transformer.wte.weight[EOT].zero_()[0] = math.log(TINY.vocab_size)
    checkpoint.save(workdir / "out" / "sft_ends.pt", sft, kind="sft")
    torch.manual_seed(1)
    checkpoint.save(workdir / "out" / "rm.pt", ScalarModel(TINY), kind="rm")
    return workdir


VALUE_KEYS = {"vf_loss", "vf_clip_frac", "explained_var"}


@pytest.mark.parametrize("estimator", ["gae", "rloo", "grpo", "drgrpo"])
def test_each_estimator_trains_in_seconds(world, estimator):
    out = world / estimator / "ppo.pt"
    r = run("train_ppo.py", "--sft", "out/sft_ends.pt", "--estimator", estimator, "--samples_per_prompt", 2,
            "--iters", 2, "--batch_size", 8, "--minibatch_size", 4, "--max_new_tokens", 6, "--eval_n", 4,
            "--eval_interval", 2, "--threads", 1, "--out", out, cwd=world)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"iterations x 8 rollouts ({estimator})" in r.stdout
    ckpt = torch.load(out, weights_only=False)
    assert ("value" in ckpt) == (estimator == "gae")  # only GAE has a value function to save
    sft = torch.load(world / "out" / "sft_ends.pt", weights_only=False)["model"]
    assert any(not torch.equal(sft[k], ckpt["model"][k]) for k in sft)  # the policy moved
    records = [json.loads(line) for line in (world / estimator / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records] == [1, 2] and "gold" in records[-1]
    for x in records:
        assert all(math.isfinite(x[k]) for k in ("pg_loss", "approx_kl", "clip_frac", "entropy", "kl", "score"))
        assert (VALUE_KEYS <= set(x)) if estimator == "gae" else not (VALUE_KEYS & set(x))
    assert records[0]["no_eos"] < 0.5  # most replies ended: scored by the RM, not all the same penalty


def test_a_critic_free_run_builds_no_value_model_and_samples_groups(world, tmp_path, monkeypatch):
    train_ppo = load_script("train_ppo")
    built, rolled_out = [], []
    monkeypatch.setattr(train_ppo, "ScalarModel", lambda cfg: built.append(cfg) or ScalarModel(cfg))
    generate = train_ppo.generate
    monkeypatch.setattr(train_ppo, "generate", lambda model, prompts, *a, **kw: rolled_out.append(prompts) or
                        generate(model, prompts, *a, **kw))
    threads = torch.get_num_threads()
    result = train_ppo.main(train_ppo.Config(
        sft=str(world / "out" / "sft_ends.pt"), rm=str(world / "out" / "rm.pt"),
        prompts=str(world / "data" / "prompts_train.jsonl"), eval_prompts="", out=str(tmp_path / "ppo.pt"),
        estimator="rloo", samples_per_prompt=4, iters=2, batch_size=8, minibatch_size=8, max_new_tokens=6,
        adaptive_kl=True))
    torch.set_num_threads(threads)
    assert len(built) == 1 and result["value"] is None  # the reward model only
    for prompts in rolled_out:  # each iteration: 8 / 4 = 2 distinct prompts, each 4 times in a row (group-major)
        assert len(prompts) == 8 and prompts[0] != prompts[4]
        assert all(p == prompts[0] for p in prompts[:4]) and all(p == prompts[4] for p in prompts[4:])
    ckpt = torch.load(tmp_path / "ppo.pt", weights_only=False)
    assert "value" not in ckpt and ckpt["beta"] != 0.2  # the adaptive controller moved RLOO's beta
    assert ckpt["history"][0]["clip_frac"] == 0.0 and ckpt["history"][0]["approx_kl"] < 1e-9  # one minibatch
