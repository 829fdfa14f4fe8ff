"""minimax_vl_01: configuration: the official config.json, recognition, placement. See the package docstring."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import CLIPVisionConfig, MiniMaxConfig, PretrainedConfig

from pipeline.inference.adapters import UnsupportedModelError
from pipeline.inference.registry import BY_NAME

# This family's identity is declared once, in its registry entry (pipeline.inference.registry).
FAMILY = BY_NAME["minimax_vl_01"]
NAME = FAMILY.name
MODEL_TYPES: tuple[str, ...] = FAMILY.model_types
ARCHITECTURES: tuple[str, ...] = FAMILY.architectures
FIRST_DEVICE: tuple[str, ...] = FAMILY.first_device
LAST_DEVICE: tuple[str, ...] = FAMILY.last_device

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"
BOS = "<beginning_of_sentence>"
EOS = "<end_of_sentence>"
# The model card's system message (its Quickstart); the chat format puts it first.
DEFAULT_SYSTEM = "You are a helpful assistant created by MiniMax based on MiniMax-VL-01 model."
# int8 as the model card recommends: what its QuantoConfig leaves in bf16 (see int8_skip_modules).
INT8_SKIP: tuple[str, ...] = ("vision_tower", "image_newline", "multi_modal_projector", "lm_head", "embed_tokens")


def int8_skip_modules(num_hidden_layers: int) -> list[str]:
    """The model card's `modules_to_not_convert` for int8 weights: the vision side, the
    embeddings and lm_head, and per layer the MoE router (and the shared-expert coefficient,
    which MiniMax-VL-01 does not have). No quantization library is installed here; this is
    the list to hand to one (e.g. optimum-quanto's QuantoConfig)."""
    per_layer = [f"model.layers.{i}.coefficient" for i in range(num_hidden_layers)]
    per_layer += [f"model.layers.{i}.block_sparse_moe.gate" for i in range(num_hidden_layers)]
    return list(INT8_SKIP) + per_layer


def recognise(config: Mapping[str, Any]) -> bool:
    """A MiniMax-VL-01 checkpoint, from its raw config.json."""
    return config.get("model_type") in MODEL_TYPES or any(a in ARCHITECTURES for a in config.get("architectures") or ())


# ---------------------------------------------------------------------------------------
# configuration: the official config.json, text_config in MiniMax-Text-01's own naming
# ---------------------------------------------------------------------------------------

_LEGACY_FACTORS = {
    "layernorm_full_attention_alpha": "full_attn_alpha_factor",
    "layernorm_full_attention_beta": "full_attn_beta_factor",
    "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
    "layernorm_linear_attention_beta": "linear_attn_beta_factor",
    "layernorm_mlp_alpha": "mlp_alpha_factor",
    "layernorm_mlp_beta": "mlp_beta_factor",
}
_DROP_TEXT_KEYS = ("architectures", "auto_map", "model_type", "_name_or_path", "torch_dtype", "dtype",
                   "transformers_version", "shared_moe_mode")


def text_config_from_official(raw: Mapping[str, Any] | PretrainedConfig) -> MiniMaxConfig:
    """MiniMax-Text-01's config (`minimax_text_01` naming) as transformers' MiniMaxConfig.

    attn_type_list (0 lightning, 1 softmax) -> layer_types; layernorm_*_alpha/beta -> the
    residual factors; rotary_dim -> partial_rotary_factor (kept as `rotary_dim` too). The
    original only runs with postnorm and without shared experts; anything else is refused.
    """
    if isinstance(raw, MiniMaxConfig):
        return raw
    d = dict(raw.to_dict() if isinstance(raw, PretrainedConfig) else raw)
    for key in _DROP_TEXT_KEYS:
        d.pop(key, None)
    if not d.pop("postnorm", True):
        raise UnsupportedModelError("MiniMax-Text-01 with postnorm=false is not supported")
    shared = d.pop("shared_intermediate_size", [0])
    if any(int(s) for s in (shared if isinstance(shared, (list, tuple)) else [shared])):
        raise UnsupportedModelError("MiniMax-Text-01 with shared experts is not supported")
    kinds = d.pop("attn_type_list", None)
    if kinds is not None and "layer_types" not in d:
        if any(k not in (0, 1) for k in kinds):
            raise UnsupportedModelError(f"attn_type_list must hold 0 and 1, got {kinds}")
        d["layer_types"] = ["full_attention" if k == 1 else "linear_attention" for k in kinds]
    for legacy, name in _LEGACY_FACTORS.items():
        if legacy in d:
            d[name] = d.pop(legacy)
    head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    rope = dict(d.pop("rope_parameters", None) or {"rope_type": "default"})
    rope.setdefault("rope_theta", d.pop("rope_theta", 10_000.0))
    d.pop("rope_theta", None)
    rotary_dim = d.pop("rotary_dim", None)
    if rotary_dim is not None:
        rope["partial_rotary_factor"] = rotary_dim / head_dim
    config = MiniMaxConfig(rope_parameters=rope, **d)
    config.head_dim = head_dim
    config.rotary_dim = int(round(head_dim * rope.get("partial_rotary_factor", 1.0)))
    return config


class MiniMaxVL01Config(PretrainedConfig):
    """The official MiniMax-VL-01 config.json, read unchanged.

    `image_grid_pinpoints` are (width, height) canvases as the model's processor reads them
    (the grid is symmetric, so the order does not matter for it); a string form
    "[(336, 336), ...]" is accepted too.
    """

    model_type = "minimax_vl_01"
    attribute_map = {"image_token_id": "image_token_index"}

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    image_token_index: int = 200025
    image_grid_pinpoints: list | str | None = None
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_seq_length: int = 576
    process_image_mode: str = "anyres"
    ignore_index: int = -100
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("attn_implementation", None)
        vision = self.vision_config
        if vision is None or isinstance(vision, Mapping):
            vision = dict(vision or {})
            for key in ("model_type", "auto_map", "architectures"):
                vision.pop(key, None)
            self.vision_config = CLIPVisionConfig(**vision)
        self.text_config = text_config_from_official(self.text_config or {"hidden_size": 64, "num_attention_heads": 4})
        self.image_grid_pinpoints = parse_pinpoints(self.image_grid_pinpoints)
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise UnsupportedModelError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r}")
        super().__post_init__(**kwargs)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        return self.text_config

    @property
    def tile_size(self) -> int:
        return int(self.vision_config.image_size)

    @property
    def grid_side(self) -> int:
        """Patches per tile side (24 for 336 px and 14 px patches)."""
        return self.tile_size // int(self.vision_config.patch_size)


def parse_pinpoints(value: Any) -> list[list[int]]:
    """The pinpoint list, from a list of pairs or the string form some configs use."""
    if value is None:
        side = 336
        return [[side * c, side * r] for c in range(1, 7) for r in range(1, 7)]
    if isinstance(value, str):
        import ast

        value = ast.literal_eval(value)
    return [[int(a), int(b)] for a, b in value]


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_config(folder: str | Path) -> MiniMaxVL01Config:
    """The official config.json as a MiniMaxVL01Config (no remote code)."""
    folder = Path(folder)
    raw = _read_json(folder / "config.json")
    if not recognise(raw):
        raise UnsupportedModelError(f"{folder} is not a MiniMax-VL-01 checkpoint")
    raw.pop("auto_map", None)
    return MiniMaxVL01Config(**raw)
