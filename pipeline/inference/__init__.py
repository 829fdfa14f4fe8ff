"""Batched VLM inference: loading (device maps), per-family inputs, prompts, generation.

    from pipeline.inference import load_engine
    engine = load_engine(config)               # once per process
    builder = engine.builder                   # picklable; for CPU workers
    plan = builder.plan(width, height)         # the family's real tiling
    prepared = builder.build(page, plan)       # CPU: pixels + tokenised prompts
    answers = engine.answer([prepared, ...])   # same order; errors are data

See docs/inference.md.
"""

from pipeline.inference.adapters import (
    MODEL_TYPE_FAMILY,
    InputBuilder,
    PreparedPage,
    UnsupportedModelError,
    family_of,
)
from pipeline.inference.engine import Engine, EngineStats, load_engine
from pipeline.inference.loading import ModelConfigError, compute_device_map, load_builder
from pipeline.inference.prompts import PROMPT_VERSION

__all__ = [
    "MODEL_TYPE_FAMILY",
    "PROMPT_VERSION",
    "Engine",
    "EngineStats",
    "InputBuilder",
    "ModelConfigError",
    "PreparedPage",
    "UnsupportedModelError",
    "compute_device_map",
    "family_of",
    "load_builder",
    "load_engine",
]
