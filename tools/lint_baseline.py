"""ruff and mypy over pipeline/ and flows/, held to a recorded baseline that may only shrink.

    python tools/lint_baseline.py            # check: exit 1 when a file has more findings than recorded
    python tools/lint_baseline.py --update   # record the current counts (after fixing findings)

The baseline (tools/lint-baseline.json) counts findings per tool and per file. A file with more
findings than recorded fails the check (fix the new ones); a file with fewer is reported, so the
baseline can be lowered with --update in the same change. Settings of both tools are in
pyproject.toml ([tool.ruff], [tool.mypy]); their versions are pinned in the test extra.
tests/test_lint.py runs this check as part of the suite.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tools" / "lint-baseline.json"
TARGETS = ("pipeline", "flows")
_MYPY_LINE = re.compile(r"^(?P<path>[^:\s]+\.py):\d+(?::\d+)?: error: ")


def ruff_findings(root: Path = ROOT) -> Counter[str]:
    """Findings per file of `ruff check` (pyproject's settings)."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "json", "--no-fix", *TARGETS],
        cwd=root, capture_output=True, text=True, check=False,
    )
    if done.returncode not in (0, 1):  # 1: findings; anything else: ruff itself failed
        raise RuntimeError(f"ruff failed ({done.returncode}): {done.stderr.strip()}")
    return Counter(Path(item["filename"]).resolve().relative_to(root).as_posix() for item in json.loads(done.stdout))


def mypy_findings(root: Path = ROOT) -> Counter[str]:
    """Errors per file of `mypy` (pyproject's settings; its cache makes a second run fast)."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--no-pretty",
         "--hide-error-codes", *TARGETS],
        cwd=root, capture_output=True, text=True, check=False,
    )
    if done.returncode not in (0, 1):
        raise RuntimeError(f"mypy failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")
    found: Counter[str] = Counter()
    for line in done.stdout.splitlines():
        match = _MYPY_LINE.match(line)
        if match:
            found[Path(match["path"]).as_posix()] += 1
    return found


def compare(baseline: dict[str, dict[str, int]], current: dict[str, Counter[str]]) -> tuple[list[str], list[str]]:
    """(files over their baseline, files under it), one line each, per tool."""
    over, under = [], []
    for tool, counts in sorted(current.items()):
        recorded = baseline.get(tool, {})
        for path in sorted(set(counts) | set(recorded)):
            now, then = counts.get(path, 0), recorded.get(path, 0)
            if now > then:
                over.append(f"{tool}: {path}: {now} findings, baseline {then}")
            elif now < then:
                under.append(f"{tool}: {path}: {now} findings, baseline {then}")
    return over, under


def current_findings(root: Path = ROOT) -> dict[str, Counter[str]]:
    return {"ruff": ruff_findings(root), "mypy": mypy_findings(root)}


def load_baseline(path: Path = BASELINE) -> dict[str, dict[str, int]]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_baseline(current: dict[str, Counter[str]], path: Path = BASELINE) -> None:
    data = {tool: dict(sorted(counts.items())) for tool, counts in sorted(current.items())}
    path.write_text(json.dumps(data, indent=1) + "\n")


def report(over: list[str], under: list[str]) -> str:
    lines = []
    if over:
        lines += ["More findings than the baseline (fix them; see `ruff check pipeline flows` and `mypy`):",
                  *(f"  {line}" for line in over)]
    if under:
        lines += ["Fewer findings than the baseline: lower it with `python tools/lint_baseline.py --update`:",
                  *(f"  {line}" for line in under)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="record the current counts as the baseline")
    args = parser.parse_args(argv)
    current = current_findings()
    totals = ", ".join(f"{tool} {sum(counts.values())}" for tool, counts in sorted(current.items()))
    if args.update:
        write_baseline(current)
        print(f"baseline recorded: {totals}")
        return 0
    over, under = compare(load_baseline(), current)
    text = report(over, under)
    if text:
        print(text)
    print(f"findings: {totals}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
