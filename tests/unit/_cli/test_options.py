"""dataclass_options: one click option per field, None when not given, types and help from the dataclass."""
from dataclasses import dataclass, field

import click
import pytest
from click.testing import CliRunner

from qlora_kit._cli import dataclass_options

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class _Config:
    name: str = field(default="", metadata={"help": "a name"})
    rank: int = field(default=8, metadata={"help": "the rank"})
    modules: tuple[str, ...] = field(default=("q", "v"), metadata={"help": "modules"})
    mode: str = field(default="fast", metadata={"help": "how", "choices": ("fast", "slow")})
    packing: bool = field(default=True, metadata={"help": "pack rows"})
    resume: bool = field(default=False, metadata={"help": "continue"})
    limit: int | None = None
    skipped: str = "x"


def _run(*args, **kw):
    seen = {}
    cmd = click.Command("c", callback=lambda **flags: seen.update(flags),
                        params=dataclass_options(_Config, skip=("skipped",), plain_flags=("resume",), **kw))
    res = CliRunner().invoke(cmd, list(args))
    return res, seen


def test_flags_not_given_are_none_and_given_ones_are_typed():
    res, seen = _run()
    assert res.exit_code == 0, res.output
    assert seen == dict.fromkeys(("name", "rank", "modules", "mode", "packing", "resume", "limit"))
    res, seen = _run("--rank", "4", "--modules", " a, b,,c ", "--mode", "slow", "--no-packing", "--resume",
                     "--limit", "7")
    assert res.exit_code == 0, res.output
    assert seen == {"name": None, "rank": 4, "modules": ("a", "b", "c"), "mode": "slow", "packing": False,
                    "resume": True, "limit": 7}


def test_bad_values_are_usage_errors():
    for args, text in ((("--rank", "x"), "'x' is not a valid integer"), (("--mode", "medium"), "'medium' is not one of"),
                       (("--no-resume",), "No such option '--no-resume'"),
                       (("--skipped", "y"), "No such option '--skipped'")):
        res, _ = _run(*args)
        assert res.exit_code == 2 and text in res.output, res.output


def test_help_shows_each_default_once_in_the_given_format():
    res, _ = _run("--help")
    assert "the rank  [default: 8]" in res.output and "modules  [default: 'q,v']" in res.output
    assert "a name\n" in res.output and "[default: ''" not in res.output  # no suffix for an empty default
    res, _ = _run("--help", default_text=" [default: {}]")
    assert "how [default: fast]" in res.output and "[default: None]" in res.output
