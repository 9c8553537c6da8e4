"""The README's code runs, and CI runs the README's test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("code", fenced("python"), ids=lambda code: code.splitlines()[-1][:40])
def test_python_blocks_run(code):
    exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    commands = [block.strip() for block in fenced("bash")]
    assert len(commands) == 2, "the README has exactly two set-up commands: the main job and the tests"
    test_command = next(command for command in commands if "pytest" in command)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
