"""The benchmarks (bench/) at their --tiny sizes, so that they cannot rot: each runs in seconds on CPU and must print
its tables with the expected rows and finite numbers (on a GPU too: --tiny picks the same small rows there)."""

import math
import os
import subprocess
import sys

import pytest
import torch

from bench import attention as bench_attention
from bench import logprobs as bench_logprobs
from conftest import ROOT, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tables(text):
    """The markdown tables of text: each a list of rows (lists of cells), the header row first."""
    found, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        if current is None:
            current = []
            found.append(current)
        if set(line) - set("|-"):  # not the |---| separator
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
    return found


def column(table, name):
    """The cells of one column, by header name."""
    i = table[0].index(name)
    return [row[i] for row in table[1:]]


def finite_positive(cells):
    return all(math.isfinite(float(c)) and float(c) > 0 for c in cells)


def test_attention_bench_tiny(capsys, tmp_path):
    out_file = tmp_path / "attention.md"
    assert bench_attention.main(["--tiny", "--write", str(out_file)]) == 0
    text = capsys.readouterr().out
    valid, train, decode = tables(text)
    assert valid[0][:3] == ["case (B, H, Tq, Tk, D)", "dtype", "path"]
    assert [row[-1] for row in valid[1:]] == ["yes", "yes"]  # one flash fwd+bwd case, one decode case
    providers = ["reference", "torch", "sdpa", "eager"]
    assert [(r[3], r[4]) for r in train[1:]] == [(p, n) for p in ("fwd", "bwd", "fwd+bwd") for n in providers]
    assert finite_positive(column(train, "ms")) and finite_positive(column(train, "TFLOP/s"))
    assert column(decode, "provider") == providers and finite_positive(column(decode, "ms"))
    report = out_file.read_text()
    assert report == text[:text.index("\nwrote ")]  # the file holds what was printed
    assert "- device: " in report and "- torch 2." in report and "- date: " in report


def test_logprobs_bench_tiny(capsys):
    assert bench_logprobs.main(["--tiny"]) == 0
    text = capsys.readouterr().out
    assert text.count("-> ok") == 3  # bf16 from logits (twice) and fused, through the interpreter
    (seam,) = tables(text)
    rows = [(r[3], r[4]) for r in seam[1:]]
    impls = ("reference", "naive", "torch", "torch-lean")
    assert rows == [(out, n) for out in ("logp", "logp, entropy") for n in impls]
    for name in ("fwd ms", "bwd ms", "fwd+bwd ms", "x reference"):
        assert finite_positive(column(seam, name)), name
    diffs = [float(c) for c in column(seam, "max abs grad diff vs reference")]  # fp32 on CPU, bf16 on a GPU
    assert all(d < (1e-3 if DEVICE == "cpu" else 1e-1) for d in diffs)


def test_bench_runs_as_a_file_too(tmp_path):
    """`python bench/logprobs.py`, from elsewhere, with only the installed package on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "logprobs.py"), "--tiny", "--parts", "seam"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert len(tables(r.stdout)) == 1


def test_bench_flags_are_checked():
    with pytest.raises(SystemExit):
        bench_attention.main(["--parts", "train,speed"])
    with pytest.raises(SystemExit):
        bench_logprobs.main(["--impls", "reference,fast"])


def test_ppo_bench_tiny(tmp_path):
    """bench.ppo runs train_ppo.py itself on random models and reports its per-phase times."""
    r = run("bench.ppo", "--iters", 2, "--n_layer", 1, "--n_head", 2, "--n_embd", 16, "--block_size", 16,
            "--prompt_len", 4, "--max_new_tokens", 4, "--batch_size", 8, "--minibatch_size", 4, "--ppo_epochs", 1,
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (table,) = tables(r.stdout)
    assert column(table, "phase") == ["rollout", "scoring", "update", "iteration"]
    for name in ("median s", "min s", "max s"):
        assert finite_positive(column(table, name)), name
    phases = [float(x) for x in column(table, "median s")]
    assert phases[3] >= max(phases[:3])  # an iteration holds its phases
    assert "peak RSS of the run" in r.stdout and list(tmp_path.iterdir()) == []  # its files went to a temp folder


def test_the_gpu_script_plans_every_measurement_within_eight_minutes(capsys):
    """bench/gpu.py (`make gpu`) runs on a lent GPU only; here its plan: every part, the issue's sizes, the budget."""
    from bench import gpu  # noqa: PLC0415

    plan = gpu.parts()
    assert [name for name, _, _ in plan] == ["env", "tests", "logprobs", "attention", "ppo", "demo"]
    assert sum(share for _, share, _ in plan) <= 1.0 and gpu.BUDGET <= 480  # 8 minutes: room in a 10-minute command
    cmd = {name: [" ".join(c) for _, c, _ in steps] for name, _, steps in plan}
    assert "--n 8192,16384 --v 50257,151936 --d 768,4096" in cmd["logprobs"][0]
    assert "--fused-impls eager,compile,ours,liger,cce" in cmd["logprobs"][0]
    assert "--seqlens 512,1024,2048,4096" in cmd["attention"][0]
    assert [env["NANORLHF_KERNELS"] for _, _, env in plan[4][2]] == ["triton", "torch"]
    assert all("--n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --dtype bfloat16" in c for c in cmd["ppo"])
    assert gpu.main(["--plan"]) == 0 and "demo: " in capsys.readouterr().out
