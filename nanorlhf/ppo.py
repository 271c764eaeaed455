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
