"""The README's examples stay true: its network compiles, its commands exist."""
from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from cnnc.check import check
from cnnc.cli import main
from cnnc.frontend.parser import parse

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_language_example_checks():
    section = README.split("## The language", 1)[1]
    source = re.search(r"```\n(.*?)```", section, re.S).group(1)
    net = check(parse(source, "README.md"))
    assert [l.name for l in net.layers] == ["conv1", "conv2", "pool2", "fc3", "probs", "cost"]


def test_setup_commands_match_ci():
    commands = re.search(r"## Set-up.*?```sh\n(.*?)```", README, re.S).group(1)
    test_command = [l for l in commands.splitlines() if "pytest" in l][0]
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_documented_subcommands_exist():
    runner = CliRunner()
    for cmd in ("compile", "check", "plan", "run"):
        result = runner.invoke(main, [cmd, "--help"])
        assert result.exit_code == 0, cmd
