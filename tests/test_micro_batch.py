"""Micro-batching and activation checkpointing: the same steps as the whole batch at once, in less memory.

Each script's main() runs one step twice, with --micro_batch_size splitting the batch into parts of unequal token
counts and without: the gradients must agree up to float rounding. The memory estimate printed at a run's start
counts one micro-batch's activations, and a checkpointed model's.
"""

import json
import random

import pytest
import torch

from conftest import TINY, load_script, position_policy
from nanorlhf import checkpoint, dist
from nanorlhf.checkpoint import memory_estimate, param_count
from nanorlhf.config import UserError, parse_args
from nanorlhf.model import GPT, GPTConfig, ScalarModel
from nanorlhf.rollout import generate, merge_rollouts
from nanorlhf.sft import make_batch, sft_loss


@pytest.fixture
def run_main(monkeypatch):
    """A script's main() in this process: {name: state dict, name_grad: the gradients of its last step}."""
    threads = torch.get_num_threads()

    def go(script, *args, cwd):
        monkeypatch.chdir(cwd)
        result = script.main(parse_args(script.Config, [str(a) for a in args]))
        grads = {f"{k}_grad": {n: p.grad.clone() for n, p in v.named_parameters() if p.grad is not None}
                 for k, v in result.items() if isinstance(v, torch.nn.Module)}
        return {**{k: v.state_dict() for k, v in result.items() if isinstance(v, torch.nn.Module)}, **grads}

    yield go
    torch.set_num_threads(threads)


def assert_close_grads(a: dict, b: dict, rel=1e-5):
    assert a.keys() == b.keys() and a
    scale = max(g.abs().max().item() for g in a.values())
    assert scale > 1e-4  # a real gradient, not zeros that agree trivially
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= rel * scale, k


def test_micro_batches_shares_and_split():
    assert dist.micro_batches(7, 0) == [slice(0, 7)] == dist.micro_batches(7, 7) == dist.micro_batches(7, 9)
    assert dist.micro_batches(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert dist.split(8, 3) == [slice(0, 2), slice(2, 5), slice(5, 8)] and dist.split(5, 1) == [slice(0, 5)]
    assert dist.shares([12]) == [[1.0]]  # one process, one part: the plain step, bit for bit
    assert dist.shares([3, 1], [5]) == [[0.75, 0.25], [1.0]]
    assert dist.in_parts(lambda s: torch.arange(10)[s] * 2, 10, 3).tolist() == list(range(0, 20, 2))


@pytest.fixture(scope="module")
def rankings(workdir):
    """12 rankings of 3 distinct responses each (every group has pairs to rank)."""
    rng = random.Random(0)
    prompts = [json.loads(line)["prompt"] for line in open(workdir / "data" / "prompts_train.jsonl")][:12]
    with open(workdir / "data" / "rankings.jsonl", "w") as f:
        for p in prompts:
            responses = rng.sample([" ".join(str(rng.randrange(10)) for _ in range(n)) for n in (1, 3, 5)], 3)
            f.write(json.dumps({"prompt": p, "responses": responses}) + "\n")
    return "data/rankings.jsonl"


SFT_ARGS = ["--data", "data/sft.jsonl", "--eval_prompts", "", "--n_layer", 2, "--n_head", 2, "--n_embd", 32,
            "--block_size", 48, "--max_iters", 1, "--batch_size", 10, "--val_fraction", 0.05, "--threads", 1,
            "--ckpt_interval", 0]


def test_sft_micro_batches_and_checkpointing_give_the_whole_batchs_gradient(workdir, tmp_path, run_main):
    sft = load_script("train_sft")
    whole = run_main(sft, *SFT_ARGS, "--out", tmp_path / "a.pt", cwd=workdir)
    parts = run_main(sft, *SFT_ARGS, "--micro_batch_size", 3, "--out", tmp_path / "b.pt", cwd=workdir)
    assert_close_grads(whole["model_grad"], parts["model_grad"])
    both = run_main(sft, *SFT_ARGS, "--micro_batch_size", 4, "--activation_checkpointing", "--out",
                    tmp_path / "c.pt", cwd=workdir)
    assert_close_grads(whole["model_grad"], both["model_grad"])
    metrics = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    first = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert metrics[-1]["train_loss"] == pytest.approx(first[-1]["train_loss"], rel=1e-6)  # the token mean


def test_rm_micro_batches_give_the_whole_batchs_gradient(workdir, rankings, tmp_path, run_main):
    args = ["--data", rankings, "--eval_fraction", 0.1, "--batch_size", 16, "--epochs", 1, "--n_normalize", 4,
            "--max_new_tokens", 4, "--threads", 1, "--ckpt_interval", 0]
    rm = load_script("train_rm")
    whole = run_main(rm, *args, "--out", tmp_path / "a.pt", cwd=workdir)
    parts = run_main(rm, *args, "--micro_batch_size", 4, "--activation_checkpointing", "--out", tmp_path / "b.pt",
                     cwd=workdir)  # 11 rankings to train on: parts of 4, 4 and 3
    assert_close_grads(whole["rm_grad"], parts["rm_grad"])




@pytest.mark.parametrize("ptx_coef", [0.0, 0.5])
def test_ppo_micro_batches_give_the_whole_batchs_gradients(workdir, tmp_path, run_main, ptx_coef):
    """Generation, the scoring passes and the update in parts of 3 of 8 rollouts, PPO-ptx's 8 examples in as many
    parts: the policy's and the value function's gradients are the whole minibatch's."""
    checkpoint.save(workdir / "out" / "sft_position.pt", position_policy(), kind="sft")
    torch.manual_seed(1)
    checkpoint.save(workdir / "out" / "rm.pt", ScalarModel(TINY), kind="rm")
    args = ["--sft", "out/sft_position.pt", "--iters", 1, "--batch_size", 8, "--minibatch_size", 8,
            "--max_new_tokens", 6, "--grad_clip", 0, "--eval_prompts", "", "--ptx_coef", ptx_coef, "--threads", 1,
            "--ckpt_interval", 0]
    ppo = load_script("train_ppo")
    whole = run_main(ppo, *args, "--out", tmp_path / "a.pt", cwd=workdir)
    parts = run_main(ppo, *args, "--micro_batch_size", 3, "--activation_checkpointing", "--out", tmp_path / "b.pt",
                     cwd=workdir)
    if ptx_coef:  # without PPO-ptx the policy's gradient is rounding noise: its rollouts have probability ~1
        assert_close_grads(whole["policy_grad"], parts["policy_grad"])
    assert_close_grads(whole["value_grad"], parts["value_grad"])
    a, b = (torch.load(tmp_path / f"{x}.pt", weights_only=False)["history"][0] for x in "ab")
    assert a["no_eos"] == 0.0 and 1.0 < a["resp_len"] < 6.0  # the same rollouts, of different lengths
    assert ("ptx_loss" in a) == ("ptx_loss" in b) == bool(ptx_coef)
    for key in ("score", "kl", "resp_len", "pg_loss", "vf_loss", "approx_kl", "entropy", "ptx_loss"):
        assert b.get(key) == pytest.approx(a.get(key), rel=1e-5, abs=1e-7), key


def test_generation_in_parts_is_the_whole_batchs():
    """Greedy decoding in micro-batches, merged (prompts left-padded to the longest, responses right-padded),
    gives the layout and numbers of one batch."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    one = generate(model, prompts, 6, temperature=0, eos_id=7)
    merged = merge_rollouts([generate(model, prompts[s], 6, temperature=0, eos_id=7)
                             for s in dist.micro_batches(len(prompts), 2)])
    assert merged["prompt_len"] == one["prompt_len"]
    for key in ("tokens", "start", "resp_len", "ended"):
        assert torch.equal(merged[key], one[key]), key
    torch.testing.assert_close(merged["logprobs"], one["logprobs"])
    assert merge_rollouts([one]) is one


def saved_bytes(model, idx):
    """Bytes autograd keeps for the backward pass of one forward (what activation checkpointing saves)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx)
    return total


def test_activation_checkpointing_keeps_the_numbers_and_drops_the_activations():
    cfg = GPTConfig(block_size=32, vocab_size=64, n_layer=4, n_head=2, n_embd=32, dropout=0.1)
    batch = make_batch([(list(range(1, 30)), 10), (list(range(3, 20)), 5)], "cpu")
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg)
        model.checkpointing = on
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the random state when recomputing
        loss, _ = sft_loss(model, *batch)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert_close_grads(grads[0], grads[1], rel=1e-6)
    model.eval()
    idx = torch.randint(0, 64, (4, 32))
    kept, plain = saved_bytes(model, idx), (setattr(model, "checkpointing", False), saved_bytes(model, idx))[1]
    assert kept < plain / 3  # each block's input (and the final LayerNorm's) instead of all of its activations
    with torch.no_grad():  # generation and scoring have no backward: checkpointing stays out of the way
        model.checkpointing = True
        torch.testing.assert_close(model(idx), (setattr(model, "checkpointing", False), model(idx))[1])


def test_the_estimate_counts_one_micro_batch_checkpointing_and_shards():
    cfg = GPTConfig()  # GPT-2 124M
    n = param_count(cfg)
    plain = memory_estimate(n, n, activations=[(cfg, 8 * 1024)])
    assert plain["activations"] == 16 * 12 * 768 * 8 * 1024 * 4
    assert memory_estimate(n, n, activations=[(cfg, 2 * 1024)])["activations"] == plain["activations"] / 4
    ckpt = memory_estimate(n, n, activations=[(cfg, 8 * 1024)], checkpointing=True)
    assert ckpt["activations"] == (4 * 12 * 768 + 16 * 768 * 4) * 8 * 1024  # block inputs + one block's
    bf16 = memory_estimate(n, n, activations=[(cfg, 8 * 1024)], low_precision=True, checkpointing=True)
    assert bf16["activations"] == (4 * 12 * 768 + 16 * 768 * 2) * 8 * 1024  # the residual stream stays fp32
    sharded = memory_estimate(2 * n, n, shards=4)  # a frozen copy stays whole, the trained one is split
    assert sharded["weights"] == 4 * (n + n / 4) and sharded["adam"] == 8 * n / 4 == plain["adam"] / 4


@pytest.mark.parametrize("script", ["train_sft", "train_rm", "train_ppo"])
def test_flags_are_checked(script):
    cfg = load_script(script).Config
    with pytest.raises(UserError, match="--micro_batch_size must be at least 0, got -1"):
        parse_args(cfg, ["--micro_batch_size", "-1"])
    with pytest.raises(UserError, match="--fsdp needs --ckpt_interval 0, no --resume"):
        parse_args(cfg, ["--fsdp"])
    assert parse_args(cfg, ["--fsdp", "--ckpt_interval", "0"]).fsdp
