"""Data files: JSONL in the formats of README's "Data formats", read with one-line errors.

    SFT demonstrations   {"prompt": str, "response": str}
    rankings             {"prompt": str, "responses": [str, ...]}      best first, K >= 2
    pairwise comparisons {"prompt": str, "chosen": str, "rejected": str}
    prompts              {"prompt": str}

A response ends with "<|endoftext|>" (added when missing). A bad line stops the run with
`error: FILE:LINE: ...` naming the field, never a traceback.
"""

import gzip
import json
import os
from pathlib import Path

from nanorlhf.config import UserError

END = "<|endoftext|>"


def write_jsonl(path, records) -> None:
    """Write records one JSON object per line, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def open_text(path):
    """Open a text file for reading; a .gz file (as HH-RLHF ships) is decompressed on the fly."""
    return gzip.open(path, "rt") if str(path).endswith(".gz") else open(path)


def json_lines(path):
    """(line number, object) for each non-blank line of a JSONL file; a bad line is a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(r, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(r).__name__}")
            yield lineno, r


def read_jsonl(path, fields: dict) -> list[dict]:
    """Records of a JSONL file, each checked to have `fields` ({name: type}); blank lines are skipped."""
    records = []
    for lineno, r in json_lines(path):
        for name, kind in fields.items():
            if name not in r:
                raise UserError(f"{path}:{lineno}: missing field '{name}'")
            if not isinstance(r[name], kind):
                raise UserError(f"{path}:{lineno}: field '{name}' must be {kind.__name__}, "
                                f"got {type(r[name]).__name__}")
        r["_line"] = lineno
        records.append(r)
    if not records:
        raise UserError(f"{path}: no records")
    return records


def with_end(response: str) -> str:
    return response if response.endswith(END) else response + END


def load_sft(path) -> list[tuple[str, str]]:
    """[(prompt, response)] from SFT demonstrations."""
    return [(r["prompt"], with_end(r["response"])) for r in read_jsonl(path, {"prompt": str, "response": str})]


def load_prompts(path) -> list[str]:
    return [r["prompt"] for r in read_jsonl(path, {"prompt": str})]


def load_rankings(path) -> list[tuple[str, list[str]]]:
    """[(prompt, responses best first)] from a rankings file or a pairwise file (a pair is a ranking of K = 2)."""
    path = Path(path)
    first = read_jsonl_first(path)
    if "chosen" in first:
        recs = read_jsonl(path, {"prompt": str, "chosen": str, "rejected": str})
        return [(r["prompt"], [with_end(r["chosen"]), with_end(r["rejected"])]) for r in recs]
    recs = read_jsonl(path, {"prompt": str, "responses": list})
    out = []
    for r in recs:
        if len(r["responses"]) < 2 or not all(isinstance(x, str) for x in r["responses"]):
            raise UserError(f"{path}:{r['_line']}: field 'responses' must be a list of at least 2 strings")
        out.append((r["prompt"], [with_end(x) for x in r["responses"]]))
    return out


def read_jsonl_first(path) -> dict:
    """The first record of a JSONL file, unchecked (to tell formats apart)."""
    for _, r in json_lines(path):
        return r
    raise UserError(f"{path}: no records")
