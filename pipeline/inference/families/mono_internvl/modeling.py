"""mono_internvl: the model: modules under the official weight names, loading. See the package docstring."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pipeline.inference.families import load_strict
from pipeline.inference.families.compat import causal_mask, lm_output
from pipeline.inference.families.mono_internvl.configuration import (
    InternLM2VEConfig,
    MonoInternVisionConfig,
    MonoInternVLConfig,
)
from pipeline.inference.families.mono_internvl.processing import load_config

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


def image_features(vision_model: nn.Module, mlp1: nn.Module, pixel_values: torch.Tensor,
                   config: MonoInternVLConfig) -> torch.Tensor:
    """Image tokens of a stack of tiles (tiles, tokens_per_tile, llm hidden size): patch
    embeddings, pixel shuffle, projector. Shared by the transformers port and the vLLM class."""
    dtype = mlp1[1].weight.dtype
    patches = vision_model(pixel_values.to(dtype))
    side = int(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:  # a class token (never here: it is dropped) would make it non-square
        patches = patches[:, 1:, :]
        side = int(patches.shape[1] ** 0.5)
    grid = patches.reshape(patches.shape[0], side, side, -1)
    grid = pixel_shuffle(grid, config.downsample_ratio, config.ps_version)
    return mlp1(grid.reshape(grid.shape[0], -1, grid.shape[-1]))


def projector(config: MonoInternVLConfig) -> nn.Sequential:
    """`mlp1`: LayerNorm, Linear, GELU, Linear over the pixel-shuffled patches."""
    shuffled = config.vision_config.hidden_size * int(1 / config.downsample_ratio) ** 2
    llm_dim = config.llm_config.hidden_size
    return nn.Sequential(nn.LayerNorm(shuffled), nn.Linear(shuffled, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))


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
        mask = causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
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
        self.vision_model = MonoVisionModel(config.vision_config)
        self.mlp1 = projector(config)
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
        return image_features(self.vision_model, self.mlp1, pixel_values, self.config)

    # ---- forward ----------------------------------------------------------------------------
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
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> Any:
        """Logits for `input_ids` (or `inputs_embeds`). (`past_key_values`: the cache's name in
        transformers 5.19's generate(), pipeline.inference.families.compat.)

        At the prefill (empty or no cache) the `<IMG_CONTEXT>` positions of `input_ids` get
        `image_features` (all placeholders of the batch, in order; or the features of
        `pixel_values`) and go through the visual experts. Later steps ignore both, and
        every token takes the text FFN, as in the original. With `inputs_embeds`, pass
        `visual_token_mask` (batch, seq) to mark image positions yourself.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
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
        return lm_output(logits, cache if use_cache else None)

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


def meta_model(config: MonoInternVLConfig) -> MonoInternVLForConditionalGeneration:
    """The model's modules on the meta device (for device maps; no memory, no weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return MonoInternVLForConditionalGeneration(config)


def load_model(
    folder: str | Path,
    *,
    dtype: torch.dtype,
    device_map: dict[str, int] | None = None,
    attn_implementation: str = "sdpa",
) -> MonoInternVLForConditionalGeneration:
    """Weights from the folder's safetensors (no remote code), in eval mode.

    Raises if a weight is missing or one is left over: the keys must be the official ones.
    """
    return load_strict(MonoInternVLForConditionalGeneration, folder, load_config(folder), dtype=dtype,
                       device_map=device_map, attn_implementation=attn_implementation, layout="Mono-InternVL")
