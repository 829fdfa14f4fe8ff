"""ruff and mypy over pipeline/ and flows/ stay within tools/lint-baseline.json (a baseline that
may only shrink: tools/lint_baseline.py says when to lower it)."""

from __future__ import annotations

import warnings
from collections import Counter

from tools import lint_baseline


def test_pipeline_and_flows_have_no_more_lint_or_type_findings_than_the_baseline() -> None:
    over, under = lint_baseline.compare(lint_baseline.load_baseline(), lint_baseline.current_findings())
    assert not over, lint_baseline.report(over, under)
    if under:  # good news: lower the baseline in the same change, so a finding fixed stays fixed
        warnings.warn(lint_baseline.report(over, under), stacklevel=1)


def test_the_comparison_flags_a_file_over_its_baseline_and_one_under_it() -> None:
    baseline = {"ruff": {"pipeline/a.py": 2, "pipeline/b.py": 1}, "mypy": {"pipeline/a.py": 1}}
    current = {"ruff": Counter({"pipeline/a.py": 2, "pipeline/c.py": 1}), "mypy": Counter({"pipeline/a.py": 1})}
    over, under = lint_baseline.compare(baseline, current)
    assert over == ["ruff: pipeline/c.py: 1 findings, baseline 0"]
    assert under == ["ruff: pipeline/b.py: 0 findings, baseline 1"]
    assert "--update" in lint_baseline.report(over, under)


def test_a_new_finding_is_counted(tmp_path) -> None:
    """The counters see a real finding (an unused import; a wrong return type) in a copy of the layout."""
    for target in lint_baseline.TARGETS:
        (tmp_path / target).mkdir()
        (tmp_path / target / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "bad.py").write_text("import os\n\n\ndef f() -> int:\n    return 'x'\n")
    (tmp_path / "pyproject.toml").write_text((lint_baseline.ROOT / "pyproject.toml").read_text())
    assert lint_baseline.ruff_findings(tmp_path) == Counter({"pipeline/bad.py": 1})
    assert lint_baseline.mypy_findings(tmp_path) == Counter({"pipeline/bad.py": 1})
