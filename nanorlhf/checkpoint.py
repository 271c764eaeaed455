"""Checkpoints: one torch.save'd dict per file, written atomically."""

import os
from dataclasses import asdict
from pathlib import Path

import torch

from nanorlhf.config import UserError
from nanorlhf.model import GPTConfig


def save(path, model, kind: str, **extra) -> None:
    """Write {kind, model_config, model state, **extra} to path via a temporary file, so a crash never leaves a
    half-written checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(kind=kind, model_config=asdict(model.config), model=model.state_dict(), **extra)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path, made_by: str, kind: str | None = None) -> dict:
    """Read a checkpoint; if it is missing, say which script makes it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found: run `python {made_by}` first (or pass the right path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a nanorlhf checkpoint")
    if kind is not None and ckpt.get("kind") != kind:
        raise UserError(f"{path} is a {ckpt.get('kind')!r} checkpoint, expected {kind!r} (made by {made_by})")
    return ckpt


def model_config(ckpt) -> GPTConfig:
    return GPTConfig(**ckpt["model_config"])
