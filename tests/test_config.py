from dataclasses import dataclass

import pytest

from nanorlhf.config import field_docs, parse_args


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
