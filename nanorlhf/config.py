"""Command-line overrides for a script's @dataclass config, and one-line errors for a user's mistakes.

Every field of the dataclass becomes a flag: `python train_sft.py --lr 3e-5 --max_iters 100`. The string literal
under each field is its help text (`--help` shows them). Booleans take `--flag`, `--flag true` or `--flag false`.

A config checks its own ranges: each dataclass has a __post_init__ right under its fields that calls the helpers
below (at_least, positive, in_range, one_of, require, ...), so a Config made from the command line or in code is
refused at once, with one line naming the flag and what it allows (`--batch_size must be at least 1, got 0`).
Output paths are checked before a run reads or writes anything (check_writable).
"""

import argparse
import ast
import dataclasses
import inspect
import math
import os
import sys
import textwrap
from pathlib import Path


DTYPES = ("auto", "bfloat16", "float32")  # --dtype's values (nanorlhf/dist.py autocast_dtype)


class UserError(Exception):
    """A mistake in the user's input (a file, a field, a flag): printed as one line, no traceback."""


def field_docs(cls) -> dict:
    """{field name: the string literal right below it} from the dataclass's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value
    return docs


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(cls, argv=None):
    """Build cls() with the command line's overrides applied."""
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = type(default)
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, default=default,
                                help=docs.get(f.name, ""))
        else:
            parser.add_argument(f"--{f.name}", type=kind if default is not None else str, default=default,
                                help=docs.get(f.name, ""))
    return cls(**vars(parser.parse_args(argv)))


def run(main, cls):
    """Parse cls from the command line (which checks its ranges) and call main(cfg); a UserError ends the run with
    one line and exit code 2."""
    try:
        main(parse_args(cls))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------------------------------------
# Range checks for a config's __post_init__: each raises a UserError naming the flag, the range and the value.

def require(ok: bool, message: str) -> None:
    """A check that fits no helper below: `require(cfg.min_lr <= cfg.lr, "--min_lr must be at most --lr ...")`."""
    if not ok:
        raise UserError(message)


def at_least(cfg, minimum, *names) -> None:
    """Each of the fields `names` is >= minimum (counts, sizes, intervals: at least 1; or at least 0)."""
    for name in names:
        value = getattr(cfg, name)
        require(value >= minimum, f"--{name} must be at least {minimum}, got {value}")


def positive(cfg, *names) -> None:
    """Each of the fields `names` is > 0 (learning rates, temperatures where log-probs need one, ...)."""
    for name in names:
        value = getattr(cfg, name)
        require(value > 0, f"--{name} must be > 0, got {value}")


def in_range(cfg, name, lo, hi, lo_open=False, hi_open=False) -> None:
    """lo <= field <= hi, with either end open: in_range(cfg, "top_p", 0, 1, lo_open=True) is (0, 1]."""
    value = getattr(cfg, name)
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    require(ok, f"--{name} must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {value}")


def one_of(cfg, name, choices) -> None:
    value = getattr(cfg, name)
    require(value in choices, f"--{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def left_default(cfg, names, why) -> None:
    """Each of the fields `names` keeps its default, where a value would be ignored: else "--NAME {why}"."""
    for name in names:
        require(getattr(cfg, name) == getattr(type(cfg), name), f"--{name} {why}")


def seed_range(cfg, name="seed", lowest=-2 ** 63) -> None:
    """A seed torch accepts: a 64-bit integer."""
    value = getattr(cfg, name)
    require(lowest <= value < 2 ** 63, f"--{name} must be in [{lowest}, 2**63), got {value}")


def finite(cfg) -> None:
    """Every float field is a number: `--lr nan` or `--gamma inf` parse as floats but mean nothing."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float):
            require(math.isfinite(value), f"--{f.name} must be a finite number, got {value}")


def file_name(cfg, *names) -> None:
    """Each of the fields `names` names a file (is not "")."""
    for name in names:
        require(getattr(cfg, name) != "", f"--{name} must name a file, got ''")


def checkpoint_name(cfg, name="out") -> None:
    """A script's checkpoint path has an extension: its metrics go in the folder of the same name without it
    (out/sft.pt -> out/sft/metrics.jsonl), which must not be the checkpoint itself."""
    value = getattr(cfg, name)
    require(Path(value).suffix != "", f"--{name} must be a file name with an extension such as .pt (its metrics go "
                                      f"in the folder of the same name without it), got {value!r}")


def check_room(max_new_tokens: int, block_size: int, source) -> None:
    """A sampled response must leave at least one position of the context for its prompt."""
    require(max_new_tokens < block_size, f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                                         f"context of {source} (block_size {block_size}): use at most "
                                         f"{block_size - 1}")


def check_writable(path, flag: str, directory: bool = False) -> None:
    """Refuse, before a run reads or writes anything, an output that cannot be made: a file where a directory is
    needed (or the other way round), or a missing parent that cannot be created. Nothing is created here."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise UserError(f"{flag} {path}: is a {'file' if directory else 'directory'}, expected a "
                        f"{'directory' if directory else 'file'}")
    parent = path if directory else path.parent
    for p in [parent, *parent.parents]:
        if os.path.lexists(p):
            break
    if not p.is_dir():
        raise UserError(f"{flag} {path}: cannot be created, {p} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot be created, {p} is not writable")
    if not directory and path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: is not writable")
