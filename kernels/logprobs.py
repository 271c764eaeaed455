"""Log-probabilities of chosen tokens, entropy and KL, from logits or fused with the LM head, without N x V tensors.

Why. Every PPO step needs, for each sampled token, log pi(token) over a 50,257-word vocabulary for the policy (with
gradient) and for the frozen reference (without), the per-token KL between them and the entropy; SFT's loss is
-log pi. Done the PyTorch way (log_softmax, then gather) this builds and re-reads fp32 tensors of N x V. Here one
pass over each row of logits gives all of them, and the backward pass re-reads the logits once to write the gradient.

Math. Token n has logits z (V,), temperature tau, target y. Write s = z / tau (all maths in fp32), and

    lse     = log sum_v exp(s_v)                      the log-sum-exp, the only per-row number the backward needs
    log pi_v = s_v - lse,   pi_v = exp(log pi_v)
    logp    = s_y - lse                               log pi(y)
    H       = lse - sum_v pi_v s_v = -sum_v pi_v log pi_v          entropy
    KL      = sum_v pi_v (log pi_v - log q_v)         full KL(pi || q), q = softmax(r / tau) for reference logits r

Online log-sum-exp (one pass over the row, block by block). Keep a running max m, l = sum_v exp(s_v - m) and, for
the entropy, a = sum_v exp(s_v - m) (s_v - m). When a new block raises the max from m to m', every old term is
multiplied by alpha = exp(m - m') and its (s_v - m) grows by (m - m'):

    l' = alpha l + sum_block exp(s_v - m')
    a' = alpha (a + l (m - m')) + sum_block exp(s_v - m') (s_v - m')

At the end  lse = m + log l,   H = log l - a / l   (no cancellation between large numbers: s_v - m <= 0).
For the full KL also keep the reference's (m_r, l_r) and c = sum_v exp(s_v - m) (r_v/tau - m_r) (rescaled the same
way; a change of m_r adds l (m_r - m_r') to c), then  KL = (a - c) / l - log l + log l_r.
A -inf logit has exp(.) = 0 and contributes nothing: products 0 * (-inf) are never formed (the kernels select 0
where exp(.) is 0; the PyTorch code clamps s - m at -1000, where exp is exactly 0 in fp32 and fp64 alike).

Gradients. With d log pi_y / d s_v = [v = y] - pi_v, d H / d s_v = -pi_v (log pi_v + H) and
d KL / d s_v = pi_v (log pi_v - log q_v - KL), any mix of output gradients g_logp, g_H, g_KL gives

    d loss / d s_v = g_logp [v = y] - pi_v (c0 + c1 log pi_v + g_KL log q_v),   d loss / d z_v = (d loss / d s_v) / tau
    c0 = g_logp + g_H H + g_KL KL,   c1 = g_H - g_KL

so the backward pass needs only lse (and H, KL, lse_r) per row: it recomputes pi_v from the logits. The reference
(r, or ref_logprobs) is frozen: it gets no gradient.

KL estimators from reference log-probs. Given log pi_ref(y) instead of the reference's logits, with the log-ratio
d = logp - log pi_ref(y) of the sampled token (y ~ pi):  k1 = d,  k2 = d^2 / 2,  k3 = exp(-d) - 1 + d  (k1 and k3 are
unbiased, k3 >= 0). They are (N,)-sized functions of logp, so plain autograd differentiates them (`kl_estimate`).

Masking. mask (N,) is True for real tokens; padding rows output 0 and get zero gradient. The kernel skips them (no
read); the LM-head path drops them before the matmul.

LM head. From hidden states h (N, d) and the unembedding W (V, d), z = h W^T. `fused_logprobs` never holds z for
all rows: the forward computes z one block at a time and keeps lse (and H, KL); the backward recomputes z one block
at a time, turns it into d loss / d z in place, and accumulates dh_r += dz W_c, dW_c += dz^T h_r. That costs
8 N V d flops (the forward's matmul is done twice) instead of 6, and one block of memory instead of O(N V). The
matmuls are torch's (cuBLAS / MKL); per block, the Triton path runs the kernels above, the PyTorch path (the CPU one)
the hand-written maths below, on (rows x columns) blocks, merging the partial sums of the online log-sum-exp across
column blocks (`_merge`). The PyTorch path has a keep mode for calls with a gradient (SFT's loss, PPO's policy
log-probs and entropy): when the n x V blocks fit `keep_bytes` it keeps them (one N x V fp32 tensor, where
log_softmax + gather peaks at three to five) and its backward does not recompute the logits.

Bytes. From bf16 logits the forward reads N V 2 bytes, the backward reads them again and writes the gradient (N V 2):
the 'minimal bytes' of bench/logprobs.py count the logits read once and the gradient written once.

Precision (bf16/fp16 hidden states). Every block of logits is the product of the low-precision operands summed and
kept in fp32 (`_mm32`), never rounded back to bf16: at GPT-2's logit scale (|z| ~ 100, where bf16's spacing is 0.5)
bf16 logits put ~0.1 nats of error into log pi, the KL reward and the PPO ratio. W may be fp32 (autocast's master
weight) while h is bf16: the product uses W rounded to bf16, and dW is accumulated over the blocks in fp32 and
returned in W's dtype, so the LM head's gradient is never rounded to bf16. The gradient d loss / d z of a block is
rounded to h's dtype for its two matmuls (as autocast's own backward would).

File order: references (the spec) -> Triton kernels -> launchers -> autograd Functions -> public functions.
The benchmark is bench/logprobs.py (`python -m bench.logprobs --help`).
"""

import os
from typing import NamedTuple, Optional

import torch

from kernels._triton import HAVE_TRITON, tl, triton

KL_ESTIMATORS = ("k1", "k2", "k3")
_CLAMP = -1000.0  # log-probabilities below this have exp() == 0 exactly in fp32 and fp64


class LogprobOutputs(NamedTuple):
    """Per-token outputs, fp32, shape (N,). `entropy` / `kl` are None unless asked for."""

    logp: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None


# ================================================================================================================
# 1. References: the spec, in plain PyTorch and fp32.

def reference(logits, targets, temperature=1.0):
    """The simplest spec: logits (N, V), targets (N,) -> (log pi(target) (N,), entropy (N,)), computed in fp32."""
    out = reference_logprobs(logits, targets, temperature)
    return out.logp, out.entropy


def kl_estimate(logp, ref_logprobs, kind="k3", mask=None):
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs: logp (N,) of the policy
    (differentiable), ref_logprobs (N,) of the reference (constant). kind: k1 = d, k2 = d^2/2, k3 = exp(-d) - 1 + d
    with d = logp - ref_logprobs. Masked rows (mask False) give 0 and no gradient."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, not {kind!r}")
    if ref_logprobs.shape != logp.shape:
        raise ValueError(f"ref_logprobs must have shape {tuple(logp.shape)}, got {tuple(ref_logprobs.shape)}")
    d = logp - ref_logprobs.detach().float()  # (N,) log pi(y) - log pi_ref(y)
    if mask is not None:
        d = torch.where(mask, d, torch.zeros_like(d))  # padding's garbage never reaches exp()
    if kind == "k1":
        k = d
    elif kind == "k2":
        k = 0.5 * d * d
    else:
        k = torch.expm1(-d) + d  # exp(-d) - 1 + d, accurate for small d
    return k if mask is None else torch.where(mask, k, torch.zeros_like(k))


def reference_logprobs(logits, targets, temperature=1.0, *, mask=None, ref_logprobs=None, ref_logits=None,
                       kl_estimator="k3"):
    """The spec, through PyTorch autograd: logits (N, V) -> LogprobOutputs(logp, entropy, kl), fp32.

    kl is the full KL(pi || softmax(ref_logits / T)) if ref_logits (N, V) is given, the estimator `kl_estimator` of
    the log-ratio to ref_logprobs (N,) if that is given, else None. Rows with mask False give 0 and no gradient."""
    N = logits.shape[0]
    keep = torch.ones(N, dtype=torch.bool, device=logits.device) if mask is None else mask
    z = logits.float() / temperature  # (N, V)
    z = torch.where(keep[:, None], z, torch.zeros_like(z))  # padding rows may hold anything (even all -inf)
    logp_all = torch.log_softmax(z, dim=-1)  # (N, V)
    y = torch.where(keep, targets, torch.zeros_like(targets))  # (N,) padding targets may be out of range
    logp = logp_all.gather(-1, y[:, None]).squeeze(-1)  # (N,)
    p = logp_all.exp()  # (N, V)
    dead = p == 0  # (N, V) terms 0 * log 0: drop them (0 * -inf would be NaN)
    entropy = -(p * logp_all.masked_fill(dead, 0.0)).sum(-1)  # (N,)
    kl = None
    if ref_logits is not None:
        if ref_logprobs is not None:
            raise ValueError("give ref_logits (full KL) or ref_logprobs (estimator), not both")
        logq_all = torch.log_softmax(ref_logits.detach().float() / temperature, dim=-1)  # (N, V)
        logq_all = torch.where(keep[:, None], logq_all, torch.zeros_like(logq_all))
        kl = (p * (logp_all - logq_all).masked_fill(dead, 0.0)).sum(-1)  # (N,)
    zero = torch.zeros_like(logp)
    logp, entropy = torch.where(keep, logp, zero), torch.where(keep, entropy, zero)
    if kl is not None:
        kl = torch.where(keep, kl, zero)
    elif ref_logprobs is not None:
        kl = kl_estimate(logp, ref_logprobs, kl_estimator, mask)
    return LogprobOutputs(logp, entropy, kl)


def reference_lm_head(hidden, weight, targets, temperature=1.0, *, mask=None, ref_logprobs=None, ref_hidden=None,
                      ref_weight=None, kl_estimator="k3"):
    """The spec of the fused variant: hidden (N, d), weight (V, d) -> reference_logprobs(hidden @ weight.T, ...)."""
    logits = hidden.float() @ weight.float().t()  # (N, V)
    ref_logits = None if ref_hidden is None else ref_hidden.float() @ ref_weight.float().t()  # (N, V)
    return reference_logprobs(logits, targets, temperature, mask=mask, ref_logprobs=ref_logprobs,
                              ref_logits=ref_logits, kl_estimator=kl_estimator)


# The same maths written out by hand: a forward that keeps only per-row statistics and a backward that recomputes
# pi from the logits. The PyTorch path of the public functions runs these (so gradcheck checks them), chunk by chunk.

_MM_OUT_DTYPE = None  # whether torch.mm takes out_dtype on this device (CUDA, torch >= 2.8); found at the first call


def _mm32(a, b):
    """a @ b as fp32 for low-precision a, b (the products summed in fp32 and not rounded back): torch.mm with
    out_dtype on CUDA, which keeps the bf16 tensor cores; elsewhere (CPU, older torch) fp32 copies of the operands."""
    global _MM_OUT_DTYPE
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return a.float() @ b.float()


def _acc(x):
    """The accumulation dtype: fp64 stays fp64 (gradcheck), everything else computes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scaled(logits, inv_temp, scratch):
    """s = logits / tau in the accumulation dtype; a new tensor unless `scratch` allows overwriting logits."""
    s = logits.to(_acc(logits))  # (n, V)
    if s is logits and not scratch:
        s = s.clone()
    return s.mul_(inv_temp) if inv_temp != 1.0 else s


class _Partial(NamedTuple):
    """Partial sums of one row over a block of columns (each (n,)): m = max s (-inf if all -inf), l = sum exp(s - m),
    a = sum exp(s - m)(s - m); for the full KL m_r = max r/tau, l_r = sum exp(r/tau - m_r),
    c = sum exp(s - m)(r/tau - m_r). Shifts use m and m_r with -inf replaced by 0 (`_finite`)."""

    m: torch.Tensor
    l: torch.Tensor
    a: Optional[torch.Tensor]
    m_r: Optional[torch.Tensor]
    l_r: Optional[torch.Tensor]
    c: Optional[torch.Tensor]


def _finite(m):
    return m.masked_fill(m == float("-inf"), 0.0)


def _block_stats(s, t=None, need_a=True):
    """Partial sums over a block of columns: s = z/tau (n, Vb), t = r/tau (n, Vb) or None. Overwrites s and t."""
    need_a = need_a or t is not None
    m = s.amax(1)  # (n,) block max
    s.sub_(_finite(m)[:, None])  # (n, Vb) s - m <= 0
    if need_a:
        s.clamp_(min=_CLAMP)  # exp is 0 below: changes no term, but avoids 0 * -inf
        e = torch.exp(s)  # (n, Vb) exp(s - m)
        a = torch.linalg.vecdot(e, s)  # (n,) sum exp(s - m)(s - m)
    else:
        e, a = s.exp_(), None  # only l is needed: exponentiate in place
    l = e.sum(1)  # (n,)
    m_r = l_r = c = None
    if t is not None:
        m_r = t.amax(1)
        t.sub_(_finite(m_r)[:, None])  # r/tau - m_r (not clamped: log q may be far below -1000 where pi is not 0)
        c = torch.linalg.vecdot(e, t.masked_fill(e == 0, 0.0))  # (n,) sum exp(s - m)(r/tau - m_r)
        l_r = t.exp_().sum(1)
    return _Partial(m, l, a, m_r, l_r, c)


def _merge(parts):
    """Combine the partial sums of a row's blocks of columns (the online log-sum-exp of the docstring, done at once
    for all blocks: one set of (n, blocks) operations instead of one merge per block)."""
    if len(parts) == 1:
        return parts[0]
    st = lambda k: None if getattr(parts[0], k) is None else torch.stack([getattr(p, k) for p in parts], 1)  # noqa
    m_b, l_b, a_b, mr_b, lr_b, c_b = (st(k) for k in _Partial._fields)  # each (n, blocks)
    m = m_b.amax(1)  # (n,) the row max
    shift = _finite(m)[:, None]
    alpha = torch.exp(m_b - shift)  # rescales each block's exp(s - m_block); 0 for an all -inf block
    live = l_b > 0  # blocks with some mass (their m_block is finite)
    zero = torch.zeros_like(l_b)
    l = (alpha * l_b).sum(1)
    # each block's (s - m_block) grows by m_block - m
    a = None if a_b is None else (alpha * (a_b + torch.where(live, l_b * (_finite(m_b) - shift), zero))).sum(1)
    m_r = l_r = c = None
    if mr_b is not None:
        m_r = mr_b.amax(1)
        shift_r = _finite(m_r)[:, None]
        l_r = (torch.exp(mr_b - shift_r) * lr_b).sum(1)
        c = (alpha * (c_b + torch.where(live, l_b * (_finite(mr_b) - shift_r), zero))).sum(1)
    return _Partial(m, l, a, m_r, l_r, c)


def _finish(part, s_y):
    """Per-row outputs from a row's partial sums and target logit s_y: (logp, entropy, kl, lse, ref_lse)."""
    log_l = part.l.log()
    lse = _finite(part.m) + log_l  # (n,)
    logp = s_y - lse
    entropy = kl = ref_lse = None
    if part.a is not None:
        entropy = log_l - part.a / part.l  # H = log l - a / l
    if part.c is not None:
        log_l_r = part.l_r.log()
        kl = (part.a - part.c) / part.l - log_l + log_l_r  # KL = (a - c)/l - log l + log l_r
        ref_lse = _finite(part.m_r) + log_l_r
    return logp, entropy, kl, lse, ref_lse


def reference_forward(logits, targets, temperature=1.0, *, ref_logits=None, with_entropy=True, scratch=False):
    """Hand-written forward on full rows: logits (n, V), targets (n,) in range ->
    (logp, entropy, kl, lse, ref_lse), each (n,) or None (entropy: if with_entropy or ref_logits; kl, ref_lse: if
    ref_logits). scratch=True lets it overwrite `logits` (a temporary) instead of allocating."""
    inv_temp = 1.0 / temperature
    s = _scaled(logits, inv_temp, scratch)  # (n, V) s = z / tau
    s_y = s.gather(1, targets[:, None]).squeeze(1)  # (n,) s of the target
    t = None if ref_logits is None else _scaled(ref_logits, inv_temp, scratch)  # (n, V) r / tau
    return _finish(_block_stats(s, t, with_entropy), s_y)


def _dense_grad(log_pi, grad_logp=None, grad_entropy=None, entropy=None, grad_kl=None, kl=None, log_q=None):
    """The dense part of d loss / d s, computed in place on log_pi (n, Vc): -pi_v (c0 + c1 log pi_v + g_KL log q_v),
    with c0 = g_logp + g_H H + g_KL KL and c1 = g_H - g_KL (the target's + g_logp is added by the caller).
    log_q (n, Vc): the reference's log-probabilities of the same columns, needed with grad_kl (overwritten)."""
    if grad_entropy is None and grad_kl is None:
        return log_pi.exp_().mul_(-grad_logp[:, None]) if grad_logp is not None else log_pi.zero_()  # -g pi_v
    p = torch.exp(log_pi)  # (n, Vc) pi_v
    zero = torch.zeros(log_pi.shape[0], dtype=log_pi.dtype, device=log_pi.device)
    g_h = zero if grad_entropy is None else grad_entropy
    g_kl = zero if grad_kl is None else grad_kl
    c0 = (zero if grad_logp is None else grad_logp) + (0.0 if grad_entropy is None else g_h * entropy)
    c0 = c0 + (0.0 if grad_kl is None else g_kl * kl)  # (n,) g_logp + g_H H + g_KL KL
    c1 = g_h - g_kl  # (n,)
    br = log_pi.clamp_(min=_CLAMP).mul_(c1[:, None]).add_(c0[:, None])  # (n, Vc) c0 + c1 log pi_v
    if grad_kl is not None:
        br.add_(log_q.mul_(g_kl[:, None]))
        br.masked_fill_(p == 0, 0.0)  # pi_v = 0: no term (log q_v may be -inf there)
    return br.mul_(p).neg_()  # -pi_v (c0 + c1 log pi_v + g_KL log q_v)


def reference_backward(logits, targets, lse, temperature=1.0, *, grad_logp=None, grad_entropy=None, entropy=None,
                       grad_kl=None, kl=None, ref_logits=None, ref_lse=None, col_offset=0, scratch=False):
    """Hand-written backward: d loss / d logits for logits (n, Vc) holding columns [col_offset, col_offset + Vc) of
    each row, given the forward's per-row lse (and entropy, kl, ref_lse) and any of the (n,) output gradients
    (None = 0). Returns (n, Vc) in the accumulation dtype; scratch=True reuses `logits` as the result."""
    inv_temp = 1.0 / temperature
    log_pi = _scaled(logits, inv_temp, scratch).sub_(lse[:, None])  # (n, Vc) s - lse
    log_q = None
    if grad_kl is not None:
        log_q = _scaled(ref_logits, inv_temp, scratch).sub_(ref_lse[:, None])  # (n, Vc) log q_v
    ds = _dense_grad(log_pi, grad_logp, grad_entropy, entropy, grad_kl, kl, log_q)
    if grad_logp is not None:  # + g_logp at the target column, if it lies in this block
        local = targets - col_offset  # (n,)
        inside = (local >= 0) & (local < ds.shape[1])
        ds.scatter_add_(1, local.clamp(0, ds.shape[1] - 1)[:, None], (grad_logp * inside)[:, None].to(ds.dtype))
    return ds.mul_(inv_temp) if inv_temp != 1.0 else ds  # d/dz = (d/ds) / tau


# ================================================================================================================
# 2. Triton kernels. One program per row for the forward (a reduction over V); one per (row, block of V) for the
# backward (no reduction left: lse is known). Offsets are int64 (row * stride can exceed 2^31); math is fp32.

@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, stride_logits,  # (N, V) logits, any float dtype, unit column stride
    targets_ptr, mask_ptr,  # (N,) int target ids; (N,) uint8 mask (read only if HAS_MASK)
    ref_ptr, stride_ref,  # (N, V) reference logits (read only if FULL_KL)
    logp_ptr, ent_ptr, kl_ptr, lse_ptr, ref_lse_ptr,  # (N,) fp32 outputs
    V, inv_temp,
    HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr, FULL_KL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:  # padding: write zeros, read nothing
            tl.store(logp_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if WITH_ENTROPY:
                tl.store(ent_ptr + row, 0.0)
            if FULL_KL:
                tl.store(kl_ptr + row, 0.0)
                tl.store(ref_lse_ptr + row, 0.0)
            return
    row_ptr = logits_ptr + row * stride_logits
    ref_row_ptr = ref_ptr + row * stride_ref
    m = float("-inf")  # running max of s
    l = 0.0  # sum exp(s - m)
    a = 0.0  # sum exp(s - m) (s - m)
    m_r = float("-inf")  # reference: running max of r / tau
    l_r = 0.0  # sum exp(r/tau - m_r)
    c = 0.0  # sum exp(s - m) (r/tau - m_r)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inb = cols < V
        s = tl.load(row_ptr + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_temp  # (BLOCK_V,)
        m_new = tl.maximum(m, tl.max(s, 0))
        # Shifts are finite even while the row is all -inf so far (then m = -inf, l = 0: 0 as the shift).
        m_old_safe = tl.where(m == float("-inf"), 0.0, m)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)  # rescales the old sums (0 on the first block)
        e = tl.exp(s - m_safe)  # (BLOCK_V,) exp(s - m')
        if WITH_ENTROPY:  # (the launcher sets it whenever FULL_KL: the KL needs a)
            d = tl.where(e > 0, s - m_safe, 0.0)  # s - m', with 0 where exp is 0 (no 0 * -inf)
            a = alpha * (a + l * (m_old_safe - m_safe)) + tl.sum(e * d, 0)  # each old (s - m) grows by m - m'
        if FULL_KL:
            r = tl.load(ref_row_ptr + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_temp
            m_r_new = tl.maximum(m_r, tl.max(r, 0))
            m_r_old_safe = tl.where(m_r == float("-inf"), 0.0, m_r)
            m_r_safe = tl.where(m_r_new == float("-inf"), 0.0, m_r_new)
            l_r = l_r * tl.exp(m_r - m_r_safe) + tl.sum(tl.exp(r - m_r_safe), 0)
            dr = tl.where(e > 0, r - m_r_safe, 0.0)  # r/tau - m_r', 0 where pi is 0
            c = alpha * (c + l * (m_r_old_safe - m_r_safe)) + tl.sum(e * dr, 0)  # old (r/tau - m_r) grow too
            m_r = m_r_new
        l = alpha * l + tl.sum(e, 0)
        m = m_new
    m_fin = tl.where(m == float("-inf"), 0.0, m)
    log_l = tl.log(l)
    lse = m_fin + log_l
    y = tl.load(targets_ptr + row).to(tl.int64)
    valid = (y >= 0) & (y < V)
    s_y = tl.load(row_ptr + tl.where(valid, y, 0)).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, tl.where(valid, s_y - lse, float("nan")))  # an out-of-range target gives NaN
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, log_l - a / l)  # H = log l - a / l
    if FULL_KL:
        log_l_r = tl.log(l_r)
        tl.store(kl_ptr + row, (a - c) / l - log_l + log_l_r)  # KL = (a - c)/l - log l + log l_r
        tl.store(ref_lse_ptr + row, tl.where(m_r == float("-inf"), 0.0, m_r) + log_l_r)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, stride_logits,  # (N, Vc) logits: columns [col_offset, col_offset + Vc) of each row
    targets_ptr, mask_ptr,  # (N,) target ids (full-vocabulary numbering); (N,) uint8 mask
    ref_ptr, stride_ref,  # (N, Vc) reference logits (read only if HAS_GKL)
    lse_ptr, ent_ptr, kl_ptr, ref_lse_ptr,  # (N,) fp32 saved by the forward
    g_logp_ptr, g_ent_ptr, g_kl_ptr,  # (N,) fp32 output gradients (read only if HAS_*)
    out_ptr, stride_out,  # (N, Vc) d loss / d logits (may be logits_ptr itself: each element is read, then written)
    n_cols, col_offset, inv_temp,
    HAS_MASK: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr, HAS_GKL: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # (BLOCK_V,) local column
    inb = cols < n_cols
    out_ptrs = out_ptr + row * stride_out + cols
    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:  # padding: zero gradient, nothing read
            tl.store(out_ptrs, tl.zeros([BLOCK_V], dtype=tl.float32).to(out_ptr.dtype.element_ty), mask=inb)
            return
    s = tl.load(logits_ptr + row * stride_logits + cols, mask=inb, other=0.0).to(tl.float32) * inv_temp
    log_pi = s - tl.load(lse_ptr + row)  # (BLOCK_V,)
    pi = tl.exp(log_pi)
    live = pi > 0  # pi_v = 0 (a -inf logit, or underflow): no term; finite stand-ins keep 0 * inf out
    log_pi = tl.where(live, log_pi, 0.0)
    # bracket = c0 + c1 log pi_v + g_KL log q_v  with c0 = g_logp + g_H H + g_KL KL, c1 = g_H - g_KL
    bracket = tl.zeros([BLOCK_V], dtype=tl.float32)
    g_logp = 0.0
    if HAS_GLOGP:
        g_logp = tl.load(g_logp_ptr + row)
        bracket += g_logp
    if HAS_GENT:
        g_ent = tl.load(g_ent_ptr + row)
        bracket += g_ent * (log_pi + tl.load(ent_ptr + row))
    if HAS_GKL:
        g_kl = tl.load(g_kl_ptr + row)
        r = tl.load(ref_ptr + row * stride_ref + cols, mask=inb, other=0.0).to(tl.float32) * inv_temp
        log_q = tl.where(live, r - tl.load(ref_lse_ptr + row), 0.0)
        bracket -= g_kl * (log_pi - log_q - tl.load(kl_ptr + row))
    ds = tl.where(live, -pi * bracket, 0.0)
    if HAS_GLOGP:
        y = tl.load(targets_ptr + row).to(tl.int64)
        ds += tl.where(cols + col_offset == y, g_logp, 0.0)  # + g_logp [v = y]
    tl.store(out_ptrs, (ds * inv_temp).to(out_ptr.dtype.element_ty), mask=inb)


# ================================================================================================================
# 3. Launchers: check shapes, dtypes and strides with clear errors, pick launch configs, launch.

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def forward_config(V):
    """(BLOCK_V, num_warps) for the forward kernel. One config in the interpreter (bigger blocks = fewer Python
    steps); on GPU a 4096-wide block, 8 warps. Not timed yet (bench/logprobs.py on a GPU); compiled for A100 and H100
    (`python -m bench.compile`, results/compile.md): 32-89 registers over the flag combinations, no spill."""
    if _interpreting():
        return min(triton.next_power_of_2(V), 65536), 4
    return min(triton.next_power_of_2(V), 4096), 8


def backward_config(V):
    """(BLOCK_V, num_warps) for the backward kernel (one program per row and block of columns): 2048 columns over
    8 warps, 8 per thread. Compiled for A100 and H100 (results/compile.md): 28-48 registers, no spill in any flag
    combination; with 4 warps (16 columns per thread) ptxas spilled 4-24 bytes in some fp16 ones."""
    if _interpreting():
        return min(triton.next_power_of_2(V), 65536), 4
    return min(triton.next_power_of_2(V), 2048), 8


def _check_rows(name, x, N=None, V=None, device=None, allow64=False):
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, V), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS and not (allow64 and x.dtype == torch.float64):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along the vocabulary (stride(1) == 1); call .contiguous()")
    if N is not None and tuple(x.shape) != (N, V):
        raise ValueError(f"{name} must have shape {(N, V)}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, logits on {device}")


def _check_vec(name, x, N, device, integer=False):
    if x.shape != (N,):
        raise ValueError(f"{name} must have shape ({N},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, logits on {device}")
    if integer and (x.dtype.is_floating_point or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")


def _check_device(x):
    if not x.is_cuda and not _interpreting():
        raise RuntimeError("the Triton kernels need CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 set before "
                           "kernels are imported); use backend='torch' on CPU")


def _mask_arg(mask, N, device):
    """mask (N,) bool -> a uint8 view the kernels can read (no copy), or None."""
    if mask is None:
        return None
    _check_vec("mask", mask, N, device)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    return mask.contiguous().view(torch.uint8)


def launch_forward(logits, targets, temperature=1.0, *, mask=None, ref_logits=None, with_entropy=False):
    """Triton forward: logits (N, V), targets (N,) -> (logp, entropy, kl, lse, ref_lse), each (N,) fp32 or None.
    kl is the full KL to softmax(ref_logits / T). A target outside [0, V) of a real row gives logp = NaN."""
    _check_rows("logits", logits)
    _check_device(logits)
    N, V = logits.shape
    dev = logits.device
    _check_vec("targets", targets, N, dev, integer=True)
    targets = targets.contiguous()
    mask_u8 = _mask_arg(mask, N, dev)
    full_kl = ref_logits is not None
    if full_kl:
        _check_rows("ref_logits", ref_logits, N, V, dev)
    f32 = dict(dtype=torch.float32, device=dev)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if (with_entropy or full_kl) else None
    kl, ref_lse = (torch.empty(N, **f32), torch.empty(N, **f32)) if full_kl else (None, None)
    if N > 0:
        block, warps = forward_config(V)
        ref = ref_logits if full_kl else logits
        _logprobs_fwd_kernel[(N,)](
            logits, logits.stride(0), targets, mask_u8 if mask_u8 is not None else targets,
            ref, ref.stride(0), logp, ent if ent is not None else logp, kl if full_kl else logp, lse,
            ref_lse if full_kl else lse, V, 1.0 / temperature,
            HAS_MASK=mask_u8 is not None, WITH_ENTROPY=ent is not None, FULL_KL=full_kl, BLOCK_V=block,
            num_warps=warps)
    return logp, ent, kl, lse, ref_lse


def launch_backward(logits, targets, lse, temperature=1.0, *, mask=None, grad_logp=None, grad_entropy=None,
                    entropy=None, grad_kl=None, kl=None, ref_logits=None, ref_lse=None, col_offset=0, out=None):
    """Triton backward: d loss / d logits for logits (N, Vc) = columns [col_offset, col_offset + Vc) of each row,
    from the forward's (N,) statistics and any (N,) output gradients (None = 0). Returns `out` (default: a new
    tensor like logits; `out=logits` overwrites the logits in place)."""
    _check_rows("logits", logits)
    _check_device(logits)
    N, Vc = logits.shape
    dev = logits.device
    _check_vec("targets", targets, N, dev, integer=True)
    for name, v in (("lse", lse), ("entropy", entropy), ("kl", kl), ("ref_lse", ref_lse)):
        if v is not None:
            _check_vec(name, v, N, dev)
            if v.dtype != torch.float32 or not v.is_contiguous():
                raise TypeError(f"{name} must be the forward's contiguous float32 output")
    mask_u8 = _mask_arg(mask, N, dev)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format) if out is None else out
    _check_rows("out", out, N, Vc, dev)
    if grad_kl is not None:
        if ref_logits is None or ref_lse is None or kl is None:
            raise ValueError("grad_kl needs ref_logits, ref_lse and kl")
        _check_rows("ref_logits", ref_logits, N, Vc, dev)
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs entropy")
    vec = lambda g: None if g is None else g.float().contiguous()  # noqa: E731
    g_lp, g_h, g_kl = vec(grad_logp), vec(grad_entropy), vec(grad_kl)
    for name, g in (("grad_logp", g_lp), ("grad_entropy", g_h), ("grad_kl", g_kl)):
        if g is not None:
            _check_vec(name, g, N, dev)
    if N == 0 or Vc == 0:
        return out
    block, warps = backward_config(Vc)
    ref = ref_logits if grad_kl is not None else logits
    _logprobs_bwd_kernel[(N, triton.cdiv(Vc, block))](
        logits, logits.stride(0), targets.contiguous(), mask_u8 if mask_u8 is not None else targets,
        ref, ref.stride(0), lse, entropy if entropy is not None else lse, kl if kl is not None else lse,
        ref_lse if ref_lse is not None else lse,
        g_lp if g_lp is not None else lse, g_h if g_h is not None else lse, g_kl if g_kl is not None else lse,
        out, out.stride(0), Vc, col_offset, 1.0 / temperature,
        HAS_MASK=mask_u8 is not None, HAS_GLOGP=g_lp is not None, HAS_GENT=g_h is not None,
        HAS_GKL=g_kl is not None, BLOCK_V=block, num_warps=warps)
    return out


# ================================================================================================================
# 4. Autograd Functions. Both run either backend: "triton" (the kernels above) or "torch" (reference_forward /
# reference_backward, chunk by chunk). Masked rows: the Triton kernel skips them; the torch path drops them.

class _FromLogits(torch.autograd.Function):
    """logits (N, V) -> (logp, entropy or None, full KL or None); gradient to logits only."""

    @staticmethod
    def forward(ctx, logits, targets, mask, ref_logits, temperature, with_entropy, backend):
        ctx.set_materialize_grads(False)
        N = logits.shape[0]
        if backend == "triton":
            logp, ent, kl, lse, ref_lse = launch_forward(logits, targets, temperature, mask=mask,
                                                         ref_logits=ref_logits, with_entropy=with_entropy)
            rows = None
        else:
            rows = None if mask is None else mask.nonzero().squeeze(1)  # (n,) kept rows
            pick = (lambda x: x) if rows is None else (lambda x: None if x is None else x.index_select(0, rows))
            outs = reference_forward(pick(logits), pick(targets), temperature, ref_logits=pick(ref_logits),
                                     with_entropy=with_entropy)
            if rows is not None:  # scatter back; padding rows read 0
                outs = [None if o is None else o.new_zeros(N).index_copy_(0, rows, o) for o in outs]
            logp, ent, kl, lse, ref_lse = [None if o is None else o.float() if o.dtype != torch.float64 else o
                                           for o in outs]
        ctx.save_for_backward(logits, targets, mask, ref_logits, lse, ent, kl, ref_lse, rows)
        ctx.cfg = (temperature, backend)
        return logp, (ent if with_entropy else None), kl

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_kl):
        logits, targets, mask, ref_logits, lse, ent, kl, ref_lse, rows = ctx.saved_tensors
        temperature, backend = ctx.cfg
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None and g_kl is None):
            return (None,) * 7
        if backend == "triton":
            dz = launch_backward(logits, targets, lse, temperature, mask=mask, grad_logp=g_logp, grad_entropy=g_ent,
                                 entropy=ent, grad_kl=g_kl, kl=kl, ref_logits=ref_logits, ref_lse=ref_lse)
        else:
            pick = (lambda x: x) if rows is None else (lambda x: None if x is None else x.index_select(0, rows))
            d = reference_backward(pick(logits), pick(targets), pick(lse), temperature, grad_logp=pick(g_logp),
                                   grad_entropy=pick(g_ent), entropy=pick(ent), grad_kl=pick(g_kl), kl=pick(kl),
                                   ref_logits=pick(ref_logits) if g_kl is not None else None,
                                   ref_lse=pick(ref_lse))
            dz = d.to(logits.dtype) if rows is None else logits.new_zeros(logits.shape).index_copy_(0, rows, d.to(
                logits.dtype))
        return dz, None, None, None, None, None, None


def default_chunk_bytes(device):
    """How big the one block of logits of the LM-head path may be: 256 MiB on GPU; 64 MiB on CPU (measured on 2
    cores: 16 MiB blocks are as fast on an idle machine, but their many small operations lose under load)."""
    return (256 << 20) if device.type == "cuda" else (64 << 20)


def default_keep_bytes(device):
    """Keep mode of the torch path (see `fused_logprobs`): at most 512 MiB of kept blocks on CPU (N = 2,048 tokens at
    V = 50,257 is 412 MB, one N x V fp32 tensor where hidden @ W.T + log_softmax peaks at three to five); 0 on
    GPU."""
    return 0 if device.type == "cuda" else (512 << 20)


MIN_BLOCK_COLS = {"torch": 512, "triton": 1024}  # the narrowest column block (matmul efficiency); tests lower it


def _block_shape(n, V, chunk_bytes, elt, min_cols):
    """(rows, cols) of a block of logits within chunk_bytes: as many rows as possible, at least min_cols columns."""
    cols = min(V, max(min_cols, chunk_bytes // (max(n, 1) * elt)))
    rows = min(max(n, 1), max(1, chunk_bytes // (cols * elt)))
    return rows, cols


class _FromHidden(torch.autograd.Function):
    """hidden (n, d), weight (V, d) -> (logp, entropy or None, full KL or None) for logits = hidden @ weight.T,
    made one block at a time; gradients to hidden and weight. Rows are already the kept ones (no mask here).

    Blocks. The Triton forward takes blocks of whole rows (its kernel reduces over a full row). The torch forward
    takes (rows x cols) blocks and merges their partial sums (`_merge`); in keep mode it stores each block
    (exp(s - m_block); s - m_block with the entropy) for the backward (ctx.kept). Both backwards take (rows x cols)
    blocks: dh of a row block sums over column blocks, dW of a column block over row blocks (usually one). The torch
    path folds 1/T into the small (n, d) side (x = hidden / T)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ref_hidden, ref_weight, temperature, with_entropy, backend,
                chunk_bytes, keep):
        ctx.set_materialize_grads(False)
        ctx.kept = None
        n, V = hidden.shape[0], weight.shape[0]
        full_kl = ref_hidden is not None
        acc = _acc(hidden)
        outs = [torch.zeros(n, dtype=acc, device=hidden.device) for _ in range(5)]  # logp, ent, kl, lse, ref_lse
        if backend == "triton":
            w = weight.to(hidden.dtype)  # (V, d) W as the product's operand (fp32 master weight -> bf16)
            wr = ref_weight.to(ref_hidden.dtype) if full_kl else None
            rows, _ = _block_shape(n, V, chunk_bytes, 4, V)  # whole rows of fp32 logits
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                z = _mm32(hidden[r0:r1], w.t())  # (rows, V) one block of logits, fp32
                zr = _mm32(ref_hidden[r0:r1], wr.t()) if full_kl else None  # (rows, V)
                got = launch_forward(z, targets[r0:r1], temperature, ref_logits=zr, with_entropy=with_entropy)
                for o, g in zip(outs, got):
                    if g is not None:
                        o[r0:r1] = g
        else:
            inv_temp = 1.0 / temperature
            x = hidden.to(acc) * inv_temp  # (n, d) logits of x are s = z / T
            xr = ref_hidden.to(acc) * inv_temp if full_kl else None
            w = weight.to(hidden.dtype).to(acc)  # (V, d) W rounded as the product's operand, then fp32
            wr = ref_weight.to(ref_hidden.dtype).to(acc) if full_kl else None
            rows, cols = _block_shape(n, V, chunk_bytes, 4, MIN_BLOCK_COLS["torch"])
            kept = []  # keep mode: every block (r0, r1, c0, c1, its values, m_block), for the backward
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                y = targets[r0:r1]
                s_y = torch.zeros(r1 - r0, dtype=acc, device=hidden.device)  # (rows,) target logit / T
                parts = []
                for c0 in range(0, V, cols):
                    c1 = min(V, c0 + cols)
                    s = x[r0:r1] @ w[c0:c1].t()  # (rows, cols) one block of s = z / T
                    local = y - c0
                    inside = (local >= 0) & (local < c1 - c0)
                    s_y = torch.where(inside, s.gather(1, local.clamp(0, c1 - c0 - 1)[:, None]).squeeze(1), s_y)
                    t = xr[r0:r1] @ wr[c0:c1].t() if full_kl else None  # (rows, cols)
                    parts.append(_block_stats(s, t, with_entropy))  # s becomes exp(s - m_block), or s - m_block
                    if keep:  # with_entropy: s - m_block (clamped at -1000); without: exp(s - m_block)
                        kept.append((r0, r1, c0, c1, s, parts[-1].m))
                for o, g in zip(outs, _finish(_merge(parts), s_y)):
                    if g is not None:
                        o[r0:r1] = g
            ctx.kept = (with_entropy, kept) if keep else None
        logp, ent, kl, lse, ref_lse = outs
        ent = ent if (with_entropy or full_kl) else None
        kl, ref_lse = (kl, ref_lse) if full_kl else (None, None)
        ctx.save_for_backward(hidden, weight, targets, ref_hidden, ref_weight, lse, ent, kl, ref_lse)
        ctx.cfg = (temperature, backend, chunk_bytes)
        return logp.float() if acc != torch.float64 else logp, (ent if with_entropy else None), kl

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_kl):
        hidden, weight, targets, ref_hidden, ref_weight, lse, ent, kl, ref_lse = ctx.saved_tensors
        temperature, backend, chunk_bytes = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None and g_kl is None) or not (need_h or need_w) or hidden.shape[0] == 0:
            dh = torch.zeros_like(hidden) if need_h else None
            dw = torch.zeros_like(weight) if need_w else None
        else:
            run = _triton_head_backward if backend == "triton" else _torch_head_backward
            dh, dw = run(hidden, weight, targets, ref_hidden, ref_weight, (lse, ent, kl, ref_lse),
                         (g_logp, g_ent, g_kl), temperature, chunk_bytes, need_h, need_w, ctx.kept)
        return dh, dw, None, None, None, None, None, None, None, None


def _triton_head_backward(hidden, weight, targets, ref_hidden, ref_weight, stats, g, temperature, chunk_bytes,
                          need_h, need_w, kept=None):
    """dh, dW for the Triton path: blocks of z = h W^T, turned into d loss / d z in place by the backward kernel.
    (`kept` is always None here: keep mode is the PyTorch path's.)"""
    lse, ent, kl, ref_lse = stats
    g_lp, g_h, g_kl = g
    n, V = hidden.shape[0], weight.shape[0]
    rows, cols = _block_shape(n, V, chunk_bytes, 4, MIN_BLOCK_COLS["triton"])  # fp32 blocks of logits
    w = weight.to(hidden.dtype)  # (V, d) the forward's operand
    wr = ref_weight.to(ref_hidden.dtype) if g_kl is not None else None
    dh = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    dw = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # fp32 sums
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h_blk = hidden[r0:r1]
        dh_blk = torch.zeros(r1 - r0, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
        pick = lambda v: None if v is None else v[r0:r1]  # noqa: E731
        for c0 in range(0, V, cols):
            c1 = min(V, c0 + cols)
            z = _mm32(h_blk, w[c0:c1].t())  # (rows, cols) this block of logits, recomputed in fp32
            zr = _mm32(ref_hidden[r0:r1], wr[c0:c1].t()) if g_kl is not None else None
            dz = launch_backward(z, targets[r0:r1], lse[r0:r1], temperature, grad_logp=pick(g_lp),
                                 grad_entropy=pick(g_h), entropy=pick(ent), grad_kl=pick(g_kl), kl=pick(kl),
                                 ref_logits=zr, ref_lse=pick(ref_lse), col_offset=c0, out=z)  # in place
            dz = dz.to(hidden.dtype)  # (rows, cols) the matmuls' operand
            if need_h:
                dh_blk += _mm32(dz, w[c0:c1])  # dh += dz W_c, summed over column blocks in fp32
            if need_w:
                _add_block(dw, c0, c1, r0 == 0, dz.t(), h_blk)  # dW_c += dz^T h, summed over row blocks in fp32
        if need_h:
            dh[r0:r1] = dh_blk
    return (dh.to(hidden.dtype) if need_h else None), (dw.to(weight.dtype) if need_w else None)


def _torch_head_backward(hidden, weight, targets, ref_hidden, ref_weight, stats, g, temperature, chunk_bytes,
                         need_h, need_w, kept=None):
    """dh, dW for the PyTorch path (the CPU one: it must beat hidden @ W.T + log_softmax). Savings on top of the
    blocking: 1/T is folded into x = hidden / T (so s = x W^T), and the matmul also subtracts lse: the logits of
    [x, b] against [W, 1] are s + b, so with b = -lse they are log pi directly. When only logp has a gradient, b
    also adds log|g|: exp() of the block is then |g| pi, the whole dense gradient up to the row's sign, which is
    applied to the (n, d) sides instead; the target's + g [v = y] is added once, as a gather and an index_put.
    Keep mode (`kept`: calls whose blocks fit keep_bytes): the forward's blocks are reused, either exp(s - m_block)
    (logp only: pi = exp(s - m_block) exp(m_block - lse), and the backward is two matmuls per block) or s - m_block
    (with the entropy: log pi = (s - m_block) + m_block - lse); nothing is recomputed."""
    lse, ent = stats[0], stats[1]
    g_lp, g_h, g_kl = g
    acc = _acc(hidden)
    inv_temp = 1.0 / temperature
    n, d = hidden.shape
    V = weight.shape[0]
    x = hidden.to(acc) * inv_temp  # (n, d)
    w = weight.to(hidden.dtype).to(acc)  # (V, d) as in the forward
    dh = torch.zeros(n, d, dtype=acc, device=x.device) if need_h else None
    dw = torch.empty(V, d, dtype=acc, device=x.device) if need_w else None
    if kept is not None and g_kl is None:
        log_domain, blocks = kept
        for r0, r1, c0, c1, blk, m_blk in blocks:
            shift = _finite(m_blk) - lse[r0:r1]  # (rows,) log pi = (s - m_block) + m_block - lse
            if not log_domain:  # blk = exp(s - m_block): pi = blk exp(shift); only logp has a gradient
                scale = -g_lp[r0:r1].to(acc) * torch.exp(shift)  # (rows,) -g pi_v / blk_v
                if need_h:
                    dh[r0:r1].addcmul_(blk @ w[c0:c1], scale[:, None])  # dh += (-g pi) W_c
                if need_w:
                    _add_block(dw, c0, c1, r0 == 0, blk.t(), x[r0:r1] * scale[:, None])  # dW_c += (-g pi)^T x
            else:  # blk = s - m_block: the general dense gradient from log pi
                pick = lambda v: None if v is None else v[r0:r1]  # noqa: E731
                dz = _dense_grad(blk + shift[:, None], pick(g_lp), pick(g_h), pick(ent))  # (rows, cols)
                if need_h:
                    dh[r0:r1].addmm_(dz, w[c0:c1])  # dh += dz W_c
                if need_w:
                    _add_block(dw, c0, c1, r0 == 0, dz.t(), x[r0:r1])  # dW_c += dz^T x
    else:
        _torch_dense_backward(x, w, ref_hidden, ref_weight, stats, g, temperature, chunk_bytes, dh, dw)
    if g_lp is not None:  # the target term g [v = y]: dh += g w_y, dW_y += g x
        g_col = g_lp.to(acc)[:, None]  # (n, 1)
        if need_h:
            dh += g_col * w.index_select(0, targets)
        if need_w:
            dw.index_put_((targets,), g_col * x, accumulate=True)
    dh = (dh * inv_temp).to(hidden.dtype) if need_h else None  # d s / d hidden = W / T
    return dh, (dw.to(weight.dtype) if need_w else None)


def _add_block(dw, c0, c1, first, a, b):
    """dw[c0:c1] = a @ b on the first row block, += afterwards; dw may be fp32 for low-precision a, b (`_mm32`)."""
    if a.dtype != dw.dtype:
        blk = _mm32(a, b)  # (c1 - c0, d) fp32
        if first:
            dw[c0:c1] = blk
        else:
            dw[c0:c1] += blk
    elif first:
        torch.mm(a, b, out=dw[c0:c1])
    else:
        dw[c0:c1].addmm_(a, b)


def _torch_dense_backward(x, w, ref_hidden, ref_weight, stats, g, temperature, chunk_bytes, dh, dw):
    """The dense part of dh (accumulated into dh) and dW (written into dw) from recomputed blocks of logits, for
    x = hidden / T: everything but the target term."""
    lse, ent, kl, ref_lse = stats
    g_lp, g_h, g_kl = g
    acc = x.dtype
    n, V = x.shape[0], w.shape[0]
    only_logp = g_h is None and g_kl is None
    b = -lse.to(acc)  # (n,)
    if only_logp:
        sign = torch.sign(g_lp).to(acc)  # (n,) the row's gradient is -sign |g| pi_v (+ g at the target)
        b = b + g_lp.abs().to(acc).clamp_min(1e-30).log()
    ones = torch.ones(V, 1, dtype=acc, device=x.device)
    x_aug, w_aug = torch.cat([x, b[:, None]], 1), torch.cat([w, ones], 1)  # (n, d + 1), (V, d + 1)
    if g_kl is not None:  # the same for the reference: logits of [x_ref, -lse_ref] against [W_ref, 1] are log q
        xr_aug = torch.cat([ref_hidden.to(acc) / temperature, -ref_lse.to(acc)[:, None]], 1)
        wr_aug = torch.cat([ref_weight.to(ref_hidden.dtype).to(acc), ones], 1)
    x_w = x * -sign[:, None] if only_logp else x  # (n, d) the side dW multiplies
    rows, cols = _block_shape(n, V, chunk_bytes, 4, MIN_BLOCK_COLS["torch"])
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        pick = lambda v: None if v is None else v[r0:r1]  # noqa: E731
        dh_blk = torch.zeros(r1 - r0, x.shape[1], dtype=acc, device=x.device) if dh is not None else None
        for c0 in range(0, V, cols):
            c1 = min(V, c0 + cols)
            t = x_aug[r0:r1] @ w_aug[c0:c1].t()  # (rows, cols) log pi (+ log|g|)
            if only_logp:
                dz = t.exp_()  # |g| pi_v
            else:
                log_q = xr_aug[r0:r1] @ wr_aug[c0:c1].t() if g_kl is not None else None  # (rows, cols) log q
                dz = _dense_grad(t, pick(g_lp), pick(g_h), pick(ent), pick(g_kl), pick(kl), log_q)
            if dh is not None:
                dh_blk.addmm_(dz, w[c0:c1])  # dh += dz W_c
            if dw is not None:
                _add_block(dw, c0, c1, r0 == 0, dz.t(), x_w[r0:r1])  # dW_c += dz^T x
        if dh is not None:
            dh[r0:r1] += dh_blk * -sign[r0:r1, None] if only_logp else dh_blk


# ================================================================================================================
# 5. Public functions.

_BACKENDS = ("triton", "torch")


def _check_backend(backend):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'triton' or 'torch', not {backend!r}")
    if backend == "triton" and not HAVE_TRITON:
        raise RuntimeError("backend='triton' but Triton is not installed; use backend='torch'")


def logprobs(logits, targets, temperature=1.0, *, mask=None, with_entropy=False, ref_logprobs=None, ref_logits=None,
             kl_estimator="k3", backend="triton"):
    """From logits (N, V) (fp32, fp16 or bf16; unit stride along V) and targets (N,) -> LogprobOutputs (fp32, (N,)):
    logp = log pi(target) at `temperature`; entropy if with_entropy; kl = full KL(pi || softmax(ref_logits / T))
    if ref_logits (N, V) is given, or the estimator `kl_estimator` (k1, k2, k3) of the log-ratio to ref_logprobs
    (N,) if that is given. mask (N,) bool: False rows (padding) give 0 and zero gradient. Differentiable in logits;
    the reference gets no gradient. backend: "triton" (the kernels) or "torch" (the hand-written reference)."""
    _check_backend(backend)
    if ref_logits is not None and ref_logprobs is not None:
        raise ValueError("give ref_logits (full KL) or ref_logprobs (estimator), not both")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_rows("logits", logits, allow64=backend == "torch")
    N, V = logits.shape
    _check_vec("targets", targets, N, logits.device, integer=True)
    if mask is not None:
        _mask_arg(mask, N, logits.device)
    if ref_logits is not None:
        _check_rows("ref_logits", ref_logits, N, V, logits.device, allow64=backend == "torch")
        ref_logits = ref_logits.detach()
    logp, ent, kl = _FromLogits.apply(logits, targets, mask, ref_logits, float(temperature), with_entropy, backend)
    if ref_logprobs is not None:
        kl = kl_estimate(logp, ref_logprobs, kl_estimator, mask)
    return LogprobOutputs(logp, ent, kl)


def fused_logprobs(hidden, weight, targets, temperature=1.0, *, mask=None, with_entropy=False, ref_logprobs=None,
                   ref_hidden=None, ref_weight=None, kl_estimator="k3", backend="triton", chunk_bytes=None,
                   keep_bytes=None):
    """The same outputs as `logprobs` for logits = hidden @ weight.T, never materialising all N x V of them.

    hidden (N, d), weight (V, d) (hidden's float dtype, or fp32: Precision above), targets (N,) -> LogprobOutputs (fp32, (N,)); differentiable in
    hidden and weight. The full KL takes the reference's hidden states ref_hidden (N, d_ref) and LM head ref_weight
    (V, d_ref); ref_logprobs (N,) takes an estimator instead. mask (N,) bool: False rows are dropped before the
    matmul (cost nothing; their outputs and gradients are 0). chunk_bytes bounds the one logits block held at a time
    (default `default_chunk_bytes`). backend: "triton" (kernels on each block; the matmuls are torch's) or "torch".
    keep_bytes (torch backend, calls that need a gradient, no full KL): if the n x V fp32 blocks fit in it, the
    forward keeps them and the backward skips recomputing the logits (default `default_keep_bytes`; 0: never)."""
    _check_backend(backend)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, d) and weight (V, d), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.dtype not in _FLOATS + (torch.float64,) or weight.dtype not in (hidden.dtype, torch.float32):
        raise TypeError(f"hidden and weight must share a float dtype (or weight be fp32), got {hidden.dtype} and "
                        f"{weight.dtype}")
    if ref_weight is not None and ref_weight.dtype not in (ref_hidden.dtype, torch.float32):
        raise TypeError(f"ref_weight must have ref_hidden's dtype or be fp32, got {ref_weight.dtype}")
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError("the Triton kernels take fp32, fp16 or bf16, not float64")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    _check_vec("targets", targets, N, dev, integer=True)
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("the full KL needs both ref_hidden and ref_weight")
    if ref_hidden is not None:
        if ref_logprobs is not None:
            raise ValueError("give ref_hidden/ref_weight (full KL) or ref_logprobs (estimator), not both")
        if ref_hidden.shape[0] != N or ref_weight.shape[0] != V or ref_hidden.shape[1] != ref_weight.shape[1]:
            raise ValueError(f"ref_hidden must be ({N}, d_ref) and ref_weight ({V}, d_ref), got "
                             f"{tuple(ref_hidden.shape)} and {tuple(ref_weight.shape)}")
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    chunk_bytes = default_chunk_bytes(dev) if chunk_bytes is None else int(chunk_bytes)
    h, y, rh = hidden, targets, ref_hidden
    if mask is not None:
        _mask_arg(mask, N, dev)
        rows = mask.nonzero().squeeze(1)  # (n,) the real tokens (one host sync)
        h, y = hidden.index_select(0, rows), targets.index_select(0, rows)
        rh = None if ref_hidden is None else ref_hidden.index_select(0, rows)
    keep_bytes = default_keep_bytes(dev) if keep_bytes is None else int(keep_bytes)
    keep = (backend == "torch" and rh is None and torch.is_grad_enabled()
            and (hidden.requires_grad or weight.requires_grad) and h.shape[0] * V * 4 <= keep_bytes)
    logp, ent, kl = _FromHidden.apply(h, weight, y, rh, ref_weight, float(temperature), with_entropy, backend,
                                      chunk_bytes, keep)
    if mask is not None:  # put the real rows back among zeros (differentiable)
        back = lambda x: None if x is None else x.new_zeros(N).index_copy(0, rows, x)  # noqa: E731
        logp, ent, kl = back(logp), back(ent), back(kl)
    if ref_logprobs is not None:
        kl = kl_estimate(logp, ref_logprobs, kl_estimator, mask)
    return LogprobOutputs(logp, ent, kl)
