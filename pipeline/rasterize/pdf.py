"""Rasterize: PDF pages (PyMuPDF) and image files (Pillow) to RGB `PageImage`s, lazily.

    opened = open_document(data, uri=..., doc_id=..., media_type=...)   # OpenedDocument | StageError
    with opened:
        for item in opened.pages(RasterOptions.from_config(cfg)):     # PageImage | PageFailure
            ...

Errors are data: a file that cannot be opened gives a `StageError` (stable `type` codes:
empty_file, unreadable, not_a_pdf, encrypted_pdf, no_pages, corrupt_pdf, corrupt_image,
image_too_large, unsupported_format); a page that cannot be rendered gives a
`PageFailure` (corrupt_page, page_too_large, empty_page, render_failed, corrupt_image,
image_too_large). Nothing is raised out of `open_document` or `pages()`. Only an error
reading the file itself is `retryable`; bad content never is.

The content decides whether a file is read as a PDF or an image (the claimed media type
only when the content is neither). A file that opens damaged says so in
`OpenedDocument.repaired` / `open_note`; a multi-page TIFF cut part way keeps every frame
before the cut, and the frame at the cut becomes a failed page.

PDF pages are rendered at the size the model's own preprocessing wants (the model owns
the page geometry: `RasterOptions.geometry` is the model's input builder, whose
`target_size` gives it; without a model, the tiling policy's), clamped to
[min_dpi, max_dpi], then held to the pixel budget; a page too large for the renderer is
retried at half the resolution until it fits. The page keeps its aspect ratio, except
for families whose preprocessing stretches every page to a tile canvas anyway (InternVL):
their pages are rendered straight at that canvas. Page kinds come from cheap measurements
(text layer, image coverage, vector paths, uniformity of the render), never OCR.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pymupdf
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.records import PageFailure, PageImage, PageKind, RenderInfo, Stage, StageError, TilePlan
from pipeline.tiling import TilingOptions, plan_tiles, target_render_size

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import RunConfig

__all__ = [
    "RENDER_FLOOR_DPI",
    "DpiPlan",
    "ImageDocument",
    "OpenedDocument",
    "PageFeatures",
    "PdfDocument",
    "RasterOptions",
    "choose_dpi",
    "classify_page",
    "fit_pixels",
    "is_uniform",
    "open_document",
    "pixel_size",
    "render_looks_failed",
    "to_rgb",
]

RENDER_FLOOR_DPI = 36.0  # the lowest resolution a too-large page is retried at
SCAN_COVERAGE = 0.5  # images cover at least this share of a scanned page
FULL_COVERAGE = 0.9  # ... and this much when the OCR text under the image is visible
UNIFORM_RANGE = 24  # largest per-channel spread (0-255) of a "nearly uniform" render
HEAD_BYTES = 1024  # a PDF header must start within this many bytes

IMAGE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "TIFF", "WEBP", "BMP"})
MULTI_FRAME_FORMATS = frozenset({"TIFF"})  # every frame is a page; others: first frame only

# EXIF orientation -> clockwise degrees applied to display it (mirrored ones as their rotation).
_EXIF_ROTATION = {1: 0, 2: 0, 3: 180, 4: 180, 5: 270, 6: 90, 7: 90, 8: 270}
_PDF_HEADER = re.compile(rb"^(?:\xef\xbb\xbf|[ \t\r\n\f\x00])*%PDF-")  # BOM/whitespace allowed first
_LIMIT_WARNING = re.compile(
    r"overly large|too large|out of memory|cannot allocate|malloc|memory limit|limit exceeded|overflow", re.I
)
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"BM", b"GIF8")
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})  # BITMAPCOREHEADER ... BITMAPV5HEADER

# Damaged files make MuPDF print "MuPDF error: ..." to stdout; they are still collected
# (TOOLS.mupdf_warnings) and surface in RenderInfo.note or the StageError instead.
pymupdf.TOOLS.mupdf_display_errors(False)


@dataclass(frozen=True)
class RasterOptions:
    """How pages are rendered.

    `geometry`, when a model is set, is its input builder (picklable, no weights): its
    `target_size(width_pt, height_pt)` decides the size a page needs, its `plan` the canvas
    a page is cut from, and `stretches_to_canvas` whether rendering straight at that canvas
    is what the model would see anyway. Without one, `tiling` decides as before.
    """

    min_dpi: float = 72.0
    max_dpi: float = 300.0
    max_page_pixels: int = 12_000_000
    extract_text: bool = True
    tiling: TilingOptions = field(default_factory=TilingOptions)
    geometry: Any = None

    @classmethod
    def from_config(cls, cfg: RunConfig, geometry: Any = None) -> RasterOptions:
        """The run's settings; `geometry` is the model's builder (one that says no
        `target_size`, e.g. a test stand-in, leaves the tiling policy in charge)."""
        if not callable(getattr(geometry, "target_size", None)):
            geometry = None
        return cls(
            min_dpi=cfg.min_dpi,
            max_dpi=cfg.max_dpi,
            max_page_pixels=cfg.max_page_pixels,
            extract_text=cfg.extract_text_layer,
            tiling=TilingOptions.from_config(cfg),
            geometry=geometry,
        )

    def target_size(self, width_pt: float, height_pt: float) -> tuple[int, int]:
        """Pixel size a width_pt x height_pt page should be rendered at (before DPI bounds)."""
        if self.geometry is not None:
            return self.geometry.target_size(width_pt, height_pt)
        return target_render_size(width_pt, height_pt, self.tiling)

    def canvas_plan(self, width: int, height: int) -> TilePlan | None:
        """The plan of a width x height render when the page may be rendered straight at
        its canvas (the model stretches pages to it anyway); None when it may not."""
        if self.geometry is not None:
            if not getattr(self.geometry, "stretches_to_canvas", False):
                return None
            return self.geometry.plan(width, height)
        return plan_tiles(width, height, self.tiling)


# ---------------------------------------------------------------- pure planning


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


@dataclass(frozen=True, slots=True)
class PageFeatures:
    """Cheap measurements of a page that decide its kind."""

    has_text: bool  # the text layer holds non-blank characters
    invisible_text: float = 0.0  # share of text drawn invisibly (render mode 3, as OCR layers are)
    image_coverage: float = 0.0  # share of the page area under images, 0..1
    vector_items: int = 0  # filled or stroked paths and shadings
    uniform: bool = False  # the render is nearly one colour


def classify_page(f: PageFeatures) -> PageKind:
    """born_digital / scan / scan_with_ocr / blank from measured features."""
    if f.uniform or not (f.has_text or f.image_coverage > 0 or f.vector_items):
        return PageKind.BLANK
    if not f.has_text and (f.image_coverage >= SCAN_COVERAGE or not f.vector_items):
        return PageKind.SCAN  # an image of a page (or only images) and no text layer
    if f.has_text and f.image_coverage >= SCAN_COVERAGE and (
        f.invisible_text >= 0.5 or f.image_coverage >= FULL_COVERAGE
    ):
        return PageKind.SCAN_WITH_OCR
    return PageKind.BORN_DIGITAL


def render_looks_failed(warnings_text: str, uniform: bool) -> bool:
    """MuPDF sometimes renders an over-large page all white with only a warning."""
    return uniform and bool(_LIMIT_WARNING.search(warnings_text))


def is_uniform(image: Image.Image, tolerance: int = UNIFORM_RANGE) -> bool:
    """True when every channel of `image` spans at most `tolerance` levels (noise averaged out)."""
    factor = 4 if min(image.size) >= 400 else 1
    small = image.reduce(factor) if factor > 1 else image
    extrema = small.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    return max(hi - lo for lo, hi in bands) <= tolerance


SCAN_LIGHT_SHARE = 0.5  # a scanned page is mostly paper...
SCAN_COLOUR_SHARE = 0.02  # ...and almost nothing on it is strongly coloured


def looks_like_scan(image: Image.Image) -> bool:
    """Whether an image file is a scanned page rather than a photo, chart or figure: most of
    it is light (paper) and hardly any of it is saturated colour. Cheap: a 256 px copy."""
    small = image.copy()
    small.thumbnail((256, 256))
    light = (np.asarray(small.convert("L")) > 200).mean()
    colour = (np.asarray(small.convert("HSV"))[..., 1] > 60).mean()
    return bool(light >= SCAN_LIGHT_SHARE and colour < SCAN_COLOUR_SHARE)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white, 16-bit scaled down."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_8bit(np.asarray(image), mode), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16"):
        return (arr.astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64))
        top = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        return np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
    high = int(arr.max(initial=0))  # mode I: 8- or 16-bit data in 32-bit ints
    if high <= 255:
        return np.clip(arr, 0, 255).astype(np.uint8)
    top = 65535 if high <= 65535 else high
    return (np.clip(arr, 0, None).astype(np.float64) * (255.0 / top)).astype(np.uint8)


# ---------------------------------------------------------------- documents


class OpenedDocument(ABC):
    """An opened file whose pages are rasterized on demand. Close it (or use `with`).

    `repaired` says MuPDF had to rebuild a damaged PDF's structure to read it (the pages
    may not be what the author wrote); `open_note` is one plain sentence about what was
    wrong with a file that still opened (a repair, a TIFF cut after some frame), or None.
    Both are final once `pages()` has run: a PDF can be repaired while a page is loaded.
    """

    def __init__(self, uri: str, doc_id: str, page_count: int) -> None:
        self.uri = uri
        self.doc_id = doc_id
        self.page_count = page_count
        self.repaired = False
        self.open_note: str | None = None
        self._closed = False

    @abstractmethod
    def pages(self, options: RasterOptions) -> Iterator[PageImage | PageFailure]:
        """Yield every page in order, one at a time; never raises."""

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _failure(self, page_number: int, type_: str, message: str) -> PageFailure:
        return PageFailure(self.doc_id, self.uri, page_number, StageError(Stage.RASTERIZE, type_, message))


class _PageTooLarge(Exception):
    """No resolution down to the floor could be rendered."""


STORE_SHRINK_EVERY = 32  # pages between emptying MuPDF's resource store


class PdfDocument(OpenedDocument):
    """A PDF opened with PyMuPDF."""

    def __init__(self, doc: pymupdf.Document, uri: str, doc_id: str, *, truncated: bool = False) -> None:
        super().__init__(uri, doc_id, doc.page_count)
        self._doc = doc
        self._truncated = truncated
        self._note_repair(None)

    def _note_repair(self, page_number: int | None) -> None:
        """Record that MuPDF repaired the file (at opening, or while loading `page_number`)."""
        if self.repaired or self._closed or not getattr(self._doc, "is_repaired", False):
            return
        self.repaired = True
        if page_number is None:
            cut = "the file is truncated (no %%EOF marker); " if self._truncated else ""
            self.open_note = f"{cut}MuPDF repaired the file's cross-reference table on opening"
        else:
            self.open_note = f"MuPDF repaired the file's cross-reference table while reading page {page_number}"

    def close(self) -> None:
        if not self._closed:
            self._doc.close()
        super().close()

    def pages(self, options: RasterOptions) -> Iterator[PageImage | PageFailure]:
        for index in range(self.page_count):
            if index and index % STORE_SHRINK_EVERY == 0:
                # MuPDF caches decoded resources in a global store that otherwise grows with
                # the length of the document (about 35 MB per 1,000 Letter pages).
                pymupdf.TOOLS.store_shrink(100)
            page = self._page(index, options)
            self._note_repair(index + 1)
            yield page

    def _page(self, index: int, options: RasterOptions) -> PageImage | PageFailure:
        number = index + 1
        if self._closed:
            return self._failure(number, "render_failed", "the document was closed before this page was rendered")
        try:
            page = self._doc.load_page(index)
        except Exception as exc:  # noqa: BLE001 - MuPDF errors are not all RuntimeErrors
            return self._failure(number, "corrupt_page", f"page {number} cannot be loaded: {_describe(exc)}")
        try:
            return self._render_page(page, number, options)
        except _PageTooLarge as exc:
            return self._failure(number, "page_too_large", str(exc))
        except Exception as exc:  # noqa: BLE001
            return self._failure(number, "render_failed", f"page {number} cannot be rendered: {_describe(exc)}")

    def _render_page(self, page: pymupdf.Page, number: int, options: RasterOptions) -> PageImage | PageFailure:
        rect = page.rect
        if rect.is_empty or rect.width < 1 or rect.height < 1:
            return self._failure(number, "empty_page", f"page {number} has an empty page box {tuple(rect)}")
        plan = choose_dpi(rect.width, rect.height, options)
        image, dpi, notes = _render_with_fallback(page, plan, options)
        thumbnail = _render_thumbnail(page, image, options)
        text = _page_text(page) if options.extract_text else None
        features = _measure(page, image, text)
        return PageImage(
            doc_id=self.doc_id,
            uri=self.uri,
            page_number=number,
            image=image,
            render=RenderInfo(
                width=image.width,
                height=image.height,
                dpi=round(float(dpi), 3),
                requested_dpi=round(float(plan.requested), 3),
                downscaled=plan.over_budget or any("retried at" in n for n in notes),
                note="; ".join(notes) or None,
            ),
            kind=classify_page(features),
            text=text,
            rotation=page.rotation % 360,
            thumbnail=thumbnail,
        )


def _render_thumbnail(page: pymupdf.Page, image: Image.Image, options: RasterOptions) -> Image.Image | None:
    """The policy's whole-page thumbnail rendered directly (about 1 ms instead of ~30 ms of
    bicubic downscaling), when the page was rendered at its tile canvas and the plan has one."""
    try:
        tiles = options.canvas_plan(image.width, image.height)
    except ValueError:
        return None
    if tiles is None or not tiles.thumbnail or tiles.thumbnail_size is None:
        return None
    if (tiles.resized_width, tiles.resized_height) != image.size:
        return None  # not a canvas render: let tiling resize as usual
    try:
        return _render_canvas(page, tiles.thumbnail_size)
    except Exception:  # noqa: BLE001 - the thumbnail is an optimisation, never a failure
        return None


def _render_with_fallback(page: pymupdf.Page, plan: DpiPlan, options: RasterOptions) -> tuple[Image.Image, float, list[str]]:
    """Render at plan.dpi; on a renderer limit retry at half the resolution down to the floor."""
    notes: list[str] = []
    if plan.over_budget:
        notes.append(
            f"scaled to {plan.dpi:.0f} dpi to stay within the {options.max_page_pixels:,} pixel page budget"
            f" (requested {plan.requested:.0f} dpi)"
        )
    dpi = plan.dpi
    floor = min(RENDER_FLOOR_DPI, dpi)
    # First choice: render straight at the tile canvas the policy will cut this page from,
    # so the tiles need no resampling (the models stretch the page to that canvas anyway).
    canvas = None if plan.over_budget else _tile_canvas(plan, options)
    while True:
        pymupdf.TOOLS.mupdf_warnings(reset=True)
        try:
            image = _render(page, dpi, canvas)
            if canvas is not None:
                dpi = _canvas_dpi(page, canvas)
            warned = pymupdf.TOOLS.mupdf_warnings(reset=True)
            if not (warned and render_looks_failed(warned, is_uniform(image))):
                if warned:
                    notes.append("renderer warnings: " + _first_line(warned))
                return image, dpi, notes
            reason = "rendered blank with the warning: " + _first_line(warned)
            del image
        except (pymupdf.mupdf.FzErrorLimit, MemoryError) as exc:
            reason = _describe(exc)
        if canvas is not None:  # fall back to the plain render path and its retries
            canvas, dpi = None, plan.dpi
            continue
        if dpi / 2 < floor:
            raise _PageTooLarge(
                f"page too large to render even at {dpi:.0f} dpi ({page.rect.width:.0f}x{page.rect.height:.0f} pt): {reason}"
            )
        notes.append(f"{dpi:.0f} dpi failed ({reason}); retried at {dpi / 2:.0f} dpi")
        dpi /= 2


def _tile_canvas(plan: DpiPlan, options: RasterOptions) -> tuple[int, int] | None:
    """The (width, height) the tiling policy resizes a plan.width x plan.height render to."""
    try:
        tiles = options.canvas_plan(plan.width, plan.height)
    except ValueError:
        return None
    if tiles is None:
        return None  # the model keeps the page's aspect ratio: render it as it is
    canvas = (tiles.resized_width, tiles.resized_height)
    # Only when planning at the canvas size gives the same canvas (true for the fixed-grid
    # policies; MiniCPM's choice depends on the area, so it may not hold there).
    again = options.canvas_plan(canvas[0], canvas[1])
    if again is None or (again.resized_width, again.resized_height) != canvas:
        return None
    # Only when the canvas is about the planned size: if min_dpi or max_dpi moved the render
    # far from what the tiles need, honour the requested resolution instead.
    # Never above the planned resolution (so never above max_dpi), and not far below it.
    if canvas[0] > plan.width or canvas[1] > plan.height:
        return None
    if canvas[0] * canvas[1] < 0.8 * plan.width * plan.height:
        return None
    return canvas


def _canvas_dpi(page: pymupdf.Page, canvas: tuple[int, int]) -> float:
    """Resolution of a canvas render: geometric mean of the horizontal and vertical DPI."""
    return 72.0 * math.sqrt(canvas[0] / page.rect.width * canvas[1] / page.rect.height)


def _render_canvas(page: pymupdf.Page, canvas: tuple[int, int]) -> Image.Image:
    """Render the page stretched to exactly `canvas` pixels."""
    rect = page.rect
    w, h = canvas
    # MuPDF rounds the pixel box outward: aim a hair under the size to land on it exactly.
    matrix = pymupdf.Matrix((w - 1e-3) / rect.width, (h - 1e-3) / rect.height)
    pix = page.get_pixmap(matrix=matrix, colorspace=pymupdf.csRGB, alpha=False)
    image = Image.frombuffer("RGB", (pix.width, pix.height), pix.samples_mv, "raw", "RGB", pix.stride, 1)
    image = image.copy() if image.readonly else image
    if image.size != canvas:  # rounding surprise: resample the last pixel away
        image = image.resize(canvas, Image.Resampling.BICUBIC)
    return image


def _render(page: pymupdf.Page, dpi: float, canvas: tuple[int, int] | None = None) -> Image.Image:
    """Render at `dpi`, or stretched to exactly `canvas` pixels when one is given."""
    if canvas is not None:
        return _render_canvas(page, canvas)
    zoom = dpi / 72.0
    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
    # RGB cannot share the buffer in Pillow, so frombuffer decodes into an image of its own
    # (cheaper than frombytes(pix.samples), which copies twice); copy only if it did share.
    image = Image.frombuffer("RGB", (pix.width, pix.height), pix.samples_mv, "raw", "RGB", pix.stride, 1)
    return image.copy() if image.readonly else image


def words_to_text(words: list[tuple[Any, ...]]) -> str:
    """Lines of text from PyMuPDF word tuples (x0, y0, x1, y1, word, ...); pure."""
    lines: list[tuple[float, float, list[tuple[float, str]]]] = []  # (top, bottom, [(x0, word)])
    for x0, y0, x1, y1, word, *_ in sorted(words, key=lambda w: ((w[1] + w[3]) / 2, w[0])):
        middle = (y0 + y1) / 2
        if lines and lines[-1][0] <= middle <= lines[-1][1]:
            top, bottom, items = lines[-1]
            items.append((x0, word))
            lines[-1] = (min(top, y0), max(bottom, y1), items)
        else:
            lines.append((y0, y1, [(x0, word)]))
    out: list[str] = []
    previous_bottom = None
    for top, bottom, items in lines:
        height = max(bottom - top, 1e-3)
        if previous_bottom is not None and top - previous_bottom > 0.8 * height:
            out.append("")  # a vertical gap: a new paragraph
        out.append(" ".join(word for _, word in sorted(items)))
        previous_bottom = bottom
    return "\n".join(out)


def _page_text(page: pymupdf.Page) -> str:
    """The text layer in reading order (clipped to the page), trailing spaces and blank runs trimmed."""
    clip = page.rect * page.derotation_matrix  # text coordinates are unrotated
    # Words grouped into lines by their vertical extent, lines top to bottom, words left to
    # right: table cells on one baseline stay one row. This is the order sort=True gives,
    # without its per-line Python work (about 4 ms a page against under 1 ms here).
    raw = words_to_text(page.get_text("words", clip=clip))
    lines = [line.rstrip() for line in raw.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def _measure(page: pymupdf.Page, image: Image.Image, text: str | None) -> PageFeatures:
    """Features for `classify_page` from one bbox pass over the page (and the render if needed)."""
    try:
        log = page.get_bboxlog()
    except Exception:  # noqa: BLE001 - classification must not fail the page
        log = []
    box = page.rect * page.derotation_matrix  # the log is in unrotated coordinates
    area = box.width * box.height
    visible = invisible = vectors = 0
    image_area = 0.0
    for entry in log:
        kind, (x0, y0, x1, y1) = entry[0], entry[1]
        if kind in ("fill-text", "stroke-text"):
            visible += 1
        elif kind == "ignore-text":
            invisible += 1
        elif kind in ("fill-image", "fill-imgmask"):
            w = max(0.0, min(x1, box.x1) - max(x0, box.x0))
            h = max(0.0, min(y1, box.y1) - max(y0, box.y0))
            image_area += w * h
        elif kind in ("fill-path", "stroke-path", "fill-shade"):
            vectors += 1
    has_text = bool(text.strip()) if text is not None else (visible + invisible) > 0
    features = PageFeatures(
        has_text=has_text,
        invisible_text=invisible / (visible + invisible) if visible + invisible else 0.0,
        image_coverage=min(1.0, image_area / area) if area > 0 else 0.0,
        vector_items=vectors,
    )
    if not has_text and (features.image_coverage > 0 or vectors):
        features = dataclasses.replace(features, uniform=is_uniform(image))
    return features


class ImageDocument(OpenedDocument):
    """An image file opened with Pillow; each TIFF frame is a page.

    `broken_frame` (why the frame after the last readable one cannot be sought to) makes
    that frame one more page, which fails: the file is cut or damaged there, so how many
    frames it had is unknown, but the frames before the break are kept.
    """

    def __init__(
        self, image: Image.Image, uri: str, doc_id: str, page_count: int, *, broken_frame: str | None = None
    ) -> None:
        super().__init__(uri, doc_id, page_count + (broken_frame is not None))
        self._image = image
        self._readable = page_count
        self._broken_frame = broken_frame
        if broken_frame is not None:
            kept = "frame 1 is" if page_count == 1 else f"frames 1-{page_count} are"
            self.open_note = f"the file is cut off or damaged after frame {page_count}: {kept} read, any later ones are lost"

    def close(self) -> None:
        if not self._closed:
            self._image.close()
        super().close()

    def pages(self, options: RasterOptions) -> Iterator[PageImage | PageFailure]:
        for index in range(self.page_count):
            yield self._frame(index, options)

    def _frame(self, index: int, options: RasterOptions) -> PageImage | PageFailure:
        number = index + 1
        where = f"frame {number} of {self.page_count}" if self.page_count > 1 else "the image"
        if self._closed:
            return self._failure(number, "corrupt_image", "the document was closed before this frame was read")
        if index >= self._readable:
            return self._failure(
                number,
                "corrupt_image",
                f"frame {number} cannot be read: the file is cut off or damaged after frame {self._readable}"
                f" ({self._broken_frame})",
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                if self.page_count > 1 or index:
                    self._image.seek(index)
                too_large = _too_large(self._image.size)
                if too_large:
                    return self._failure(number, "image_too_large", f"{where}: {too_large}")
                return self._convert(self._image, number, options)
        except Image.DecompressionBombError as exc:
            return self._failure(number, "image_too_large", f"{where}: {exc}")
        except MemoryError:
            return self._failure(number, "image_too_large", f"{where}: out of memory while decoding")
        except Exception as exc:  # noqa: BLE001 - decoder errors come as OSError, SyntaxError, ValueError...
            return self._failure(number, "corrupt_image", f"{where} cannot be decoded: {_describe(exc)}")

    def _convert(self, frame: Image.Image, number: int, options: RasterOptions) -> PageImage:
        width, height = frame.size
        target = fit_pixels(width, height, options.max_page_pixels)
        if frame.format in ("JPEG", "MPO") and target != (width, height):
            frame.draft(None, target)  # decode at 1/2, 1/4 or 1/8 scale, never below the target
        frame.load()
        orientation = _exif_orientation(frame)
        image = ImageOps.exif_transpose(frame) if orientation != 1 else frame
        image = to_rgb(image)
        rotation = _EXIF_ROTATION.get(orientation, 0)
        target = fit_pixels(image.width, image.height, options.max_page_pixels)
        if target != image.size:
            image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        elif image is frame:
            image = frame.copy()  # the page must not depend on the file's frame buffer
        downscaled = image.width * image.height < width * height
        note = (
            f"{width}x{height} image scaled to {image.width}x{image.height} for the"
            f" {options.max_page_pixels:,} pixel page budget"
            if downscaled
            else None
        )
        dpi = _image_dpi(frame)
        scale = max(image.size) / max(width, height)
        return PageImage(
            doc_id=self.doc_id,
            uri=self.uri,
            page_number=number,
            image=image,
            render=RenderInfo(
                width=image.width,
                height=image.height,
                dpi=round(dpi * scale, 2) if dpi is not None else None,
                requested_dpi=None,
                downscaled=downscaled,
                note=note,
            ),
            kind=PageKind.BLANK if is_uniform(image) else PageKind.SCAN if looks_like_scan(image) else PageKind.IMAGE,
            text=None,
            rotation=rotation,
        )


def _exif_orientation(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, not fatal
        return 1
    return value if value in _EXIF_ROTATION else 1


def _image_dpi(image: Image.Image) -> float | None:
    dpi = image.info.get("dpi")
    try:
        x = float(dpi[0] if isinstance(dpi, tuple) else dpi)
    except (TypeError, ValueError, IndexError):
        return None
    return x if math.isfinite(x) and x > 1.0 else None


def _too_large(size: tuple[int, int]) -> str | None:
    """Why an image of `size` must not be decoded (Pillow's decompression-bomb limit), or None."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = size[0] * size[1]
    if limit is None or pixels <= limit:
        return None
    return (
        f"{size[0]}x{size[1]} pixels ({pixels / 1e6:.0f} MP) is over the {limit / 1e6:.0f} MP "
        "decompression-bomb limit; not decoded"
    )


# ---------------------------------------------------------------- opening


def open_document(data: bytes | str, *, uri: str, doc_id: str, media_type: str) -> OpenedDocument | StageError:
    """Open a PDF or image from its bytes or a local path. Returns a StageError instead of raising."""
    try:
        head, tail, size = _head_tail(data)
    except OSError as exc:  # storage, not content: the next run may read it
        return _error("unreadable", f"cannot read {uri}: {_describe(exc)}", retryable=True)
    if size == 0:
        return _error("empty_file", "the file is empty (0 bytes)")
    kind = _kind(media_type, head)
    try:
        if kind == "pdf":
            return _open_pdf(data, head, tail, uri, doc_id)
        if kind == "image":
            return _open_image(data, head, uri, doc_id)
    except Exception as exc:  # noqa: BLE001 - last line of defence: errors are data
        return _error("corrupt_pdf" if kind == "pdf" else "corrupt_image", f"cannot open: {_describe(exc)}")
    return _error("unsupported_format", f"{media_type or 'unknown'} content is neither a PDF nor a supported image")


def _kind(media_type: str, head: bytes) -> str | None:
    """pdf, image or None: the content decides, the claimed media type only when it cannot.

    A PDF claimed to be an image (or named .png) is read as a PDF, an image claimed to be
    a PDF as an image. Content that is neither goes by the claim, so that a "PDF" without
    a header is rejected as not_a_pdf and a damaged "image" as corrupt_image.
    """
    if _PDF_HEADER.match(head):
        return "pdf"
    if _looks_like_image(head):
        return "image"
    media = (media_type or "").split(";")[0].strip().lower()
    if media == "application/pdf":
        return "pdf"
    if media.startswith("image/"):
        return "image"
    return None


def _looks_like_image(head: bytes) -> bool:
    """Whether `head` starts with the magic bytes of an image format (BMP by its header size)."""
    if head[:2] == b"BM":
        return len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _head_tail(data: bytes | str) -> tuple[bytes, bytes, int]:
    """First and last HEAD_BYTES of the content, and its size, without reading a path whole."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data[:HEAD_BYTES]), bytes(data[-HEAD_BYTES:])
        return raw[0], raw[1], len(data)
    size = os.path.getsize(data)
    with open(data, "rb") as fh:
        head = fh.read(HEAD_BYTES)
        fh.seek(max(0, size - HEAD_BYTES))
        tail = fh.read(HEAD_BYTES)
    return head, tail, size


def _open_pdf(data: bytes | str, head: bytes, tail: bytes, uri: str, doc_id: str) -> OpenedDocument | StageError:
    if not _PDF_HEADER.match(head):
        what = "HTML" if re.search(rb"<(!doctype|html|head|body)\b", head, re.I) else "content"
        return _error("not_a_pdf", f"named or typed as a PDF but the file is {what} without a %PDF header")
    truncated = b"%%EOF" not in tail
    pymupdf.TOOLS.mupdf_warnings(reset=True)
    try:
        doc = pymupdf.open(stream=data, filetype="pdf") if not isinstance(data, str) else pymupdf.open(data, filetype="pdf")
    except Exception as exc:  # noqa: BLE001 - FileDataError, FzErrorBase (not a RuntimeError), ...
        damage = "the file is truncated (no %%EOF marker)" if truncated else "the file is damaged"
        return _error("corrupt_pdf", f"PyMuPDF cannot open the PDF: {damage}: {_describe(exc)}")
    if not doc.is_pdf:
        doc.close()
        return _error("not_a_pdf", "the file has a %PDF header but is not read as a PDF")
    if doc.needs_pass and not doc.authenticate(""):
        doc.close()
        return _error("encrypted_pdf", "the PDF is encrypted with a user password; it cannot be opened without it")
    count = doc.page_count
    repaired = bool(getattr(doc, "is_repaired", False))
    pymupdf.TOOLS.mupdf_warnings(reset=True)
    if count == 0:
        doc.close()
        if truncated or repaired:
            reason = "no %%EOF marker" if truncated else "its cross-reference table had to be rebuilt"
            return _error("no_pages", f"no pages could be read: the file is truncated or damaged ({reason})")
        return _error("no_pages", "the PDF has no pages")
    return PdfDocument(doc, uri, doc_id, truncated=truncated)


def _open_image(data: bytes | str, head: bytes, uri: str, doc_id: str) -> OpenedDocument | StageError:
    source: Any = io.BytesIO(data) if not isinstance(data, str) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)  # reads the header only
    except Image.DecompressionBombError as exc:
        return _error("image_too_large", f"not decoded: {exc}")
    except UnidentifiedImageError:
        if head.startswith(_IMAGE_MAGIC) or head[:4] == b"RIFF":
            return _error("corrupt_image", "the image header is damaged: Pillow cannot identify the file")
        return _error("unsupported_format", "not an image format Pillow can read (PNG, JPEG, TIFF, WebP, BMP)")
    if image.format not in IMAGE_FORMATS:
        fmt = image.format
        image.close()
        return _error("unsupported_format", f"{fmt} images are not supported (PNG, JPEG, TIFF, WebP, BMP are)")
    too_large = _too_large(image.size)
    if too_large:
        image.close()
        return _error("image_too_large", too_large)
    if image.format not in MULTI_FRAME_FORMATS:
        return ImageDocument(image, uri, doc_id, 1)
    frames, broken = _count_frames(image)
    return ImageDocument(image, uri, doc_id, frames, broken_frame=broken)


def _count_frames(image: Image.Image) -> tuple[int, str | None]:
    """(frames that can be sought to, why the next one cannot or None) of a multi-frame image.

    `n_frames` walks the whole chain of frame directories and fails as a whole when the
    file is cut or damaged part way; sought one at a time, every frame before the break is
    still there. Leaves `image` on its first frame.
    """
    count = 1
    broken: str | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Corrupt EXIF data" for the cut directory
        while True:
            try:
                image.seek(count)
            except EOFError:  # the clean end of the chain
                break
            except Exception as exc:  # noqa: BLE001 - TypeError, SyntaxError, OSError... from a cut directory
                broken = _describe(exc)
                break
            count += 1
        image.seek(0)
    return count, broken


def _error(type_: str, message: str, *, retryable: bool = False) -> StageError:
    return StageError(Stage.RASTERIZE, type_, message, retryable=retryable)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


def _first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]
