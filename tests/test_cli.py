"""The CLI's command set is a contract (DESIGN.md): freeze it."""

from __future__ import annotations

from click.testing import CliRunner

from featurecache.cli import main

CONTRACT_COMMANDS = {
    "sample-data",
    "build",
    "import",
    "inspect",
    "verify",
    "train",
    "evaluate",
    "bench",
    "demo",
}


def test_help_lists_every_contract_command() -> None:
    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0, out.output
    commands = out.output.split("Commands:")[1].split("\n\n")[0]  # the epilog follows
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert listed == CONTRACT_COMMANDS


def test_every_command_has_help() -> None:
    for name in CONTRACT_COMMANDS:
        out = CliRunner().invoke(main, [name, "--help"])
        assert out.exit_code == 0, (name, out.output)
        assert "Usage:" in out.output
