"""Test helpers that ship with the package: tiny models and sample pages, built offline."""

from __future__ import annotations

from pathlib import Path

from pipeline.inference.registry import FAMILIES as _REGISTRY
from pipeline.inference.registry import tiny_model_names
from pipeline.records import PageImage, PageKind, RenderInfo

LETTER_PT = (612.0, 792.0)

TINY_MODELS: tuple[str, ...] = tiny_model_names()  # every family's tiny checkpoints, from the registry
# The project's seed models: their tiny checkpoints are in the official (remote-code) layout,
# which only the pipeline's ports load.
SEED_FAMILIES: tuple[str, ...] = ("minicpm_v2", "mono_internvl", "minimax_vl_01")
# The others: checkpoints in transformers' own layout (its Auto classes load them). (A seed
# family's variants, e.g. mono_internvl_vllm with vLLM-CPU's head_dim, are in its own layout.)
FAMILIES: tuple[str, ...] = tuple(name for entry in _REGISTRY if entry.name not in SEED_FAMILIES
                                  for name in entry.tiny_names)


def make_tiny_model(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random checkpoint named `family` (one of `TINY_MODELS`: internvl, qwen2_vl,
    qwen2_5_vl, idefics3, smolvlm, minicpm_v2, mono_internvl, minimax_vl_01) to `out_dir` and
    return the folder, built by the family's own tiny.py, found through the registry.
    Offline, deterministic for a given seed, safetensors only."""
    for entry in _REGISTRY:
        if family in entry.tiny_names:
            return entry.make_tiny_model(out_dir, seed=seed, variant=family)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(TINY_MODELS)}")


def sample_pdf(
    *,
    size_pt: tuple[float, float] = LETTER_PT,
    title: str = "Quarterly report 2024",
    chart: bool = True,
    pages: int = 1,
) -> bytes:
    """A born-digital PDF (title, paragraph, optional bar chart on every page), made with PyMuPDF."""
    import pymupdf

    doc = pymupdf.open()
    try:
        width, height = size_pt
        for number in range(1, pages + 1):
            page = doc.new_page(width=width, height=height)
            page.insert_text((36, 54), title if pages == 1 else f"{title}, page {number}", fontsize=16)
            page.insert_textbox(
                pymupdf.Rect(36, 70, width - 36, 160),
                "Revenue grew by 12 percent. Costs fell in every region except the north.",
                fontsize=10,
            )
            if chart:
                base = min(height - 36, 360.0)
                for i, value in enumerate((40, 90, 65, 120)):
                    x = 60 + i * 50
                    page.draw_rect(pymupdf.Rect(x, base - value, x + 30, base), color=(0, 0, 0), fill=(0.2, 0.4, 0.8))
                page.draw_line((50, base), (270, base))
                page.insert_text((60, base + 16), "North  East  South  West", fontsize=8)
        return doc.tobytes()
    finally:
        doc.close()


def render_sample_page(
    *,
    size_pt: tuple[float, float] = LETTER_PT,
    dpi: float = 72.0,
    title: str = "Quarterly report 2024",
    chart: bool = True,
    doc_id: str = "sample",
    page_number: int = 1,
) -> PageImage:
    """The page of `sample_pdf` rendered to a PageImage with its text layer, as the rasterize
    stage would hand it on (at a plain DPI, without the rasterizer's tile-canvas rendering)."""
    import pymupdf
    from PIL import Image

    with pymupdf.open(stream=sample_pdf(size_pt=size_pt, title=title, chart=chart), filetype="pdf") as doc:
        page = doc[0]
        pix = page.get_pixmap(matrix=pymupdf.Matrix(dpi / 72.0, dpi / 72.0))
        image = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
        text = page.get_text()
    return PageImage(
        doc_id=doc_id,
        uri=f"memory://{doc_id}.pdf",
        page_number=page_number,
        image=image,
        render=RenderInfo(width=image.width, height=image.height, dpi=dpi, requested_dpi=dpi),
        kind=PageKind.BORN_DIGITAL,
        text=text,
    )


def sample_image_page(width: int, height: int, *, seed: int = 0, doc_id: str = "img", page_number: int = 1) -> PageImage:
    """A page of random pixels (an image file), `width` x `height`."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PageImage(
        doc_id=doc_id,
        uri=f"memory://{doc_id}.png",
        page_number=page_number,
        image=Image.fromarray(pixels),
        render=RenderInfo(width=width, height=height, dpi=None),
        kind=PageKind.IMAGE,
    )


__all__ = ["FAMILIES", "SEED_FAMILIES", "TINY_MODELS", "make_tiny_model", "render_sample_page", "sample_image_page"]
