"""Test helpers that ship with the package (tiny models built offline)."""

from pipeline.testing.tiny_models import FAMILIES, make_tiny_model

__all__ = ["FAMILIES", "make_tiny_model"]
