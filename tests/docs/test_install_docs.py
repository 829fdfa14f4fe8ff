"""CI runs exactly the README's Install and Test commands, and the docs name only real flags."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _commands(text: str) -> list[str]:
    """Command lines of a shell text, comments and blank lines dropped."""
    lines = [line.split("  #", 1)[0].strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _section_commands(readme: str, heading: str) -> list[str]:
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [c for block in re.findall(r"```bash\n(.*?)```", section, re.S) for c in _commands(block)]


def test_ci_runs_the_readme_quick_start_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = _section_commands(readme, "Quick start: two commands from a fresh clone")
    assert quick == ["./dev run", "./dev test"]
    assert readme.index("## Quick start") < readme.index("## Install")  # the README leads with them
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert ci[-1] == "./dev test"
    dev = (ROOT / "dev").read_text()
    # the test verb is the README's Test command; the CPU torch comes from the index the Install section names
    assert 'python -m pytest -q "$@"' in dev
    install = _section_commands(readme, "Install")
    cpu_line = next(c for c in install if c.startswith("pip install torch=="))
    assert "CPU_INDEX=https://download.pytorch.org/whl/cpu" in dev and "download.pytorch.org/whl/cpu" in cpu_line
    assert cpu_line.split()[2] == "torch==" + re.search(r"TORCH_VERSION=(\S+)", dev).group(1)
    assert _section_commands(readme, "Test") == ["python -m pytest -q"]


def test_dev_script_is_valid_bash_and_refuses_unknown_verbs() -> None:
    import subprocess

    assert subprocess.run(["bash", "-n", str(ROOT / "dev")]).returncode == 0
    proc = subprocess.run([str(ROOT / "dev"), "nonsense"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: ./dev run" in proc.stderr


def test_docs_use_only_existing_run_flags() -> None:
    from pipeline.cli import build_parser

    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]  # noqa: SLF001
    known = {opt for action in run_parser._actions for opt in action.option_strings}  # noqa: SLF001
    known.add("--some-option")  # deployment.md's placeholder for "any option"
    assert "--source" not in known  # the flag sample_docs/README.md once used
    docs = ["README.md", "sample_docs/README.md", *(str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("docs/*.md")))]
    assert "docs/engines.md" in docs and "docs/deployment.md" in docs
    for doc in docs:
        text = (ROOT / doc).read_text()
        for line in re.findall(r"docpipe run [^\n`]*", text):
            for flag in re.findall(r"(?<!\S)(--[a-z][a-z-]*)", line):
                assert flag in known, f"{doc}: `{line}` uses {flag}, which docpipe run does not have"
