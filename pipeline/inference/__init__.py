"""Batched VLM inference: loading (device maps), per-family inputs, prompts, generation.

    from pipeline.inference import load_engine
    engine = load_engine(config)               # once per process
    builder = engine.builder                   # picklable; for CPU workers
    plan = builder.plan(width, height)         # the family's real tiling
    prepared = builder.build(page, plan)       # CPU: pixels + tokenised prompts
    answers = engine.answer([prepared, ...])   # same order; errors are data

One question about one image, in the model card's own chat format:

    from pipeline.inference import ask
    reply = ask("path/to/checkpoint", image, "What is the title?", max_new_tokens=64)

Which checkpoints are served, and how each is recognised: `pipeline.inference.registry`.
See docs/inference.md.
"""

from pipeline.inference.adapters import InputBuilder, PreparedPage
from pipeline.inference.ask import Answer, ask
from pipeline.inference.engine import Engine, EngineStats, load_engine
from pipeline.inference.loading import ModelConfigError, compute_device_map, load_builder
from pipeline.inference.prompts import PROMPT_VERSION
from pipeline.inference.registry import FAMILIES, Family, UnsupportedModelError, recognise

__all__ = [
    "FAMILIES",
    "PROMPT_VERSION",
    "Answer",
    "Engine",
    "EngineStats",
    "Family",
    "InputBuilder",
    "ModelConfigError",
    "PreparedPage",
    "UnsupportedModelError",
    "ask",
    "compute_device_map",
    "load_builder",
    "load_engine",
    "recognise",
]
