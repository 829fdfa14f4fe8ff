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

import os

from pipeline.rasterize.document import OpenedDocument, _describe, _error
from pipeline.rasterize.image import ImageDocument, _looks_like_image, _open_image
from pipeline.rasterize.kinds import (
    PageFeatures,
    classify_page,
    is_uniform,
    looks_like_scan,
    render_looks_failed,
    to_rgb,
)
from pipeline.rasterize.options import RENDER_FLOOR_DPI, DpiPlan, RasterOptions, choose_dpi, fit_pixels, pixel_size
from pipeline.rasterize.pdf import _PDF_HEADER, PdfDocument, _open_pdf, words_to_text
from pipeline.records import StageError

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
    "looks_like_scan",
    "open_document",
    "pixel_size",
    "render_looks_failed",
    "to_rgb",
    "words_to_text",
]

HEAD_BYTES = 1024  # a PDF header must start within this many bytes


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
