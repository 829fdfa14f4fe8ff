"""OCR routing by page kind: the text-layer quality check on strings, on held-out PDFs
made here with PyMuPDF (born-digital, scan, scan with an invisible OCR layer good or
poor, a font without a Unicode map), and on the sample documents."""

from __future__ import annotations

import io
import mimetypes
from pathlib import Path

import pymupdf
import pytest
from PIL import Image, ImageDraw

from pipeline.config import RunConfig
from pipeline.rasterize import RasterOptions, open_document
from pipeline.records import PageImage, PageKind
from pipeline.textlayer import assess_text_layer, garbled_word_share, route_ocr

SAMPLES = Path(__file__).resolve().parents[1] / "sample_docs"
LINES = [
    f"Line {i}: quarterly revenue grew by {i + 3} percent in the northern region (Q3 FY2024)." for i in range(30)
]
CLEAN = "\n".join(LINES)


def _pages(data: bytes, name: str = "doc.pdf") -> list[PageImage]:
    opts = RasterOptions.from_config(RunConfig(source="in", output="out"))
    opened = open_document(data, uri=name, doc_id=name, media_type=mimetypes.guess_type(name)[0] or "")
    assert not isinstance(opened, Exception) and getattr(opened, "pages", None), opened
    with opened:
        pages = list(opened.pages(opts))
    assert all(isinstance(p, PageImage) for p in pages), pages
    return pages  # type: ignore[return-value]


def _text_image(lines: list[str]) -> bytes:
    image = Image.new("RGB", (1275, 1650), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((100, 100 + 45 * i), line, fill="black")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _pdf(*, image: bool = False, text: list[str] | None = None, invisible: bool = False) -> bytes:
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    if image:
        page.insert_image(page.rect, stream=_text_image(LINES))
    for i, line in enumerate(text or []):
        page.insert_text((48, 54 + 21.6 * i), line, fontsize=9, render_mode=3 if invisible else 0)
    return doc.tobytes()


def _pdf_without_unicode_map() -> bytes:
    """Text in an embedded font whose /ToUnicode map is removed: MuPDF can only guess the
    characters from glyph ids (shifted letters and control characters come out)."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    page.insert_font(fontname="F0", fontbuffer=pymupdf.Font("helv").buffer)
    for i, line in enumerate(LINES):
        page.insert_text((48, 54 + 21.6 * i), line, fontname="F0", fontsize=9)
    for xref in range(1, doc.xref_length()):
        if "/ToUnicode" in doc.xref_object(xref):
            doc.xref_set_key(xref, "ToUnicode", "null")
    return doc.tobytes()


# ---- the check on strings -------------------------------------------------------------


def test_clean_text_passes_both_checks() -> None:
    assert assess_text_layer(CLEAN).usable
    assert assess_text_layer(CLEAN, scan=True).usable
    codes = "See ISO-9001, COVID-19 and H2O at https://example.com or ops@example.com: 12th, 5kg, €1,200.50, 3.5%."
    assert assess_text_layer(codes, scan=True).usable


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "empty"),
        ("  \n ", "empty"),
        (CLEAN.replace("revenue", "rev\ufffdnue"), "replacement"),
        (CLEAN.replace("region", "regi\ue001n"), "unmapped"),  # private-use code points
        (CLEAN.replace(" ", "\x01"), "unmapped"),  # control characters where spaces were
        (CLEAN.replace("percent", "(cid:12)(cid:7)"), "unmapped"),
        ("\u2580\u2584\u2588" * 200 + CLEAN, None),  # box-drawing symbols are common symbols
    ],
)
def test_broken_layers_fail_with_a_reason(text, reason) -> None:
    verdict = assess_text_layer(text)
    assert verdict.usable is (reason is None) and verdict.reason == reason


def test_unmapped_share_has_a_threshold() -> None:
    one_glyph = CLEAN[:-1] + "\ufffd"  # one unmapped glyph in ~2,000 characters is tolerated
    assert assess_text_layer(one_glyph).usable
    assert not assess_text_layer(CLEAN[:300] + "\ufffd" * 3).usable


def test_poor_ocr_layer_fails_only_the_scan_check() -> None:
    poor = "\n".join(
        f"Qu4rterly rev3nue gr ew b y {i} p e r c e n t ~ in th3 n0rthern reg1on" for i in range(30)
    )
    garbled, singles = garbled_word_share(poor)
    assert garbled > 0.08 and singles > 0.3
    assert assess_text_layer(poor, scan=True).reason == "garbled_words"
    assert not assess_text_layer("Total 12", scan=True).usable  # too little to trust
    assert assess_text_layer("Total 12").usable  # a born-digital page may hold one line


def test_density_against_the_page_area() -> None:
    letter = 8.5 * 11
    assert assess_text_layer(CLEAN, area_in2=letter).usable
    assert assess_text_layer(CLEAN * 30, area_in2=letter).reason == "density"  # stacked layers
    sliver = "Quarterly revenue grew by twelve percent."
    assert assess_text_layer(sliver, scan=True, area_in2=letter).reason == "density"
    assert assess_text_layer(sliver, area_in2=letter).usable


def test_route_modes() -> None:
    assert route_ocr("model", PageKind.BORN_DIGITAL, CLEAN).source == "model"
    assert route_ocr("text_layer", PageKind.SCAN, CLEAN).source == "text_layer"
    assert route_ocr("text_layer", PageKind.IMAGE, None).source is None
    assert route_ocr("auto", PageKind.BORN_DIGITAL, CLEAN).source == "text_layer"
    assert route_ocr("auto", "born_digital", CLEAN).source == "text_layer"
    for kind in (PageKind.SCAN, PageKind.IMAGE, PageKind.BLANK, None):
        assert route_ocr("auto", kind, CLEAN).source == "model"
    with pytest.raises(ValueError):
        route_ocr("sometimes", PageKind.SCAN, None)


# ---- held-out documents made here ------------------------------------------------------


def test_born_digital_page_uses_its_text_layer() -> None:
    (page,) = _pages(_pdf(text=LINES))
    assert page.kind is PageKind.BORN_DIGITAL
    route = route_ocr("auto", page.kind, page.text)
    assert route.source == "text_layer", route


def test_scan_goes_to_the_model() -> None:
    (page,) = _pages(_pdf(image=True))
    assert page.kind is PageKind.SCAN
    assert route_ocr("auto", page.kind, page.text).source == "model"


def test_scan_with_a_good_invisible_ocr_layer_uses_it() -> None:
    (page,) = _pages(_pdf(image=True, text=LINES, invisible=True))
    assert page.kind is PageKind.SCAN_WITH_OCR and "quarterly revenue" in (page.text or "")
    assert route_ocr("auto", page.kind, page.text).source == "text_layer"


def test_scan_with_a_poor_ocr_layer_goes_to_the_model() -> None:
    poor = [f"Qu4rterly rev3nue gr ew b y {i} p e r c e n t ~ th3 n0rth reg1on" for i in range(30)]
    (page,) = _pages(_pdf(image=True, text=poor, invisible=True))
    assert page.kind is PageKind.SCAN_WITH_OCR
    route = route_ocr("auto", page.kind, page.text)
    assert route.source == "model" and "garbled_words" in route.reason


def test_font_without_a_unicode_map_goes_to_the_model() -> None:
    (page,) = _pages(_pdf_without_unicode_map())
    assert page.kind is PageKind.BORN_DIGITAL
    assert "quarterly" not in (page.text or "").lower()  # extraction is garbage, as in the wild
    route = route_ocr("auto", page.kind, page.text)
    assert route.source == "model", (route, (page.text or "")[:80])


def test_sample_documents() -> None:
    routes: dict[str, list[str | None]] = {}
    for path in sorted(SAMPLES.iterdir()):
        if path.suffix in (".py", ".md"):
            continue
        for page in _pages(path.read_bytes(), path.name):
            routes.setdefault(path.name, []).append(route_ocr("auto", page.kind, page.text).source)
    assert routes["report.pdf"] == ["text_layer"] * 3
    assert routes["rotated_page.pdf"] == ["text_layer"]
    for name in ("chart.png", "scanned_page.jpg", "rotated_scan.jpg", "scanned_report.tiff"):
        assert set(routes[name]) == {"model"}, name


@pytest.mark.parametrize(
    "sentence",
    [
        "Der Umsatz im dritten Quartal stieg in der nördlichen Region um zwölf Prozent, während die Kosten sanken.",
        "Čtvrtletní tržby v severním regionu vzrostly o dvanáct procent, zatímco náklady klesly.",
        "Przychody kwartalne w regionie północnym wzrosły o dwanaście procent, a koszty spadły.",
        "Tyfodd refeniw chwarterol yn y rhanbarth gogleddol deuddeg y cant tra gostyngodd costau.",
        "Neljännesvuosittainen liikevaihto kasvoi pohjoisella alueella kaksitoista prosenttia.",
        "Le chiffre d'affaires trimestriel a augmenté de douze pour cent dans la région nord.",
    ],
)
def test_other_languages_pass(sentence) -> None:
    assert assess_text_layer(" ".join([sentence] * 5)).usable


def test_shifted_alphabet_and_random_letters_fail() -> None:
    shifted = "".join(chr(ord(c) + 1) if c.isalpha() else c for c in CLEAN.upper())
    assert assess_text_layer(shifted).reason == "implausible_letters"
    rng = __import__("random").Random(0)
    noise = " ".join("".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(6)) for _ in range(60))
    assert assess_text_layer(noise).reason == "implausible_letters"
