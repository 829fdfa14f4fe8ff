"""PDF pages via PyMuPDF: rendered at the size the model wants (canvas renders, the
too-large fallback), the text layer, and the measurements that decide the page kind."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Generator
from typing import Any

import pymupdf
from PIL import Image

from pipeline.rasterize.document import OpenedDocument, _describe, _error, _first_line
from pipeline.rasterize.kinds import PageFeatures, classify_page, is_uniform, render_looks_failed
from pipeline.rasterize.options import RENDER_FLOOR_DPI, DpiPlan, RasterOptions, choose_dpi
from pipeline.records import PageFailure, PageImage, RenderInfo, StageError

_PDF_HEADER = re.compile(rb"^(?:\xef\xbb\xbf|[ \t\r\n\f\x00])*%PDF-")  # BOM/whitespace allowed first

# Damaged files make MuPDF print "MuPDF error: ..." to stdout; they are still collected
# (TOOLS.mupdf_warnings) and surface in RenderInfo.note or the StageError instead.
pymupdf.TOOLS.mupdf_display_errors(False)


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

    def pages(self, options: RasterOptions) -> Generator[PageImage | PageFailure, None, None]:
        for index in range(self.page_count):
            if index and index % STORE_SHRINK_EVERY == 0:
                # MuPDF caches decoded resources in a global store that otherwise grows with
                # the length of the document (about 35 MB per 1,000 Letter pages).
                pymupdf.TOOLS.store_shrink(100)
            page = self._page(index, options)
            self._note_repair(index + 1)
            yield page

    def page(self, number: int, options: RasterOptions) -> PageImage | PageFailure:
        self._check_number(number)
        page = self._page(number - 1, options)
        self._note_repair(number)
        return page

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
