"""Credentials never leave the process in a message.

A URL may carry user-info (`s3://KEY:SECRET@bucket/in`, `ftp://user:pw@host/`). Where docpipe
shows a URL it shows `sources.public_url` (user-info removed); but libraries quote the URL
in their own words (botocore: `Invalid bucket name "KEY:SECRET@bucket"`), so every message
that leaves the process (the CLI's one line, log records of any library, the flows' failure
messages and the runs table's `message`) goes through `redact`: user-info of any URL in the
text is masked, and so are the user-info strings of the URLs this process was given
(`remember_url`), wherever they appear.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s\"'<>]+)@")
_SECRETS: set[str] = set()
_MIN_PART = 4  # a user or password part this short is not masked on its own (too likely a word)


def remember_url(url: object) -> None:
    """Mask the user-info of `url` (and its user and password parts) in every later message."""
    if not isinstance(url, str) or "@" not in url or "://" not in url:
        return
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return
    if "@" not in netloc:
        return
    info = netloc.rsplit("@", 1)[0]
    _SECRETS.add(info)
    user, _, password = info.partition(":")
    for part in (user, password):
        if len(part) >= _MIN_PART:
            _SECRETS.add(part)


def redact(text: str) -> str:
    """`text` with URL user-info and every remembered credential masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def one_line(text: str) -> str:
    """`redact(text)` on one line (libraries' messages may span several)."""
    return " ".join(part.strip() for part in redact(text).splitlines() if part.strip())


class RedactingFilter(logging.Filter):
    """A handler filter: the record's message (and traceback text) redacted before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that does not format is left to the handler
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of `logger` (the root logger by default), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


__all__ = ["MASK", "RedactingFilter", "install", "one_line", "redact", "remember_url"]
