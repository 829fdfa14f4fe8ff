"""Build test documents at test time: good ones, odd ones and broken ones.

Everything is made with PyMuPDF and Pillow (plus numpy for noise), deterministically,
in memory. Functions return the file's bytes unless their name says otherwise
(`*_image` returns a PIL image). Used by the tests and by `sample_docs/make_samples.py`.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pymupdf
from PIL import Image, ImageDraw

LETTER = (612.0, 792.0)  # points

LOREM = (
    "Quarterly operations report. Throughput rose in every region while unit costs fell. "
    "The northern plant completed its retrofit ahead of schedule, and the southern plant "
    "brought a second line online in March. Energy use per unit fell by eight percent."
)

TABLE_ROWS: tuple[tuple[str, ...], ...] = (
    ("Region", "Q1", "Q2", "Q3", "Q4"),
    ("North", "120", "135", "150", "160"),
    ("South", "90", "95", "110", "130"),
    ("East", "70", "80", "85", "99"),
    ("West", "60", "66", "72", "75"),
)

CHART_VALUES: tuple[tuple[str, float], ...] = (("Q1", 340.0), ("Q2", 376.0), ("Q3", 417.0), ("Q4", 464.0))

_SAVE = {"garbage": 3, "deflate": True, "no_new_id": True}


def _pdf_bytes(doc: pymupdf.Document) -> bytes:
    """Serialise deterministically (no fresh /ID, no dates) and close."""
    try:
        return doc.tobytes(**_SAVE)
    finally:
        doc.close()


# ---------------------------------------------------------------- page drawing helpers


def draw_paragraphs(page: pymupdf.Page, title: str, body: str = LOREM, top: float = 72.0) -> float:
    """Write a title and a paragraph; returns the y coordinate below them."""
    page.insert_text((72, top), title, fontsize=20, fontname="hebo")
    rect = pymupdf.Rect(72, top + 16, page.rect.width - 72, top + 140)
    page.insert_textbox(rect, body, fontsize=11, fontname="helv")
    return rect.y1 + 10


def draw_table(page: pymupdf.Page, rows: Sequence[Sequence[str]], origin: tuple[float, float]) -> pymupdf.Rect:
    """A ruled table with one text cell per entry; returns its bounding box."""
    x0, y0 = origin
    col_w, row_h = 80.0, 22.0
    n_cols = max(len(r) for r in rows)
    box = pymupdf.Rect(x0, y0, x0 + n_cols * col_w, y0 + len(rows) * row_h)
    shape = page.new_shape()
    for i in range(len(rows) + 1):
        shape.draw_line((box.x0, y0 + i * row_h), (box.x1, y0 + i * row_h))
    for j in range(n_cols + 1):
        shape.draw_line((x0 + j * col_w, box.y0), (x0 + j * col_w, box.y1))
    shape.finish(color=(0, 0, 0), width=0.8, closePath=False)
    shape.commit()
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            font = "hebo" if i == 0 else "helv"
            page.insert_text((x0 + j * col_w + 6, y0 + i * row_h + 15), cell, fontsize=10, fontname=font)
    return box


def draw_bar_chart(
    page: pymupdf.Page,
    rect: pymupdf.Rect,
    values: Sequence[tuple[str, float]] = CHART_VALUES,
    title: str = "Units shipped per quarter",
) -> None:
    """A vector bar chart (axes, ticks, bars, labels) inside `rect`."""
    page.insert_text((rect.x0, rect.y0 - 8), title, fontsize=12, fontname="hebo")
    left, bottom = rect.x0 + 40, rect.y1 - 24
    top, right = rect.y0 + 10, rect.x1 - 10
    vmax = max(v for _, v in values) * 1.1
    shape = page.new_shape()
    shape.draw_line((left, top), (left, bottom))
    shape.draw_line((left, bottom), (right, bottom))
    shape.finish(color=(0, 0, 0), width=1.2, closePath=False)
    for k in range(5):  # y ticks and grid
        y = bottom - (bottom - top) * k / 4
        shape.draw_line((left - 4, y), (right, y))
        shape.finish(color=(0.8, 0.8, 0.8), width=0.5, closePath=False)
        page.insert_text((rect.x0, y + 3), f"{vmax * k / 4:.0f}", fontsize=8)
    slot = (right - left) / len(values)
    colours = ((0.2, 0.4, 0.8), (0.9, 0.5, 0.1), (0.3, 0.7, 0.3), (0.8, 0.2, 0.3))
    for i, (label, value) in enumerate(values):
        x = left + i * slot + slot * 0.2
        h = (bottom - top) * value / vmax
        shape.draw_rect(pymupdf.Rect(x, bottom - h, x + slot * 0.6, bottom))
        shape.finish(color=None, fill=colours[i % len(colours)])
        page.insert_text((x + slot * 0.15, bottom + 14), label, fontsize=9)
    shape.commit()
    page.insert_text((left, rect.y1 + 4), "Quarter", fontsize=9)


# ---------------------------------------------------------------- good PDFs


@lru_cache(maxsize=8)
def make_pdf(path: Path, pages: int, text: str = "Quarterly report") -> Path:
    """A small PDF file of `pages` Letter pages, each saying "<text> page <n>" over a box (made
    distinct by `text`); parent folders are created. The one `make_pdf` of the tests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = pymupdf.open()
    for i in range(pages):
        page = doc.new_page(width=612, height=792)
        page.insert_text((72, 72), f"{text} page {i + 1}", fontsize=14)
        page.draw_rect(pymupdf.Rect(72, 120, 300, 300), color=(0, 0, 1), fill=(0.8, 0.8, 1))
    doc.save(path)
    doc.close()
    return path


def cpu_bomb_pdf(segments: int = 20_000, good_pages: int = 0) -> bytes:
    """A few KB of PDF whose last page's drawing is a CPU bomb: one even-odd filled path of
    `segments` lines zigzagging across the page, so the rasterizer's work grows with
    segments x scanlines (20,000: ~4 s at 72 dpi, ~14 s at 200 dpi on one core; 100,000: minutes).
    `good_pages` ordinary pages come first (they render at once)."""
    doc = pymupdf.open()
    for i in range(good_pages):
        page = doc.new_page(width=612, height=792)
        page.insert_text((72, 72), f"an ordinary page {i + 1}", fontsize=14)
    page = doc.new_page(width=612, height=792)
    page.insert_text((72, 72), "x")
    ops = ["0 0 m", *(f"{(i * 37) % 612} {792 if i % 2 else 0} l" for i in range(segments)), "f*"]
    doc.update_stream(page.get_contents()[0], "\n".join(ops).encode())
    return _pdf_bytes(doc)


def born_digital_pdf(pages: int = 1, size: tuple[float, float] = LETTER) -> bytes:
    """Pages of real text with a ruled table and a vector bar chart on each."""
    doc = pymupdf.open()
    for n in range(pages):
        page = doc.new_page(width=size[0], height=size[1])
        y = draw_paragraphs(page, f"Operations report, page {n + 1}")
        box = draw_table(page, TABLE_ROWS, (72, y))
        draw_bar_chart(page, pymupdf.Rect(72, box.y1 + 40, 72 + 400, box.y1 + 40 + 220))
    return _pdf_bytes(doc)


def report_pdf() -> bytes:
    """A three-page report: text; text + table; chart with a caption."""
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    y = draw_paragraphs(page, "Operations report 2024")
    draw_paragraphs(page, "Summary", LOREM.replace("Quarterly", "Annual"), top=y + 30)
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    y = draw_paragraphs(page, "Output by region", "Units (thousands) by region and quarter.")
    draw_table(page, TABLE_ROWS, (72, y))
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    draw_bar_chart(page, pymupdf.Rect(72, 120, 540, 420))
    page.insert_text((72, 460), "Figure 1: total units shipped per quarter (thousands).", fontsize=10)
    return _pdf_bytes(doc)


def text_pdf(pages: int, size: tuple[float, float] = (200.0, 200.0)) -> bytes:
    """Many small pages with one line of text each (for laziness and memory tests)."""
    doc = pymupdf.open()
    for n in range(pages):
        page = doc.new_page(width=size[0], height=size[1])
        page.insert_text((20, 40), f"Page {n + 1}", fontsize=14)
    return _pdf_bytes(doc)


def blank_pdf(pages: int = 1) -> bytes:
    doc = pymupdf.open()
    for _ in range(pages):
        doc.new_page(width=LETTER[0], height=LETTER[1])
    return _pdf_bytes(doc)


def rotated_pdf(rotate: int = 90) -> bytes:
    """A portrait Letter page with text and a chart, displayed with /Rotate `rotate`."""
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    y = draw_paragraphs(page, "Rotated page")
    draw_bar_chart(page, pymupdf.Rect(72, y + 40, 472, y + 260))
    page.insert_text((380, 760), "Footer of the rotated page", fontsize=10)  # beyond y=612: lost if clipped wrongly
    page.set_rotation(rotate)
    return _pdf_bytes(doc)


def page_pdf(width: float, height: float, text: str = "Big page") -> bytes:
    """One page of any size (up to PDF's 14400 pt) with a line of text and a filled box."""
    doc = pymupdf.open()
    page = doc.new_page(width=width, height=height)
    page.insert_text((36, 72), text, fontsize=max(24.0, min(width, height) / 40))
    page.draw_rect(pymupdf.Rect(width * 0.25, height * 0.25, width * 0.75, height * 0.75), color=None, fill=(0.1, 0.2, 0.6))
    return _pdf_bytes(doc)


def image_pdf(image: Image.Image, ocr_text: str | None = None, *, visible_text: bool = False) -> bytes:
    """A PDF page covered by `image` (a scan), optionally with an OCR text layer.

    The OCR layer is invisible (render mode 3), as OCR tools write it, unless `visible_text`.
    """
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    buf = io.BytesIO()
    image.convert("L").save(buf, "PNG", optimize=True)
    page.insert_image(page.rect, stream=buf.getvalue())
    if ocr_text:
        rect = pymupdf.Rect(72, 100, page.rect.width - 72, page.rect.height - 72)
        page.insert_textbox(rect, ocr_text, fontsize=11, render_mode=0 if visible_text else 3)
    return _pdf_bytes(doc)


def image_doc_pdf(image: Image.Image, coverage: float) -> bytes:
    """A page holding `image` centred over about `coverage` of its area, nothing else."""
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    k = coverage**0.5
    w, h = page.rect.width * k, page.rect.height * k
    x0, y0 = (page.rect.width - w) / 2, (page.rect.height - h) / 2
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    page.insert_image(pymupdf.Rect(x0, y0, x0 + w, y0 + h), stream=buf.getvalue(), keep_proportion=False)
    return _pdf_bytes(doc)


# ---------------------------------------------------------------- scans and images


def render_page_image(pdf: bytes, page_number: int = 1, dpi: int = 100, mode: str = "L") -> Image.Image:
    """Render one page of a PDF to a PIL image (the 'paper' a scanner would see)."""
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        pix = doc[page_number - 1].get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY, alpha=False)
        image = Image.frombytes("L", (pix.width, pix.height), pix.samples)
    return image.convert(mode)


def scan_image(dpi: int = 100, skew_deg: float = 1.5, noise: float = 12.0, seed: int = 7, pdf: bytes | None = None) -> Image.Image:
    """A page as a scanner would deliver it: rendered, slightly skewed, with sensor noise (mode L)."""
    page = render_page_image(pdf if pdf is not None else born_digital_pdf(), dpi=dpi)
    page = page.rotate(skew_deg, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=255)
    rng = np.random.default_rng(seed)
    arr = np.asarray(page, dtype=np.float32)
    arr = arr * 0.92 + 10 + rng.normal(0.0, noise, arr.shape)  # grey paper, noisy sensor
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def blank_scan_image(size: tuple[int, int] = (850, 1100), noise: float = 2.0, seed: int = 3) -> Image.Image:
    """An empty sheet scanned: near-white with faint noise."""
    rng = np.random.default_rng(seed)
    arr = 245 + rng.normal(0.0, noise, (size[1], size[0]))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def marker_image(size: tuple[int, int] = (300, 200)) -> Image.Image:
    """White RGB image with a red block in the top-left corner (shows rotations)."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle((0, 0, size[0] // 5, size[1] // 5), fill=(255, 0, 0))
    return image


def chart_image(size: tuple[int, int] = (800, 500)) -> Image.Image:
    """A bar chart as a raster image (rendered from the vector chart)."""
    doc = pymupdf.open()
    page = doc.new_page(width=size[0] * 0.75, height=size[1] * 0.75)
    draw_bar_chart(page, pymupdf.Rect(20, 40, page.rect.width - 20, page.rect.height - 30))
    pix = page.get_pixmap(dpi=96, alpha=False)
    image = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
    doc.close()
    return image


def encode_image(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def exif_rotated_jpeg(orientation: int = 6, size: tuple[int, int] = (300, 200)) -> bytes:
    """A JPEG of `marker_image` whose EXIF says to display it with `orientation`."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode_image(marker_image(size), "JPEG", quality=90, exif=exif.tobytes())


def cmyk_jpeg(size: tuple[int, int] = (120, 80)) -> bytes:
    """Left half pure cyan ink, right half no ink (paper white)."""
    image = Image.new("CMYK", size, (0, 0, 0, 0))
    ImageDraw.Draw(image).rectangle((0, 0, size[0] // 2 - 1, size[1]), fill=(255, 0, 0, 0))
    return encode_image(image, "JPEG", quality=95)


def gray16_png(size: tuple[int, int] = (256, 64)) -> bytes:
    """A 16-bit greyscale ramp from 0 to 65535, left to right (opens as I;16)."""
    ramp = np.linspace(0, 65535, size[0]).round().astype(np.uint16)
    return encode_image(Image.fromarray(np.tile(ramp, (size[1], 1))), "PNG")


def palette_alpha_png(size: tuple[int, int] = (100, 100)) -> bytes:
    """Palette image: index 0 transparent (left half), index 1 blue (right half)."""
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    ImageDraw.Draw(image).rectangle((size[0] // 2, 0, size[0], size[1]), fill=1)
    return encode_image(image, "PNG", transparency=0)


def rgba_png(size: tuple[int, int] = (100, 100)) -> bytes:
    """RGBA: fully transparent black on the left half, opaque green on the right."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(image).rectangle((size[0] // 2, 0, size[0], size[1]), fill=(0, 200, 0, 255))
    return encode_image(image, "PNG")


def la_png(size: tuple[int, int] = (100, 100)) -> bytes:
    """Grey + alpha: transparent black left half, opaque mid-grey right half."""
    image = Image.new("LA", size, (0, 0))
    ImageDraw.Draw(image).rectangle((size[0] // 2, 0, size[0], size[1]), fill=(128, 255))
    return encode_image(image, "PNG")


def multipage_tiff(frames: int = 3, corrupt_frame: int | None = None, size: tuple[int, int] = (200, 150)) -> bytes:
    """A deflate-compressed multi-page TIFF; `corrupt_frame` (0-based) gets garbage strip data.

    The frame's directory stays valid (it can be sought to) but its pixels cannot be decoded.
    """
    images = []
    for i in range(frames):
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        draw.text((10, 10), f"frame {i + 1}", fill=(0, 0, 0))
        draw.rectangle((50, 50, size[0] - 50, size[1] - 30), fill=(40 * i % 256, 0, 0))
        images.append(image)
    data = bytearray(encode_image(images[0], "TIFF", save_all=True, append_images=images[1:], compression="tiff_deflate"))
    if corrupt_frame is not None:
        with Image.open(io.BytesIO(bytes(data))) as tif:
            tif.seek(corrupt_frame)
            spans = list(zip(tif.tag_v2[273], tif.tag_v2[279]))  # StripOffsets, StripByteCounts
        for offset, count in spans:
            data[offset : offset + count] = bytes((j * 37 + 11) % 256 for j in range(count))
    return bytes(data)


def truncated_tiff(frames: int = 4, keep: int = 2) -> bytes:
    """A multi-page TIFF cut off in the middle of frame `keep + 1`'s pixel data (0-based `keep`).

    Pillow writes each frame's pixels before its directory, so the cut also loses that
    frame's directory and every later one: `n_frames` fails, while frames 1..keep still
    decode when sought one at a time (an interrupted copy or download).
    """
    if not 0 < keep < frames:
        raise ValueError("keep must leave at least one frame before the cut and one after it")
    full = multipage_tiff(frames)
    with Image.open(io.BytesIO(full)) as tif:
        tif.seek(keep)
        offset, count = tif.tag_v2[273][0], tif.tag_v2[279][0]  # StripOffsets, StripByteCounts
    return full[: offset + count // 2]


@lru_cache(maxsize=2)
def bomb_png(width: int = 14_000, height: int = 14_000) -> bytes:
    """A valid 1-bit PNG of width x height pixels (196 MP by default) in a few tens of KB.

    Larger than Pillow's decompression-bomb limit; written chunk by chunk so building it
    never holds the pixels in memory.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(6)
    step = 1000
    parts = [packer.compress(row * min(step, height - done)) for done in range(0, height, step)]
    parts.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- broken and misnamed inputs


def encrypted_pdf(user_password: str = "secret") -> bytes:
    """AES-256 encrypted; cannot be opened without `user_password`."""
    doc = pymupdf.open(stream=born_digital_pdf(), filetype="pdf")
    try:
        return doc.tobytes(
            encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=user_password, owner_pw=user_password + "-owner", no_new_id=True
        )
    finally:
        doc.close()


def owner_locked_pdf() -> bytes:
    """Encrypted with an owner password only: opens (and renders) with the empty password."""
    doc = pymupdf.open(stream=born_digital_pdf(), filetype="pdf")
    try:
        return doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="owner", permissions=0, no_new_id=True)
    finally:
        doc.close()


def truncated_pdf() -> bytes:
    """A download cut off before its page tree: MuPDF 'repairs' it into 0 pages."""
    doc = pymupdf.open(stream=born_digital_pdf(), filetype="pdf")
    full = doc.tobytes(garbage=0, deflate=False, no_new_id=True)
    doc.close()
    match = re.search(rb"\d+ 0 obj\s*<<\s*/Type\s*/Pages\b", full)
    assert match is not None, "could not find the page tree"
    return full[: match.start()]


def truncated_tail_pdf() -> bytes:
    """A PDF cut short near its end (no xref, no %%EOF) that still has its pages."""
    full = born_digital_pdf(pages=2)
    return full[: int(len(full) * 0.9)]


def misplaced_object_pdf() -> bytes:
    """A PDF whose cross-reference table points one object (page 1's) at the wrong offset.

    It opens without complaint; MuPDF notices and repairs the table only when that page is
    loaded, and the page still renders.
    """
    doc = pymupdf.open(stream=born_digital_pdf(pages=2), filetype="pdf")
    try:
        full = bytearray(doc.tobytes(garbage=0, deflate=False, no_new_id=True))
        xref = doc.page_xref(0)
    finally:
        doc.close()
    table = re.search(rb"\nxref\n0 \d+\n", full)
    assert table is not None, "no classic cross-reference table"
    entry = table.end() + 20 * xref  # entries are 20 bytes: "oooooooooo ggggg n\r\n"
    assert full[entry + 17 : entry + 18] == b"n", "unexpected cross-reference entry"
    full[entry : entry + 10] = b"%010d" % 20  # inside the header: not an object
    return bytes(full)


def damaged_blank_page_pdf() -> bytes:
    """A 3-page PDF cut short in its last page's content: MuPDF repairs it and opens all 3
    pages, the last one renders blank (its drawing is lost)."""
    doc = pymupdf.open()
    for i in range(3):
        page = doc.new_page()
        page.insert_text((72, 72), f"Page {i + 1} text " * 20)
        page.draw_rect(pymupdf.Rect(72, 120, 300, 300), color=(0, 0, 1), fill=(0.8, 0.8, 1))
    data = doc.tobytes(garbage=0, deflate=False, no_new_id=True)
    doc.close()
    return data[: int(len(data) * 0.6)]


def zero_page_pdf() -> bytes:
    """A valid PDF whose page tree is empty (/Kids [] /Count 0), written by hand."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref_at)
    return bytes(out)


def html_named_pdf() -> bytes:
    """What a web server returns instead of the PDF (an error page), saved as .pdf."""
    return (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
        b"<body><h1>Not Found</h1><p>The requested document was not found.</p></body></html>\n"
    )


def text_named_pdf() -> bytes:
    return b"This is a plain text file with a .pdf name.\nIt has no PDF header.\n"


def bom_pdf() -> bytes:
    """A real PDF preceded by a UTF-8 BOM and blank lines (readers accept it)."""
    return b"\xef\xbb\xbf\r\n  " + born_digital_pdf()


def zero_byte_file() -> bytes:
    return b""


def corrupt_png() -> bytes:
    """A PNG header followed by garbage: identifies as PNG, cannot be decoded."""
    good = encode_image(marker_image(), "PNG")
    return good[:60] + bytes((j * 13 + 5) % 256 for j in range(400))
