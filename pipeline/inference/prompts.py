"""The task prompts, versioned.

Every row written with model output records `PROMPT_VERSION`. It is the hand-kept
release name plus a hash of every prompt text below, so editing a prompt without
bumping the release still changes the recorded version (results stay attributable).
"""

from __future__ import annotations

import hashlib
import re

from pipeline.textlayer import assess_text_layer

# 2: a text layer that fails the quality check (pipeline.textlayer) is no longer given as
# an OCR hint: a garbled layer misleads the model and costs up to ~1k prompt tokens.
PROMPT_RELEASE = "2"

DESCRIPTION = (
    "Describe this document page in two to four sentences: what kind of document it is "
    "(for example a letter, invoice, form, scientific article, slide, table or chart), what it "
    "is about, and its main visual elements."
)

OCR = (
    "Transcribe all the text on this page in natural reading order. Keep headings, lists and "
    "paragraph breaks. Write tables as Markdown tables. Output only the transcription, with no "
    "comments."
)

# Appended to the OCR prompt for pages that carry a PDF text layer: the layer is a hint
# for spelling and reading order, never a substitute for what is visible.
OCR_ANCHOR = (
    "\nThe PDF's embedded text layer is given below as a hint; it may be incomplete, out of "
    "order or wrong. Transcribe what is visible on the page.\n<text_layer>\n{anchor}\n</text_layer>"
)

CHART_DETECT = (
    "Does this page contain a chart, plot, graph or diagram? Answer with one word: yes or no."
)

CHART_QUESTION = "The page contains a chart, plot or diagram. {question} Answer briefly."

# Text-layer hints are cut to this many characters (about 1k tokens) to bound prompt length.
MAX_ANCHOR_CHARS = 4000



def prompt_version(release: str, texts: tuple[str, ...]) -> str:
    """`v<release>-<first 8 hex of the SHA-256 of the prompt texts>`."""
    return f"v{release}-" + hashlib.sha256("\x1e".join(texts).encode()).hexdigest()[:8]


PROMPT_TEXTS = (DESCRIPTION, OCR, OCR_ANCHOR, CHART_DETECT, CHART_QUESTION, str(MAX_ANCHOR_CHARS))
PROMPT_VERSION = prompt_version(PROMPT_RELEASE, PROMPT_TEXTS)


def description_prompt() -> str:
    """Prompt for the page description task."""
    return DESCRIPTION


def ocr_prompt(text_layer: str | None = None, *, max_anchor_chars: int = MAX_ANCHOR_CHARS) -> str:
    """Prompt for the OCR task; with a `text_layer` that passes the quality check of
    `pipeline.textlayer.assess_text_layer`, adds it (cut) as an anchor."""
    if text_layer is None or not text_layer.strip() or not assess_text_layer(text_layer).usable:
        return OCR
    anchor = text_layer.strip()
    if len(anchor) > max_anchor_chars:
        anchor = anchor[:max_anchor_chars].rstrip() + " ..."
    return OCR + OCR_ANCHOR.format(anchor=anchor)


def chart_detect_prompt() -> str:
    """Prompt asking whether the page holds a chart (answer parsed by `parse_yes_no`)."""
    return CHART_DETECT


def chart_question_prompt(question: str) -> str:
    """Prompt for one chart question, asked only of pages the model said hold a chart."""
    return CHART_QUESTION.format(question=question.strip())


_YES = {"yes", "y", "true", "oui", "ja", "si", "sí"}
_NO = {"no", "n", "false", "non", "nein"}
_CJK_YES, _CJK_NO = "是有", "否没沒无無不"
_WORD = re.compile(r"\w+", re.UNICODE)


def parse_yes_no(text: str | None) -> bool | None:
    """The first word of an answer as a yes/no; None when the answer is neither."""
    if not text:
        return None
    match = _WORD.search(text.strip().lower())
    if match is None:
        return None
    word = match.group(0)
    if word in _YES or word[0] in _CJK_YES:
        return True
    if word in _NO or word[0] in _CJK_NO:
        return False
    return None


__all__ = [
    "PROMPT_TEXTS",
    "PROMPT_VERSION",
    "prompt_version",
    "chart_detect_prompt",
    "chart_question_prompt",
    "description_prompt",
    "ocr_prompt",
    "parse_yes_no",
]
