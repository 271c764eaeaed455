"""Stage 3 of RLHF: PPO against the reward model, with a per-token KL penalty to the SFT model.

Ziegler et al. 2019 and InstructGPT §3.5 maximise, over prompts x and sampled responses y,

    objective = E[ r_theta(x, y) - beta * log(pi(y|x) / pi_SFT(y|x)) ]  (+ gamma_ptx * E_pretrain[log pi(x)])

Four models: the policy pi (starts as SFT), the frozen reference pi_SFT, the frozen reward model r_theta, and the
value function V (starts as the RM, InstructGPT). Every iteration runs the numbered steps in main():
1 roll out, 2 score, 3 log-probs and values, 4 rewards, 5 beta, 6 advantages, 7 PPO epochs, (8 PPO-ptx inside 7).
--estimator rloo, grpo or drgrpo drops V: k samples per prompt, the others' rewards the baseline (nanorlhf/ppo.py).

Reads  out/sft.pt, out/rm.pt, data/prompts_train.jsonl, data/prompts_eval.jsonl
Writes out/ppo.pt (the policy under "model", GAE's value function under "value")

    python train_ppo.py
    torchrun --standalone --nproc_per_node=4 train_ppo.py    # 4 GPUs (DDP): each rolls out batch_size prompts
    python train_ppo.py --micro_batch_size 4 --activation_checkpointing     # less memory, the same updates
"""

import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from nanorlhf import checkpoint, cpu, dist, online, ppo
from nanorlhf.config import (DTYPES, UserError, at_least, check_room, checkpoint_name, file_name, finite, in_range,
                             left_default, one_of, positive, require, run, seed_range)
from nanorlhf.data import encode_lm_data, load_prompts
from nanorlhf.evaluate import gold_eval
from nanorlhf.metrics import MetricsLog
from nanorlhf.model import GPT, ScalarModel
from nanorlhf.optim import adamw, set_lr
from nanorlhf.rollout import generate, merge_rollouts, response_logprobs, response_mask, response_values
from nanorlhf.sft import make_batch, sft_loss
from nanorlhf.tokenizer import encode


@dataclass
class Config:
    """PPO against the reward model with a per-token KL penalty to the SFT model."""

    sft: str = "out/sft.pt"
    """SFT checkpoint: the policy's start and the frozen reference"""
    rm: str = "out/rm.pt"
    """reward model checkpoint: the reward, and the value function's start"""
    prompts: str = "data/prompts_train.jsonl"
    """prompts to roll out on {"prompt"}"""
    data: str = ""
    """prompts to roll out on, from a file in any format of README "Data formats" (prompts, demonstrations,
    rankings, pairs, HH-RLHF, TL;DR), each distinct prompt once; "" = --prompts"""
    keep_articles: bool = False
    """TL;DR comparisons: keep the CNN/DM news records (no "post"; skipped by default, with a count) as prompts"""
    eval_prompts: str = "data/prompts_eval.jsonl"
    """held-out prompts for the gold score ("" to skip; only the built-in task's prompts are scored)"""
    out: str = "out/ppo.pt"
    """where the checkpoint goes"""
    iters: int = 150
    """PPO iterations (each: one batch of rollouts, then ppo_epochs over it)"""
    batch_size: int = 128
    """rollouts per iteration and process, of batch_size / samples_per_prompt prompts (torchrun: x world_size)"""
    samples_per_prompt: int = 1
    """k: responses sampled per prompt, in consecutive rows (rloo, grpo, drgrpo: at least 2, each one's baseline)"""
    estimator: str = "gae"
    """advantages: gae (PPO's, from a value function V) or the critic-free rloo, grpo, drgrpo (nanorlhf/ppo.py)"""
    minibatch_size: int = 16
    """rollouts per gradient step and process"""
    micro_batch_size: int = 0
    """rollouts per pass of every kind: generation, scoring, the update's (summed into each step); 0: all at once"""
    activation_checkpointing: bool = False
    """keep only each block's input for the backward pass, recompute the rest there: less memory, more compute"""
    fsdp: bool = False
    """torchrun: shard the policy, the value function and their AdamW states over the processes (FSDP2), not DDP"""
    ppo_epochs: int = 1
    """passes over each batch of rollouts (Ziegler et al.: 4 epochs; rollouts are cheap on the built-in task)"""
    lr: float = 3e-4
    """policy learning rate (Adam), the peak if anneal_lr"""
    vf_lr: float = 3e-4
    """value function learning rate (the peak if anneal_lr)"""
    value_embeddings: bool = False
    """train the value function's token embeddings too (off: frozen as the RM left them, so an update skips their
    dense vocabulary x width gradient and its Adam step)"""
    anneal_lr: bool = True
    """decay both learning rates linearly to 0 over the iterations (as cleanrl's PPO does)"""
    temperature: float = 1.0
    """sampling temperature; the log-probs are computed at the same temperature"""
    max_new_tokens: int = 16
    """longest response (a run whose first rollouts mostly do not end says so: fit it to the data's replies)"""
    no_eos_penalty: float = -5.0
    """score given, instead of the RM's, to a response that never produced <|endoftext|>"""
    init_kl_coef: float = 0.2
    """beta: weight of the per-token KL penalty to the SFT model (grpo, drgrpo: of the k3 KL in the loss)"""
    online_every: int = 0
    """online data collection (Ziegler et al. 2019; nanorlhf/online.py): every this many iterations, label samples of
    the policy and train the RM on them (0: offline, the RM frozen)"""
    online_prompts: int = 200
    """online: prompts per round, each with K samples of the policy for the labeler (K: the RM run's)"""
    online_rm_epochs: int = 2
    """online: passes over a round's new labels and as many earlier ones"""
    online_labeler: str = "scripted"
    """online: who labels, scripted (the built-in task's) or person (python -m nanorlhf.label --queue out/ppo/queue)"""
    adaptive_kl: bool = True
    """adapt beta towards target_kl (Ziegler et al.'s controller); false keeps beta fixed"""
    target_kl: float = 1.0
    """adaptive controller: target KL(pi || pi_SFT) per response, in nats"""
    kl_horizon: int = 10000
    """adaptive controller: horizon in rollouts (K_beta = batch_size / kl_horizon)"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """PPO ratio clip epsilon"""
    cliprange_value: float = 0.2
    """value clip epsilon"""
    ent_coef: float = 0.0
    """entropy bonus weight (0: the logged entropy is the rollouts' estimate, mean -log pi of the sampled tokens)"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (scale only) before GAE"""
    ptx_coef: float = 0.0
    """PPO-ptx (InstructGPT eq. 2): weight of the LM loss on ptx_data mixed into the policy loss"""
    ptx_data: str = "data/sft.jsonl"
    """PPO-ptx: pretraining text (a .txt file or JSONL {"text"}: the LM loss on every token) or demonstrations (any
    format of README "Data formats": the loss on their responses)"""
    grad_clip: float = 1.0
    """clip each model's gradient norm (0: off)"""
    eval_interval: int = 25
    """iterations between held-out gold scores (and at the end)"""
    eval_n: int = 200
    """held-out prompts for the gold score"""
    dtype: str = "auto"
    """autocast dtype of forward passes: auto (bfloat16 on a GPU that has it, else float32), bfloat16 or float32"""
    compile: bool = False
    """torch.compile the policy and the value function for their training passes (generation runs eager)"""
    seed: int = 0
    """random seed"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    ckpt_interval: int = 10
    """iterations between resumable checkpoints at --out (0: only the final one)"""
    resume: bool = False
    """continue the run from its checkpoint at --out"""

    def __post_init__(self):  # ranges of the flags, checked whenever a Config is made (nanorlhf/config.py)
        finite(self)
        file_name(self, "sft", "rm")
        checkpoint_name(self)
        if not self.data:
            require(self.prompts != "", "--prompts must name a file when --data is not given, got ''")
        if self.ptx_coef > 0:
            file_name(self, "ptx_data")
        at_least(self, 1, "iters", "batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "kl_horizon",
                 "eval_interval", "samples_per_prompt")
        one_of(self, "estimator", ("gae", "rloo", "grpo", "drgrpo"))
        at_least(self, 0, "online_every")
        at_least(self, 1, "online_prompts", "online_rm_epochs")
        one_of(self, "online_labeler", ("scripted", "person"))
        require(self.online_every or self.online_labeler == "scripted", "--online_labeler person needs --online_every")
        require(not (self.online_every and self.fsdp), "--online_every trains the RM unsharded: leave out --fsdp")
        require(self.estimator == "gae" or self.samples_per_prompt >= 2, f"--samples_per_prompt must be at least 2 "
                f"with --estimator {self.estimator} (a baseline from the others), got {self.samples_per_prompt}")
        if self.estimator != "gae":  # V's and GAE's settings
            left_default(self, ("vf_lr", "value_embeddings", "gamma", "lam", "cliprange_value", "whiten_rewards"),
                         f"is GAE's: --estimator {self.estimator} has no value function")
        require(self.batch_size % self.samples_per_prompt == 0, f"--batch_size must be a multiple of "
                f"--samples_per_prompt {self.samples_per_prompt}, got {self.batch_size}")
        require(self.minibatch_size <= self.batch_size, f"--minibatch_size must be at most --batch_size "
                                                        f"{self.batch_size}, got {self.minibatch_size}")
        positive(self, "lr", "vf_lr", "temperature", "target_kl", "cliprange", "cliprange_value")
        at_least(self, 0, "init_kl_coef", "ent_coef", "ptx_coef", "grad_clip", "eval_n", "threads", "ckpt_interval",
                 "micro_batch_size")
        require(not (self.fsdp and (self.ckpt_interval or self.resume)), "--fsdp needs --ckpt_interval 0, no --resume")
        in_range(self, "gamma", 0, 1)
        in_range(self, "lam", 0, 1)
        one_of(self, "dtype", DTYPES)
        seed_range(self)


def load_models(cfg, device):
    """policy, reference, reward model and value function (None but with GAE), all without dropout (RL needs exact
    log-probs and values; lm-human-preferences too). The RM, and so the value function, may be of another GPT-2 size
    than the policy (InstructGPT: a 6B RM for its 175B policy): the tokenizer is GPT-2's for both (checked at load),
    and its context must hold every rollout."""
    sft = checkpoint.load(cfg.sft, made_by="train_sft.py", kind="sft")
    rm_ckpt = checkpoint.load(cfg.rm, made_by="train_rm.py", kind="rm")
    policy_cfg = replace(checkpoint.model_config(sft), dropout=0.0)  # SFT's or the RM's dropout stays behind
    rm_cfg = replace(checkpoint.model_config(rm_ckpt), dropout=0.0)
    if rm_cfg.block_size < policy_cfg.block_size:
        raise UserError(f"the reward model's context ({cfg.rm}: block_size {rm_cfg.block_size}) is shorter than the "
                        f"policy's ({cfg.sft}: {policy_cfg.block_size}), so it could not score every rollout")
    policy, ref = GPT(policy_cfg), GPT(policy_cfg)
    policy.load_state_dict(sft["model"])
    ref.load_state_dict(sft["model"])
    rm, value = ScalarModel(rm_cfg), ScalarModel(rm_cfg) if cfg.estimator == "gae" else None
    for m in (rm, value) if value else (rm,):
        m.load_state_dict(rm_ckpt["model"])  # InstructGPT: the value function starts as the RM
    return [m.to(device) if m else None for m in (policy, ref, rm, value)]


def main(cfg: Config):
    """Train with PPO; a run that fails before its first checkpoint leaves the previous run's files as they were."""
    with checkpoint.Staged() as staged:  # metrics.jsonl: beside the previous run's until this run's first checkpoint
        return train_ppo(cfg, staged)


def train_ppo(cfg: Config, staged: checkpoint.Staged):
    checkpoint.check_outputs(cfg.out)  # before anything is read or written (the flags were checked in Config)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dist.setup()  # under torchrun: join the process group, this process's GPU (nanorlhf/dist.py)
    cpu.keep_freed_memory(device)  # CPU: reuse freed buffers instead of page-faulting fresh ones every step
    amp = dist.autocast(device, cfg.dtype)
    low_precision = dist.autocast_dtype(cfg.dtype, device) is not None  # bf16 forward passes
    generator = torch.Generator(device=device).manual_seed(cfg.seed + dist.rank())  # rollouts differ per process
    global_batch = cfg.batch_size * dist.world_size()
    n_prompts = global_batch // cfg.samples_per_prompt  # an iteration's prompts, each sampled samples_per_prompt times
    grpo = cfg.estimator in ("grpo", "drgrpo")  # GRPO's loss (step 7): a mean over responses, its KL inside
    reduce = dist.all_reduce_sum if dist.world_size() > 1 else None  # whitening over every process's tokens
    resumed = checkpoint.load_resumable(cfg, "train_ppo.py", kind="ppo") if cfg.resume else None
    if cfg.resume and resumed is None:
        return  # that run had finished

    policy, ref, rm, value = load_models(cfg, device)
    check_room(cfg.max_new_tokens, policy.config.block_size, cfg.sft)
    prompts = [encode(p) for p in load_prompts(cfg.data or cfg.prompts, cfg.keep_articles)]
    per = f" / --samples_per_prompt {cfg.samples_per_prompt}" if cfg.samples_per_prompt > 1 else ""
    dist.require_global_batch(len(prompts), n_prompts, "prompts", cfg.data or cfg.prompts,
                              f"--batch_size {cfg.batch_size}{per}")  # fewer: unequal DDP steps, a hang
    eval_prompts = load_prompts(cfg.eval_prompts)[:cfg.eval_n] if cfg.eval_prompts else []
    # PPO-ptx's data: pretraining text (the LM loss on every token) or demonstrations (on their responses)
    ptx = encode_lm_data(cfg.ptx_data, policy.config.block_size) if cfg.ptx_coef > 0 else None
    for m in (ref, rm):
        m.eval().requires_grad_(m is rm and cfg.online_every > 0)  # online: the RM keeps learning
    lab = online.start(cfg, rm, ref, device, amp) if cfg.online_every else None  # Ziegler et al.'s online labels
    policy.train().checkpointing = cfg.activation_checkpointing  # dropout is 0 in all models: train() is exact
    if value:  # its token embeddings frozen before the optimizer, which takes only what requires a gradient
        value.train().gpt.checkpointing = cfg.activation_checkpointing
        value.gpt.transformer.wte.weight.requires_grad_(cfg.value_embeddings)
    # The modules the PPO epochs train through (DDP or FSDP with several processes, compiled with --compile);
    # generation, scoring, evaluation, PPO-ptx's second forward and checkpoints use policy and value themselves.
    train_policy, train_value = (dist.wrap(m, device, cfg.compile, cfg.fsdp) if m else None for m in (policy, value))
    policy_opt = adamw(policy, cfg.lr, betas=(0.9, 0.95))  # after FSDP: their parameters are shards
    value_opt = adamw(value, cfg.vf_lr, betas=(0.9, 0.95)) if value else None
    trained, opts = [m for m in (policy, value) if m], [o for o in (policy_opt, value_opt) if o]  # V: GAE's only
    beta = cfg.init_kl_coef
    history = []
    order, pos = list(range(len(prompts))), len(prompts)
    first_it = 0
    if resumed:  # go on from the checkpoint: weights, optimizers, beta, history, random states, prompt order
        state = resumed["resume"]
        policy.load_state_dict(resumed["model"])
        policy_opt.load_state_dict(state["policy_opt"])
        if value:
            value.load_state_dict(resumed["value"])
            value_opt.load_state_dict(state["value_opt"])
        if len(state["rng"]) != dist.world_size():
            raise UserError(f"{cfg.out} was written by {len(state['rng'])} processes: resume with as many")
        checkpoint.set_rng_state(state["rng"][dist.rank()], rng, generator)  # this process's own random states
        beta, history, first_it = resumed["beta"], resumed["history"], resumed["step"]
        order, pos = state["order"], state["pos"]
        if lab:
            online.load_state_dict(lab, rm, state["online"])
    t_start = time.time()
    dist.print0(f"PPO: {len(prompts)} prompts, {cfg.iters} iterations x {cfg.batch_size} rollouts ({cfg.estimator}), "
          f"{cfg.ppo_epochs} epochs of minibatch {cfg.minibatch_size}, GPT {policy.num_params() / 1e6:.2f}M, {device}")
    n_pol, n_rm = checkpoint.param_count(policy.config), checkpoint.param_count(rm.config, head=True)
    n_val = (n_rm - (0 if cfg.value_embeddings else rm.config.vocab_size * rm.config.n_embd)) if value else 0
    micro = min(cfg.micro_batch_size or cfg.batch_size, cfg.batch_size) * policy.config.block_size  # positions
    dist.print0(checkpoint.memory_line(checkpoint.memory_estimate(
        2 * n_pol + n_rm + (n_rm if value else 0), n_pol + n_val, [(policy.config, micro)],
        [(m.config, min(micro, cfg.minibatch_size * policy.config.block_size)) for m in trained],
        low_precision, cfg.activation_checkpointing, dist.world_size() if cfg.fsdp else 1)))

    # out/ppo.pt -> out/ppo/metrics.jsonl; a resumed run drops the records after its checkpoint and appends
    metrics = (MetricsLog(Path(cfg.out).with_suffix(""), fresh=not resumed, upto=first_it, staged=staged)
               if dist.is_main() else None)
    bar = tqdm(range(first_it, cfg.iters), initial=first_it, total=cfg.iters, desc="ppo", dynamic_ncols=True,
               mininterval=1.0, disable=not dist.is_main())
    for it in bar:
        t0 = time.time()
        if pos + n_prompts > len(order):
            rng.shuffle(order)
            pos = 0
        if cfg.anneal_lr:  # both learning rates fall linearly, from their peak at iteration 0 towards 0
            for opt, peak in zip(opts, (cfg.lr, cfg.vf_lr)):
                set_lr(opt, peak * (1 - it / cfg.iters))
        batch_prompts = [p for p in dist.shard([prompts[i] for i in order[pos:pos + n_prompts]])  # this process's
                         for _ in range(cfg.samples_per_prompt)]  # each k = samples_per_prompt times in a row
        pos += n_prompts
        # 0. Online (every online_every iterations): label the policy's samples, train the RM on them, renormalise.
        round_stats = online.run_round(lab, cfg, policy, rm, amp, it) if lab and it % cfg.online_every == 0 else {}

        # 1. Roll out: sample k responses per prompt from the policy (KV cache), at `temperature`. generate()
        #    records log pi_old(y_t) of each sampled token at that temperature: the same numbers a fresh forward
        #    pass gives (tests/test_ppo.py checks it), so the PPO ratio starts at exactly 1 without recomputing.
        policy.eval()
        dist.unshard(*trained)  # FSDP: the whole models in every process for steps 1-6
        parts = dist.micro_batches(len(batch_prompts), cfg.micro_batch_size)  # one part by default
        with amp():
            r = merge_rollouts([generate(policy, batch_prompts[rows], cfg.max_new_tokens, cfg.temperature,
                                         generator=generator) for rows in parts])
        policy.train()
        tokens, start, P, resp_len = r["tokens"], r["start"], r["prompt_len"], r["resp_len"]
        old_logp = r["logprobs"]  # (B, R)
        R = tokens.shape[1] - P
        mask = response_mask(resp_len, R)  # (B, R): real response tokens
        maskf = mask.float()
        ended = r["ended"]  # (B,)
        if it == first_it and (no_end := 1 - dist.mean(ended.float())) > 0.5 and dist.is_main():  # say it at once
            tqdm.write(f"warning: {no_end:.0%} of the first rollouts did not end within --max_new_tokens "
                       f"{cfg.max_new_tokens}: each scores --no_eos_penalty {cfg.no_eos_penalty}, and PPO learns only "
                       f"to stop early; raise --max_new_tokens to fit the data's replies", file=sys.stderr)
        t1 = time.time()

        with torch.no_grad(), amp():
            # 2. Score: the RM's reward at each response's last real token; no end token -> a fixed penalty.
            last = P + resp_len - 1  # (B,)
            n, mbs = len(batch_prompts), cfg.micro_batch_size  # every pass in micro-batches of rows
            score = torch.where(ended, dist.in_parts(lambda s: rm.score(tokens[s], start[s], last[s]), n, mbs),
                                cfg.no_eos_penalty)  # (B,)
            # 3. Log-probs of the sampled tokens under the frozen reference (SFT), and (GAE) the values V(s_t).
            ref_logp = dist.in_parts(lambda s: response_logprobs(ref, tokens[s], start[s], P, mask[s],
                                                                 cfg.temperature), n, mbs)  # (B, R)
            if low_precision:
                # bf16: generation's log-probs come from bf16 logits, the update's from the log-prob seam; take
                # log pi_old from the seam too, so the PPO ratio starts at exactly 1 here as well.
                old_logp = dist.in_parts(lambda s: response_logprobs(policy, tokens[s], start[s], P, mask[s],
                                                                     cfg.temperature), n, mbs)  # (B, R)
            old_values = dist.in_parts(lambda s: response_values(value, tokens[s], start[s], P, maskf[s]), n, mbs
                                       ) if value else None
            # 4. Rewards: -beta * (log pi - log pi_ref) per token, plus the RM score on the last token.
            rewards, kl = ppo.kl_penalized_rewards(score, old_logp, ref_logp, maskf, beta)
            mean_kl = dist.mean(kl.sum(1))  # KL(pi || pi_SFT) per response, one-sample estimate, all processes
            # 5. beta: Ziegler et al.'s adaptive controller moves it so that the KL approaches target_kl.
            if cfg.adaptive_kl:
                beta = ppo.update_kl_coef(beta, mean_kl, cfg.target_kl, cfg.kl_horizon, global_batch)
            # 6. Advantages: GAE over the response (gamma, lambda), returns = A + V, then whiten A. Or one per
            #    response, its group of k the baseline: RLOO's of step 4's summed rewards, GRPO's of the score.
            if cfg.estimator == "gae":
                if cfg.whiten_rewards:
                    rewards = ppo.whiten(rewards, maskf, shift_mean=False, reduce=reduce)
                adv, returns = ppo.gae(rewards, old_values, maskf, cfg.gamma, cfg.lam)
                adv = ppo.whiten(adv, maskf, reduce=reduce)
            elif cfg.estimator == "rloo":  # R_i = score - beta * sum_t KL_t, on each token of response i
                adv = ppo.rloo_advantages(rewards.sum(1), cfg.samples_per_prompt)[:, None] * maskf  # (B, R)
            else:  # GRPO (Dr. GRPO: no division by the group's std); the KL goes in the loss (step 7)
                adv = ppo.grpo_advantages(score, cfg.samples_per_prompt, scale=cfg.estimator == "grpo")  # (B,)
        dist.reshard(*trained)
        t2 = time.time()

        # 7. PPO epochs: shuffled minibatches; clipped policy loss (GRPO's with its KL), value loss, entropy bonus.
        stats = []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(batch_prompts), device=device)
            for mb in perm.split(cfg.minibatch_size):
                # 8. PPO-ptx: gamma_ptx * the LM loss on pretraining text or demonstrations (InstructGPT eq. 2).
                ptx_batch = dist.shard([ptx[rng.randrange(len(ptx))] for _ in range(
                    cfg.minibatch_size * dist.world_size())]) if ptx is not None else []
                # In micro-batches (one by default), PPO-ptx's examples in as many; each loss is a mean over every
                # process's tokens (GRPO's: responses; DDP averages gradients): each part's mean weighs its share.
                parts = [mb[s] for s in dist.micro_batches(len(mb), cfg.micro_batch_size)]
                ptx_parts = [make_batch(ptx_batch[s], device) for s in dist.split(len(ptx_batch), len(parts))
                             ] if ptx is not None else []
                shares, ptx_shares = dist.shares([len(rows) if grpo else int(mask[rows].sum()) for rows in parts],
                                                 [int(ptx_mask.sum()) for *_, ptx_mask in ptx_parts])
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                for i, rows in dist.accumulate(parts, train_policy, train_value):  # DDP: the last one syncs
                    m = maskf[rows]
                    # The exact entropy over the vocabulary costs extra passes over the logits (~35 % of a CPU
                    # update): only for the bonus. Without it the logged entropy is the rollouts' E[-log pi(y)].
                    with amp():
                        out = response_logprobs(train_policy, tokens[rows], start[rows], P, mask[rows],
                                                cfg.temperature, with_entropy=bool(cfg.ent_coef))  # (b, R)
                    logp, entropy = out if cfg.ent_coef else (out, -old_logp[rows])  # (b, R) each
                    ent = ppo.masked_mean(entropy, m)
                    if grpo:  # GRPO eq. 3: the k3 KL to pi_SFT inside the loss (Dr. GRPO: / max_new_tokens, not |y|)
                        pg_loss, clip_frac, approx_kl = ppo.grpo_loss(logp, old_logp[rows], ref_logp[rows], adv[rows],
                            m, cfg.cliprange, beta, cfg.max_new_tokens if cfg.estimator == "drgrpo" else None)
                    else:
                        pg_loss, clip_frac, approx_kl = ppo.policy_loss(logp, old_logp[rows], adv[rows], m,
                                                                        cfg.cliprange)
                    loss = (pg_loss - cfg.ent_coef * ent) * shares[i]
                    if ptx is not None:
                        with amp():  # through policy, not the DDP wrapper: one DDP forward per backward
                            ptx_loss, _ = sft_loss(policy, *ptx_parts[i])
                        loss = loss + cfg.ptx_coef * ptx_shares[i] * ptx_loss
                    vf_loss = vf_clip = torch.zeros((), device=device)  # critic-free: no value function to train
                    if value:
                        with amp():
                            values = response_values(train_value, tokens[rows], start[rows], P, m)  # (b, R)
                        vf_loss, vf_clip = ppo.value_loss(values, old_values[rows], returns[rows], m,
                                                          cfg.cliprange_value)
                        vf_loss = vf_loss * shares[i]
                    if not (torch.isfinite(loss) and torch.isfinite(vf_loss)):
                        raise UserError(f"PPO loss is not finite at iteration {it} (policy {loss.item()}, value "
                                        f"{vf_loss.item()}); stopped without saving: lower --lr or raise "
                                        f"--init_kl_coef")
                    (loss + vf_loss).backward()  # separate models: each gets only its own loss's gradient
                    part = [shares[i] * pg_loss.item(), vf_loss.item(), *(shares[i] * x.item() for x in (
                        clip_frac, approx_kl, ent, vf_clip)), ptx_shares[i] * ptx_loss.item() if ptx_parts else 0.0]
                    row = part if i == 0 else [a + b for a, b in zip(row, part)]  # the minibatch's token means
                for model, opt in zip(trained, opts):
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                stats.append(row)
        t3 = time.time()

        # Log this iteration.
        # Figures over every process's rollouts (dist.mean...: plain means with one process).
        s = dist.mean_floats([statistics.fmean(col) for col in zip(*stats)])
        n_tokens = dist.sum_floats([int(resp_len.sum()) + len(batch_prompts) * P])[0]
        record = dict(
            iter=it + 1, score=dist.mean(score), rm_score=dist.mean(score[ended]),
            kl=mean_kl, beta=beta, lr=policy_opt.param_groups[0]["lr"], entropy=s[4], clip_frac=s[2],
            approx_kl=s[3], pg_loss=s[0], **(dict(vf_loss=s[1], vf_clip_frac=s[5], explained_var=ppo.explained_variance(
                old_values, returns, maskf, reduce).item()) if value else {}),  # the value function's: GAE only
            resp_len=dist.mean(resp_len.float()), no_eos=1.0 - dist.mean(ended.float()),
            time_s=t3 - t0, tokens_per_s=n_tokens / (t3 - t0),
            t_rollout=t1 - t0, t_score=t2 - t1, t_update=t3 - t2, **({"ptx_loss": s[6]} if ptx is not None else {}),
            **round_stats)
        evaluate = eval_prompts and ((it + 1) % cfg.eval_interval == 0 or it + 1 == cfg.iters)
        dist.unshard(policy, when=evaluate)  # FSDP: every process gathers the whole policy for rank 0's evaluation
        if dist.is_main() and evaluate:
            with amp():  # rank 0 alone: the others wait for it at the next iteration's first all-reduce
                record["gold"], record["gold_se"] = gold_eval(policy, eval_prompts, cfg.max_new_tokens,
                                                              cfg.temperature)
            tqdm.write(f"iter {it + 1}: held-out gold {record['gold']:.3f} ± {record['gold_se']:.3f}, "
                       f"RM score {record['score']:+.3f}, KL {mean_kl:.2f}, beta {beta:.3f}")
        dist.reshard(policy)
        history.append(record)
        if metrics:
            metrics.log(it + 1, **{k: v for k, v in record.items() if k != "iter"})
        bar.set_postfix(score=f"{record['score']:+.2f}", kl=f"{mean_kl:.2f}", beta=f"{beta:.3f}",
                        clip=f"{s[2]:.2f}", len=f"{record['resp_len']:.1f}", s_it=f"{t3 - t0:.1f}")
        if cfg.ckpt_interval and (it + 1) % cfg.ckpt_interval == 0 and it + 1 < cfg.iters:
            rngs = dist.all_gather_objects(checkpoint.rng_state(rng, generator))  # each process samples its own
            saved_online = online.state_dict(lab, rm) if lab else None
            if dist.is_main():
                staged.commit()  # this run's metrics replace the previous run's, with its first checkpoint
                online.write_labels(lab, cfg.out) if lab else None
                checkpoint.save(cfg.out, policy, kind="ppo", **({"value": dist.state_dict(value)} if value else {}),
                                train_config=vars(cfg), history=history, beta=beta, step=it + 1,
                                resume=dict(policy_opt=policy_opt.state_dict(), rng=rngs, order=order, pos=pos,
                                            value_opt=value_opt.state_dict() if value else None, online=saved_online))
    bar.close()

    dist.unshard(*trained)  # FSDP: the whole models in every process, for rank 0 to save
    if dist.is_main():
        staged.commit()
        online.write_labels(lab, cfg.out) if lab else None
        checkpoint.save(cfg.out, policy, kind="ppo", **({"value": dist.state_dict(value)} if value else {}),
                        **({"rm": rm.state_dict()} if lab else {}), train_config=vars(cfg), history=history,
                        beta=beta, step=cfg.iters)
        print(f"PPO done in {time.time() - t_start:.0f} s; wrote {cfg.out}")
    dist.cleanup()
    return dict(policy=policy, value=value, beta=beta)  # the trained models (tests compare them across processes)


if __name__ == "__main__":
    run(main, Config)
