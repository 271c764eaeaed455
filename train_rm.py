"""Stage 2 of RLHF: a reward model (RM) trained on rankings of sampled responses.

InstructGPT §3.5: start from the SFT model, replace the unembedding with a scalar head, and train on labelers'
rankings of K responses per prompt with the pairwise loss of nanorlhf/reward.py (best-of-K choices: Ziegler et
al.'s softmax loss over the K). Afterwards the score is normalised on what PPO will score, samples of the SFT
policy that end: a gain and a bias so that they have mean 0 and std 1 (Ziegler et al. 2019), or, given
--norm_demos, a bias so that the labelers' demonstrations score mean 0 (InstructGPT §3.5; the gain from the
samples if --unit_std).

Default (the built-in task): sample K responses for each training prompt from the SFT model, let the scripted
labeler rank them (with its noise), write the rankings as JSONL and train on that file (6 epochs: this small RM
underfits after one).

Reads  out/sft.pt; data/prompts_train.jsonl and data/prompts_eval.jsonl (default) or --data / --eval_data rankings
Writes out/rm.pt; out/rankings_train.jsonl and out/rankings_eval.jsonl (default)
"""

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nanorlhf import checkpoint, cpu, dist
from nanorlhf.config import (DTYPES, UserError, at_least, check_room, checkpoint_name, file_name, finite, in_range,
                             one_of, positive, require, run, seed_range)
from nanorlhf.data import load_demonstrations, load_preferences, load_prompts, preference_kind, write_jsonl
from nanorlhf.metrics import MetricsLog
from nanorlhf.model import GPT, ScalarModel
from nanorlhf.online import sample_and_label, scored_pairs
from nanorlhf.optim import adamw, lr_at, set_lr
from nanorlhf.reward import accuracy, batches, choice_loss, group_scores, normalise_head, ranking_loss, score_texts
from nanorlhf.rollout import sample_responses


@dataclass
class Config:
    """Train the reward model on rankings of K responses per prompt (InstructGPT §3.5)."""

    sft: str = "out/sft.pt"
    """SFT checkpoint: the default data is sampled from it, and (without --init_from) the RM's trunk starts from it"""
    init_from: str = ""
    """the RM's trunk, if not the SFT model: any GPT-2 size (InstructGPT pairs a 6B RM with its 175B policy), as a
    checkpoint (.pt) or GPT-2 weights (a Hugging Face directory or a hub name such as gpt2-medium)"""
    data: str = ""
    """rankings {"prompt", "responses": [best first]}, pairs {"prompt", "chosen", "rejected"}, HH-RLHF or TL;DR
    comparisons (README "Data formats"); "" = the built-in task's labeler"""
    eval_data: str = ""
    """held-out rankings for accuracy ("" with --data: hold out eval_fraction of it)"""
    prompts: str = "data/prompts_train.jsonl"
    """built-in data: prompts to sample and rank responses for"""
    eval_prompts: str = "data/prompts_eval.jsonl"
    """built-in data: held-out prompts"""
    out: str = "out/rm.pt"
    """where the checkpoint goes"""
    n_prompts: int = 4000
    """built-in data: training prompts to sample K responses for and rank"""
    n_eval: int = 250
    """built-in data: held-out prompts to label"""
    k: int = 8
    """built-in data: responses sampled and ranked per prompt, giving C(K, 2) pairs (InstructGPT: K = 4 to 9)"""
    labels: str = "rank"
    """built-in labeler: "rank" all K responses (InstructGPT), or "choose" the best of K (Ziegler et al. 2019)"""
    label_noise: float = 0.1
    """built-in labeler's noise: P(a ranked above b) = sigmoid((gold_a - gold_b) / label_noise)"""
    temperature: float = 1.0
    """sampling temperature of the responses to rank and of those that set the score's zero (use PPO's)"""
    max_new_tokens: int = 16
    """longest sampled response, here as in PPO (use PPO's)"""
    eval_fraction: float = 0.1
    """with --data and no --eval_data: fraction held out"""
    keep_articles: bool = False
    """TL;DR comparisons: keep the CNN/DM news records (an "article", no "post"; skipped by default, with a count) as
    "ARTICLE: ...\nTL;DR:" prompts"""
    batch_size: int = 16
    """prompts (each with all of its K responses) per step and process (torchrun: world_size x batch_size in all)"""
    micro_batch_size: int = 0
    """rankings per forward and backward pass, summed into each step (0: all at once): less memory, the same step"""
    sample_batch_size: int = 128
    """prompts the SFT model samples for at a time (the built-in labeler's responses, the normalisation's samples)"""
    activation_checkpointing: bool = False
    """keep only each block's input for the backward pass, recompute the rest there: less memory, more compute"""
    fsdp: bool = False
    """torchrun: shard the RM, its gradients and AdamW's moments over the processes (FSDP2) instead of DDP"""
    epochs: int = 6
    """passes over the rankings (InstructGPT: one, as more overfit its large RMs; this small RM underfits after
    one)"""
    lr: float = 3e-4
    """peak learning rate (warm-up, then cosine decay to a tenth of it)"""
    warmup_iters: int = 10
    """linear warm-up steps"""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices"""
    grad_clip: float = 1.0
    """clip the gradient's global norm (0: off)"""
    center_coef: float = 0.01
    """weight of (each prompt's mean score)^2 added to the loss: keeps per-prompt offsets, which carry no
    preference, out of the score (nanorlhf/reward.py)"""
    n_normalize: int = 256
    """training prompts whose SFT samples (those that end: PPO scores only them) set the score's zero and scale"""
    unit_std: bool = True
    """also scale the score to std 1 on those samples (Ziegler et al. 2019), so PPO's beta and penalties mean the
    same whatever scale training left the RM at"""
    norm_demos: str = ""
    """demonstrations (any demonstrations format) whose mean score becomes 0, InstructGPT's bias; "" = the SFT
    samples' mean, Ziegler et al.'s (the first n_normalize are used)"""
    dtype: str = "auto"
    """autocast dtype of forward passes: auto (bfloat16 on a GPU that has it, else float32), bfloat16 or float32"""
    compile: bool = False
    """torch.compile the reward model being trained"""
    seed: int = 0
    """random seed"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    ckpt_interval: int = 100
    """steps between resumable checkpoints at --out (0: only the final one)"""
    resume: bool = False
    """continue the run from its checkpoint at --out (built-in data: the rankings it wrote are read back)"""

    def __post_init__(self):  # ranges of the flags, checked whenever a Config is made (nanorlhf/config.py)
        finite(self)
        file_name(self, "sft")
        checkpoint_name(self)
        if self.data:
            in_range(self, "eval_fraction", 0, 1, lo_open=True, hi_open=True)
        else:
            require(not self.eval_data, "--eval_data needs --data (the built-in labeler's held-out rankings come "
                                        "from --eval_prompts)")
            file_name(self, "prompts", "eval_prompts")
        at_least(self, 1, "n_prompts", "n_eval", "max_new_tokens", "batch_size", "epochs")
        at_least(self, 2, "k")  # a ranking compares responses
        at_least(self, 2 if self.unit_std else 1, "n_normalize")  # the std of one score is no scale
        at_least(self, 0, "label_noise", "warmup_iters", "weight_decay", "grad_clip", "center_coef", "threads",
                 "ckpt_interval", "micro_batch_size")
        at_least(self, 1, "sample_batch_size")
        require(not (self.fsdp and (self.ckpt_interval or self.resume)), "--fsdp needs --ckpt_interval 0, no --resume")
        positive(self, "temperature", "lr")  # temperature 0 would sample the same response K times
        one_of(self, "dtype", DTYPES)
        one_of(self, "labels", ("rank", "choose"))
        seed_range(self)


def main(cfg: Config):
    """Train the RM; a run that fails before its first checkpoint leaves the previous run's files as they were."""
    with checkpoint.Staged() as staged:  # metrics, rankings: beside the previous run's until the first checkpoint
        return train_rm(cfg, staged)


def train_rm(cfg: Config, staged: checkpoint.Staged):
    checkpoint.check_outputs(cfg.out)  # before anything is read or written (the flags were checked in Config)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dist.setup()  # under torchrun: join the process group, this process's GPU (nanorlhf/dist.py)
    cpu.keep_freed_memory(device)  # CPU: reuse freed buffers instead of page-faulting fresh ones every step
    amp = dist.autocast(device, cfg.dtype)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + dist.rank())  # samples differ per process
    # Built-in data with several processes: each labels its share of the prompts with its own random stream, so
    # that rng, which draws the data order, stays the same in all of them.
    label_rng = rng if dist.world_size() == 1 else random.Random(f"label {cfg.seed} {dist.rank()}")
    resumed = checkpoint.load_resumable(cfg, "train_rm.py", kind="rm") if cfg.resume else None
    if cfg.resume and resumed is None:
        return  # that run had finished

    sft = checkpoint.load(cfg.sft, made_by="train_sft.py", kind="sft")
    model_cfg = checkpoint.model_config(sft)
    check_room(cfg.max_new_tokens, model_cfg.block_size, cfg.sft)
    policy = GPT(model_cfg).to(device).eval()
    policy.load_state_dict(sft["model"])
    trunk = checkpoint.init_gpt(cfg.init_from) if cfg.init_from else None  # any size (the tokenizer is GPT-2's)
    rm = ScalarModel(trunk.config if trunk else model_cfg).to(device)
    rm.gpt.load_state_dict(trunk.state_dict() if trunk else sft["model"])  # the trunk starts as SFT's; a new head
    rm.gpt.checkpointing = cfg.activation_checkpointing

    # 1. Rankings: the scripted labeler's (built-in) or the user's file.
    t0 = time.time()
    if cfg.data:
        train = load_preferences(cfg.data, cfg.keep_articles)
        if cfg.eval_data:
            held_out = load_preferences(cfg.eval_data, cfg.keep_articles)
        else:
            if len(train) < 2:
                raise UserError(f"{cfg.data}: 1 ranking, none left to train on after holding out --eval_fraction "
                                f"{cfg.eval_fraction}: add rankings or give --eval_data")
            rng.shuffle(train)
            n_eval = max(1, int(cfg.eval_fraction * len(train)))
            held_out, train = train[:n_eval], train[n_eval:]
    else:
        out_dir = Path(cfg.out).parent
        files = {name: out_dir / f"rankings_{name}.jsonl" for name in ("train", "eval")}
        if not resumed:  # a resumed run reads back the rankings its first run wrote, never drawn again
            # Both prompt files are read before any sampling, so a mistake in either stops the run at once.
            prompts = {"train": load_prompts(cfg.prompts)[:cfg.n_prompts],
                       "eval": load_prompts(cfg.eval_prompts)[:cfg.n_eval]}
            for name in ("train", "eval"):
                dist.print0(f"sampling {cfg.k} responses for {len(prompts[name])} {name} prompts and ranking them "
                      f"(scripted labeler, noise {cfg.label_noise})")
                with amp():
                    records = sample_and_label(policy, dist.shard(prompts[name]), cfg.k, cfg.label_noise,
                                               cfg.temperature, cfg.max_new_tokens, label_rng, generator,
                                               cfg.sample_batch_size, cfg.labels == "choose")
                records = [r for part in dist.all_gather_objects(records) for r in part]  # every process's
                if dist.is_main():  # beside the previous run's rankings until this run's first checkpoint
                    write_jsonl(staged.path(files[name]), records)
                files[name] = staged.name(files[name])  # where rank 0 wrote them
        dist.barrier()  # the files are written before anyone reads them
        train = load_preferences(files["train"])  # read back: the same path user data takes
        held_out = load_preferences(files["eval"])
    # Best-of-K choices know only "the best beats each other one": Ziegler et al.'s softmax loss, not the ranking's.
    choice = preference_kind(cfg.data or files["train"]) == "choice"
    eval_choice = preference_kind(cfg.eval_data or cfg.data or files["eval"]) == "choice"
    demos = load_demonstrations(cfg.norm_demos)[:cfg.n_normalize] if cfg.norm_demos else None  # read before training
    if cfg.unit_std and len(train) < 2:
        raise UserError(f"{cfg.data or files['train']}: only 1 ranking to train on; normalising the score to std 1 "
                        f"needs 2 at least (or --unit_std false)")
    n_pairs = sum(len(rs) - 1 if choice else len(rs) * (len(rs) - 1) // 2 for _, rs in train)
    dist.print0(f"RM: {len(train)} rankings ({n_pairs} pairs) to train on, {len(held_out)} held out "
          f"[{time.time() - t0:.0f} s]")
    n_rm, k_max = checkpoint.param_count(rm.config, head=True), max(len(rs) for _, rs in train)
    micro = min(cfg.micro_batch_size or cfg.batch_size, cfg.batch_size)
    dist.print0(checkpoint.memory_line(checkpoint.memory_estimate(
        checkpoint.param_count(model_cfg) + n_rm, n_rm, [(model_cfg, cfg.sample_batch_size * model_cfg.block_size)],
        [(rm.config, micro * k_max * rm.config.block_size)], dist.autocast_dtype(cfg.dtype, device),
        cfg.activation_checkpointing, dist.world_size() if cfg.fsdp else 1)))

    # 2. Train on all C(K, 2) pairs of each prompt at once, for `epochs` passes.
    train_rm = dist.wrap(rm, device, cfg.compile, cfg.fsdp)  # DDP or FSDP with several processes
    optimizer = adamw(rm, cfg.lr, cfg.weight_decay)  # after FSDP: its parameters are shards
    if resumed:  # the plan is drawn from rng as it stood here in the first run: draw the same one again
        rng.setstate(resumed["resume"]["plan_rng"])
    plan_rng = rng.getstate()
    plan = [b for _ in range(cfg.epochs) for b in batches(train, cfg.batch_size * dist.world_size(), rng)]
    first_it = 0
    if resumed:  # go on from the checkpoint: weights, optimizer, random states
        rm.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["resume"]["optimizer"])
        checkpoint.set_rng_state(resumed["resume"]["rng"], rng, generator)
        first_it = resumed["step"]
    # out/rm.pt -> out/rm/metrics.jsonl; a resumed run drops the records after its checkpoint and appends
    metrics = (MetricsLog(Path(cfg.out).with_suffix(""), fresh=not resumed, upto=first_it, staged=staged)
               if dist.is_main() else None)
    bar = tqdm(range(first_it, len(plan)), initial=first_it, total=len(plan), desc="rm", dynamic_ncols=True,
               mininterval=1.0, disable=not dist.is_main())
    for it in bar:
        batch = plan[it]
        if len(batch) < dist.world_size():
            continue  # a last, short batch (of one K) too small to give every process a ranking: skipped
        batch = dist.shard(batch)  # this process's part of the global batch
        set_lr(optimizer, lr_at(it, cfg.lr, cfg.warmup_iters, len(plan), 0.1 * cfg.lr))
        k = len(batch[0][1])
        # In micro-batches of rankings (one by default), each mean weighed by its share of the global batch's.
        parts = [batch[s] for s in dist.micro_batches(len(batch), cfg.micro_batch_size)]
        (shares,) = dist.shares([len(part) for part in parts])
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, part in dist.accumulate(parts, train_rm):  # DDP: only the last one averages over processes
            with amp():
                scores, ids = group_scores(train_rm, part, rm.config.block_size, device)  # (G*K,) each
            loss = (choice_loss if choice else ranking_loss)(scores, k, cfg.center_coef, ids)
            (loss * shares[i]).backward()
            total += shares[i] * loss.item()
        loss = dist.mean_floats([total])[0]  # the mean over every process's rankings
        if not math.isfinite(loss):
            raise UserError(f"the RM loss became {loss} at step {it}: lower --lr (the last checkpoint and "
                            f"its files are left as they were)")
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.grad_clip)
        optimizer.step()
        bar.set_postfix(loss=f"{loss:.3f}")
        if metrics:
            metrics.log(it + 1, loss=loss, lr=optimizer.param_groups[0]["lr"])
        if metrics and cfg.ckpt_interval and (it + 1) % cfg.ckpt_interval == 0 and it + 1 < len(plan):
            staged.commit()  # this run's metrics and rankings replace the previous run's, with its first checkpoint
            checkpoint.save(cfg.out, rm, kind="rm", train_config=vars(cfg), step=it + 1,
                            resume=dict(optimizer=optimizer.state_dict(), rng=checkpoint.rng_state(rng, generator),
                                        plan_rng=plan_rng))
    bar.close()

    # 3. Normalise on what PPO scores, SFT samples that end: r -> (r - mean) * scale, folded into the head's weight
    #    and bias. mean: theirs (Ziegler et al. 2019) or the demonstrations' (InstructGPT §3.5); scale: 1 / their
    #    std (unit_std, Ziegler et al.).
    dist.unshard(rm)  # FSDP: the whole RM in every process from here on
    if not dist.is_main():  # rank 0 normalises, evaluates and saves; the others apply its shift and are done
        normalise_head(rm, *dist.broadcast_object(None))
        dist.cleanup()
        return dict(rm=rm)
    prompts = [p for p, _ in train][:cfg.n_normalize]
    with amp():
        samples = sample_responses(policy, prompts, cfg.max_new_tokens, cfg.temperature, cfg.sample_batch_size,
                                   generator)
        if (no_end := 1 - sum(e for _, e in samples) / len(samples)) > 0.5:  # the zero would be set on cut replies
            print(f"warning: {no_end:.0%} of the SFT samples did not end within --max_new_tokens "
                  f"{cfg.max_new_tokens}: raise it to fit the data's replies (and use the same in train_ppo.py)",
                  file=sys.stderr)
        ended = scored_pairs(prompts, samples)  # those that ended (with next to none, the warning above said so)
        rm.eval()
        sft_scores = score_texts(rm, [p for p, _ in ended], [r for _, r in ended])
        demo_scores = score_texts(rm, [p for p, _ in demos], [r for _, r in demos]) if demos else None
    std = sft_scores.std().item()
    mean = (demo_scores if demos else sft_scores).mean().item()
    scale = 1.0 / max(std, 1e-6) if cfg.unit_std else 1.0
    normalise_head(rm, *dist.broadcast_object((mean, scale)))
    print(f"normalised: {'demonstrations' if demos else 'SFT samples'}' mean score {mean:+.3f} -> 0"
          + (f"; SFT samples' std {std:.3f} -> 1" if cfg.unit_std else "") + f" ({len(ended)} samples)")

    # 4. Held-out accuracy, beside the ceiling the labels' own noise allows.
    with amp():
        result = accuracy(rm, held_out, eval_choice)
        # Train accuracy beside held-out: far above it, the RM overfits; near it, it underfits.
        train_acc, _ = accuracy(rm, train[:len(held_out)], choice)["acc_labels"]
    acc, n = result["acc_labels"]
    msg = f"pairwise accuracy vs the labels: train {train_acc:.3f}, held-out {acc:.3f} ({n} pairs)"
    if "acc_gold" in result:
        (ag, ng), (ceiling, _) = result["acc_gold"], result["acc_labels_vs_gold"]
        msg += f"; vs the gold score: {ag:.3f} ({ng} pairs); the labels themselves vs gold (ceiling): {ceiling:.3f}"
    print(msg)
    metrics.log(len(plan), **{k: v[0] for k, v in result.items()}, acc_train_labels=train_acc,
                sft_score_std=std)
    staged.commit()
    checkpoint.save(cfg.out, rm, kind="rm", train_config=vars(cfg), eval=result,
                    sft_score_std=std, step=len(plan))
    print(f"RM done in {time.time() - t0:.0f} s; wrote {cfg.out}")
    dist.cleanup()
    return dict(rm=rm)  # the trained reward model (tests compare it across processes)


if __name__ == "__main__":
    run(main, Config)
