"""Every bad input stops with one line and touches nothing (issue 14).

Each case runs a script as a user would, in a folder that holds a previous run's every output (checkpoints,
metrics, rankings, the evaluation table, human rankings) and the bad inputs, and checks: exit code != 0, no
traceback, the last line of stderr names the flag or FILE[:LINE], and every file and folder is as it was (bytes
compared; no new file, no half-written one, no new folder). The classes of the issue, each against every script it
applies to:
  1 unreadable data files        (bytes that are not UTF-8, a .gz that is not gzip, a directory)
  2 flag values out of range      (sizes, counts, intervals, temperatures, lengths that leave no room)
  3 flags that silently damaged outputs (the RM's negative batch size, --k 1)
  4 a run that fails after start-up (non-finite loss) leaves the previous run's files as they were
  4b output paths that cannot be made (a parent that is a file, a directory where a file goes)
  5 weights with another vocabulary than GPT-2's
  6 data errors name FILE:LINE (blank lines count)
  7 the labeling CLI asks again on answers that are not a ranking (digits int() refuses, bytes that are not UTF-8)
Most cases stop in start-up (~2 s each: the Python and torch start); the class-4 ones train a step or two.
"""

import json
from dataclasses import fields

import pytest
import torch

from conftest import TINY, load_script, run
from nanorlhf import checkpoint, evaluate, label, sample, tasks
from nanorlhf.config import UserError
from nanorlhf.data import write_jsonl
from nanorlhf.metrics import MetricsLog
from nanorlhf.model import GPT, GPTConfig, ScalarModel

# Small settings, so that a case that were to get past start-up by mistake ends in seconds, not minutes.
SFT = ["--n_layer", 1, "--n_head", 2, "--n_embd", 16, "--block_size", 48, "--max_iters", 3, "--batch_size", 4,
       "--eval_n", 2, "--eval_interval", 3]
RM = ["--n_prompts", 4, "--n_eval", 2, "--k", 2, "--max_new_tokens", 4, "--n_normalize", 4, "--epochs", 1,
      "--batch_size", 2]
PPO = ["--iters", 1, "--batch_size", 4, "--minibatch_size", 2, "--max_new_tokens", 4, "--eval_n", 2]
EVAL = ["--n", 4, "--max_new_tokens", 4]
LABEL = ["--k", 2, "--max_new_tokens", 4]
SAMPLE = ["--prompt", "Sort: 1 2\\nAnswer:", "--max_new_tokens", 4]
TASKS = ["--n_sft", 10, "--n_train_prompts", 10, "--n_eval_prompts", 10]
NAN = ["--lr", 1e30, "--grad_clip", 0]  # the loss stops being finite after a step or two

CASES = [
    # 1. unreadable data files
    ("sft-data-not-utf8", "train_sft.py", SFT + ["--data", "bad/not_utf8.jsonl"], "bad/not_utf8.jsonl:3: not UTF-8"),
    ("rm-data-not-gzip", "train_rm.py", RM + ["--data", "bad/not_gzip.jsonl.gz"], "bad/not_gzip.jsonl.gz: not gzip"),
    ("ppo-data-a-directory", "train_ppo.py", PPO + ["--data", "bad/a_dir.jsonl"], "bad/a_dir.jsonl: is a directory"),
    ("eval-prompts-not-utf8", "nanorlhf.evaluate", EVAL + ["--prompts", "bad/not_utf8.jsonl"],
     "bad/not_utf8.jsonl:3: not UTF-8"),
    ("label-prompts-not-gzip", "nanorlhf.label", LABEL + ["--prompts", "bad/not_gzip.jsonl.gz"],
     "bad/not_gzip.jsonl.gz: not gzip"),
    ("plot-metrics-not-utf8", "nanorlhf.plot", ["bad/run"], "bad/run/metrics.jsonl:2: not UTF-8"),
    # 2. flag values out of range, and relations between them
    ("sft-eval-interval-0", "train_sft.py", SFT + ["--eval_interval", 0], "--eval_interval must be at least 1, got 0"),
    ("rm-no-room-for-a-prompt", "train_rm.py", RM + ["--max_new_tokens", 48],
     "--max_new_tokens 48 leaves no room for a prompt in the context of out/sft.pt (block_size 48)"),
    ("ppo-temperature-0", "train_ppo.py", PPO + ["--temperature", 0], "--temperature must be > 0, got 0.0"),
    ("ppo-minibatch-over-batch", "train_ppo.py", PPO + ["--minibatch_size", 8],
     "--minibatch_size must be at most --batch_size 4, got 8"),
    ("ppo-rloo-one-sample-per-prompt", "train_ppo.py", PPO + ["--estimator", "rloo"],
     "--samples_per_prompt must be at least 2 with --estimator rloo (a baseline from the others), got 1"),
    ("ppo-online-other-prompts", "train_ppo.py", PPO + ["--online_every", 1, "--data", "bad/other_prompts.jsonl"],
     "--online_every labels with the built-in task's scripted labeler: bad/other_prompts.jsonl holds other prompts"),
    ("ppo-online-rm-not-from-train-rm", "train_ppo.py", PPO + ["--online_every", 1],
     "--online_every: out/rm.pt was not written by train_rm.py"),
    ("ppo-online-person-earlier-queue", "train_ppo.py", PPO + ["--online_every", 1, "--online_labeler", "person"],
     "--online_labeler person: out/ppo/queue holds the rounds of an earlier run"),
    ("eval-best-of-0", "nanorlhf.evaluate", EVAL + ["--best_of", 0], "--best_of must be at least 1, got 0"),
    ("label-temperature-0", "nanorlhf.label", LABEL + ["--temperature", 0], "--temperature must be > 0, got 0.0"),
    ("sample-top-p", "nanorlhf.sample", SAMPLE + ["--top_p", 1.5], "--top_p must be in (0, 1], got 1.5"),
    ("tasks-min-len-1", "nanorlhf.tasks", TASKS + ["--min_len", 1], "--min_len must be at least 2, got 1"),
    ("sft-lr-nan", "train_sft.py", SFT + ["--lr", "nan"], "--lr must be a finite number, got nan"),
    # 3. flags that used to damage outputs silently
    ("rm-negative-batch", "train_rm.py", RM + ["--batch_size", -2], "--batch_size must be at least 1, got -2"),
    ("rm-k-1", "train_rm.py", RM + ["--k", 1], "--k must be at least 2, got 1"),
    # 4. a run that fails after start-up: the previous run's checkpoint, metrics and rankings stay as they were
    ("sft-fails-mid-run", "train_sft.py", SFT + NAN, "lower --lr"),
    ("rm-fails-mid-run", "train_rm.py", RM + NAN, "lower --lr"),
    ("ppo-fails-mid-run", "train_ppo.py", PPO + NAN + ["--ppo_epochs", 2], "lower --lr"),
    # 4b. outputs that cannot be made
    ("sft-out-under-a-file", "train_sft.py", SFT + ["--out", "bad/a_file/sft.pt"],
     "--out bad/a_file/sft.pt: cannot be created, bad/a_file is a file"),
    ("rm-metrics-folder-is-a-file", "train_rm.py", RM + ["--out", "bad/a_file.pt"],
     "--out bad/a_file.pt: its metrics folder bad/a_file: is a file"),
    ("ppo-out-is-a-directory", "train_ppo.py", PPO + ["--out", "bad/a_dir.jsonl"],
     "--out bad/a_dir.jsonl: is a directory"),
    ("sft-out-without-extension", "train_sft.py", SFT + ["--out", "out/sft"],
     "--out must be a file name with an extension"),
    ("eval-out-under-a-file", "nanorlhf.evaluate", EVAL + ["--out", "bad/a_file/eval.md"],
     "--out bad/a_file/eval.md: cannot be created"),
    ("label-out-under-a-file", "nanorlhf.label", LABEL + ["--out", "bad/a_file/r.jsonl"],
     "--out bad/a_file/r.jsonl: cannot be created"),
    ("tasks-out-is-a-file", "nanorlhf.tasks", TASKS + ["--out", "bad/a_file"], "--out bad/a_file: is a file"),
    ("plot-out-under-a-file", "nanorlhf.plot", ["out/sft", "--out", "bad/a_file/png"],
     "--out bad/a_file/png: cannot be created"),
    # 5. weights with another vocabulary
    ("sft-init-from-hf-vocab", "train_sft.py", SFT + ["--init_from", "bad/hf_vocab"],
     "bad/hf_vocab/config.json: vocab_size 61 is not GPT-2's 50257"),
    ("sample-hf-vocab", "nanorlhf.sample", SAMPLE + ["--ckpt", "bad/hf_vocab"], "vocab_size 61 is not GPT-2's 50257"),
    ("label-ckpt-vocab", "nanorlhf.label", LABEL + ["--ckpt", "bad/vocab97.pt"],
     "bad/vocab97.pt: vocab_size 97 is not GPT-2's 50257"),
    ("rm-sft-vocab", "train_rm.py", RM + ["--sft", "bad/vocab97.pt"], "bad/vocab97.pt: vocab_size 97"),
    ("rm-init-from-vocab", "train_rm.py", RM + ["--init_from", "bad/vocab97.pt"], "bad/vocab97.pt: vocab_size 97"),
    ("ppo-rm-vocab", "train_ppo.py", PPO + ["--rm", "bad/vocab97.pt"], "bad/vocab97.pt: vocab_size 97"),
    ("eval-ppo-vocab", "nanorlhf.evaluate", EVAL + ["--ppo", "bad/vocab97.pt"], "bad/vocab97.pt: vocab_size 97"),
    # 6. data errors name FILE:LINE
    ("sft-response-too-long", "train_sft.py", SFT + ["--data", "bad/too_long.jsonl"],
     "bad/too_long.jsonl:3: the response alone is longer than the context (block_size 48 tokens)"),
    ("ppo-ptx-response-too-long", "train_ppo.py", PPO + ["--ptx_coef", 0.1, "--ptx_data", "bad/too_long.jsonl"],
     "bad/too_long.jsonl:3: the response alone is longer"),
    ("ppo-ptx-text-not-utf8", "train_ppo.py", PPO + ["--ptx_coef", 0.1, "--ptx_data", "bad/not_utf8.txt"],
     "bad/not_utf8.txt:2: not UTF-8 text"),
    ("ppo-empty-prompt", "train_ppo.py", PPO + ["--data", "bad/empty_prompt.jsonl"],
     "bad/empty_prompt.jsonl:3: field 'prompt' is empty"),
    ("rm-unknown-format", "train_rm.py", RM + ["--data", "bad/unknown.jsonl"], "bad/unknown.jsonl:2: unknown format"),
    ("eval-empty-prompt", "nanorlhf.evaluate", EVAL + ["--prompts", "bad/empty_prompt.jsonl"],
     "bad/empty_prompt.jsonl:3: field 'prompt' is empty"),
]


@pytest.fixture(scope="module")
def world(workdir):
    """workdir (the built-in data, a tiny out/sft.pt), a previous run's every output, and the bad inputs."""
    d = workdir
    torch.manual_seed(1)
    checkpoint.save(d / "out" / "rm.pt", ScalarModel(TINY), kind="rm")
    checkpoint.save(d / "out" / "ppo.pt", GPT(TINY), kind="ppo")
    for name in ("sft", "rm", "ppo"):
        with MetricsLog(d / "out" / name) as log:
            log.log(1, loss=1.0)
            log.log(2, loss=0.5)
    ranking = {"prompt": "Sort: 2 1\nAnswer:", "responses": [" 1 2", " 2 1"]}
    for path in ("out/rankings_train.jsonl", "out/rankings_eval.jsonl", "data/rankings_human.jsonl"):
        write_jsonl(d / path, [ranking])
    (d / "out" / "eval.md").write_text("| PPO | 0.800 ± 0.010 | +0.500 | 0.70 |\n")
    (d / "out" / "eval.json").write_text('{"gain": 0.15}\n')
    write_jsonl(d / "out" / "ppo" / "queue" / "round_00000.jsonl", [dict(ranking, choose=False)])  # a person's round

    bad = d / "bad"
    bad.mkdir()
    (bad / "not_utf8.jsonl").write_bytes(b'{"prompt": "a", "response": " b"}\n\n{"prompt": "caf\xe9", '
                                         b'"response": " b"}\n')
    (bad / "not_gzip.jsonl.gz").write_text('{"prompt": "a", "response": " b"}\n')
    (bad / "not_utf8.txt").write_bytes(b"Plain text for PPO-ptx,\nthen caf\xe9.\n")
    (bad / "a_dir.jsonl").mkdir()
    (bad / "a_file").write_text("a file where a folder would go\n")
    demo = {"prompt": "Sort: 2 1\nAnswer:", "response": " 1 2"}
    (bad / "too_long.jsonl").write_text(json.dumps(demo) + "\n\n" + json.dumps(dict(demo, response=" 1" * 60)) + "\n")
    (bad / "empty_prompt.jsonl").write_text('{"prompt": "Sort: 2 1\\nAnswer:"}\n\n{"prompt": ""}\n')
    (bad / "other_prompts.jsonl").write_text('{"prompt": "Human: hello"}\n')
    (bad / "unknown.jsonl").write_text('\n{"question": "q", "answer": "a"}\n')
    (bad / "hf_vocab").mkdir()  # a Hugging Face GPT-2 directory of another vocabulary: refused from its config
    (bad / "hf_vocab" / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", n_layer=1, n_head=2, n_embd=16, n_positions=48, vocab_size=61)))
    checkpoint.save(bad / "vocab97.pt", GPT(GPTConfig(block_size=48, vocab_size=97, n_layer=1, n_head=2, n_embd=16)),
                    kind="sft")
    (bad / "run").mkdir()
    (bad / "run" / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \xff}\n'
                                                b'{"step": 3, "loss": 0.5}\n')
    return d


def snapshot(d):
    """{path: bytes} of every file under d, and {path: None} of every folder (a new empty one shows too)."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(d.rglob("*")) if "__pycache__" not in p.parts}


@pytest.mark.parametrize("script,args,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_and_touches_nothing(world, script, args, names):
    before = snapshot(world)
    r = run(script, *args, cwd=world, input="")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and names in lines[-1], r.stderr[-2000:]
    after = snapshot(world)
    assert sorted(set(after) - set(before)) == [], "new files or folders"
    assert sorted(set(before) - set(after)) == [], "files or folders gone"
    assert [p for p in before if before[p] != after[p]] == [], "files changed"


def test_the_labeling_cli_asks_again_on_digits_int_refuses_and_bytes_not_utf8(world):
    """'²¹' and '①②' are digits to str.isdigit() but no numbers to int(); a byte that is not UTF-8 is no answer."""
    before = snapshot(world)
    r = run("nanorlhf.label", *LABEL, cwd=world, input="²¹\n①②\n\udcff\n9 9\nq\n", errors="surrogateescape")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stdout.count("rank all 2 responses, best first") == 4  # each bad answer asked again, with the hint
    assert snapshot(world) == before  # quit without ranking: the rankings file is as it was


# ------------------------------------------------------------------------------------------------------------------
# Every field of every Config has its range checked, in code as on the command line (no subprocess: milliseconds).

def configs():
    return {"train_sft": load_script("train_sft").Config, "train_rm": load_script("train_rm").Config,
            "train_ppo": load_script("train_ppo").Config, "evaluate": evaluate.EvalConfig, "label": label.Config,
            "sample": sample.Config, "tasks": tasks.TaskConfig}


BIG_SEED = 2 ** 63
# {config: {field: a value out of its range}}: every int and float field is here (checked below), with the
# constrained string fields. Booleans take any value; the other strings are paths, checked when read.
BAD = {
    "train_sft": dict(n_layer=0, n_head=-1, n_embd=0, block_size=0, dropout=1.0, batch_size=0, max_iters=0, lr=0.0,
                      min_lr=-1e-4, warmup_iters=-1, weight_decay=-0.1, grad_clip=-1.0, val_fraction=1.0,
                      eval_interval=0, eval_n=-1, temperature=-1.0, max_new_tokens=64, seed=BIG_SEED, threads=-1,
                      ckpt_interval=-1, data="", out="out/sft", dtype="fp16", micro_batch_size=-1),
    "train_rm": dict(n_prompts=0, n_eval=0, k=1, label_noise=-0.1, temperature=0.0, max_new_tokens=0,
                     eval_fraction=float("inf"), batch_size=-1, epochs=0, lr=-3e-4, warmup_iters=-1,
                     weight_decay=-1.0, grad_clip=-1.0, center_coef=-0.01, n_normalize=1, seed=-2 ** 63 - 1,
                     threads=-2, ckpt_interval=-1, sft="", out="out/rm", dtype="half", eval_data="x.jsonl",
                     micro_batch_size=-1, sample_batch_size=0, labels="best"),
    "train_ppo": dict(iters=0, batch_size=0, minibatch_size=0, ppo_epochs=0, lr=0.0, vf_lr=-1.0, temperature=0.0,
                      max_new_tokens=0, no_eos_penalty=float("nan"), init_kl_coef=-0.2, target_kl=0.0, kl_horizon=0,
                      gamma=1.5, lam=-0.1, cliprange=0.0, cliprange_value=-0.2, ent_coef=-0.01, ptx_coef=-0.1,
                      grad_clip=-1.0, eval_interval=0, eval_n=-1, seed=BIG_SEED, threads=-1, ckpt_interval=-10,
                      sft="", rm="", out="out/ppo", prompts="", dtype="fp8", micro_batch_size=-1,
                      samples_per_prompt=0, estimator="ppo", online_every=-1, online_prompts=0, online_rm_epochs=0,
                      online_labeler="crowd"),
    "evaluate": dict(n=0, best_of=0, temperature=0.0, max_new_tokens=0, no_eos_penalty=float("-inf"), seed=BIG_SEED,
                     out="out/eval.json", prompts=""),
    "label": dict(k=1, max_new_tokens=0, temperature=0.0, top_k=-1, top_p=0.0, seed=BIG_SEED, threads=-1, out=""),
    "sample": dict(n=0, max_new_tokens=0, temperature=-0.5, top_k=-1, top_p=1.01, seed=-2, ckpt=""),
    "tasks": dict(n_sft=0, n_train_prompts=-1, n_eval_prompts=0, min_len=1, max_len=2, error_rate=1.5,
                  seed=BIG_SEED, out=""),
}
RELATIONS = [  # (config, fields, the flag the message names)
    ("train_sft", dict(n_embd=100, n_head=3), "--n_embd must be a multiple of --n_head 3"),
    ("train_sft", dict(min_lr=1e-2, lr=1e-3), "--min_lr must be in [0, 0.001]"),
    ("train_sft", dict(block_size=16, max_new_tokens=16), "--max_new_tokens 16 leaves no room"),
    ("train_rm", dict(data="r.jsonl", eval_fraction=0.0), "--eval_fraction must be in (0, 1)"),
    ("train_rm", dict(unit_std=False, n_normalize=0), "--n_normalize must be at least 1"),
    ("train_ppo", dict(batch_size=4, minibatch_size=8), "--minibatch_size must be at most --batch_size 4"),
    ("train_ppo", dict(ptx_coef=0.1, ptx_data=""), "--ptx_data must name a file"),
    ("train_ppo", dict(estimator="grpo", samples_per_prompt=1), "--samples_per_prompt must be at least 2 with "
                                                                 "--estimator grpo"),
    ("train_ppo", dict(estimator="rloo", samples_per_prompt=2, gamma=0.9), "--gamma is GAE's: --estimator rloo has no"),
    ("train_ppo", dict(estimator="grpo", samples_per_prompt=2, whiten_rewards=True), "--whiten_rewards is GAE's"),
    ("train_ppo", dict(online_every=5, fsdp=True), "--online_every trains the RM unsharded: leave out --fsdp"),
    ("train_ppo", dict(online_labeler="person"), "--online_labeler person needs --online_every"),
    ("label", dict(queue="out/ppo/queue", choose=True), "--choose is not used with --queue: the run samples"),
    ("label", dict(queue="out/ppo/queue", k=8), "--k is not used with --queue"),
    ("train_ppo", dict(batch_size=6, samples_per_prompt=4), "--batch_size must be a multiple of --samples_per_prompt"),
    ("tasks", dict(n_train_prompts=300, n_eval_prompts=300, min_len=2, max_len=2), "--n_train_prompts + "),
]


@pytest.mark.parametrize("name", list(BAD))
def test_every_field_of_every_config_is_range_checked(name):
    cls = configs()[name]
    cls()  # the defaults are in range
    numeric = {f.name for f in fields(cls) if type(getattr(cls(), f.name)) in (int, float)}
    assert numeric <= set(BAD[name]), f"no out-of-range value tried for {sorted(numeric - set(BAD[name]))}"
    for field, value in BAD[name].items():
        with pytest.raises(UserError) as e:
            cls(**{field: value})
        assert str(e.value).startswith(f"--{field} "), (field, str(e.value))


@pytest.mark.parametrize("name,values,message", RELATIONS)
def test_relations_between_fields_are_checked(name, values, message):
    with pytest.raises(UserError) as e:
        configs()[name](**values)
    assert message in str(e.value)
