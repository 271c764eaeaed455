"""kernels/logprobs.py and the seam nanorlhf.ops.token_logprobs (its triton, torch and reference paths).

Reference tests run everywhere; kernel tests need Triton (on CPU they run in its interpreter, so shapes stay small).
Outputs and gradients are judged against the plain PyTorch spec (log_softmax + gather, autograd) or
torch.distributions, and the hand-written backward by float64 gradcheck; the seam tests also check that the Triton
and PyTorch paths agree.
"""

import pytest
import torch

from kernels import logprobs as L
from kernels._triton import HAVE_TRITON
from nanorlhf import ops

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed: kernel tests skipped")


def _logits(N, V, seed, dtype=torch.float32, extremes=True):
    """Random logits with the hard cases: +-1e4 entries, -inf entries, a row that is -inf but for a few entries."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g) * 3
    if extremes:
        z[1, 5] = 1e4  # one huge logit: the row is one-hot
        z[2, :] = -1e4
        z[2, 7] = 1e4
        z[3, : V // 2] = float("-inf")  # half the vocabulary impossible
        z[4, :] = float("-inf")
        z[4, :3] = torch.tensor([0.5, -0.25, 2.0])  # all but three impossible
    return z.to(dtype)


def _targets(z, seed):
    """Targets with finite logits (a sampled token never has logit -inf)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, z.shape[1], (z.shape[0],), generator=g)
    bad = ~torch.isfinite(z.float().gather(1, y[:, None]).squeeze(1))
    y[bad] = z.float()[bad].argmax(1)
    return y


def _loss(out, g):
    """sum_n g_logp logp + g_H H + g_KL KL over the outputs present (output gradients != 1)."""
    total = (out.logp * g[0]).sum()
    if out.entropy is not None:
        total = total + (out.entropy * g[1]).sum()
    if out.kl is not None:
        total = total + (out.kl * g[2]).sum()
    return total


def _grads(N, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=g) * 2 for _ in range(3)]


def _spec(logits, y, T, g, with_entropy=True, **kw):
    """Outputs and d loss / d logits of the plain PyTorch spec, in fp32."""
    z = logits.detach().float().requires_grad_()
    out = L.reference_logprobs(z, y, T, **kw)
    out = out if with_entropy else out._replace(entropy=None)
    _loss(out, g).backward()
    return out, z.grad


def _close(a, b, atol, rtol=0.0):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------------
# The spec itself, and the hand-written maths (the PyTorch path).

def test_reference_matches_torch_distributions():
    N, V, T = 6, 13, 0.7
    g = torch.Generator().manual_seed(13)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    zr = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (N,), generator=g)
    mask = torch.tensor([True, True, False, True, True, False])
    out = L.reference_logprobs(z, y, T, mask=mask, ref_logits=zr)
    p, q = torch.distributions.Categorical(logits=z / T), torch.distributions.Categorical(logits=zr / T)
    zero = torch.zeros(N, dtype=torch.float64)
    _close(out.logp, torch.where(mask, p.log_prob(y), zero), 1e-5)  # the spec computes in fp32
    _close(out.entropy, torch.where(mask, p.entropy(), zero), 1e-5)
    _close(out.kl, torch.where(mask, torch.distributions.kl_divergence(p, q), zero), 1e-5)
    logp, ent = L.reference(z, y, T)  # the original two-output spec
    _close(logp, p.log_prob(y), 1e-5)
    _close(ent, p.entropy(), 1e-5)


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.5, -9.0])
    mask = torch.tensor([True, True, True, False])
    d = (logp - ref).detach()
    _close(L.kl_estimate(logp, ref, "k1"), d, 1e-7)
    _close(L.kl_estimate(logp, ref, "k2"), 0.5 * d**2, 1e-7)
    k3 = L.kl_estimate(logp, ref, "k3", mask)
    _close(k3, torch.where(mask, torch.exp(-d) - 1 + d, 0.0), 1e-6)
    assert (k3 >= 0).all()
    k3.sum().backward()
    _close(logp.grad, torch.where(mask, 1 - torch.exp(-d), 0.0), 1e-6)  # d k3 / d logp = 1 - exp(-d)
    with pytest.raises(ValueError, match="kl_estimator"):
        L.kl_estimate(logp, ref, "k4")


@pytest.mark.parametrize("kw", [dict(), dict(with_entropy=True), dict(with_entropy=True, full_kl=True),
                                dict(full_kl=True), dict(ref_logprobs=True)])
def test_gradcheck_hand_written_backward(kw):
    """float64 gradcheck of the hand-written backward (reference_backward via the torch backend): any mix of
    outputs, a masked row, temperature != 1, -inf logits."""
    N, V, T = 4, 7, 0.8
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, V, generator=g, dtype=torch.float64)
    z[2, 1] = float("-inf")
    zr = torch.randn(N, V, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 6, 2])
    mask = torch.tensor([True, False, True, True])
    ref_lp = torch.randn(N, generator=g, dtype=torch.float64) - 2

    def f(x):
        out = L.logprobs(x, y, T, mask=mask, with_entropy=kw.get("with_entropy", False), backend="torch",
                         ref_logits=zr if kw.get("full_kl") else None,
                         ref_logprobs=ref_lp if kw.get("ref_logprobs") else None)
        return tuple(o for o in out if o is not None)

    assert torch.autograd.gradcheck(f, (z.requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["logp-keep", "logp-recompute", "entropy-keep", "entropy-recompute", "full-kl"])
def test_gradcheck_fused_torch_path(monkeypatch, mode):
    """float64 gradcheck of the chunked LM-head path through hidden and weight, several row and column blocks: the
    merge of partial sums across column blocks; the backward from kept blocks (keep mode) or from recomputed logits
    (the shift, and log|g| for logp only, folded into the matmul; the sign trick); the full KL."""
    monkeypatch.setitem(L.MIN_BLOCK_COLS, "torch", 4)
    N, V, d, T = 5, 11, 3, 0.9
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64)
    rh, rw = torch.randn(N, 2, generator=g, dtype=torch.float64), torch.randn(V, 2, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 10, 4, 4, 7])
    gy = torch.tensor([1.5, 0.0, -2.0, 0.7, -0.3], dtype=torch.float64)  # a zero and negative output gradients

    def f(h, w):
        keep_bytes = 0 if mode.endswith("recompute") else 1 << 20
        if mode.startswith("logp"):
            return (L.fused_logprobs(h, w, y, T, backend="torch", chunk_bytes=64, keep_bytes=keep_bytes).logp * gy,)
        if mode.startswith("entropy"):
            out = L.fused_logprobs(h, w, y, T, with_entropy=True, backend="torch", chunk_bytes=64,
                                   keep_bytes=keep_bytes)
            return out.logp * gy, out.entropy
        out = L.fused_logprobs(h, w, y, T, with_entropy=True, ref_hidden=rh, ref_weight=rw, backend="torch",
                               chunk_bytes=64)
        return out.logp, out.entropy, out.kl

    assert torch.autograd.gradcheck(f, (h.requires_grad_(), w.requires_grad_()), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_torch_path_matches_spec_with_extremes(T):
    """The hand-written forward/backward against autograd on the spec: +-1e4, -inf, masks, every output, fp32."""
    N, V = 9, 301
    z, zr = _logits(N, V, 0), _logits(N, V, 1)
    y = _targets(z, 0)
    mask = torch.ones(N, dtype=torch.bool)
    mask[6] = False
    g = _grads(N, 0)
    for kw in (dict(), dict(ref_logits=zr)):
        x = z.clone().requires_grad_()
        out = L.logprobs(x, y, T, mask=mask, with_entropy=True, backend="torch", **kw)
        _loss(out, g).backward()
        ref, dz = _spec(z, y, T, g, mask=mask, **kw)
        assert torch.isfinite(out.entropy).all() and torch.isfinite(x.grad).all()
        _close(out.logp, ref.logp, 2e-4, 1e-6)
        _close(out.entropy, ref.entropy, 2e-4, 1e-6)
        if out.kl is not None:
            _close(out.kl, ref.kl, 2e-3, 1e-6)
        _close(x.grad, dz, 1e-5, 1e-4)


def _naive_head(h, w, y, T, mask=None, ref_hidden=None, ref_weight=None, ref_logprobs=None):
    """The PyTorch way: the whole (N, V) logits, then the spec."""
    return L.reference_lm_head(h, w, y, T, mask=mask, ref_hidden=ref_hidden, ref_weight=ref_weight,
                               ref_logprobs=ref_logprobs)


@pytest.mark.parametrize("case", ["logp-keep", "logp-recompute", "entropy+mask", "full-kl", "k3"])
def test_fused_torch_path_matches_naive(case):
    """The CPU path of the seam (chunked) against hidden @ W.T + log_softmax, gradients to fp32 tolerance, with
    several row and column blocks (a 64 KiB block budget); logp-only calls with and without keep mode."""
    N, V, d, T = 70, 1271, 24, 0.8
    g = torch.Generator().manual_seed(2)
    h = torch.randn(N, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.4
    y = torch.randint(0, V, (N,), generator=g)
    kw = {}
    if case == "entropy+mask":
        kw["mask"] = torch.rand(N, generator=g) > 0.3
    if case == "full-kl":
        kw.update(ref_hidden=torch.randn(N, 8, generator=g), ref_weight=torch.randn(V, 8, generator=g) * 0.5)
    if case == "k3":
        kw["ref_logprobs"] = L.reference_lm_head(h, w, y, T).logp + 0.3 * torch.randn(N, generator=g)  # ref ~ policy
    grads = _grads(N, 3)
    logp_only = case.startswith("logp")
    if case == "logp-recompute":
        kw["keep_bytes"] = 0
    outs = {}
    for name in ("ours", "naive"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if name == "ours":
            out = L.fused_logprobs(hh, ww, y, T, with_entropy=not logp_only, backend="torch", chunk_bytes=64 << 10,
                                   **kw)
        else:
            out = _naive_head(hh, ww, y, T, **{k: v for k, v in kw.items() if k != "keep_bytes"})
            if logp_only:
                out = out._replace(entropy=None)
        _loss(out, grads).backward()
        outs[name] = (out, hh.grad, ww.grad)
    (o, dh, dw), (r, rdh, rdw) = outs["ours"], outs["naive"]
    _close(o.logp, r.logp, 1e-4, 1e-5)
    if o.entropy is not None:
        _close(o.entropy, r.entropy, 1e-4, 1e-5)
    if o.kl is not None:
        _close(o.kl, r.kl, 1e-3, 1e-4)
    _close(dh, rdh, 1e-5 * rdh.abs().max().item(), 1e-4)
    _close(dw, rdw, 1e-5 * rdw.abs().max().item(), 1e-4)
    if "mask" in kw:
        assert (o.logp[~kw["mask"]] == 0).all() and (dh[~kw["mask"]] == 0).all()


def test_seam_signature_and_torch_path(monkeypatch):
    """token_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False) keeps working, positional
    arguments included: fp32 (N,) outputs equal to the spec, gradients to hidden and weight."""
    monkeypatch.setenv("NANORLHF_KERNELS", "torch")
    g = torch.Generator().manual_seed(4)
    h = torch.randn(15, 16, generator=g, requires_grad=True)
    w = (torch.randn(300, 16, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, 300, (15,), generator=g)
    logp = ops.token_logprobs(h, w, y)
    assert logp.shape == (15,) and logp.dtype == torch.float32
    logp2, ent = ops.token_logprobs(h, w, y, 0.7, True)
    ref = L.reference_logprobs(h.detach() @ w.detach().t(), y, 0.7)
    _close(logp2, ref.logp, 1e-5)
    _close(ent, ref.entropy, 1e-5)
    (logp2.sum() + ent.sum()).backward()
    assert h.grad.shape == h.shape and w.grad.abs().sum() > 0


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_seam_reference_path_matches_torch_path(monkeypatch, with_entropy, autocast):
    """NANORLHF_KERNELS=reference (hidden @ W.T, log_softmax, gather) against =torch (the chunked LM-head path):
    outputs and gradients to hidden and weight, at temperature 0.7, with output gradients != 1; under bf16 autocast
    both take the same bf16-rounded operands and compute in fp32."""
    calls = []
    real = L.reference
    monkeypatch.setattr(L, "reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(40, 24, generator=g), torch.randn(1271, 24, generator=g) * 0.4
    y = torch.randint(0, 1271, (40,), generator=g)
    grads = _grads(40, 6)
    runs = {}
    for mode in ("torch", "reference"):
        monkeypatch.setenv("NANORLHF_KERNELS", mode)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = ops.token_logprobs(hh, ww, y, 0.7, with_entropy)
        logp, ent = out if with_entropy else (out, None)
        assert logp.dtype == torch.float32
        _loss(L.LogprobOutputs(logp, ent), grads).backward()
        runs[mode] = (logp, ent, hh.grad, ww.grad)
    assert calls, "NANORLHF_KERNELS=reference must run the spec, kernels/logprobs.py: reference"
    (lp, ent, dh, dw), (rlp, rent, rdh, rdw) = runs["reference"], runs["torch"]
    _close(lp, rlp, 1e-5, 1e-5)
    if with_entropy:
        _close(ent, rent, 1e-5, 1e-5)
    tol = 8e-3 if autocast else 1e-5  # autocast: the gradients reach the fp32 leaves through bf16 (one ulp apart)
    _close(dh, rdh, tol * rdh.abs().max().item(), 1e-4)
    _close(dw, rdw, tol * rdw.abs().max().item(), 1e-4)


def test_kernel_module_extras_on_the_torch_path():
    """What PPO may ask of kernels/logprobs.py beyond the seam: the k1 estimator with a mask, the full KL (0 for a
    model against itself), and log-probs from logits already in memory."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(15, 16, generator=g, requires_grad=True)
    w = (torch.randn(300, 16, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, 300, (15,), generator=g)
    mask = y > 100
    lp = L.fused_logprobs(h, w, y, mask=mask, backend="torch").logp
    assert (lp[~mask] == 0).all() and torch.equal(lp[mask], L.fused_logprobs(h[mask], w, y[mask], backend="torch").logp)
    ref_lp = lp.detach() - 0.1
    st = L.fused_logprobs(h, w, y, mask=mask, with_entropy=True, ref_logprobs=ref_lp, kl_estimator="k1",
                          backend="torch")
    _close(st.kl, torch.where(mask, st.logp - ref_lp, 0.0), 1e-6)
    st = L.fused_logprobs(h, w, y, ref_hidden=h.detach(), ref_weight=w.detach(), backend="torch")
    _close(st.kl, torch.zeros(15), 1e-5)  # KL of a model to itself
    out = L.logprobs(h.detach() @ w.detach().t(), y, with_entropy=True, backend="torch")
    _close(out.logp, L.fused_logprobs(h, w, y, backend="torch").logp.detach(), 1e-5)


def test_errors_are_clear():
    z = torch.randn(4, 10)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="contiguous along the vocabulary"):
        L.logprobs(z.t().contiguous().t(), y, backend="torch")
    with pytest.raises(ValueError, match="targets must have shape"):
        L.logprobs(z, y[:3], backend="torch")
    with pytest.raises(TypeError, match="integer"):
        L.logprobs(z, y.float(), backend="torch")
    with pytest.raises(ValueError, match="not both"):
        L.logprobs(z, y, ref_logits=z, ref_logprobs=y.float(), backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        L.logprobs(z, y, 0.0, backend="torch")
    with pytest.raises(TypeError, match="share a float dtype"):
        L.fused_logprobs(torch.randn(4, 3), torch.randn(10, 3).double(), y, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        L.logprobs(z, y, backend="cuda")


# ----------------------------------------------------------------------------------------------------------------
# The Triton kernels: on the GPU if there is one, else in the interpreter on CPU tensors.

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(*xs):
    return [None if x is None else x.to(DEVICE) for x in xs]


CASES = {  # name: (N, V, T, mask?, outputs)
    "fp32-V1271-entropy": (37, 1271, 1.0, False, "entropy"),
    "fp32-V1271-T0.7-mask-fullkl": (37, 1271, 0.7, True, "full-kl"),
    "fp32-V50257-logp": (37, 50257, 1.0, False, "logp"),
}


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_spec_fp32(case):
    N, V, T, use_mask, outputs = CASES[case]
    z = _logits(N, V, 5)
    zr = _logits(N, V, 6) if outputs == "full-kl" else None
    y = _targets(z, 5)
    mask = (torch.arange(N) % 4 != 1) if use_mask else None
    z, zr, y, mask, *g = _dev(z, zr, y, mask, *_grads(N, 5))
    x = z.clone().requires_grad_()
    out = L.logprobs(x, y, T, mask=mask, with_entropy=outputs != "logp", ref_logits=zr)
    _loss(out, g).backward()
    ref, dz = _spec(z, y, T, g, outputs != "logp", mask=mask, ref_logits=zr)
    assert torch.isfinite(out.logp).all() and torch.isfinite(x.grad).all()
    _close(out.logp, ref.logp, 2e-4, 1e-6)
    if outputs != "logp":
        assert torch.isfinite(out.entropy).all()
        _close(out.entropy, ref.entropy, 2e-4, 1e-6)
    if outputs == "full-kl":
        _close(out.kl, ref.kl, 2e-3, 1e-6)
    _close(x.grad, dz, 1e-5, 1e-4)
    if mask is not None:
        assert (out.logp[~mask] == 0).all() and (x.grad[~mask] == 0).all()


@needs_triton
def test_kernel_online_lse_across_blocks(monkeypatch):
    """256-wide blocks: the forward's online log-sum-exp (with the entropy and KL sums rescaled as the running maxima
    grow) and the backward's grid of column blocks, on rows of 1,271 (5 blocks, the last one partial)."""
    monkeypatch.setattr(L, "forward_config", lambda V: (256, 4))
    monkeypatch.setattr(L, "backward_config", lambda V: (256, 4))
    N, V, T = 9, 1271, 0.8
    z, zr = _logits(N, V, 14), _logits(N, V, 15)
    z[0] = torch.linspace(-5, 25, V)  # the max grows in every block
    zr[0] = torch.linspace(20, -5, V)
    y = _targets(z, 14)
    mask = torch.arange(N) != 6
    z, zr, y, mask, *g = _dev(z, zr, y, mask, *_grads(N, 14))
    x = z.clone().requires_grad_()
    out = L.logprobs(x, y, T, mask=mask, with_entropy=True, ref_logits=zr)
    _loss(out, g).backward()
    ref, dz = _spec(z, y, T, g, mask=mask, ref_logits=zr)
    _close(out.logp, ref.logp, 2e-4, 1e-6)
    _close(out.entropy, ref.entropy, 2e-4, 1e-6)
    _close(out.kl, ref.kl, 2e-3, 1e-6)
    _close(x.grad, dz, 1e-5, 1e-4)


@needs_triton
@pytest.mark.parametrize("dtype,grad_tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
def test_kernel_low_precision(dtype, grad_tol):
    """fp16 / bf16 logits: loaded and cast to fp32 at once, so the outputs are as exact as from fp32; only the
    gradient, written in the logits' dtype, is rounded (looser tolerance)."""
    N, V, T = 21, 1271, 0.9
    z = _logits(N, V, 7, dtype)
    y = _targets(z, 7)
    mask = torch.arange(N) % 5 != 0
    z, y, mask, *g = _dev(z, y, mask, *_grads(N, 7))
    x = z.clone().requires_grad_()
    out = L.logprobs(x, y, T, mask=mask, with_entropy=True)
    _loss(out, g).backward()
    assert x.grad.dtype == dtype
    ref, dz = _spec(z, y, T, g, mask=mask)  # the spec on the same (rounded) logits, in fp32
    _close(out.logp, ref.logp, 2e-4, 1e-6)
    _close(out.entropy, ref.entropy, 2e-4, 1e-6)
    _close(x.grad, dz, grad_tol * dz.abs().max().item(), grad_tol)


@needs_triton
def test_kernel_masked_rows_are_not_read():
    """Padding rows may hold NaN and out-of-range targets: they give exactly 0 and a zero gradient."""
    N, V = 6, 300
    z = _logits(N, V, 8, extremes=False)
    mask = torch.tensor([True, False, True, False, True, True])
    z[~mask] = float("nan")
    y = _targets(z, 8)
    y[~mask] = -100  # e.g. an ignore index
    z, y, mask, *g = _dev(z, y, mask, *_grads(N, 8))
    x = z.clone().requires_grad_()
    out = L.logprobs(x, y, mask=mask, with_entropy=True)
    _loss(out, g).backward()
    assert (out.logp[~mask] == 0).all() and (out.entropy[~mask] == 0).all() and (x.grad[~mask] == 0).all()
    ref, dz = _spec(z.nan_to_num(0.0), y.clamp(min=0), 1.0, g, mask=mask)
    _close(out.logp, ref.logp, 1e-5)
    _close(x.grad, dz, 1e-5, 1e-4)
    bad = L.logprobs(z[:1], torch.tensor([V + 3], device=DEVICE)).logp  # a real row, target out of range: NaN
    assert torch.isnan(bad).all()


@needs_triton
def test_kernel_int64_offsets():
    """row * stride beyond 2^31: a strided view whose rows lie 2^30 + 64 elements apart (on CPU the storage is
    reserved, not touched). With int32 offsets the third row's address would wrap (a crash or wrong numbers)."""
    N, V, stride = 3, 64, 2**30 + 64
    base = torch.empty((N - 1) * stride + V, dtype=torch.float16, device=DEVICE)
    z = base.as_strided((N, V), (stride, 1))
    rows = _logits(N, V, 9, torch.float16, extremes=False)
    for i in range(N):
        z[i] = rows[i].to(DEVICE)
    rows, y, *g = _dev(rows, torch.tensor([3, 63, 17]), *_grads(N, 9))
    out = L.launch_forward(z, y, with_entropy=True)
    ref, dz = _spec(rows, y, 1.0, g)
    _close(out[0], ref.logp, 1e-5)
    _close(out[1], ref.entropy, 1e-5)
    grad = L.launch_backward(z, y, out[3], grad_logp=g[0], grad_entropy=g[1], entropy=out[1])
    _close(grad, dz, 2e-3 * dz.abs().max().item(), 2e-3)


@needs_triton
@pytest.mark.parametrize("case", ["fp32-entropy-mask", "fp32-fullkl", "bf16-logp"])
def test_fused_triton_matches_spec(case, monkeypatch):
    """The LM-head path with the Triton kernels on each block: 3 row blocks in the forward, 2 x 2 blocks in the
    backward (a 64 KiB budget), gradients to hidden and weight."""
    monkeypatch.setitem(L.MIN_BLOCK_COLS, "triton", 640)
    N, V, d, T = 24, 1271, 16, 0.8
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    g = torch.Generator().manual_seed(10)
    h = torch.randn(N, d, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V, d, generator=g) * 0.5).to(DEVICE, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    kw, with_entropy = {}, case != "bf16-logp"
    if "mask" in case:
        kw["mask"] = (torch.rand(N, generator=g) > 0.25).to(DEVICE)
    if "fullkl" in case:
        kw.update(ref_hidden=torch.randn(N, 8, generator=g).to(DEVICE),
                  ref_weight=(torch.randn(V, 8, generator=g) * 0.5).to(DEVICE))
    grads = _dev(*_grads(N, 11))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = L.fused_logprobs(hh, ww, y, T, with_entropy=with_entropy, backend="triton", chunk_bytes=64 << 10, **kw)
    _loss(out, grads).backward()
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    ref = L.reference_lm_head(h32, w32, y, T, **kw)
    _loss(ref if with_entropy else ref._replace(entropy=None), grads).backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: the logits themselves are rounded to bf16
    _close(out.logp, ref.logp, tol * 10, tol)
    if with_entropy:
        _close(out.entropy, ref.entropy, tol * 10, tol)
    if out.kl is not None:
        _close(out.kl, ref.kl, tol * 10, tol)
    _close(hh.grad, h32.grad, tol * h32.grad.abs().max().item(), tol)
    _close(ww.grad, w32.grad, tol * w32.grad.abs().max().item(), tol)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bf16_lm_head_keeps_logits_and_weight_grad_in_fp32(backend, monkeypatch):
    """bf16 hidden states at GPT-2's logit scale (|z| up to ~100, where bf16's spacing is 0.5): log pi comes from
    fp32 sums of the bf16 products, within 2e-3 nats of the fp64 spec of the same operands, where bf16-rounded
    logits are off by ~0.1; an fp32 weight gets an fp32 gradient, accumulated over 3 x 2 blocks."""
    monkeypatch.setitem(L.MIN_BLOCK_COLS, backend, 640)
    N, V, d = 24, 1271, 64
    g = torch.Generator().manual_seed(12)
    h = (torch.randn(N, d, generator=g) * 4).to(DEVICE, torch.bfloat16)  # (N, d)
    w = (torch.randn(V, d, generator=g) * 3).to(DEVICE)  # (V, d) fp32 master weight: |z| ~ 100
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    w_req = w.clone().requires_grad_()
    out = L.fused_logprobs(h, w_req, y, backend=backend, chunk_bytes=64 << 10)
    grad_logp = _dev(*_grads(N, 13))[0]
    (out.logp * grad_logp).sum().backward()
    z64 = (h.double() @ w.to(torch.bfloat16).double().t()).requires_grad_()  # (N, V) the products, exactly
    spec = torch.log_softmax(z64, -1).gather(1, y[:, None]).squeeze(1)  # (N,)
    (spec * grad_logp.double()).sum().backward()
    assert z64.abs().max() > 60
    assert (out.logp.double() - spec).abs().max() < 2e-3
    rounded = torch.log_softmax(z64.detach().to(torch.bfloat16).double(), -1).gather(1, y[:, None]).squeeze(1)
    assert (rounded - spec.detach()).abs().max() > 2e-2  # what bf16 logits would give: the error the fp32 sums avoid
    assert w_req.grad.dtype == torch.float32
    dw64 = z64.grad.t() @ h.double()  # (V, d) d loss / d W of the bf16-rounded W
    _close(w_req.grad, dw64, 1e-2 * dw64.abs().max().item())


@needs_triton
def test_seam_takes_the_triton_path(monkeypatch):
    """NANORLHF_KERNELS=triton sends token_logprobs through the kernels (counted), with the same answer."""
    calls = {"fwd": 0, "bwd": 0}
    real_fwd, real_bwd = L.launch_forward, L.launch_backward

    def fwd(*a, **k):
        calls["fwd"] += 1
        return real_fwd(*a, **k)

    def bwd(*a, **k):
        calls["bwd"] += 1
        return real_bwd(*a, **k)

    monkeypatch.setattr(L, "launch_forward", fwd)
    monkeypatch.setattr(L, "launch_backward", bwd)
    g = torch.Generator().manual_seed(12)
    h, w, y = _dev(torch.randn(8, 8, generator=g), torch.randn(200, 8, generator=g),
                   torch.randint(0, 200, (8,), generator=g))
    h, w = h.requires_grad_(), w.requires_grad_()
    monkeypatch.setenv("NANORLHF_KERNELS", "triton")
    logp, ent = ops.token_logprobs(h, w, y, 1.3, with_entropy=True)
    (logp.sum() - ent.sum()).backward()
    assert calls["fwd"] >= 1 and calls["bwd"] >= 1
    monkeypatch.setenv("NANORLHF_KERNELS", "torch")
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp2, ent2 = ops.token_logprobs(h2, w2, y, 1.3, with_entropy=True)
    (logp2.sum() - ent2.sum()).backward()
    _close(logp, logp2, 1e-5)
    _close(ent, ent2, 1e-5)
    _close(h.grad, h2.grad, 1e-5, 1e-4)
    _close(w.grad, w2.grad, 1e-5, 1e-4)


@needs_triton
def test_kernel_launcher_checks():
    z = torch.randn(4, 10, device=DEVICE)
    y = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous along the vocabulary"):
        L.launch_forward(z.t().contiguous().t(), y)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        L.launch_forward(z.double(), y)
    with pytest.raises(ValueError, match="ref_logits must have shape"):
        L.launch_forward(z, y, ref_logits=z[:, :5])
    with pytest.raises(TypeError, match="bool"):
        L.launch_forward(z, y, mask=torch.ones(4, device=DEVICE))
