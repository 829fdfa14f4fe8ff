"""minicpm_v2: the model: modules under the official weight names, loading. See the package docstring."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pipeline.inference.families import load_strict
from pipeline.inference.families.compat import causal_mask, lm_output
from pipeline.inference.families.minicpm_v2.configuration import MiniCPMV2Config, VisionSpec, load_config, vision_spec

# ---------------------------------------------------------------------------------------
# vision tower (timm's VisionTransformer naming)
# ---------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.patch = spec.patch
        self.proj = nn.Conv2d(3, spec.width, kernel_size=spec.patch, stride=spec.patch)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/p, W/p, C); sides not multiple of the patch are zero padded (as timm's
        dynamic_img_pad)."""
        h, w = pixels.shape[-2:]
        pad_h, pad_w = (-h) % self.patch, (-w) % self.patch
        if pad_h or pad_w:
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h))
        return self.proj(pixels).permute(0, 2, 3, 1)


class VisionAttention(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.heads = spec.heads
        self.qkv = nn.Linear(spec.width, spec.width * 3)
        self.proj = nn.Linear(spec.width, spec.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class VisionMlp(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.width, spec.mlp_width)
        self.fc2 = nn.Linear(spec.mlp_width, spec.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU, as timm's default


class VisionBlock(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.width, eps=spec.eps)
        self.attn = VisionAttention(spec)
        self.norm2 = nn.LayerNorm(spec.width, eps=spec.eps)
        self.mlp = VisionMlp(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    """SigLIP as timm builds it for MiniCPM-V 2.0: no class token, no pooling head."""

    def __init__(self, spec: VisionSpec, keep_blocks: int) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.grid * spec.grid, spec.width))
        self.blocks = nn.ModuleList(VisionBlock(spec) for _ in range(keep_blocks))
        self.norm = nn.LayerNorm(spec.width, eps=spec.eps)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """The learned grid resized (bicubic, antialiased, in float32) to rows x cols; as is when equal."""
        grid = self.spec.grid
        if (rows, cols) == (grid, grid):
            return self.pos_embed
        table = self.pos_embed.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(rows, cols), mode="bicubic", antialias=True)
        return table.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(self.pos_embed.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        b, rows, cols, c = x.shape
        x = x.reshape(b, rows * cols, c) + self.position_embedding(rows, cols)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------
# resampler
# ---------------------------------------------------------------------------------------


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """MAE-style 2-D sin-cos embeddings (rows*cols, dim), float32, row-major.

    As the original computes them: the first half of the channels encodes the column
    index, the second half the row index; each half is sin then cos over frequencies
    10000^(-k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos embedding width must be a multiple of 4, got {dim}")
    col_idx, row_idx = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))

    def one_axis(positions: np.ndarray) -> np.ndarray:
        freq = np.arange(dim // 4, dtype=np.float32)
        freq /= dim / 4.0
        freq = 1.0 / 10000**freq
        angles = np.einsum("m,d->md", positions.reshape(-1), freq)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(col_idx), one_axis(row_idx)], axis=1)


@lru_cache(maxsize=64)
def _sincos_cached(dim: int, rows: int, cols: int) -> torch.Tensor:
    return torch.from_numpy(sincos_2d(dim, rows, cols)).float()


class Resampler(nn.Module):
    """`query_num` learned queries attend once to a slice's patch features (perceiver style)."""

    def __init__(self, queries: int, dim: int, kv_dim: int) -> None:
        super().__init__()
        side = int(math.isqrt(queries))
        if side * side != queries:
            raise ValueError(f"query_num must be a square, got {queries}")
        self.side = side
        self.dim = dim
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.pos_embed = nn.Parameter(torch.zeros(queries, dim), requires_grad=False)
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, max(1, dim // 128))
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(B, rows*cols, kv_dim) patch features -> (B, queries, dim)."""
        keys_pos = _sincos_cached(self.dim, rows, cols).to(features.device, features.dtype)
        kv = self.ln_kv(self.kv_proj(features)).permute(1, 0, 2)  # L, B, D
        q = self.ln_q(self.query)
        q = q.unsqueeze(1).repeat(1, kv.shape[1], 1) + self.pos_embed.unsqueeze(1)
        out = self.attn(q, kv + keys_pos.unsqueeze(1), kv, need_weights=False)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


# ---------------------------------------------------------------------------------------
# language model (MiniCPM-2.4B)
# ---------------------------------------------------------------------------------------


class MiniCPMRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MiniCPMRotary(nn.Module):
    def __init__(self, config: MiniCPMV2Config) -> None:
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (config.rope_theta_value ** (torch.arange(0, dim, 2).float() / dim))
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, L, head_dim) computed in float32 and rounded to the activations' dtype, as the original."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class MiniCPMAttention(nn.Module):
    def __init__(self, config: MiniCPMV2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Any,
                cache: Cache | None, **kwargs: Any) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rope)
        # rotation in float32, as the original does even for bf16 weights
        q32, k32 = q.float(), k.float()
        q = (q32 * cos + _rotate_half(q32) * sin).to(q.dtype)
        k = (k32 * cos + _rotate_half(k32) * sin).to(k.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_attention)
        out, _ = attention(self, q, k, v, mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*x.shape[:-1], -1).contiguous())


def _eager_attention(module: MiniCPMAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any,
                     scaling: float, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    groups = module.num_key_value_groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    weights = torch.matmul(q, k.transpose(2, 3)) * scaling
    if mask is not None:
        weights = weights + mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights


class MiniCPMMLP(nn.Module):
    def __init__(self, config: MiniCPMV2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        if config.hidden_act != "silu":
            raise NotImplementedError(f"MiniCPM-V 2.0 port: activation {config.hidden_act!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MiniCPMDecoderLayer(nn.Module):
    def __init__(self, config: MiniCPMV2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MiniCPMAttention(config, layer_idx)
        self.mlp = MiniCPMMLP(config)
        self.input_layernorm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.branch_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Any,
                cache: Cache | None, **kwargs: Any) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, **kwargs) * self.branch_scale
        return x + self.mlp(self.post_attention_layernorm(x)) * self.branch_scale


class MiniCPMModel(nn.Module):
    def __init__(self, config: MiniCPMV2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MiniCPMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)


class MiniCPMCausalLM(nn.Module):
    """Holds the decoder and its head under the original names (`llm.model`, `llm.lm_head`)."""

    def __init__(self, config: MiniCPMV2Config) -> None:
        super().__init__()
        self.model = MiniCPMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


# ---------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------


def encode_slices(vpm: VisionTower, resampler: Resampler, slices: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, query_num, hidden) image embeddings of N normalised (3, H, W) slices, in order.

    Slices of the same size go through the tower together (the slices of a page share one
    size, the overview has its own). Shared by the transformers port and the vLLM class
    (`vllm_model.py`), so both see the very same features.
    """
    out: list[torch.Tensor | None] = [None] * len(slices)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(slices):
        groups.setdefault(tuple(s.shape[-2:]), []).append(i)
    dtype = vpm.pos_embed.dtype
    for (h, w), members in groups.items():
        batch = torch.stack([slices[i] for i in members]).to(vpm.pos_embed.device, dtype)
        rows, cols = math.ceil(h / vpm.spec.patch), math.ceil(w / vpm.spec.patch)
        embedded = resampler(vpm(batch), rows, cols)
        for j, i in enumerate(members):
            out[i] = embedded[j]
    return torch.stack(out)  # type: ignore[arg-type]


def unpack_slices(pixel_values: torch.Tensor, tile_sizes: torch.Tensor | Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """A page's slices, (3, H, W) each, from their values packed channel-first as (3, sum H*W)."""
    flat = pixel_values.reshape(3, -1)
    slices, offset = [], 0
    for h, w in (tuple(int(v) for v in hw) for hw in tile_sizes):
        slices.append(flat[:, offset : offset + h * w].reshape(3, h, w))
        offset += h * w
    if offset != flat.shape[1]:
        raise ValueError(f"pixel values hold {flat.shape[1]} pixels, the slice sizes {offset}")
    return slices


def image_positions(input_ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """Boolean mask of the positions strictly between an `<image>` and the next `</image>`."""
    opened = torch.cumsum((input_ids == start_id).long(), dim=-1)
    closed = torch.cumsum((input_ids == end_id).long(), dim=-1)
    return (opened > closed) & (input_ids != start_id)


class MiniCPMV2PreTrainedModel(PreTrainedModel):
    config_class = MiniCPMV2Config
    config: MiniCPMV2Config
    base_model_prefix = "minicpmv"
    main_input_name = "input_ids"
    _no_split_modules = ["MiniCPMDecoderLayer", "VisionBlock", "Resampler"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MiniCPMRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, nn.MultiheadAttention):
            init.normal_(module.in_proj_weight, mean=0.0, std=std)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, VisionTower):
            init.normal_(module.pos_embed, mean=0.0, std=std)
        elif isinstance(module, Resampler):
            init.normal_(module.query, mean=0.0, std=std)
            init.normal_(module.proj, mean=0.0, std=module.dim**-0.5)
            init.copy_(module.pos_embed, _sincos_cached(module.dim, module.side, module.side))
        elif isinstance(module, MiniCPMRotary):
            dim = self.config.hidden_size // self.config.num_attention_heads
            theta = self.config.rope_theta_value
            init.copy_(module.inv_freq, 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim)))


class MiniCPMV2ForConditionalGeneration(MiniCPMV2PreTrainedModel, GenerationMixin):
    """MiniCPM-V 2.0 with the original state-dict keys (`llm.*`, `vpm.*`, `resampler.*`)."""

    def __init__(self, config: MiniCPMV2Config) -> None:
        super().__init__(config)
        spec = vision_spec(config)
        keep = spec.depth - 1 if config.drop_vision_last_layer else spec.depth
        # registered in input-to-output order, so that a sequential device map puts the vision side first
        self.vpm = VisionTower(spec, keep)
        self.resampler = Resampler(config.query_num, config.hidden_size, spec.width)
        self.llm = MiniCPMCausalLM(config)
        self.rotary = MiniCPMRotary(config)
        self.post_init()

    # ---- embeddings --------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.llm.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.llm.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.llm.lm_head

    # ---- images --------------------------------------------------------------------------
    def encode_images(self, slices: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N, query_num, hidden) image embeddings of N normalised (3, H, W) slices, in order."""
        return encode_slices(self.vpm, self.resampler, slices)

    def encode_packed(self, pixel_values: torch.Tensor, tile_sizes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Image embeddings (N*query_num, hidden) of a page's slices packed channel-first as (3, sum H*W)."""
        embedded = self.encode_images(unpack_slices(pixel_values, tile_sizes))
        return embedded.reshape(-1, embedded.shape[-1])

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        tile_sizes: torch.Tensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> Any:
        """Logits for `input_ids` (or `inputs_embeds`).

        `image_features` (every placeholder of the batch, row-major) or `pixel_values` +
        `tile_sizes` (one page, packed as `encode_packed` takes them) fill the positions
        between `<image>` and `</image>` at prefill; later decode steps carry none.
        """
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.llm.model.embed_tokens(input_ids) * self.config.scale_emb
            if image_features is None and pixel_values is not None:
                if tile_sizes is None:
                    raise ValueError("pixel_values need tile_sizes")
                image_features = self.encode_packed(pixel_values, tile_sizes)
            if image_features is not None:
                inputs_embeds = self._place_images(input_ids, attention_mask, inputs_embeds, image_features)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        mask = causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        rope = self.rotary(inputs_embeds, position_ids)
        hidden = inputs_embeds
        for layer in self.llm.model.layers:
            hidden = layer(hidden, rope, mask, cache)
        hidden = self.llm.model.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.llm.lm_head(hidden / (self.config.hidden_size / self.config.dim_model_base)).float()
        return lm_output(logits, cache if use_cache else None)

    def _place_images(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        slots = image_positions(input_ids, self.config.im_start_token_id, self.config.im_end_token_id)
        if attention_mask is not None and attention_mask.dim() == 2:
            slots &= attention_mask.bool()
        if not bool(slots.any()):  # a decode step: the images are already in the cache
            return embeds
        features = features.reshape(-1, embeds.shape[-1])
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"{int(slots.sum())} image placeholders but {features.shape[0]} image embeddings")
        return embeds.masked_scatter(slots.unsqueeze(-1).to(embeds.device), features.to(embeds.device, embeds.dtype))

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs: Any) -> tuple:
        """Beam search copies each row `expand_size` times; the image features (one flat run of
        every row's placeholders, row-major) are copied row by row to stay with their rows."""
        features = model_kwargs.pop("image_features", None)
        if expand_size > 1 and input_ids is not None and features is None and model_kwargs.get("pixel_values") is not None:
            features = self.encode_packed(model_kwargs.pop("pixel_values"), model_kwargs.pop("tile_sizes"))
        if expand_size > 1 and features is not None and input_ids is not None:
            slots = image_positions(input_ids, self.config.im_start_token_id, self.config.im_end_token_id)
            mask = model_kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                slots &= mask.bool()
            rows = features.reshape(-1, features.shape[-1]).split(slots.sum(1).tolist())
            features = torch.cat([row for row in rows for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        if features is not None:
            model_kwargs["image_features"] = features
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(self, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any) -> dict:
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration:
            for key in ("image_features", "pixel_values", "tile_sizes"):
                inputs.pop(key, None)
        return inputs


def meta_model(config: MiniCPMV2Config) -> MiniCPMV2ForConditionalGeneration:
    """The model without weights (for device maps)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return MiniCPMV2ForConditionalGeneration(config)


def load_model(folder: str | Path, *, dtype: torch.dtype = torch.float32, device_map: dict[str, int] | None = None,
               attn_implementation: str = "sdpa") -> MiniCPMV2ForConditionalGeneration:
    """The checkpoint in `folder` (safetensors only; none of its code runs), in eval mode;
    refused when its weights are not exactly the official layout's."""
    return load_strict(MiniCPMV2ForConditionalGeneration, folder, load_config(folder), dtype=dtype,
                       device_map=device_map, attn_implementation=attn_implementation, layout="MiniCPM-V 2.0")
