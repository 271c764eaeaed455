"""The rehearsal at GPT-2's real size (python -m nanorlhf.rehearse, `make rehearse`), with one step per stage."""

import json

from conftest import run
from nanorlhf.data import load_preferences, load_prompts
from nanorlhf.pretrained import load_gpt2
from nanorlhf.rehearse import RehearseConfig, size_table

# GPT-2 124M's width, context and vocabulary; fewer blocks keep the test within a minute or two on 2 CPU cores.
ARGS = ["--n_layer", 2, "--rm_layers", 1, "--sft_steps", 1, "--rm_steps", 1, "--ppo_iters", 1, "--batch_size", 2,
        "--micro_batch_size", 1, "--max_new_tokens", 8]


def test_the_pipeline_runs_at_real_size_and_reports_time_and_memory(tmp_path):
    work, results = tmp_path / "rehearsal", tmp_path / "rehearsal.md"
    r = run("nanorlhf.rehearse", "--out", work, "--results", results, *ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = results.read_text()
    for stage in ("sft", "rm", "ppo"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {stage} |"))
        assert " s | " in row and "B | " in row  # its time, peak RSS and estimate
        assert (work / "out" / f"{stage}.pt").exists()
    assert all(f"| {size} |" in table for size in ("124M", "355M", "774M", "1.5B"))
    # The weights are GPT-2's layout and shape: they load as any GPT-2 directory does.
    model = load_gpt2(work / "gpt2")
    assert (model.config.n_embd, model.config.block_size, model.config.vocab_size) == (768, 1024, 50257)
    assert json.loads((work / "gpt2-rm" / "config.json").read_text())["n_layer"] == 1
    # The data's quirks reached the loaders: HH pairs that part early (split, or skipped), CNN/DM records skipped.
    rm_log, ppo_log = ((work / f"{s}.log").read_text() for s in ("rm", "ppo"))
    assert "differ before their last Assistant turn" in rm_log and "1 skipped" in rm_log
    assert "CNN/DM" in ppo_log and "memory per process (estimate)" in ppo_log
    data = work / "data"
    assert len(load_preferences(data / "hh.jsonl")) == 2 and 2 <= len(load_prompts(data / "tldr.jsonl"))


def test_the_size_table_grows_with_the_model():
    lines = size_table()
    assert len(lines) == 2 + 4
    totals = [[float(cell.split()[0]) * (1024 if "GB" in cell else 1) for cell in line.split("|")[3:-1]]
              for line in lines[2:]]
    for row in totals:
        assert row[1] < row[0] and row[3] < row[2] and row[4] < row[3]  # checkpointing and FSDP save memory
    assert [row[0] for row in totals] == sorted(row[0] for row in totals)
    assert RehearseConfig().n_layer == 12 and RehearseConfig().block_size == 1024  # GPT-2 124M's shape
