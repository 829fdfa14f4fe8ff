"""minicpm_v2: configuration: the official config.json, recognition, placement. See the package docstring."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from pipeline.inference.generation import GenerationSettings
from pipeline.inference.registry import BY_NAME

# This family's identity is declared once, in its registry entry (pipeline.inference.registry).
FAMILY = BY_NAME["minicpm_v2"]
NAME = FAMILY.name
MODEL_TYPES: tuple[str, ...] = FAMILY.model_types
ARCHITECTURES: tuple[str, ...] = FAMILY.architectures
FIRST_DEVICE: tuple[str, ...] = FAMILY.first_device
LAST_DEVICE: tuple[str, ...] = FAMILY.last_device
# Its deterministic chat(sampling=False), as the registry entry says
GENERATION_DEFAULTS: GenerationSettings = FAMILY.generation

SPIECE_UNDERLINE = "\u2581"
USER_TAG, ASSISTANT_TAG = "<用户>", "<AI>"
IMAGE_START, IMAGE_END, SLICE_START, SLICE_END = "<image>", "</image>", "<slice>", "</slice>"
IMAGE_PLACEHOLDER = "<unk>"


def recognise(config: Mapping[str, Any]) -> bool:
    """MiniCPM-V 2.0 from its raw config.json.

    Versions 2.5 and 2.6 share model_type "minicpmv" and architecture "MiniCPMV" but carry
    a `version` and no timm `vision_encoder`; 2.0 names its timm tower.
    """
    return (
        config.get("model_type") in MODEL_TYPES
        and any(a in ARCHITECTURES for a in config.get("architectures") or ())
        and isinstance(config.get("vision_encoder"), str)
        and float(config.get("version", 2.0)) == 2.0
    )


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------


class MiniCPMV2Config(PretrainedConfig):
    """The official config.json of MiniCPM-V 2.0, read unchanged (defaults: the real checkpoint).

    The language model's fields sit at the top level, as in the original; `vision_encoder`
    names the timm tower and an optional `vision_config` (SigLIP terms) overrides its sizes.
    """

    model_type = "minicpmv"

    vocab_size: int = 122753
    hidden_size: int = 2304
    intermediate_size: int = 5760
    num_hidden_layers: int = 40
    num_attention_heads: int = 36
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.1
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    scale_emb: float = 12
    dim_model_base: int = 256
    scale_depth: float = 1.4
    vision_encoder: str = "vit_so400m_patch14_siglip_384.webli"
    vision_config: dict | None = None
    query_num: int = 64
    image_size: int = 448
    drop_vision_last_layer: bool = True
    slice_mode: bool = True
    patch_size: int = 14
    max_slice_nums: int = 9
    scale_resolution: int = 448
    im_start_token_id: int = 101
    im_end_token_id: int = 102
    slice_start_token_id: int = 111
    slice_end_token_id: int = 112
    unk_token_id: int = 0

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise NotImplementedError(f"MiniCPM-V 2.0 port: rope type {rope_type!r} is not supported (the checkpoint has none)")

    @property
    def rope_theta_value(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower's sizes. `depth` counts every block, before the last one is dropped."""

    width: int
    mlp_width: int
    depth: int
    heads: int
    patch: int
    image_size: int
    eps: float = 1e-6  # timm's LayerNorm default for ViTs

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


# timm model names -> the tower they build (timm 0.9: mlp width = int(width * mlp_ratio))
TIMM_TOWERS: dict[str, VisionSpec] = {
    "vit_so400m_patch14_siglip_384": VisionSpec(1152, int(1152 * 3.7362), 27, 16, 14, 384),
}


def vision_spec(config: MiniCPMV2Config) -> VisionSpec:
    """The tower `vision_encoder` names, with `vision_config` (SigLIP field names) on top."""
    base = TIMM_TOWERS.get(str(config.vision_encoder).split(".")[0])
    extra = dict(config.vision_config or {})
    fields = {
        "width": extra.get("hidden_size", base.width if base else None),
        "mlp_width": extra.get("intermediate_size", base.mlp_width if base else None),
        "depth": extra.get("num_hidden_layers", base.depth if base else None),
        "heads": extra.get("num_attention_heads", base.heads if base else None),
        "patch": extra.get("patch_size", base.patch if base else None),
        "image_size": extra.get("image_size", base.image_size if base else None),
    }
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise ValueError(f"unknown vision encoder {config.vision_encoder!r} and no vision_config for {missing}")
    return VisionSpec(**{k: int(v) for k, v in fields.items()}, eps=float(extra.get("layer_norm_eps", 1e-6)))


def load_config(folder: str | Path) -> MiniCPMV2Config:
    """The checkpoint's config.json as a MiniCPMV2Config (its auto_map is never followed)."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    if not recognise(raw):
        raise ValueError(f"{folder} is not a MiniCPM-V 2.0 checkpoint")
    return MiniCPMV2Config.from_dict(raw)
