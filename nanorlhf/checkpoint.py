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
from dataclasses import asdict
from pathlib import Path

import torch

from nanorlhf.config import UserError, check_writable
from nanorlhf.dist import print0
from nanorlhf.model import GPTConfig
from nanorlhf.pretrained import check_vocab


def save(path, model, kind: str, **extra) -> None:
    """Write {kind, model_config, model state, **extra} to path via a temporary file, so a crash never leaves a
    half-written checkpoint behind."""
    path = Path(path)
    payload = dict(kind=kind, model_config=asdict(model.config), model=model.state_dict(), **extra)
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
