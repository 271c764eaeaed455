"""The math of PPO for language models, one function per equation (train_ppo.py runs the loop).

Shapes: B responses of up to R tokens. `mask` (B, R) is 1 on a response's real tokens (its end token included)
and 0 on the padding after it. Token t of a response is an action; the state is the prompt plus tokens < t.

With several processes (DDP, nanorlhf/dist.py) each holds its own rollouts; the statistics that must be those of
the whole batch take `reduce`, a function that sums a tensor over the processes (dist.all_reduce_sum).
"""

import torch


def masked_mean(x, mask, reduce=None):
    """Mean of x over the real tokens (of every process's x with reduce)."""
    total, n = (x * mask).sum(), mask.sum()
    if reduce is not None:
        total, n = reduce(torch.stack([total, n.to(total.dtype)]))
    return total / n.clamp(min=1)


def masked_var(x, mask, reduce=None):
    """Unbiased variance of x over the real tokens (two passes: the mean first, then the squared deviations)."""
    mean = masked_mean(x, mask, reduce)
    n = mask.sum() if reduce is None else reduce(mask.sum())
    var = masked_mean((x - mean) ** 2, mask, reduce)
    return var * n / (n - 1).clamp(min=1)  # unbiased


def whiten(x, mask, shift_mean=True, reduce=None):
    """(x - mean) / std over the real tokens; shift_mean=False keeps the mean (used for rewards). reduce: mean and
    std over every process's tokens (the module docstring), as if the batches were one."""
    mean, var = masked_mean(x, mask, reduce), masked_var(x, mask, reduce)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalized_rewards(score, logp, ref_logp, mask, beta):
    """Ziegler et al. 2019 eq. 2 / InstructGPT eq. 2, spread over tokens:

        r_t = -beta * (log pi(y_t) - log pi_ref(y_t))          for every response token t
        r_T += score                                            on the last real token T (the RM's reward)

    score (B,), logp and ref_logp (B, R) -> rewards (B, R), and the per-token KL estimate (B, R).
    """
    kl = (logp - ref_logp) * mask  # (B, R): k1 estimator of KL(pi || pi_ref), one sample per token
    rewards = -beta * kl  # (B, R)
    last = mask.sum(1).long() - 1  # (B,): index of the last real token
    rewards[torch.arange(len(score)), last] += score
    return rewards, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016), backwards over the response:

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last real token is 0: the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V                                 (the value function's regression target)
    """
    rewards, values = rewards * mask, values * mask
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(B, device=rewards.device)
    next_value = torch.zeros(B, device=rewards.device)
    for t in reversed(range(R)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        adv[:, t] = next_adv
        next_value = values[:, t]
    adv = adv * mask
    return adv, (adv + values) * mask


def update_kl_coef(beta, kl, target, horizon, n_steps):
    """Ziegler et al.'s adaptive KL controller: a proportional controller on log(beta).

        e = clip(KL / KL_target - 1, -0.2, 0.2)          KL: this batch's mean KL per response
        beta <- beta * (1 + K_beta * e),   K_beta = n_steps / horizon
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


def policy_loss(logp, old_logp, adv, mask, clip=0.2):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio = pi(y_t) / pi_old(y_t)
        L = E_t max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps))

    Returns the loss, the fraction of tokens where clipping was active, and the approximate KL(pi_old || pi)
    estimate E[(ratio - 1) - log ratio] (k3, always >= 0).
    """
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clip_frac, approx_kl


def value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss: 0.5 * E_t max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        clip_frac = masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask)
    return loss, clip_frac


def explained_variance(values, returns, mask, reduce=None):
    """1 - Var(returns - values) / Var(returns): 1 is a perfect value function, 0 no better than a constant."""
    var_returns = masked_var(returns, mask, reduce)
    return 1.0 - masked_var(returns - values, mask, reduce) / var_returns.clamp(min=1e-8)


# ------------------------------------------------------------------------------------------------------------------
# Critic-free estimators: k responses per prompt, stored group-major (rows i*k .. i*k + k-1 answer prompt i), one
# sequence-level reward each; the group itself is the baseline, so no value function is needed.

def rloo_advantages(rewards, k):
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, eq. 5): each sample's baseline is the mean
    reward of the other k - 1 samples of its prompt,

        A_i = R_i - 1/(k-1) sum_{j != i} R_j,     R_i = r(x, y_i) - beta * sum_t log(pi(y_i,t) / pi_ref(y_i,t))

    (the KL penalty is part of the sequence-level reward). rewards (B,) with B = G * k -> advantages (B,)."""
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got {k}")
    r = rewards.view(-1, k)  # (G, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)  # (G, k): the mean of the others
    return (r - baseline).reshape(-1)


def grpo_advantages(rewards, k, scale=True, eps=1e-4):
    """GRPO's group-normalised advantage (Shao et al. 2024, §4.1.2): A_i = (r_i - mean(r)) / std(r) over the k
    samples of a prompt. scale=False is Dr. GRPO (Liu et al. 2025): A_i = r_i - mean(r), no division by the std,
    which favours prompts whose samples barely differ. rewards (B,) with B = G * k -> advantages (B,)."""
    r = rewards.view(-1, k)  # (G, k)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + eps)  # unbiased std over the group, as Shao et al.'s code
    return adv.reshape(-1)


def k3_kl(logp, ref_logp):
    """Per-token estimate of KL(pi || pi_ref) that is always >= 0 (Schulman 2020's k3; GRPO eq. 4):
    pi_ref/pi - log(pi_ref/pi) - 1, from the log-probs of tokens sampled from pi."""
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip=0.2, beta=0.04, max_len=None):
    """GRPO's objective (Shao et al. 2024, eq. 3) as a loss to minimise, the sequence's advantage on each token:

        L = -1/G sum_i 1/|y_i| sum_t [ min(ratio A_i, clip(ratio, 1-eps, 1+eps) A_i) - beta * KL3_t ]

    with the KL in the loss (not in the reward) as k3_kl. With max_len, Dr. GRPO: the token terms are summed and
    divided by G * max_len (the generation budget), one constant for every response, batch and process, so long
    wrong answers are not penalised less per token than short ones. adv (B,), the rest (B, R). Returns the loss,
    the fraction of tokens where clipping was active and approx KL(pi_old || pi), as policy_loss does."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)  # (B, R)
    a = adv[:, None]  # (B, 1): one advantage per response, on each of its tokens
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * a  # (B, R) each
    kl = k3_kl(logp, ref_logp) * mask  # (B, R)
    per_token = -(torch.minimum(unclipped, clipped) - beta * kl) * mask  # (B, R)
    if max_len is None:
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:
        loss = per_token.sum() / (len(mask) * max_len)
    with torch.no_grad():
        clip_frac = masked_mean((clipped < unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clip_frac, approx_kl
