"""Many processes (DDP and FSDP, nanorlhf/dist.py) on CPU, bf16 autocast and torch.compile.

Two processes with the gloo backend (torchrun, through tests/dist_worker.py, which saves what each process ends
with) against one process with the doubled batch (run here, in this process): the processes must end identical,
and equal to the one-process run up to float rounding. With --fsdp (FSDP2's fully_shard) each process holds half
of each trained model and of its AdamW state, and gathers the whole model for rollouts, evaluation and saving.
"""

import datetime
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, load_script, position_policy
from nanorlhf import checkpoint, dist, ops, ppo, tasks
from nanorlhf.config import UserError, parse_args
from nanorlhf.data import load_prompts
from nanorlhf.model import GPT, GPTConfig, ScalarModel
from nanorlhf.rollout import generate, response_logprobs, response_mask
from nanorlhf.sft import make_batch, sft_loss
from nanorlhf.tokenizer import encode

WORKER = ROOT / "tests" / "dist_worker.py"


def torchrun(dump, what, *args, cwd):
    """Run dist_worker.py in 2 processes (gloo, 1 thread each): (the run, [what rank 0 saved, what rank 1 saved])."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(dump), what, *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, [torch.load(Path(dump) / f"rank{i}.pt", weights_only=False) for i in range(2)]


@pytest.fixture
def one_process(monkeypatch):
    """Run a script's main() here, as one process: {name: state dict or figure}."""
    threads = torch.get_num_threads()

    def go(script, *args, cwd):
        monkeypatch.chdir(cwd)
        result = script.main(parse_args(script.Config, [str(a) for a in args]))
        grads = {f"{k}_grad": {n: p.grad for n, p in v.named_parameters() if p.grad is not None}
                 for k, v in result.items() if isinstance(v, torch.nn.Module)}  # of the last backward pass
        return {**{k: v.state_dict() if isinstance(v, torch.nn.Module) else v for k, v in result.items()}, **grads}

    yield go
    torch.set_num_threads(threads)


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the processes"


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tasks.write_default_data(tasks.TaskConfig(out=str(d / "data"), n_sft=60, n_train_prompts=40, n_eval_prompts=8))
    torch.manual_seed(0)
    checkpoint.save(d / "out" / "sft.pt", GPT(TINY), kind="sft")
    checkpoint.save(d / "out" / "rm.pt", ScalarModel(TINY), kind="rm")
    # 21 rankings of 3 responses: 2 held out, 19 to train on, in global batches of 8, 8 and 3 (split 1 + 2)
    rng = random.Random(0)
    prompts = [json.loads(line)["prompt"] for line in open(d / "data" / "prompts_train.jsonl")][:21]
    with open(d / "data" / "rankings.jsonl", "w") as f:
        for p in prompts:
            responses = [" ".join(str(rng.randrange(10)) for _ in range(rng.randrange(1, 5))) for _ in range(3)]
            f.write(json.dumps({"prompt": p, "responses": responses}) + "\n")
    return d


SFT_ARGS = ["--data", "data/sft.jsonl", "--eval_prompts", "", "--n_layer", 1, "--n_head", 2, "--n_embd", 32,
            "--block_size", 48, "--max_iters", 3, "--warmup_iters", 1, "--lr", 3e-3, "--val_fraction", 0.05,
            "--threads", 1]


def test_sft_two_processes_match_one_with_the_doubled_batch(workdir, tmp_path, one_process):
    run, (r0, r1) = torchrun(tmp_path, "train_sft", *SFT_ARGS, "--batch_size", 4, "--out", "out/sft2.pt",
                             cwd=workdir)
    assert_identical(r0["model"], r1["model"])
    assert run.stdout.count("SFT done") == 1 and run.stdout.count("SFT: 57 train") == 1  # rank 0 alone prints
    assert len((workdir / "out" / "sft2" / "metrics.jsonl").read_text().splitlines()) == 1
    one = one_process(load_script("train_sft"), *SFT_ARGS, "--batch_size", 8, "--out", "out/sft1.pt", cwd=workdir)
    assert max_diff(r0["model"], one["model"]) < 1e-5
    torch.manual_seed(0)
    init = GPT(GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=32)).state_dict()
    assert max_diff(one["model"], init) > 1e-3  # the steps moved the weights far more than the tolerance
    saved = torch.load(workdir / "out" / "sft2.pt", weights_only=False)
    assert max_diff(saved["model"], r0["model"]) == 0 and saved["history"][-1]["iter"] == 3


def test_fsdp_sft_in_micro_batches_matches_one_process_with_the_doubled_batch(workdir, tmp_path, one_process):
    """FSDP2 with micro-batches (each reduce-scatters into the shards) and activation checkpointing; rank 0 alone
    computes the validation loss at the end on the gathered model, and saves it."""
    run, (r0, r1) = torchrun(tmp_path, "train_sft", *SFT_ARGS, "--batch_size", 4, "--fsdp", "--ckpt_interval", 0,
                             "--micro_batch_size", 3, "--activation_checkpointing", "--out", "out/sft_fsdp.pt",
                             cwd=workdir)
    assert_identical(r0["model"], r1["model"])
    assert "val loss" in run.stdout and run.stdout.count("SFT done") == 1
    n = sum(t.numel() for k, t in r0["model"].items() if k != "lm_head.weight")  # the tied head once
    assert r0["model_held"] + r1["model_held"] == n and r0["model_held"] < 0.6 * n  # each holds its half
    one = one_process(load_script("train_sft"), *SFT_ARGS, "--batch_size", 8, "--out", "out/sft1.pt", cwd=workdir)
    assert max_diff(r0["model"], one["model"]) < 1e-5
    scale = max(g.abs().max().item() for g in one["model_grad"].values())  # the last step's, from the shards
    assert scale > 1e-3 and max_diff(r0["model_grad"], one["model_grad"]) < 1e-4 * scale
    saved = torch.load(workdir / "out" / "sft_fsdp.pt", weights_only=False)
    assert max_diff(saved["model"], r0["model"]) == 0


RM_ARGS = ["--data", "data/rankings.jsonl", "--epochs", 1, "--lr", 1e-3, "--warmup_iters", 1, "--n_normalize", 4,
           "--max_new_tokens", 4, "--threads", 1]


def test_rm_two_processes_match_one_with_the_doubled_batch(workdir, tmp_path, one_process):
    run, (r0, r1) = torchrun(tmp_path, "train_rm", *RM_ARGS, "--batch_size", 4, "--out", "out/rm2.pt", cwd=workdir)
    assert_identical(r0["rm"], r1["rm"])  # the head's bias too: rank 0's normalisation is broadcast
    assert run.stdout.count("RM done") == 1
    one = one_process(load_script("train_rm"), *RM_ARGS, "--batch_size", 8, "--out", "out/rm1.pt", cwd=workdir)
    # The ranking loss sees only differences of scores, so the gradient of ln_f's bias (which shifts every score
    # alike) is 0 up to rounding, which Adam turns into steps of up to lr either way; the normalisation's shift of
    # head.bias follows it. Everything else must agree.
    shift = {"gpt.transformer.ln_f.bias", "head.bias"}
    assert max_diff({k: v for k, v in r0["rm"].items() if k not in shift}, one["rm"]) < 1e-5
    assert max_diff({k: r0["rm"][k] for k in shift}, one["rm"]) < 3 * 1e-3  # 3 steps of lr 1e-3
    sft = torch.load(workdir / "out" / "sft.pt", weights_only=False)["model"]
    assert max_diff(sft, {k[len("gpt."):]: v for k, v in one["rm"].items() if k.startswith("gpt.")}) > 1e-4


def test_fsdp_rm_matches_one_process_with_the_doubled_batch(workdir, tmp_path, one_process):
    run, (r0, r1) = torchrun(tmp_path, "train_rm", *RM_ARGS, "--batch_size", 4, "--fsdp", "--ckpt_interval", 0,
                             "--micro_batch_size", 3, "--out", "out/rm_fsdp.pt", cwd=workdir)
    assert_identical(r0["rm"], r1["rm"])  # normalised the same in both
    one = one_process(load_script("train_rm"), *RM_ARGS, "--batch_size", 8, "--out", "out/rm1.pt", cwd=workdir)
    shift = {"gpt.transformer.ln_f.bias", "head.bias"}  # as in the DDP test above
    assert max_diff({k: v for k, v in r0["rm"].items() if k not in shift}, one["rm"]) < 1e-5
    assert max_diff({k: r0["rm"][k] for k in shift}, one["rm"]) < 3 * 1e-3
    saved = torch.load(workdir / "out" / "rm_fsdp.pt", weights_only=False)
    assert max_diff(saved["model"], r0["rm"]) == 0 and "RM done" in run.stdout


@pytest.fixture(scope="module")
def ppo_run(workdir, tmp_path_factory):
    """2 iterations of PPO in 2 processes (rank 0 evaluates at each, PPO-ptx on), after the whitening check."""
    return torchrun(tmp_path_factory.mktemp("ppo"), "whiten", "train_ppo", "--iters", 2, "--batch_size", 4,
                    "--minibatch_size", 2, "--ppo_epochs", 1, "--max_new_tokens", 4, "--eval_n", 4,
                    "--eval_interval", 1, "--ptx_coef", 0.1, "--target_kl", 0.01, "--threads", 1,
                    "--out", "out/ppo2.pt", cwd=workdir)


def test_ppo_processes_stay_identical(workdir, ppo_run):
    run, (r0, r1) = ppo_run
    assert_identical(r0["policy"], r1["policy"])
    assert_identical(r0["value"], r1["value"])
    assert r0["beta"] == r1["beta"] != 0.2  # the adaptive controller moved beta, by the same KL everywhere
    sft = torch.load(workdir / "out" / "sft.pt", weights_only=False)["model"]
    assert max_diff(r0["policy"], sft) > 1e-6  # the policy was trained
    assert run.stdout.count("PPO done") == 1
    records = [json.loads(line) for line in open(workdir / "out" / "ppo2" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and all("gold" in r for r in records)  # rank 0 evaluated


def test_whitening_over_processes_is_whitening_of_the_whole_batch(ppo_run):
    r0, r1 = (r["whiten"] for r in ppo_run[1])
    x, mask = torch.cat([r0["x"], r1["x"]]), torch.cat([r0["mask"], r1["mask"]])
    assert r0["mask"].sum() != r1["mask"].sum()  # different token counts per process
    torch.testing.assert_close(torch.cat([r0["whitened"], r1["whitened"]]), ppo.whiten(x, mask))
    torch.testing.assert_close(torch.cat([r0["kept"], r1["kept"]]), ppo.whiten(x, mask, shift_mean=False))
    assert r0["mean"] == r1["mean"] == pytest.approx(x[mask.bool()].mean().item(), rel=1e-6)
    assert r0["floats"] == r1["floats"] == [0.5, 1.0]




PPO_MODES = {"ddp": [], "ddp-micro-batches": ["--micro_batch_size", 3],
             # sharded, in micro-batches, checkpointed; rank 0 evaluates on the gathered policy
             "fsdp": ["--fsdp", "--ckpt_interval", 0, "--micro_batch_size", 3, "--activation_checkpointing",
                      "--eval_prompts", "data/prompts_eval.jsonl", "--eval_n", 4]}


@pytest.mark.parametrize("mode", PPO_MODES)
def test_ppo_losses_are_means_over_every_processs_tokens(workdir, tmp_path, one_process, mode):
    """Policy, value and PPO-ptx losses are means over the global batch's tokens, as SFT's and the RM's are (not
    per-process means that DDP averages): 2 processes' gradients equal 1 process's with the doubled batch, with
    DDP, DDP in micro-batches (no_sync but for the last) and FSDP."""
    checkpoint.save(workdir / "out" / "sft_position.pt", position_policy(), kind="sft")
    args = ["--sft", "out/sft_position.pt", "--iters", 1, "--ppo_epochs", 1, "--max_new_tokens", 6, "--grad_clip", 0,
            "--eval_prompts", "", "--ptx_coef", 0.5, "--threads", 1]
    run, (r0, r1) = torchrun(tmp_path, "train_ppo", *args, "--batch_size", 4, "--minibatch_size", 4,
                             *PPO_MODES[mode], "--out", f"out/ppo_tokens2_{mode}.pt", cwd=workdir)
    one = one_process(load_script("train_ppo"), *args, "--batch_size", 8, "--minibatch_size", 8,
                      "--out", "out/ppo_tokens1.pt", cwd=workdir)
    # The batch train_ppo.py draws (its order shuffled by random.Random(seed)): the processes' halves hold
    # different numbers of response tokens, so the mean of their means is not the mean over all tokens.
    prompts = load_prompts(workdir / "data" / "prompts_train.jsonl")
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    n = [max(1, 14 - len(encode(prompts[i]))) for i in order[:8]]  # k + 2 - the prompt's length
    assert sum(n[:4]) != sum(n[4:])
    for key in ("policy_grad", "value_grad"):
        assert_identical(r0[key], r1[key])
        scale = max(g.abs().max().item() for g in one[key].values())
        assert scale > 1e-3 and max_diff(r0[key], one[key]) < 1e-4 * scale, key
    history = torch.load(workdir / "out" / "ppo_tokens1.pt", weights_only=False)["history"][0]
    assert history["no_eos"] == 0.0 and 1.0 < history["resp_len"] < 6.0 and history["approx_kl"] < 1e-9
    if mode == "fsdp":
        assert_identical(r0["policy"], r1["policy"])
        saved = torch.load(workdir / "out" / "ppo_tokens2_fsdp.pt", weights_only=False)
        assert max_diff(saved["model"], r0["policy"]) == 0 and max_diff(saved["value"], r0["value"]) == 0
        assert "gold" in saved["history"][0]  # rank 0 evaluated


def test_fewer_prompts_than_a_global_batch_are_refused(workdir, tmp_path):
    """Shards of unequal size would give the processes different numbers of minibatches: DDP would hang."""
    (tmp_path / "three.jsonl").write_text("".join(json.dumps({"prompt": f"Sort: {i} 1\nAnswer:"}) + "\n"
                                                  for i in range(3)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_ppo.py"), "--data", tmp_path / "three.jsonl", "--batch_size", 2, "--minibatch_size", 1,
           "--iters", 1, "--max_new_tokens", 4, "--eval_prompts", "", "--out", tmp_path / "ppo.pt"]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, cwd=workdir, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and not (tmp_path / "ppo.pt").exists()
    assert r.stderr.count(f"error: {tmp_path / 'three.jsonl'}: 3 prompts, fewer than one global batch (2 processes x "
                          f"--batch_size 2): lower --batch_size") == 2, r.stderr[-3000:]


def test_fewer_demonstrations_than_a_global_batch_are_refused(workdir, tmp_path):
    """SFT refuses it as PPO does: fewer examples than the processes would leave one with an empty shard (a crash);
    one rule for both, stated in the global batch the user sets."""
    (tmp_path / "four.jsonl").write_text("".join(json.dumps({"prompt": f"Sort: {i} 1\nAnswer:", "response": " 1"})
                                                 + "\n" for i in range(4)))  # 1 held out for validation, 3 left
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_sft.py"), "--data", tmp_path / "four.jsonl", "--batch_size", 2, "--max_iters", 1,
           "--n_layer", 1, "--n_head", 2, "--n_embd", 16, "--block_size", 48, "--eval_prompts", "",
           "--out", tmp_path / "sft.pt"]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, cwd=workdir, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and not (tmp_path / "sft.pt").exists()
    assert r.stderr.count(f"error: {tmp_path / 'four.jsonl'}: 3 training demonstrations, fewer than one global batch "
                          f"(2 processes x --batch_size 2): lower --batch_size") == 2, r.stderr[-3000:]


def test_collectives_wait_long_enough_for_rank_0_alone(monkeypatch):
    """Rank 0 evaluates and saves while the others wait at their next collective: the process group's timeout is
    NANORLHF_DIST_TIMEOUT minutes (default 120; nccl's own is 10), not the backend's default."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist.tdist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    assert dist.setup() == "cpu" and seen == dict(backend="gloo", timeout=datetime.timedelta(minutes=120))
    monkeypatch.setenv("NANORLHF_DIST_TIMEOUT", "45")
    dist.setup()
    assert seen["timeout"] == datetime.timedelta(minutes=45)
    for bad in ("0", "soon", "inf"):
        monkeypatch.setenv("NANORLHF_DIST_TIMEOUT", bad)
        with pytest.raises(UserError, match=f"NANORLHF_DIST_TIMEOUT must be a number of minutes > 0, got '{bad}'"):
            dist.setup()


def test_one_process_sets_up_nothing():
    assert dist.setup() == ("cuda" if torch.cuda.is_available() else "cpu") and dist.world_size() == 1
    assert dist.shard(list(range(5))) == list(range(5)) and dist.is_main()
    loss = torch.tensor(2.0, requires_grad=True) * 1.5
    scaled, mean = dist.global_mean_loss(loss, 7)
    assert scaled is loss and mean == 3.0
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model, "cpu") is model and dist.unwrap(model) is model
    assert dist.autocast("cpu", "auto")().__class__.__name__ == "nullcontext"


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_bf16_autocast_forward_and_generation(monkeypatch, kernels):
    if kernels == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("NANORLHF_KERNELS", kernels)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    with dist.autocast("cpu", "bfloat16")():
        assert model.new_kv_cache(2, 8)[0][0].dtype == torch.bfloat16  # the keys' and values' dtype, not fp32
        r = generate(model, [[1, 2, 3], [4, 5]], 4, stop_at_eos=False)
        mask = response_mask(r["resp_len"], r["tokens"].shape[1] - r["prompt_len"])
        logp = response_logprobs(model, r["tokens"], r["start"], r["prompt_len"], mask, 1.0)
        values = ScalarModel(model.config)(r["tokens"], r["start"])
    assert model.new_kv_cache(1, 4)[0][0].dtype == torch.float32  # outside autocast: the weights' dtype
    assert logp.dtype == r["logprobs"].dtype == values.dtype == torch.float32
    assert torch.isfinite(logp).all() and (logp[mask] < 0).all()


def test_logprobs_under_autocast_are_fp32_math(monkeypatch):
    monkeypatch.setenv("NANORLHF_KERNELS", "torch")
    torch.manual_seed(0)
    h, w = torch.randn(5, 16) * 2, torch.randn(300, 16)
    y = torch.randint(0, 300, (5,))
    with dist.autocast("cpu", "bfloat16")():
        logp = ops.token_logprobs(h, w, y)
    # what autocast's bf16 matmul is given (operands rounded to bf16), then log-softmax in fp32
    exact = torch.log_softmax(h.bfloat16().float() @ w.bfloat16().float().t(), -1).gather(1, y[:, None])[:, 0]
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, exact, atol=2e-5, rtol=0)


def test_compile_wraps_a_model_that_trains_the_same(monkeypatch):
    if not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++ or c++)")
    monkeypatch.setenv("NANORLHF_KERNELS", "torch")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    batch = make_batch([([1, 2, 3, 4, 5], 2), ([6, 7, 8], 1)], "cpu")
    compiled = dist.wrap(model, "cpu", compile=True)
    assert compiled is not model and dist.unwrap(compiled) is model
    loss, _ = sft_loss(compiled, *batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager, _ = sft_loss(model, *batch)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)
