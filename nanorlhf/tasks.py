"""The built-in task: a scripted labeler standing in for the papers' human labelers.

InstructGPT's data came from people: demonstrations for SFT, and rankings of K sampled responses for the RM. Here a
script plays both roles on a small instruction-following task, so the whole pipeline runs offline, and it also
gives what real RLHF never has: a gold score to measure whether RLHF helped.

Prompts are short instructions over lists of digits:

    Sort: 3 9 1 4\nAnswer:       ->  " 1 3 4 9<|endoftext|>"
    Reverse: 3 9 1 4\nAnswer:    ->  " 4 1 9 3<|endoftext|>"
    Largest: 3 9 1 4\nAnswer:    ->  " 9<|endoftext|>"
    Count: 3 9 1 4\nAnswer:      ->  " 4<|endoftext|>"

- gold_score(prompt, response) in [0, 1] with partial credit: the "humans' judgment". Only the labeler and the
  evaluation use it; training code never does.
- demonstrate(): the demonstrator, wrong on purpose with probability error_rate (real demonstrators err too, and it
  leaves RL headroom over SFT).
- rank(): orders K responses best first by the gold score plus noise, Bradley-Terry style, like a labeler who
  sometimes disagrees with the truth.

Run `python -m nanorlhf.tasks` to write the default data set (JSONL, the formats of README's "Data formats").
"""

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from nanorlhf.config import (UserError, at_least, check_writable, file_name, finite, in_range, require, run,
                             seed_range)
from nanorlhf.data import write_jsonl

TASKS = ("Sort", "Reverse", "Largest", "Count")
ANSWER = "\nAnswer:"
PROMPT_RE = re.compile(r"^(Sort|Reverse|Largest|Count): ((?:\d )*\d)\nAnswer:$")


@dataclass
class TaskConfig:
    """Write the built-in task's data: demonstrations, training prompts and held-out prompts."""

    out: str = "data"
    """directory for sft.jsonl, prompts_train.jsonl and prompts_eval.jsonl"""
    n_sft: int = 20000
    """demonstrations (prompt, response) for SFT"""
    n_train_prompts: int = 4000
    """prompts for the reward model's comparisons and for PPO (disjoint from the held-out set)"""
    n_eval_prompts: int = 500
    """held-out prompts for evaluation"""
    min_len: int = 3
    """shortest list"""
    max_len: int = 6
    """longest list"""
    error_rate: float = 0.3
    """probability that the demonstrator writes a flawed answer"""
    seed: int = 0
    """random seed"""

    def __post_init__(self):  # ranges of the flags, checked whenever a TaskConfig is made (nanorlhf/config.py)
        finite(self)
        file_name(self, "out")
        at_least(self, 1, "n_sft", "n_train_prompts", "n_eval_prompts")
        at_least(self, 2, "min_len")  # a flawed list answer swaps, drops or repeats among two numbers or more
        require(self.max_len >= self.min_len, f"--max_len must be at least --min_len {self.min_len}, got "
                                              f"{self.max_len}")
        in_range(self, "error_rate", 0, 1)
        seed_range(self)
        n = self.n_train_prompts + self.n_eval_prompts
        require(n <= distinct_prompts(self.min_len, self.max_len) // 2,
                f"--n_train_prompts + --n_eval_prompts ({n}) must be at most half of the "
                f"{distinct_prompts(self.min_len, self.max_len)} distinct prompts of lists of --min_len "
                f"{self.min_len} to --max_len {self.max_len} numbers: widen the lengths")


# ------------------------------------------------------------------------------------------------------------------
# Prompts and the correct answer

def make_prompt(task: str, items: list[int]) -> str:
    return f"{task}: {' '.join(map(str, items))}{ANSWER}"


def parse_prompt(prompt: str):
    """(task, items) for a prompt of this task, else None."""
    m = PROMPT_RE.match(prompt)
    return (m.group(1), [int(x) for x in m.group(2).split()]) if m else None


def is_task_prompt(prompt: str) -> bool:
    return parse_prompt(prompt) is not None


def solve(task: str, items: list[int]) -> list[int]:
    if task == "Sort":
        return sorted(items)
    if task == "Reverse":
        return items[::-1]
    if task == "Largest":
        return [max(items)]
    if task == "Count":
        return [len(items)]
    raise ValueError(task)


def format_answer(answer: list[int]) -> str:
    return "".join(f" {a}" for a in answer)  # " 1 3 4 9": one GPT-2 token per number


def distinct_prompts(min_len: int, max_len: int) -> int:
    """How many different prompts lists of min_len..max_len digits make (4 tasks x 10^L lists of each length L)."""
    return len(TASKS) * sum(10 ** n for n in range(min_len, max_len + 1))


def random_prompt(rng: random.Random, min_len=3, max_len=6) -> str:
    items = [rng.randrange(10) for _ in range(rng.randint(min_len, max_len))]
    return make_prompt(rng.choice(TASKS), items)


def make_prompts(n: int, rng: random.Random, exclude=frozenset(), min_len=3, max_len=6) -> list[str]:
    """n distinct prompts, none of them in `exclude`."""
    seen, out = set(exclude), []
    for _ in range(100 * n):
        if len(out) == n:
            break
        p = random_prompt(rng, min_len, max_len)
        if p not in seen:
            seen.add(p)
            out.append(p)
    if len(out) < n:
        raise UserError(f"could only make {len(out)} distinct prompts of {n}: widen --min_len..--max_len")
    return out


# ------------------------------------------------------------------------------------------------------------------
# The gold score: the stand-in for human judgment

def gold_score(prompt: str, response: str) -> float:
    """How good `response` is for `prompt`, in [0, 1], with partial credit.

    Lists (Sort, Reverse): the fraction of positions that hold the right number, over the longer of the two
    lengths, so a missing, extra or misplaced number each costs. Single numbers (Largest, Count): 1 if right;
    0.5 if nearly right (Largest: a number of the list that is not the largest; Count: off by one); extra output
    divides the credit. A trailing <|endoftext|> is ignored; anything that is not a number earns nothing.
    """
    parsed = parse_prompt(prompt)
    if parsed is None:
        raise ValueError(f"not a prompt of the built-in task: {prompt!r}")
    task, items = parsed
    gold = solve(task, items)
    words = response.replace("<|endoftext|>", " ").split()
    pred = [int(w) if w.isdigit() else None for w in words]
    if not pred:
        return 0.0
    if task in ("Sort", "Reverse"):
        hits = sum(p == g for p, g in zip(pred, gold))
        return hits / max(len(pred), len(gold))
    answer = pred[0]
    if answer == gold[0]:
        credit = 1.0
    elif answer is not None and ((task == "Largest" and answer in items) or (task == "Count" and abs(answer - gold[0]) == 1)):
        credit = 0.5
    else:
        credit = 0.0
    return credit / len(pred)


# ------------------------------------------------------------------------------------------------------------------
# The demonstrator (SFT data) and the ranking labeler (RM data)

def corrupt(task: str, items: list[int], answer: list[int], rng: random.Random) -> list[int]:
    """A plausible mistake: two numbers swapped, one dropped, one repeated or one replaced; off by a bit for
    single-number answers."""
    if task in ("Largest", "Count"):
        if task == "Largest" and len(set(items)) > 1:
            return [rng.choice([x for x in items if x != answer[0]])]
        return [max(0, answer[0] + rng.choice([-1, 1]))]
    a = list(answer)
    kind = rng.choice(["swap", "drop", "repeat", "replace"])
    i, j = rng.sample(range(len(a)), 2)
    if kind == "swap" and a[i] != a[j]:
        a[i], a[j] = a[j], a[i]
    elif kind == "drop":
        del a[i]
    elif kind == "repeat":
        a.insert(i, a[i])
    else:
        a[i] = (a[i] + rng.randint(1, 9)) % 10
    return a


def demonstrate(prompt: str, rng: random.Random, error_rate: float) -> str:
    """The demonstrator's response (with <|endoftext|>): right, except with probability error_rate."""
    task, items = parse_prompt(prompt)
    answer = solve(task, items)
    if rng.random() < error_rate:
        answer = corrupt(task, items, answer, rng)
    return format_answer(answer) + "<|endoftext|>"


def rank(prompt: str, responses: list[str], rng: random.Random, noise: float = 0.1) -> list[int]:
    """Indices of `responses`, best first, as a noisy labeler would order them.

    Plackett-Luce with utilities gold/noise: sort by gold/noise + Gumbel noise. For any two responses this gives
    the Bradley-Terry probability P(a before b) = sigmoid((gold_a - gold_b) / noise). noise=0: perfect ranking.
    """
    def key(i):
        g = gold_score(prompt, responses[i])
        if noise == 0:
            return (g, rng.random())  # ties broken at random
        return (g / noise - math.log(-math.log(rng.random() or 1e-300)), 0.0)

    return sorted(range(len(responses)), key=key, reverse=True)


def choose_best(prompt: str, responses: list[str], rng: random.Random, noise: float = 0.1) -> int:
    """The index of the response a noisy labeler picks as the best of K (Ziegler et al. 2019's 4-way choice): the
    first place of rank(), so P(i) = softmax(gold / noise)_i, the same labeler as for rankings."""
    return rank(prompt, responses, rng, noise)[0]


# ------------------------------------------------------------------------------------------------------------------

def write_default_data(cfg: TaskConfig) -> dict:
    """Write the default data set; returns {name: path}."""
    rng = random.Random(cfg.seed)
    eval_prompts = make_prompts(cfg.n_eval_prompts, rng, min_len=cfg.min_len, max_len=cfg.max_len)
    held_out = frozenset(eval_prompts)
    train_prompts = make_prompts(cfg.n_train_prompts, rng, held_out, cfg.min_len, cfg.max_len)
    sft_prompts = [random_prompt(rng, cfg.min_len, cfg.max_len) for _ in range(4 * cfg.n_sft)]
    sft_prompts = [p for p in sft_prompts if p not in held_out][:cfg.n_sft]
    if len(sft_prompts) < cfg.n_sft:
        raise UserError(f"only {len(sft_prompts)} of --n_sft {cfg.n_sft} demonstrations avoid the held-out prompts: "
                        f"widen --min_len..--max_len or hold out fewer")
    out = Path(cfg.out)
    paths = dict(sft=out / "sft.jsonl", prompts_train=out / "prompts_train.jsonl",
                 prompts_eval=out / "prompts_eval.jsonl")
    write_jsonl(paths["sft"], [{"prompt": p, "response": demonstrate(p, rng, cfg.error_rate)} for p in sft_prompts])
    write_jsonl(paths["prompts_train"], [{"prompt": p} for p in train_prompts])
    write_jsonl(paths["prompts_eval"], [{"prompt": p} for p in eval_prompts])
    return paths


def main(cfg: TaskConfig):
    out = Path(cfg.out)
    check_writable(out, "--out", directory=True)
    for name in ("sft.jsonl", "prompts_train.jsonl", "prompts_eval.jsonl"):
        check_writable(out / name, "--out")
    for name, path in write_default_data(cfg).items():
        print(f"wrote {path}")


if __name__ == "__main__":
    run(main, TaskConfig)
