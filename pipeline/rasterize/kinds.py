"""A page's kind from cheap measurements (text layer, image coverage, vector paths, uniformity
of the render), never OCR; and any Pillow mode to 8-bit RGB."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.records import PageKind

SCAN_COVERAGE = 0.5  # images cover at least this share of a scanned page
FULL_COVERAGE = 0.9  # ... and this much when the OCR text under the image is visible
UNIFORM_RANGE = 24  # largest per-channel spread (0-255) of a "nearly uniform" render
_LIMIT_WARNING = re.compile(
    r"overly large|too large|out of memory|cannot allocate|malloc|memory limit|limit exceeded|overflow", re.I
)


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
