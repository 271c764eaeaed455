"""Talk to a trained policy from the terminal: a prompt per line in, sampled responses out.

    python -m nanorlhf.sample --ckpt out/sft.pt                         # type prompts; Ctrl-D ends
    python -m nanorlhf.sample --ckpt out/ppo.pt --prompt 'Sort: 3 1 2\\nAnswer:' --n 4 --temperature 0.7
    python -m nanorlhf.sample --ckpt path/to/gpt2 --top_p 0.9 < prompts.txt

--ckpt takes a nanorlhf GPT checkpoint (kind sft, ppo or dpo, the policy stored under "model") or a Hugging Face GPT-2
directory (nanorlhf.pretrained). A literal \\n in a prompt becomes a newline, so one line can hold the built-in
task's two-line prompts; an empty line samples with no prompt (from <|endoftext|>, as GPT-2 does).
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nanorlhf import checkpoint
from nanorlhf.config import UserError, at_least, check_room, file_name, finite, in_range, run, seed_range
from nanorlhf.model import GPT
from nanorlhf.pretrained import load_gpt2
from nanorlhf.rollout import generate
from nanorlhf.tokenizer import EOT, decode, encode

END = "<|endoftext|>"


@dataclass
class Config:
    """Sample responses from a GPT: one prompt per line on stdin, or --prompt once."""

    ckpt: str = "out/sft.pt"
    """a GPT checkpoint (sft or ppo), or a Hugging Face GPT-2 directory"""
    prompt: str = ""
    """one prompt to answer, then exit ("": read prompts from stdin, one per line)"""
    n: int = 1
    """samples per prompt"""
    max_new_tokens: int = 64
    """longest response, in tokens"""
    temperature: float = 1.0
    """sampling temperature (0: greedy)"""
    top_k: int = 0
    """sample among the k likeliest tokens only (0: all)"""
    top_p: float = 1.0
    """nucleus sampling: the smallest set of tokens holding this much probability (1: all)"""
    seed: int = 0
    """random seed (-1: a different one each run)"""

    def __post_init__(self):  # ranges of the flags, checked whenever a Config is made (nanorlhf/config.py)
        finite(self)
        file_name(self, "ckpt")
        at_least(self, 1, "n", "max_new_tokens")
        at_least(self, 0, "temperature", "top_k")
        in_range(self, "top_p", 0, 1, lo_open=True)
        seed_range(self, lowest=-1)


def load_policy(path, device="cpu") -> GPT:
    """A GPT in eval mode from a nanorlhf checkpoint (sft or ppo) or a Hugging Face GPT-2 directory."""
    if Path(path).is_dir():
        model = load_gpt2(path)
    else:
        ckpt = checkpoint.load(path, made_by="train_sft.py", finished=False)  # a mid-run model talks too
        if ckpt.get("kind") not in ("sft", "ppo", "dpo"):
            raise UserError(f"{path} is a {ckpt.get('kind')!r} checkpoint; sampling needs a GPT (sft, ppo or dpo)")
        model = GPT(checkpoint.model_config(ckpt))
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def respond(model, prompt: str, n=1, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """n sampled responses to prompt: [(text, ended)], text ending with "<|endoftext|>" when the model ended it."""
    if max_new_tokens >= model.config.block_size:
        raise UserError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                        f"block_size {model.config.block_size}")
    tokens = encode(prompt) or [EOT]  # no prompt: start from <|endoftext|>, GPT-2's document separator
    r = generate(model, [tokens] * n, max_new_tokens, temperature, top_k, top_p, generator=generator)
    P = r["prompt_len"]
    return [(decode(r["tokens"][b, P:P + int(r["resp_len"][b])].tolist()), bool(r["ended"][b])) for b in range(n)]


def unescape(line: str) -> str:
    r"""A typed line as a prompt: the two characters \n become a newline."""
    return line.rstrip("\r\n").replace("\\n", "\n")


def read_prompts(interactive: bool):
    """Prompts typed or piped in, one per line, until end of input."""
    while True:
        if interactive:
            print("prompt> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D)
            return
        yield unescape(line)


def main(cfg: Config):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_policy(cfg.ckpt, device)
    check_room(cfg.max_new_tokens, model.config.block_size, cfg.ckpt)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # typed or piped bytes that are not UTF-8 become U+FFFD, not a crash
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed if cfg.seed >= 0 else int.from_bytes(os.urandom(4), "little"))
    interactive = not cfg.prompt and sys.stdin.isatty()
    if interactive:
        print(f"{cfg.ckpt}: type a prompt and Enter (\\n for a newline); Ctrl-D quits", file=sys.stderr)
    for prompt in [unescape(cfg.prompt)] if cfg.prompt else read_prompts(interactive):
        samples = respond(model, prompt, cfg.n, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                          generator)
        for i, (text, ended) in enumerate(samples):
            if cfg.n > 1:
                print(f"--- sample {i + 1} ---")
            print(text.removesuffix(END) + ("" if ended else " [cut off at --max_new_tokens]"), flush=True)


if __name__ == "__main__":
    run(main, Config)
