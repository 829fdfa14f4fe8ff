"""Qwen2-VL / Qwen2.5-VL: served by transformers' own classes; the pipeline adds its input builder
(processing.py: plan, pixels, prompt and token count) and its tiny checkpoint builder (tiny.py)."""

from __future__ import annotations

from pipeline.inference.families.qwen2_vl.processing import Qwen2VLBuilder, qwen_smart_size

__all__ = ["Qwen2VLBuilder", "qwen_smart_size"]
