"""Online data collection's parts (nanorlhf/online.py); train_ppo.py's online mode runs in test_pipeline.py."""

import contextlib
import json
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, load_script
from nanorlhf import checkpoint, online, tasks
from nanorlhf.config import UserError
from nanorlhf.data import write_jsonl
from nanorlhf.model import GPT, ScalarModel
from nanorlhf.optim import adamw
from nanorlhf.reward import accuracy, score_texts


def test_labelled_records_become_the_rms_groups_best_first():
    assert online.as_group({"prompt": "p", "responses": ["a", "b", "c"]}) == ("p", ["a", "b", "c"])
    assert online.as_group({"prompt": "p", "responses": ["a", "b", "c"], "best": 2}) == ("p", ["c", "a", "b"])


@pytest.mark.parametrize("choose", [False, True])
def test_sample_and_label_ranks_k_samples_of_the_policy(choose):
    torch.manual_seed(0)
    policy = GPT(TINY)
    prompts = ["Largest: 3 9\nAnswer:", "Sort: 2 1\nAnswer:"]
    g = torch.Generator().manual_seed(0)
    records = online.sample_and_label(policy, prompts, 3, 0.0, 1.0, 4, random.Random(0), g, choose=choose)
    assert [r["prompt"] for r in records] == prompts and all(len(r["responses"]) == 3 for r in records)
    for r in records:  # noise 0: the labeler's order is the gold order
        gold = [tasks.gold_score(r["prompt"], x) for x in r["responses"]]
        if choose:
            assert gold[r["best"]] == max(gold)
        else:
            assert gold == sorted(gold, reverse=True)


def test_rm_steps_learn_the_labels_and_renormalise_restores_mean_0_std_1():
    """A few RM steps on a consistent preference (the right answer above two wrong ones) make the RM order it; the
    renormalisation then gives the reference samples mean 0 and std 1 again."""
    torch.manual_seed(0)
    rm = ScalarModel(TINY)
    groups = [(f"Largest: {a} {b}\nAnswer:", [f" {max(a, b)}<|endoftext|>", f" {min(a, b)}<|endoftext|>",
                                               " 0 0<|endoftext|>"]) for a in range(1, 9) for b in range(1, 9) if a != b]
    before = accuracy(rm, groups)["acc_labels"][0]
    opt = adamw(rm, 3e-3)
    loss = online.train_rm_steps(rm, opt, groups, 60, 8, random.Random(0), "cpu", contextlib.nullcontext)
    after = accuracy(rm, groups)["acc_labels"][0]
    assert loss > 0 and after > 0.9 and after > before + 0.2
    prompts, responses = [p for p, _ in groups[:20]], [rs[1] for _, rs in groups[:20]]
    online.renormalise(rm, list(zip(prompts, responses)))
    s = score_texts(rm, prompts, responses)
    assert abs(s.mean().item()) < 1e-4 and s.std().item() == pytest.approx(1.0, abs=1e-4)
    assert accuracy(rm, groups)["acc_labels"][0] == after  # a positive gain and a bias keep every order


def test_renormalise_follows_the_rm_runs_norm_demos_and_unit_std():
    """As train_rm.py normalised: with --norm_demos the demonstrations get mean 0 (the samples keep std 1); without
    --unit_std the scale is left alone and only the mean moves."""
    torch.manual_seed(0)
    rm = ScalarModel(TINY)
    with torch.no_grad():
        rm.head.weight.mul_(50.0)  # a spread of scores far from std 1
        rm.head.bias.fill_(3.0)
    norm = [(f"Sort: {a} {b}\nAnswer:", f" {a} {b}<|endoftext|>") for a in range(5) for b in range(5)]
    demos = [(f"Sort: {a} {b}\nAnswer:", f" {min(a, b)} {max(a, b)}<|endoftext|>") for a in range(5) for b in range(4)]
    scores = lambda pairs: score_texts(rm, [p for p, _ in pairs], [r for _, r in pairs])  # noqa: E731
    online.renormalise(rm, norm, demos)
    assert abs(scores(demos).mean().item()) < 1e-4 and abs(scores(norm).mean().item()) > 1e-2
    assert scores(norm).std().item() == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        rm.head.weight.mul_(7.0)
        rm.head.bias.add_(2.0)
    std_before = scores(norm).std().item()
    online.renormalise(rm, norm, unit_std=False)
    assert abs(scores(norm).mean().item()) < 1e-4
    assert scores(norm).std().item() == pytest.approx(std_before, rel=1e-4)


def test_rm_steps_on_choices_use_the_softmax_loss(monkeypatch):
    from nanorlhf import reward
    used = []
    monkeypatch.setattr(reward, "ranking_loss", lambda *a, **k: pytest.fail("ranking loss on choices"))
    real = reward.choice_loss
    monkeypatch.setattr(reward, "choice_loss", lambda *a, **k: used.append(1) or real(*a, **k))
    torch.manual_seed(0)
    rm = ScalarModel(TINY)
    groups = [("Largest: 3 9\nAnswer:", [" 9<|endoftext|>", " 3<|endoftext|>"])] * 4
    online.train_rm_steps(rm, adamw(rm, 1e-3), groups, 3, 2, random.Random(0), "cpu", contextlib.nullcontext,
                          choice=True)
    assert len(used) == 3


def test_the_normalisation_samples_are_those_ppo_scores():
    """Samples that ended (PPO gives the rest its no-end penalty); all of them if fewer than 2 ended, since one
    score has no std (a single ended sample would have made the online renormalisation NaN)."""
    prompts = ["a", "b", "c"]
    assert online.scored_pairs(prompts, [(" 1", True), (" 2", False), (" 3", True)]) == [
        ("a", " 1<|endoftext|>"), ("c", " 3<|endoftext|>")]
    assert online.scored_pairs(prompts, [(" 1", True), (" 2", False), (" 3", False)]) == [
        ("a", " 1<|endoftext|>"), ("b", " 2"), ("c", " 3")]


# ------------------------------------------------------------------------------------------------------------------
# A person as the labeler (--online_labeler person): the run's side of the queue; the labeler's is in test_label.py.

def play_person(queue, skip_last=False):
    """A fake `python -m nanorlhf.label --queue`, called where the run sleeps between looks: answers every open
    round (rankings in the reverse of the shown order, or the last response as the best), writes its .done."""
    written = []
    for path in sorted(queue.glob("round_?????.jsonl")):
        if path.with_suffix(".done").exists():
            continue
        shown = [json.loads(line) for line in path.read_text().splitlines()]
        labels = [{"prompt": r["prompt"], "responses": r["responses"], "best": len(r["responses"]) - 1}
                  if r["choose"] else {"prompt": r["prompt"], "responses": r["responses"][::-1]}
                  for r in shown[:len(shown) - skip_last]]
        write_jsonl(path.with_suffix(".labels.jsonl"), labels)
        path.with_suffix(".done").touch()
        written += labels
    return written


def test_a_round_for_a_person_is_written_distinct_and_waits_for_the_done(tmp_path, monkeypatch, capsys):
    queue, sleeps, answered = tmp_path / "queue", [], []
    records = [{"prompt": "a", "responses": ["x", "y", "x"]}, {"prompt": "b", "responses": ["z", "z", "z"]},
               {"prompt": "c", "responses": ["u", "v", "w"]}]

    def person(seconds):
        sleeps.append(seconds)
        answered.extend(play_person(queue, skip_last=True))  # "c" skipped

    monkeypatch.setattr(online, "time", SimpleNamespace(time=time.time, sleep=person))
    labels = online.ask_person(queue, 15, records, choose=False)
    shown = [json.loads(line) for line in (queue / "round_00015.jsonl").read_text().splitlines()]
    assert shown == [{"prompt": "a", "responses": ["x", "y"], "choose": False},  # copies gone, "b" dropped
                     {"prompt": "c", "responses": ["u", "v", "w"], "choose": False}]
    assert sleeps == [online.POLL_S] and labels == answered == [{"prompt": "a", "responses": ["y", "x"]}]
    out = capsys.readouterr().out
    assert out.count("waiting for round_00015.done") == 1 and f"python -m nanorlhf.label --queue {queue}" in out
    assert not list(tmp_path.glob("**/*.tmp"))  # written through a temporary file, renamed
    # nothing to ask: every prompt's samples were one text
    assert online.ask_person(queue, 16, [records[1]], choose=True) == [] and not (queue / "round_00016.jsonl").exists()


def test_a_resumed_round_reuses_its_queue_file_and_the_labels_typed(tmp_path, monkeypatch):
    """Killed while a person labelled round 15 and resumed: the file is served as it is (the new samples go unused),
    and the label typed before the kill counts."""
    queue = tmp_path / "queue"
    before = [{"prompt": "a", "responses": ["x", "y"], "choose": True}, {"prompt": "b", "responses": ["p", "q"],
                                                                         "choose": True}]
    write_jsonl(queue / "round_00015.jsonl", before)
    write_jsonl(queue / "round_00015.labels.jsonl", [{"prompt": "a", "responses": ["x", "y"], "best": 1}])
    text = (queue / "round_00015.jsonl").read_text()

    def person(seconds):  # the labeler, started again, answers the rest
        with open(queue / "round_00015.labels.jsonl", "a") as f:
            f.write(json.dumps({"prompt": "b", "responses": ["p", "q"], "best": 0}) + "\n")
        (queue / "round_00015.done").touch()

    monkeypatch.setattr(online, "time", SimpleNamespace(time=time.time, sleep=person))
    new_samples = [{"prompt": "z", "responses": ["1", "2"]}]
    labels = online.ask_person(queue, 15, new_samples, choose=True)
    assert (queue / "round_00015.jsonl").read_text() == text
    assert labels == [{"prompt": "a", "responses": ["x", "y"], "best": 1}, {"prompt": "b", "responses": ["p", "q"],
                                                                            "best": 0}]


def test_labels_that_answer_no_record_of_the_round_are_refused(tmp_path):
    shown = [{"prompt": "a", "responses": ["x", "y"], "choose": False}]
    for bad in [{"prompt": "a", "responses": ["x", "z"]}, {"prompt": "b", "responses": ["x", "y"]},
                {"prompt": "a", "responses": ["y", "x"], "best": 0}]:
        write_jsonl(tmp_path / "l.jsonl", [{"prompt": "a", "responses": ["y", "x"]}, bad])
        with pytest.raises(UserError, match=r"l.jsonl:2: not a ranking of the responses of a record of r.jsonl"):
            online.read_labels(tmp_path / "l.jsonl", Path("r.jsonl"), shown, choose=False)
    write_jsonl(tmp_path / "l.jsonl", [{"prompt": "a", "responses": ["x", "y"], "best": 2}])
    with pytest.raises(UserError, match="l.jsonl:1: not a choice"):
        online.read_labels(tmp_path / "l.jsonl", Path("r.jsonl"), shown, choose=True)


def test_a_new_run_refuses_a_queue_with_an_earlier_runs_rounds(tmp_path):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Human: hi"}])  # any prompts: a person labels them
    write_jsonl(tmp_path / "ppo" / "queue" / "round_00000.jsonl", [{"prompt": "a", "responses": ["x", "y"]}])
    cfg = SimpleNamespace(data="", prompts=str(tmp_path / "prompts.jsonl"), out=str(tmp_path / "ppo.pt"),
                          online_labeler="person", resume=False, rm=str(tmp_path / "none.pt"))
    with pytest.raises(UserError, match="ppo/queue holds the rounds of an earlier run, .* or continue that run with"):
        online.start(cfg, None, None, "cpu", contextlib.nullcontext)
    with pytest.raises(UserError, match="none.pt not found"):  # resumed, it goes on (to the RM, missing here)
        online.start(SimpleNamespace(**{**vars(cfg), "resume": True}), None, None, "cpu", contextlib.nullcontext)


@pytest.mark.parametrize("choose", [False, True])
def test_train_ppo_waits_for_a_person_and_trains_the_rm_on_the_labels(workdir, tmp_path, monkeypatch, choose):
    """train_ppo.py --online_labeler person: rounds at iterations 0 and 2 go to out/ppo/queue, the run waits for each
    .done, and the RM trains on exactly the labels the person wrote (then replayed ones), saved in labels.jsonl."""
    pairs = [(a, b) for a in range(1, 5) for b in range(1, 5) if a != b]
    records = [{"prompt": f"Sort: {a} {b}\nAnswer:", "responses": [f" {min(a, b)} {max(a, b)}", f" {a}"]}
               for a, b in pairs]
    write_jsonl(tmp_path / "labels.jsonl", [dict(r, best=0) for r in records] if choose else records)
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "rm.pt", ScalarModel(TINY), kind="rm", train_config=dict(
        data=str(tmp_path / "labels.jsonl"), n_normalize=4, k=3, lr=1e-3, label_noise=0.1, batch_size=4,
        center_coef=0.0, grad_clip=1.0))
    answered, trained = [], []
    monkeypatch.setattr(online, "time", SimpleNamespace(
        time=time.time, sleep=lambda s: answered.append(play_person(tmp_path / "ppo" / "queue"))))
    real = online.train_rm_steps
    monkeypatch.setattr(online, "train_rm_steps", lambda rm, opt, groups, *a, **k: trained.append(groups) or real(
        rm, opt, groups, *a, **k))
    ppo = load_script("train_ppo")
    ppo.main(ppo.Config(sft=str(workdir / "out" / "sft.pt"), rm=str(tmp_path / "rm.pt"), eval_prompts="",
                        prompts=str(workdir / "data" / "prompts_train.jsonl"), out=str(tmp_path / "ppo.pt"), iters=3,
                        batch_size=4, minibatch_size=4, max_new_tokens=4, online_every=2, online_prompts=3,
                        online_labeler="person", ckpt_interval=0))
    assert sorted(p.name for p in (tmp_path / "ppo" / "queue").glob("round_?????.jsonl")) == [
        "round_00000.jsonl", "round_00002.jsonl"]
    assert len(answered) == 2 and all(answered)  # one wait per round
    for labels, groups in zip(answered, trained):
        assert all(("best" in r) == choose for r in labels)
        assert groups[:len(labels)] == [online.as_group(r) for r in labels]  # the new labels, then replayed ones
        assert len(groups) == 2 * len(labels)
    saved = [json.loads(line) for line in (tmp_path / "ppo" / "labels.jsonl").read_text().splitlines()]
    assert saved == answered[0] + answered[1]
    assert "rm" in torch.load(tmp_path / "ppo.pt", weights_only=False)


def test_make_online_runs_flags_its_scripts_take():
    """`make online` (the offline-against-online comparison): each step's flags parse with that step's Config, and
    PPO's RM is the one trained on half the labels, its online rounds writing the other half."""
    import importlib
    import shutil
    import subprocess
    from conftest import ROOT
    from nanorlhf.config import parse_args
    if shutil.which("make") is None:
        pytest.skip("no make")
    lines = subprocess.run(["make", "-n", "online", "PY=python"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()  # (setup's steps too, where it is not done)
    steps = [line.split()[1:] for line in lines if line.startswith(("python train_", "python -m nanorlhf."))
             and "nanorlhf.tokenizer" not in line]
    assert [s[0] if s[0] != "-m" else s[1] for s in steps] == [
        "train_rm.py", "train_ppo.py", "nanorlhf.evaluate", "nanorlhf.overopt"]
    cfgs = []
    for step in steps:
        module = load_script(step[0][:-3]) if step[0].endswith(".py") else importlib.import_module(step[1])
        cls = getattr(module, "Config", None) or module.EvalConfig
        cfgs.append(parse_args(cls, step[1:] if step[0].endswith(".py") else step[2:]))
    rm, ppo, ev, over = cfgs
    assert ppo.rm == rm.out and ppo.online_every > 0 and ev.ppo == ppo.out
    offline_labels = load_script("train_rm").Config().n_prompts  # the demo's RM
    assert rm.n_prompts + math.ceil(ppo.iters / ppo.online_every) * ppo.online_prompts == offline_labels
    assert over.ppo.split(",") == [load_script("train_ppo").Config().out, ppo.out]
