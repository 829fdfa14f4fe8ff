"""Image files via Pillow: one page, or every frame of a TIFF; EXIF orientation, the
decompression-bomb limit, a multi-frame file cut part way."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Generator
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.rasterize.document import OpenedDocument, _describe, _error
from pipeline.rasterize.kinds import is_uniform, looks_like_scan, to_rgb
from pipeline.rasterize.options import RasterOptions, fit_pixels
from pipeline.records import PageFailure, PageImage, PageKind, RenderInfo, StageError

IMAGE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "TIFF", "WEBP", "BMP"})
MULTI_FRAME_FORMATS = frozenset({"TIFF"})  # every frame is a page; others: first frame only

# EXIF orientation -> clockwise degrees applied to display it (mirrored ones as their rotation).
_EXIF_ROTATION = {1: 0, 2: 0, 3: 180, 4: 180, 5: 270, 6: 90, 7: 90, 8: 270}
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"BM", b"GIF8")
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})  # BITMAPCOREHEADER ... BITMAPV5HEADER


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

    def pages(self, options: RasterOptions) -> Generator[PageImage | PageFailure, None, None]:
        for index in range(self.page_count):
            yield self._frame(index, options)

    def page(self, number: int, options: RasterOptions) -> PageImage | PageFailure:
        self._check_number(number)
        return self._frame(number - 1, options)

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
                refused = too_large(self._image.size)
                if refused:
                    return self._failure(number, "image_too_large", f"{where}: {refused}")
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

def too_large(size: tuple[int, int]) -> str | None:
    """Why an image of `size` must not be decoded (Pillow's decompression-bomb limit), or None.
    The one image size limit: the run's (here) and the report's thumbnails."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = size[0] * size[1]
    if limit is None or pixels <= limit:
        return None
    return (
        f"{size[0]}x{size[1]} pixels ({pixels / 1e6:.0f} MP) is over the {limit / 1e6:.0f} MP "
        "decompression-bomb limit; not decoded"
    )

def _looks_like_image(head: bytes) -> bool:
    """Whether `head` starts with the magic bytes of an image format (BMP by its header size)."""
    if head[:2] == b"BM":
        return len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")

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
    refused = too_large(image.size)
    if refused:
        image.close()
        return _error("image_too_large", refused)
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
