"""Mono-InternVL-2B (OpenGVLab/Mono-InternVL-2B), ported natively to transformers 5.

The checkpoint ships remote code written for transformers 4.37 (tuple KV cache, a custom
InternLM2 tokenizer class); nothing of it is imported or executed here. What the model is:

* **No vision transformer.** `vision_model.embeddings` is only a 14 px patch convolution
  plus learned position embeddings (resized bicubically to the patch grid); the class
  token is computed by the original and then thrown away, so it is skipped here.
* **Projector** `mlp1`: LayerNorm, Linear, GELU, Linear over the pixel-shuffled patches
  (2x2 neighbours concatenated: 1024 patches of a 448 px tile -> 256 image tokens).
* **LLM with visual experts** (InternLM2VEForCausalLM): an InternLM2 decoder whose
  layers hold two feed-forward networks. During the prefill, the positions holding the
  `<IMG_CONTEXT>` placeholder go through `feed_forward_ve`, every other position through
  the LLM's own `feed_forward`; on decode steps (the original: whenever a layer has a
  past key/value) every token goes through `feed_forward`. Attention is shared: `wqkv`
  packs, per key-value group, the group's query heads, then its key, then its value.
* **Pages**: InternVL's dynamic tiling (448 px tiles on the closest-aspect grid, plus a
  thumbnail), ImageNet mean/std as torchvision's ToTensor + Normalize compute them.
* **Chat**: the conversation template named in config.json (`internlm2-chat`), built the
  way the original `chat()` does: system prompt, `<img>` + placeholders + `</img>`, a
  newline, the question; generation stops at `<|im_end|>` only.
* **Tokenizer**: the sentencepiece model `tokenizer.model`, read with `sentencepiece`
  directly and wrapped so that it gives the ids the original slow tokenizer gives (added
  tokens split out first, each piece of text encoded on its own, BOS in front).

Key names are the official ones, so an official folder loads with no key renamed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg

from pipeline.inference.adapters import (
    CHART,
    DESCRIPTION,
    OCR,
    CodedPixels,
    InputBuilder,
    PageFeatures,
    PreparedPage,
    UnsupportedModelError,
    input_device,
)
from pipeline.inference.families import load_strict
from pipeline.records import TilePlan

NAME = "mono_internvl"
MODEL_TYPES: tuple[str, ...] = ("internvl_chat",)
ARCHITECTURES: tuple[str, ...] = ("InternVLChatModel",)
LLM_ARCHITECTURE = "InternLM2VEForCausalLM"  # what tells Mono-InternVL from a regular InternVL
TILING_POLICY = "internvl"
FIRST_DEVICE: tuple[str, ...] = ("vision_model", "mlp1", "language_model.model.tok_embeddings")
LAST_DEVICE: tuple[str, ...] = ("language_model.model.norm", "language_model.output")

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


# ---------------------------------------------------------------------------------------
# vision side: patch embedding, pixel shuffle, projector
# ---------------------------------------------------------------------------------------


class MonoVisionEmbeddings(nn.Module):
    """Patch convolution + position embeddings resized (bicubic) to the patch grid."""

    def __init__(self, config: MonoInternVisionConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, dim))  # kept for the key; its output is dropped
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=config.patch_size, stride=config.patch_size)
        grid = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.empty(1, grid + 1, dim))

    def _patch_positions(self, height: int, width: int) -> torch.Tensor:
        side = self.image_size // self.patch_size
        pos = self.position_embedding[:, 1:, :]
        grid = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # N, C, h, w
        _, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        return patches + self._patch_positions(height, width).to(dtype)


class MonoVisionModel(nn.Module):
    """`vision_model`: nothing but the embeddings (InternVisionPatchModel)."""

    def __init__(self, config: MonoInternVisionConfig) -> None:
        super().__init__()
        self.embeddings = MonoVisionEmbeddings(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixel_values)


def pixel_shuffle(x: torch.Tensor, scale: float, version: str = "v2") -> torch.Tensor:
    """InternVL's pixel shuffle of (N, W, H, C) patches: neighbours folded into channels.

    With `scale` 0.5 each output token holds 2x2 patches (4C channels). Version v1 leaves
    the result transposed, as the original does.
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


# ---------------------------------------------------------------------------------------
# language side: InternLM2 with visual experts
# ---------------------------------------------------------------------------------------


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rope_cos_sin(
    config: InternLM2VEConfig, position_ids: torch.Tensor, kv_length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (batch, seq, head_dim) for `position_ids`.

    Plain RoPE with `rope_theta`; linear scaling divides the positions; dynamic NTK
    scaling raises the base once the sequence (`kv_length`) is longer than
    max_position_embeddings, by the original's formula. (The original keeps a raised base
    for the rest of the process; here it is recomputed per call: they differ only after
    a sequence beyond max_position_embeddings, 32k tokens for the 2B model.)
    """
    params = config.rope_parameters or {}
    dim = config.head_dim
    base = float(params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    factor = float(params.get("factor", 1.0))
    max_pos = config.max_position_embeddings
    if kind == "dynamic" and kv_length > max_pos:
        base = base * ((factor * kv_length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    device = position_ids.device
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))
    positions = position_ids.float()
    if kind == "linear":
        positions = positions / factor
    freqs = positions[..., None] * inv_freq  # one product per element, as the original's einsum
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in fp32, as the original's eager path (fallback for any backend)."""
    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


class InternLM2Attention(nn.Module):
    """Grouped-query attention with InternLM2's packed `wqkv`: per key-value group, the
    group's query heads, then one key head, then one value head."""

    def __init__(self, config: InternLM2VEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        if self.head_dim * self.num_heads != config.hidden_size:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of {self.num_heads} heads")
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.wqkv = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim, bias=config.bias
        )
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        b, q_len, _ = hidden_states.shape
        groups = self.num_key_value_groups
        qkv = self.wqkv(hidden_states).view(b, q_len, self.num_key_value_heads, groups + 2, self.head_dim)
        query = qkv[..., :groups, :].reshape(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = qkv[..., -2, :].transpose(1, 2)
        value = qkv[..., -1, :].transpose(1, 2)

        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, _ = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.wo(out.reshape(b, q_len, -1).contiguous())


class InternLM2MLP(nn.Module):
    def __init__(self, config: InternLM2VEConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2VEDecoderLayer(nn.Module):
    """Shared attention; the visual expert FFN for image positions during the prefill."""

    def __init__(self, config: InternLM2VEConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.feed_forward_ve = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        expert_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """`expert_rows`: (image rows, text rows) of the flattened (batch * seq) positions
        at a prefill with images; None: every position takes the text FFN."""
        residual = hidden_states
        hidden_states = self.attention(
            self.attention_norm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        normed = self.ffn_norm(hidden_states)
        if expert_rows is None:
            out = self.feed_forward(normed)
        else:
            # Each position through one expert only (the original computes both and blends
            # with a 0/1 mask, which gives the same numbers at twice the cost).
            image_rows, text_rows = expert_rows
            flat = normed.reshape(-1, normed.shape[-1])
            out = torch.empty_like(flat)
            out.index_copy_(0, image_rows, self.feed_forward_ve(flat.index_select(0, image_rows)))
            if text_rows.numel():
                out.index_copy_(0, text_rows, self.feed_forward(flat.index_select(0, text_rows)))
            out = out.view_as(normed)
        return residual + out


class InternLM2VEModel(nn.Module):
    """`language_model.model`: embeddings, decoder layers, final norm."""

    def __init__(self, config: InternLM2VEConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([InternLM2VEDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Cache | None,
        visual_token_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        past = cache.get_seq_length() if cache is not None else 0
        length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None]
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        position_embeddings = rope_cos_sin(self.config, position_ids, past + length, inputs_embeds.dtype)
        expert_rows = None
        if visual_token_mask is not None:
            flat = visual_token_mask.reshape(-1).to(device=inputs_embeds.device, dtype=torch.bool)
            image_rows = flat.nonzero().squeeze(1)
            if image_rows.numel():
                expert_rows = (image_rows, (~flat).nonzero().squeeze(1))
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, position_embeddings, mask, cache=cache, expert_rows=expert_rows, **kwargs
            )
        return self.norm(hidden_states)


class InternLM2VEForCausalLM(nn.Module):
    """`language_model`: the decoder and its `output` head."""

    def __init__(self, config: InternLM2VEConfig) -> None:
        super().__init__()
        self.model = InternLM2VEModel(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


# ---------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------


class MonoInternVLForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Mono-InternVL with the official key names (`vision_model.*`, `mlp1.*`, `language_model.*`)."""

    config_class = MonoInternVLConfig
    config: MonoInternVLConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["InternLM2VEDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True

    def __init__(self, config: MonoInternVLConfig) -> None:
        super().__init__(config)
        vit_dim = config.vision_config.hidden_size
        llm_dim = config.llm_config.hidden_size
        shuffled = vit_dim * int(1 / config.downsample_ratio) ** 2
        self.vision_model = MonoVisionModel(config.vision_config)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(shuffled), nn.Linear(shuffled, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim)
        )
        self.language_model = InternLM2VEForCausalLM(config.llm_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        from transformers import initialization as init

        super()._init_weights(module)
        if isinstance(module, MonoVisionEmbeddings):
            std = self.config.vision_config.initializer_range
            init.normal_(module.class_embedding, mean=0.0, std=std)
            init.normal_(module.position_embedding, mean=0.0, std=std)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.output

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.language_model.output = value

    # ---- images ---------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens of a stack of tiles: (tiles, tokens_per_tile, llm hidden size)."""
        dtype = self.mlp1[1].weight.dtype
        patches = self.vision_model(pixel_values.to(dtype))
        side = int(patches.shape[1] ** 0.5)
        if side * side != patches.shape[1]:  # a class token (never here: it is dropped) would make it non-square
            patches = patches[:, 1:, :]
            side = int(patches.shape[1] ** 0.5)
        grid = patches.reshape(patches.shape[0], side, side, -1)
        grid = pixel_shuffle(grid, self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(grid.reshape(grid.shape[0], -1, grid.shape[-1]))

    # ---- forward ----------------------------------------------------------------------------
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        visual_token_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for `input_ids` (or `inputs_embeds`).

        At the prefill (empty or no cache) the `<IMG_CONTEXT>` positions of `input_ids` get
        `image_features` (all placeholders of the batch, in order; or the features of
        `pixel_values`) and go through the visual experts. Later steps ignore both, and
        every token takes the text FFN, as in the original. With `inputs_embeds`, pass
        `visual_token_mask` (batch, seq) to mark image positions yourself.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.llm_config.use_cache if use_cache is None else use_cache
        prefill = cache is None or cache.get_seq_length() == 0
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if prefill:
                inputs_embeds, visual_token_mask = self._merge_images(
                    input_ids, inputs_embeds, image_features, pixel_values
                )
        if not prefill:
            visual_token_mask = None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.llm_config)
        hidden = self.language_model.model(
            inputs_embeds, attention_mask, position_ids, cache if use_cache else None, visual_token_mask, **kwargs
        )
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.language_model.output(hidden).float()
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    def _merge_images(
        self,
        input_ids: torch.Tensor,
        embeds: torch.Tensor,
        image_features: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        token = self.config.image_token_id
        if token is None:
            if image_features is not None or pixel_values is not None:
                raise ValueError("config.image_token_id is not set (load_config sets it from the tokenizer)")
            return embeds, None
        mask = input_ids == token
        count = int(mask.sum())
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        if image_features is None:
            if count:
                raise ValueError(f"{count} image placeholders but no image_features or pixel_values")
            return embeds, mask
        flat = image_features.reshape(-1, embeds.shape[-1]).to(embeds.device, embeds.dtype)
        if flat.shape[0] != count:
            raise ValueError(f"{count} image placeholders, {flat.shape[0]} image feature vectors")
        return embeds.masked_scatter(mask[..., None], flat), mask


# ---------------------------------------------------------------------------------------
# tokenizer: the sentencepiece model, as the original slow tokenizer uses it
# ---------------------------------------------------------------------------------------

# PreTrainedTokenizer.clean_up_tokenization (transformers 4.37), which InternLM2Tokenizer's
# convert_tokens_to_string applies unconditionally.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class InternLM2Tokenizer:
    """InternLM2's tokenizer without its remote class: `tokenizer.model` + added tokens.

    Encoding as the original (a transformers 4.37 slow tokenizer) does it: the text is
    cut at every added token (tokenizer_config's `added_tokens_decoder` and the named
    special tokens; longest match first; spaces beside one stripped only where it says lstrip/rstrip), every other
    piece is encoded by sentencepiece on its own (so each gets sentencepiece's own
    dummy prefix), and BOS goes in front when `add_bos_token`. Decoding drops the special
    ids when asked and joins the pieces with sentencepiece.

    `eos_token_id` is the id generation stops at: `</s>` by default; the builder makes
    it the chat's end of turn (`<|im_end|>`), the one id the original `chat()` stops at.
    Pickles as the model's bytes (sentencepiece processors do not pickle).
    """

    def __init__(
        self,
        model_proto: bytes,
        added_tokens: Mapping[str, int],
        special_tokens: Sequence[str],
        *,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str | None = "</s>",
        add_bos_token: bool = True,
        stop_token: str | None = None,
        strip: Mapping[str, tuple[bool, bool]] | None = None,
    ) -> None:
        self._proto = bytes(model_proto)
        self.added_tokens = dict(added_tokens)
        self.strip = dict(strip or {})  # added token -> (lstrip, rstrip): whitespace it swallows beside it
        self.add_bos_token = add_bos_token
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.stop_token = stop_token
        self._special_names = tuple(special_tokens)
        self._setup()

    def _setup(self) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(self._proto)
        # Named special tokens split the text too (4.37 adds them to the added-token map).
        for token in (self.bos_token, self.eos_token, self.unk_token, self.pad_token):
            if token is not None and token not in self.added_tokens:
                self.added_tokens[token] = self.sp.piece_to_id(token)
        self._id_to_added = {i: t for t, i in self.added_tokens.items()}
        named = [t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t is not None]
        self._special_strings = frozenset((*named, *self._special_names))
        self.all_special_ids = frozenset(self.convert_tokens_to_ids(t) for t in self._special_strings)
        # added tokens decoded on their own: the non-special ones, and special ones past the sp vocabulary
        self._standalone_ids = frozenset(
            i for t, i in self.added_tokens.items() if t not in self._special_strings or i >= self.vocab_size
        )
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")") if alternatives else None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("sp", "_splitter", "_id_to_added", "all_special_ids", "_special_strings", "_standalone_ids"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, *, stop_token: str | None = None) -> InternLM2Tokenizer:
        folder = Path(folder)
        cfg = _read_json(folder / "tokenizer_config.json")
        smap = _read_json(folder / "special_tokens_map.json")
        added: dict[str, int] = {}
        specials: list[str] = []
        strip: dict[str, tuple[bool, bool]] = {}
        for index, entry in (cfg.get("added_tokens_decoder") or {}).items():
            content = entry["content"] if isinstance(entry, Mapping) else str(entry)
            added[content] = int(index)
            if isinstance(entry, Mapping):
                strip[content] = (bool(entry.get("lstrip")), bool(entry.get("rstrip")))
            if not isinstance(entry, Mapping) or entry.get("special", True):
                specials.append(content)
        for content, index in _read_json(folder / "added_tokens.json").items():
            added.setdefault(content, int(index))
        for source in (cfg, smap):
            for entry in source.get("additional_special_tokens") or []:
                specials.append(entry["content"] if isinstance(entry, Mapping) else str(entry))

        def named(key: str, default: str | None) -> str | None:
            value = cfg.get(key, smap.get(key, default))
            return value.get("content") if isinstance(value, Mapping) else value

        return cls(
            (folder / "tokenizer.model").read_bytes(),
            added,
            specials,
            bos_token=named("bos_token", "<s>") or "<s>",
            eos_token=named("eos_token", "</s>") or "</s>",
            unk_token=named("unk_token", "<unk>") or "<unk>",
            pad_token=named("pad_token", "</s>"),
            add_bos_token=bool(cfg.get("add_bos_token", True)),
            stop_token=stop_token,
            strip=strip,
        )

    # ---- ids ------------------------------------------------------------------------------
    def convert_tokens_to_ids(self, token: str) -> int:
        if token in self.added_tokens:
            return self.added_tokens[token]
        return int(self.sp.piece_to_id(token))

    def convert_ids_to_tokens(self, index: int) -> str:
        return self._id_to_added.get(int(index)) or self.sp.id_to_piece(int(index))

    @property
    def bos_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.stop_token or self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.convert_tokens_to_ids(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def __len__(self) -> int:
        return len(self.get_vocab())

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens)
        return vocab

    # ---- encode / decode -----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        parts = self._splitter.split(text) if self._splitter is not None else [text]
        for k in range(1, len(parts), 2):  # added tokens flagged lstrip/rstrip eat the spaces beside them
            lstrip, rstrip = self.strip.get(parts[k], (False, False))
            if lstrip:
                parts[k - 1] = parts[k - 1].rstrip()
            if rstrip:
                parts[k + 1] = parts[k + 1].lstrip()
        for k, part in enumerate(parts):
            if not part:
                continue
            if k % 2:  # an added token
                ids.append(self.added_tokens[part])
            else:
                ids.extend(int(i) for i in self.sp.encode(part))
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as the original's decode (transformers 4.37 slow path) gives it.

        Runs of ordinary pieces are joined by sentencepiece; added tokens that are not
        special, and special added tokens beyond the sentencepiece vocabulary, stand
        alone and are joined to their neighbours with a space; special tokens inside the
        sentencepiece vocabulary follow InternLM2Tokenizer's own spacing rule.
        """
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = ids.tolist()
        texts: list[str] = []
        run: list[int] = []
        for index in (int(i) for i in ids):
            if skip_special_tokens and index in self.all_special_ids:
                continue
            if index in self._standalone_ids:
                if run:
                    text = self._pieces_text(run)
                    if text:
                        texts.append(text)
                    run = []
                texts.append(self._id_to_added[index])
            else:
                run.append(index)
        if run:
            texts.append(self._pieces_text(run))
        return " ".join(texts)

    def _pieces_text(self, ids: list[int]) -> str:
        """InternLM2Tokenizer.convert_tokens_to_string: special tokens met here get a space
        before them (unless right after another), the rest is sentencepiece's text; then
        the 4.37 clean-up of spaces before punctuation."""
        out, run, after_special = "", [], False
        for index in ids:
            token = self.convert_ids_to_tokens(index)
            if token in self._special_strings:
                out += ("" if after_special else " ") + self.sp.decode(run) + token
                run, after_special = [], True
            else:
                run.append(index)
                after_special = False
        out += self.sp.decode(run)
        for old, new in _CLEANUPS:
            out = out.replace(old, new)
        return out

    def batch_decode(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]


# ---------------------------------------------------------------------------------------
# chat format (the conversation templates of the original conversation.py)
# ---------------------------------------------------------------------------------------

_INTERNVL_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


@dataclass(frozen=True)
class ChatTemplate:
    """An MPT-style conversation: system, then role + message + sep per turn, no newlines
    between turns; the assistant's role is left open for generation."""

    name: str
    system: str
    user: str
    assistant: str
    sep: str

    def prompt(self, question: str) -> str:
        return self.system + self.sep + self.user + question + self.sep + self.assistant


CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    name: ChatTemplate(
        name=name,
        system="<|im_start|>system\n" + _INTERNVL_SYSTEM,
        user="<|im_start|>user\n",
        assistant="<|im_start|>assistant\n",
        sep="<|im_end|>",
    )
    for name in ("internlm2-chat", "Hermes-2")
}


def chat_template(name: str | None) -> ChatTemplate:
    try:
        return CHAT_TEMPLATES[name or "internlm2-chat"]
    except KeyError:
        raise UnsupportedModelError(
            f"conversation template {name!r} is not supported; known: {', '.join(CHAT_TEMPLATES)}"
        ) from None


# ---------------------------------------------------------------------------------------
# input builder
# ---------------------------------------------------------------------------------------


def _pixel_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) float32: torchvision's ToTensor (x / 255 in float32) then Normalize."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((levels[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)


class MonoInternVLBuilder(InputBuilder):
    """Pages -> tiles, pixel values and prompts as Mono-InternVL's own chat() builds them."""

    family = NAME
    placeholder = IMG_CONTEXT

    def __init__(
        self,
        tokenizer: InternLM2Tokenizer,
        model_config: MonoInternVLConfig,
        *,
        tasks: Sequence[str] = (DESCRIPTION, OCR, CHART),
        chart_questions: Sequence[str] = (),
        min_tiles: int | None = None,
        max_tiles: int | None = None,
    ) -> None:
        self.template = chat_template(model_config.template)
        self.tokenizer = tokenizer
        self.tokenizer.stop_token = self.template.sep
        self.image_processor = None
        self.chat_template = None
        self.tasks = tuple(tasks)
        self.chart_questions = tuple(chart_questions)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else tokenizer.convert_tokens_to_ids(tokenizer.eos_token))
        self.tile_size = model_config.tile_size
        self.tokens_per_tile = model_config.num_image_token
        self.min_tiles = int(min_tiles if min_tiles is not None else model_config.min_dynamic_patch)
        self.max_tiles = int(max_tiles if max_tiles is not None else model_config.max_dynamic_patch)
        self.use_thumbnail = bool(model_config.use_thumbnail)
        self.table = _pixel_table(IMAGENET_MEAN, IMAGENET_STD)

    def plan(self, width: int, height: int) -> TilePlan:
        from pipeline import tiling

        return tiling.plan_internvl(
            width,
            height,
            min_num=self.min_tiles,
            max_num=self.max_tiles,
            image_size=self.tile_size,
            use_thumbnail=self.use_thumbnail,
            tokens_per_tile=self.tokens_per_tile,
        )

    def pixels(self, image: Any, plan: TilePlan, thumbnail: Any = None) -> tuple[CodedPixels, dict[str, np.ndarray]]:
        from PIL import Image

        from pipeline import tiling

        # The README's load_image: PIL's default (bicubic) resize, then ToTensor + Normalize.
        tiles = tiling.cut_tiles(image, plan, Image.Resampling.BICUBIC, thumbnail=thumbnail)
        codes = np.stack([np.asarray(t.convert("RGB") if t.mode != "RGB" else t) for t in tiles])
        return CodedPixels(codes=np.ascontiguousarray(codes), table=self.table), {}

    def image_text(self, plan: TilePlan) -> str:
        return IMG_START + IMG_CONTEXT * (self.tokens_per_tile * plan.tiles) + IMG_END

    def chat_text(self, prompt: str, plan: TilePlan) -> str:
        return self.template.prompt(self.image_text(plan) + "\n" + prompt)

    def encode_text(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), dtype=np.int64)

    def encode_page(self, model: Any, page: PreparedPage) -> PageFeatures:
        pixel_values = page.pixel_tensor(input_device(model), model.dtype)
        features = model.get_image_features(pixel_values)
        return PageFeatures(features.reshape(-1, features.shape[-1]))

    def feature_inputs(self, model: Any, feats: Sequence[PageFeatures], input_ids: torch.Tensor) -> dict[str, Any]:
        return {"image_features": torch.cat([f.features for f in feats])}

    def naive_inputs(self, prepared: PreparedPage, key: str, device: Any) -> dict[str, Any]:
        ids = torch.from_numpy(prepared.prompts[key])[None].to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": prepared.pixel_tensor(device)}


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_config(folder: str | Path) -> MonoInternVLConfig:
    """The official config.json as a MonoInternVLConfig, `image_token_id` from the tokenizer."""
    folder = Path(folder)
    raw = _read_json(folder / "config.json")
    if not recognise(raw):
        raise UnsupportedModelError(f"{folder} is not a Mono-InternVL checkpoint")
    config = MonoInternVLConfig.from_pretrained(folder)
    if config.image_token_id is None and (folder / "tokenizer.model").is_file():
        config.image_token_id = InternLM2Tokenizer.from_folder(folder).convert_tokens_to_ids(IMG_CONTEXT)
    return config


def meta_model(config: MonoInternVLConfig) -> MonoInternVLForConditionalGeneration:
    """The model's modules on the meta device (for device maps; no memory, no weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return MonoInternVLForConditionalGeneration(config)


def load_model(
    folder: str | Path,
    *,
    dtype: Any,
    device_map: Any = None,
    attn_implementation: str = "sdpa",
) -> MonoInternVLForConditionalGeneration:
    """Weights from the folder's safetensors (no remote code), in eval mode.

    Raises if a weight is missing or one is left over: the keys must be the official ones.
    """
    return load_strict(MonoInternVLForConditionalGeneration, folder, load_config(folder), dtype=dtype,
                       device_map=device_map, attn_implementation=attn_implementation, layout="Mono-InternVL")


def load_builder(
    folder: str | Path,
    model_config: MonoInternVLConfig,
    *,
    tasks: Sequence[str],
    chart_questions: Sequence[str],
    **tiling_overrides: Any,
) -> MonoInternVLBuilder:
    """The input builder (tokenizer + page geometry + chat format; no weights).

    `tiling_overrides`: `min_tiles` / `max_tiles` (None: the config's min/max_dynamic_patch).
    """
    unknown = set(tiling_overrides) - {"min_tiles", "max_tiles"}
    if unknown:
        raise TypeError(f"unknown tiling overrides for {NAME}: {sorted(unknown)}")
    tokenizer = InternLM2Tokenizer.from_folder(folder)
    return MonoInternVLBuilder(
        tokenizer,
        model_config,
        tasks=tasks,
        chart_questions=chart_questions,
        min_tiles=tiling_overrides.get("min_tiles"),
        max_tiles=tiling_overrides.get("max_tiles"),
    )


# ---------------------------------------------------------------------------------------
# tiny checkpoint for tests and smoke runs
# ---------------------------------------------------------------------------------------

# InternLM2 / InternVL special tokens, in their order at the end of the vocabulary
# (real ids 92538 .. 92552); here they follow the small sentencepiece vocabulary.
CHAT_SPECIAL_TOKENS = (
    "<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>",
    IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)
TINY_SP_VOCAB = 320
TINY_INIT_RANGE = 0.3

_TINY_WORDS = (
    "describe this page what kind of document it is and what it shows transcribe all the text on "
    "the page in reading order does contain a chart plot or diagram answer yes no the quarterly report "
    "revenue growth percent invoice number total amount due figure temperature over time title axes units "
    "please image picture color red blue green hello world briefly shown question 图 片 描 述 这 是 什 么 你 好"
).split()


def _train_tiny_sentencepiece(path: Path, seed: int) -> None:
    """A small BPE sentencepiece model with InternLM2's conventions: <unk> 0, <s> 1, </s> 2,
    byte fallback, newlines kept (identity normalisation, no whitespace folding)."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list(_TINY_WORDS) + ["".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(60)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) + rng.choice(["", "\n", ".", "?"]) for _ in range(800)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=TINY_SP_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(buffer.getvalue())


def tiny_config_dict(vocab_size: int) -> dict[str, Any]:
    """config.json of a tiny Mono-InternVL in the official InternVLChatModel layout.

    448 px tiles with 28 px patches: 16x16 patches, 64 image tokens a tile (the real
    model: 14 px, 256). Two decoder layers with grouped-query attention.
    """
    return {
        "architectures": list(ARCHITECTURES),
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internlm2-chat",
        "use_thumbnail": True,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "pad2square": False,
        "torch_dtype": "float32",
        "llm_config": {
            "architectures": [LLM_ARCHITECTURE],
            "model_type": "internlm2",
            "auto_map": {
                "AutoConfig": "configuration_internlm2.InternLM2Config",
                "AutoModel": "modeling_internlm2_ve.InternLM2VEForCausalLM",
                "AutoModelForCausalLM": "modeling_internlm2_ve.InternLM2VEForCausalLM",
            },
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000,
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
            "bias": False,
            "attn_implementation": "eager",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "initializer_range": TINY_INIT_RANGE,
            "torch_dtype": "float32",
        },
        "vision_config": {
            "architectures": ["InternVisionPatchModel"],
            "model_type": "intern_vit_patch",
            "hidden_size": 32,
            "image_size": 448,
            "patch_size": 28,
            "num_channels": 3,
            "num_hidden_layers": 0,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "use_flash_attn": False,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
            "initializer_range": TINY_INIT_RANGE,
            "torch_dtype": "float32",
        },
    }


def make_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Mono-InternVL folder in the official layout; returns the folder.

    config.json (official architectures/model_type/fields), model.safetensors (official
    keys), tokenizer.model (a small sentencepiece model, <unk>/<s>/</s> at 0/1/2) with
    tokenizer_config.json listing InternLM2's 15 chat/image tokens at the end of the
    vocabulary, special_tokens_map.json and generation_config.json (stops at <|im_end|>).
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _train_tiny_sentencepiece(out / "tokenizer.model", seed)
    vocab = TINY_SP_VOCAB + len(CHAT_SPECIAL_TOKENS)
    specials = {str(TINY_SP_VOCAB + i): t for i, t in enumerate(CHAT_SPECIAL_TOKENS)}
    tokenizer_config = {
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "tokenizer_class": "InternLM2Tokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "added_tokens_decoder": {
            **{str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
               for i, t in enumerate(("<unk>", "<s>", "</s>"))},
            **{i: {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": True} for i, t in specials.items()},
        },
        "additional_special_tokens": list(CHAT_SPECIAL_TOKENS),
    }
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
                   "additional_special_tokens": list(CHAT_SPECIAL_TOKENS)}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=1))
    raw = tiny_config_dict(vocab)
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    im_end = TINY_SP_VOCAB + CHAT_SPECIAL_TOKENS.index("<|im_end|>")
    (out / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": [im_end], "pad_token_id": 2})
    )

    torch.manual_seed(seed)
    config = load_config(out)
    model = MonoInternVLForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms away from 1/0, so a wrong norm shows in the numbers
        for name, param in model.named_parameters():
            if re.search(r"norm|mlp1\.0", name):
                delta = torch.randn(param.shape, generator=generator)
                param.copy_((1.0 + 0.1 * delta) if name.endswith("weight") else 0.05 * delta)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


__all__ = [
    "ARCHITECTURES",
    "CHAT_SPECIAL_TOKENS",
    "CHAT_TEMPLATES",
    "FIRST_DEVICE",
    "InternLM2Tokenizer",
    "InternLM2VEConfig",
    "LAST_DEVICE",
    "MODEL_TYPES",
    "MonoInternVLBuilder",
    "MonoInternVLConfig",
    "MonoInternVLForConditionalGeneration",
    "MonoInternVisionConfig",
    "NAME",
    "TILING_POLICY",
    "load_builder",
    "load_config",
    "load_model",
    "make_tiny_model",
    "meta_model",
    "pixel_shuffle",
    "recognise",
]
