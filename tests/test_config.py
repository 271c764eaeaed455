import sys
from dataclasses import dataclass

import pytest

from nanorlhf.config import (UserError, at_least, check_writable, field_docs, finite, in_range, one_of, parse_args,
                             positive, require, run)


@dataclass
class Demo:
    """A demo config."""

    lr: float = 1e-3
    """the learning rate"""
    name: str = "x"
    """a name"""
    steps: int = 10
    """how many"""
    flag: bool = False
    """a switch"""


def test_overrides():
    cfg = parse_args(Demo, ["--lr", "3e-5", "--steps", "7", "--flag", "--name", "y"])
    assert cfg == Demo(lr=3e-5, name="y", steps=7, flag=True)
    assert parse_args(Demo, ["--flag", "false"]).flag is False
    assert parse_args(Demo, []) == Demo()


def test_field_docstrings_are_the_help():
    assert field_docs(Demo) == {"lr": "the learning rate", "name": "a name", "steps": "how many", "flag": "a switch"}


def test_bad_values_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        parse_args(Demo, ["--steps", "ten"])
    assert "invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(Demo, ["--nope", "1"])


@dataclass
class Checked:
    """A config that checks its ranges, as the scripts' do."""

    steps: int = 10
    """how many"""
    lr: float = 1e-3
    """rate"""
    top_p: float = 1.0
    """nucleus"""
    dtype: str = "auto"
    """autocast"""

    def __post_init__(self):
        finite(self)
        at_least(self, 1, "steps")
        positive(self, "lr")
        in_range(self, "top_p", 0, 1, lo_open=True)
        one_of(self, "dtype", ("auto", "float32"))
        require(self.steps < 1000 or self.lr < 1, f"--lr must be below 1 for 1000 steps or more, got {self.lr}")


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--lr", "-0.001"], "--lr must be > 0, got -0.001"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["--dtype", "fp16"], "--dtype must be one of auto, float32, got 'fp16'"),
    (["--steps", "1000", "--lr", "2"], "--lr must be below 1 for 1000 steps or more, got 2.0"),
])
def test_ranges_are_checked_when_a_config_is_made(args, message, monkeypatch, capsys):
    with pytest.raises(UserError) as e:
        parse_args(Checked, args)
    assert str(e.value) == message
    monkeypatch.setattr(sys, "argv", ["script.py", *args])  # the command line: one line, exit 2, main never runs
    with pytest.raises(SystemExit) as e:
        run(lambda cfg: pytest.fail("main ran"), Checked)
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert parse_args(Checked, []) == Checked()


def test_check_writable_refuses_what_cannot_be_made_and_makes_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    check_writable(tmp_path / "new" / "deeper" / "out.pt", "--out")  # fine, and nothing is created
    check_writable(tmp_path / "new", "--out", directory=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]
    for path, directory, message in [(tmp_path / "f" / "out.pt", False, "cannot be created, "),
                                     (tmp_path / "f" / "a" / "b.pt", False, "cannot be created, "),
                                     (tmp_path / "d", False, "is a directory, expected a file"),
                                     (tmp_path / "f", True, "is a file, expected a directory")]:
        with pytest.raises(UserError) as e:
            check_writable(path, "--out", directory=directory)
        assert str(e.value).startswith(f"--out {path}: ") and message in str(e.value)
