"""The labeling CLI (driven by scripted stdin) and the sampling CLI it shares its model loading with."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanorlhf import checkpoint, label, sample
from nanorlhf.config import UserError
from nanorlhf.data import load_preferences, load_rankings, with_end, write_jsonl
from nanorlhf.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Sort: 3 1 2\nAnswer:", "Hello there", "Count: 1 2\nAnswer:", "Largest: 4 8\nAnswer:"]
ARGS = dict(k=4, max_new_tokens=6, seed=7)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random GPT with GPT-2's real vocabulary (so any text encodes), saved as an sft checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "sft.pt"
    checkpoint.save(path, GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)), kind="sft")
    return path


def run_label(ckpt, prompts, out, stdin):
    cmd = [sys.executable, "-m", "nanorlhf.label", "--ckpt", str(ckpt), "--prompts", str(prompts), "--out", str(out)]
    cmd += [a for name, value in ARGS.items() for a in (f"--{name}", str(value))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")  # 1 thread: the same samples as below
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


@pytest.fixture
def one_thread():
    """Run on 1 thread, as the CLI does in run_label, so both draw the very same samples."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected_responses(ckpt, i):
    """What the CLI showed for prompt i: its responses are drawn from seed + i."""
    model = sample.load_policy(ckpt)
    return label.draw_responses(model, PROMPTS[i], label.Config(**ARGS), ARGS["seed"] + i)


def test_rankings_typed_are_written_and_a_second_session_resumes(tmp_path, ckpt, monkeypatch, capsys, one_thread):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "human" / "rankings.jsonl"

    # Session 1: three bad answers then a ranking; skip prompt 2; quit at prompt 3.
    run = run_label(ckpt, tmp_path / "prompts.jsonl", out, "hello\n5 1 2 3\n1 1 2 3\n3 1 4 2\ns\nq\n")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("rank all 4 responses, best first") == 3  # one hint per bad answer
    assert "prompt 1 of 4" in run.stdout and "[4]" in run.stdout and "prompt 3 of 4" in run.stdout
    r0 = expected_responses(ckpt, 0)
    assert len(r0) == 4
    # the file holds the texts as sampled (an unfinished one without "<|endoftext|>"), in the order typed
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": PROMPTS[0], "responses": [r0[2], r0[0], r0[3], r0[1]]}]
    assert load_rankings(out) == [(PROMPTS[0], [with_end(r0[j]) for j in (2, 0, 3, 1)])]

    # Session 2 (in-process: a second torch start-up costs seconds) resumes after prompt 1; the skipped prompt 2
    # comes back; "4132" is a ranking too; then the input ends.
    monkeypatch.setattr(sys, "stdin", io.StringIO("4132\n"))
    label.main(label.Config(ckpt=str(ckpt), prompts=str(tmp_path / "prompts.jsonl"), out=str(out), **ARGS))
    stdout = capsys.readouterr().out
    assert "1 rankings already in" in stdout and "prompt 1 of 4" not in stdout and "prompt 2 of 4" in stdout
    r1 = expected_responses(ckpt, 1)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [{"prompt": PROMPTS[0], "responses": [r0[2], r0[0], r0[3], r0[1]]},
                       {"prompt": PROMPTS[1], "responses": [r1[3], r1[0], r1[2], r1[1]]}]
    assert all(len(set(r["responses"])) == 4 for r in records)  # distinct: each pair carries information
    assert len(load_rankings(out)) == 2


def test_parse_ranking():
    assert label.parse_ranking("3 1 4 2", 4) == [2, 0, 3, 1]
    assert label.parse_ranking(" 2,1 ", 2) == [1, 0]
    assert label.parse_ranking("312", 3) == [2, 0, 1]
    for bad in ["3 1 4", "3 1 4 4", "0 1 2 3", "a b c d", "", "1 2 3 4 5"]:
        assert label.parse_ranking(bad, 4) is None, bad
    # digits to str.isdigit() that int() refuses (superscripts, circled digits) are no ranking: asked again
    for bad in ["²¹", "² ¹", "①②", "1 ²", "\ufffd\ufffd", "-1 2", "1.0 2"]:
        assert label.parse_ranking(bad, 2) is None, bad
    assert label.parse_ranking("２ １", 2) == [1, 0]  # full-width digits are decimal digits: int() reads them


def test_sample_cli_reads_prompts_from_stdin(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Sort: 3 1 2\\nAnswer:\n\nHi\n"))
    sample.main(sample.Config(ckpt=str(ckpt), n=2, max_new_tokens=5, temperature=0.0))
    out = capsys.readouterr().out
    assert out.count("--- sample 1 ---") == 3 and out.count("--- sample 2 ---") == 3  # 3 prompts, the empty one too
    # greedy decoding: both samples of a prompt are the same text
    blocks = out.split("--- sample 1 ---\n")[1:]
    for block in blocks:
        first, second = block.split("--- sample 2 ---\n")
        assert first == second


def test_respond_escapes_and_kinds(ckpt, tmp_path):
    model = sample.load_policy(ckpt)
    assert not model.training
    g = torch.Generator().manual_seed(0)
    samples = sample.respond(model, "a\nb", n=3, max_new_tokens=4, generator=g)
    assert len(samples) == 3 and all(isinstance(t, str) and isinstance(e, bool) for t, e in samples)
    assert all(t.endswith(sample.END) == e for t, e in samples)
    assert sample.unescape("Sort: 1\\nAnswer:\n") == "Sort: 1\nAnswer:"
    with pytest.raises(UserError, match="leaves no room"):
        sample.respond(model, "a", max_new_tokens=64)
    checkpoint.save(tmp_path / "rm.pt", model, kind="rm")
    with pytest.raises(UserError, match="is a 'rm' checkpoint"):
        sample.load_policy(tmp_path / "rm.pt")
    with pytest.raises(UserError, match="not found"):
        sample.load_policy(tmp_path / "nope.pt")


def test_choose_mode_writes_the_best_of_k(tmp_path, ckpt, monkeypatch, capsys, one_thread):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    out = tmp_path / "choices.jsonl"
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 2\n9\n²\n3\ns\n"))  # a ranking, out of range, no number: asked
    label.main(label.Config(ckpt=str(ckpt), prompts=str(tmp_path / "prompts.jsonl"), out=str(out), choose=True,
                            **ARGS))
    stdout = capsys.readouterr().out
    assert stdout.count("the number of the best response, 1 to 4") == 3 and "0 choices already in" in stdout
    assert "choices are in" in stdout
    r0 = expected_responses(ckpt, 0)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": PROMPTS[0], "responses": r0, "best": 2}]
    assert load_preferences(out) == [(PROMPTS[0], [with_end(r0[j]) for j in (2, 0, 1, 3)])]
    assert label.parse_choice("4", 4) == 3 and label.parse_choice("0", 4) is None
    with pytest.raises(UserError, match="holds choices, and this session would add rankings"):
        label.main(label.Config(ckpt=str(ckpt), prompts=str(tmp_path / "prompts.jsonl"), out=str(out), **ARGS))


# ------------------------------------------------------------------------------------------------------------------
# --queue: a person as the labeler of an online PPO run (train_ppo.py --online_labeler person, nanorlhf/online.py)

ROUND = [{"prompt": "Sort: 2 1\nAnswer:", "responses": [" 1 2<|endoftext|>", " 2 1<|endoftext|>", " 1"]},
         {"prompt": "Largest: 4 8\nAnswer:", "responses": [" 4<|endoftext|>", " 8<|endoftext|>"]}]


def make_round(queue, it, records=ROUND, choose=False):
    write_jsonl(queue / f"round_{it:05d}.jsonl", [dict(r, choose=choose) for r in records])


def ctrl_c(seconds):
    raise KeyboardInterrupt  # the person stops the labeler while it waits for the next round


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_queue_is_served_oldest_open_round_first_then_it_waits(tmp_path, monkeypatch, capsys):
    queue = tmp_path / "queue"
    make_round(queue, 0)
    (queue / "round_00000.done").touch()  # finished earlier: not shown again
    make_round(queue, 10, ROUND[1:])
    make_round(queue, 5)
    monkeypatch.setattr(label, "load_policy", lambda *a, **k: pytest.fail("the queue needs no model"))
    monkeypatch.setattr(label, "time", SimpleNamespace(sleep=ctrl_c))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n3 1 2\ns\n2 1\n"))  # round 5: a bad answer, a ranking,
    label.main(label.Config(queue=str(queue)))                               # a skip; round 10: a ranking
    out = capsys.readouterr().out
    assert out.index("round_00005.jsonl: a round of 2 prompts") < out.index("round_00010.jsonl: a round of 1")
    assert out.count("rank all 3 responses, best first") == 1 and out.count("waiting for the run's next round") == 1
    assert out.rstrip().endswith("stopped")
    rs = ROUND[0]["responses"]
    assert read(queue / "round_00005.labels.jsonl") == [{"prompt": ROUND[0]["prompt"],
                                                         "responses": [rs[2], rs[0], rs[1]]}]
    assert read(queue / "round_00010.labels.jsonl") == [{"prompt": ROUND[1]["prompt"],
                                                         "responses": ROUND[1]["responses"][::-1]}]
    assert (queue / "round_00005.done").exists() and (queue / "round_00010.done").exists()  # skipped counts as done
    assert not (queue / "round_00000.labels.jsonl").exists()


def test_quitting_mid_round_leaves_it_open_and_the_next_session_goes_on(tmp_path, monkeypatch, capsys):
    queue = tmp_path / "queue"
    make_round(queue, 3)
    cmd = [sys.executable, "-m", "nanorlhf.label", "--queue", str(queue)]
    r = subprocess.run(cmd, input="1 3 2\nq\n", capture_output=True, text=True, cwd=tmp_path, timeout=60,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))  # no --ckpt, none here
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(read(queue / "round_00003.labels.jsonl")) == 1 and not (queue / "round_00003.done").exists()
    monkeypatch.setattr(label, "time", SimpleNamespace(sleep=ctrl_c))
    monkeypatch.setattr(sys, "stdin", io.StringIO("12\n"))
    label.main(label.Config(queue=str(queue)))
    out = capsys.readouterr().out
    assert "1 rankings already in" in out and "prompt 1 of 2" not in out and "prompt 2 of 2" in out
    assert [x["prompt"] for x in read(queue / "round_00003.labels.jsonl")] == [x["prompt"] for x in ROUND]
    assert (queue / "round_00003.done").exists()


def test_a_round_that_asks_for_choices_gets_the_best_of_each(tmp_path, monkeypatch, capsys):
    queue = tmp_path / "queue"
    make_round(queue, 0, choose=True)
    monkeypatch.setattr(label, "time", SimpleNamespace(sleep=ctrl_c))
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 2 3\n3\n2\n"))  # a ranking is no choice: asked again
    label.main(label.Config(queue=str(queue)))
    assert capsys.readouterr().out.count("the number of the best response, 1 to 3") == 1
    assert read(queue / "round_00000.labels.jsonl") == [dict(ROUND[0], best=2), dict(ROUND[1], best=1)]
    assert (queue / "round_00000.done").exists()
