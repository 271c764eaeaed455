"""Human feedback in the terminal: rank K sampled responses per prompt, the data the reward model learns from.

InstructGPT's labelers saw a prompt and K = 4 to 9 responses from the SFT model and ranked them best to worst
(§3.4). This is that interface for one person at a keyboard:

    python -m nanorlhf.label --ckpt out/sft.pt --prompts data/prompts_train.jsonl --k 4 --out data/rankings_human.jsonl

For each prompt it shows K distinct responses, numbered, and reads a ranking best first: "3 1 4 2" (or "3142"
for K <= 9); with --choose, only the number of the best one (Ziegler et al. 2019's 4-way choice), written as
{"prompt", "responses", "best": i}. "s" skips the prompt, "q" (or Ctrl-D) quits; anything else asks again with a hint. Each ranking is
appended to --out as {"prompt", "responses": [best first]} and flushed at once, so quitting or a crash loses
nothing. A new session resumes after the prompts already in --out (skipped ones are offered again). Train on the
file with train_rm.py like any rankings file.

Responses keep their "<|endoftext|>" when the model ended them; one cut off at --max_new_tokens is shown as such.
Prompt i's responses come from seed + i, so the same prompt draws the same responses in every session.

A person as the labeler of online PPO (train_ppo.py --online_every N --online_labeler person):

    python -m nanorlhf.label --queue out/ppo/queue

serves the run's queue instead of sampling (no model, no --ckpt or --prompts): it takes the oldest
round_<iteration>.jsonl without a round_<iteration>.done, shows each record's responses, ranks them or, where the
records say "choose": true, picks the best, and appends the answers to round_<iteration>.labels.jsonl as above
(a new session goes on after them). Once every prompt of the round is answered or skipped it writes the .done, on
which the run takes the labels and goes on; then it serves the next round, or waits for one. "q" stops in a round
(no .done: the round stays open), Ctrl-C anywhere. The run's side is in nanorlhf/online.py.
"""

import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from nanorlhf.config import (at_least, check_room, check_writable, file_name, finite, in_range, left_default, positive,
                             run, seed_range)
from nanorlhf.config import UserError
from nanorlhf.data import load_preferences, load_prompts, preference_kind, read_jsonl
from nanorlhf.sample import END, load_policy, respond


@dataclass
class Config:
    """Rank K sampled responses per prompt in the terminal; rankings go to --out (best first)."""

    ckpt: str = "out/sft.pt"
    """the policy to sample from: a GPT checkpoint (sft or ppo) or a Hugging Face GPT-2 directory"""
    prompts: str = "data/prompts_train.jsonl"
    """prompts {"prompt"} to label, in order"""
    out: str = "data/rankings_human.jsonl"
    """rankings are appended here; prompts already in it are skipped"""
    k: int = 4
    """responses per prompt (InstructGPT: 4 to 9)"""
    max_new_tokens: int = 64
    """longest response, in tokens"""
    temperature: float = 1.0
    """sampling temperature (1: the policy's own distribution, what the reward model will judge)"""
    top_k: int = 0
    """sample among the k likeliest tokens only (0: all)"""
    top_p: float = 1.0
    """nucleus sampling (1: off)"""
    seed: int = 0
    """prompt i's responses are drawn with seed + i"""
    choose: bool = False
    """pick the best response only (Ziegler et al.'s choice of the best of K) instead of ranking them all"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    queue: str = ""
    """label the rounds of an online PPO run in this folder (out/ppo/queue), waiting for each, instead of sampling"""

    def __post_init__(self):  # ranges of the flags, checked whenever a Config is made (nanorlhf/config.py)
        finite(self)
        if self.queue:
            left_default(self, ("ckpt", "prompts", "out", "k", "max_new_tokens", "temperature", "top_k", "top_p",
                                "seed", "choose"), "is not used with --queue: the run samples the responses and says "
                         "whether to rank them or choose the best")
        file_name(self, "ckpt", "prompts", "out")
        at_least(self, 2, "k")  # a ranking compares responses
        at_least(self, 1, "max_new_tokens")
        positive(self, "temperature")  # 0 (greedy) would draw the same response K times
        at_least(self, 0, "top_k", "threads")
        in_range(self, "top_p", 0, 1, lo_open=True)
        seed_range(self)


def draw_responses(model, prompt, cfg: Config, seed: int, rounds: int = 3) -> list[str]:
    """Up to K distinct responses (a ranking of two equal texts teaches nothing): a few rounds of K samples."""
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    distinct = []
    for _ in range(rounds):
        for text, _ in respond(model, prompt, cfg.k, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                               generator):
            if text not in distinct and len(distinct) < cfg.k:
                distinct.append(text)
        if len(distinct) == cfg.k:
            break
    return distinct


def parse_ranking(text: str, k: int):
    """'3 1 4 2' (or '3,1,4,2', or '3142' when k <= 9) -> [2, 0, 3, 1] (0-based, best first); None if invalid.

    Numbers are decimal digits (any script's, as int() reads them); '²' or '①' are digits to str.isdigit() but
    no number to int(), and make the answer invalid like any other text."""
    parts = [p for p in re.split(r"[\s,>]+", text.strip()) if p]
    if len(parts) == 1 and k <= 9 and len(parts[0]) == k:
        parts = list(parts[0])
    if not all(p.isdecimal() for p in parts):
        return None
    order = [int(p) - 1 for p in parts]
    if sorted(order) != list(range(k)):
        return None
    return order


def show(i, n_prompts, prompt, responses):
    print(f"\n{'=' * 30} prompt {i + 1} of {n_prompts} {'=' * 30}")
    print(prompt)
    for j, text in enumerate(responses):
        shown = text.removesuffix(END) if text.endswith(END) else text + "  [cut off]"
        print(f"\n[{j + 1}] " + shown.lstrip(" ").replace("\n", "\n    "))  # display only: the file keeps it all
    print()


def parse_choice(text: str, k: int):
    """'3' -> 2 (0-based): the best of k responses; None if it is not one number from 1 to k."""
    text = text.strip()
    return int(text) - 1 if text.isdecimal() and 1 <= int(text) <= k else None


def ask(k, choose=False):
    """The person's answer: a ranking (0-based, best first) or, choosing, [the best]; "s" or "q"."""
    if choose:
        hint = f"the number of the best response, 1 to {k}; s skips this prompt, q quits"
    else:
        hint = (f"rank all {k} responses, best first: the numbers 1 to {k} once each, e.g. "
                f"'{' '.join(str(j) for j in [2, 1] + list(range(3, k + 1)))}'; s skips this prompt, q quits")
    while True:
        print("best (s skip, q quit)> " if choose else "rank (best first; s skip, q quit)> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input: same as quitting
            print()
            return "q"
        answer = line.strip().lower()
        if answer in ("s", "q"):
            return answer
        if choose:
            best = parse_choice(answer, k)
            if best is not None:
                return [best]
        else:
            order = parse_ranking(answer, k)
            if order is not None:
                return order
        print(f"  ? {hint}")


POLL_S = 2.0  # --queue: how often to look for the run's next round


def label_prompts(out, prompts, responses_of, choose):
    """Show each prompt of prompts not yet labelled in out with its responses (responses_of(i) for prompt i) and
    append the answer to out at once. Returns False if the person quit before the end ("q"), else True."""
    done = Counter()  # prompts already ranked, counted: a prompt listed twice is labeled twice
    if out.exists() and out.read_bytes().strip():
        kind = "choice" if choose else "ranking"
        if preference_kind(out) != kind:
            raise UserError(f"{out} holds {preference_kind(out)}s, and this session would add {kind}s: use another "
                            f"--out or {'leave out' if choose else 'add'} --choose")
        done.update(prompt for prompt, _ in load_preferences(out))
    todo = sum((Counter(prompts) - done).values())
    kinds = "choices" if choose else "rankings"
    print(f"{sum(done.values())} {kinds} already in {out}; {todo} of {len(prompts)} prompts to go")
    if todo == 0:
        return True
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # typed bytes that are not UTF-8 become U+FFFD: asked again
    out.parent.mkdir(parents=True, exist_ok=True)
    labeled, finished = 0, True
    with open(out, "a") as f:
        if out.stat().st_size and not out.read_bytes().endswith(b"\n"):  # a hand-edited file: keep records apart
            f.write("\n")
        for i, prompt in enumerate(prompts):
            if done[prompt] > 0:
                done[prompt] -= 1
                continue
            responses = responses_of(i)
            if len(responses) < 2:
                print(f"\nprompt {i + 1}: every sample was the same response; skipped")
                continue
            show(i, len(prompts), prompt, responses)
            answer = ask(len(responses), choose)
            if answer == "q":
                finished = False
                break
            if answer == "s":
                continue
            record = ({"prompt": prompt, "responses": responses, "best": answer[0]} if choose
                      else {"prompt": prompt, "responses": [responses[j] for j in answer]})
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # on disk now: a crash or a power cut keeps every ranking typed so far
            labeled += 1
    print(f"labeled {labeled} prompts this session; {kinds} are in {out}")
    return finished


def next_round(queue):
    """The oldest round file of the queue without its .done, waiting for one (saying so once)."""
    said = False
    while True:
        rounds = [p for p in queue.glob("round_*.jsonl") if re.fullmatch(r"round_\d+\.jsonl", p.name)]
        rounds = sorted((p for p in rounds if not p.with_suffix(".done").exists()), key=lambda p: int(p.stem[6:]))
        if rounds:
            return rounds[0]
        if not said:
            print(f"\nwaiting for the run's next round in {queue} (Ctrl-C stops)", flush=True)
            said = True
        time.sleep(POLL_S)


def serve_queue(cfg: Config):
    """Label an online PPO run's rounds as they come (the module's docstring), until "q" or Ctrl-C."""
    queue = Path(cfg.queue)
    check_writable(queue, "--queue", directory=True)
    try:
        while True:
            path = next_round(queue)
            records = read_jsonl(path, {"prompt": str, "responses": list})
            print(f"\n{path}: a round of {len(records)} prompts")
            if not label_prompts(path.with_suffix(".labels.jsonl"), [r["prompt"] for r in records],
                                 lambda i: records[i]["responses"], any(r.get("choose") for r in records)):
                return  # quit mid-round: no .done, the next session goes on after the answers given
            path.with_suffix(".done").touch()  # every prompt answered or skipped: the run may read the labels
            print(f"{path.with_suffix('.done').name} written: the run goes on with these labels")
    except KeyboardInterrupt:
        print("\nstopped")


def main(cfg: Config):
    if cfg.queue:
        return serve_queue(cfg)
    out = Path(cfg.out)
    check_writable(out, "--out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_policy(cfg.ckpt, device)
    check_room(cfg.max_new_tokens, model.config.block_size, cfg.ckpt)
    prompts = load_prompts(cfg.prompts)
    label_prompts(out, prompts, lambda i: draw_responses(model, prompts[i], cfg, cfg.seed + i), cfg.choose)


if __name__ == "__main__":
    run(main, Config)
