"""Idefics3 / SmolVLM: served by transformers' own classes; the pipeline adds its input builder
(processing.py: plan, pixels, prompt and token count) and its tiny checkpoint builder (tiny.py)."""

from __future__ import annotations

from pipeline.inference.families.idefics3.processing import Idefics3Builder, idefics3_grid

__all__ = ["Idefics3Builder", "idefics3_grid"]
