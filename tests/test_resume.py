"""--resume: a run killed with SIGKILL after a mid-run checkpoint, then resumed, ends exactly where an uninterrupted
run ends (same weights, same metrics.jsonl, no duplicates), on CPU with 1 thread and fixed seeds. And PPO's --data.

Each script runs three times as a subprocess: uninterrupted (--out SCRIPT_ref/out.pt), then killed at its first
mid-run checkpoint and resumed (--out SCRIPT_cut/out.pt).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import HH, HH_PROMPT, ROOT, TINY, TLDR, TLDR_PROMPT, load_script
from nanorlhf import checkpoint
from nanorlhf.config import UserError
from nanorlhf.data import load_prompts, write_jsonl
from nanorlhf.metrics import MetricsLog, read_metrics
from nanorlhf.model import ScalarModel

TIMES = {"time_s", "tokens_per_s", "t_rollout", "t_score", "t_update", "t_online"}  # wall-clock figures differ run to run


def launch(script, args, cwd, log):
    cmd = [sys.executable, str(ROOT / script), "--threads", "1", *map(str, args)]
    with open(log, "w") as f:  # the child has its own copy of the file descriptor
        return subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))


def finish(p, log):
    assert p.wait(timeout=300) == 0, log.read_text()[-3000:]
    return log.read_text()


def without_times(x):
    """Records or history as JSON text without the wall-clock figures (JSON text: NaN compares equal to NaN)."""
    return json.dumps([{k: v for k, v in r.items() if k not in TIMES} for r in x])


def kill_resume_and_compare(script, args, cwd, total, model_keys=("model",), name=None):
    name = name or script[:-3]
    ref, cut = cwd / f"{name}_ref" / "out.pt", cwd / f"{name}_cut" / "out.pt"
    log = {run: cwd / f"{name}_{run}.log" for run in ("ref", "cut", "resume")}
    finish(launch(script, [*args, "--out", ref], cwd, log["ref"]), log["ref"])

    p = launch(script, [*args, "--out", cut], cwd, log["cut"])
    while not cut.exists():  # the first mid-run checkpoint: kill at once, mid-run
        assert p.poll() is None, f"{script} ended before its first checkpoint:\n" + log["cut"].read_text()[-3000:]
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, f"{script} finished before it could be killed: give the test run more steps"
    mid = torch.load(cut, weights_only=False)
    assert "resume" in mid and 0 < mid["step"] < total

    out = finish(launch(script, [*args, "--out", cut, "--resume"], cwd, log["resume"]), log["resume"])
    assert f"resuming {cut} from step {mid['step']}" in out
    a, b = torch.load(ref, weights_only=False), torch.load(cut, weights_only=False)
    assert "resume" not in b and a["step"] == b["step"] == total
    for key in model_keys:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resuming"
    if "history" in a:
        assert without_times(a["history"]) == without_times(b["history"])
    ref_metrics, cut_metrics = read_metrics(ref.with_suffix("")), read_metrics(cut.with_suffix(""))
    assert [r["step"] for r in cut_metrics] == [r["step"] for r in ref_metrics]  # nothing logged twice
    assert without_times(cut_metrics) == without_times(ref_metrics)
    return a, b, out


def test_sft_killed_and_resumed_ends_as_an_uninterrupted_run(workdir):
    # Dropout draws from torch's generator, the epoch reshuffles (every 6 steps) from random.Random.
    args = ["--data", "data/sft.jsonl", "--eval_prompts", "data/prompts_eval.jsonl", "--eval_n", 4,
            "--eval_interval", 8, "--n_layer", 1, "--n_head", 2, "--n_embd", 16, "--block_size", 48,
            "--dropout", 0.1, "--batch_size", 8, "--max_iters", 24, "--warmup_iters", 5, "--ckpt_interval", 6]
    a, b, _ = kill_resume_and_compare("train_sft.py", args, workdir, total=24)
    assert len(a["history"]) == 1 + 24 // 8 and "gold" in a["history"][-1]
    # --resume of a finished run says so and changes nothing.
    cut = workdir / "train_sft_cut" / "out.pt"
    mtime = cut.stat().st_mtime_ns
    train_sft = load_script("train_sft")
    assert train_sft.main(train_sft.Config(out=str(cut), resume=True)) is None and cut.stat().st_mtime_ns == mtime


def test_rm_killed_and_resumed_reads_its_rankings_back(workdir):
    args = ["--n_prompts", 8, "--n_eval", 4, "--k", 3, "--max_new_tokens", 6, "--n_normalize", 4,
            "--batch_size", 2, "--epochs", 12, "--ckpt_interval", 8]
    a, b, out = kill_resume_and_compare("train_rm.py", args, workdir, total=48)
    assert "sampling" not in out  # the rankings the killed run wrote are read back, not sampled again
    assert json.dumps([a["eval"], a["sft_score_std"]]) == json.dumps([b["eval"], b["sft_score_std"]])


def test_ppo_killed_and_resumed_with_data_from_hh_rlhf(workdir):
    torch.manual_seed(1)
    checkpoint.save(workdir / "out" / "rm.pt", ScalarModel(TINY), kind="rm")
    turns = [f"\n\nHuman: List {i} {i + 1} please\n\nAssistant:" for i in range(10)]
    write_jsonl(workdir / "hh.jsonl", [{"chosen": t + " ok", "rejected": t + " no"} for t in turns])
    # The rollouts draw from a torch.Generator, the minibatches from torch's, PPO-ptx and the prompt order from
    # random.Random; beta adapts.
    args = ["--data", "hh.jsonl", "--iters", 9, "--batch_size", 4, "--minibatch_size", 2, "--ppo_epochs", 2,
            "--max_new_tokens", 6, "--eval_interval", 5, "--eval_n", 4, "--ptx_coef", 0.1, "--ckpt_interval", 3]
    a, b, out = kill_resume_and_compare("train_ppo.py", args, workdir, total=9, model_keys=("model", "value"))
    assert a["beta"] == b["beta"] != 0.2 and "PPO: 10 prompts" in out


def test_rloo_killed_and_resumed_without_a_value_function(workdir):
    torch.manual_seed(1)
    checkpoint.save(workdir / "out" / "rm.pt", ScalarModel(TINY), kind="rm")
    # The critic-free path: 2 prompts x k = 2 responses per iteration, the KL in RLOO's reward, beta adapting.
    args = ["--estimator", "rloo", "--samples_per_prompt", 2, "--iters", 9, "--batch_size", 4, "--minibatch_size", 2,
            "--ppo_epochs", 2, "--max_new_tokens", 6, "--eval_interval", 5, "--eval_n", 4, "--ptx_coef", 0.1,
            "--ckpt_interval", 3]
    a, b, out = kill_resume_and_compare("train_ppo.py", args, workdir, total=9, name="rloo")
    assert "value" not in a and "value" not in b  # nothing of a value function saved, mid-run or at the end
    assert a["beta"] == b["beta"] != 0.2 and "(rloo)" in out
    assert not {"vf_loss", "explained_var"} & set(a["history"][-1])


def test_online_ppo_killed_and_resumed_across_rm_updates(workdir):
    """Online collection: the RM, its optimizer, the labels so far and online's random streams are in the mid-run
    checkpoint; killed after iteration 3 and resumed, rounds at iterations 3 and 6 label and train as they would."""
    rm = workdir / "rm_online" / "rm.pt"
    rm_args = ["--n_prompts", 8, "--n_eval", 4, "--k", 3, "--max_new_tokens", 6, "--n_normalize", 4, "--batch_size", 4,
               "--epochs", 1, "--out", rm]
    r = subprocess.run([sys.executable, str(ROOT / "train_rm.py"), *map(str, rm_args)],
                       cwd=workdir, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    args = ["--rm", rm, "--iters", 9, "--batch_size", 4, "--minibatch_size", 2, "--ppo_epochs", 2,
            "--max_new_tokens", 6, "--eval_interval", 5, "--eval_n", 4, "--ckpt_interval", 3, "--online_every", 3,
            "--online_prompts", 4]
    a, b, out = kill_resume_and_compare("train_ppo.py", args, workdir, total=9, model_keys=("model", "value", "rm"),
                                        name="online")
    assert [h.get("online_labels") for h in a["history"] if "online_labels" in h] == [4, 8, 12]
    labels = [(workdir / f"online_{run}" / "out" / "labels.jsonl").read_text() for run in ("ref", "cut")]
    assert labels[0] == labels[1] and labels[0].count("\n") == 12


@pytest.mark.parametrize("script", ["train_sft", "train_rm", "train_ppo"])
def test_resume_without_a_checkpoint_is_one_line(tmp_path, script):
    module = load_script(script)
    with pytest.raises(UserError) as e:
        module.main(module.Config(out=str(tmp_path / "none.pt"), resume=True))
    assert str(e.value) == (f"--resume: no checkpoint at {tmp_path / 'none.pt'} to continue from "
                            f"(leave out --resume to start a new run)")


def test_metrics_of_a_resumed_run_drop_the_steps_after_the_checkpoint(tmp_path):
    with MetricsLog(tmp_path) as log:
        for step in (1, 2, 3, 4):
            log.log(step, loss=step / 10)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-write
    with MetricsLog(tmp_path, upto=2) as log:
        log.log(3, loss=0.0)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 3, "loss": 0.0}]


def test_prompt_texts_from_every_format(tmp_path):
    cases = [
        ([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}], ["a", "b"]),  # each distinct prompt once
        ([{"prompt": "a", "response": "r"}], ["a"]),
        ([{"prompt": "a", "responses": ["x", "y"]}], ["a"]),
        ([{"prompt": "a", "chosen": "x", "rejected": "y"}], ["a"]),
        ([HH, HH], [HH_PROMPT]),
        ([TLDR, dict(TLDR, choice=0)], [TLDR_PROMPT]),  # two comparisons of one post
        ([{"info": TLDR["info"], "summary": "s"}, {"post": "p", "summary": "s"}], [TLDR_PROMPT, "POST: p\nTL;DR:"]),
    ]
    for records, prompts in cases:
        write_jsonl(tmp_path / "p.jsonl", records)
        assert load_prompts(tmp_path / "p.jsonl") == prompts, records


@pytest.mark.parametrize("records,message", [
    ([{"prompt": "a"}, {"prompt": 3}], "p.jsonl:2: field 'prompt' must be str"),
    ([HH, {"chosen": "\n\nHuman: hi"}], "p.jsonl:2: field 'chosen': no '\\n\\nAssistant:' turn"),
    ([HH, {"rejected": "x"}], "p.jsonl:2: missing field 'chosen'"),
    ([TLDR, dict(TLDR, info={"title": "t"})], "p.jsonl:2: field 'info.post' is missing"),
    ([{"text": "a"}], "unknown format (the first record has fields ['text'])"),
])
def test_bad_prompt_records_name_file_and_line(tmp_path, records, message):
    write_jsonl(tmp_path / "p.jsonl", records)
    with pytest.raises(UserError) as e:
        load_prompts(tmp_path / "p.jsonl")
    assert message in str(e.value) and "\n" not in str(e.value).replace("\\n", "")
