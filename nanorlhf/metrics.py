"""A run's metrics as JSONL: one record per log() call, in RUN_DIR/metrics.jsonl.

    log = MetricsLog("out/ppo")                 # appends: a resumed run continues the same file
    log = MetricsLog("out/ppo", upto=120)       # resuming from step 120: drops the later records, then appends
    log = MetricsLog("out/ppo", fresh=True, staged=staged)   # a new run: see below
    log.log(step, reward=1.3, kl=0.02)          # -> {"step": 100, "reward": 1.3, "kl": 0.02}
    records = read_metrics("out/ppo")           # [{"step": ..., ...}, ...]; `python -m nanorlhf.plot out/ppo`

Each record is written and flushed at once, so a crash loses at most the line being written (read_metrics skips
a cut-off last line). With several processes (DDP), log from rank 0 only: the others would append the same
figures again, or interleave half lines.

A new run (fresh) with a checkpoint.Staged writes metrics.jsonl.new beside the previous run's metrics.jsonl, and
staged.commit() (right before the run's first checkpoint) moves it over the old file; later records go on into
metrics.jsonl. A run that fails before its first checkpoint leaves the previous run's file as it was.
"""

import json
import math
import os
from pathlib import Path

from nanorlhf.config import UserError

FILENAME = "metrics.jsonl"


def as_number(name, value):
    """A Python number from an int, float, bool, 0-d tensor or NumPy scalar (anything with .item()).

    None stays None (written as null: a figure with nothing to measure this step); plots skip it."""
    if hasattr(value, "item"):
        value = value.item()
    if value is not None and not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} must be a number or None, got {type(value).__name__}")
    return value


class MetricsLog:
    """Append-only JSONL metrics for one run. Call log() on rank 0 only (see the module docstring)."""

    def __init__(self, run_dir, fresh=False, upto=None, staged=None):
        self.path = Path(run_dir) / FILENAME
        if fresh and staged is not None:  # beside the previous run's file until staged.commit()
            self.file = open(staged.path(self.path), "w")
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {self.path.parent} ({e.strerror or e})") from None
        if upto is not None and not fresh and self.path.exists():
            keep_upto(self.path, upto)  # a resumed run: the steps after its checkpoint are logged again
        self.file = open(self.path, "w" if fresh else "a")  # fresh without staging: replaces an old run's file

    def log(self, step: int, **figures) -> dict:
        record = {"step": int(step), **{k: as_number(k, v) for k, v in figures.items()}}
        # NaN and inf are written as JSON's common extensions NaN / Infinity, which json.loads reads back.
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        return record

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def keep_upto(path, step: int) -> None:
    """Rewrite a metrics file (atomically) with only its records up to `step`, and without a cut-off last line."""
    path = Path(path)
    kept = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (or of a metrics file given directly), in the order logged."""
    path = Path(run_dir)
    if path.suffix != ".jsonl":  # a run directory (existing or not: then the error names the file we looked for)
        path = path / FILENAME
    if not path.exists():
        raise UserError(f"{path}: no such file (a run writes it through nanorlhf.metrics.MetricsLog)")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a metrics file")
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the last record
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {line[e.start]:#04x})") from None
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # the run was killed mid-write: only the last line can be cut off
                break
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            raise UserError(f"{path}:{lineno}: expected an object with an integer 'step'")
        records.append(r)
    return records


def is_number(value) -> bool:
    """A finite int or float (not a bool): something a curve can show."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
