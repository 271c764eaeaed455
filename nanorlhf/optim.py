"""AdamW with GPT-2-style weight decay groups, and the learning-rate schedule all three scripts use."""

import math

import torch


def adamw(model, lr, weight_decay=0.0, betas=(0.9, 0.95)):
    """AdamW that decays matrices (weights, embeddings) but not biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    try:  # the fused kernel is ~4x faster than the default on CPU (torch >= 2.4), which matters for small models
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(it, lr, warmup_iters, max_iters, min_lr=0.0):
    """Linear warm-up for warmup_iters, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
