"""Checkpoints: one torch.save'd dict per file, written atomically.

Every script writes {kind, model_config, model, train_config, step, ...} to its --out at the end, and every
ckpt_interval steps before that the same dict plus "resume": what --resume needs to go on exactly where the run was
(optimizer state, random states, data order). Only a mid-run checkpoint has "resume". The next stage and the
evaluation refuse it (a mid-run RM has no normalised score yet, a mid-run SFT model is not the one meant), with a
line that says to finish the run with --resume; sampling (nanorlhf.sample) and --resume itself read it.

A run's other files (its metrics.jsonl, the RM's rankings) are Staged: written beside the previous run's until the
run's first checkpoint, then moved into place right before it, so that a run that fails before then leaves the
previous run's checkpoint and files as they were.
"""

import contextlib
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from nanorlhf.config import UserError, check_writable
from nanorlhf.dist import print0, state_dict
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.pretrained import check_vocab, load_gpt2


def save(path, model, kind: str, **extra) -> None:
    """Write {kind, model_config, model state, **extra} to path via a temporary file, so a crash never leaves a
    half-written checkpoint behind. A sharded model (FSDP) must be gathered first (dist.unshard)."""
    path = Path(path)
    payload = dict(kind=kind, model_config=asdict(model.config), model=state_dict(model), **extra)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, a folder that went away; torch reports some as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({getattr(e, 'strerror', None) or e})") from None


def check_outputs(out) -> None:
    """Before a script reads or writes anything: its checkpoint (--out) and its metrics folder (--out without the
    extension: out/sft.pt -> out/sft/) can be written."""
    check_writable(out, "--out")
    check_writable(Path(out).with_suffix(""), f"--out {out}: its metrics folder", directory=True)


class Staged:
    """A run's files besides its checkpoint, each written as NAME.new beside the previous run's NAME, and moved over
    it by commit(), which a script calls right before it saves a checkpoint (mid-run or final): the checkpoint and
    its files then belong to the same run. Used as a context manager around a run: on the way out, discard() removes
    the .new files (and the folders made for them) of a run that never committed, so a run that fails before its
    first checkpoint leaves the previous run's files byte for byte as they were."""

    def __init__(self):
        self.files = []  # (NAME.new, NAME)
        self.made = []  # folders created for them, parents first

    def path(self, final) -> Path:
        """Where to write what will become `final` (its folder is created)."""
        final = Path(final)
        missing = [p for p in [final.parent, *final.parent.parents] if not os.path.lexists(p)]
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {final.parent} ({e.strerror or e})") from None
        self.made += reversed(missing)
        self.files.append((self.name(final), final))
        return self.name(final)

    @staticmethod
    def name(final) -> Path:
        """NAME.new: where what will become NAME is written."""
        return Path(final).with_name(Path(final).name + ".new")

    def commit(self) -> None:
        for tmp, final in self.files:
            os.replace(tmp, final)  # an open file (the metrics log) keeps writing to it under its new name
        self.files, self.made = [], []

    def discard(self) -> None:
        for tmp, _ in self.files:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        for d in reversed(self.made):  # deepest first; only if empty
            with contextlib.suppress(OSError):
                d.rmdir()
        self.files, self.made = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()


def load(path, made_by: str, kind: str | None = None, finished: bool = True) -> dict:
    """Read a checkpoint; if it is missing, say which script makes it. finished: refuse a mid-run checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found: run `python {made_by}` first (or pass the right path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("model_config"), dict):
        raise UserError(f"{path} is not a nanorlhf checkpoint")
    check_vocab(ckpt["model_config"].get("vocab_size"), path)  # the tokenizer is GPT-2's
    if kind is not None and ckpt.get("kind") != kind:
        raise UserError(f"{path} is a {ckpt.get('kind')!r} checkpoint, expected {kind!r} (made by {made_by})")
    if finished and "resume" in ckpt:
        raise UserError(f"{path} is from a run that stopped at step {ckpt.get('step')} before it finished: complete it "
                        f"with `python {made_by} --resume` (same flags), or pass a finished checkpoint")
    return ckpt


def model_config(ckpt) -> GPTConfig:
    return GPTConfig(**ckpt["model_config"])


def init_gpt(source: str, dropout: float | None = None, flag: str = "--init_from") -> GPT:
    """A GPT to start training from: a finished sft or ppo checkpoint (.pt), or GPT-2 weights (a Hugging Face
    directory or a hub name such as gpt2-medium). dropout: the model's (None: the checkpoint's own; GPT-2's: 0)."""
    if not source.endswith(".pt"):
        return load_gpt2(source, dropout=dropout or 0.0)
    ckpt = load(source, made_by="train_sft.py")
    if ckpt["kind"] not in ("sft", "ppo"):
        raise UserError(f"{source} is a {ckpt['kind']!r} checkpoint; {flag} takes a GPT (sft or ppo)")
    cfg = model_config(ckpt)
    model = GPT(cfg if dropout is None else replace(cfg, dropout=dropout))
    model.load_state_dict(ckpt["model"])
    return model


def load_resumable(cfg, made_by: str, kind: str) -> dict | None:
    """For --resume: the mid-run checkpoint at cfg.out, or None (after saying so) when that run already finished."""
    path = Path(cfg.out)
    if not path.exists():
        raise UserError(f"--resume: no checkpoint at {path} to continue from (leave out --resume to start a new run)")
    ckpt = load(path, made_by=made_by, kind=kind, finished=False)
    if "resume" not in ckpt:
        print0(f"{path} holds a finished run (step {ckpt.get('step', '?')}): nothing to resume")
        return None
    saved = ckpt.get("train_config", {})
    changed = [f"--{k} {v} (was {saved[k]})" for k, v in vars(cfg).items() if k != "resume" and saved.get(k, v) != v]
    if changed:
        print0("note: resuming with settings that differ from the checkpoint's run: " + ", ".join(changed))
    print0(f"resuming {path} from step {ckpt['step']}")
    return ckpt


def rng_state(rng, generator=None) -> dict:
    """Every random state a run draws from, for a resumable checkpoint: torch's global CPU generator (and the CUDA
    ones, when there is a GPU), the run's random.Random and its torch.Generator (if any)."""
    state = dict(torch=torch.get_rng_state(), random=rng.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, rng, generator=None) -> None:
    """Put back what rng_state() saved, so the resumed run draws the same numbers the first one would have."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    rng.setstate(state["random"])
    if generator is not None:
        generator.set_state(state["generator"])


# ------------------------------------------------------------------------------------------------------------------
# What a process holds in memory, estimated before it is allocated

def param_count(cfg: GPTConfig, head: bool = False) -> int:
    """Parameters of GPT(cfg), the tied LM head counted once; head=True: of ScalarModel(cfg) (a scalar head more).

    Per block: two LayerNorms, q/k/v and the attention's output projection, the MLP's 4x expansion and projection:
    12 n_embd^2 weights and (bias) 13 n_embd biases and LayerNorm parameters (2 n_embd without biases)."""
    C, b = cfg.n_embd, int(cfg.bias)
    block = 12 * C * C + 2 * C + 11 * b * C
    return (cfg.vocab_size + cfg.block_size) * C + cfg.n_layer * block + C * (1 + b) + (C + 1) * head


def memory_estimate(weights: int, trained: int, kv_cache=(), activations=(), low_precision=None,
                    checkpointing=False, shards=1) -> dict:
    """Bytes one process needs, by kind: weights in fp32 (4 bytes a parameter), gradients (4 per trained one), AdamW's
    two moments (8 per trained one), generation's KV cache (keys and values: 2 n_layer n_embd numbers per cached
    position), and the activations one training pass keeps for backward (~16 n_embd numbers per token and layer:
    the inputs of both LayerNorms and of the four Linear layers, q, k, v and the MLP's 4x hidden twice). The last
    two are 2-byte numbers under bf16 autocast (low_precision: a true value, such as the autocast dtype). Not
    counted: the LM head's logits (computed in chunks), temporaries and the framework's own. kv_cache, activations:
    [(GPTConfig, positions)], the positions of one generation batch and of one micro-batch (a step's micro-batches
    run one after another: only one's activations are alive at a time).

    checkpointing (activation checkpointing): each block keeps only its input (the fp32 residual stream, n_embd
    numbers per token) and recomputes the rest in the backward pass, one block at a time, so 16 n_embd numbers per
    token once instead of per layer. shards: FSDP over that many processes divides the trained weights, their
    gradients and Adam's moments among them (weights - trained, the frozen models', stay whole)."""
    size = 2 if low_precision else 4

    def kept(c):  # numbers per position a backward pass needs, in bytes
        return 4 * c.n_layer * c.n_embd + 16 * c.n_embd * size if checkpointing else 16 * c.n_layer * c.n_embd * size
    return dict(weights=4 * (weights - trained + trained / shards), gradients=4 * trained / shards,
                adam=8 * trained / shards, kv_cache=sum(2 * c.n_layer * c.n_embd * n * size for c, n in kv_cache),
                activations=sum(kept(c) * n for c, n in activations))


def memory_line(estimate: dict) -> str:
    """One line for the start of a run: each kind of memory_estimate(), and the total."""
    def gb(n):
        return f"{n / 2 ** 30:.2f} GB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MB"
    names = dict(adam="Adam", kv_cache="KV cache")
    kinds = ", ".join(f"{names.get(k, k)} {gb(v)}" for k, v in estimate.items())
    return f"memory per process (estimate): {kinds}; total {gb(sum(estimate.values()))}"
