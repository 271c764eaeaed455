import math
import random

import pytest

from nanorlhf import tasks
from nanorlhf.data import load_prompts, load_sft
from nanorlhf.tasks import TaskConfig, demonstrate, gold_score, make_prompt, rank


@pytest.mark.parametrize("prompt,response,score", [
    ("Sort: 3 9 1 4\nAnswer:", " 1 3 4 9", 1.0),
    ("Sort: 3 9 1 4\nAnswer:", " 1 3 4 9<|endoftext|>", 1.0),
    ("Sort: 3 9 1 4\nAnswer:", " 1 4 3 9", 0.5),  # two misplaced
    ("Sort: 3 9 1 4\nAnswer:", " 1 3 4", 0.75),  # one missing
    ("Sort: 3 9 1 4\nAnswer:", " 1 3 4 9 9", 0.8),  # one extra
    ("Sort: 3 9 1 4\nAnswer:", " 9 4 3 1", 0.0),
    ("Sort: 3 9 1 4\nAnswer:", "", 0.0),
    ("Sort: 3 9 1 4\nAnswer:", " one three", 0.0),
    ("Reverse: 3 9 1\nAnswer:", " 1 9 3", 1.0),
    ("Reverse: 3 9 1\nAnswer:", " 1 9 x", 2 / 3),
    ("Largest: 3 9 1\nAnswer:", " 9", 1.0),
    ("Largest: 3 9 1\nAnswer:", " 3", 0.5),  # in the list, not the largest
    ("Largest: 3 9 1\nAnswer:", " 7", 0.0),
    ("Largest: 3 9 1\nAnswer:", " 9 9", 0.5),  # extra output divides the credit
    ("Count: 3 9 1 4 4\nAnswer:", " 5", 1.0),
    ("Count: 3 9 1 4 4\nAnswer:", " 4", 0.5),
    ("Count: 3 9 1 4 4\nAnswer:", " 2", 0.0),
])
def test_gold_score(prompt, response, score):
    assert gold_score(prompt, response) == pytest.approx(score)


def test_gold_score_refuses_other_prompts():
    with pytest.raises(ValueError):
        gold_score("Tell me a joke", " no")


def test_demonstrator_errs_at_its_rate():
    rng = random.Random(0)
    prompts = [tasks.random_prompt(rng) for _ in range(2000)]
    perfect = [demonstrate(p, rng, 0.0) for p in prompts]
    assert all(gold_score(p, r) == 1.0 and r.endswith("<|endoftext|>") for p, r in zip(prompts, perfect))
    flawed = [demonstrate(p, rng, 0.3) for p in prompts]
    wrong = sum(gold_score(p, r) < 1.0 for p, r in zip(prompts, flawed)) / len(prompts)
    assert 0.24 < wrong < 0.32  # a few corruptions are no-ops (swapping equal numbers)


def test_ranking_is_bradley_terry_on_the_gold_score():
    prompt = make_prompt("Sort", [3, 9, 1, 4])
    responses = [" 1 3 4 9", " 1 4 3 9", " 9 4 3 1"]  # gold 1.0, 0.5, 0.0
    rng = random.Random(0)
    assert rank(prompt, responses, rng, noise=0) == [0, 1, 2]
    n, noise = 4000, 0.5
    first_before_second = sum(rank(prompt, responses[:2], rng, noise)[0] == 0 for _ in range(n)) / n
    expected = 1 / (1 + math.exp(-(1.0 - 0.5) / noise))  # sigmoid(0.5 / 0.5) = 0.731
    assert abs(first_before_second - expected) < 0.03


def test_default_data_files(tmp_path):
    cfg = TaskConfig(out=str(tmp_path), n_sft=300, n_train_prompts=200, n_eval_prompts=100)
    paths = tasks.write_default_data(cfg)
    sft = load_sft(paths["sft"])
    train, held_out = load_prompts(paths["prompts_train"]), load_prompts(paths["prompts_eval"])
    assert len(sft) == 300 and len(train) == 200 and len(held_out) == 100
    assert not set(held_out) & (set(train) | {p for p, _ in sft})  # held-out prompts are never trained on
    assert len(set(held_out)) == 100
    assert all(r.endswith("<|endoftext|>") and tasks.is_task_prompt(p) for p, r in sft)
