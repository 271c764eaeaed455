"""Causal self-attention with per-row left-padding offsets.

Math. For one batch row b and head h, queries Q (Tq, D), keys K and values V (Tk, D), Tq <= Tk. Query i sits at key
position p_i = Tk - Tq + i (training: Tq = Tk, p_i = i; decoding: the last Tq positions of a KV cache). Row b's
first real token is at `start[b]` (left padding). Query i may attend to key j iff  start[b] <= j <= p_i:

    S = Q K^T / sqrt(D)            (Tq, Tk)
    P = softmax(S + M)             M_ij = 0 where allowed, -inf elsewhere
    O = P V                        (Tq, D)

A query with no allowed key (a padding position) outputs zeros, never NaN.

Forward, tiled (FlashAttention's idea). S and P are (Tq, Tk): at T = 4k and 12 heads that is 400 MB per sequence
in fp16, written and read back twice by eager attention. Instead one program owns a block of BLOCK_M queries, keeps
its (BLOCK_M, D) output accumulator in registers, and streams K/V past it in blocks of BLOCK_N keys. The softmax
normaliser is not known until every key has been seen, so it runs "online": per query row keep the running max m and
the running sum l of exp(S - m), and rescale what has been accumulated whenever the max grows:

    m'  = max(m, rowmax(S_blk))
    P   = exp(S_blk - m')                      (BLOCK_M, BLOCK_N), never written to memory
    l'  = exp(m - m') l + rowsum(P)
    A'  = exp(m - m') A + P V_blk              A = the unnormalised output
    end:  O = A / l,   L = m + log l           L = logsumexp of the row's allowed scores, saved for backward

exp is computed as exp2 with log2(e) folded into the score scale (one multiply per score, and exp2 is the hardware
instruction). Causality is a loop bound: key blocks wholly above the diagonal are never visited, and key blocks wholly
before a row's `start` are skipped the same way. Only the few blocks that straddle the diagonal, the `start` boundary
or the end of the sequence pay for the element-wise mask; the rest run an unmasked loop.

Backward. With dO the gradient of O and P recomputed from the saved L as P = exp(S - L) (exact, element by element):

    dV = P^T dO                   dP = dO V^T
    dS = P o (dP - Delta)         Delta_i = sum_j P_ij dP_ij = rowsum(dO o O)_i   ("o": element-wise product)
    dQ = scale dS K               dK = scale dS^T Q

Delta comes from a small pre-pass over (O, dO). The rest is two kernels: one program per key block accumulates dK and
dV over the query blocks that see it; one program per query block accumulates dQ over the key blocks it sees. This
recomputes S and dP twice (7 block matmuls per block pair instead of 5), but every gradient element is summed by one
program in a fixed order: gradients are bit-for-bit reproducible run to run, with no fp32 dQ scratch buffer and no
atomics. The alternative, one pass with dQ accumulated by fp32 atomic adds, is faster in principle, but its sum order
changes from run to run, which makes RLHF runs (already noisy) impossible to replay exactly when debugging.

Decode (generation). Each step brings Tq = 1 (or a few) new queries per row against a KV cache of length L. One
program per (row, head) would leave most of the GPU idle for a batch of 16 and would walk L keys serially. So the cache
is split into `num_splits` chunks; each program attends its queries to one chunk and writes a partial output O_s
(normalised within the chunk) and its log-sum-exp L_s. A combine kernel merges the chunks exactly:

    L = log sum_s exp(L_s)        O = sum_s exp(L_s - L) O_s        (a chunk that saw no key has L_s = -inf)

Decode reads the whole cache once and does little arithmetic per byte: it is bound by memory bandwidth.
"""

import functools
import os

import torch

from kernels._triton import HAVE_TRITON, tl, triton

# Whether the kernels below are being defined for Triton's CPU interpreter (decided once, when they are defined).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def reference(q, k, v, start=None, scale=None):
    """The spec, in plain PyTorch and fp32: q (B, H, Tq, D), k and v (B, H, Tk, D), start (B,) int or None."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    qpos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]  # (Tq, 1)
    kpos = torch.arange(Tk, device=q.device)[None, :]  # (1, Tk)
    allowed = (kpos <= qpos)[None, None]  # (1, 1, Tq, Tk)
    if start is not None:
        allowed = allowed & (kpos >= start.view(B, 1, 1, 1))  # (B, 1, Tq, Tk)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no allowed key is all -inf: NaN -> 0
    return (p @ v.float()).to(q.dtype)  # (B, H, Tq, D)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels.
#
# Every kernel takes explicit strides for (batch, head, time, dim), so K/V may be views of a larger KV-cache buffer.
# Grids put the (batch * head) index on axis 1 and the block index on axis 0. Constexprs:
#   HEAD_DIM  the true head dim D;  BLOCK_D = next power of two >= max(D, 16) (tiles are padded, CHECK_D masks them)
#   UPCAST    load as fp32 (bf16 under the interpreter, whose bf16 tl.dot is wrong)
#   DOT_PREC  "ieee" when the dot inputs are fp32 (tf32 would drop 13 bits of mantissa), else "tf32" (then unused)
# Scores inside the kernels are in base 2: s2 = log2(e) * S, so exp(S - m) = exp2(s2 - m2).


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, CHECK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; rows past the end (and padded columns when CHECK_D) read as 0."""
    if CHECK_D:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(ptrs, x, row_ok, d_ok, CHECK_D: tl.constexpr):
    """Store a (rows, BLOCK_D) fp32 tile in the destination's dtype; rows past the end are dropped."""
    x = x.to(ptrs.dtype.element_ty)
    if CHECK_D:
        tl.store(ptrs, x, mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None])


@triton.jit
def _attend_blocks(acc, m_i, l_i, q, qpos, start, lo, hi,
                   k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, Tk, qk_scale,
                   MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                   CHECK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """The online-softmax loop over key blocks [lo, hi) for one query block; MASKED applies start/causal/end masks."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = lo + tl.arange(0, BLOCK_N)  # key positions j of the current block
    # Tile offsets fixed for the whole loop and one scalar pointer per tensor that moves by a block, rather than a
    # loop-carried (BLOCK_N, BLOCK_D) tensor of 64-bit pointers (compiled for sm_80, 64 x 64 bf16 tiles: 200 -> 151
    # registers; bench/compile.py).
    k_off = tl.arange(0, BLOCK_N)[:, None] * stride_kt + offs_d[None, :] * stride_kd  # (BLOCK_N, BLOCK_D)
    v_off = tl.arange(0, BLOCK_N)[:, None] * stride_vt + offs_d[None, :] * stride_vd  # (BLOCK_N, BLOCK_D)
    k_blk = k_base + lo * stride_kt
    v_blk = v_base + lo * stride_vt
    for _ in range(lo, hi, BLOCK_N):
        if MASKED:  # this block may run past Tk: those rows read as 0
            kv_ok = (offs_n < Tk)[:, None] & d_ok[None, :]
            k = tl.load(k_blk + k_off, mask=kv_ok, other=0.0)
            v = tl.load(v_blk + v_off, mask=kv_ok, other=0.0)
        elif CHECK_D:
            k = tl.load(k_blk + k_off, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_blk + v_off, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_blk + k_off)
            v = tl.load(v_blk + v_off)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N) base-2 scores
        if MASKED:  # allowed iff start <= j <= p_i (j <= p_i also keeps j < Tk for every real query)
            allowed = (offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] >= start)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # m' = max(m, rowmax(S_blk))
        m_ref = m_new
        if MASKED:  # a row with no allowed key so far has m' = -inf; subtract 0 instead so exp2 gives 0, not NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)  # exp(m - m'): rescales what was accumulated under the old max
        p = tl.exp2(s - m_ref[:, None])  # P = exp(S_blk - m')   (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, axis=1)  # l' = exp(m - m') l + rowsum(P)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)  # A' = exp(m - m') A + P V
        m_i = m_new
        offs_n += BLOCK_N
        k_blk += BLOCK_N * stride_kt
        v_blk += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit
def _attend_span(acc, m_i, l_i, q, qpos, start, lo, hi, full_lo, full_hi,
                 k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, Tk, qk_scale,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                 CHECK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Keys [lo, hi) (lo a multiple of BLOCK_N). Blocks before full_lo straddle `start`; blocks from full_hi on
    straddle the causal diagonal or the end; blocks in between are fully allowed for every query and skip the mask."""
    acc, m_i, l_i = _attend_blocks(acc, m_i, l_i, q, qpos, start, lo, tl.minimum(hi, full_lo),
                                   k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, Tk, qk_scale,
                                   True, BLOCK_N, BLOCK_D, HEAD_DIM, CHECK_D, UPCAST, DOT_PREC)
    acc, m_i, l_i = _attend_blocks(acc, m_i, l_i, q, qpos, start, tl.maximum(lo, full_lo), tl.minimum(hi, full_hi),
                                   k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, Tk, qk_scale,
                                   False, BLOCK_N, BLOCK_D, HEAD_DIM, CHECK_D, UPCAST, DOT_PREC)
    acc, m_i, l_i = _attend_blocks(acc, m_i, l_i, q, qpos, start, tl.maximum(lo, tl.maximum(full_lo, full_hi)), hi,
                                   k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, Tk, qk_scale,
                                   True, BLOCK_N, BLOCK_D, HEAD_DIM, CHECK_D, UPCAST, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, START,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd,
                     stride_ob, stride_oh, stride_ot, stride_od,
                     H, Tq, Tk, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     CHECK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (cdiv(Tq, BLOCK_M), B * H): O for one block of queries, and its log-sum-exp L (natural log) in LSE."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of a large KV cache overflow int32
    h = (pid_bh % H).to(tl.int64)
    start = tl.load(START + b)  # row b's first real key
    shift = Tk - Tq  # query i sits at key position shift + i
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   q_ok, d_ok, CHECK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
    qpos = shift + offs_m  # (BLOCK_M,) key position of each query

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running unnormalised output

    lo = (start // BLOCK_N) * BLOCK_N  # first key block with an allowed key
    hi = tl.minimum(Tk, shift + m0 + BLOCK_M)  # keys past the block's last query are never visited
    full_lo = tl.cdiv(start, BLOCK_N) * BLOCK_N  # first key block wholly at or after start
    full_hi = ((shift + m0 + 1) // BLOCK_N) * BLOCK_N  # key blocks below this are seen by every query of the block
    acc, m_i, l_i = _attend_span(acc, m_i, l_i, q, qpos, start, lo, hi, full_lo, full_hi,
                                 K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                                 stride_kt, stride_kd, stride_vt, stride_vd, Tk, qk_scale,
                                 BLOCK_N, BLOCK_D, HEAD_DIM, CHECK_D, UPCAST, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # l = 0: no allowed key; A = 0 there, so O = 0
    o = acc / l_safe[:, None]  # O = A / l   (BLOCK_M, BLOCK_D)
    _store_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                o, q_ok, d_ok, CHECK_D)
    # L = m + log l, back to natural log. +inf marks "no allowed key": backward's P = exp(S - L) is then 0.
    lse = tl.where(l_i == 0.0, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=q_ok)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA,
                           stride_ob, stride_oh, stride_ot, stride_od,
                           stride_db, stride_dh, stride_dt, stride_dd,
                           H, Tq,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           CHECK_D: tl.constexpr):
    """Grid (cdiv(Tq, BLOCK_M), B * H): Delta = rowsum(dO o O), fp32, (B * H, Tq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM
    o = _load_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                   m_ok, d_ok, CHECK_D, True)  # (BLOCK_M, BLOCK_D) fp32
    do = _load_tile(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :] * stride_dd,
                    m_ok, d_ok, CHECK_D, True)  # (BLOCK_M, BLOCK_D) fp32
    tl.store(DELTA + pid_bh * Tq + offs_m, tl.sum(o * do, axis=1), mask=m_ok)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, offs_n, lo, hi, shift,
                 q_base, do_base, lse_base, delta_base, stride_qt, stride_qd, stride_dt, stride_dd, Tq, qk_scale,
                 MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                 CHECK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi). Works on transposed tiles (keys x queries) so
    the key block stays the row operand. MASKED applies the causal mask (query blocks straddling the diagonal)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_m = lo + tl.arange(0, BLOCK_M)  # query rows i of the current block
    q_off = tl.arange(0, BLOCK_M)[:, None] * stride_qt + offs_d[None, :] * stride_qd  # (BLOCK_M, BLOCK_D)
    do_off = tl.arange(0, BLOCK_M)[:, None] * stride_dt + offs_d[None, :] * stride_dd  # (BLOCK_M, BLOCK_D)
    q_blk = q_base + lo * stride_qt  # as in `_attend_blocks`: fixed offsets, moving scalar pointers
    do_blk = do_base + lo * stride_dt
    for _ in range(lo, hi, BLOCK_M):
        m_ok = offs_m < Tq  # the last query block may run past Tq (masked or not)
        tile_ok = m_ok[:, None]
        if CHECK_D:
            tile_ok = tile_ok & d_ok[None, :]
        q = tl.load(q_blk + q_off, mask=tile_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(do_blk + do_off, mask=tile_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # L in base 2; rows past Tq get L = +inf so their P is 0 (their q and dO are 0 too)
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634  # (BLOCK_M,)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # S^T, base 2   (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse2[None, :])  # P^T = exp(S - L)^T
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= (shift + offs_m)[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)  # dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # dP^T = V dO^T   (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T = P^T o (dP^T - Delta)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)  # dK += dS^T Q   (scale applied at the end)
        offs_m += BLOCK_M
        q_blk += BLOCK_M * stride_qt
        do_blk += BLOCK_M * stride_dt
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, START,
                          stride_qb, stride_qh, stride_qt, stride_qd,
                          stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd,
                          stride_db, stride_dh, stride_dt, stride_dd,
                          stride_gb, stride_gh, stride_gt, stride_gd,
                          H, Tq, Tk, sm_scale, qk_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, CHECK_D: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PREC: tl.constexpr):
    """Grid (cdiv(Tk, BLOCK_N), B * H): dK and dV for one block of keys (DK and DV share the strides stride_g*)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start = tl.load(START + b)
    shift = Tk - Tq
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Tk
    d_ok = offs_d < HEAD_DIM
    k = _load_tile(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                   n_ok, d_ok, CHECK_D, UPCAST)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                   n_ok, d_ok, CHECK_D, UPCAST)  # (BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query i sees a key of this block only if shift + i >= n0 (causal) and shift + i >= start (not padding).
    first = tl.maximum(tl.maximum(n0, start) - shift, 0)
    lo = (first // BLOCK_M) * BLOCK_M
    # A query block starting at m0 sees every key of this block iff shift + m0 >= n0 + BLOCK_N - 1.
    full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
    hi = tl.where(n0 + BLOCK_N <= start, 0, Tq)  # a block of padding keys only: nothing to do, dK = dV = 0
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_db + h * stride_dh
    dk, dv = _dkdv_blocks(dk, dv, k, v, offs_n, lo, tl.minimum(full, hi), shift,
                          q_base, do_base, LSE + pid_bh * Tq, DELTA + pid_bh * Tq,
                          stride_qt, stride_qd, stride_dt, stride_dd, Tq, qk_scale,
                          True, BLOCK_M, BLOCK_D, HEAD_DIM, CHECK_D, UPCAST, DOT_PREC)
    dk, dv = _dkdv_blocks(dk, dv, k, v, offs_n, tl.maximum(lo, full), hi, shift,
                          q_base, do_base, LSE + pid_bh * Tq, DELTA + pid_bh * Tq,
                          stride_qt, stride_qd, stride_dt, stride_dd, Tq, qk_scale,
                          False, BLOCK_M, BLOCK_D, HEAD_DIM, CHECK_D, UPCAST, DOT_PREC)
    # Keys before `start` get no gradient. The loops did not mask them (P = exp(S - L) is element-wise, so their
    # rows of dK and dV never mix with the others): zero those rows here, once.
    real = offs_n >= start
    dk = tl.where(real[:, None], dk * sm_scale, 0.0)  # dK = scale dS^T Q
    dv = tl.where(real[:, None], dv, 0.0)
    g_off = b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :] * stride_gd
    _store_tile(DK + g_off, dk, n_ok, d_ok, CHECK_D)
    _store_tile(DV + g_off, dv, n_ok, d_ok, CHECK_D)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, qpos, start, lo, hi,
               k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, Tk, qk_scale,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               CHECK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi); MASKED as in `_attend_blocks`."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_off = tl.arange(0, BLOCK_N)[:, None] * stride_kt + offs_d[None, :] * stride_kd  # (BLOCK_N, BLOCK_D)
    v_off = tl.arange(0, BLOCK_N)[:, None] * stride_vt + offs_d[None, :] * stride_vd  # (BLOCK_N, BLOCK_D)
    k_blk = k_base + lo * stride_kt  # as in `_attend_blocks`: fixed offsets, moving scalar pointers
    v_blk = v_base + lo * stride_vt
    for _ in range(lo, hi, BLOCK_N):
        if MASKED:
            kv_ok = (offs_n < Tk)[:, None] & d_ok[None, :]
            k = tl.load(k_blk + k_off, mask=kv_ok, other=0.0)
            v = tl.load(v_blk + v_off, mask=kv_ok, other=0.0)
        elif CHECK_D:
            k = tl.load(k_blk + k_off, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_blk + v_off, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_blk + k_off)
            v = tl.load(v_blk + v_off)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N) base 2
        p = tl.exp2(s - lse2[:, None])  # P = exp(S - L)
        if MASKED:
            allowed = (offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] >= start)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # dP = dO V^T   (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # dS = P o (dP - Delta)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)  # dQ += dS K   (scale applied at the end)
        offs_n += BLOCK_N
        k_blk += BLOCK_N * stride_kt
        v_blk += BLOCK_N * stride_vt
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, START,
                        stride_qb, stride_qh, stride_qt, stride_qd,
                        stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd,
                        stride_db, stride_dh, stride_dt, stride_dd,
                        stride_gb, stride_gh, stride_gt, stride_gd,
                        H, Tq, Tk, sm_scale, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, CHECK_D: tl.constexpr, UPCAST: tl.constexpr,
                        DOT_PREC: tl.constexpr):
    """Grid (cdiv(Tq, BLOCK_M), B * H): dQ for one block of queries (same key-block walk as the forward)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start = tl.load(START + b)
    shift = Tk - Tq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   m_ok, d_ok, CHECK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :] * stride_dd,
                    m_ok, d_ok, CHECK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
    lse2 = tl.load(LSE + pid_bh * Tq + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634  # (BLOCK_M,)
    delta = tl.load(DELTA + pid_bh * Tq + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo = (start // BLOCK_N) * BLOCK_N
    hi = tl.minimum(Tk, shift + m0 + BLOCK_M)
    full_lo = tl.cdiv(start, BLOCK_N) * BLOCK_N
    full_hi = ((shift + m0 + 1) // BLOCK_N) * BLOCK_N
    qpos = shift + offs_m
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = _dq_blocks(dq, q, do, lse2, delta, qpos, start, lo, tl.minimum(hi, full_lo),
                    k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, Tk, qk_scale,
                    True, BLOCK_N, BLOCK_D, HEAD_DIM, CHECK_D, UPCAST, DOT_PREC)
    dq = _dq_blocks(dq, q, do, lse2, delta, qpos, start, tl.maximum(lo, full_lo), tl.minimum(hi, full_hi),
                    k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, Tk, qk_scale,
                    False, BLOCK_N, BLOCK_D, HEAD_DIM, CHECK_D, UPCAST, DOT_PREC)
    dq = _dq_blocks(dq, q, do, lse2, delta, qpos, start, tl.maximum(lo, tl.maximum(full_lo, full_hi)), hi,
                    k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, Tk, qk_scale,
                    True, BLOCK_N, BLOCK_D, HEAD_DIM, CHECK_D, UPCAST, DOT_PREC)
    _store_tile(DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                dq * sm_scale, m_ok, d_ok, CHECK_D)  # dQ = scale dS K


@triton.jit
def _attn_decode_kernel(Q, K, V, O_PART, LSE_PART, START,
                        stride_qb, stride_qh, stride_qt, stride_qd,
                        stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd,
                        H, Tq, Tk, qk_scale, keys_per_split, num_splits,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        CHECK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (num_splits, B * H): all Tq (<= BLOCK_M) queries of one (row, head) against one chunk of the cache,
    keys [split * keys_per_split, (split + 1) * keys_per_split). Writes O_s (fp32, normalised within the chunk) to
    O_PART (B * H, num_splits, BLOCK_M, BLOCK_D) and L_s (base 2; -inf: chunk saw no key) to LSE_PART."""
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start = tl.load(START + b)
    shift = Tk - Tq
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   offs_m < Tq, d_ok, CHECK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
    qpos = shift + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = tl.maximum(split * keys_per_split, (start // BLOCK_N) * BLOCK_N)  # keys_per_split: a multiple of BLOCK_N
    hi = tl.minimum((split + 1) * keys_per_split, tl.minimum(Tk, shift + BLOCK_M))
    full_lo = tl.cdiv(start, BLOCK_N) * BLOCK_N
    full_hi = ((shift + 1) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _attend_span(acc, m_i, l_i, q, qpos, start, lo, hi, full_lo, full_hi,
                                 K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                                 stride_kt, stride_kd, stride_vt, stride_vd, Tk, qk_scale,
                                 BLOCK_N, BLOCK_D, HEAD_DIM, CHECK_D, UPCAST, DOT_PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    part = pid_bh * num_splits + split
    tl.store(O_PART + (part * BLOCK_M + offs_m[:, None]) * BLOCK_D + offs_d[None, :], acc / l_safe[:, None])
    tl.store(LSE_PART + part * BLOCK_M + offs_m, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)))


@triton.jit
def _attn_combine_kernel(O_PART, LSE_PART, O,
                         stride_ob, stride_oh, stride_ot, stride_od,
                         H, Tq, num_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         CHECK_D: tl.constexpr):
    """Grid (B * H,): merge the chunks, L = log sum_s exp(L_s), O = sum_s exp(L_s - L) O_s, with the same running-max
    recurrence as the forward (one chunk is one "block"). All chunks empty (a padding query) -> O = 0."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, num_splits):
        part = pid_bh * num_splits + s
        lse_s = tl.load(LSE_PART + part * BLOCK_M + offs_m)  # (BLOCK_M,) base 2
        o_s = tl.load(O_PART + (part * BLOCK_M + offs_m[:, None]) * BLOCK_D + offs_d[None, :])  # (BLOCK_M, BLOCK_D)
        m_new = tl.maximum(m_i, lse_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        w = tl.exp2(lse_s - m_ref)  # this chunk's share, up to the common factor exp(m')
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    _store_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                o, offs_m < Tq, offs_d < HEAD_DIM, CHECK_D)


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations: plain functions of the problem (no autotuning, no device queries at import time).

MAX_HEAD_DIM = 256
DECODE_MAX_QUERIES = 16  # Tq up to this (and Tq < Tk, no gradient) goes to the split-KV decode kernels


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


# Without a GPU to ask (none at import, none in CI), the configs below were picked from what Triton's compiler reports
# for A100 (sm_80) and H100/H200 (sm_90) on a CPU: `python -m bench.compile --sweep fwd` (dkdv, dq, decode; and
# fwd-fp32, ...) compiles a grid of candidates per dtype and padded head dim BLOCK_D and applies one rule
# (bench/compile.py `picks`): no spill and at most 240 registers per thread on both targets (15 under the cap, room for
# another Triton version's code), then the largest block a program holds (the other is streamed past it, one load per
# held block), then the largest streamed block, then the most resident warps per SM (registers and shared memory
# decide occupancy), then the most pipeline stages. The comments give registers (sm_80-sm_90 range over the head dims
# of the row) and resident warps per SM on the worse target; results/compile.md has every launch's numbers.
# fp16 and bf16 share a row; BLOCK_D = 16 takes the 32 row. The 4-warp 128 x 64 tiles used before reached the
# 255-register cap and spilled (bf16 forward: sm_80 at head dim 64, both targets at 128); 8 warps halve each
# thread's share of the score and output tiles.
#                 BLOCK_D: (BLOCK_M, BLOCK_N, num_warps, num_stages)
_FWD = {"16-bit": {32: (128, 64, 8, 3),  # 126-128 registers, 16 warps/SM
                   64: (128, 64, 8, 3),  # 155-183, 8
                   128: (128, 32, 8, 3),  # 196-222, 8
                   256: (64, 16, 8, 3)},  # 182-217, 8
        "fp32": {32: (64, 32, 8, 1),  # 76-80, 24   (fp32 dots run on the FMA units from registers: small tiles)
                 64: (64, 32, 8, 2),  # 96-104, 16
                 128: (32, 16, 8, 2),  # 77-79, 24
                 256: (32, 16, 8, 2)}}  # 112-128, 16
_DKDV = {"16-bit": {32: (64, 128, 8, 2),  # 162-232, 8   (BLOCK_N keys held, BLOCK_M queries streamed)
                    64: (32, 128, 8, 3),  # 182-191, 8
                    128: (32, 64, 8, 3),  # 202-232, 8
                    256: (32, 32, 8, 3)},  # 182-207, 8
         "fp32": {32: (32, 64, 8, 2),  # 112-122, 16
                  64: (16, 64, 8, 2),  # 102-128, 16
                  128: (16, 64, 8, 2),  # 163-186, 8
                  256: (16, 32, 8, 2)}}  # 178-182, 8
_DQ = {"16-bit": {32: (128, 64, 8, 3),  # 178-191, 8   (BLOCK_M queries held, BLOCK_N keys streamed)
                  64: (128, 64, 8, 3),  # 180-198, 8
                  128: (128, 32, 8, 3),  # 200-221, 8
                  256: (32, 32, 4, 2)},  # 178-240, 8
       "fp32": {32: (64, 32, 8, 2),  # 80-94, 16
                64: (64, 32, 8, 2),  # 92-124, 16
                128: (32, 16, 8, 1),  # 76-78, 24
                256: (32, 16, 8, 2)}}  # 128-147, 8
_DECODE = {"16-bit": {32: (128, 8, 2),  # 70-80, 24   BLOCK_D: (BLOCK_N, num_warps, num_stages)
                      64: (128, 8, 3),  # 94-96, 16
                      128: (128, 8, 3),  # 171-178, 8
                      256: (128, 8, 2)},  # 174-182, 8
           "fp32": {32: (64, 8, 2),  # 54-71, 24
                    64: (64, 8, 2),  # 62-70, 24
                    128: (64, 8, 2),  # 102-128, 16
                    256: (32, 8, 1)}}  # 106-112, 16


def _row(table, head_dim, dtype):
    return table["fp32" if dtype == torch.float32 else "16-bit"][max(32, _block_d(head_dim))]


def fwd_config(head_dim, dtype):
    """Block sizes for the forward: BLOCK_M queries per program, BLOCK_N keys per step (see _FWD for how they were
    picked). Under the interpreter one small config of unequal blocks, so that tests with T ~ 100 cross several."""
    if INTERPRETED:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    m, n, warps, stages = _row(_FWD, head_dim, dtype)
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


def bwd_config(head_dim, dtype):
    """Block sizes for the two backward passes: dK/dV (BLOCK_N keys held, BLOCK_M queries streamed) and dQ (BLOCK_M
    queries held, BLOCK_N keys streamed; the Delta pre-pass takes its BLOCK_M). Picked as _FWD's."""
    if INTERPRETED:
        return dict(dkdv=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
                    dq=dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1))
    names = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    return dict(dkdv=dict(zip(names, _row(_DKDV, head_dim, dtype))), dq=dict(zip(names, _row(_DQ, head_dim, dtype))))


def decode_config(head_dim, dtype):
    """Block sizes for decode: BLOCK_N keys per step; the queries of a row fit one BLOCK_M = 16 tile. Picked as
    _FWD's, over the split-KV kernel and the forward kernel it uses when there is one chunk."""
    if INTERPRETED:
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    n, warps, stages = _row(_DECODE, head_dim, dtype)
    return dict(BLOCK_N=n, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(batch_heads, cache_len, block_n, device):
    """How many chunks to split the cache into: enough programs for ~4 per multiprocessor, but at least 4 key
    blocks of work per chunk (a chunk also costs a partial write and a share of the combine). Under the interpreter
    (pretending 4 multiprocessors) one block per chunk, so that tiny tests take the split path."""
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        min_blocks = 4
    else:
        sms, min_blocks = 4, 1
    want = triton.cdiv(4 * sms, batch_heads)
    most = max(1, triton.cdiv(cache_len, min_blocks * block_n))
    return max(1, min(want, most))


def _split_plan(cache_len, num_splits, block_n):
    """Chunks of a whole number of key blocks, and no empty trailing chunk: (keys_per_split, num_splits)."""
    keys_per_split = triton.cdiv(triton.cdiv(cache_len, num_splits), block_n) * block_n
    return keys_per_split, triton.cdiv(cache_len, keys_per_split)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: check shapes, dtypes and devices with one-line errors, allocate outputs, launch.

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(q):
    """Whether the kernels take queries like q (dtype and head dim); the seam falls back to PyTorch otherwise."""
    return q.dtype in _DTYPES and q.shape[-1] <= MAX_HEAD_DIM


def _check_qkv(q, k, v, start):
    """Validate the inputs of every entry point; returns (B, H, Tq, Tk, D)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D tensor (B, H, T, D), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"attention: {name} has dtype {x.dtype}; supported: float32, float16, bfloat16")
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"attention: shapes do not match: q {tuple(q.shape)} (B, H, Tq, D), k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)} must both be (B, H, Tk, D)")
    if Tq > Tk:
        raise ValueError(f"attention: more queries than keys (Tq={Tq} > Tk={Tk}); queries are the last Tq positions")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {D} > {MAX_HEAD_DIM} is not supported by the Triton kernels")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if start is not None:
        if not isinstance(start, torch.Tensor) or start.shape != (B,) or start.dtype.is_floating_point:
            raise ValueError(f"attention: start must be an integer tensor of shape ({B},), got "
                             f"{(start.dtype, tuple(start.shape)) if isinstance(start, torch.Tensor) else start!r}")
        if start.device != q.device:
            raise ValueError(f"attention: start is on {start.device}, q on {q.device}")
    if not HAVE_TRITON:
        raise RuntimeError("attention: Triton is not installed; use NANORLHF_KERNELS=torch (the PyTorch path)")
    if q.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("attention: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "kernels/attention.py is imported (CPU interpreter)")
    return B, H, Tq, Tk, D


def _start_i32(start, B, Tk, device):
    """start as the kernels read it: int32 in [0, Tk] (start >= Tk: the whole row is padding)."""
    if start is None:
        return torch.zeros(B, dtype=torch.int32, device=device)
    return start.clamp(0, Tk).to(torch.int32)


def _common(q, scale):
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    upcast = INTERPRETED and q.dtype == torch.bfloat16
    return dict(HEAD_DIM=D, BLOCK_D=_block_d(D), CHECK_D=_block_d(D) != D, UPCAST=upcast,
                DOT_PREC="ieee" if q.dtype == torch.float32 or upcast else "tf32"), scale


def attention_forward(q, k, v, start=None, scale=None):
    """Flash forward: q (B, H, Tq, D), k/v (B, H, Tk, D) -> O (B, H, Tq, D) in q's dtype, and the natural-log
    log-sum-exp L (B, H, Tq) fp32 of each query's allowed scores (+inf where a query has none)."""
    B, H, Tq, Tk, D = _check_qkv(q, k, v, start)
    consts, scale = _common(q, scale)
    start32 = _start_i32(start, B, Tk, q.device)
    o = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)  # (B, H, Tq, D)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)  # (B, H, Tq)
    if B * H * Tq == 0:
        return o, lse
    cfg = fwd_config(D, q.dtype)
    grid = (triton.cdiv(Tq, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](q, k, v, o, lse, start32, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                           H, Tq, Tk, scale * 1.4426950408889634, **consts, **cfg)
    return o, lse


def attention_backward(do, q, k, v, o, lse, start=None, scale=None, needs=(True, True, True)):
    """Flash backward: the gradients (dq, dk, dv) of O = attention(q, k, v, start) given dO (any strides), from the
    forward's O and L. Entries of `needs` that are False come back as None (their pass is skipped)."""
    B, H, Tq, Tk, D = _check_qkv(q, k, v, start)
    if do.shape != q.shape:
        raise ValueError(f"attention backward: grad_output has shape {tuple(do.shape)}, expected {tuple(q.shape)}")
    consts, scale = _common(q, scale)
    start32 = _start_i32(start, B, Tk, q.device)
    do = do.to(q.dtype)
    cfg = bwd_config(D, q.dtype)
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)  # (B, H, Tq) = rowsum(dO o O)
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format) if needs[0] else None  # (B, H, Tq, D)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format) if needs[1] or needs[2] else None
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format) if needs[1] or needs[2] else None
    if B * H * Tq == 0:
        return dq, (dk if needs[1] else None), (dv if needs[2] else None)
    bm = cfg["dq"]["BLOCK_M"]
    _attn_bwd_delta_kernel[(triton.cdiv(Tq, bm), B * H)](  # 8 warps: 28-76 registers, no spill (4 spilled once)
        o, do, delta, *o.stride(), *do.stride(), H, Tq,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_D=consts["BLOCK_D"], CHECK_D=consts["CHECK_D"], num_warps=8)
    args = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    if dk is not None:
        c = cfg["dkdv"]
        _attn_bwd_dkdv_kernel[(triton.cdiv(Tk, c["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, start32, *args, *dk.stride(),
            H, Tq, Tk, scale, scale * 1.4426950408889634, **consts, **c)
    if dq is not None:
        c = cfg["dq"]
        _attn_bwd_dq_kernel[(triton.cdiv(Tq, c["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, start32, *args, *dq.stride(),
            H, Tq, Tk, scale, scale * 1.4426950408889634, **consts, **c)
    return dq, (dk if needs[1] else None), (dv if needs[2] else None)


def decode_attention(q, k, v, start=None, scale=None, num_splits=None):
    """Split-KV decode: q (B, H, Tq, D) with Tq <= 16 new queries at the last Tq positions of the cache k/v
    (B, H, Tk, D) (any strides: a view of a preallocated cache is fine) -> (B, H, Tq, D). No gradient.
    num_splits: chunks of the cache (None: enough to fill the GPU, see `decode_num_splits`)."""
    B, H, Tq, Tk, D = _check_qkv(q, k, v, start)
    if Tq > DECODE_MAX_QUERIES:
        raise ValueError(f"decode_attention: at most {DECODE_MAX_QUERIES} queries per row, got {Tq}")
    consts, scale = _common(q, scale)
    start32 = _start_i32(start, B, Tk, q.device)
    cfg = decode_config(D, q.dtype)
    o = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)  # (B, H, Tq, D)
    if B * H * Tq == 0:
        return o
    bn = cfg["BLOCK_N"]
    if num_splits is None:
        num_splits = decode_num_splits(B * H, Tk, bn, q.device)
    keys_per_split, num_splits = _split_plan(Tk, num_splits, bn)
    if num_splits == 1:  # nothing to combine: the forward kernel with one 16-query block is the same computation
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
        _attn_fwd_kernel[(1, B * H)](q, k, v, o, lse, start32, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                                     H, Tq, Tk, scale * 1.4426950408889634, **consts, BLOCK_M=16, **cfg)
        return o
    bm, bd = 16, consts["BLOCK_D"]
    o_part = torch.empty(B * H, num_splits, bm, bd, dtype=torch.float32, device=q.device)  # per-chunk O_s
    lse_part = torch.empty(B * H, num_splits, bm, dtype=torch.float32, device=q.device)  # per-chunk L_s (base 2)
    _attn_decode_kernel[(num_splits, B * H)](q, k, v, o_part, lse_part, start32,
                                             *q.stride(), *k.stride(), *v.stride(),
                                             H, Tq, Tk, scale * 1.4426950408889634, keys_per_split, num_splits,
                                             **consts, BLOCK_M=bm, **cfg)
    _attn_combine_kernel[(B * H,)](o_part, lse_part, o, *o.stride(), H, Tq, num_splits,
                                   HEAD_DIM=D, BLOCK_M=bm, BLOCK_D=bd, CHECK_D=consts["CHECK_D"], num_warps=4)
    return o


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public entry point.

class FlashAttention(torch.autograd.Function):
    """O = attention(q, k, v, start) with the flash forward and the deterministic two-pass flash backward."""

    @staticmethod
    def forward(ctx, q, k, v, start=None, scale=None):
        o, lse = attention_forward(q, k, v, start, scale)
        ctx.save_for_backward(q, k, v, o, lse, start)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, start = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, start, ctx.scale, needs=ctx.needs_input_grad[:3])
        return dq, dk, dv, None, None


def attention(q, k, v, start=None, scale=None):
    """Causal attention with left-padding offsets through the Triton kernels; the math is the module docstring's.

    q (B, H, Tq, D), k and v (B, H, Tk, D) with Tq <= Tk (any strides), start (B,) int or None -> (B, H, Tq, D).
    fp32 / fp16 / bf16; any D <= 256 (tiles padded to a power of two). A few new queries against a longer cache
    (Tq <= 16, Tq < Tk) with no gradient needed take the split-KV decode kernels; everything else the flash
    forward, differentiable through `FlashAttention`.
    """
    _check_qkv(q, k, v, start)
    Tq, Tk = q.shape[2], k.shape[2]
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if Tq < Tk and Tq <= DECODE_MAX_QUERIES and not needs_grad:
        return decode_attention(q, k, v, start, scale)
    return FlashAttention.apply(q, k, v, start, scale)
