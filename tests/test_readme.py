"""The README stays true: config reference in sync, every command and flag it shows exists."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from launch.cli import COMMANDS
from tests.conftest import REPO
from umt.config import config_reference

README = (REPO / "README.md").read_text()


def test_config_reference_matches_the_dataclasses():
    block = re.search(
        r"<!-- config-reference:start.*?-->\n(.*?)<!-- config-reference:end -->", README, re.S
    )
    assert block, "README lost its config-reference markers"
    assert block.group(1).strip() == config_reference().strip(), (
        "README config reference is stale: regenerate it with "
        "python -c 'from umt.config import config_reference; print(config_reference())'"
    )


def test_demo_figures_are_those_of_the_recorded_demo_run():
    """README's demo figures are written from docs/demo_results.json, the `results.json` of a
    full `umt demo` run (test_demo keeps that file's format equal to what the demo writes)."""
    from launch.demo import readme_figures

    block = re.search(
        r"<!-- demo-figures:start.*?-->\n(.*?)<!-- demo-figures:end -->", README, re.S
    )
    assert block, "README lost its demo-figures markers"
    results = json.loads((REPO / "docs" / "demo_results.json").read_text())
    assert block.group(1).strip() == readme_figures(results), (
        "README's demo figures are not docs/demo_results.json's: regenerate them with python -c "
        "'import json; from launch.demo import readme_figures; "
        'print(readme_figures(json.load(open("docs/demo_results.json"))))\''
    )


def test_quick_start_test_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    slow = "python -m pytest -q -m slow -n 2 --dist loadgroup tests"
    for command in ('python -m pytest -q -m "not slow" tests', slow):
        assert command in README and command in ci, command


def _shown_commands() -> list[tuple[str, str]]:
    """(command, its line) for every `umt <command> ...` line inside the README's code blocks."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for line in lines:
            m = re.search(r"(?:^|\s)umt (\w+)((?: [^#]*)?)", line)
            if m:
                found.append((m.group(1), m.group(2)))
    return found


def test_every_command_shown_exists():
    shown = _shown_commands()
    assert {"demo", "shard", "train", "submit", "eval", "export", "data"} <= {c for c, _ in shown}
    assert all(c in COMMANDS for c, _ in shown)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["shard", "train", "eval", "export", "submit", "data", "demo"])
def test_every_flag_shown_is_accepted(command):
    flags = {
        f for c, rest in _shown_commands() if c == command for f in re.findall(r"(--[\w-]+)", rest)
    }
    flags.discard("--")
    sub = []
    if command in ("submit", "data"):  # flags belong to a sub-command
        words = [rest.split()[0] for c, rest in _shown_commands() if c == command and rest.split()]
        sub = sorted(set(words))
    helps = ""
    for s in sub or [None]:
        args = [command, s, "--help"] if s else [command, "--help"]
        proc = subprocess.run(
            [sys.executable, "-m", "launch.cli", *args], cwd=REPO, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        helps += proc.stdout
    missing = sorted(f for f in flags if f not in helps)
    assert not missing, f"README shows `umt {command}` flags its --help does not know: {missing}"
