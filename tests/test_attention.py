"""Attention: the seam's PyTorch and reference paths against each other (always), the Triton kernels against the
reference (with Triton).

Without a GPU the kernels run through Triton's interpreter (conftest.py sets TRITON_INTERPRET=1): seconds per launch,
so shapes are small. Every padded batch has a partly padded row and a fully padded one (start = T).
"""

import pytest
import torch

from kernels import attention as attn
from kernels._triton import HAVE_TRITON
from nanorlhf import ops
from nanorlhf.model import GPT, GPTConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (kernel tests need it)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are checked on a GPU only")

# (atol, rtol) per dtype: fp32 tight; fp16 rounds inputs, P and dS to 11 bits.
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 2e-2)}


def make(B, H, Tq, Tk, D, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(DEVICE, dtype).requires_grad_(grad)
    k = torch.randn(B, H, Tk, D, generator=g).to(DEVICE, dtype).requires_grad_(grad)
    v = torch.randn(B, H, Tk, D, generator=g).to(DEVICE, dtype).requires_grad_(grad)
    return q, k, v


def padded_start(B, Tk):
    """Row 0 unpadded; row 1 padded up to one before a multiple of 16 (every interpreter block size is a multiple
    of 16: the first real token is the last row of its block), or over a third when that does not fit; row 2 all
    padding; the rest random."""
    start = torch.randint(0, max(Tk, 1), (B,), generator=torch.Generator().manual_seed(1))
    start[0] = 0
    if B > 1:
        start[1] = (Tk // 3) // 16 * 16 + 15 if (Tk // 3) // 16 * 16 + 15 < Tk else Tk // 3
    if B > 2:
        start[2] = Tk
    return start.to(DEVICE)


def ref_grads(q, k, v, start, do):
    """Reference output and gradients, in fp32."""
    qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    o = attn.reference(qf, kf, vf, start)
    o.backward(do.float())
    return o.detach(), qf.grad, kf.grad, vf.grad


def close(x, ref, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(x.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch path of the seam (SDPA) against the reference: runs everywhere, Triton or not.

@pytest.mark.parametrize("Tq,Tk", [(1, 1), (17, 17), (1, 33), (4, 33), (33, 33)])
def test_seam_torch_path_matches_reference(monkeypatch, Tq, Tk):
    monkeypatch.setenv("NANORLHF_KERNELS", "torch")
    q, k, v = make(4, 2, Tq, Tk, 32)
    for start in (None, padded_start(4, Tk)):
        close(ops.attention(q, k, v, start), attn.reference(q, k, v, start), torch.float32, f"start={start}")


def test_reference_fully_padded_row_gives_zeros_and_finite_grads(monkeypatch):
    monkeypatch.setenv("NANORLHF_KERNELS", "torch")
    q, k, v = make(3, 2, 9, 9, 16, grad=True)
    start = torch.tensor([0, 4, 9], device=DEVICE)
    ref = attn.reference(q, k, v, start)
    assert torch.equal(ref[2], torch.zeros_like(ref[2])) and torch.equal(ref[1, :, :3], torch.zeros_like(ref[1, :, :3]))
    out = ops.attention(q, k, v, start)
    assert torch.equal(out[2], torch.zeros_like(out[2])), "the seam's torch path must give zeros for padding queries"
    out.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert torch.equal(k.grad[2], torch.zeros_like(k.grad[2])), "padding keys get no gradient"


@pytest.mark.parametrize("Tq,Tk", [(17, 17), (4, 33), (1, 33)])
def test_seam_reference_path_matches_torch_path(monkeypatch, Tq, Tk):
    """NANORLHF_KERNELS=reference (the spec) against =torch (SDPA with a mask): outputs and gradients, with left
    padding (a fully padded row included: its queries give zeros, its keys get no gradient)."""
    calls = []
    real = attn.reference
    monkeypatch.setattr(attn, "reference", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make(4, 2, Tq, Tk, 32, seed=Tq + Tk, grad=True)
    do = torch.randn(4, 2, Tq, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = {}
    for mode in ("torch", "reference"):
        monkeypatch.setenv("NANORLHF_KERNELS", mode)
        for start in (None, padded_start(4, Tk)):
            o = ops.attention(q, k, v, start)
            results[mode, start is None] = (o, *torch.autograd.grad(o, (q, k, v), do))
    assert len(calls) == 2, "NANORLHF_KERNELS=reference must run the spec, kernels/attention.py: reference"
    for padded in (False, True):
        for name, a, b in zip("O dQ dK dV".split(), results["reference", not padded], results["torch", not padded]):
            assert torch.isfinite(a).all(), f"{name}: the reference path gave NaN or inf"
            close(a, b, torch.float32, f"{name}, padded={padded}")
    o_ref, _, dk_ref, _ = results["reference", False]
    assert torch.equal(o_ref[2], torch.zeros_like(o_ref[2])) and torch.equal(dk_ref[2], torch.zeros_like(dk_ref[2]))


def test_reference_mode_runs_the_model_like_the_torch_mode(monkeypatch):
    """The whole model through the seams under NANORLHF_KERNELS=reference: a left-padded batch gives the log-probs
    and parameter gradients of =torch, to fp32 rounding (both seams: attention and token_logprobs)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=64, n_layer=2, n_head=2, n_embd=16)).to(DEVICE)
    idx = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(3)).to(DEVICE)  # (B, T)
    start = torch.tensor([0, 5, 13], device=DEVICE)  # (B,) first real token of each row
    real = torch.arange(1, 20, device=DEVICE)[None, :] > start[:, None]  # (B, T - 1) targets after the padding
    runs = {}
    for mode in ("torch", "reference"):
        monkeypatch.setenv("NANORLHF_KERNELS", mode)
        model.zero_grad()
        hidden = model(idx, start)  # (B, T, C)
        logp, ent = ops.token_logprobs(hidden[:, :-1][real], model.lm_head.weight, idx[:, 1:][real], 0.9, True)
        (ent.mean() - logp.mean()).backward()
        runs[mode] = [logp.detach(), ent.detach()] + [p.grad.clone() for p in model.parameters()]
    for i, (a, b) in enumerate(zip(runs["reference"], runs["torch"])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"output / gradient {i}: {m}")


def test_unknown_kernels_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NANORLHF_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto, triton, torch, reference"):
        ops.attention(*make(1, 1, 2, 2, 16))


def test_input_errors_are_one_line_value_errors():
    q, k, v = make(2, 2, 5, 5, 16)
    with pytest.raises(ValueError, match="more queries than keys"):
        attn.attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="share a dtype"):
        attn.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="4-D"):
        attn.attention(q[0], k, v)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        attn.attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="start must be an integer tensor"):
        attn.attention(q, k, v, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="head dim 320"):
        attn.attention(*make(1, 1, 2, 2, 320))


# ----------------------------------------------------------------------------------------------------------------
# The Triton kernels (interpreter on CPU).

@needs_triton
@pytest.mark.parametrize("T", [1, 17, 100, 129])
@pytest.mark.parametrize("D", [32, 64])
def test_forward_fp32_and_lse(T, D):
    q, k, v = make(3, 1, T, T, D, seed=T + D)
    start = padded_start(3, T)
    o, lse = attn.attention_forward(q, k, v, start)
    close(o, attn.reference(q, k, v, start), torch.float32, "O")
    assert torch.equal(o[2], torch.zeros_like(o[2])), "a fully padded row must give exact zeros"
    # L = logsumexp of each query's allowed scores (+inf where there is none)
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    pos = torch.arange(T, device=DEVICE)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, None, None, :] >= start.view(3, 1, 1, 1))
    want = s.masked_fill(~allowed, float("-inf")).logsumexp(-1).masked_fill(~allowed.any(-1), float("inf"))
    close(lse, want, torch.float32, "log-sum-exp")


@needs_triton
@pytest.mark.parametrize("T,D", [(1, 32), (17, 64), (100, 32), (129, 64)])
def test_backward_fp32(T, D):
    q, k, v = make(3, 1, T, T, D, seed=T, grad=True)
    start = padded_start(3, T)
    do = torch.randn(3, 1, T, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    o = attn.attention(q, k, v, start)
    o.backward(do)
    ref = ref_grads(q, k, v, start, do)
    for name, x, r in zip("O dQ dK dV".split(), (o, q.grad, k.grad, v.grad), ref):
        close(x, r, torch.float32, name)


@needs_triton
@pytest.mark.parametrize("T", [17, 129])
def test_forward_backward_fp16(T):
    q, k, v = make(3, 1, T, T, 64, dtype=torch.float16, seed=T, grad=True)
    start = padded_start(3, T)
    do = torch.randn(3, 1, T, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE, torch.float16)
    o = attn.attention(q, k, v, start)
    o.backward(do)
    assert o.dtype == q.grad.dtype == torch.float16
    ref = ref_grads(q, k, v, start, do)
    for name, x, r in zip("O dQ dK dV".split(), (o, q.grad, k.grad, v.grad), ref):
        close(x, r, torch.float16, name)


@needs_triton
def test_queries_fewer_than_keys_with_grad():
    """Tq < Tk through the flash path (a chunk of new tokens appended to a prefix), forward and backward. The
    offset Tk - Tq = 17 puts the last key of the first query block at the start of a key block."""
    q, _, _ = make(3, 1, 40, 57, 32, seed=3, grad=True)
    _, k, v = make(3, 1, 57, 57, 32, seed=4, grad=True)
    start = padded_start(3, 57)
    do = torch.randn(3, 1, 40, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    o = attn.attention(q, k, v, start)
    o.backward(do)
    for name, x, r in zip("O dQ dK dV".split(), (o, q.grad, k.grad, v.grad), ref_grads(q, k, v, start, do)):
        close(x, r, torch.float32, name)


@needs_triton
def test_strided_inputs_and_grad_output():
    """q, k, v as the model makes them (one fused projection, transposed) and a non-contiguous grad_output."""
    B, T, H, D = 2, 40, 2, 32
    qkv = torch.randn(B, T, 3, H, D, generator=torch.Generator().manual_seed(8)).to(DEVICE).requires_grad_(True)
    q, k, v = qkv.unbind(2)  # each (B, T, H, D)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D), non-contiguous
    do = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(9)).to(DEVICE).transpose(1, 2)
    start = torch.tensor([0, 13], device=DEVICE)
    o = attn.attention(q, k, v, start)
    (g,) = torch.autograd.grad(o, qkv, do)
    qkv_ref = qkv.detach().clone().requires_grad_(True)
    qr, kr, vr = (x.transpose(1, 2) for x in qkv_ref.unbind(2))
    o_ref = attn.reference(qr, kr, vr, start)
    (g_ref,) = torch.autograd.grad(o_ref, qkv_ref, do)
    close(o, o_ref, torch.float32, "O")
    close(g, g_ref, torch.float32, "d qkv")


@needs_triton
def test_odd_head_dim_is_padded():
    q, k, v = make(3, 1, 33, 33, 24, seed=10, grad=True)
    start = padded_start(3, 33)
    do = torch.randn(3, 1, 33, 24, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    o = attn.attention(q, k, v, start)
    o.backward(do)
    for name, x, r in zip("O dQ dK dV".split(), (o, q.grad, k.grad, v.grad), ref_grads(q, k, v, start, do)):
        close(x, r, torch.float32, name)


@needs_triton
def test_backward_is_deterministic():
    q, k, v = make(1, 2, 40, 40, 32, seed=12, grad=True)
    do = torch.randn(1, 2, 40, 32, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    grads = []
    for _ in range(2):
        grads.append(torch.autograd.grad(attn.attention(q, k, v), (q, k, v), do))
    assert all(torch.equal(a, b) for a, b in zip(*grads)), "two backward passes must agree bit for bit"


@needs_triton
@pytest.mark.parametrize("Tq,num_splits", [(1, None), (1, 1), (3, 3), (3, 5)])
def test_decode_matches_full_forward(Tq, num_splits):
    """Decode the last Tq tokens against a cache (a view of a longer buffer, as the model keeps it): the outputs
    must equal the last Tq rows of a full forward over all the tokens, padding rows included."""
    B, H, T, D, Tmax = 3, 2, 45, 32, 64
    q, k, v = make(B, H, T, T, D, seed=14 + Tq)
    start = padded_start(B, T - Tq)  # the fully padded row has only padding before the new tokens...
    start[2] = T  # ...and here none at all: its new queries see nothing either
    full, _ = attn.attention_forward(q, k, v, start)
    cache_k = torch.zeros(B, H, Tmax, D, device=DEVICE)
    cache_v = torch.zeros(B, H, Tmax, D, device=DEVICE)
    cache_k[:, :, :T], cache_v[:, :, :T] = k, v
    out = attn.decode_attention(q[:, :, T - Tq:], cache_k[:, :, :T], cache_v[:, :, :T], start, num_splits=num_splits)
    close(out, full[:, :, T - Tq:], torch.float32, "decode vs full forward")
    close(out, attn.reference(q[:, :, T - Tq:], k, v, start), torch.float32, "decode vs reference")
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@needs_triton
def test_decode_fp16_split_over_padding():
    """fp16 decode with the split point inside the padding: a chunk that sees no key must not disturb the rest."""
    B, H, L, D = 3, 1, 70, 64
    q, k, v = make(B, H, 2, L, D, dtype=torch.float16, seed=20)
    start = torch.tensor([0, 40, L], device=DEVICE)  # row 1: the first two of three chunks are all padding
    out = attn.decode_attention(q, k, v, start, num_splits=3)
    close(out, attn.reference(q, k, v, start), torch.float16, "decode fp16")
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@needs_triton
def test_seam_triton_path_matches_torch_path(monkeypatch):
    """ops.attention forced to Triton vs forced to PyTorch: training (with grads) and a decode step (no grad)."""
    q, k, v = make(3, 2, 20, 20, 32, seed=21, grad=True)
    start = padded_start(3, 20)
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("NANORLHF_KERNELS", mode)
        o = ops.attention(q, k, v, start)
        grads = torch.autograd.grad(o.square().sum(), (q, k, v))
        with torch.no_grad():
            step = ops.attention(q[:, :, -1:], k, v, start)  # decode: one new token against the cache
        results[mode] = (o, *grads, step)
    for name, a, b in zip("O dQ dK dV decode".split(), results["triton"], results["torch"]):
        close(a, b, torch.float32, name)


@needs_triton
def test_decode_route_is_taken_without_grad(monkeypatch):
    """attention() sends few-query, no-grad calls to the split-KV decode kernels and everything else to the flash
    forward (which the routing must not break for a gradient-carrying few-query call)."""
    calls = []
    real = attn.decode_attention
    monkeypatch.setattr(attn, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make(2, 1, 2, 20, 32, seed=22)
    with torch.no_grad():
        attn.attention(q, k, v)
    assert calls == [1]
    attn.attention(q.requires_grad_(True), k, v)
    assert calls == [1]


@needs_triton
@needs_gpu
@pytest.mark.parametrize("T,D", [(17, 64), (129, 128), (1000, 64)])
def test_bf16_on_gpu(T, D):
    q, k, v = make(3, 2, T, T, D, dtype=torch.bfloat16, seed=T, grad=True)
    start = padded_start(3, T)
    do = torch.randn(3, 2, T, D, generator=torch.Generator().manual_seed(23)).to(DEVICE, torch.bfloat16)
    o = attn.attention(q, k, v, start)
    o.backward(do)
    for name, x, r in zip("O dQ dK dV".split(), (o, q.grad, k.grad, v.grad), ref_grads(q, k, v, start, do)):
        close(x, r, torch.bfloat16, name)
    with torch.no_grad():
        step = attn.attention(q[:, :, -1:], k, v, start)
    close(step, o[:, :, -1:].detach(), torch.bfloat16, "decode")
