"""The command lines the docs show parse, and every training setting has its flag.

A flag lost when commands moved between modules (`train --draft-target`) made a documented
recipe fail with "unrecognized arguments"; these tests parse what the docs show (argparse
only: nothing runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from tidar_export.cli import build_parser
from tidar_export.commands.train import _FLAGS
from tidar_export.train.trainer import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "TRAINING.md", ROOT / "tidar_export" / "demo_model" / "MODEL_CARD.md"]


def doc_commands(path: Path) -> list[str]:
    """`tidar-export ...` command lines of a Markdown file's fenced blocks (a trailing backslash
    continues a line). Inline code spans name commands with placeholders (RUN, CKPT), which
    `test_every_flag_named_in_training_md_exists` covers instead."""
    text = path.read_text()
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("tidar-export "):
                lines.append(line.strip())
    return lines


def subcommand_options() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    return {flag for p in sub.choices.values() for a in p._actions for flag in a.option_strings}


@pytest.mark.parametrize("line", [pytest.param(c, id=c[:60]) for doc in DOCS for c in doc_commands(doc)])
def test_documented_command_parses(line):
    argv = shlex.split(line, comments=True)[1:]
    if argv[0] == "train" and "--draft-target" in argv:
        assert argv[argv.index("--draft-target") + 1] in ("data", "self", "rollout")
    build_parser().parse_args(argv)  # raises on an unknown flag or a bad value


def test_the_docs_show_the_rollout_recipe():
    assert any("--draft-target rollout" in c for c in doc_commands(DOCS[0]))


def test_every_flag_named_in_training_md_exists():
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", DOCS[0].read_text()))
    assert named and not named - subcommand_options(), sorted(named - subcommand_options())


def test_every_training_setting_has_a_flag():
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    sub = next(a for a in build_parser()._actions if a.choices and "train" in a.choices)
    dests = {a.dest for a in sub.choices["train"]._actions}  # _FLAGS, and the few written out (--no-adapter-embed)
    assert set(_FLAGS) <= fields and fields <= dests, sorted((fields - dests) | (set(_FLAGS) - fields))
    args = build_parser().parse_args(["train", "-o", "run", "--draft-target", "rollout", "--rollout-frac", "0.25",
                                      "--rollout-every", "5", "--rollout-pool", "8", "--rollout-prefix-min", "4",
                                      "--rollout-prefix-max", "12"])
    assert (args.draft_target, args.rollout_frac, args.rollout_every, args.rollout_pool, args.rollout_prefix_min,
            args.rollout_prefix_max) == ("rollout", 0.25, 5, 8, 4, 12)


def test_every_flag_has_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    missing = [f"{name} {a.option_strings[0] if a.option_strings else a.dest}"
               for name, p in sub.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, missing


def test_readme_lists_every_command():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^tidar-export (\w+)", readme.split("## Command line", 1)[1], re.M))
    sub = next(a for a in build_parser()._actions if a.choices and "train" in a.choices)
    assert listed == set(sub.choices), sorted(set(sub.choices) ^ listed)
