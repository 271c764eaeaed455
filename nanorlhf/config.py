"""Command-line overrides for a script's @dataclass config, and one-line errors for a user's mistakes.

Every field of the dataclass becomes a flag: `python train_sft.py --lr 3e-5 --max_iters 100`. The string literal
under each field is its help text (`--help` shows them). Booleans take `--flag`, `--flag true` or `--flag false`.
"""

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap


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
    """Parse cls from the command line and call main(cfg); a UserError ends the run with one line and exit code 2."""
    cfg = parse_args(cls)
    try:
        main(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
