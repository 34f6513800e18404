"""``python -m training --help`` says what every flag does, not only its default."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from training.cli import main
from training.config import TrainConfig, build_parser, setting_help

DEFAULT_SUFFIX = re.compile(r"\s*\(default: [^()]*\)$")


def field_flags() -> dict[str, argparse.Action]:
    """The parser's action for each config field, by field name."""
    actions = {action.dest: action for action in build_parser()._actions}
    return {f.name: actions[f.name] for f in dataclasses.fields(TrainConfig)}


def description(action: argparse.Action) -> str:
    """A flag's help text without its trailing "(default: ...)"."""
    assert action.help is not None, action.option_strings
    assert DEFAULT_SUFFIX.search(action.help), f"{action.option_strings} names no default"
    return DEFAULT_SUFFIX.sub("", action.help)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_flag_says_what_it_does(name: str) -> None:
    text = description(field_flags()[name])
    assert len(text.split()) >= 3, f"--{name.replace('_', '-')}: {text!r}"
    assert "default" not in text.lower()


def test_flags_and_yaml_share_one_description() -> None:
    for name, action in field_flags().items():
        assert description(action) == setting_help(name)


def test_descriptions_are_not_copies_of_each_other() -> None:
    texts = [description(action) for action in field_flags().values()]
    assert len(set(texts)) == len(texts)


def test_the_printed_help_shows_descriptions_and_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: no wrapping inside a text
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for name in ("max_seq_len", "packing", "learning_rate", "target_modules"):
        assert setting_help(name) in printed
    assert "(default: 2048)" in printed
    assert "(default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)" in printed
    assert "--no-packing" in printed
