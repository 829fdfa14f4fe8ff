"""Thumbnails for the report's gallery, rendered from the source files: PDF pages by PyMuPDF
(rotation applied), image files by Pillow (EXIF orientation applied, one frame per page)."""

from __future__ import annotations

import io
import logging
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pipeline.report")

THUMB_PX = 360  # longest side of a thumbnail


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """A rendered page (JPEG bytes), or why it could not be rendered."""

    data: bytes | None = None
    width: int = 0
    height: int = 0
    note: str | None = None


def render_thumbnails(
    pages: Sequence[Mapping[str, Any]],
    media_types: Mapping[str, str],
    storage_options: Mapping[str, Any] | None = None,
    max_px: int = THUMB_PX,
) -> dict[tuple[str, int], Thumbnail]:
    """Thumbnails of `pages`, keyed by (source_uri, page_number); each source read once."""
    from pipeline.sources import read_bytes

    by_source: dict[str, list[int]] = defaultdict(list)
    for page in pages:
        by_source[page["source_uri"]].append(int(page["page_number"]))
    out: dict[tuple[str, int], Thumbnail] = {}
    for uri, numbers in by_source.items():
        try:
            data = read_bytes(uri, dict(storage_options or {}))
        except Exception as exc:  # noqa: BLE001 - a vanished or unreadable source: say so on the card
            for number in numbers:
                out[(uri, number)] = Thumbnail(note=f"source not readable: {type(exc).__name__}: {exc}")
            continue
        for number in numbers:
            out[(uri, number)] = render_thumbnail(data, media_types.get(uri, ""), number, max_px)
    return out

def render_thumbnail(data: bytes, media_type: str, page_number: int, max_px: int = THUMB_PX) -> Thumbnail:
    """Page `page_number` (1-based) of a PDF or image file as a small JPEG."""
    try:
        if media_type == "application/pdf" or data[:5] == b"%PDF-":
            image = _render_pdf_page(data, page_number, max_px)
        else:
            image = _render_image_frame(data, page_number, max_px)
    except Exception as exc:  # noqa: BLE001 - damaged input is what error pages are about
        return Thumbnail(note=f"could not render: {type(exc).__name__}: {str(exc)[:200]}")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return Thumbnail(data=buf.getvalue(), width=image.width, height=image.height)

def _render_pdf_page(data: bytes, page_number: int, max_px: int) -> Any:
    import pymupdf
    from PIL import Image

    from pipeline.logs import mupdf_to_log, quiet_mupdf

    quiet_mupdf()  # a damaged PDF's MuPDF errors go to the log, not the console
    try:
        with pymupdf.open(stream=data, filetype="pdf") as doc:
            page = doc[page_number - 1]
            rect = page.rect  # after /Rotate
            zoom = max_px / max(rect.width, rect.height, 1.0)
            pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
            return Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
    finally:
        mupdf_to_log(log, f"page {page_number}")

def _render_image_frame(data: bytes, page_number: int, max_px: int) -> Any:
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF complaints: the row records what mattered
        with Image.open(io.BytesIO(data)) as image:
            image.seek(page_number - 1)
            image.draft("RGB", (max_px, max_px))  # JPEG: decode at a fraction of the size
            frame = ImageOps.exif_transpose(image.copy()) if page_number == 1 else image.copy()
            frame = frame.convert("RGB")
            frame.thumbnail((max_px, max_px))
            return frame
