"""Tiling policies: InternVL, MiniMax-VL-01 (anyres), MiniCPM-V 2.0 (LLaVA-UHD slicing).

The grids are checked against independent references: the loop of InternVL's reference
code (seed 002) written out here and, at exact ties, what that code itself output
(recorded) and GotOcr2's tie-break loop walking the seed's candidate order; transformers'
GotOcr2 image processor (InternVL's tiling in transformers), transformers'
`select_best_resolution` (LLaVA-NeXT) and transformers' MiniCPM-V 4.6 slicer (the same
LLaVA-UHD slicing as MiniCPM-V 2.0, see below).
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image

from pipeline.config import RunConfig
from pipeline.records import Stage, StageError, TilePlan
from pipeline.tiling import (
    TilingOptions,
    cut_tiles,
    plan_internvl,
    plan_minicpm,
    plan_minimax,
    plan_tiles,
    target_render_size,
    try_plan_tiles,
)

# ---------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------

EXTREMES = [(1, 1), (1, 5000), (5000, 1), (448, 448), (449, 448), (448, 449), (896, 448), (447, 448),
            (600, 600), (1000, 1000)]
PAGES = [(1700, 2200), (2200, 1700), (2480, 3508), (612, 792), (595, 842), (1275, 1650), (2550, 3300)]
PANORAMAS = [(4000, 500), (500, 4000), (8000, 600), (3000, 200), (12000, 1000), (640, 9000)]
# Exact ties between grids: aspect ratios that sit half-way between two grid ratios.
TIES = [(560, 448), (1120, 896), (448, 560), (4480, 3584), (5, 2), (2500, 1000), (13, 5), (6500, 2500),
        (15, 4), (7500, 2000), (5, 16), (2500, 8000)]


def _random_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.5:  # uniform sizes
            out.append((rng.randint(1, 4000), rng.randint(1, 4000)))
        else:  # log-uniform aspect ratios, page-like areas
            area = rng.uniform(1e4, 2e7)
            aspect = math.exp(rng.uniform(-3, 3))
            out.append((max(1, round(math.sqrt(area * aspect))), max(1, round(math.sqrt(area / aspect)))))
    return out


SIZES = EXTREMES + PAGES + PANORAMAS + TIES + _random_sizes(260, seed=7)
INTERNVL_SETTINGS = [(1, 1), (1, 6), (1, 12), (2, 12), (1, 40)]

# ---------------------------------------------------------------------------------------
# InternVL
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _seed_target_ratios(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """The candidate list of InternVL's `dynamic_preprocess`: a set, stably sorted by area."""
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return tuple(sorted(ratios, key=lambda r: r[0] * r[1]))


def _seed_grid(width: int, height: int, min_num: int, max_num: int, image_size: int = 448) -> tuple[int, int]:
    """InternVL's `find_closest_aspect_ratio`, as the seed describes it."""
    aspect = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for ratio in _seed_target_ratios(min_num, max_num):
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


@pytest.mark.parametrize(("min_num", "max_num"), INTERNVL_SETTINGS)
def test_internvl_grid_matches_the_seed_reference(min_num: int, max_num: int) -> None:
    for width, height in SIZES:
        plan = plan_internvl(width, height, min_num=min_num, max_num=max_num)
        cols, rows = _seed_grid(width, height, min_num, max_num)
        assert (plan.cols, plan.rows) == (cols, rows), (width, height)
        assert (plan.resized_width, plan.resized_height) == (448 * cols, 448 * rows)
        assert plan.thumbnail is (cols * rows > 1)
        assert plan.tiles == cols * rows + (1 if cols * rows > 1 else 0)


@pytest.mark.parametrize(("min_num", "max_num"), INTERNVL_SETTINGS)
def test_internvl_grid_matches_transformers_gotocr2(min_num: int, max_num: int) -> None:
    # GotOcr2's grid picker returns (num_columns, num_rows) from (height, width).
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
        get_optimal_tiled_canvas,
    )

    processor = GotOcr2ImageProcessorPil(crop_to_patches=True, size={"height": 448, "width": 448})
    kwargs = {"min_patches": min_num, "max_patches": max_num}
    for width, height in SIZES:
        plan = plan_internvl(width, height, min_num=min_num, max_num=max_num)
        if max_num > 1:  # GotOcr2 does not crop at all when max_patches == 1
            grid = get_optimal_tiled_canvas((height, width), (448, 448), min_num, max_num)
            assert (plan.cols, plan.rows) == grid, (width, height)
        assert plan.tiles == processor.get_number_of_image_patches(height, width, kwargs), (width, height)


# What the seed's own code (InternVL's `dynamic_preprocess`, seed 002) picks for each size in
# TIES, recorded by running that code; and its candidate grids in the order it tries them
# (a Python set of (i, j), sorted stably by area). Recorded values, not a re-implementation.
SEED_TIE_GRIDS = {
    (4, 4): [(2, 2), (2, 2), (2, 2), (2, 2), (4, 1), (2, 2), (4, 1), (4, 1), (4, 1), (4, 1), (1, 4), (1, 4)],
    (5, 5): [(1, 5), (1, 5), (1, 5), (1, 5), (1, 5), (1, 5), (5, 1), (1, 5), (5, 1), (5, 1), (1, 5), (1, 5)],
    (6, 7): [(3, 2), (3, 2), (2, 3), (3, 2), (3, 2), (3, 2), (3, 2), (3, 2), (6, 1), (3, 2), (1, 6), (1, 6)],
    (8, 9): [(3, 3), (3, 3), (3, 3), (3, 3), (4, 2), (4, 2), (4, 2), (4, 2), (4, 2), (4, 2), (2, 4), (1, 8)],
    (10, 10): [(2, 5), (2, 5), (2, 5), (2, 5), (5, 2), (5, 2), (5, 2), (5, 2), (5, 2), (5, 2), (2, 5), (2, 5)],
    (2, 12): [(4, 3), (4, 3), (3, 4), (4, 3), (5, 2), (5, 2), (5, 2), (5, 2), (4, 1), (4, 1), (1, 3), (2, 6)],
}
SEED_CANDIDATE_ORDER = {
    (4, 4): [(4, 1), (1, 4), (2, 2)],
    (5, 5): [(5, 1), (1, 5)],
    (6, 7): [(6, 1), (2, 3), (1, 6), (3, 2), (7, 1), (1, 7)],
    (8, 9): [(2, 4), (8, 1), (1, 8), (4, 2), (3, 3), (9, 1), (1, 9)],
    (10, 10): [(2, 5), (10, 1), (1, 10), (5, 2)],
}


@pytest.mark.parametrize(("min_num", "max_num"), sorted(SEED_TIE_GRIDS))
def test_internvl_tie_order_follows_the_seed(min_num: int, max_num: int) -> None:
    # With min_num > 1, grids of equal area can tie exactly; the seed's candidate order and
    # GotOcr2's (cols, then rows) then pick different grids, e.g. a 5x2 image with
    # min = max = 4 tiles: seed (4, 1), GotOcr2 (2, 2). We follow the seed (the reference
    # code of the seed checkpoint), as its own output says.
    got = [(p.cols, p.rows) for p in (plan_internvl(w, h, min_num=min_num, max_num=max_num) for w, h in TIES)]
    assert got == SEED_TIE_GRIDS[(min_num, max_num)]


def test_internvl_ties_equal_gotocr2_walking_the_seed_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' GotOcr2 tie-break loop (independent code) over the seed's candidate order
    picks our grids; over its own order it picks others at some ties (so the order matters)."""
    from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as got_ocr2

    from pipeline.tiling import internvl_candidate_grids

    pick = got_ocr2.get_optimal_tiled_canvas.__wrapped__  # its lru_cache would hide the patched order

    def got_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
        return [pick((h, w), (448, 448), min_num, max_num) for w, h in TIES]

    differs = 0
    for (min_num, max_num), order in SEED_CANDIDATE_ORDER.items():
        assert list(internvl_candidate_grids(min_num, max_num)) == order
        ours = [(p.cols, p.rows) for p in (plan_internvl(w, h, min_num=min_num, max_num=max_num) for w, h in TIES)]
        differs += ours != got_grids(min_num, max_num)
        with monkeypatch.context() as patch:
            patch.setattr(got_ocr2, "get_all_supported_aspect_ratios", lambda lo, hi, order=order: list(order))
            assert ours == got_grids(min_num, max_num), (min_num, max_num)
    assert differs >= 3


@pytest.mark.parametrize("size", [(700, 900), (1000, 300), (120, 90), (448, 448), (449, 448), (1700, 2200)])
def test_internvl_tiles_equal_gotocr2_patches(size: tuple[int, int]) -> None:
    from transformers.image_utils import PILImageResampling, SizeDict
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    width, height = size
    pixels = np.random.default_rng(width * 7919 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    processor = GotOcr2ImageProcessorPil(crop_to_patches=True, size={"height": 448, "width": 448})
    patches = processor.crop_image_to_patches(
        pixels, 1, 12, patch_size=SizeDict(height=448, width=448), resample=PILImageResampling.BICUBIC
    )
    ours = cut_tiles(Image.fromarray(pixels), plan_internvl(width, height))
    assert len(ours) == len(patches)
    for tile, patch in zip(ours, patches, strict=True):
        assert np.array_equal(np.asarray(tile), patch)


def test_internvl_letter_page_facts() -> None:
    # DESIGN.md: a 1700x2200 page at max 12 gives a 3x4 grid + thumbnail = 13 tiles, 3328 tokens.
    plan = plan_internvl(1700, 2200, max_num=12)
    assert (plan.cols, plan.rows) == (3, 4)
    assert plan.thumbnail and plan.thumbnail_size == (448, 448)
    assert plan.tiles == 13
    assert plan.visual_tokens == 3328
    assert plan_tiles(1700, 2200, TilingOptions()) == plan


def test_internvl_single_tile_has_no_thumbnail() -> None:
    plan = plan_internvl(448, 448)
    assert (plan.cols, plan.rows, plan.tiles, plan.thumbnail, plan.thumbnail_size) == (1, 1, 1, False, None)
    assert plan_internvl(1700, 2200, use_thumbnail=False).tiles == 12
    assert plan_internvl(1700, 2200, max_num=1).tiles == 1


# ---------------------------------------------------------------------------------------
# cut_tiles
# ---------------------------------------------------------------------------------------


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _reassemble(tiles: list[Image.Image], plan: TilePlan) -> Image.Image:
    canvas = Image.new("RGB", (plan.resized_width, plan.resized_height), (255, 0, 255))
    for tile, box in zip(tiles, plan.boxes, strict=False):
        canvas.paste(tile, (box.left, box.top))
    return canvas


CUT_CASES = [
    ("internvl", (900, 700)),
    ("internvl", (300, 300)),
    ("internvl", (2000, 250)),
    ("minimax", (900, 700)),
    ("minimax", (336, 336)),
    ("minimax", (1000, 120)),
    ("minicpm", (1344, 1344)),
    ("minicpm", (1000, 700)),
    ("minicpm", (300, 300)),
    ("minicpm", (3000, 400)),
]


@pytest.mark.parametrize(("policy", "size"), CUT_CASES)
def test_cut_tiles_reassemble_to_the_resized_page(policy: str, size: tuple[int, int]) -> None:
    image = _noise(*size, seed=size[0] + size[1])
    plan = plan_tiles(*size, TilingOptions(policy=policy))
    tiles = cut_tiles(image, plan)
    assert len(tiles) == plan.tiles
    grid = tiles[: len(plan.boxes)]
    assert all(t.size == (plan.tile_width, plan.tile_height) for t in grid)
    # The boxes tile the resized page exactly: no gaps, no overlaps, row-major.
    assert len(plan.boxes) == plan.cols * plan.rows
    assert sum((b.right - b.left) * (b.bottom - b.top) for b in plan.boxes) == plan.resized_width * plan.resized_height
    assert [(b.top, b.left) for b in plan.boxes] == sorted((b.top, b.left) for b in plan.boxes)
    expected = image.resize((plan.resized_width, plan.resized_height), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(_reassemble(grid, plan)), np.asarray(expected))
    if plan.thumbnail:
        assert plan.thumbnail_size is not None
        assert tiles[-1].size == plan.thumbnail_size
        thumb = image.resize(plan.thumbnail_size, Image.Resampling.BICUBIC)
        assert np.array_equal(np.asarray(tiles[-1]), np.asarray(thumb))


def test_cut_tiles_thumbnail_rules() -> None:
    one = plan_tiles(300, 300, TilingOptions(policy="internvl"))
    many = plan_tiles(900, 700, TilingOptions(policy="internvl"))
    assert not one.thumbnail and len(cut_tiles(_noise(300, 300), one)) == 1
    assert many.thumbnail and len(cut_tiles(_noise(900, 700), many)) == many.cols * many.rows + 1
    small = plan_tiles(336, 336, TilingOptions(policy="minimax"))
    assert (small.cols, small.rows) == (1, 1) and small.thumbnail  # minimax: always a thumbnail
    tiles = cut_tiles(_noise(336, 336), small)
    assert [t.size for t in tiles] == [(336, 336), (336, 336)]
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(_noise(336, 336)))  # no resize at the native size


def test_cut_tiles_honours_resample() -> None:
    image = _noise(900, 700, seed=3)
    plan = plan_internvl(900, 700)
    nearest = cut_tiles(image, plan, resample=Image.Resampling.NEAREST)
    bicubic = cut_tiles(image, plan)
    expected = image.resize((plan.resized_width, plan.resized_height), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(_reassemble(nearest, plan)), np.asarray(expected))
    assert not np.array_equal(np.asarray(nearest[0]), np.asarray(bicubic[0]))


# ---------------------------------------------------------------------------------------
# MiniMax-VL-01
# ---------------------------------------------------------------------------------------


def test_minimax_canvas_matches_llava_next_select_best_resolution() -> None:
    from transformers.image_processing_utils import select_best_resolution

    # transformers takes and returns (height, width); same candidate order as ours.
    pinpoints = [(336 * r, 336 * c) for r in range(1, 7) for c in range(1, 7)]
    for width, height in SIZES:
        plan = plan_minimax(width, height)
        best_h, best_w = select_best_resolution((height, width), pinpoints)
        assert (plan.resized_width, plan.resized_height) == (best_w, best_h), (width, height)
        assert 1 <= plan.cols <= 6 and 1 <= plan.rows <= 6
        assert plan.thumbnail and plan.thumbnail_size == (336, 336)
        assert plan.tiles == plan.cols * plan.rows + 1
        # the processor's count: the thumbnail's 576, then the unpadded 24-per-tile grid with a newline per row
        assert plan.visual_tokens == (plan.w_num + 1) * plan.h_num + 576
        assert plan.w_num <= 24 * plan.cols and plan.h_num <= 24 * plan.rows


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((336, 336), (1, 1)),
        ((300, 300), (1, 1)),
        ((672, 336), (2, 1)),
        ((336, 672), (1, 2)),
        ((2016, 2016), (6, 6)),
        ((5000, 5000), (6, 6)),
        ((1700, 2200), (5, 6)),  # Letter at 200 DPI: fits 1557x2016 in a 1680x2016 canvas
        ((612, 792), (2, 3)),  # Letter at 72 DPI
        ((4000, 500), (6, 1)),
    ],
)
def test_minimax_grids(size: tuple[int, int], grid: tuple[int, int]) -> None:
    plan = plan_minimax(*size)
    assert (plan.cols, plan.rows) == grid
    assert (plan.resized_width, plan.resized_height) == (336 * grid[0], 336 * grid[1])
    assert plan.visual_tokens == (plan.w_num + 1) * plan.h_num + 576
    assert plan_tiles(*size, TilingOptions(policy="minimax")) == plan


def test_the_minimax_policy_is_the_model_builders_plan() -> None:
    """One anyres rule: the no-model `--tiling-policy minimax` and MiniMax-VL-01's builder plan alike
    (a Letter page at 200 dpi: 5x6 tiles on 1680x2016, 16,848 visual tokens, not 31 x 576)."""
    from pipeline.inference.families import minimax_vl_01 as fam

    official = [[336 * c, 336 * r] for c in range(1, 7) for r in range(1, 7)]  # the config.json's pinpoints
    for size in [(1700, 2200), (612, 792), (4000, 500), (336, 336), (900, 700), (1000, 120), (2480, 3508)]:
        ours, builders = plan_tiles(*size, TilingOptions(policy="minimax")), fam.plan_anyres(*size, official)
        assert (ours.cols, ours.rows, ours.visual_tokens, ours.boxes) == (
            builders.cols, builders.rows, builders.visual_tokens, builders.boxes), size
    letter = plan_minimax(1700, 2200)
    assert (letter.cols, letter.rows, letter.visual_tokens) == (5, 6, 16_848)
    assert (letter.content_width, letter.content_height, letter.left) == (1557, 2016, 61)  # keeps its aspect, padded


def test_minimax_ignores_tile_count_options() -> None:
    assert plan_tiles(5000, 5000, TilingOptions(policy="minimax", max_tiles=2)).cols == 6


# ---------------------------------------------------------------------------------------
# MiniCPM-V 2.0
# ---------------------------------------------------------------------------------------


def test_minicpm_1344_square_is_nine_slices_and_an_overview() -> None:
    plan = plan_minicpm(1344, 1344)
    assert (plan.cols, plan.rows) == (3, 3)
    assert (plan.tile_width, plan.tile_height) == (448, 448)
    assert (plan.resized_width, plan.resized_height) == (1344, 1344)
    assert plan.thumbnail and plan.thumbnail_size == (448, 448)
    assert plan.tiles == 10
    assert plan.visual_tokens == 640


def test_minicpm_small_image_is_not_sliced() -> None:
    plan = plan_minicpm(300, 300)
    assert (plan.cols, plan.rows, plan.tiles, plan.thumbnail, plan.thumbnail_size) == (1, 1, 1, False, None)
    assert (plan.resized_width, plan.resized_height) == (448, 448)  # upscaled to the encoder's size
    assert plan.visual_tokens == 64
    at_limit = plan_minicpm(448, 448)
    assert (at_limit.cols, at_limit.rows, at_limit.tiles) == (1, 1, 1)
    assert plan_minicpm(449, 448).tiles == 3  # just above one slice's area: 2 slices + overview


def test_minicpm_ties_keep_the_first_grid() -> None:
    # A square of 1 to 2 slices' area: 1x2 and 2x1 are equally far from its aspect ratio
    # (|log 2|); MiniCPM-V 2.0 keeps the first found (fewest columns): 1 column, 2 rows.
    plan = plan_minicpm(600, 600)
    assert (plan.cols, plan.rows) == (1, 2)
    assert (plan.tile_width, plan.tile_height) == (630, 322)
    assert plan.thumbnail_size == (448, 448)


def test_minicpm_extreme_aspects() -> None:
    wide = plan_minicpm(4000, 500)
    assert (wide.cols, wide.rows) == (8, 1)
    assert (wide.tile_width, wide.tile_height) == (448, 448)
    assert wide.thumbnail_size == (1260, 154)
    needle = plan_minicpm(1, 5000)
    assert (needle.cols, needle.rows, needle.tiles) == (1, 1, 1)
    assert needle.tile_width % 14 == 0 and needle.tile_height % 14 == 0
    assert needle.tile_width >= 14 and needle.tile_height > 10 * needle.tile_width


def test_minicpm_invariants() -> None:
    for width, height in SIZES:
        plan = plan_minicpm(width, height)
        slices = plan.cols * plan.rows
        assert 1 <= slices <= 9
        assert plan.tile_width % 14 == 0 and plan.tile_height % 14 == 0
        assert (plan.resized_width, plan.resized_height) == (plan.cols * plan.tile_width, plan.rows * plan.tile_height)
        assert plan.thumbnail is (slices > 1)
        if plan.thumbnail:
            assert plan.thumbnail_size is not None
            assert all(side % 14 == 0 for side in plan.thumbnail_size)
            assert plan.thumbnail_size[0] * plan.thumbnail_size[1] <= 1.2 * 448 * 448
            # the slices hold at most ~1.8 MP (9 x 448^2), give or take the 14 px rounding
            assert plan.resized_width * plan.resized_height <= 1.2 * 9 * 448 * 448
            multiple = min(math.ceil(width * height / 448**2), 9)
            assert slices in (multiple - 1, multiple, multiple + 1)
            if 0.25 <= width / height <= 4:
                assert 0.75 * 448**2 <= plan.tile_width * plan.tile_height <= 1.25 * 448**2, (width, height)
        assert plan.visual_tokens == plan.tiles * 64


def test_minicpm_matches_transformers_slicer() -> None:
    # transformers' MiniCPM-V 4.6 image processor keeps MiniCPM-V 2.0's LLaVA-UHD slicing
    # (same grid search, same ~scale_resolution^2 sizing); it aligns sides to
    # patch_size * merge_factor, so patch_size=7 with "4x" (merge 2) gives 2.0's 14 px.
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    ref = MiniCPMV4_6ImageProcessorPil()
    for max_slices in (9, 4):
        for width, height in SIZES:
            plan = plan_minicpm(width, height, max_slices=max_slices)
            grid = ref.get_sliced_grid((height, width), max_slices, 448)
            if grid is None:
                h, w = ref.find_best_resize((height, width), 448, 7, "4x", allow_upscale=True)
                assert (plan.cols, plan.rows, plan.thumbnail) == (1, 1, False), (width, height)
                assert (plan.resized_width, plan.resized_height) == (w, h), (width, height)
                continue
            rows, cols = grid
            assert (plan.cols, plan.rows) == (cols, rows), (width, height)
            h, w = ref.get_refine_size((height, width), grid, 448, 7, "4x", allow_upscale=True)
            assert (plan.resized_width, plan.resized_height) == (w, h), (width, height)
            oh, ow = ref.find_best_resize((height, width), 448, 7, "4x", allow_upscale=False)
            assert plan.thumbnail_size == (ow, oh), (width, height)


def test_minicpm_max_tiles_is_capped_at_the_model_limit() -> None:
    capped = plan_tiles(3000, 3000, TilingOptions(policy="minicpm", max_tiles=12))
    assert (capped.cols, capped.rows) == (3, 3)
    few = plan_tiles(3000, 3000, TilingOptions(policy="minicpm", max_tiles=4))
    assert (few.cols, few.rows) == (2, 2)


# ---------------------------------------------------------------------------------------
# Options and dispatch
# ---------------------------------------------------------------------------------------


def test_options_from_config_and_token_defaults() -> None:
    cfg = RunConfig(source="in", output="out", tiling_policy="minicpm", min_tiles=2, max_tiles=6)
    options = TilingOptions.from_config(cfg)
    assert options == TilingOptions(policy="minicpm", min_tiles=2, max_tiles=6, tokens_per_tile=None)
    assert options.resolved_tokens_per_tile == 64
    assert TilingOptions(policy="internvl").resolved_tokens_per_tile == 256
    assert TilingOptions(policy="minimax").resolved_tokens_per_tile == 576 == (336 // 14) ** 2
    custom = TilingOptions(policy="internvl", tokens_per_tile=100)
    assert custom.resolved_tokens_per_tile == 100
    assert plan_tiles(672, 336, custom).visual_tokens == 3 * 100  # 2x1 tiles + thumbnail


def test_internvl_options_reach_the_plan() -> None:
    plan = plan_tiles(1700, 2200, TilingOptions(policy="internvl", min_tiles=1, max_tiles=6))
    assert (plan.cols, plan.rows) == (2, 3)
    assert plan_tiles(448, 448, TilingOptions(policy="internvl", min_tiles=2, max_tiles=12)).tiles == 5  # 2x2 + thumb


@pytest.mark.parametrize(
    "kwargs",
    [{"policy": "hexagons"}, {"min_tiles": 0}, {"min_tiles": 5, "max_tiles": 4}, {"tokens_per_tile": 0}],
)
def test_bad_options_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TilingOptions(**kwargs)


@pytest.mark.parametrize("policy", ["internvl", "minimax", "minicpm"])
def test_bad_page_size_is_an_error_record(policy: str) -> None:
    options = TilingOptions(policy=policy)
    with pytest.raises(ValueError):
        plan_tiles(0, 100, options)
    err = try_plan_tiles(100, 0, options)
    assert isinstance(err, StageError)
    assert (err.stage, err.type) == (Stage.TILING, "invalid_page_size")
    assert "100 x 0" in err.message
    assert isinstance(try_plan_tiles(100, 100, options), TilePlan)


# ---------------------------------------------------------------------------------------
# target_render_size
# ---------------------------------------------------------------------------------------

PAGE_POINTS = [(612, 792), (792, 612), (595.28, 841.89), (841.89, 595.28), (500, 500), (72, 72), (1224, 792),
               (200, 1400), (3000, 400), (612.5, 1008), (1066.05, 255.07), (700.77, 2928.0)]


@pytest.mark.parametrize("policy", ["internvl", "minimax", "minicpm"])
def test_target_render_size_covers_the_grid(policy: str) -> None:
    options = TilingOptions(policy=policy)
    for width_pt, height_pt in PAGE_POINTS:
        w, h = target_render_size(width_pt, height_pt, options)
        assert isinstance(w, int) and isinstance(h, int)
        # the page's aspect ratio: one zoom factor gives both sides, each rounded up
        assert max((w - 1) / width_pt, (h - 1) / height_pt) < min(w / width_pt, h / height_pt) + 1e-9
        # the plan for a page rendered at that size is filled by downsampling
        plan = plan_tiles(w, h, options)
        assert plan.resized_width <= w and plan.resized_height <= h, (width_pt, height_pt)
        # and no larger than needed: one side is tight, or else the size that would make
        # it tight is not filled by downsampling (an exact aspect tie that rounding broke,
        # or a grid that changes with the area)
        if not (w <= plan.resized_width + 1 or h <= plan.resized_height + 1):
            scale = max(plan.resized_width / width_pt, plan.resized_height / height_pt)
            tw, th = math.ceil(width_pt * scale - 1e-9), math.ceil(height_pt * scale - 1e-9)
            tighter = plan_tiles(tw, th, options)
            assert tighter.resized_width > tw or tighter.resized_height > th, (width_pt, height_pt)


def test_target_render_size_examples_and_purity() -> None:
    internvl = TilingOptions()
    letter = target_render_size(612, 792, internvl)
    assert letter == (1385, 1792)  # covers the 3x4 grid (1344x1792) at the Letter aspect
    assert target_render_size(612, 792, internvl) == letter
    assert target_render_size(1224, 1584, internvl) == letter  # depends on the aspect ratio only
    assert target_render_size(612, 792, TilingOptions(max_tiles=6)) == (1039, 1344)  # 2x3 grid
    assert target_render_size(612, 792, TilingOptions(policy="minimax")) == (1680, 2175)  # 5x6 canvas
    assert plan_tiles(*letter, internvl).tiles == 13  # the 3x4 grid + thumbnail, downsampled
    wide = target_render_size(3000, 400, internvl)  # aspect 7.5: an exact tie of 7x1 and 8x1
    assert plan_tiles(*wide, internvl).resized_width <= wide[0]
    minicpm = target_render_size(612, 792, TilingOptions(policy="minicpm"))
    sliced = plan_tiles(*minicpm, TilingOptions(policy="minicpm"))
    assert (sliced.cols, sliced.rows) == (3, 3)
    with pytest.raises(ValueError):
        target_render_size(0, 792, internvl)
