"""Small typed records that pass between stages. Defined once, used everywhere.

    sources -> DocumentRef
    rasterize -> PageImage or PageFailure (one at a time, lazily)
    tiling -> TilePlan (pure) and tiles (PIL images)
    inference -> PageAnswers
    sink -> Arrow rows (see schemas/)

Errors are data: a problem with a document or a page is a StageError carried in the
record, never an exception that escapes the stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


class DocStatus(str, Enum):
    OK = "ok"
    PARTIAL = "partial"  # some pages failed, the rest are in the pages table
    ERROR = "error"  # nothing usable; the reason is in the row
    DUPLICATE = "duplicate"  # same bytes as another input; pages written once, under the first


class RunStatus(str, Enum):
    """A run's row in the runs table (the string is what the Parquet column holds)."""

    RUNNING = "running"  # the run holds the output (or died holding it: `verify --repair` says so)
    COMPLETED = "completed"
    FAILED = "failed"  # one line in the row's message says why; a rerun resumes
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM, SIGHUP, a cancelled flow run, or the output taken over


class PageStatus(str, Enum):
    OK = "ok"
    ERROR = "error"


class PageKind(str, Enum):
    BORN_DIGITAL = "born_digital"  # PDF page with a real text layer and vector content
    SCAN = "scan"  # an image of a page with no text layer
    SCAN_WITH_OCR = "scan_with_ocr"  # an image of a page with an (invisible) OCR text layer
    BLANK = "blank"  # nothing drawn on it
    IMAGE = "image"  # an image file that is a photo, chart or figure (a scanned page file is SCAN)


class Stage(str, Enum):
    SOURCES = "sources"
    RASTERIZE = "rasterize"
    TILING = "tiling"
    INFERENCE = "inference"
    SINK = "sink"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class StageError:
    """What went wrong, where. `type` is a stable machine-readable code (e.g. `encrypted_pdf`)."""

    stage: Stage
    type: str
    message: str
    # True for what may go away by itself (storage/network errors, timeouts, dead workers,
    # device failures): the next run tries the document again. False for bad input, which
    # is recorded once and never retried.
    retryable: bool = False

    def __str__(self) -> str:
        return f"{self.stage.value}/{self.type}: {self.message}"


@dataclass(frozen=True, slots=True)
class DocumentRef:
    """One input file, identified by the SHA-256 of its bytes."""

    uri: str  # full URL as given by the file system (protocol included for remote ones)
    doc_id: str  # sha256 hex of the content
    size: int  # bytes
    media_type: str  # sniffed: application/pdf, image/png, ..., or application/octet-stream
    duplicate_of: str | None = None  # uri of the first input with the same bytes, if any
    error: StageError | None = None  # discovery-time problem (unreadable, empty, unknown type)
    version: str | None = None  # what the listing says identifies this revision (ETag, mtime)
    etag: str | None = None  # the object store's content tag, when it has one
    mtime: float | None = None  # last modification from the listing, unix seconds
    replaces: str | None = None  # doc_id of this file's earlier version in the output (it changed since)


@dataclass(frozen=True, slots=True)
class KnownFile:
    """What an earlier run recorded about a file: enough to skip re-reading it if unchanged."""

    size: int
    version: str
    doc_id: str
    media_type: str


@dataclass(frozen=True, slots=True)
class RenderInfo:
    """How a page was rendered. `downscaled` says the pixel budget or a renderer limit lowered it."""

    width: int
    height: int
    dpi: float | None  # None for images without resolution metadata
    requested_dpi: float | None = None
    downscaled: bool = False
    note: str | None = None  # human-readable reason when the render differs from the request


@dataclass(frozen=True, slots=True)
class PageImage:
    """A rasterized page, RGB. Produced lazily, one at a time."""

    doc_id: str
    uri: str
    page_number: int  # 1-based
    image: "Image.Image"
    render: RenderInfo
    kind: PageKind
    text: str | None = None  # visible text layer (PDF) or None
    rotation: int = 0  # degrees applied (PDF /Rotate or EXIF orientation)
    # The whole page already at the tiling policy's thumbnail size, when the rasterizer
    # could render it directly (PDF pages); otherwise tiling makes it by resizing `image`.
    thumbnail: "Image.Image | None" = None


@dataclass(frozen=True, slots=True)
class PageFailure:
    """A page that could not be rasterized; the document carries on with its other pages."""

    doc_id: str
    uri: str
    page_number: int
    error: StageError


@dataclass(frozen=True, slots=True)
class TileBox:
    left: int
    top: int
    right: int
    bottom: int

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.right, self.bottom)


@dataclass(frozen=True, slots=True)
class TilePlan:
    """Where the tiles of one page come from. A pure function of the page size and policy.

    The page is resized to (resized_width, resized_height) and cut into `boxes` (row-major,
    coordinates in the resized image). With `thumbnail`, one more tile of
    `thumbnail_size` is the whole page downsized. `tiles` counts all of them.
    """

    policy: str
    cols: int
    rows: int
    tile_width: int
    tile_height: int
    resized_width: int
    resized_height: int
    boxes: tuple[TileBox, ...]
    thumbnail: bool
    thumbnail_size: tuple[int, int] | None
    tokens_per_tile: int

    @property
    def tiles(self) -> int:
        return len(self.boxes) + (1 if self.thumbnail else 0)

    @property
    def visual_tokens(self) -> int:
        return self.tiles * self.tokens_per_tile


@dataclass(frozen=True, slots=True)
class ChartAnswer:
    question: str
    answer: str | None


@dataclass(frozen=True, slots=True)
class TaskOutput:
    """One task's generation for one page."""

    text: str | None
    prompt_tokens: int
    generated_tokens: int
    hit_token_limit: bool = False
    repetitive: bool = False


@dataclass(frozen=True, slots=True)
class PageAnswers:
    """What the model said about a page (all tasks)."""

    model_id: str
    model_revision: str | None
    model_dtype: str
    prompt_version: str
    description: str | None = None
    ocr_text: str | None = None
    has_chart: bool | None = None  # None: not asked, or the answer was neither yes nor no
    chart_check_answer: str | None = None  # the model's own words when asked whether there is a chart
    chart_answers: tuple[ChartAnswer, ...] = ()
    prompt_tokens: int = 0
    generated_tokens: int = 0
    latency_s: float = 0.0
    truncated: bool = False  # some task stopped at its token limit
    repetitive: bool = False  # some task hit the limit by repeating itself
    error: StageError | None = None
    # Where ocr_text came from: "text_layer" (the PDF's own text, no model row), "model",
    # or None (OCR not asked, or no source for this page).
    ocr_source: str | None = None
    # Token counts per kind of model row, for rows that ran: (kind, totals) pairs with kind
    # one of TASK_USAGE_KINDS; chart_answers sums the page's chart questions (text None).
    usage: tuple[tuple[str, TaskOutput], ...] = ()

    def usage_of(self, kind: str) -> TaskOutput | None:
        """The token totals of one kind of row (see TASK_USAGE_KINDS), None when none ran."""
        return next((totals for name, totals in self.usage if name == kind), None)


# Kinds of model rows whose token counts the pages table reports separately.
TASK_USAGE_KINDS = ("description", "ocr", "chart_check", "chart_answers")


@dataclass(slots=True)
class DocTimings:
    discover_s: float = 0.0
    rasterize_s: float = 0.0
    tiling_s: float = 0.0
    inference_s: float = 0.0
    total_s: float = 0.0
