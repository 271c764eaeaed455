"""Online data collection (Ziegler et al. 2019, §2.3): the labelers keep labelling samples of the *current* policy
while RL runs, and the reward model keeps training on every label so far.

Why. Offline, the RM learns from samples of the SFT model only. PPO then moves to responses the RM has never been
shown side by side (near misses of the right answer, here), where its order of close pairs is little better than a
coin: it is optimised against exactly where it is weakest. Online, each round of labels is drawn from where the
policy is now, so the RM's data follows the policy.

The schedule (train_ppo.py --online_every N): before iterations 0, N, 2N, ... of PPO,
  1. sample K responses for M prompts from the current policy (K, the labeler and its noise as train_rm.py's run),
  2. have the labeler rank them (or pick the best of K), and add them to the labels so far,
  3. train the RM for S steps on batches drawn from all labels so far (the offline ones included), with the loss
     and learning rate of its train_rm.py run (ranking_loss or choice_loss),
  4. normalise it again as train_rm.py did: the SFT samples it was normalised on get mean 0 and std 1 again (the
     mean is the demonstrations' with its --norm_demos; no scaling without its --unit_std), so that the KL
     coefficient and the no-end penalty keep their meaning as the RM changes.
The value function is not reset: it keeps learning the returns of the RM as it moves.

Step 3 trains on the round's new labels and as many earlier ones drawn at random (the offline ones included), for
--online_rm_epochs passes, with the RM run's batch size, loss and clip and a third of its peak learning rate (a
fresh AdamW): drawn uniformly from all labels, the new ones would be a few per cent of every batch. Label budget:
the RM run's labels plus rounds x online_prompts, printed at the start.

The labeler (train_ppo.py --online_labeler): `scripted`, the built-in task's (nanorlhf/tasks.py; its prompts only),
or `person`, through a queue folder beside the run's metrics (out/ppo.pt -> out/ppo/queue/):
  - the run (rank 0) writes round_<iteration, 5 digits>.jsonl, atomically: {"prompt", "responses", "choose"}, the
    distinct ones of each prompt's K samples (prompts with fewer than 2 are dropped; choose: pick the best only),
    prints the command, and looks every POLL_S seconds for round_<iteration>.done;
  - `python -m nanorlhf.label --queue out/ppo/queue` shows the oldest round without its .done, appends each answer
    to round_<iteration>.labels.jsonl (nanorlhf.label's records: rankings, or choices {"prompt", "responses",
    "best"}), and writes the .done once every prompt is answered or skipped;
  - the run reads those labels and the round goes on as with the scripted labeler. The other processes wait for
    rank 0 in a collective meanwhile: a person who takes longer than NANORLHF_DIST_TIMEOUT (nanorlhf/dist.py, 120
    minutes) needs it raised. A run resumed with --resume reuses a round file already there (see ask_person); a
    new run refuses a queue that holds an earlier run's rounds.
"""

import math
import random
import time
from pathlib import Path

import torch

from nanorlhf import checkpoint, dist, reward, tasks
from nanorlhf.config import UserError
from nanorlhf.data import (json_lines, load_demonstrations, load_preferences, load_prompts, preference_kind,
                           write_jsonl)
from nanorlhf.optim import adamw
from nanorlhf.rollout import as_response, sample_responses


POLL_S = 2.0  # --online_labeler person: how often the run looks for the labeler's .done


def sample_records(policy, prompts, k, temperature, max_new_tokens, generator, batch_size=128):
    """k sampled responses per prompt, unlabelled: [{"prompt", "responses"}]."""
    flat = [p for p in prompts for _ in range(k)]
    samples = sample_responses(policy, flat, max_new_tokens, temperature, batch_size, generator)
    # A response that never ended is shown to the labeler as it is (it scores as what it says).
    return [{"prompt": prompt, "responses": [as_response(text, ended) for text, ended in samples[i * k:(i + 1) * k]]}
            for i, prompt in enumerate(prompts)]


def sample_and_label(policy, prompts, k, noise, temperature, max_new_tokens, rng, generator, batch_size=128,
                     choose=False):
    """Sample k responses per prompt and have the scripted labeler rank them: [{"prompt", "responses"}], best first;
    choose: pick the best only, [{"prompt", "responses", "best"}] (the same labeler: P(best) = softmax(gold/noise))."""
    records = []
    for r in sample_records(policy, prompts, k, temperature, max_new_tokens, generator, batch_size):
        prompt, responses = r["prompt"], r["responses"]
        order = tasks.rank(prompt, responses, rng, noise)
        records.append({"prompt": prompt, "responses": responses, "best": order[0]} if choose else
                       {"prompt": prompt, "responses": [responses[j] for j in order]})
    return records


def ask_person(queue, it, records, choose):
    """A person's labels of records (K samples per prompt) through the queue folder (the module's docstring): write
    the round, wait for its .done, return the labels read back. Rank 0 alone: no collective in here."""
    path = queue / f"round_{it:05d}.jsonl"
    # A resumed run finds the file of the round it was killed in: a person may have labelled part of it, and those
    # labels name its responses, which a new draw would not give again (an earlier checkpoint runs iterations again,
    # other threads or a GPU sample other texts). So the file stays as it is, and this round's samples go unused.
    if not path.exists():
        distinct = [{"prompt": r["prompt"], "responses": list(dict.fromkeys(r["responses"])), "choose": choose}
                    for r in records]
        distinct = [r for r in distinct if len(r["responses"]) >= 2]  # a ranking of equal texts teaches nothing
        if not distinct:
            print(f"online round at iteration {it}: each prompt's samples were one text, nothing to label")
            return []
        write_jsonl(path, distinct)  # atomic (a temporary file renamed): the labeler never reads half a round
    shown = [r for _, r in json_lines(path)]
    done = path.with_suffix(".done")
    if not done.exists():
        print(f"online round at iteration {it}: {len(shown)} prompts for a person in {path}; waiting for "
              f"{done.name}, written by\n    python -m nanorlhf.label --queue {queue}", flush=True)
        while not done.exists():
            time.sleep(POLL_S)
    return read_labels(path.with_suffix(".labels.jsonl"), path, shown, choose)


def read_labels(labels, path, shown, choose):
    """The person's records in labels, each checked to answer one of the round's (path's) records, shown: a ranking
    of its responses, or with choose the index of the best (none if the person skipped every prompt)."""
    asked = {(r["prompt"], tuple(sorted(r["responses"]))) for r in shown}
    out = []
    for lineno, r in json_lines(labels) if labels.exists() else []:
        rs = r.get("responses")
        ok = isinstance(rs, list) and all(isinstance(x, str) for x in rs)
        if not (ok and (r.get("prompt"), tuple(sorted(rs))) in asked and
                (isinstance(r.get("best"), int) and 0 <= r["best"] < len(rs) if choose else "best" not in r)):
            raise UserError(f"{labels}:{lineno}: not {'a choice' if choose else 'a ranking'} of the responses of a "
                            f"record of {path}")
        out.append({k: r[k] for k in ("prompt", "responses", "best") if k in r})
    return out


def scored_pairs(prompts, samples):
    """The (prompt, response) pairs of sampled (text, ended) as PPO scores them with the RM: those that ended (PPO
    gives the others no_eos_penalty), or all of them if fewer than 2 ended (a std needs two). The score's
    normalisation is measured on these, by train_rm.py and after each online round."""
    pairs = [(p, as_response(t, e)) for p, (t, e) in zip(prompts, samples)]
    ended = [pair for pair, (_, e) in zip(pairs, samples) if e]
    return ended if len(ended) >= 2 else pairs


def as_group(record):
    """A labelled record as the RM's (prompt, responses best first) group, as data.load_preferences reads it."""
    rs = record["responses"]
    if "best" in record:
        rs = [rs[record["best"]]] + [r for j, r in enumerate(rs) if j != record["best"]]
    return record["prompt"], rs


def train_rm_steps(rm, optimizer, groups, steps, batch_size, rng, device, amp, choice=False, center_coef=0.0,
                   grad_clip=1.0):
    """S steps of the RM's loss on batches of groups with the same K, drawn from every label so far; returns the
    mean loss. Every process takes the same steps on the same batches (the same rng): the RM stays one model."""
    rm.train()
    plan, total = [], 0.0
    for _ in range(steps):
        if not plan:
            plan = reward.batches(list(groups), batch_size, rng)
        batch = plan.pop()
        with amp():
            scores, ids = reward.group_scores(rm, batch, rm.config.block_size, device)  # (G*K,) each
        loss = (reward.choice_loss if choice else reward.ranking_loss)(scores, len(batch[0][1]), center_coef, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.world_size() > 1:  # identical already; the mean keeps rounding from setting the copies apart
            for p in rm.parameters():
                if p.grad is not None:
                    p.grad.copy_(dist.all_reduce_sum(p.grad) / dist.world_size())
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(rm.parameters(), grad_clip)
        optimizer.step()
        total += loss.item()
    rm.eval()
    return total / max(steps, 1)


@torch.no_grad()
def renormalise(rm, norm, demos=None, unit_std=True):
    """Normalise the RM again as train_rm.py did, on norm, the (prompt, response) SFT samples it was normalised on:
    r -> (r - mean) * scale, folded into the head, with the mean of norm (Ziegler et al.) or of demos, the
    demonstrations (train_rm.py --norm_demos, InstructGPT), and scale 1 / std of norm (or 1 without --unit_std)."""
    scores = reward.score_texts(rm, [p for p, _ in norm], [r for _, r in norm])
    mean = reward.score_texts(rm, [p for p, _ in demos], [r for _, r in demos]).mean() if demos else scores.mean()
    reward.normalise_head(rm, mean.item(), 1.0 / max(scores.std().item(), 1e-8) if unit_std else 1.0)


def start(cfg, rm, ref, device, amp):
    """What the rounds need, as train_rm.py left it (its checkpoint's train_config): its labels (the file it trained
    on, or rankings_train.jsonl beside the RM for the built-in labeler's), K, the labeler's noise and kind, the loss,
    batch size, learning rate and clip; and the SFT samples that end, on which the score is normalised each round.
    cfg: train_ppo.py's Config (rm, prompts or data, online_*, seed, max_new_tokens, temperature, out, resume)."""
    prompts = load_prompts(cfg.data or cfg.prompts)
    queue = Path(cfg.out).with_suffix("") / "queue" if cfg.online_labeler == "person" else None
    if queue and not cfg.resume and any(queue.glob("round_*")):
        raise UserError(f"--online_labeler person: {queue} holds the rounds of an earlier run, which this new run "
                        f"would take for its own: move it away, or continue that run with --resume")
    if not queue and not all(tasks.is_task_prompt(p) for p in prompts):
        raise UserError(f"--online_every labels with the built-in task's scripted labeler: "
                        f"{cfg.data or cfg.prompts} holds other prompts")
    tc = checkpoint.load(cfg.rm, made_by="train_rm.py", kind="rm").get("train_config")
    if not tc:
        raise UserError(f"--online_every: {cfg.rm} was not written by train_rm.py (its settings and labels are "
                        f"where online training goes on from)")
    path = Path(tc["data"]) if tc.get("data") else Path(cfg.rm).parent / "rankings_train.jsonl"
    if not path.exists():
        raise UserError(f"--online_every: the RM's labels {path} are missing (online training goes on from them)")
    groups = load_preferences(path)
    rng = random.Random(cfg.seed + 1)  # online's own streams: PPO's draws stay those of an offline run
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 1000 * dist.rank())
    norm_prompts = [p for p, _ in groups][:tc["n_normalize"]]
    with amp():
        samples = sample_responses(ref, norm_prompts, cfg.max_new_tokens, cfg.temperature, 128,
                                   torch.Generator(device=device).manual_seed(cfg.seed + 2))
    norm = scored_pairs(norm_prompts, samples)
    demos = None
    if tc.get("norm_demos"):
        if not Path(tc["norm_demos"]).exists():
            raise UserError(f"--online_every: the demonstrations the RM was normalised on ({tc['norm_demos']}, its "
                            f"--norm_demos) are missing (each round normalises it again on them)")
        demos = load_demonstrations(tc["norm_demos"])[:tc["n_normalize"]]
    rounds = math.ceil(cfg.iters / cfg.online_every)
    dist.print0(f"online: {len(groups)} labels from {path}, then {rounds} rounds of {cfg.online_prompts} prompts x "
                f"K = {tc['k']} (iterations 0, {cfg.online_every}, ...): {'at most ' if queue else ''}"
                f"{len(groups) + rounds * cfg.online_prompts} labels in all")
    return dict(groups=groups, records=[], prompts=prompts, rng=rng, generator=generator, queue=queue,
                choice=preference_kind(path) == "choice", tc=tc, norm=norm, demos=demos, device=device,
                optimizer=adamw(rm, tc["lr"] / 3, betas=(0.9, 0.95)))


def run_round(state, cfg, policy, rm, amp, it=0):
    """One round (steps 1-4 of the module's docstring), before PPO's iteration `it`. Returns figures for the metrics
    log."""
    t0 = time.time()
    tc, rng, queue = state["tc"], state["rng"], state["queue"]
    prompts = rng.sample(state["prompts"], min(cfg.online_prompts, len(state["prompts"])))  # the same in every process
    choose = state["choice"] or tc.get("labels") == "choose"
    with amp():
        if queue:  # a person labels them, below
            records = sample_records(policy, dist.shard(prompts), tc["k"], cfg.temperature, cfg.max_new_tokens,
                                     state["generator"])
        else:
            records = sample_and_label(policy, dist.shard(prompts), tc["k"], tc["label_noise"], cfg.temperature,
                                       cfg.max_new_tokens, rng, state["generator"], 128, choose)
    records = [r for part in dist.all_gather_objects(records) for r in part]  # every process's, in rank order
    if queue:  # rank 0 waits for the person's labels; the other processes get them from it
        records = dist.broadcast_object(ask_person(queue, it, records, choose) if dist.is_main() else None)
    new = [as_group(r) for r in records]
    old = rng.sample(state["groups"], min(len(new), len(state["groups"])))  # as many earlier labels, replayed
    state["records"] += records
    state["groups"] += new
    steps = cfg.online_rm_epochs * math.ceil(len(new + old) / tc["batch_size"])
    loss = train_rm_steps(rm, state["optimizer"], new + old, steps, tc["batch_size"], rng, state["device"], amp,
                          state["choice"], tc["center_coef"], tc["grad_clip"])
    with amp():
        renormalise(rm, state["norm"], state["demos"], tc.get("unit_std", True))
    return dict(labels=len(state["groups"]), online_labels=len(state["records"]), rm_loss=loss,
                t_online=time.time() - t0)


def state_dict(state, rm):
    """What a resumed run needs to go on as an uninterrupted one would: the RM, its optimizer, the new labels and
    online's random streams."""
    return dict(rm=rm.state_dict(), optimizer=state["optimizer"].state_dict(), records=state["records"],
                rng=state["rng"].getstate(), generator=dist.all_gather_objects(state["generator"].get_state()))


def load_state_dict(state, rm, saved):
    rm.load_state_dict(saved["rm"])
    state["optimizer"].load_state_dict(saved["optimizer"])
    state["records"] = list(saved["records"])
    state["groups"] += [as_group(r) for r in saved["records"]]
    state["rng"].setstate(saved["rng"])
    state["generator"].set_state(saved["generator"][dist.rank()])


def write_labels(state, out):
    """This run's new labels, beside its metrics (out/ppo.pt -> out/ppo/labels.jsonl): the records a person would
    have written with nanorlhf.label."""
    write_jsonl(Path(out).with_suffix("") / "labels.jsonl", state["records"])
