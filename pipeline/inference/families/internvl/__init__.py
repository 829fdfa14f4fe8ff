"""InternVL (the -hf checkpoints: InternVL2.5 / InternVL3): served by transformers' own classes; the pipeline adds its input builder
(processing.py: plan, pixels, prompt and token count) and its tiny checkpoint builder (tiny.py)."""

from __future__ import annotations

from pipeline.inference.families.internvl.processing import InternVLBuilder

__all__ = ["InternVLBuilder"]
