"""Dynamic-resolution tiling: the policies of the seed models, as pure functions.

Each policy turns a page size (pixels) into a `TilePlan`: the size the page is resized
to, the grid of tiles cut from it (row-major boxes in resized coordinates) and whether a
downsized whole-page image (thumbnail / overview) is added. `cut_tiles` applies a plan to
a PIL image; `target_render_size` says how large a PDF page should be rendered so that its
grid is filled by downsampling. Nothing here does I/O.

Policies
--------
* ``internvl`` (InternVL family, seed 002 Mono-InternVL-2B): 448 px tiles on the grid
  (cols, rows), min_num <= cols*rows <= max_num, whose aspect ratio is closest to the
  page's; resize to the grid, split row-major, add a 448 px thumbnail when there is more
  than one tile. 256 tokens per tile.
* ``minimax`` (MiniMax-VL-01): LLaVA-NeXT "anyres" with 336 px tiles on canvases from
  336x336 to 2016x2016; plus a 336x336 thumbnail, always. 576 = (336/14)^2 tokens a tile.
* ``minicpm`` (MiniCPM-V 2.0): LLaVA-UHD slicing up to 9 slices of ~448x448 (about
  1.8 MP) at the page's aspect ratio, plus an overview image of ~448x448 area; the
  perceiver resampler turns every slice and the overview into 64 tokens.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, ClassVar, Protocol

from PIL import Image

from pipeline.records import Stage, StageError, TileBox, TilePlan

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import RunConfig

POLICIES = ("internvl", "minimax", "minicpm")

DEFAULT_TOKENS_PER_TILE = {
    "internvl": 256,  # InternVL: 448 px tile, 14 px patches, pixel shuffle 0.5 -> (32*32)/4
    "minimax": 576,  # MiniMax-VL-01: 336 px tile, 14 px patches -> (336/14)^2
    "minicpm": 64,  # MiniCPM-V 2.0: the perceiver resampler's query count per slice
}

INTERNVL_TILE = 448
MINIMAX_TILE = 336
MINIMAX_MAX_GRID = 6  # 336 .. 2016 px per side
MINICPM_SCALE_RESOLUTION = 448
MINICPM_PATCH = 14
MINICPM_MAX_SLICES = 9  # MiniCPM-V 2.0's slice_config.max_slice_nums: 9 x 448^2 ~ 1.8 MP


# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------


class PageGeometry(Protocol):
    """Who decides a page's geometry: with a model, its input builder
    (pipeline.inference.adapters.InputBuilder, the only owner of its family's geometry);
    without one, the run's tiling policy (`TilingOptions`). The rasterizer and preparation
    ask it, and nothing else, for a page's render size and plan (pipeline.rasterize.RasterOptions)."""

    @property
    def stretches_to_canvas(self) -> bool:
        """Whether every page is stretched to its plan's canvas, so that rendering straight at
        that canvas is what the model would see anyway."""
        ...

    def target_size(self, width_pt: float, height_pt: float) -> tuple[int, int]:
        """Pixel size to render a width_pt x height_pt page at (before the DPI bounds)."""
        ...

    def plan(self, width: int, height: int) -> TilePlan:
        """The tiling of a width x height image."""
        ...


@dataclass(frozen=True)
class TilingOptions:
    """Which policy and how many tiles.

    `min_tiles` applies to internvl only. `max_tiles` bounds internvl's grid and
    minicpm's slice count; for minicpm it is capped at the model's own limit of 9 slices
    (MINICPM_MAX_SLICES). minimax always uses its fixed 1..6 x 1..6 grid.
    """

    policy: str = "internvl"
    min_tiles: int = 1
    max_tiles: int = 12
    tokens_per_tile: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown tiling policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if self.min_tiles < 1 or self.max_tiles < self.min_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles} and {self.max_tiles}")
        if self.tokens_per_tile is not None and self.tokens_per_tile < 1:
            raise ValueError(f"tokens_per_tile must be positive, got {self.tokens_per_tile}")

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TilingOptions:
        """The tiling settings of a run."""
        return cls(
            policy=cfg.tiling_policy,
            min_tiles=cfg.min_tiles if cfg.min_tiles is not None else 1,
            max_tiles=cfg.max_tiles if cfg.max_tiles is not None else 12,
            tokens_per_tile=cfg.tokens_per_tile,
        )

    # as a PageGeometry (the pages of a run without a model): the policy's canvas is rendered straight
    stretches_to_canvas: ClassVar[bool] = True

    def target_size(self, width_pt: float, height_pt: float) -> tuple[int, int]:
        return target_render_size(width_pt, height_pt, self)

    def plan(self, width: int, height: int) -> TilePlan:
        return plan_tiles(width, height, self)

    @property
    def resolved_tokens_per_tile(self) -> int:
        """`tokens_per_tile`, or the policy's own default when not set."""
        if self.tokens_per_tile is not None:
            return self.tokens_per_tile
        return DEFAULT_TOKENS_PER_TILE[self.policy]


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------


def _check_size(width: int, height: int) -> None:
    if not (isinstance(width, numbers.Integral) and isinstance(height, numbers.Integral)) or width < 1 or height < 1:
        raise ValueError(f"page size must be positive whole pixels, got {width!r} x {height!r}")


def grid_boxes(cols: int, rows: int, tile_width: int, tile_height: int) -> tuple[TileBox, ...]:
    """Row-major boxes of a cols x rows grid of equal tiles, starting at (0, 0)."""
    return tuple(
        TileBox(c * tile_width, r * tile_height, (c + 1) * tile_width, (r + 1) * tile_height)
        for r in range(rows)
        for c in range(cols)
    )


def _grid_plan(
    policy: str,
    cols: int,
    rows: int,
    tile_width: int,
    tile_height: int,
    thumbnail_size: tuple[int, int] | None,
    tokens_per_tile: int,
) -> TilePlan:
    return TilePlan(
        policy=policy,
        cols=cols,
        rows=rows,
        tile_width=tile_width,
        tile_height=tile_height,
        resized_width=cols * tile_width,
        resized_height=rows * tile_height,
        boxes=grid_boxes(cols, rows, tile_width, tile_height),
        thumbnail=thumbnail_size is not None,
        thumbnail_size=thumbnail_size,
        tokens_per_tile=tokens_per_tile,
    )


# ---------------------------------------------------------------------------------------
# InternVL
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def internvl_candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """(cols, rows) grids with min_num <= cols*rows <= max_num, fewest tiles first.

    Grids with the same tile count keep the order of InternVL's reference code, which
    builds a Python set (n, then i, then j) and sorts it stably by area. That order only
    matters at exact aspect-ratio ties between equal-area grids; with min_num = 1 it never
    decides anything (transformers' GotOcr2ImageProcessor, which orders equal-area grids by
    cols then rows, picks the same grids), with larger min_num it can.
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def internvl_grid(
    width: int, height: int, *, min_num: int = 1, max_num: int = 12, image_size: int = INTERNVL_TILE
) -> tuple[int, int]:
    """The (cols, rows) grid InternVL picks for a width x height image.

    The grid whose aspect ratio is closest to the image's; on an exact tie the later
    (larger) grid wins when the image area exceeds half the grid's area.
    """
    _check_size(width, height)
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got {min_num} and {max_num}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), math.inf
    for cols, rows in internvl_candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def plan_internvl(
    width: int,
    height: int,
    *,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = INTERNVL_TILE,
    use_thumbnail: bool = True,
    tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE["internvl"],
) -> TilePlan:
    """InternVL dynamic preprocessing: image_size tiles on the closest-aspect grid.

    The page is resized (stretched) to (image_size*cols, image_size*rows) and split
    row-major; a thumbnail of image_size x image_size is added when there is more than one
    tile and `use_thumbnail`.
    """
    cols, rows = internvl_grid(width, height, min_num=min_num, max_num=max_num, image_size=image_size)
    with_thumb = use_thumbnail and cols * rows > 1
    thumb = (image_size, image_size) if with_thumb else None
    return _grid_plan("internvl", cols, rows, image_size, image_size, thumb, tokens_per_tile)


# ---------------------------------------------------------------------------------------
# MiniMax-VL-01
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def minimax_pinpoints(tile_size: int = MINIMAX_TILE, max_grid: int = MINIMAX_MAX_GRID) -> tuple[tuple[int, int], ...]:
    """Canvas sizes (width, height) = (tile_size*cols, tile_size*rows), cols, rows in 1..max_grid.

    This is the grid the MiniMax-VL-01 model card documents (336x336 up to 2016x2016). The
    checkpoint's exact list lives in its remote-code processor config
    (`image_grid_pinpoints`); it is not read here (no remote code, no hub).
    """
    return tuple((tile_size * c, tile_size * r) for r in range(1, max_grid + 1) for c in range(1, max_grid + 1))


def select_best_canvas(width: int, height: int, canvases: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """LLaVA-NeXT's select_best_resolution over (width, height) canvases.

    Maximise the effective resolution (the image scaled to fit the canvas, never counted
    above its own area); break ties by the least wasted canvas area; earlier wins after that.
    """
    _check_size(width, height)
    best: tuple[int, int] | None = None
    best_effective, best_wasted = 0, math.inf
    for cw, ch in canvases:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cw * ch - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cw, ch), effective, wasted
    if best is None:
        raise ValueError("no canvas to choose from")
    return best


def unpadded_grid(width: int, height: int, grid_w: int, grid_h: int) -> tuple[int, int]:
    """(w_num, h_num): the part of a grid_w x grid_h feature grid that holds the page, the
    centred padding bands removed (integer arithmetic, as MiniMax-VL-01's processor counts it)."""
    if width * grid_h > height * grid_w:  # wider than the canvas: bands above and below
        content = height * grid_w // width
        return grid_w, grid_h - 2 * ((grid_h - content) // 2)
    content = width * grid_h // height
    return grid_w - 2 * ((grid_w - content) // 2), grid_h


def keep_ratio_size(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): the page resized into the canvas keeping its aspect
    ratio, pasted centred (MiniMax-VL-01's processor's keepratio_resize)."""
    if width * canvas_h > height * canvas_w:
        new_h = int(canvas_w * height / width)
        return canvas_w, new_h, 0, (canvas_h - new_h) // 2
    new_w = int(canvas_h * width / height)
    return new_w, canvas_h, (canvas_w - new_w) // 2, 0


@dataclass(frozen=True, slots=True)
class MiniMaxTilePlan(TilePlan):
    """A TilePlan with the anyres facts MiniMax-VL-01's token count needs.

    The page is resized to (content_width, content_height), pasted at (left, top) on a
    black resized_width x resized_height canvas and cut into `boxes`; the thumbnail is
    the whole page stretched to thumbnail_size. Image tokens are not tiles x tokens:
    the thumbnail's grid_side^2, then (w_num + 1) * h_num for the unpadded tile grid.
    """

    image_width: int = 0
    image_height: int = 0
    content_width: int = 0
    content_height: int = 0
    left: int = 0
    top: int = 0
    w_num: int = 0
    h_num: int = 0
    base_tokens: int = 0

    @property
    def visual_tokens(self) -> int:
        return (self.w_num + 1) * self.h_num + self.base_tokens


def plan_minimax(
    width: int,
    height: int,
    *,
    pinpoints: tuple[tuple[int, int], ...] | list | None = None,
    tile_size: int = MINIMAX_TILE,
    patch_size: int = 14,
    max_grid: int = MINIMAX_MAX_GRID,
) -> MiniMaxTilePlan:
    """MiniMax-VL-01's anyres plan, as its processor and the family's builder make it (one rule,
    here): the pinpoint with the best effective resolution (`select_best_canvas`), the page
    resized into it keeping its aspect ratio and centred on black padding, cut into
    tile_size tiles row-major, plus a tile_size thumbnail; visual tokens
    `(w_num + 1) * h_num + (tile/patch)^2`, `w_num` x `h_num` being the unpadded feature grid.
    `pinpoints` (width, height) default to the 336..2016 grid of the model card."""
    if width < 1 or height < 1:
        raise ValueError(f"page size must be positive whole pixels, got {width!r} x {height!r}")
    canvases = tuple((int(w), int(h)) for w, h in pinpoints) if pinpoints else minimax_pinpoints(tile_size, max_grid)
    cw, ch = select_best_canvas(width, height, canvases)
    cols, rows = cw // tile_size, ch // tile_size
    side = tile_size // patch_size
    w_num, h_num = unpadded_grid(width, height, cw // patch_size, ch // patch_size)
    new_w, new_h, left, top = keep_ratio_size(width, height, cw, ch)
    boxes = tuple(TileBox(c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size)
                  for r in range(rows) for c in range(cols))
    return MiniMaxTilePlan(
        policy="minimax", cols=cols, rows=rows, tile_width=tile_size, tile_height=tile_size, resized_width=cw,
        resized_height=ch, boxes=boxes, thumbnail=True, thumbnail_size=(tile_size, tile_size),
        tokens_per_tile=side * side, image_width=width, image_height=height, content_width=new_w,
        content_height=new_h, left=left, top=top, w_num=w_num, h_num=h_num, base_tokens=side * side,
    )


# ---------------------------------------------------------------------------------------
# MiniCPM-V 2.0 (LLaVA-UHD slicing)
# ---------------------------------------------------------------------------------------


def _to_multiple(length: float, step: int) -> int:
    """Nearest multiple of `step` (Python rounding, as the reference), at least `step`."""
    return max(round(length / step) * step, step)


def minicpm_best_size(
    width: float, height: float, *, scale_resolution: int = MINICPM_SCALE_RESOLUTION,
    patch_size: int = MINICPM_PATCH, allow_upscale: bool = False,
) -> tuple[int, int]:
    """Size with ~scale_resolution^2 area at the same aspect ratio, sides multiples of patch_size.

    Images already smaller than that keep their size (rounded to the patch grid) unless
    `allow_upscale`.
    """
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return _to_multiple(width, patch_size), _to_multiple(height, patch_size)


def minicpm_grid(width: int, height: int, *, max_slices: int = MINICPM_MAX_SLICES,
                 scale_resolution: int = MINICPM_SCALE_RESOLUTION) -> tuple[int, int]:
    """The (cols, rows) slice grid; (1, 1) means no slicing.

    multiple = min(ceil(area / scale_resolution^2), max_slices); among grids with
    multiple-1, multiple or multiple+1 slices (not 1, not above max_slices) take the one
    whose log aspect ratio is closest to the image's (first wins on ties).
    """
    _check_size(width, height)
    if max_slices < 1:
        raise ValueError(f"max_slices must be positive, got {max_slices}")
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slices)
    if multiple <= 1:
        return (1, 1)
    log_aspect = math.log(width / height)
    best, best_err = (1, 1), math.inf
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slices:
            continue
        for cols in range(1, count + 1):
            if count % cols:
                continue
            err = abs(log_aspect - math.log(cols / (count // cols)))
            if err < best_err:
                best, best_err = (cols, count // cols), err
    return best


def plan_minicpm(
    width: int,
    height: int,
    *,
    max_slices: int = MINICPM_MAX_SLICES,
    scale_resolution: int = MINICPM_SCALE_RESOLUTION,
    patch_size: int = MINICPM_PATCH,
    tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE["minicpm"],
) -> TilePlan:
    """LLaVA-UHD / MiniCPM-V 2.0 slicing.

    Small images (area up to scale_resolution^2) are not sliced: one tile, the page
    resized (up or down) to ~scale_resolution^2 area at its aspect ratio, sides multiples
    of patch_size, no thumbnail. Larger ones are resized so that each of the cols x rows
    slices has ~scale_resolution^2 area at the slice's aspect (patch-aligned), split
    row-major, and the overview (the page at ~scale_resolution^2, patch-aligned) is the
    thumbnail. Slices are generally not square: see tile_width / tile_height, and
    thumbnail_size for the overview. The model puts the overview *before* the slices;
    `cut_tiles` appends it last, as for the other policies.
    """
    cols, rows = minicpm_grid(width, height, max_slices=max_slices, scale_resolution=scale_resolution)
    if cols * rows == 1:
        w, h = minicpm_best_size(width, height, scale_resolution=scale_resolution, patch_size=patch_size,
                                 allow_upscale=True)
        return _grid_plan("minicpm", 1, 1, w, h, None, tokens_per_tile)
    overview = minicpm_best_size(width, height, scale_resolution=scale_resolution, patch_size=patch_size)
    cell_w = _to_multiple(width, cols) / cols
    cell_h = _to_multiple(height, rows) / rows
    slice_w, slice_h = minicpm_best_size(cell_w, cell_h, scale_resolution=scale_resolution, patch_size=patch_size,
                                         allow_upscale=True)
    return _grid_plan("minicpm", cols, rows, slice_w, slice_h, overview, tokens_per_tile)


# ---------------------------------------------------------------------------------------
# Dispatch, cutting, render size
# ---------------------------------------------------------------------------------------


def plan_tiles(width: int, height: int, options: TilingOptions) -> TilePlan:
    """The plan of `options.policy` for a width x height page (pixels)."""
    tokens = options.resolved_tokens_per_tile
    if options.policy == "internvl":
        return plan_internvl(width, height, min_num=options.min_tiles, max_num=options.max_tiles,
                             tokens_per_tile=tokens)
    if options.policy == "minimax":  # its token count follows from the patch grid, not tokens_per_tile
        return plan_minimax(width, height)
    if options.policy == "minicpm":
        return plan_minicpm(width, height, max_slices=min(options.max_tiles, MINICPM_MAX_SLICES),
                            tokens_per_tile=tokens)
    raise ValueError(f"unknown tiling policy {options.policy!r}")  # pragma: no cover - options validate


def try_plan_tiles(width: int, height: int, options: TilingOptions) -> TilePlan | StageError:
    """`plan_tiles`, with a bad page size returned as a StageError (errors are data)."""
    try:
        return plan_tiles(width, height, options)
    except ValueError as exc:
        return StageError(Stage.TILING, "invalid_page_size", str(exc))


def cut_tiles(
    image: Image.Image,
    plan: TilePlan,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
    thumbnail: Image.Image | None = None,
) -> list[Image.Image]:
    """The tiles of `plan`: the resized page cut row-major, then the thumbnail if any.

    Returns exactly `plan.tiles` images, each tile_width x tile_height, the thumbnail
    thumbnail_size. The thumbnail is made from the original page, not the resized one,
    unless a ready-made `thumbnail` of exactly that size is given (the rasterizer renders
    one for PDF pages, far cheaper than a bicubic downscale of the whole page).
    """
    size = (plan.resized_width, plan.resized_height)
    resized = image if image.size == size else image.resize(size, resample)
    tiles = [resized.crop(box.as_tuple()) for box in plan.boxes]
    if plan.thumbnail:
        if plan.thumbnail_size is None:
            raise ValueError("plan has a thumbnail but no thumbnail_size")
        thumb = plan.thumbnail_size
        if thumbnail is not None and thumbnail.size == thumb:
            tiles.append(thumbnail)
        else:
            tiles.append(image if image.size == thumb else image.resize(thumb, resample))
    return tiles


def _cover(width: float, height: float, target_w: int, target_h: int) -> tuple[int, int]:
    """Smallest size with the aspect ratio of width x height that is at least target_w x target_h."""
    scale = max(target_w / width, target_h / height)
    return max(target_w, math.ceil(width * scale - 1e-9)), max(target_h, math.ceil(height * scale - 1e-9))


def fixed_point_render_size(
    plan: Callable[[int, int], TilePlan], width_pt: float, height_pt: float
) -> tuple[int, int]:
    """A render size of the page's aspect ratio whose plan's canvas fits inside it.

    Starts from the canvas `plan` picks for a huge render of the page (what it wants when
    pixels are plentiful), covers it at the page's aspect ratio, grows until planning at
    that size gives a canvas that fits (a plan may depend on the area), then shrinks while
    the cover of the planned canvas still fits. The same fixed point as
    one rule for every family's planner (`target_render_size` for the policies here; a builder's
    `target_size` with its own `plan`).
    """
    if not (width_pt > 0 and height_pt > 0) or not (math.isfinite(width_pt) and math.isfinite(height_pt)):
        raise ValueError(f"page size must be positive, got {width_pt!r} x {height_pt!r}")

    def fits(size: tuple[int, int]) -> TilePlan | None:
        p = plan(*size)
        return p if p.resized_width <= size[0] and p.resized_height <= size[1] else None

    big = plan(*_cover(width_pt, height_pt, 16_384, 16_384))
    size = _cover(width_pt, height_pt, big.resized_width, big.resized_height)
    for _ in range(32):
        found = fits(size)
        if found is not None:
            break
        grown = plan(*size)
        size = _cover(width_pt, height_pt, max(size[0], grown.resized_width), max(size[1], grown.resized_height))
    else:  # pragma: no cover - defensive
        return size
    for _ in range(32):
        smaller = _cover(width_pt, height_pt, found.resized_width, found.resized_height)
        if smaller == size or not (smaller[0] <= size[0] and smaller[1] <= size[1]):
            break
        smaller_plan = fits(smaller)
        if smaller_plan is None:
            break
        size, found = smaller, smaller_plan
    return size


def target_render_size(width_pt: float, height_pt: float, options: TilingOptions) -> tuple[int, int]:
    """Pixel size to render a width_pt x height_pt page at so its tiles come from downsampling:
    `fixed_point_render_size` of the policy's plan (the rasterizer turns it into a DPI and clamps it)."""
    return fixed_point_render_size(lambda w, h: plan_tiles(w, h, options), width_pt, height_pt)


