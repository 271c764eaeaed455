"""The seams where our Triton kernels plug into the model: attention() and token_logprobs().

The environment variable NANORLHF_KERNELS chooses the implementation. It is read at every call, so a test can flip
it with monkeypatch.setenv:
  auto       (default) Triton for CUDA tensors the kernels take, when Triton is installed; the torch path otherwise
  triton     always the Triton kernels (on CPU tensors this needs TRITON_INTERPRET=1 set before the kernels are
             imported: Triton's interpreter, slow)
  torch      the fast PyTorch path: SDPA with a padding mask; the chunked LM-head log-probs of kernels/logprobs.py
  reference  the spec, a few lines of plain PyTorch (each kernel file's `reference`): masked softmax attention;
             hidden @ W.T, log_softmax and gather. The slowest and the clearest, it runs the whole pipeline, forward
             and backward through autograd, and is what the other paths must agree with.
"""

import os

import torch
import torch.nn.functional as F

from kernels import attention as attention_kernels
from kernels import logprobs as logprob_kernels
from kernels._triton import HAVE_TRITON

MODES = ("auto", "triton", "torch", "reference")


def _mode(x, kernels_take_it):
    """The path of a call on tensor x, "triton", "torch" or "reference"; kernels_take_it: whether the Triton kernels
    accept x (auto mode sends anything else to the torch path)."""
    mode = os.environ.get("NANORLHF_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"NANORLHF_KERNELS must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "triton" and not HAVE_TRITON:
        raise RuntimeError("NANORLHF_KERNELS=triton but Triton is not installed")
    if mode == "auto":
        return "triton" if x.is_cuda and HAVE_TRITON and kernels_take_it else "torch"
    return mode


# ----------------------------------------------------------------------------------------------------------------
# Seam 1: causal attention with left-padding offsets (kernels/attention.py states the math).

def attention(q, k, v, start=None):
    """q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D). Query i sits at key position Tk - Tq + i and sees
    keys start[b] <= j <= Tk - Tq + i; start (B,) is each row's first real token (None: no padding). A query that
    sees no key (a padding position) outputs zeros.

    Training (Tq == Tk) and KV-cache decoding (a few new queries, k/v the cache's first Tk positions, possibly a
    strided view) both come here. The Triton path sends no-grad decoding to the split-KV decode kernels and the rest
    to the flash forward/backward; in auto mode, inputs the kernels do not take (float64, head dim > 256) use PyTorch.
    """
    mode = _mode(q, attention_kernels.supports(q))
    if mode == "triton":
        return attention_kernels.attention(q, k, v, start)
    if mode == "reference":  # the spec in fp32 (its matmuls would be low precision under autocast)
        with torch.autocast(q.device.type, enabled=False):
            return attention_kernels.reference(q, k, v, start)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if start is None and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if start is None and Tq == 1:
        return F.scaled_dot_product_attention(q, k, v)  # one new token sees the whole cache
    qpos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]  # (Tq, 1)
    kpos = torch.arange(Tk, device=q.device)[None, :]  # (1, Tk)
    allowed = (kpos <= qpos)[None, None]  # (1, 1, Tq, Tk)
    if start is not None:
        allowed = allowed & (kpos >= start.view(B, 1, 1, 1))  # (B, 1, Tq, Tk)
    has_key = allowed.any(-1, keepdim=True)  # (B, 1, Tq, 1): padding queries see nothing
    # A fully masked row would make softmax NaN: let it see its own position, then zero its output.
    allowed = allowed | (~has_key & (kpos == qpos))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return out.masked_fill(~has_key, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Seam 2: log-probabilities of chosen tokens through the LM head (kernels/logprobs.py states the math).

def token_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """log pi(targets) under softmax(hidden @ weight.T / temperature).

    hidden (N, d), weight (V, d), targets (N,) -> logp (N,), and entropy (N,) if with_entropy; fp32, differentiable
    in hidden and weight. SFT's loss is -logp; PPO uses logp of the policy (with grad) and of the reference (without),
    and the entropy when a loss asks for it (it costs extra passes over the logits). The triton and torch paths
    never hold all N x V logits at once (kernels/logprobs.py: fused_logprobs); the reference path does.

    Under autocast, hidden is cast to autocast's dtype (bf16) and the rest runs with autocast off. On every path the
    logits are products of bf16 operands (W rounded to bf16) summed and kept in fp32: bf16 logits would be off by
    up to 0.25 at GPT-2's |z| ~ 100 (kernels/logprobs.py, "Precision"). An fp32 weight stays fp32, so the LM head's
    gradient is accumulated and returned in fp32; a weight of another dtype is cast to hidden's.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return token_logprobs(hidden.to(low), weight, targets, temperature, with_entropy)
    if weight.dtype not in (hidden.dtype, torch.float32) or hidden.dtype == torch.float64:
        weight = weight.to(hidden.dtype)
    mode = _mode(hidden, hidden.dtype != torch.float64)
    if mode == "reference":
        logits = hidden.float() @ weight.to(hidden.dtype).float().t()  # (N, V) fp32 sums of bf16 products
        logp, entropy = logprob_kernels.reference(logits, targets, temperature)  # log_softmax, gather; (N,) each
    else:
        logp, entropy, _ = logprob_kernels.fused_logprobs(hidden, weight, targets, temperature,
                                                          with_entropy=with_entropy, backend=mode)
    return (logp, entropy) if with_entropy else logp
