"""The memory estimate each script prints at its start (nanorlhf/checkpoint.py), against what the tensors take."""

import pytest
import torch

from nanorlhf.checkpoint import memory_estimate, memory_line, param_count
from nanorlhf.model import GPT, GPTConfig, ScalarModel
from nanorlhf.optim import adamw
from nanorlhf.sft import make_batch, sft_loss

CONFIGS = [GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=16),
           GPTConfig(block_size=64, n_layer=3, n_head=4, n_embd=32, bias=False),
           GPTConfig(block_size=20, vocab_size=300, n_layer=2, n_head=2, n_embd=24, dropout=0.1)]


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["tiny", "no-bias", "small-vocab"])
def test_parameter_count_is_the_models(cfg):
    torch.manual_seed(0)
    gpt, scalar = GPT(cfg), ScalarModel(cfg)
    assert param_count(cfg) == gpt.num_params() == sum(p.numel() for p in gpt.parameters())
    assert param_count(cfg, head=True) == sum(p.numel() for p in scalar.parameters())
    # GPT-2 124M, as published (the tied LM head counted once)
    assert param_count(GPTConfig()) == 124_439_808


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=["tiny", "no-bias"])
def test_weights_gradients_adam_and_kv_cache_are_what_the_tensors_take(cfg):
    torch.manual_seed(0)
    model = GPT(cfg)
    model.transformer.wpe.weight.requires_grad_(False)  # a frozen parameter: weights, but no gradient or Adam state
    trained = param_count(cfg) - cfg.block_size * cfg.n_embd
    opt = adamw(model, 1e-3)
    loss, _ = sft_loss(model, *make_batch([([1, 2, 3, 4], 2), ([5, 6], 1)], "cpu"))
    loss.backward()
    opt.step()
    est = memory_estimate(param_count(cfg), trained, kv_cache=[(cfg, 3 * 10)])
    params = list(model.parameters())
    assert est["weights"] == nbytes(params)
    assert est["gradients"] == nbytes(p.grad for p in params if p.grad is not None)
    moments = [v for state in opt.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    assert est["adam"] == nbytes(moments)
    assert est["kv_cache"] == nbytes(t for layer in model.new_kv_cache(3, 10) for t in layer)
    assert memory_estimate(0, 0, kv_cache=[(cfg, 30)], low_precision=torch.bfloat16)["kv_cache"] == est["kv_cache"] // 2


def test_activations_and_the_printed_line():
    cfg = GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768)
    est = memory_estimate(2 * param_count(cfg), param_count(cfg), activations=[(cfg, 8 * 1024)])
    assert est["activations"] == 16 * 12 * 768 * 8 * 1024 * 4  # 16 numbers per token and layer, fp32
    line = memory_line(est)
    assert line.startswith("memory per process (estimate): weights 949.4 MB, gradients 474.7 MB, Adam 949.4 MB, "
                           "KV cache 0.0 MB, activations 4.50 GB; total ")
    assert line.endswith(f"total {sum(est.values()) / 2 ** 30:.2f} GB") and "\n" not in line
