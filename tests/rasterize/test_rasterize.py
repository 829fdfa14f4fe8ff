"""Rasterize: every bad input has its own error code; good inputs become RGB pages, lazily."""

from __future__ import annotations

import gc
import inspect
import io
import os
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pymupdf
import pytest
from PIL import Image

from tests import docs_factory as f
from pipeline import rasterize
from pipeline.rasterize import pdf as raster_pdf
from pipeline.config import RunConfig
from pipeline.rasterize import (
    RENDER_FLOOR_DPI,
    PageFeatures,
    RasterOptions,
    choose_dpi,
    classify_page,
    fit_pixels,
    open_document,
    pixel_size,
    render_looks_failed,
    to_rgb,
)
from pipeline.records import PageFailure, PageImage, PageKind, Stage, StageError
from pipeline.tiling import TilingOptions, plan_tiles, target_render_size

PDF = "application/pdf"
OPTS = RasterOptions()
LOW = RasterOptions(min_dpi=72.0, max_dpi=72.0)  # cheap renders where resolution does not matter


def opened(data: bytes | str, media_type: str = PDF, uri: str = "mem://doc") -> rasterize.OpenedDocument:
    doc = open_document(data, uri=uri, doc_id="d" * 64, media_type=media_type)
    assert not isinstance(doc, StageError), doc
    return doc


def open_error(data: bytes | str, media_type: str = PDF) -> StageError:
    err = open_document(data, uri="mem://bad", doc_id="e" * 64, media_type=media_type)
    assert isinstance(err, StageError), f"expected a StageError, got {err!r}"
    assert err.stage is Stage.RASTERIZE
    assert err.message
    return err


def all_pages(data: bytes | str, media_type: str = PDF, options: RasterOptions = OPTS) -> list[PageImage | PageFailure]:
    with opened(data, media_type) as doc:
        return list(doc.pages(options))


def one_page(data: bytes | str, media_type: str = PDF, options: RasterOptions = OPTS) -> PageImage:
    items = all_pages(data, media_type, options)
    assert len(items) == 1
    assert isinstance(items[0], PageImage), items[0]
    assert items[0].image.mode == "RGB"
    assert items[0].image.size == (items[0].render.width, items[0].render.height)
    return items[0]


def rgb(page: PageImage, x: float, y: float) -> tuple[int, int, int]:
    """Pixel at a fraction (x, y) of the page's width and height."""
    w, h = page.image.size
    return page.image.getpixel((min(w - 1, int(w * x)), min(h - 1, int(h * y))))


# ---------------------------------------------------------------- bad inputs, one code each


def test_zero_byte_file_is_empty_file(tmp_path: Path) -> None:
    assert open_error(f.zero_byte_file()).type == "empty_file"
    path = tmp_path / "empty.pdf"
    path.write_bytes(b"")
    assert open_error(str(path)).type == "empty_file"
    assert open_error(b"", "image/png").type == "empty_file"


def test_text_named_pdf_is_not_a_pdf() -> None:
    err = open_error(f.text_named_pdf())
    assert err.type == "not_a_pdf"
    assert "%PDF" in err.message


def test_html_named_pdf_is_not_a_pdf() -> None:
    err = open_error(f.html_named_pdf())
    assert err.type == "not_a_pdf"
    assert "HTML" in err.message


def test_bom_and_whitespace_before_header_is_still_a_pdf() -> None:
    page = one_page(f.bom_pdf(), options=LOW)
    assert page.kind is PageKind.BORN_DIGITAL


def test_truncated_pdf_without_page_tree_is_no_pages_truncated() -> None:
    data = f.truncated_pdf()
    assert b"%%EOF" not in data
    err = open_error(data)
    assert err.type == "no_pages"
    assert "truncated or damaged" in err.message


def test_pdf_cut_after_its_header_is_corrupt_pdf() -> None:
    err = open_error(f.born_digital_pdf()[:200])
    assert err.type == "corrupt_pdf"
    assert "truncated" in err.message


def test_truncated_pdf_that_keeps_its_pages_still_renders() -> None:
    items = all_pages(f.truncated_tail_pdf(), options=LOW)
    assert len(items) == 2
    assert all(isinstance(p, PageImage) for p in items)
    assert "Operations report, page 2" in (items[1].text or "")


def test_user_password_pdf_is_encrypted_pdf() -> None:
    err = open_error(f.encrypted_pdf())
    assert err.type == "encrypted_pdf"
    assert "password" in err.message


def test_owner_password_only_pdf_opens_and_renders() -> None:
    page = one_page(f.owner_locked_pdf(), options=LOW)
    assert "Operations report" in (page.text or "")


def test_zero_page_pdf_is_no_pages() -> None:
    data = f.zero_page_pdf()
    with pymupdf.open(stream=data, filetype="pdf") as doc:  # the file itself is valid
        assert doc.page_count == 0 and not doc.is_repaired
    err = open_error(data)
    assert err.type == "no_pages"
    assert err.message == "the PDF has no pages"


def test_page_too_large_for_the_renderer_is_rendered_lower() -> None:
    # 14400 pt square at 100 dpi is 20000 x 20000 px: over MuPDF's pixmap limit (FzErrorLimit).
    data = f.page_pdf(14_400, 14_400)
    options = RasterOptions(min_dpi=100.0, max_dpi=100.0, max_page_pixels=10**10)
    with pymupdf.open(stream=data, filetype="pdf") as doc, pytest.raises(pymupdf.mupdf.FzErrorLimit):
        doc[0].get_pixmap(dpi=100)
    page = one_page(data, options=options)
    assert page.render.requested_dpi == 100.0
    assert page.render.dpi == 50.0
    assert page.render.downscaled is True
    assert page.render.note and "retried at 50 dpi" in page.render.note
    assert page.image.size == (10_000, 10_000)
    assert page.kind is PageKind.BORN_DIGITAL  # not blank: the box and text are drawn
    assert rgb(page, 0.5, 0.5) != (255, 255, 255)
    assert "Big page" in (page.text or "")


def test_page_that_never_fits_becomes_page_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[float] = []

    def always_too_large(page: pymupdf.Page, dpi: float, canvas: tuple[int, int] | None = None) -> Image.Image:
        tried.append(dpi)
        raise pymupdf.mupdf.FzErrorLimit("Overly large image")

    monkeypatch.setattr(raster_pdf, "_render", always_too_large)
    items = all_pages(f.text_pdf(2), options=RasterOptions(min_dpi=300.0, max_dpi=300.0))
    assert [type(i) for i in items] == [PageFailure, PageFailure]
    assert items[0].error.type == "page_too_large"
    assert items[0].error.stage is Stage.RASTERIZE
    assert tried[:5] == [300.0, 150.0, 75.0, 37.5, 300.0]  # halved down to the floor, per page
    assert min(tried) >= RENDER_FLOOR_DPI


def test_memory_error_while_rendering_is_retried_lower(monkeypatch: pytest.MonkeyPatch) -> None:
    real = raster_pdf._render

    def oom_above_100(page: pymupdf.Page, dpi: float, canvas: tuple[int, int] | None = None) -> Image.Image:
        if dpi > 100:
            raise MemoryError
        return real(page, dpi, canvas)

    monkeypatch.setattr(raster_pdf, "_render", oom_above_100)
    page = one_page(f.text_pdf(1), options=RasterOptions(min_dpi=300.0, max_dpi=300.0))
    assert page.render.dpi == 75.0 and page.render.downscaled
    assert "MemoryError" in (page.render.note or "")


def test_silent_all_white_render_with_limit_warning_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    real = raster_pdf._render
    pending: list[str] = []  # what MuPDF would have collected during the last render

    def white_first(page: pymupdf.Page, dpi: float, canvas: tuple[int, int] | None = None) -> Image.Image:
        image = real(page, dpi, canvas)
        if dpi > 100:
            pending.append("Overly large image (33000 x 33000)")
            return Image.new("RGB", image.size, "white")
        return image

    def warnings(reset: int = 1) -> str:
        text = "\n".join(pending)
        if reset:
            pending.clear()
        return text

    monkeypatch.setattr(raster_pdf, "_render", white_first)
    monkeypatch.setattr(pymupdf.TOOLS, "mupdf_warnings", warnings)
    page = one_page(f.text_pdf(1), options=RasterOptions(min_dpi=200.0, max_dpi=200.0))
    assert page.render.dpi == 100.0 and page.render.downscaled
    assert "rendered blank" in (page.render.note or "")
    assert page.kind is PageKind.BORN_DIGITAL


def test_render_looks_failed_needs_both_a_limit_warning_and_a_blank_render() -> None:
    assert render_looks_failed("warning: Overly large image", uniform=True)
    assert render_looks_failed("cannot allocate 9 GB", uniform=True)
    assert not render_looks_failed("warning: Overly large image", uniform=False)
    assert not render_looks_failed("cannot load content stream part 1/4", uniform=True)
    assert not render_looks_failed("", uniform=True)


def test_image_over_decompression_bomb_limit_is_image_too_large(tmp_path: Path) -> None:
    data = f.bomb_png()
    assert len(data) < 200_000
    err = open_error(data, "image/png")
    assert err.type == "image_too_large"
    assert "196000000" in err.message
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    assert open_error(str(path), "image/png").type == "image_too_large"


def test_image_over_our_limit_is_rejected_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # 200x200 = 40000: Pillow only warns
    err = open_error(f.encode_image(f.marker_image((200, 200)), "PNG"), "image/png")
    assert err.type == "image_too_large"
    assert "200x200" in err.message and "not decoded" in err.message


def test_tiff_frame_over_the_limit_is_a_page_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    small, big = f.marker_image((50, 50)), f.marker_image((300, 300))
    data = f.encode_image(small, "TIFF", save_all=True, append_images=[big, small])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    items = all_pages(data, "image/tiff")
    assert [type(i) for i in items] == [PageImage, PageFailure, PageImage]
    assert items[1].error.type == "image_too_large"
    assert "frame 2 of 3" in items[1].error.message


def test_corrupt_frame_in_multipage_tiff_keeps_good_frames() -> None:
    items = all_pages(f.multipage_tiff(frames=4, corrupt_frame=1), "image/tiff")
    assert [i.page_number for i in items] == [1, 2, 3, 4]
    assert isinstance(items[1], PageFailure)
    assert items[1].error.type == "corrupt_image"
    assert "frame 2 of 4" in items[1].error.message
    good = [i for i in items if isinstance(i, PageImage)]
    assert [g.page_number for g in good] == [1, 3, 4]
    assert all(g.image.size == (200, 150) and g.kind in (PageKind.IMAGE, PageKind.SCAN) for g in good)
    # frames keep their own content (frame 3's box is a different red than frame 4's)
    assert rgb(good[1], 0.5, 0.6) != rgb(good[2], 0.5, 0.6)


def test_corrupt_png_data_is_a_page_failure() -> None:
    items = all_pages(f.corrupt_png(), "image/png")
    assert len(items) == 1 and isinstance(items[0], PageFailure)
    assert items[0].error.type == "corrupt_image"


def test_damaged_image_header_is_corrupt_image() -> None:
    assert open_error(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png").type == "corrupt_image"


def test_unknown_and_unsupported_formats() -> None:
    assert open_error(b"just some bytes", "application/octet-stream").type == "unsupported_format"
    assert open_error(b"just some bytes", "image/png").type == "unsupported_format"
    gif = f.encode_image(f.marker_image(), "GIF")
    err = open_error(gif, "image/gif")
    assert err.type == "unsupported_format" and "GIF" in err.message


def test_missing_path_is_unreadable_and_retryable(tmp_path: Path) -> None:
    err = open_error(str(tmp_path / "nope.pdf"))
    assert err.type == "unreadable" and err.retryable  # storage, not content: a later run retries


def test_bad_content_is_not_retryable() -> None:
    for data, media_type in [(f.html_named_pdf(), PDF), (f.encrypted_pdf(), PDF), (f.truncated_pdf(), PDF),
                             (b"just some bytes", "image/png"), (f.bomb_png(), "image/png"), (b"", PDF)]:
        err = open_error(data, media_type)
        assert not err.retryable, err


# ---------------------------------------------------------------- the content decides the type


@pytest.mark.parametrize("claimed", ["image/png", "image/jpeg", "image/tiff", "application/octet-stream"])
def test_pdf_claimed_to_be_an_image_is_read_as_a_pdf(claimed: str) -> None:
    items = all_pages(f.text_pdf(2), claimed, LOW)
    assert [type(i) for i in items] == [PageImage, PageImage]
    assert items[0].kind is PageKind.BORN_DIGITAL and items[0].text == "Page 1"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_image_claimed_to_be_a_pdf_is_read_as_an_image(fmt: str) -> None:
    page = one_page(f.encode_image(f.chart_image(), fmt), PDF)
    assert page.kind is PageKind.IMAGE and page.image.size == (800, 500)


def test_content_that_is_neither_goes_by_the_claim() -> None:
    assert open_error(f.html_named_pdf(), PDF).type == "not_a_pdf"
    assert open_error(f.html_named_pdf(), "image/png").type == "unsupported_format"
    # "BM" starts a bitmap only with a real header after it: text is not an image
    assert open_error(b"BM is not a bitmap, just text", PDF).type == "not_a_pdf"


# ---------------------------------------------------------------- files that open damaged


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_truncated_multipage_tiff_keeps_every_frame_before_the_cut() -> None:
    data = f.truncated_tiff(frames=4, keep=2)
    with Image.open(io.BytesIO(data)) as tif, pytest.raises(Exception):
        tif.n_frames  # what made the whole file an error before
    with opened(data, "image/tiff") as doc:
        items = list(doc.pages(OPTS))
        assert doc.page_count == 3 and not doc.repaired
        assert doc.open_note and "after frame 2" in doc.open_note
    assert [type(i) for i in items] == [PageImage, PageImage, PageFailure]
    assert [i.page_number for i in items] == [1, 2, 3]
    assert items[2].error.type == "corrupt_image" and not items[2].error.retryable
    assert "frame 3 cannot be read" in items[2].error.message and "cut off" in items[2].error.message
    # the kept frames are the file's own first two frames, pixel for pixel
    with Image.open(io.BytesIO(f.multipage_tiff(4))) as whole:
        for index, page in enumerate(items[:2]):
            whole.seek(index)
            assert np.array_equal(np.asarray(page.image), np.asarray(whole.convert("RGB")))


def test_tiff_cut_after_its_first_frame_has_that_frame_and_one_failure() -> None:
    items = all_pages(f.truncated_tiff(frames=3, keep=1), "image/tiff")
    assert [type(i) for i in items] == [PageImage, PageFailure]


def test_whole_files_carry_no_damage_note() -> None:
    for data, media_type in [(f.text_pdf(2), PDF), (f.multipage_tiff(3), "image/tiff"),
                             (f.encode_image(f.chart_image(), "PNG"), "image/png")]:
        with opened(data, media_type) as doc:
            list(doc.pages(LOW))
            assert (doc.repaired, doc.open_note) == (False, None)


def test_pdf_repaired_on_opening_says_so() -> None:
    with opened(f.truncated_tail_pdf()) as doc:
        assert doc.repaired is True
        assert doc.open_note == (
            "the file is truncated (no %%EOF marker); MuPDF repaired the file's cross-reference table on opening"
        )


def test_pdf_repaired_while_a_page_loads_says_so_after_the_pages() -> None:
    with opened(f.misplaced_object_pdf()) as doc:
        assert (doc.repaired, doc.open_note) == (False, None)  # nothing is wrong until page 1 is read
        items = list(doc.pages(LOW))
    assert all(isinstance(i, PageImage) for i in items)
    assert doc.repaired is True
    assert doc.open_note == "MuPDF repaired the file's cross-reference table while reading page 1"


def test_cut_pdfs_never_raise() -> None:
    full = f.born_digital_pdf(pages=2)
    for cut in range(40, len(full), len(full) // 12):
        result = open_document(full[:cut], uri="mem://cut", doc_id="c", media_type=PDF)
        if isinstance(result, StageError):
            assert result.type in {"no_pages", "corrupt_pdf"}, result
            continue
        with result:
            items = list(result.pages(LOW))
        assert len(items) == result.page_count
        assert all(isinstance(i, (PageImage, PageFailure)) for i in items)


# ---------------------------------------------------------------- laziness and memory


def test_pages_are_yielded_lazily_and_not_kept() -> None:
    with opened(f.text_pdf(200)) as doc:
        assert doc.page_count == 200
        pages = doc.pages(LOW)
        assert inspect.isgenerator(pages)
        first = next(pages)
        assert isinstance(first, PageImage) and first.page_number == 1
        ref = weakref.ref(first.image)
        del first
        second = next(pages)
        assert second.page_number == 2
        gc.collect()
        assert ref() is None, "the generator kept a previous page alive"
        assert sum(1 for _ in pages) == 198
        pages.close()


def _peak_rss_growth(data: bytes, options: RasterOptions) -> tuple[int, int]:
    """(peak growth of resident memory in bytes, pages seen) while streaming all pages."""
    page_size = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page_size

    gc.collect()
    base = peak = rss()
    seen = 0
    with opened(data) as doc:
        for item in doc.pages(options):
            assert isinstance(item, PageImage)
            seen += 1
            del item
            peak = max(peak, rss())
    return peak - base, seen


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_memory_does_not_grow_with_page_count() -> None:
    letter_72 = RasterOptions(min_dpi=72.0, max_dpi=72.0)  # 612x792 RGB: ~2 MB per page in Pillow
    data20, data200 = f.text_pdf(20, size=f.LETTER), f.text_pdf(200, size=f.LETTER)
    _peak_rss_growth(data20, letter_72)  # warm up caches and allocator arenas
    tracemalloc.start()
    try:
        grow20, n20 = _peak_rss_growth(data20, letter_72)
        py_peak20 = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        grow200, n200 = _peak_rss_growth(data200, letter_72)
        py_peak200 = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (n20, n200) == (20, 200)
    # Keeping 200 pages would take ~390 MB; streaming them stays near one page.
    assert grow200 < max(3 * grow20, 0) + 48 * 2**20, (grow20, grow200)
    assert py_peak200 < 3 * py_peak20 + 2**20, (py_peak20, py_peak200)


# ---------------------------------------------------------------- rotation


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_pdf_rotate_is_applied_and_recorded(rotate: int) -> None:
    page = one_page(f.rotated_pdf(rotate), options=LOW)
    assert page.rotation == rotate
    expected = (792, 612) if rotate in (90, 270) else (612, 792)
    assert page.image.size == expected
    assert "Rotated page" in (page.text or "")
    assert "Footer of the rotated page" in (page.text or "")  # text is clipped to the unrotated page


def test_exif_orientation_6_is_rotated_upright() -> None:
    data = f.exif_rotated_jpeg(orientation=6, size=(300, 200))
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (300, 200)
    page = one_page(data, "image/jpeg")
    assert page.rotation == 90
    assert page.image.size == (200, 300)
    red = rgb(page, 0.95, 0.03)  # the top-left marker is now top-right (rotated 90 clockwise)
    assert red[0] > 200 and red[1] < 80 and red[2] < 80
    assert min(rgb(page, 0.05, 0.03)) > 200


@pytest.mark.parametrize(("orientation", "degrees", "size"), [(1, 0, (300, 200)), (3, 180, (300, 200)), (8, 270, (200, 300))])
def test_other_exif_orientations(orientation: int, degrees: int, size: tuple[int, int]) -> None:
    page = one_page(f.exif_rotated_jpeg(orientation=orientation), "image/jpeg")
    assert (page.rotation, page.image.size) == (degrees, size)


# ---------------------------------------------------------------- colour modes


def test_cmyk_becomes_rgb() -> None:
    page = one_page(f.cmyk_jpeg(), "image/jpeg")
    r, g, b = rgb(page, 0.25, 0.5)
    assert r < 60 and g > 180 and b > 180  # cyan ink
    assert min(rgb(page, 0.75, 0.5)) > 240  # no ink: white paper


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    page = one_page(f.gray16_png(), "image/png")
    left, mid, right = rgb(page, 0.0, 0.5), rgb(page, 0.5, 0.5), rgb(page, 0.999, 0.5)
    assert left == (0, 0, 0) and right == (255, 255, 255)
    assert 110 < mid[0] < 145 and mid[0] == mid[1] == mid[2]


@pytest.mark.parametrize(
    ("maker", "opaque"),
    [(f.palette_alpha_png, (0, 0, 255)), (f.rgba_png, (0, 200, 0)), (f.la_png, (128, 128, 128))],
    ids=["palette+transparency", "rgba", "la"],
)
def test_transparency_is_composited_on_white(maker, opaque: tuple[int, int, int]) -> None:
    page = one_page(maker(), "image/png")
    assert rgb(page, 0.2, 0.5) == (255, 255, 255)  # transparent half: white, not black
    assert rgb(page, 0.8, 0.5) == opaque


def test_to_rgb_handles_other_modes() -> None:
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I", (4, 4), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I", (4, 4), 200)).getpixel((0, 0)) == (200, 200, 200)
    assert to_rgb(Image.new("F", (4, 4), 0.5)).getpixel((0, 0)) == (127, 127, 127)
    same = Image.new("RGB", (2, 2))
    assert to_rgb(same) is same


# ---------------------------------------------------------------- text layer and kinds


def test_text_layer_of_born_digital_page_in_reading_order() -> None:
    page = one_page(f.born_digital_pdf(), options=LOW)
    text = page.text or ""
    assert text.startswith("Operations report, page 1")
    assert "Throughput rose in every region" in text
    north = next(line for line in text.splitlines() if "North" in line)
    assert north.split() == ["North", "120", "135", "150", "160"]  # table rows stay rows
    assert "Units shipped per quarter" in text
    assert text.index("Throughput") < text.index("North") < text.index("Units shipped")


def test_text_layer_not_extracted_when_disabled() -> None:
    page = one_page(f.born_digital_pdf(), options=RasterOptions(min_dpi=72, max_dpi=72, extract_text=False))
    assert page.text is None
    assert page.kind is PageKind.BORN_DIGITAL  # classification does not need the extracted text


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: f.born_digital_pdf(), PageKind.BORN_DIGITAL),
        (lambda: f.image_pdf(f.scan_image(dpi=60)), PageKind.SCAN),
        (lambda: f.image_pdf(f.scan_image(dpi=60), f.LOREM), PageKind.SCAN_WITH_OCR),
        (lambda: f.image_pdf(f.scan_image(dpi=60), f.LOREM, visible_text=True), PageKind.SCAN_WITH_OCR),
        (lambda: f.blank_pdf(), PageKind.BLANK),
        (lambda: f.image_pdf(f.blank_scan_image((300, 400))), PageKind.BLANK),
        (lambda: f.image_doc_pdf(f.chart_image(), coverage=0.2), PageKind.SCAN),
    ],
    ids=["born_digital", "scan", "scan_with_invisible_ocr", "scan_with_visible_ocr", "blank", "blank_scan", "image_only"],
)
def test_page_kinds_of_built_documents(make, kind: PageKind) -> None:
    assert one_page(make(), options=LOW).kind is kind


def test_ocr_text_of_scan_is_the_text_layer() -> None:
    page = one_page(f.image_pdf(f.scan_image(dpi=60), "Invoice 42 total 99.50"), options=LOW)
    assert page.text == "Invoice 42 total 99.50"


def test_image_files_are_image_or_blank() -> None:
    assert one_page(f.encode_image(f.chart_image(), "PNG"), "image/png").kind is PageKind.IMAGE
    assert one_page(f.encode_image(f.blank_scan_image((500, 500)), "PNG"), "image/png").kind is PageKind.BLANK
    webp = one_page(f.encode_image(f.chart_image(), "WEBP", quality=80), "image/webp")
    bmp = one_page(f.encode_image(f.marker_image(), "BMP"), "image/bmp")
    assert (webp.kind, bmp.kind) == (PageKind.IMAGE, PageKind.IMAGE)


@pytest.mark.parametrize(
    ("features", "kind"),
    [
        (PageFeatures(has_text=False), PageKind.BLANK),
        (PageFeatures(has_text=False, vector_items=3, uniform=True), PageKind.BLANK),
        (PageFeatures(has_text=True), PageKind.BORN_DIGITAL),
        (PageFeatures(has_text=False, vector_items=40), PageKind.BORN_DIGITAL),
        (PageFeatures(has_text=True, image_coverage=0.6, invisible_text=0.0), PageKind.BORN_DIGITAL),
        (PageFeatures(has_text=False, image_coverage=1.0), PageKind.SCAN),
        (PageFeatures(has_text=False, image_coverage=0.98, vector_items=2), PageKind.SCAN),
        (PageFeatures(has_text=False, image_coverage=0.1), PageKind.SCAN),
        (PageFeatures(has_text=True, image_coverage=1.0, invisible_text=1.0), PageKind.SCAN_WITH_OCR),
        (PageFeatures(has_text=True, image_coverage=0.6, invisible_text=0.9), PageKind.SCAN_WITH_OCR),
        (PageFeatures(has_text=True, image_coverage=0.95, invisible_text=0.0), PageKind.SCAN_WITH_OCR),
    ],
)
def test_classify_page(features: PageFeatures, kind: PageKind) -> None:
    assert classify_page(features) is kind


# ---------------------------------------------------------------- resolution


def test_requested_dpi_follows_the_tiling_target() -> None:
    width_pt, height_pt = f.LETTER
    options = RasterOptions(min_dpi=1.0, max_dpi=10_000.0, max_page_pixels=10**9)
    target_w, target_h = target_render_size(width_pt, height_pt, options.tiling)
    plan = choose_dpi(width_pt, height_pt, options)
    assert plan.requested == pytest.approx(72 * max(target_w / width_pt, target_h / height_pt))
    assert plan.width >= target_w and plan.height >= target_h  # the render covers the tile grid
    assert plan.width <= target_w + 1 or plan.height <= target_h + 1  # and no more than needed
    page = one_page(f.born_digital_pdf(), options=options)
    assert page.render.requested_dpi == pytest.approx(plan.requested, abs=1e-3)
    # The page is rendered straight at the tile canvas its planned render would be resized
    # to, so cutting the tiles needs no resampling.
    canvas = plan_tiles(plan.width, plan.height, options.tiling)
    assert (page.render.width, page.render.height) == (canvas.resized_width, canvas.resized_height)
    assert plan_tiles(page.render.width, page.render.height, options.tiling) == canvas
    assert page.render.downscaled is False and page.render.note is None


def test_canvas_render_matches_a_resized_plain_render() -> None:
    """Rendering at the canvas gives the picture a plain render resized to it would."""
    options = RasterOptions()
    page = one_page(f.born_digital_pdf(), options=options)
    plan = choose_dpi(*f.LETTER, options)
    with pymupdf.open(stream=f.born_digital_pdf(), filetype="pdf") as doc:
        plain = raster_pdf._render(doc[0], plan.dpi)
    resized = plain.resize(page.image.size, Image.Resampling.BICUBIC)
    diff = np.abs(np.asarray(resized, dtype=np.int16) - np.asarray(page.image, dtype=np.int16))
    assert diff.mean() < 4.0  # anti-aliasing differs at glyph edges only


def test_canvas_is_not_used_when_min_dpi_asks_for_more() -> None:
    options = RasterOptions(min_dpi=300.0, max_dpi=300.0)
    page = one_page(f.born_digital_pdf(), options=options)
    assert page.render.dpi == 300.0 and (page.render.width, page.render.height) == (2550, 3300)


def test_requested_dpi_is_clamped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.tiling.target_render_size", lambda w, h, o: (10, 10))
    low = choose_dpi(612, 792, RasterOptions(min_dpi=90, max_dpi=200))
    assert (low.requested, low.dpi, low.over_budget) == (90, 90, False)
    monkeypatch.setattr("pipeline.tiling.target_render_size", lambda w, h, o: (100_000, 100_000))
    high = choose_dpi(612, 792, RasterOptions(min_dpi=90, max_dpi=200, max_page_pixels=10**9))
    assert (high.requested, high.dpi) == (200, 200)
    assert (high.width, high.height) == pixel_size(612, 792, 200) == (1700, 2200)


def test_pixel_budget_lowers_the_resolution_and_says_so() -> None:
    options = RasterOptions(min_dpi=300, max_dpi=300, max_page_pixels=1_000_000)
    plan = choose_dpi(*f.LETTER, options)
    assert plan.over_budget and plan.requested == 300
    assert plan.width * plan.height <= 1_000_000
    assert plan.width * plan.height > 0.98 * 1_000_000  # not needlessly small
    page = one_page(f.born_digital_pdf(), options=options)
    assert page.image.width * page.image.height <= 1_000_000
    assert page.render.downscaled and page.render.dpi < 300 == page.render.requested_dpi
    assert "pixel page budget" in (page.render.note or "")


def test_pixel_size_matches_the_renderer() -> None:
    with pymupdf.open(stream=f.text_pdf(1, size=(595.3, 841.9)), filetype="pdf") as doc:
        for dpi in (37.3, 72.0, 96.0, 150.7, 200.0):
            pix = doc[0].get_pixmap(dpi=None, matrix=pymupdf.Matrix(dpi / 72, dpi / 72))
            assert (pix.width, pix.height) == pixel_size(595.3, 841.9, dpi)


def test_large_image_is_downscaled_keeping_aspect_and_dpi() -> None:
    data = f.encode_image(f.chart_image((800, 500)), "PNG", dpi=(300, 300))
    page = one_page(data, "image/png", RasterOptions(max_page_pixels=100_000))
    w, h = page.image.size
    assert w * h <= 100_000 and abs(w / h - 800 / 500) < 0.01
    assert page.render.downscaled and "page budget" in (page.render.note or "")
    assert page.render.dpi == pytest.approx(300 * w / 800, rel=1e-3)
    full = one_page(data, "image/png")
    assert (full.image.size, full.render.dpi, full.render.downscaled) == ((800, 500), 300.0, False)


def test_large_jpeg_is_decoded_reduced() -> None:
    data = f.encode_image(f.scan_image(dpi=100).convert("RGB"), "JPEG", quality=85)  # 850x1100
    page = one_page(data, "image/jpeg", RasterOptions(max_page_pixels=50_000))
    assert page.image.width * page.image.height <= 50_000
    assert page.render.downscaled and page.render.dpi is None  # no dpi recorded in this file


def test_fit_pixels() -> None:
    assert fit_pixels(100, 50, 10_000) == (100, 50)
    w, h = fit_pixels(4000, 3000, 1_000_000)
    assert w * h <= 1_000_000 and abs(w / h - 4 / 3) < 0.01 and w * h > 990_000
    assert fit_pixels(100_000, 1, 10) == (10, 1)


def test_options_from_config() -> None:
    cfg = RunConfig(source="in", output="out", min_dpi=50, max_dpi=150, max_page_pixels=2_000_000, extract_text_layer=False)
    options = RasterOptions.from_config(cfg)
    assert (options.min_dpi, options.max_dpi, options.max_page_pixels, options.extract_text) == (50, 150, 2_000_000, False)
    assert options.tiling == TilingOptions.from_config(cfg)


# ---------------------------------------------------------------- inputs and lifecycle


def test_paths_and_sniffed_media_types(tmp_path: Path) -> None:
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(f.born_digital_pdf(pages=2))
    assert [p.page_number for p in all_pages(str(pdf), options=LOW)] == [1, 2]
    png = tmp_path / "chart.png"
    png.write_bytes(f.encode_image(f.chart_image(), "PNG"))
    assert one_page(str(png), "image/png").kind is PageKind.IMAGE
    # application/octet-stream: the content decides
    assert one_page(f.born_digital_pdf(), "application/octet-stream", LOW).kind is PageKind.BORN_DIGITAL
    assert one_page(png.read_bytes(), "application/octet-stream").kind is PageKind.IMAGE
    # a mislabelled PDF is still read as the PDF it is
    assert one_page(f.born_digital_pdf(), "image/png", LOW).kind is PageKind.BORN_DIGITAL


def test_pages_after_close_are_failures_not_exceptions() -> None:
    doc = opened(f.text_pdf(2))
    pages = doc.pages(LOW)
    first = next(pages)
    assert isinstance(first, PageImage)
    doc.close()
    doc.close()  # idempotent
    rest = list(pages)
    assert len(rest) == 1 and isinstance(rest[0], PageFailure)
    tiff = opened(f.multipage_tiff(2), "image/tiff")
    tiff.close()
    assert all(isinstance(i, PageFailure) for i in tiff.pages(LOW))


def test_page_records_carry_identity() -> None:
    doc = open_document(f.text_pdf(3), uri="s3://bkt/a.pdf", doc_id="abc", media_type=PDF)
    assert not isinstance(doc, StageError)
    with doc:
        items = list(doc.pages(LOW))
    assert [(i.uri, i.doc_id, i.page_number) for i in items] == [("s3://bkt/a.pdf", "abc", n) for n in (1, 2, 3)]
    assert [i.text for i in items] == ["Page 1", "Page 2", "Page 3"]


# ---------------------------------------------------------------- sample_docs/

SAMPLES = Path(__file__).resolve().parents[2] / "sample_docs"


def _load_make_samples():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES / "make_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_docs_are_deterministic_and_small() -> None:
    make_samples = _load_make_samples()
    first, second = make_samples.build_samples(), make_samples.build_samples()
    assert first == second
    assert set(first) <= {p.name for p in SAMPLES.iterdir()}, "run python sample_docs/make_samples.py"
    assert sum(len(b) for b in first.values()) < 3 * 2**20
    readme = (SAMPLES / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in first)


@pytest.mark.parametrize(
    ("name", "media_type", "kinds", "size_check", "rotation"),
    [
        ("report.pdf", PDF, [PageKind.BORN_DIGITAL] * 3, lambda w, h: h > w, 0),
        ("scanned_page.jpg", "image/jpeg", [PageKind.SCAN], lambda w, h: (w, h) == (850, 1100), 0),
        ("scanned_report.tiff", "image/tiff", [PageKind.SCAN] * 3, lambda w, h: (w, h) == (850, 1100), 0),
        ("rotated_scan.jpg", "image/jpeg", [PageKind.SCAN], lambda w, h: (w, h) == (850, 1100), 90),
        ("rotated_page.pdf", PDF, [PageKind.BORN_DIGITAL], lambda w, h: w > h, 90),
        ("chart.png", "image/png", [PageKind.IMAGE], lambda w, h: (w, h) == (800, 500), 0),
    ],
)
def test_sample_docs_rasterize(name: str, media_type: str, kinds: list[PageKind], size_check, rotation: int) -> None:
    items = all_pages(str(SAMPLES / name), media_type, LOW)
    assert all(isinstance(i, PageImage) for i in items), items
    assert [i.kind for i in items] == kinds
    assert all(size_check(i.image.width, i.image.height) and i.rotation == rotation for i in items)


def test_words_to_text_keeps_table_rows_and_paragraphs() -> None:
    from pipeline.rasterize import words_to_text

    words = [  # (x0, y0, x1, y1, word): out of order, as content streams often are
        (200, 100, 230, 112, "135"), (72, 100, 110, 112, "North"), (140, 100, 170, 112, "120"),
        (72, 60, 120, 72, "Region"), (140, 61, 170, 73, "2023"), (200, 60, 230, 72, "2024"),
        (72, 140, 120, 152, "Notes"),  # after a gap: a new paragraph
    ]
    assert words_to_text(words) == "Region 2023 2024\n\nNorth 120 135\n\nNotes"
    assert words_to_text([]) == ""


def test_pdf_pages_carry_a_directly_rendered_thumbnail() -> None:
    from pipeline.tiling import cut_tiles

    page = one_page(f.born_digital_pdf())
    plan = plan_tiles(page.render.width, page.render.height, TilingOptions())
    assert plan.thumbnail and page.thumbnail is not None and page.thumbnail.size == plan.thumbnail_size
    tiles = cut_tiles(page.image, plan, thumbnail=page.thumbnail)
    assert tiles[-1] is page.thumbnail and len(tiles) == plan.tiles
    # it shows the same page as the bicubic thumbnail would
    bicubic = page.image.resize(plan.thumbnail_size, Image.Resampling.BICUBIC)
    diff = np.abs(np.asarray(bicubic, dtype=np.int16) - np.asarray(page.thumbnail, dtype=np.int16))
    assert diff.mean() < 8.0


def test_image_pages_get_no_prerendered_thumbnail() -> None:
    items = all_pages(f.rgba_png((600, 800)), media_type="image/png")
    assert all(isinstance(i, PageImage) and i.thumbnail is None for i in items)


def test_an_image_file_of_a_page_is_a_scan_and_a_photo_is_not() -> None:
    from PIL import ImageDraw

    from pipeline.rasterize import looks_like_scan

    page = Image.new("RGB", (850, 1100), (246, 244, 238))  # paper, a little yellowed
    draw = ImageDraw.Draw(page)
    for y in range(100, 1000, 28):
        draw.line([(80, y), (770, y)], fill=(30, 30, 30), width=6)  # lines of text
    assert looks_like_scan(page)
    photo = Image.fromarray(
        np.stack([*np.meshgrid(np.linspace(0, 255, 400), np.linspace(255, 0, 300)), np.full((300, 400), 120.0)], -1)
        .astype("uint8")
    )
    assert not looks_like_scan(photo)
    dark = Image.new("RGB", (400, 300), (40, 40, 40))  # a slide with a dark background
    assert not looks_like_scan(dark)
