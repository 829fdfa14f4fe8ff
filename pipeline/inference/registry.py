"""Which model families the pipeline serves, and how a checkpoint is recognised.

One entry per family. Natively supported families (transformers has their classes) load
through `AutoModelForImageTextToText`; their entry here says everything the pipeline adds
to transformers: the input builder class (`pipeline.inference.adapters`), which tile
overrides it takes, and its multi-GPU placement (module prefixes kept on the first GPU).
The seed models (MiniCPM-V 2.0, Mono-InternVL-2B, MiniMax-VL-01) are ported in
`pipeline.inference.families.<name>`, which holds all of that family's knowledge (config
and model classes, geometry, chat format, tiny builder, placement); their entry only
points there. The entry is where a family's identity is declared (name, model types,
architectures, tiling policy, multi-GPU placement groups, default decoding); a ported family's
`configuration.py` reads its own from here. Every family's folder also holds its tiny checkpoint builder (`tiny.py`,
`Family.make_tiny_model`). A seed family's entry names its vLLM module (`vllm_module`:
docpipe's own vLLM classes, registered by `pipeline.inference.vllm_plugin`); the native
families are served by the architectures vLLM itself lists.
Recognition reads only config.json: nothing is imported from the checkpoint.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pipeline.inference.checkpoint import UnsupportedModelError
from pipeline.inference.generation import GREEDY, GenerationSettings

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.inference.adapters import InputBuilder
    from pipeline.inference.families import FamilyCode


@dataclass(frozen=True, slots=True)
class Family:
    """A model family: how to recognise it and where its implementation lives."""

    name: str
    model_types: tuple[str, ...]
    tiling_policy: str  # the page geometry its preprocessing wants (pipeline.tiling policy or its own)
    module: str | None = None  # pipeline.inference.families.<name> for ported families
    architectures: tuple[str, ...] = ()
    # native families only (a ported family's module builds its inputs itself):
    builder: str | None = None  # InputBuilder subclass in pipeline.inference.families.<name>
    tile_overrides: tuple[str, ...] = ()  # RunConfig tile bounds its builder takes (min_tiles, max_tiles)
    # every family: its multi-GPU placement groups and its decoding
    first_device: tuple[str, ...] = ()  # module prefixes that sit on the first GPU (where inputs go)
    last_device: tuple[str, ...] = ()  # module prefixes that sit on the last GPU
    # its original's deterministic decoding (a run may override it: RunConfig num_beams, repetition_penalty)
    generation: GenerationSettings = GREEDY
    # tiny checkpoints its tiny.py writes besides one named after the family (make-tiny-model names)
    tiny_variants: tuple[str, ...] = ()
    # the module of docpipe's vLLM classes for this family (the seed ports:
    # pipeline.inference.families.<name>.vllm, see docs/inference.md); None: vLLM's own
    # classes serve the architectures config.json names
    vllm_module: str | None = None

    @property
    def tiny_names(self) -> tuple[str, ...]:
        """The tiny checkpoints this family's tiny.py writes (`docpipe make-tiny-model NAME`)."""
        return (self.name, *self.tiny_variants)

    def make_tiny_model(self, directory: str | Path, *, seed: int = 0, variant: str | None = None) -> Path:
        """Write a tiny random checkpoint of this family (`variant`: one of `tiny_names`) to
        `directory`, with the family's own builder (pipeline.inference.families.<name>.tiny)."""
        tiny = importlib.import_module(f"pipeline.inference.families.{self.name}.tiny")
        extra = {} if variant in (None, self.name) else {"variant": variant}
        return Path(tiny.make_tiny_model(directory, seed=seed, **extra))

    def device_groups(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(first-GPU prefixes, last-GPU prefixes) of this family's multi-GPU placement."""
        return self.first_device, self.last_device

    def generation_defaults(self) -> GenerationSettings:
        """The family's own decoding: its original's deterministic mode."""
        return self.generation

    def builder_class(self) -> type[InputBuilder]:
        """The InputBuilder subclass of a native family (`builder` names it in
        pipeline.inference.families.<name>, the family's folder)."""
        if self.builder is None:
            raise UnsupportedModelError(f"family {self.name} builds its inputs in {self.module}")
        found: type[InputBuilder] = getattr(importlib.import_module(f"pipeline.inference.families.{self.name}"),
                                            self.builder)
        return found

    def code(self) -> FamilyCode:
        """The family's `FamilyCode` (pipeline.inference.families): what loading drives, for any family."""
        from pipeline.inference import families

        if self.module is not None:
            return families.PortedCode(self.name, self.module)
        return families.NativeCode(self.name, self.builder_class(), self.tile_overrides)

    def vllm(self) -> ModuleType:
        """The family's vLLM module (`ARCH`, `register()`, `request()`; see `vllm_module`).
        Importing it imports no vllm. UnsupportedModelError when the family has none or it
        cannot be imported."""
        if self.vllm_module is None:
            raise UnsupportedModelError(f"family {self.name} has no docpipe vLLM module (vLLM's own classes serve it)")
        try:
            return importlib.import_module(self.vllm_module)
        except ImportError as exc:
            raise UnsupportedModelError(f"its vLLM module {self.vllm_module} cannot be imported ({exc})") from None

    def vllm_refusal(self) -> str | None:
        """Why docpipe's vLLM classes cannot serve this family here (one line), None when they
        can or when vLLM's own classes serve it."""
        if self.vllm_module is None:
            return None
        try:
            module = self.vllm()
        except UnsupportedModelError as exc:
            return str(exc)
        if not isinstance(getattr(module, "ARCH", None), str) or not callable(getattr(module, "register", None)):
            return f"its vLLM module {self.vllm_module} lacks ARCH or register()"
        refusal = getattr(module, "refusal", None)
        return refusal() if callable(refusal) else None

    def implementation(self) -> ModuleType:
        """The family's module (ported families only)."""
        if self.module is None:
            raise UnsupportedModelError(f"family {self.name} is served by transformers' own classes")
        return importlib.import_module(self.module)

    def matches(self, config: Mapping[str, Any]) -> bool:
        named = config.get("model_type") in self.model_types or bool(
            set(config.get("architectures") or ()) & set(self.architectures)
        )
        if self.module is not None:
            # the family's own recogniser has the last word (it is imported only when named)
            return named and bool(self.implementation().recognise(config))
        return named


FAMILIES: tuple[Family, ...] = (
    # ported seed models first: their recognisers look at architectures, not only model_type
    Family(
        "minicpm_v2", ("minicpmv",), "minicpm", "pipeline.inference.families.minicpm_v2", ("MiniCPMV",),
        vllm_module="pipeline.inference.families.minicpm_v2.vllm",
        # vision tower, resampler and token embeddings meet at the input: together on the first GPU
        first_device=("vpm", "resampler", "llm.model.embed_tokens"),
        last_device=("llm.model.norm", "llm.lm_head"),
        # its chat(sampling=False): 3 beams, repetition_penalty 1.2 (its published scores' setting)
        generation=GenerationSettings(num_beams=3, repetition_penalty=1.2),
    ),
    Family(
        "mono_internvl", ("internvl_chat",), "internvl", "pipeline.inference.families.mono_internvl",
        ("InternVLChatModel",), vllm_module="pipeline.inference.families.mono_internvl.vllm",
        tiny_variants=("mono_internvl_vllm",),
        first_device=("vision_model", "mlp1", "language_model.model.tok_embeddings"),
        last_device=("language_model.model.norm", "language_model.output"),
    ),
    Family(
        "minimax_vl_01", ("minimax_vl_01",), "minimax", "pipeline.inference.families.minimax_vl_01",
        ("MiniMaxVL01ForConditionalGeneration",), vllm_module="pipeline.inference.families.minimax_vl_01.vllm",
        tiny_variants=("minimax_vl_01_vllm",),
        first_device=("vision_tower", "multi_modal_projector", "image_newline", "language_model.model.embed_tokens",
                      "language_model.model.rotary_emb"),
        last_device=("language_model.model.norm", "language_model.lm_head"),
    ),
    Family(
        "internvl", ("internvl",), "internvl", builder="InternVLBuilder", tile_overrides=("min_tiles", "max_tiles"),
        first_device=("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens"),
    ),
    Family(
        "qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "qwen2_vl", builder="Qwen2VLBuilder",
        first_device=("model.visual", "model.language_model.embed_tokens"), tiny_variants=("qwen2_5_vl",),
    ),
    Family(
        "idefics3", ("idefics3", "smolvlm"), "idefics3", builder="Idefics3Builder",
        first_device=("model.vision_model", "model.connector", "model.text_model.embed_tokens"),
        tiny_variants=("smolvlm",),
    ),
)

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def recognise(config: Mapping[str, Any]) -> Family:
    """The family of a checkpoint from its config.json, or UnsupportedModelError."""
    for family in FAMILIES:
        try:
            if family.matches(config):
                return family
        except ModuleNotFoundError:  # a port not installed in this build
            continue
    model_type = config.get("model_type")
    arch = ", ".join(config.get("architectures") or []) or "none"
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise UnsupportedModelError(
        f"model type {model_type!r} (architectures: {arch}) is not supported; supported families: {supported}"
    )


def tiny_model_names() -> tuple[str, ...]:
    """Every tiny checkpoint the families can write (`docpipe make-tiny-model NAME`)."""
    return tuple(n for family in FAMILIES for n in family.tiny_names)


def family_by_name(name: str) -> Family:
    try:
        return BY_NAME[name]
    except KeyError:
        raise UnsupportedModelError(f"unknown family {name!r}; known: {', '.join(BY_NAME)}") from None


__all__ = ["BY_NAME", "FAMILIES", "Family", "UnsupportedModelError", "family_by_name", "recognise", "tiny_model_names"]
