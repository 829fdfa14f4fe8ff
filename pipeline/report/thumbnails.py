"""Thumbnails for the report's gallery, rendered from the source files: PDF pages by PyMuPDF
(rotation applied), image files by Pillow (EXIF orientation applied, one frame per page).

Bounded like the run itself, because a source is whatever is at its URI *now*:

- only a page the run rendered (its row has a size) is drawn, and only from bytes whose
  SHA-256 is the row's `doc_id`: a file the run refused, or one replaced since (by a
  decompression bomb, a CPU-bomb PDF...), is never decoded;
- an image larger than the run's decode limit (`rasterize.image.too_large`) is not decoded;
- each thumbnail is drawn in a worker process with a time limit (THUMB_TIMEOUT_S, never
  more than the run's `document_timeout_s`); one that runs past it is killed, and all
  thumbnails of one report stop at `ThumbLimits.deadline` (the flow's report step has one).
Whatever is not drawn gets a one-line note on its card instead.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing as mp
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pipeline.report")

THUMB_PX = 360  # longest side of a thumbnail
THUMB_TIMEOUT_S = 10.0  # one thumbnail (reading its source included) at most
STARTUP_TIMEOUT_S = 60.0  # the worker process's start (imports), not counted against a thumbnail


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """A rendered page (JPEG bytes), or why it could not be rendered."""

    data: bytes | None = None
    width: int = 0
    height: int = 0
    note: str | None = None


@dataclass(frozen=True, slots=True)
class ThumbLimits:
    """How long thumbnails may take: each (`per_thumb_s`), and all of one report (`deadline`,
    a `time.monotonic()` value; None: no overall limit)."""

    per_thumb_s: float = THUMB_TIMEOUT_S
    deadline: float | None = None

    def left(self) -> float:
        if self.deadline is None:
            return self.per_thumb_s
        return min(self.per_thumb_s, self.deadline - time.monotonic())


def not_drawn_reason(page: Mapping[str, Any]) -> str | None:
    """Why a page's thumbnail is not drawn at all (the run did not render the page), or None."""
    if page.get("width_px") and page.get("height_px"):
        return None
    what = f" ({page['error_type']})" if page.get("error_type") else ""
    return f"not rendered: the run did not render this page{what}"


def render_thumbnails(
    pages: Sequence[Mapping[str, Any]],
    media_types: Mapping[str, str],
    storage_options: Mapping[str, Any] | None = None,
    max_px: int = THUMB_PX,
    *,
    limits: ThumbLimits | None = None,
) -> dict[tuple[str, int], Thumbnail]:
    """Thumbnails of `pages` (full page rows), keyed by (source_uri, page_number), drawn in one
    worker process, each source read once while its pages are drawn (see the module docstring)."""
    limits = limits or ThumbLimits()
    out: dict[tuple[str, int], Thumbnail] = {}
    todo = []
    for page in pages:
        key = (str(page["source_uri"]), int(page["page_number"]))
        why = not_drawn_reason(page)
        if why is not None:
            out[key] = Thumbnail(note=why)
        else:
            todo.append((key, str(page.get("doc_id") or "")))
    if not todo:
        return out
    renderer = _Renderer()
    try:
        for (uri, number), doc_id in sorted(todo):
            left = limits.left()
            if left <= 0:
                out[(uri, number)] = Thumbnail(note="not rendered: the report's time for thumbnails ran out")
                continue
            request = (uri, dict(storage_options or {}), doc_id, media_types.get(uri, ""), number, max_px)
            out[(uri, number)] = renderer.render(request, left)
    finally:
        renderer.close()
    return out


class _Renderer:
    """One worker process drawing thumbnails on request; killed (and replaced on the next
    request) when a thumbnail runs past its time."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.process: Any = None
        self.conn: Any = None

    def _start(self) -> bool:
        parent, child = self.ctx.Pipe()
        self.process = self.ctx.Process(target=_serve, args=(child,), name="docpipe-thumbnails", daemon=True)
        self.process.start()
        child.close()
        self.conn = parent
        if parent.poll(STARTUP_TIMEOUT_S):
            try:
                return parent.recv() == "ready"
            except (EOFError, OSError):
                pass
        self._kill()
        return False

    def render(self, request: tuple[Any, ...], timeout_s: float) -> Thumbnail:
        if self.process is None and not self._start():
            return Thumbnail(note="not rendered: the thumbnail worker did not start")
        try:
            self.conn.send(request)
            if self.conn.poll(timeout_s):
                thumb, said = self.conn.recv()
                for line in said:  # the worker's log lines (MuPDF's complaints...), into this process's log
                    log.debug("%s", line)
                return thumb
        except (EOFError, OSError, BrokenPipeError):
            self._kill()
            return Thumbnail(note="not rendered: the thumbnail worker died on this page")
        self._kill()
        log.warning("thumbnail of %s page %s took over %g s: not rendered", request[0], request[4], timeout_s)
        return Thumbnail(note=f"not rendered: drawing it took over {timeout_s:.3g} s")

    def _kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join(5)
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None

    def close(self) -> None:
        if self.process is None:
            return
        try:
            self.conn.send(None)
            self.process.join(5)
        except (OSError, BrokenPipeError):
            pass
        self._kill()


def _serve(conn: Any) -> None:
    """The worker: draw requested thumbnails until told to stop (None)."""
    cached: tuple[str, str, bytes | None, str | None] | None = None  # (uri, doc_id, bytes, why not)
    said: list[str] = []
    collector = logging.Handler(logging.DEBUG)
    collector.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    log.addHandler(collector)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        uri, storage_options, doc_id, media_type, number, max_px = request
        if cached is None or cached[:2] != (uri, doc_id):
            cached = (uri, doc_id, *_read_checked(uri, storage_options, doc_id))
        data, why = cached[2], cached[3]
        thumb = Thumbnail(note=why) if data is None else render_thumbnail(data, media_type, number, max_px)
        conn.send((thumb, list(said)))
        said.clear()


def _read_checked(uri: str, storage_options: Mapping[str, Any], doc_id: str) -> tuple[bytes | None, str | None]:
    """The source's bytes, when they are the ones the run read (their SHA-256 is `doc_id`)."""
    from pipeline.sources import read_bytes

    try:
        data = read_bytes(uri, dict(storage_options))
    except Exception as exc:  # noqa: BLE001 - a vanished or unreadable source: say so on the card
        return None, f"source not readable: {type(exc).__name__}"
    if hashlib.sha256(data).hexdigest() != doc_id:
        return None, "not rendered: the source changed since the run (its bytes are not the ones it read)"
    return data, None


def render_thumbnail(data: bytes, media_type: str, page_number: int, max_px: int = THUMB_PX) -> Thumbnail:
    """Page `page_number` (1-based) of a PDF or image file as a small JPEG (in this process:
    `render_thumbnails` is the bounded way)."""
    try:
        if media_type == "application/pdf" or data[:5] == b"%PDF-":
            image = _render_pdf_page(data, page_number, max_px)
        else:
            image = _render_image_frame(data, page_number, max_px)
    except _TooLarge as exc:
        return Thumbnail(note=f"not rendered: {exc}")
    except Exception as exc:  # noqa: BLE001 - damaged input is what error pages are about
        return Thumbnail(note=f"could not render: {type(exc).__name__}: {str(exc)[:200]}")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return Thumbnail(data=buf.getvalue(), width=image.width, height=image.height)


class _TooLarge(ValueError):
    """An image over the run's decode limit."""


def _render_pdf_page(data: bytes, page_number: int, max_px: int) -> Any:
    import pymupdf
    from PIL import Image

    from pipeline.logs import mupdf_to_log, quiet_mupdf

    quiet_mupdf()  # a damaged PDF's MuPDF errors go to the log, not the console
    try:
        with pymupdf.open(stream=data, filetype="pdf") as doc:
            page = doc[page_number - 1]
            rect = page.rect  # after /Rotate
            zoom = max_px / max(rect.width, rect.height, 1.0)  # at most max_px x max_px pixels
            pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
            return Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
    finally:
        mupdf_to_log(log, f"page {page_number}")


def _render_image_frame(data: bytes, page_number: int, max_px: int) -> Any:
    from PIL import Image, ImageOps

    from pipeline.rasterize.image import too_large

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF complaints: the row records what mattered
        with Image.open(io.BytesIO(data)) as image:  # the header only
            image.seek(page_number - 1)
            refused = too_large(image.size)  # the run's limit: never decoded here either
            if refused:
                raise _TooLarge(refused)
            image.draft("RGB", (max_px, max_px))  # JPEG: decode at a fraction of the size
            frame = ImageOps.exif_transpose(image.copy()) if page_number == 1 else image.copy()
            frame = frame.convert("RGB")
            frame.thumbnail((max_px, max_px))
            return frame
