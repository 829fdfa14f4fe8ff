"""One question about one page, answered the way the model card's own chat does it.

    from pipeline.inference import ask
    reply = ask("path/to/checkpoint", image, "What is the title of this page?", max_new_tokens=64)
    reply.text, reply.token_ids, reply.prompt_ids

For people trying a checkpoint and for checks against other implementations: the prompt
is the family's own chat format (`builder.chat_text`: the model card's template, or for
the seed models the prompt their `chat()` builds), and decoding is greedy (one beam, no
sampling; MiniCPM-V 2.0: its own beams and penalty) up to `max_new_tokens`, stopping at the
family's end-of-turn tokens.

The page takes a run's path: `read_page` reads a page of a PDF or a frame of an image file
through the rasterizer (`pipeline.rasterize`, a PDF page at one resolution, `dpi`), the
family's builder prepares it (`InputBuilder.build`, with the question as the page's one
prompt), and the engine of `docpipe run` answers it (the image encoded once, the prompt
prefilled and decoded by `Engine.generate`), so what `ask` answers is what a run would
answer for that prompt on that image.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.records import PageFailure, PageImage, PageKind, RenderInfo, StageError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from pipeline.config import Dtype
    from pipeline.inference.adapters import InputBuilder, PreparedPage
    from pipeline.inference.engine import Engine
    from pipeline.records import TilePlan

ASK_KEY = "ask"  # the prompt key of the one question in the prepared page
ASK_MAX_PIXELS = 12_000_000  # a PDF page rendered at `dpi` is scaled down to this many pixels

log = logging.getLogger("docpipe")


@dataclass(frozen=True, slots=True)
class Answer:
    """What the model said, and exactly what it was fed."""

    text: str  # decoded, special tokens dropped, stripped
    token_ids: tuple[int, ...]  # generated ids, the end-of-turn token excluded
    prompt_ids: tuple[int, ...]  # the full prompt, image placeholders included
    hit_token_limit: bool  # stopped by max_new_tokens rather than by an end-of-turn token


# ---- the page ------------------------------------------------------------------------------


class _AtDpi:
    """The rasterizer's page geometry (`RasterOptions.geometry`) for one page read at `dpi`:
    the page's own aspect ratio, never stretched to a model's tile canvas."""

    stretches_to_canvas = False

    def __init__(self, dpi: float) -> None:
        self.dpi = dpi

    def target_size(self, width_pt: float, height_pt: float) -> tuple[int, int]:
        from pipeline.rasterize import pixel_size

        return pixel_size(width_pt, height_pt, self.dpi)

    def plan(self, width: int, height: int) -> TilePlan:
        """The tiling policy's plan (what a run without a model plans); `ask` itself prepares
        the page with the model's builder, which plans it again for its own geometry."""
        from pipeline.tiling import TilingOptions

        return TilingOptions().plan(width, height)


def read_page(path: str | Path, page: int = 1, dpi: float = 200.0) -> PageImage:
    """Page `page` (from 1) of a PDF, or frame `page` of an image file (a multi-page TIFF's),
    read by the rasterizer as a run reads it; a PDF page is rendered at `dpi`, scaled down to
    ASK_MAX_PIXELS (so are larger images). Raises ValueError with a one-line reason (no such
    file or page, not a file docpipe reads, a password-protected PDF, a page that fails)."""
    import mimetypes

    from pipeline import rasterize
    from pipeline.logs import mupdf_to_log, quiet_mupdf

    if page < 1:
        raise ValueError(f"--page counts from 1, got {page}")
    path = str(path)
    quiet_mupdf()  # MuPDF's complaints about a damaged file go to the log, not the console
    try:
        opened = rasterize.open_document(path, uri=path, doc_id="ask",
                                         media_type=mimetypes.guess_type(path)[0] or "")
        if isinstance(opened, StageError):
            raise ValueError(_about(path, opened.message))
        with opened:
            if page > opened.page_count:
                unit = "page" if isinstance(opened, rasterize.PdfDocument) else "frame"
                raise ValueError(f"{path} has {opened.page_count} {unit}(s), not {page}")
            options = rasterize.RasterOptions(min_dpi=dpi, max_dpi=dpi, max_page_pixels=ASK_MAX_PIXELS,
                                              geometry=_AtDpi(dpi))
            item = opened.page(page, options)
    finally:
        mupdf_to_log(log, path)
    if isinstance(item, PageFailure):
        raise ValueError(_about(path, item.error.message))
    return item


def _about(path: str, message: str) -> str:
    return message if path in message else f"{path}: {message}"


def image_page(image: "Image.Image") -> PageImage:
    """An image already in memory as a page (8-bit RGB, as the rasterizer converts image files)."""
    from pipeline.rasterize import to_rgb

    image = to_rgb(image)
    return PageImage(doc_id="ask", uri="memory://ask", page_number=1, image=image,
                     render=RenderInfo(width=image.width, height=image.height, dpi=None), kind=PageKind.IMAGE)


def prepare_question(builder: "InputBuilder", image: "Image.Image | PageImage", question: str) -> "PreparedPage":
    """The page planned and prepared by the family's builder, as a run prepares its pages, with
    `question` (in the family's chat format) as its one prompt, under ASK_KEY."""
    page = image if isinstance(image, PageImage) else image_page(image)
    plan = builder.plan(page.render.width, page.render.height)
    return builder.build(page, plan, {ASK_KEY: question})


# ---- the model -----------------------------------------------------------------------------


def load_ask_engine(model: str | Path, *, device: str = "auto", dtype: Dtype = "auto",
                    max_new_tokens: int = 256, revision: str | None = None) -> "Engine":
    """An engine for `ask` (a folder or hub id; trust_remote_code stays off)."""
    from pipeline.config import RunConfig
    from pipeline.inference.engine import load_engine

    scratch = tempfile.gettempdir()  # a run's source/output are not used for one question
    config = RunConfig(source=scratch, output=scratch, model=str(model), device=device, dtype=dtype,
                       max_new_tokens=max_new_tokens, revision=revision, tasks=["description"])
    return load_engine(config)


def ask(model: "str | Path | Engine", image: "Image.Image | PageImage", question: str, *, max_new_tokens: int = 256,
        device: str = "auto", dtype: str = "auto") -> Answer:
    """Answer `question` about `image` (a PIL image, or a page from `read_page`) with `model`
    (a checkpoint folder, a hub id, or an already loaded `Engine`); `device`/`dtype` apply
    only when a checkpoint is loaded here."""
    import torch

    from pipeline.inference.engine import Engine

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    engine = model if isinstance(model, Engine) else load_ask_engine(
        model, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
    prepared = prepare_question(engine.builder, image, question)
    prompt = prepared.prompts[ASK_KEY]
    with torch.inference_mode():
        [features] = engine.builder.encode(engine.model, [prepared])  # as the engine encodes a run's pages
    saved, engine.min_new_tokens = engine.min_new_tokens, None  # a question stops where the model ends it
    try:
        [gen] = engine.generate([prompt], [features], limit=int(max_new_tokens))
    finally:
        engine.min_new_tokens = saved
    return Answer(text=gen.text, token_ids=tuple(int(t) for t in gen.tokens), prompt_ids=tuple(int(t) for t in prompt),
                  hit_token_limit=gen.hit_limit)


__all__ = ["ASK_KEY", "ASK_MAX_PIXELS", "Answer", "ask", "image_page", "load_ask_engine", "prepare_question",
           "read_page"]
