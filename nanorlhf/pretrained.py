"""Load OpenAI's GPT-2 weights (124M to 1.5B) into our GPT, from a Hugging Face directory or the Hub.

A Hugging Face GPT-2 directory holds config.json and the weights as model.safetensors (or the older
pytorch_model.bin, or shards listed in model.safetensors.index.json). Our GPT keeps GPT-2's parameter names, so
loading is renaming plus three facts about how HF stores them:

  - c_attn, c_proj and c_fc are `Conv1D` layers: y = x @ W + b with W of shape (in, out), the transpose of
    nn.Linear's (out, in). We transpose them on the way in.
  - attn.bias / attn.masked_bias are buffers (a causal mask and a fill value), not weights: skipped.
  - lm_head.weight is tied to transformer.wte.weight (often not even stored): we tie ours the same way.

Keys may carry a "transformer." prefix (saved from GPT2LMHeadModel) or not (the original GPT-2 files, saved
from GPT2Model); both load.

    model = load_gpt2("gpt2")                     # the Hub (needs `pip install huggingface_hub` and the network)
    model = load_gpt2("path/to/gpt2-medium")      # a local directory: works offline
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from nanorlhf.config import UserError
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.tokenizer import EOT

CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
BUFFERS = (".attn.bias", ".attn.masked_bias")  # the leading dot keeps ".attn.c_attn.bias" out
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which our GPT uses; GPT-2's config says 1e-5 too
VOCAB_SIZE = EOT + 1  # the tokenizer is GPT-2's BPE: 50,257 tokens, <|endoftext|> the last


def check_vocab(vocab_size, source) -> None:
    """Weights trained with another vocabulary would meet token ids they have no row for (or rows no token is)."""
    if vocab_size != VOCAB_SIZE:
        raise UserError(f"{source}: vocab_size {vocab_size} is not GPT-2's {VOCAB_SIZE} (nanorlhf's tokenizer is "
                        f"GPT-2's BPE: these weights were trained with another)")


def gpt_config(hf: dict, source) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json, refusing what our GPT cannot represent."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{source}: model_type is {hf['model_type']!r}, not 'gpt2'")
    for name in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if not isinstance(hf.get(name), int):
            raise UserError(f"{source}: field '{name}' is missing or not an integer")
    block_size = hf.get("n_positions", hf.get("n_ctx"))  # n_ctx is the older name of the same thing
    if not isinstance(block_size, int):
        raise UserError(f"{source}: field 'n_positions' (or 'n_ctx') is missing or not an integer")
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if not math.isclose(eps, LAYER_NORM_EPS):
        raise UserError(f"{source}: layer_norm_epsilon is {eps}; our GPT's LayerNorm uses {LAYER_NORM_EPS}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):  # both are the tanh approximation our MLP uses
        raise UserError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise UserError(f"{source}: n_inner {hf['n_inner']} is not 4 * n_embd")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise UserError(f"{source}: attention scaling other than 1/sqrt(head size) is not supported")
    for name in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if hf[name] < 1:
            raise UserError(f"{source}: field '{name}' must be at least 1, got {hf[name]}")
    if block_size < 1 or hf["n_embd"] % hf["n_head"]:
        raise UserError(f"{source}: n_positions {block_size} must be at least 1 and n_embd {hf['n_embd']} a "
                        f"multiple of n_head {hf['n_head']}")
    return GPTConfig(block_size=block_size, vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True)


def read_tensors(directory: Path) -> dict:
    """{HF key: tensor} from the weights file(s) of a directory: safetensors first, then pytorch_model.bin."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    legacy = directory / "pytorch_model.bin"
    if single.exists() or index.exists():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{directory} holds safetensors weights: pip install safetensors") from None
        weight_map = {} if single.exists() else read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no 'weight_map' object")
        files = [single] if single.exists() else sorted({directory / f for f in weight_map.values()})
        tensors = {}
        for f in files:
            try:
                tensors.update(load_file(str(f)))
            except Exception as e:
                raise UserError(f"{f} could not be read ({type(e).__name__}: {e})") from None
        return tensors
    if legacy.exists():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)  # weights_only: no pickled code runs
        except Exception as e:
            raise UserError(f"{legacy} could not be read ({type(e).__name__}: {e})") from None
    raise UserError(f"{directory}: no model.safetensors or pytorch_model.bin")


def read_json(path) -> dict:
    """A JSON file as a dict, or a one-line UserError (not a file, not UTF-8, not JSON, not an object)."""
    try:
        d = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise UserError(f"{path}: not valid JSON{where} ({getattr(e, 'msg', None) or e.reason})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def convert(hf_tensors: dict, cfg: GPTConfig, source) -> dict:
    """HF GPT-2 tensors -> our GPT's state dict (fp32), checking that every parameter is there, once."""
    ours = {}
    lm_head = None
    for key in list(hf_tensors):
        t = hf_tensors.pop(key)  # popped, so the HF copy of a transposed tensor can be freed at once (1.5B: 6 GB)
        name = key.removeprefix("transformer.")
        if name.endswith(BUFFERS):
            continue
        if name == "lm_head.weight":
            lm_head = t
            continue
        if name.endswith(CONV1D):
            t = t.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        ours["transformer." + name] = t.float().contiguous()
    want = shapes(cfg)
    missing = sorted(set(want) - set(ours))
    unexpected = sorted(set(ours) - set(want))
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match config.json (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    for name, shape in want.items():
        if tuple(ours[name].shape) != shape:
            raise UserError(f"{source}: {name} has shape {tuple(ours[name].shape)}, config.json implies {shape}")
    if lm_head is not None and not torch.equal(lm_head.float(), ours["transformer.wte.weight"]):
        raise UserError(f"{source}: lm_head.weight differs from wte.weight; GPT-2's LM head is tied")
    return ours


def shapes(cfg: GPTConfig) -> dict:
    """{parameter name: shape} of our GPT for cfg (the LM head left out: it is wte)."""
    C, V = cfg.n_embd, cfg.vocab_size
    out = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (cfg.block_size, C),
           "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        out.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
                    h + "attn.c_attn.weight": (3 * C, C), h + "attn.c_attn.bias": (3 * C,),
                    h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                    h + "mlp.c_fc.weight": (4 * C, C), h + "mlp.c_fc.bias": (4 * C,),
                    h + "mlp.c_proj.weight": (C, 4 * C), h + "mlp.c_proj.bias": (C,)})
    return out


def download(name: str) -> Path:
    """The Hub's copy of a GPT-2 (config.json and its weights) in the local Hugging Face cache."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError
    except ImportError:
        raise UserError(f"{name!r} is not a local directory, and fetching it from the Hugging Face Hub needs "
                        f"`pip install huggingface_hub` (or pass a directory with config.json and model.safetensors)"
                        ) from None
    try:
        config = Path(hf_hub_download(name, "config.json"))
        try:
            hf_hub_download(name, "model.safetensors")
        except EntryNotFoundError:  # some repositories only have the older pickle format
            hf_hub_download(name, "pytorch_model.bin")
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {first_line}); "
                        f"offline, pass a local directory with config.json and model.safetensors") from None
    return config.parent


def load_gpt2(name_or_path, dropout: float = 0.0, vocab_size: int | None = VOCAB_SIZE) -> GPT:
    """A GPT with GPT-2's weights, in fp32 on the CPU (move and cast it yourself), in training mode.

    name_or_path: a directory in Hugging Face format, or a Hub name: gpt2 (124M), gpt2-medium (350M), gpt2-large
    (774M), gpt2-xl (1.5B), openai-community/gpt2, ... dropout: for fine-tuning (keep 0 for RL). vocab_size: the
    vocabulary the weights must have, refused at once otherwise (GPT-2's 50,257, the tokenizer's); None takes any.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        directory = path
    elif path.exists():
        raise UserError(f"{path} is a file: pass the directory that holds config.json and the weights")
    elif str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise UserError(f"{path}: no such directory")
    else:
        directory = download(str(name_or_path))
    config_file = directory / "config.json"
    if not config_file.exists():
        raise UserError(f"{directory}: no config.json (expected a Hugging Face GPT-2 directory)")
    cfg = replace(gpt_config(read_json(config_file), config_file), dropout=dropout)
    if vocab_size is not None:
        check_vocab(cfg.vocab_size, config_file)  # before reading the weights (1.5B: 6 GB)
    state = convert(read_tensors(directory), cfg, directory)
    # Build on the meta device (no memory, no random init: 1.5B parameters would take a while), then adopt the
    # loaded tensors as the parameters. assign=True gives lm_head its own Parameter, so we tie it again after.
    with torch.device("meta"):
        model = GPT(cfg)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, assign=True)
    model.lm_head.weight = model.transformer.wte.weight
    return model  # in training mode, like a fresh GPT(cfg)
