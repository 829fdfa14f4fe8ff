"""`docpipe run` end to end with each seed model's tiny checkpoint (official layout,
trust_remote_code off, no file of the checkpoint executed): every model column is filled
for every page, and the pages table records the model's own page plan."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.inference.loading import load_builder
from pipeline.testing import SEED_FAMILIES, make_tiny_model

SAMPLES = Path(__file__).resolve().parents[2] / "sample_docs"
POLICY = {"minicpm_v2": "minicpm", "mono_internvl": "internvl", "minimax_vl_01": "minimax"}
# Fewer slices/tiles keep the run short on a CI CPU (MiniMax-VL-01's anyres grid takes no bound).
TILE_BOUND = {"minicpm_v2": ["--max-tiles", "2"], "mono_internvl": ["--max-tiles", "2"], "minimax_vl_01": []}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Tiny models on shared cores: one torch thread is much faster than two (conftest)."""


def _pages(out: Path) -> list[dict]:
    return ds.dataset(out / "pages", format="parquet").to_table().to_pylist()


@pytest.mark.parametrize("family", SEED_FAMILIES)
def test_docpipe_run_fills_every_model_column_with_a_seed_model(family: str, tmp_path: Path, capsys) -> None:
    model = make_tiny_model(family, tmp_path / family)
    # official checkpoints ship remote code: here a file that would stop the run if anything executed it
    (model / f"modeling_{family}.py").write_text("raise SystemExit('the checkpoint code must never run')\n")
    out = tmp_path / "out"
    code = main([
        "run", str(SAMPLES), "--output", str(out), "--model", str(model), "--device", "cpu", "--max-new-tokens", "4",
        "--no-progress", "--prep-workers", "0", "--no-trust-remote-code", *TILE_BOUND[family],
    ])
    assert code == 0, capsys.readouterr().err
    pages = _pages(out)
    assert len(pages) == 10  # 3 + 1 + 1 + 1 + 1 + 3 pages in sample_docs
    bound = {"max_tiles": 2} if TILE_BOUND[family] else {}
    builder = load_builder(RunConfig(source=str(SAMPLES), output=str(out), model=str(model), **bound))
    for p in pages:
        assert p["status"] == "ok", p["error_message"]
        assert isinstance(p["description"], str) and isinstance(p["ocr_text"], str)
        assert isinstance(p["chart_check_answer"], str)
        assert p["chart_answers"] is not None
        assert p["model_id"] == str(model) and p["model_dtype"] == "float32" and p["prompt_version"]
        assert p["prompt_tokens"] > p["visual_tokens"] > 0  # the task prompts, each holding the image
        assert p["generated_tokens"] >= 3 and p["inference_latency_s"] > 0
        assert p["tiling_policy"] == POLICY[family]
        # the model's own plan of the rendered page is what the table records
        plan = builder.plan(p["width_px"], p["height_px"])
        assert (p["grid_cols"], p["grid_rows"], p["tile_count"], p["has_thumbnail"], p["visual_tokens"]) == (
            plan.cols, plan.rows, plan.tiles, plan.thumbnail, plan.visual_tokens)
        if family == "minimax_vl_01":
            # the processor's count: thumbnail grid + (w_num + 1) * h_num, not tiles x tokens per tile
            assert p["visual_tokens"] == (plan.w_num + 1) * plan.h_num + plan.base_tokens
            assert p["visual_tokens"] != p["tile_count"] * plan.tokens_per_tile
