"""The model owns the page geometry: with a model set, PDF pages are rendered at the size
that model's own preprocessing wants, not at the canvas of the `tiling_policy` setting."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pymupdf
import pytest

from pipeline import rasterize
from pipeline.config import RunConfig
from pipeline.inference.loading import load_builder
from pipeline.prepare import PageWork, PrepSettings, iter_document
from pipeline.records import DocumentRef
from pipeline.testing import make_tiny_model

# Letter, A4 (portrait), a 16:9 slide, a receipt: width x height in points
PAGES = {"letter": (612.0, 792.0), "a4": (595.28, 841.89), "slide": (960.0, 540.0), "receipt": (226.77, 841.89)}


def _pdf(path: Path) -> Path:
    doc = pymupdf.open()
    for name, (w, h) in PAGES.items():
        page = doc.new_page(width=w, height=h)
        page.insert_text((20, 40), f"A {name} page", fontsize=14)
        page.draw_rect(pymupdf.Rect(20, 60, w - 20, h - 20), color=(0, 0, 0))
    doc.save(path)
    doc.close()
    return path


@pytest.fixture(scope="module")
def pdf(tmp_path_factory) -> Path:
    return _pdf(tmp_path_factory.mktemp("pdf") / "pages.pdf")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {f: make_tiny_model(f, root / f) for f in ("qwen2_vl", "idefics3", "internvl", "minimax_vl_01")}


def _config(pdf: Path, model: Path | None = None, **extra) -> RunConfig:
    return RunConfig(source=str(pdf), output=str(pdf.parent / "out"), model=str(model) if model else None, **extra)


def _renders(pdf: Path, options: rasterize.RasterOptions) -> list[tuple[int, int]]:
    opened = rasterize.open_document(str(pdf), uri=str(pdf), doc_id="d", media_type="application/pdf")
    with opened:
        return [(p.image.width, p.image.height) for p in opened.pages(options)]


def _aspect_error(size: tuple[int, int], page_pt: tuple[float, float]) -> float:
    return abs((size[0] / size[1]) / (page_pt[0] / page_pt[1]) - 1.0)


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "minimax_vl_01"])
def test_pages_keep_their_aspect_ratio_for_models_that_keep_it(family: str, pdf: Path, models) -> None:
    cfg = _config(pdf, models[family])
    builder = load_builder(cfg)
    sizes = _renders(pdf, rasterize.RasterOptions.from_config(cfg, geometry=builder))
    for size, page_pt in zip(sizes, PAGES.values(), strict=True):
        assert _aspect_error(size, page_pt) < 0.01, (family, size, page_pt)
        # at least what the model's own resize asks for (within the DPI bounds): it only downsamples
        target = builder.target_size(*page_pt)
        dpi = rasterize.choose_dpi(*page_pt, rasterize.RasterOptions.from_config(cfg, geometry=builder)).dpi
        if cfg.min_dpi < dpi < cfg.max_dpi:
            assert size[0] >= target[0] - 1 and size[1] >= target[1] - 1, (size, target)


def test_without_the_model_the_internvl_canvas_would_distort_them(pdf: Path, models) -> None:
    # what happened before: the tiling_policy setting (internvl by default) chose the render
    sizes = _renders(pdf, rasterize.RasterOptions.from_config(_config(pdf)))
    errors = {name: _aspect_error(size, pt) for (name, pt), size in zip(PAGES.items(), sizes, strict=True)}
    assert errors["a4"] > 0.05 and errors["slide"] > 0.1, errors  # squeezed 5.7 %, stretched 12.5 %


def test_idefics3_renders_at_its_longest_edge(pdf: Path, models) -> None:
    cfg = _config(pdf, models["idefics3"], min_dpi=1.0, max_dpi=10_000.0)
    builder = load_builder(cfg)
    sizes = _renders(pdf, rasterize.RasterOptions.from_config(cfg, geometry=builder))
    assert all(max(size) in (builder.longest_edge, builder.longest_edge + 1) for size in sizes), sizes


def test_internvl_pages_are_rendered_at_their_tile_canvas(pdf: Path, models) -> None:
    # InternVL stretches every page to its grid's canvas: rendering straight at it is what the model sees
    cfg = _config(pdf, models["internvl"], max_tiles=6, min_dpi=1.0)  # no DPI floor moving the render
    builder = load_builder(cfg)
    assert builder.stretches_to_canvas
    for size in _renders(pdf, rasterize.RasterOptions.from_config(cfg, geometry=builder)):
        plan = builder.plan(*size)
        assert (plan.resized_width, plan.resized_height) == size and plan.tiles <= 7


def test_prepare_renders_with_the_model_it_is_given(pdf: Path, models) -> None:
    cfg = _config(pdf, models["qwen2_vl"])
    builder = load_builder(cfg)
    data = pdf.read_bytes()
    ref = DocumentRef(str(pdf), hashlib.sha256(data).hexdigest(), len(data), "application/pdf")
    pages = [w for w in iter_document(ref, PrepSettings(cfg, builder)) if isinstance(w, PageWork)]
    assert len(pages) == len(PAGES)
    for work, page_pt in zip(pages, PAGES.values(), strict=True):
        size = (work.page.render.width, work.page.render.height)
        assert _aspect_error(size, page_pt) < 0.01, size
        assert work.plan.policy == "qwen2_vl" and work.prepared is not None
        assert work.plan == builder.plan(*size)  # the model's own plan is the one recorded


def test_an_explicit_tiling_policy_that_contradicts_the_model_is_refused(pdf: Path, models) -> None:
    from pipeline.preflight import SetupError, check_model

    with pytest.raises(SetupError, match="tiling-policy"):
        check_model(_config(pdf, models["qwen2_vl"], tiling_policy="internvl"))
    with pytest.raises(SetupError, match="tiling-policy"):
        check_model(_config(pdf, models["minimax_vl_01"], tiling_policy="internvl"))
    assert check_model(_config(pdf, models["minimax_vl_01"], tiling_policy="minimax")).family == "minimax_vl_01"
    assert check_model(_config(pdf, models["qwen2_vl"])).family == "qwen2_vl"  # left out: the model decides



@pytest.mark.parametrize("family", ["internvl", "minimax_vl_01"])
def test_no_page_is_planned_twice(family: str, pdf: Path, models, monkeypatch) -> None:
    """Rendering and preparing a document asks for each page's geometry several times (render
    size, canvas, the recorded plan, build); the family's planner runs once per distinct size."""
    from pipeline.inference.adapters import _memoized

    cfg = _config(pdf, models[family])
    builder = load_builder(cfg)
    cls = type(builder)
    planner = cls.plan.__wrapped__  # the family's own planning, under the memo
    calls: list[tuple[int, int]] = []

    def counting(self, width: int, height: int):
        calls.append((width, height))
        return planner(self, width, height)

    monkeypatch.setattr(cls, "plan", _memoized(counting, "_plan_memo"))
    data = pdf.read_bytes()
    ref = DocumentRef(str(pdf), hashlib.sha256(data).hexdigest(), len(data), "application/pdf")
    pages = [w for w in iter_document(ref, PrepSettings(cfg, builder)) if isinstance(w, PageWork)]
    assert len(pages) == len(PAGES) and all(w.prepared is not None for w in pages)
    assert calls and len(calls) == len(set(calls)), calls  # each size planned once, whoever asked
    rendered = {(w.page.render.width, w.page.render.height) for w in pages}
    assert rendered <= set(calls)  # the recorded plans are among them


def test_one_geometry_gives_the_render_size_the_canvas_and_preparation_s_plan() -> None:
    """RasterOptions.page_geometry is the one switch between the model's geometry and the
    tiling policy's: the render size, the canvas and the plan preparation cuts by all come from it."""
    from pipeline.tiling import TilingOptions, plan_tiles, target_render_size

    policy = TilingOptions(policy="minicpm", max_tiles=6)
    no_model = rasterize.RasterOptions(tiling=policy)
    assert no_model.page_geometry is policy
    assert no_model.target_size(612, 792) == target_render_size(612, 792, policy)
    assert no_model.plan(1000, 1300) == plan_tiles(1000, 1300, policy) == no_model.canvas_plan(1000, 1300)

    class KeepsAspect:  # a model whose preprocessing resizes pages itself (no straight canvas render)
        stretches_to_canvas = False

        def target_size(self, width_pt: float, height_pt: float) -> tuple[int, int]:
            return (10, 20)

        def plan(self, width: int, height: int):
            return plan_tiles(width, height, TilingOptions(policy="minimax"))

    model = rasterize.RasterOptions(tiling=policy, geometry=KeepsAspect())
    assert model.target_size(612, 792) == (10, 20)
    assert model.plan(1000, 1300) == plan_tiles(1000, 1300, TilingOptions(policy="minimax"))
    assert model.canvas_plan(1000, 1300) is None
