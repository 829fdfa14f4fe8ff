"""Is a PDF text layer good enough to stand in for model OCR? Pure functions, no I/O.

The model is the whole cost of a run, and OCR is most of what it generates. A
born-digital page already carries its exact text: drawn from fonts, extracted by MuPDF
in reading order. That text is only wrong when the font cannot be mapped back to
Unicode (no /ToUnicode map, a symbolic or Type 3 font): then extraction gives U+FFFD,
private-use code points, control characters, or letters of a shifted alphabet. A scan's
invisible OCR layer was written by another OCR engine and can be wrong in ordinary
ways (split words, letters read as digits, stray symbols), so it is held to a stricter
check. The checks, each a share of the layer's non-blank characters or words:

- `replacement`: U+FFFD (a glyph MuPDF could not map) above 0.5 %;
- `unmapped`: private-use, unassigned or surrogate code points, control characters
  other than tab/newline, or `(cid:N)` runs, above 0.5 %;
- `symbols`: characters that are neither letters, digits, punctuation, spaces nor common
  symbols (currency, maths, bullets) above 10 %;
- `garbled_words`: words that are neither words, numbers, codes (Q3, ISO-9001) nor
  addresses, e.g. letters and digits mixed inside (c0mpany) or broken up by stray
  symbols, above 8 % of words on a scan's OCR layer (25 % on a born-digital page, whose
  words are exact but may be technical); or, on a scan, single letters above 30 %;
- `implausible_letters`: with at least 100 Latin letters (accents ignored), neither a nor
  e among the five most frequent letters, or vowels (a e i o u y) under 22 % of them.
  In the Latin-script languages a or e is among the five commonest letters and vowels
  are about a third of the letters or more; the usual garbage of a font without a
  Unicode map is a shifted alphabet (RVBSUFSMZ for QUARTERLY: e, t, a come out as f, u,
  b). A language where this misfires (Vietnamese without its accents, perhaps) only
  costs model OCR, never a wrong text;
- `too_little` (scan OCR layers only): fewer than 20 non-blank characters;
- `density` (when the page area is known): more than 400 characters per square inch
  cannot be drawn legibly (stacked or duplicated layers); fewer than 2 per square inch
  on a scan means the OCR layer covers only a sliver of the page.

    route = route_ocr("auto", page.kind, page.text)   # OcrRoute(source="text_layer"|"model"|None, reason)
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from pipeline.records import PageKind

OcrSource = Literal["text_layer", "model"]

MAX_REPLACEMENT = 0.005
MAX_UNMAPPED = 0.005
MAX_SYMBOLS = 0.10
MAX_GARBLED_WORDS = 0.08  # a scan's OCR layer
MAX_GARBLED_WORDS_DIGITAL = 0.25  # a born-digital text layer
MAX_SINGLE_LETTERS = 0.30
MIN_SCAN_CHARS = 20
MIN_VOWEL_SHARE = 0.22
MIN_LATIN_LETTERS = 100
MAX_CHARS_PER_IN2 = 400.0
MIN_SCAN_CHARS_PER_IN2 = 2.0

_CID = re.compile(r"\(cid:\d+\)")
_ALLOWED_CONTROLS = frozenset("\t\n\r")
# Unicode general categories that ordinary text is made of.
_TEXT_CATEGORIES = ("L", "N", "P", "Z", "M")
_COMMON_SYMBOLS = frozenset("Sc Sm Sk So".split())  # currency, maths, modifiers, other (bullets, arrows, ©)
_WORD = re.compile(r"\S+")
_EDGE_PUNCT = "\"'()[]{}<>.,;:!?«»“”‘’-–—/*•"
_GOOD_WORD = re.compile(
    r"""^(
        [^\W\d_]+([-'’.][^\W\d_]+)*          # letters, maybe hyphenated or with an apostrophe
      | [-+]?[$€£¥]?\d+([.,:/-]\d+)*[%‰]?     # numbers, dates, amounts, ratios
      | \d+(st|nd|rd|th|[a-z]{1,3})          # ordinals and units glued to numbers (12th, 5kg, 3mm)
      | [^\W\d_]{1,4}\d+[^\W\d_]?            # short codes (Q3, FY2024, H2O, A4, B12)
      | [A-Z0-9]+([-_/.][A-Z0-9]+)+          # identifiers (ISO-9001, COVID-19, 2024/25, v1.2)
      | \S+@\S+\.\S+ | \w+://\S+           # e-mail addresses, URLs
      | [^\w\s]+                              # a run of symbols (a bullet, an em dash, a table rule)
    )$""",
    re.VERBOSE | re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class TextLayerVerdict:
    """Whether a text layer may be used as the page's OCR text, and why not."""

    usable: bool
    reason: str | None = None  # the first check that failed (see the module docstring)


@dataclass(frozen=True, slots=True)
class OcrRoute:
    """Where a page's `ocr_text` comes from. `source` None: nowhere (no model OCR, no text layer)."""

    source: OcrSource | None
    reason: str


def _is_unmapped(ch: str) -> bool:
    category = unicodedata.category(ch)
    if category == "Cc":
        return ch not in _ALLOWED_CONTROLS
    return category in ("Co", "Cn", "Cs")


def _is_odd_symbol(ch: str) -> bool:
    category = unicodedata.category(ch)
    return not (category[0] in _TEXT_CATEGORIES or category in _COMMON_SYMBOLS or ch in _ALLOWED_CONTROLS)


def garbled_word_share(text: str) -> tuple[float, float]:
    """(share of words that are not plausible words or numbers, share of single-letter words)."""
    words = [w.strip(_EDGE_PUNCT) for w in _WORD.findall(text)]
    words = [w for w in words if w]
    if not words:
        return 0.0, 0.0
    garbled = sum(1 for w in words if not _GOOD_WORD.match(w))
    singles = sum(1 for w in words if len(w) == 1 and w.isalpha() and w.lower() not in ("a", "i", "y", "o", "e", "à"))
    return garbled / len(words), singles / len(words)


def latin_letter_counts(text: str) -> Counter[str]:
    """How often each Latin letter a-z occurs in `text`, case and accents ignored."""
    counts: Counter[str] = Counter()
    for ch in text:
        if not ch.isalpha() or ord(ch) > 0x24F:  # Basic Latin to Latin Extended-B
            continue
        base = unicodedata.normalize("NFKD", ch)[0].lower()
        if "a" <= base <= "z":
            counts[base] += 1
    return counts


def plausible_letters(counts: Counter[str]) -> bool:
    """Whether Latin letter frequencies look like a language (see `implausible_letters`)."""
    letters = sum(counts.values())
    if letters < MIN_LATIN_LETTERS:
        return True  # too few to judge
    fifth = sorted(counts.values(), reverse=True)[:5][-1]  # ties count as among the five
    vowels = sum(counts[v] for v in "aeiouy")
    return max(counts["a"], counts["e"]) >= fifth and vowels >= MIN_VOWEL_SHARE * letters


def assess_text_layer(text: str | None, *, scan: bool = False, area_in2: float | None = None) -> TextLayerVerdict:
    """Check a text layer (see the module docstring). `scan`: an OCR layer over a page image,
    held to the stricter checks. `area_in2`: the page area in square inches, when known."""
    if text is None or not text.strip():
        return TextLayerVerdict(False, "empty")
    chars = [c for c in text if not c.isspace()]
    n = len(chars)
    if text.count("\ufffd") > MAX_REPLACEMENT * n:
        return TextLayerVerdict(False, "replacement")
    unmapped = sum(1 for c in text if _is_unmapped(c)) + sum(len(m) for m in _CID.findall(text))
    if unmapped > MAX_UNMAPPED * n:
        return TextLayerVerdict(False, "unmapped")
    if sum(1 for c in chars if _is_odd_symbol(c)) > MAX_SYMBOLS * n:
        return TextLayerVerdict(False, "symbols")
    if not plausible_letters(latin_letter_counts(text)):
        return TextLayerVerdict(False, "implausible_letters")
    if area_in2 is not None and area_in2 > 0:
        density = n / area_in2
        if density > MAX_CHARS_PER_IN2:
            return TextLayerVerdict(False, "density")
        if scan and density < MIN_SCAN_CHARS_PER_IN2:
            return TextLayerVerdict(False, "density")
    if scan and n < MIN_SCAN_CHARS:
        return TextLayerVerdict(False, "too_little")
    garbled, singles = garbled_word_share(text)
    if garbled > (MAX_GARBLED_WORDS if scan else MAX_GARBLED_WORDS_DIGITAL):
        return TextLayerVerdict(False, "garbled_words")
    if scan and singles > MAX_SINGLE_LETTERS:
        return TextLayerVerdict(False, "garbled_words")
    return TextLayerVerdict(True)


def route_ocr(
    mode: str, kind: PageKind | str | None, text: str | None, *, area_in2: float | None = None
) -> OcrRoute:
    """Where the OCR text of a page comes from under `mode` (auto, model or text_layer).

    auto: the text layer of a born-digital page, or of a scan's OCR layer, when it passes
    `assess_text_layer`; the model for everything else (scans, images, blank pages, layers
    that fail). text_layer: never the model (None without a text layer). model: always.
    """
    if mode == "model":
        return OcrRoute("model", "ocr=model")
    if mode == "text_layer":
        if text is None or not text.strip():
            return OcrRoute(None, "no text layer")
        return OcrRoute("text_layer", "ocr=text_layer")
    if mode != "auto":
        raise ValueError(f"unknown OCR mode {mode!r}: expected auto, model or text_layer")
    kind_value = kind.value if isinstance(kind, PageKind) else kind
    if kind_value not in (PageKind.BORN_DIGITAL.value, PageKind.SCAN_WITH_OCR.value):
        return OcrRoute("model", f"page kind {kind_value}")
    verdict = assess_text_layer(text, scan=kind_value == PageKind.SCAN_WITH_OCR.value, area_in2=area_in2)
    if verdict.usable:
        return OcrRoute("text_layer", f"{kind_value} text layer passes the check")
    return OcrRoute("model", f"{kind_value} text layer fails the check: {verdict.reason}")


__all__ = [
    "OcrRoute",
    "OcrSource",
    "TextLayerVerdict",
    "assess_text_layer",
    "garbled_word_share",
    "latin_letter_counts",
    "plausible_letters",
    "route_ocr",
]
