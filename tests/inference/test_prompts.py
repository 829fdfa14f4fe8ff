"""Versioned prompts and answer parsing."""

from __future__ import annotations

import re

from pipeline.inference import prompts


def test_prompt_version_names_the_release_and_the_texts() -> None:
    assert re.fullmatch(r"v\d+-[0-9a-f]{8}", prompts.PROMPT_VERSION)
    assert prompts.PROMPT_VERSION == prompts.prompt_version(prompts.PROMPT_RELEASE, prompts.PROMPT_TEXTS)
    edited = (prompts.PROMPT_TEXTS[0] + " Be brief.", *prompts.PROMPT_TEXTS[1:])
    assert prompts.prompt_version(prompts.PROMPT_RELEASE, edited) != prompts.PROMPT_VERSION
    assert prompts.prompt_version("2", prompts.PROMPT_TEXTS).startswith("v2-")


def test_ocr_prompt_anchors_on_the_text_layer() -> None:
    assert prompts.ocr_prompt(None) == prompts.ocr_prompt("  \n ") == prompts.OCR
    anchored = prompts.ocr_prompt("Invoice 4711\nTotal 12.00")
    assert anchored.startswith(prompts.OCR) and "Invoice 4711\nTotal 12.00" in anchored
    layer = "Revenue grew. " * 1_000
    long = prompts.ocr_prompt(layer, max_anchor_chars=100)
    assert layer[:100] + " ..." in long and layer[:101] not in long


def test_a_garbled_text_layer_is_no_hint() -> None:
    shifted = "RVBSUFSMZ SFWFOVF HSFX CZ UXFMWF QFSDFOU JO UIF OPSUIFSO SFHJPO. " * 5  # no Unicode map
    assert prompts.ocr_prompt(shifted) == prompts.ocr_prompt("Total \ufffd\ufffd\ufffd") == prompts.OCR


def test_task_prompts() -> None:
    assert "chart" in prompts.chart_detect_prompt() and "yes or no" in prompts.chart_detect_prompt()
    assert "What is the title?" in prompts.chart_question_prompt("  What is the title? ")
    assert prompts.description_prompt() == prompts.DESCRIPTION


def test_parse_yes_no() -> None:
    for text in ("yes", "Yes.", " YES, there is a bar chart", "**Yes**", "true", "是的"):
        assert prompts.parse_yes_no(text) is True, text
    for text in ("no", "No, only text.", "NO", "false", "否"):
        assert prompts.parse_yes_no(text) is False, text
    for text in (None, "", "   ", "...", "maybe", "The page shows a table", "nothing", "yesterday"):
        assert prompts.parse_yes_no(text) is None, text
