"""One question about one image, answered the way the model card's own chat does it.

    from pipeline.inference import ask
    reply = ask("path/to/checkpoint", image, "What is the title of this page?", max_new_tokens=64)
    reply.text, reply.token_ids, reply.prompt_ids

For people trying a checkpoint and for checks against other implementations: the prompt
is the family's own chat format (`builder.chat_text`: the model card's template, or for
the seed models the prompt their `chat()` builds), the image is planned and preprocessed
as the family's processor does it, and decoding is greedy (one beam, no sampling) up to
`max_new_tokens`, stopping at the family's end-of-turn tokens. The generation goes
through the same engine as `docpipe run` (image encoded once, the prompt prefilled and
decoded by `Engine.generate`), so what `ask` answers is what a run would answer for that prompt.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.records import PageImage, PageKind, RenderInfo

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from pipeline.inference.adapters import InputBuilder, PreparedPage
    from pipeline.inference.engine import Engine

ASK_KEY = "ask"  # the prompt key of the one question in the prepared page


@dataclass(frozen=True, slots=True)
class Answer:
    """What the model said, and exactly what it was fed."""

    text: str  # decoded, special tokens dropped, stripped
    token_ids: tuple[int, ...]  # generated ids, the end-of-turn token excluded
    prompt_ids: tuple[int, ...]  # the full prompt, image placeholders included
    hit_token_limit: bool  # stopped by max_new_tokens rather than by an end-of-turn token


def load_ask_engine(model: str | Path, *, device: str = "auto", dtype: str = "auto",
                    max_new_tokens: int = 256, revision: str | None = None) -> "Engine":
    """An engine for `ask` (a folder or hub id; trust_remote_code stays off)."""
    from pipeline.config import RunConfig
    from pipeline.inference.engine import load_engine

    scratch = tempfile.gettempdir()  # a run's source/output are not used for one question
    config = RunConfig(source=scratch, output=scratch, model=str(model), device=device, dtype=dtype,
                       max_new_tokens=max_new_tokens, revision=revision, tasks=["description"])
    return load_engine(config)


def prepare_question(builder: "InputBuilder", image: "Image.Image", question: str) -> "PreparedPage":
    """The image planned and preprocessed as the family does it, and `question` in its chat format."""
    from pipeline.inference.adapters import PreparedPage, _rgb

    image = _rgb(image)
    page = PageImage(doc_id="ask", uri="memory://ask", page_number=1, image=image,
                     render=RenderInfo(width=image.width, height=image.height, dpi=None), kind=PageKind.IMAGE)
    plan = builder.plan(image.width, image.height)
    pixels, image_inputs = builder.pixels(image, plan)
    ids = np.asarray(builder.encode_text(builder.chat_text(question, plan)), dtype=np.int64)
    return PreparedPage(doc_id=page.doc_id, uri=page.uri, page_number=1, kind=page.kind, text=None, plan=plan,
                        family=builder.family, pixels=pixels, image_inputs=image_inputs, prompts={ASK_KEY: ids},
                        image_tokens=plan.visual_tokens)


def ask(model: "str | Path | Engine", image: "Image.Image", question: str, *, max_new_tokens: int = 256,
        device: str = "auto", dtype: str = "auto") -> Answer:
    """Answer `question` about `image` with `model` (a checkpoint folder, a hub id, or an
    already loaded `Engine`); `device`/`dtype` apply only when a checkpoint is loaded here."""
    import torch

    from pipeline.inference.engine import Engine

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    engine = model if isinstance(model, Engine) else load_ask_engine(
        model, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
    builder = engine.builder
    prepared = prepare_question(builder, image, question)
    prompt = prepared.prompts[ASK_KEY]
    with torch.inference_mode():
        features = builder.encode_page(engine.model, prepared)
    saved, engine.min_new_tokens = engine.min_new_tokens, None  # a question stops where the model ends it
    try:
        [gen] = engine.generate([prompt], [features], limit=int(max_new_tokens))
    finally:
        engine.min_new_tokens = saved
    return Answer(text=gen.text, token_ids=tuple(int(t) for t in gen.tokens), prompt_ids=tuple(int(t) for t in prompt),
                  hit_token_limit=gen.hit_limit)

__all__ = ["ASK_KEY", "Answer", "ask", "load_ask_engine", "prepare_question"]
