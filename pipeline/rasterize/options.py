"""How a PDF page is rendered: `RasterOptions` and the pure DPI / pixel-budget planning."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.records import TilePlan
from pipeline.tiling import PageGeometry, TilingOptions

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import RunConfig

RENDER_FLOOR_DPI = 36.0  # the lowest resolution a too-large page is retried at


@dataclass(frozen=True)
class RasterOptions:
    """How pages are rendered.

    `geometry`, when a model is set, is its input builder (picklable, no weights): its
    `target_size(width_pt, height_pt)` decides the size a page needs, its `plan` the canvas
    a page is cut from, and `stretches_to_canvas` whether rendering straight at that canvas
    is what the model would see anyway. Without one, the tiling policy (`tiling`) is the
    geometry (`page_geometry`: the one place that chooses between the two).
    """

    min_dpi: float = 72.0
    max_dpi: float = 300.0
    max_page_pixels: int = 12_000_000
    extract_text: bool = True
    tiling: TilingOptions = field(default_factory=TilingOptions)
    geometry: PageGeometry | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, geometry: PageGeometry | None = None) -> RasterOptions:
        """The run's settings; `geometry` is the model's builder (None: no model)."""
        return cls(
            min_dpi=cfg.min_dpi,
            max_dpi=cfg.max_dpi,
            max_page_pixels=cfg.max_page_pixels,
            extract_text=cfg.extract_text_layer,
            tiling=TilingOptions.from_config(cfg),
            geometry=geometry,
        )

    @property
    def page_geometry(self) -> PageGeometry:
        """The model's geometry when a model is set, else the tiling policy's."""
        return self.geometry if self.geometry is not None else self.tiling

    def target_size(self, width_pt: float, height_pt: float) -> tuple[int, int]:
        """Pixel size a width_pt x height_pt page should be rendered at (before DPI bounds)."""
        return self.page_geometry.target_size(width_pt, height_pt)

    def plan(self, width: int, height: int) -> TilePlan:
        """The tiling of a width x height render (preparation's plan of a rendered page)."""
        return self.page_geometry.plan(width, height)

    def canvas_plan(self, width: int, height: int) -> TilePlan | None:
        """The plan of a width x height render when the page may be rendered straight at
        its canvas (the model stretches pages to it anyway); None when it may not."""
        geometry = self.page_geometry
        return geometry.plan(width, height) if geometry.stretches_to_canvas else None


@dataclass(frozen=True, slots=True)
class DpiPlan:
    """The resolution for one page: what tiling asked for (clamped) and what the budget allows."""

    requested: float
    dpi: float
    width: int
    height: int
    over_budget: bool

def pixel_size(width_pt: float, height_pt: float, dpi: float) -> tuple[int, int]:
    """Pixel size of a width_pt x height_pt page rendered at `dpi` (MuPDF's rounding)."""
    zoom = dpi / 72.0
    return max(1, math.ceil(width_pt * zoom - 1e-3)), max(1, math.ceil(height_pt * zoom - 1e-3))

def choose_dpi(width_pt: float, height_pt: float, options: RasterOptions) -> DpiPlan:
    """DPI giving the target size (the model's, else the tiling policy's), clamped to
    [min_dpi, max_dpi], then held to the pixel budget."""
    target_w, target_h = options.target_size(width_pt, height_pt)
    wanted = 72.0 * max(target_w / width_pt, target_h / height_pt)
    requested = min(max(wanted, options.min_dpi), options.max_dpi)
    w, h = pixel_size(width_pt, height_pt, requested)
    if w * h <= options.max_page_pixels:
        return DpiPlan(requested, requested, w, h, over_budget=False)
    dpi = 72.0 * math.sqrt(options.max_page_pixels / (width_pt * height_pt))
    w, h = pixel_size(width_pt, height_pt, dpi)
    while w * h > options.max_page_pixels and dpi > 1e-3:  # rounding up may add a row or column
        dpi *= 0.999
        w, h = pixel_size(width_pt, height_pt, dpi)
    return DpiPlan(requested, dpi, w, h, over_budget=True)

def fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio and at most `max_pixels` (unchanged if it fits)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while w * h > max_pixels and (w > 1 or h > 1):  # floating-point rounding: trim the longer side
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h
