"""Shared test set-up: runs before any test module imports a kernel file. Tests import the package (and what this
file offers), never a script's internals or another test; a script runs as a subprocess, or through its main()
loaded by `load_script`."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors (slow: tests keep shapes small).
# It must be set before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))

from nanorlhf import checkpoint, tasks  # noqa: E402  (after TRITON_INTERPRET: the package imports the kernels)
from nanorlhf.model import GPT, GPTConfig  # noqa: E402
from nanorlhf.tokenizer import EOT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=16)  # a GPT that trains in milliseconds

# One record of each public format, with the real files' field layout.
HH = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: Why do you ask?",
}
HH_PROMPT = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"
TLDR = {
    "info": {"id": "t3_x", "post": "My cat ignores me.", "title": "Cat trouble", "subreddit": "cats"},
    "summaries": [{"text": " cat is aloof", "policy": "sup1"}, {"text": "my cat ignores me, help", "policy": "ref"}],
    "choice": 1, "worker": "w1", "batch": "batch3", "split": "train",
}
TLDR_PROMPT = "SUBREDDIT: r/cats\nTITLE: Cat trouble\nPOST: My cat ignores me.\nTL;DR:"


def run(script, *args, cwd, **kwargs):
    """A script (train_*.py) or a module (nanorlhf.x, bench.x) as a subprocess, as a user runs it."""
    cmd = [sys.executable, *([str(ROOT / script)] if script.endswith(".py") else ["-m", script]), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300, env=env, **kwargs)


def load_script(name):
    """A top-level script (train_sft, train_rm, train_ppo) as a module, for its Config and main()."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # where inspect finds its source (the Config's field docs are read from it)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The built-in task's data (small) and a tiny out/sft.pt: what train_rm.py and train_ppo.py start from."""
    d = tmp_path_factory.mktemp("pipeline")
    tasks.write_default_data(tasks.TaskConfig(out=str(d / "data"), n_sft=50, n_train_prompts=40, n_eval_prompts=20))
    torch.manual_seed(0)
    checkpoint.save(d / "out" / "sft.pt", GPT(TINY), kind="sft")
    return d


def position_policy(k=12):
    """A GPT(TINY) whose next token hangs on the position alone, with probability 1 - 1e-9: " 1" after positions
    up to k, then <|endoftext|>. Its rollouts are the same whatever the random stream or the order its numbers are
    drawn in: one process with the whole batch, two with half each, or micro-batches roll out the same responses (of
    lengths that differ with the prompt's, as long as the prompt is short: k + 2 - its length)."""
    torch.manual_seed(0)
    model = GPT(TINY)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    hadamard = torch.kron(torch.kron(h2, h2), torch.kron(h2, h2))  # 16 x 16, orthogonal rows of +-1
    one, end = hadamard[1], hadamard[2]  # zero mean: LayerNorm keeps them as they are
    with torch.no_grad():
        for block in model.transformer.h:  # the blocks add nothing: the state is token + position embedding
            for layer in (block.attn.c_proj, block.mlp.c_proj):
                layer.weight.zero_(), layer.bias.zero_()
        model.transformer.wte.weight[352] = one  # " 1"
        model.transformer.wte.weight[EOT] = end
        position = torch.arange(TINY.block_size)[:, None]
        model.transformer.wpe.weight.copy_(10 * torch.where(position < k, one, end))  # dwarfs the token's
        model.transformer.ln_f.weight.fill_(2.0)  # logits 32 for the chosen token, |logit| < 1 for the others
    return model
