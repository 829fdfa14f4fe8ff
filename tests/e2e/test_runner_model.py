"""`docpipe run` with a tiny random model: every model column is filled for every page."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_docs"


@pytest.fixture(scope="module")
def tiny_internvl(tiny_model) -> Path:
    return Path(tiny_model("internvl"))  # the session's shared tiny model (conftest)


def _pages(out: Path) -> list[dict]:
    return ds.dataset(out / "pages", format="parquet").to_table().to_pylist()


def test_cli_run_with_a_model_fills_the_model_columns(sample_run) -> None:
    """The session's `sample_run` (conftest): `docpipe run` over sample_docs (and an empty file)
    with the tiny InternVL and 4 new tokens, which other modules read too."""
    tiny_internvl, out = sample_run.model, sample_run.output
    printed = "".join(sample_run.printed.split())  # the table folds long values over lines
    assert "".join(str(tiny_internvl).split()) in printed.replace("│", "")  # the summary names the model
    pages = _pages(out)
    assert len(pages) == 10  # 3 + 1 + 1 + 1 + 1 + 3 pages in sample_docs
    for p in pages:
        assert p["status"] == "ok", p["error_message"]
        assert isinstance(p["description"], str) and isinstance(p["ocr_text"], str)
        assert isinstance(p["chart_check_answer"], str)
        assert p["chart_answers"] is not None
        assert p["model_id"] == str(tiny_internvl) and p["model_dtype"] == "float32"
        assert p["prompt_version"] and p["prompt_tokens"] > p["visual_tokens"]
        assert 3 <= p["generated_tokens"] and p["inference_latency_s"] > 0
        assert p["truncated"] in (True, False) and p["repetitive"] in (True, False)
        assert p["tiling_policy"] == "internvl"


def test_prepared_in_a_worker_process_gives_the_same_answers(tiny_internvl: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLES / "chart.png", src / "chart.png")
    shutil.copy(SAMPLES / "scanned_page.jpg", src / "scanned_page.jpg")
    base = ["run", str(src), "--model", str(tiny_internvl), "--max-new-tokens", "4", "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "inline"), "--prep-workers", "0"]) == 0
    assert main([*base, "--output", str(tmp_path / "pooled"), "--prep-workers", "1"]) == 0

    def answers(out: Path) -> list[tuple]:
        return sorted((p["source_uri"], p["description"], p["ocr_text"], p["generated_tokens"]) for p in _pages(out))

    assert answers(tmp_path / "inline") == answers(tmp_path / "pooled")
