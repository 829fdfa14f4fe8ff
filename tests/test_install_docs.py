"""CI runs exactly the README's Install and Test commands, and the docs name only real flags."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands(text: str) -> list[str]:
    """Command lines of a shell text, comments and blank lines dropped."""
    lines = [line.split("  #", 1)[0].strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _section_commands(readme: str, heading: str) -> list[str]:
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [c for block in re.findall(r"```bash\n(.*?)```", section, re.S) for c in _commands(block)]


def test_ci_runs_the_readme_install_and_test_lines() -> None:
    readme = (ROOT / "README.md").read_text()
    wanted = _section_commands(readme, "Install") + _section_commands(readme, "Test")
    ci = _commands((ROOT / ".ci" / "run").read_text())
    start = ci.index(wanted[0])
    assert ci[start:start + len(wanted)] == wanted
    assert any("download.pytorch.org/whl/cpu" in c for c in wanted)  # the CPU build on any machine


def test_docs_use_only_existing_run_flags() -> None:
    from pipeline.cli import build_parser

    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]  # noqa: SLF001
    known = {opt for action in run_parser._actions for opt in action.option_strings}  # noqa: SLF001
    known.add("--some-option")  # deployment.md's placeholder for "any option"
    assert "--source" not in known  # the flag sample_docs/README.md once used
    for doc in ("README.md", "sample_docs/README.md", "docs/deployment.md"):
        text = (ROOT / doc).read_text()
        for line in re.findall(r"docpipe run [^\n`]*", text):
            for flag in re.findall(r"(?<!\S)(--[a-z][a-z-]*)", line):
                assert flag in known, f"{doc}: `{line}` uses {flag}, which docpipe run does not have"
