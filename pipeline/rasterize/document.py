"""`OpenedDocument`, what every opened file is (its pages rasterized on demand), and the
rasterize stage's error records."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Self

from pipeline.records import PageFailure, PageImage, Stage, StageError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.rasterize.options import RasterOptions


class OpenedDocument(ABC):
    """An opened file whose pages are rasterized on demand. Close it (or use `with`).

    `repaired` says MuPDF had to rebuild a damaged PDF's structure to read it (the pages
    may not be what the author wrote); `open_note` is one plain sentence about what was
    wrong with a file that still opened (a repair, a TIFF cut after some frame), or None.
    Both are final once `pages()` has run: a PDF can be repaired while a page is loaded.
    """

    def __init__(self, uri: str, doc_id: str, page_count: int) -> None:
        self.uri = uri
        self.doc_id = doc_id
        self.page_count = page_count
        self.repaired = False
        self.open_note: str | None = None
        self._closed = False

    @abstractmethod
    def pages(self, options: RasterOptions) -> Generator[PageImage | PageFailure, None, None]:
        """Yield every page in order, one at a time; never raises."""

    @abstractmethod
    def page(self, number: int, options: RasterOptions) -> PageImage | PageFailure:
        """Page `number` alone, rasterized as `pages()` rasterizes it (`docpipe ask`); never
        raises for the page's content (a number outside 1..page_count is a ValueError)."""

    def _check_number(self, number: int) -> None:
        if not 1 <= number <= self.page_count:
            raise ValueError(f"no page {number} in a document of {self.page_count} page(s)")

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _failure(self, page_number: int, type_: str, message: str) -> PageFailure:
        return PageFailure(self.doc_id, self.uri, page_number, StageError(Stage.RASTERIZE, type_, message))


def _error(type_: str, message: str, *, retryable: bool = False) -> StageError:
    return StageError(Stage.RASTERIZE, type_, message, retryable=retryable)

def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text

def _first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]
