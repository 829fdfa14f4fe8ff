"""Text for Prefect's markdown artifacts and descriptions, escaped: a run id, a URL, a file name
or an error message shows as itself and never becomes markup, raw HTML or a link."""

from __future__ import annotations

import html
import re

_MD_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def md_code(text: object) -> str:
    """`text` as an inline code span shown verbatim whatever it holds: the fence is one
    backtick longer than any run of backticks inside (CommonMark), padded with a space when
    the text starts or ends with one; line breaks become spaces."""
    value = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", value)), default=0) + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def md_block(text: object) -> str:
    """`text` as a fenced code block (a fence longer than any backtick run inside)."""
    value = str(text)
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", value)), default=0) + 1)
    return f"{fence}\n{value}\n{fence}\n"


def md_text(text: object) -> str:
    """Plain text: HTML characters as entities and markdown punctuation escaped."""
    return _MD_PUNCTUATION.sub(r"\\\1", html.escape(str(text), quote=False))


__all__ = ["md_block", "md_code", "md_text"]
