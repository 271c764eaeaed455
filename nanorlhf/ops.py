"""The seams where our Triton kernels plug into the model: one function per kernel family.

Each seam runs the Triton kernel for CUDA tensors (when Triton is installed) and PyTorch elsewhere. The environment
variable NANORLHF_KERNELS forces a path, read at every call so tests can flip it:
  auto    (default) Triton on CUDA, PyTorch otherwise
  triton  always Triton (on CPU tensors this needs TRITON_INTERPRET=1 set before the kernels are imported)
  torch   always PyTorch
"""

import os

import torch
import torch.nn.functional as F

from kernels import attention as attention_kernels
from kernels import logprobs as logprob_kernels
from kernels._triton import HAVE_TRITON


def use_triton(x: torch.Tensor) -> bool:
    """Which path a seam takes for tensor x (see the module docstring)."""
    mode = os.environ.get("NANORLHF_KERNELS", "auto")
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"NANORLHF_KERNELS must be auto, triton or torch, not {mode!r}")
    if mode == "triton" and not HAVE_TRITON:
        raise RuntimeError("NANORLHF_KERNELS=triton but Triton is not installed")
    return mode == "triton" or (mode == "auto" and x.is_cuda and HAVE_TRITON)


# ----------------------------------------------------------------------------------------------------------------
# Seam 1: causal attention with left-padding offsets (kernels/attention.py states the math).

def attention(q, k, v, start=None):
    """q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D). Query i sits at key position Tk - Tq + i and sees
    keys start[b] <= j <= Tk - Tq + i; start (B,) is each row's first real token (None: no padding).

    Training (Tq == Tk) and KV-cache decoding (a few new queries, k/v the cache's first Tk positions, possibly a
    strided view) both come here. The Triton path sends no-grad decoding to the split-KV decode kernels and the rest
    to the flash forward/backward; in auto mode, inputs the kernels do not take (float64, head dim > 256) use PyTorch.
    """
    if use_triton(q) and (os.environ.get("NANORLHF_KERNELS") == "triton" or attention_kernels.supports(q)):
        return attention_kernels.attention(q, k, v, start)
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

def _logprob_backend(x):
    """"triton" or "torch" for the log-prob seams; in auto mode float64 (which the kernels do not take) uses PyTorch."""
    if use_triton(x) and (os.environ.get("NANORLHF_KERNELS") == "triton" or x.dtype != torch.float64):
        return "triton"
    return "torch"


def token_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False, *, mask=None):
    """log pi(targets) under softmax(hidden @ weight.T / temperature).

    hidden (N, d), weight (V, d), targets (N,) -> logp (N,), and entropy (N,) if with_entropy. Differentiable in
    hidden and weight. SFT's loss is -logp; PPO uses logp of the policy (with grad) and of the reference (without).
    Leading dimensions are allowed: hidden (..., d), targets (...) -> (...). mask (...) bool: False positions
    (padding) give 0 and zero gradient, and cost nothing. Outputs are fp32. The N x V logits are never all held at
    once (kernels/logprobs.py: fused_logprobs; Triton on CUDA, chunked PyTorch elsewhere).
    """
    out = token_logprob_stats(hidden, weight, targets, temperature, mask=mask, with_entropy=with_entropy)
    return (out.logp, out.entropy) if with_entropy else out.logp


def token_logprob_stats(hidden, weight, targets, temperature=1.0, *, mask=None, with_entropy=False,
                        ref_logprobs=None, ref_hidden=None, ref_weight=None, kl_estimator="k3"):
    """token_logprobs with everything PPO needs in one pass: -> LogprobOutputs(logp, entropy, kl), fp32, shaped
    like targets; entropy if with_entropy (else None), kl (else None):
      ref_logprobs (...)                  the reference's log pi_ref(targets): kl is the estimator kl_estimator
                                          (k1 = d, k2 = d^2/2, k3 = exp(-d) - 1 + d with d = logp - ref_logprobs)
      ref_hidden (..., d_r), ref_weight   the reference's final hidden states and LM head: kl is the full
                                          KL(pi || pi_ref) over the vocabulary (both at the same temperature)
    Differentiable in hidden and weight; the reference gets no gradient. If hidden and weight differ in dtype (e.g.
    hidden from autocast), weight is cast to hidden's dtype, as autocast's matmul would. Under autocast, hidden and
    weight are cast to autocast's dtype and the kernels run with autocast off: the logits are low-precision
    products, the log-softmax math stays fp32 in both paths (autocast would also turn the PyTorch path's own
    matmuls and sums into bf16), and forward and backward see the same logits."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        cast = lambda x: None if x is None else x.to(low)  # noqa: E731
        with torch.autocast(dev, enabled=False):
            return token_logprob_stats(cast(hidden), cast(weight), targets, temperature, mask=mask,
                                       with_entropy=with_entropy, ref_logprobs=ref_logprobs,
                                       ref_hidden=cast(ref_hidden), ref_weight=cast(ref_weight),
                                       kl_estimator=kl_estimator)
    lead = targets.shape
    d = hidden.shape[-1]
    if hidden.shape[:-1] != lead:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(lead)} disagree")
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
    if ref_hidden is not None:
        ref_hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])
        ref_weight = ref_weight.to(ref_hidden.dtype)
    backend = _logprob_backend(hidden)
    out = logprob_kernels.fused_logprobs(hidden.reshape(-1, d), weight, targets.reshape(-1), temperature,
                                         mask=flat(mask), with_entropy=with_entropy, ref_logprobs=flat(ref_logprobs),
                                         ref_hidden=ref_hidden, ref_weight=ref_weight, kl_estimator=kl_estimator,
                                         backend=backend)
    return logprob_kernels.LogprobOutputs(*(None if o is None else o.reshape(lead) for o in out))


def logits_logprobs(logits, targets, temperature=1.0, *, mask=None, with_entropy=False, ref_logprobs=None,
                    ref_logits=None, kl_estimator="k3"):
    """The same from logits already in memory: logits (..., V), targets (...) -> LogprobOutputs(logp, entropy, kl)
    shaped like targets; ref_logits (..., V) gives the full KL. Differentiable in logits. One pass over the logits
    forward and one backward (Triton on CUDA), instead of log_softmax's fp32 N x V tensors. Autocast is turned off
    inside (fp32 math on logits of any dtype)."""
    if torch.is_autocast_enabled(logits.device.type):
        with torch.autocast(logits.device.type, enabled=False):
            return logits_logprobs(logits, targets, temperature, mask=mask, with_entropy=with_entropy,
                                   ref_logprobs=ref_logprobs, ref_logits=ref_logits, kl_estimator=kl_estimator)
    lead, V = targets.shape, logits.shape[-1]
    flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
    rows = lambda x: None if x is None else x.reshape(-1, V)  # noqa: E731
    backend = _logprob_backend(logits)
    out = logprob_kernels.logprobs(rows(logits), targets.reshape(-1), temperature, mask=flat(mask),
                                   with_entropy=with_entropy, ref_logprobs=flat(ref_logprobs),
                                   ref_logits=rows(ref_logits), kl_estimator=kl_estimator, backend=backend)
    return logprob_kernels.LogprobOutputs(*(None if o is None else o.reshape(lead) for o in out))
