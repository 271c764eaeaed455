"""The model through the Triton seams (interpreter on CPU) gives the same results as through PyTorch."""

import pytest
import torch

from kernels._triton import HAVE_TRITON
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.rollout import generate, response_logprobs, response_mask
from nanorlhf.sft import make_batch, sft_loss

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (no wheel for this platform)")

CFG = GPTConfig(block_size=32, vocab_size=1271, n_layer=1, n_head=2, n_embd=32)


def sft_run(kernels, monkeypatch, steps=3):
    """A few SFT steps from the same start: the losses and the final weights."""
    monkeypatch.setenv("NANORLHF_KERNELS", kernels)
    torch.manual_seed(0)
    model = GPT(CFG)
    # SGD, not Adam: the key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys),
    # and Adam would blow its rounding noise up to full-size steps of random sign.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    examples = [([5, 6, 7, 8, 9, 10], 3), ([11, 12, 13], 2), ([14, 15, 16, 17], 1)]
    losses = []
    for _ in range(steps):
        loss, _ = sft_loss(model, *make_batch(examples, "cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


def test_sft_steps_match(monkeypatch):
    ref_losses, ref_model = sft_run("torch", monkeypatch)
    tri_losses, tri_model = sft_run("triton", monkeypatch)
    assert ref_losses[-1] < ref_losses[0]
    torch.testing.assert_close(tri_losses, ref_losses, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(ref_model.named_parameters(), tri_model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)


def test_generation_and_ppo_logprobs_match(monkeypatch):
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    out = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("NANORLHF_KERNELS", kernels)
        r = generate(model, prompts, 6, temperature=0.0)  # greedy: the same tokens if the logits agree
        P = r["prompt_len"]
        mask = response_mask(r["resp_len"], r["tokens"].shape[1] - P)
        logp, ent = response_logprobs(model, r["tokens"], r["start"], P, mask, 0.7, with_entropy=True)
        out[kernels] = (r["tokens"], r["logprobs"], logp, ent)
    assert torch.equal(out["torch"][0], out["triton"][0])
    for a, b in zip(out["torch"][1:], out["triton"][1:]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
