"""Loading GPT-2 weights in Hugging Face format: checked against an independent forward pass written here."""

import json
import math

import pytest
import torch

from nanorlhf.config import UserError
from nanorlhf.pretrained import load_gpt2

safetensors_torch = pytest.importorskip("safetensors.torch", reason="pip install safetensors")

TINY = dict(model_type="gpt2", n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=61,
            layer_norm_epsilon=1e-5, activation_function="gelu_new")


def hf_tensors(cfg, prefix="", seed=0):
    """Random GPT-2 tensors under HF's key names and layouts (Conv1D weights are (in, out)), with the attention
    buffers that old checkpoints carry. Large random values, so a transposed or swapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    C, V, T = cfg["n_embd"], cfg["vocab_size"], cfg.get("n_positions", cfg.get("n_ctx"))

    def rnd(*shape, scale=0.3, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    t = {"wte.weight": rnd(V, C), "wpe.weight": rnd(T, C), "ln_f.weight": rnd(C, mean=1.0), "ln_f.bias": rnd(C)}
    for i in range(cfg["n_layer"]):
        h = f"h.{i}."
        t.update({h + "ln_1.weight": rnd(C, mean=1.0), h + "ln_1.bias": rnd(C),
                  h + "ln_2.weight": rnd(C, mean=1.0), h + "ln_2.bias": rnd(C),
                  h + "attn.c_attn.weight": rnd(C, 3 * C), h + "attn.c_attn.bias": rnd(3 * C),
                  h + "attn.c_proj.weight": rnd(C, C), h + "attn.c_proj.bias": rnd(C),
                  h + "mlp.c_fc.weight": rnd(C, 4 * C), h + "mlp.c_fc.bias": rnd(4 * C),
                  h + "mlp.c_proj.weight": rnd(4 * C, C), h + "mlp.c_proj.bias": rnd(C),
                  h + "attn.bias": torch.tril(torch.ones(T, T)).view(1, 1, T, T),
                  h + "attn.masked_bias": torch.tensor(-1e4)})
    return {prefix + k: v for k, v in t.items()}


def write_checkpoint(directory, cfg=TINY, fmt="safetensors", prefix="", with_lm_head=False):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    tensors = hf_tensors(cfg, prefix)
    if with_lm_head:
        tensors["lm_head.weight"] = tensors[prefix + "wte.weight"].clone()
    if fmt == "safetensors":
        safetensors_torch.save_file(tensors, str(directory / "model.safetensors"))
    else:
        torch.save(tensors, directory / "pytorch_model.bin")
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


def reference_logits(w, cfg, idx):
    """GPT-2's forward from the raw HF tensors, in plain PyTorch: (B, T) ids -> (B, T, V) logits."""
    B, T = idx.shape
    C, H = cfg["n_embd"], cfg["n_head"]
    D = C // H

    def layer_norm(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg["layer_norm_epsilon"]) * w[p + ".weight"] + w[p + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    def conv1d(x, p):  # HF's Conv1D: x @ W + b with W (in, out)
        return x @ w[p + ".weight"] + w[p + ".bias"]

    x = w["wte.weight"][idx] + w["wpe.weight"][torch.arange(T)]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(cfg["n_layer"]):
        h = f"h.{i}."
        q, k, v = conv1d(layer_norm(x, h + "ln_1"), h + "attn.c_attn").split(C, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + conv1d(y, h + "attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(layer_norm(x, h + "ln_2"), h + "mlp.c_fc")), h + "mlp.c_proj")
    return layer_norm(x, "ln_f") @ w["wte.weight"].T


IDX = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 60, 0, 42], [2, 7, 1, 8, 28, 18, 28, 45, 59, 4]])


@pytest.mark.parametrize("fmt,prefix,with_lm_head", [("safetensors", "", False), ("bin", "transformer.", True),
                                                      ("safetensors", "transformer.", False)])
def test_logits_match_an_independent_gpt2_forward(tmp_path, fmt, prefix, with_lm_head):
    w = write_checkpoint(tmp_path / "gpt2-tiny", fmt=fmt, prefix=prefix, with_lm_head=with_lm_head)
    model = load_gpt2(tmp_path / "gpt2-tiny", vocab_size=None).eval()
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 2, 16)
    assert (model.config.block_size, model.config.vocab_size) == (32, 61)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, and counted once
    skip = (".attn.bias", ".attn.masked_bias", "lm_head.weight")  # buffers, and the tied copy of wte
    assert model.num_params() == sum(v.numel() for k, v in w.items() if not k.endswith(skip))
    with torch.no_grad():
        ours = model.lm_logits(model(IDX))
    torch.testing.assert_close(ours, reference_logits(w, TINY, IDX), atol=1e-4, rtol=1e-5)


def test_left_padded_rows_match_unpadded(tmp_path):
    """The loaded model is an ordinary GPT: padding (left_pad's start) leaves the real rows' logits unchanged."""
    w = write_checkpoint(tmp_path / "m")
    model = load_gpt2(tmp_path / "m", vocab_size=None).eval()
    short = IDX[1:, 4:]
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    with torch.no_grad():
        out = model.lm_logits(model(padded, start=torch.tensor([4])))[:, 4:]
    torch.testing.assert_close(out, reference_logits(w, TINY, short), atol=1e-4, rtol=1e-5)


def test_n_ctx_is_read_when_n_positions_is_absent(tmp_path):
    cfg = {k: v for k, v in TINY.items() if k != "n_positions"} | {"n_ctx": 32}
    write_checkpoint(tmp_path / "m", cfg=cfg)
    assert load_gpt2(tmp_path / "m", vocab_size=None).config.block_size == 32


def test_matches_transformers_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional)")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=61)
    ref = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    model = load_gpt2(tmp_path / "hf", vocab_size=None).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.lm_logits(model(IDX)), ref(IDX).logits, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("setup,message", [
    ("missing_dir", "no such directory"),
    ("no_config", "no config.json"),
    ("no_weights", "no model.safetensors or pytorch_model.bin"),
    ("bad_eps", "layer_norm_epsilon"),
    ("bad_shape", "has shape"),
    ("missing_tensor", "missing ['transformer.h.1.mlp.c_fc.bias']"),
    ("file", "is a file"),
    ("config_not_utf8", "config.json: not valid JSON"),
    ("config_is_a_dir", "config.json: cannot be read"),
])
def test_bad_checkpoints_are_one_line_user_errors(tmp_path, setup, message):
    d = tmp_path / "m"
    if setup == "missing_dir":
        d = tmp_path / "nowhere"
    elif setup == "no_config":
        write_checkpoint(d)
        (d / "config.json").unlink()
    elif setup == "no_weights":
        write_checkpoint(d)
        (d / "model.safetensors").unlink()
    elif setup == "bad_eps":
        write_checkpoint(d, cfg=TINY | {"layer_norm_epsilon": 1e-6})
    elif setup == "bad_shape":
        write_checkpoint(d)
        (d / "config.json").write_text(json.dumps(TINY | {"n_positions": 64}))
    elif setup == "missing_tensor":
        t = write_checkpoint(d)
        del t["h.1.mlp.c_fc.bias"]
        safetensors_torch.save_file(t, str(d / "model.safetensors"))
    elif setup == "file":
        write_checkpoint(d)
        d = d / "config.json"
    elif setup == "config_not_utf8":
        write_checkpoint(d)
        (d / "config.json").write_bytes(b'{"n_layer": 2, "model_type": "\xff"}')
    elif setup == "config_is_a_dir":
        write_checkpoint(d)
        (d / "config.json").unlink()
        (d / "config.json").mkdir()
    with pytest.raises(UserError) as e:
        load_gpt2(d, vocab_size=None)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_hub_name_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(UserError, match="pip install huggingface_hub"):
        load_gpt2("gpt2-medium")


def test_another_vocabulary_is_refused_at_load_naming_both_sizes(tmp_path):
    write_checkpoint(tmp_path / "m")  # vocab_size 61
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not read")  # refused from config.json, before the weights
    with pytest.raises(UserError) as e:
        load_gpt2(tmp_path / "m")  # the default: the tokenizer's vocabulary, GPT-2's 50,257
    assert "vocab_size 61 is not GPT-2's 50257" in str(e.value) and "config.json" in str(e.value)
