"""MiniCPM-V 2.0 (openbmb/MiniCPM-V-2), ported natively to transformers 5.

The checkpoint ships remote code for transformers 4.36/4.37 that does not import on 5.x;
this module rebuilds the same computation from the official `config.json` and weights,
without executing any file of the checkpoint:

* vision: SigLIP-so400m as timm builds it (`vpm.*`: patch_embed, pos_embed, blocks, norm),
  its last block dropped (`drop_vision_last_layer`), position embeddings resized bicubic
  with antialias to each slice's patch grid, exact GELU;
* resampler (`resampler.*`): `query_num` learned queries, one cross-attention with
  `hidden_size // 128` heads, keys offset by 2-D sin-cos embeddings of the slice's grid;
* language model (`llm.model.*`, `llm.lm_head.*`): MiniCPM-2.4B, a Llama-like decoder with
  embeddings scaled by `scale_emb`, residual branches by `scale_depth / sqrt(layers)` and
  the final hidden state divided by `hidden_size / dim_model_base` before the head;
* input: LLaVA-UHD slicing as the checkpoint's image processor does it (the overview image
  first, then the slices row-major, 64 `<unk>` placeholders each inside `<image>...</image>`,
  slices wrapped in `<slice>...</slice>` one grid row per line), the prompt as the official
  `chat()` builds it (`<用户>` + image + question + `<AI>`, ONE `<AI>`: openbmb's
  modeling_minicpmv.py and its fine-tuning format; the fork's later processing code appends a
  second one, which the official checkpoint never saw), tokenised with the ORIGINAL slow
  sentencepiece rule (`SentencePieceTokenizer`).

Placeholders are found as the original finds them, by position between `<image>` and
`</image>`, never by id: the placeholder id (`<unk>`, 0) is also the pad id.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pipeline.inference.adapters import (
    CHART,
    DESCRIPTION,
    OCR,
    CodedPixels,
    InputBuilder,
    PageFeatures,
    PreparedPage,
    input_device,
)
from pipeline.inference.families import load_strict
from pipeline.inference.generation import GenerationSettings
from pipeline.records import PageImage, TilePlan

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

NAME = "minicpm_v2"
MODEL_TYPES: tuple[str, ...] = ("minicpmv",)
ARCHITECTURES: tuple[str, ...] = ("MiniCPMV",)
TILING_POLICY = "minicpm"
# vision tower, resampler and token embeddings meet at the input: keep them together on the first GPU
FIRST_DEVICE: tuple[str, ...] = ("vpm", "resampler", "llm.model.embed_tokens")
LAST_DEVICE: tuple[str, ...] = ("llm.model.norm", "llm.lm_head")

# Its deterministic chat(sampling=False): 3 beams, repetition_penalty 1.2 (its published scores' setting)
GENERATION_DEFAULTS = GenerationSettings(num_beams=3, repetition_penalty=1.2)

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
        """(N, query_num, hidden) image embeddings of N normalised (3, H, W) slices, in order.

        Slices of the same size go through the tower together (the slices of a page share
        one size, the overview has its own).
        """
        out: list[torch.Tensor | None] = [None] * len(slices)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(slices):
            groups.setdefault(tuple(s.shape[-2:]), []).append(i)
        dtype = self.vpm.pos_embed.dtype
        for (h, w), members in groups.items():
            batch = torch.stack([slices[i] for i in members]).to(self.vpm.pos_embed.device, dtype)
            rows, cols = math.ceil(h / self.vpm.spec.patch), math.ceil(w / self.vpm.spec.patch)
            embedded = self.resampler(self.vpm(batch), rows, cols)
            for j, i in enumerate(members):
                out[i] = embedded[j]
        return torch.stack(out)  # type: ignore[arg-type]

    def encode_packed(self, pixel_values: torch.Tensor, tile_sizes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Image embeddings (N*query_num, hidden) of a page's slices packed channel-first as (3, sum H*W)."""
        flat = pixel_values.reshape(3, -1)
        slices, offset = [], 0
        for h, w in (tuple(int(v) for v in hw) for hw in tile_sizes):
            slices.append(flat[:, offset : offset + h * w].reshape(3, h, w))
            offset += h * w
        if offset != flat.shape[1]:
            raise ValueError(f"pixel values hold {flat.shape[1]} pixels, the slice sizes {offset}")
        embedded = self.encode_images(slices)
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
    ) -> CausalLMOutputWithPast:
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
        mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
            position_ids=position_ids,
        )
        rope = self.rotary(inputs_embeds, position_ids)
        hidden = inputs_embeds
        for layer in self.llm.model.layers:
            hidden = layer(hidden, rope, mask, cache)
        hidden = self.llm.model.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.llm.lm_head(hidden / (self.config.hidden_size / self.config.dim_model_base)).float()
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

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


def load_model(folder: str | Path, *, dtype: Any = torch.float32, device_map: Any = None,
               attn_implementation: str = "sdpa") -> MiniCPMV2ForConditionalGeneration:
    """The checkpoint in `folder` (safetensors only; none of its code runs), in eval mode;
    refused when its weights are not exactly the official layout's."""
    return load_strict(MiniCPMV2ForConditionalGeneration, folder, load_config(folder), dtype=dtype,
                       device_map=device_map, attn_implementation=attn_implementation, layout="MiniCPM-V 2.0")


# ---------------------------------------------------------------------------------------
# tokenizer: the original slow sentencepiece rule
# ---------------------------------------------------------------------------------------

_DEFAULT_ADDED = {0: "<unk>", 1: "<s>", 2: "</s>", 101: "<image>", 102: "</image>", 103: "<ref>", 104: "</ref>",
                  105: "<box>", 106: "</box>", 107: "<quad>", 108: "</quad>", 109: "<point>", 110: "</point>",
                  111: "<slice>", 112: "</slice>"}


def _content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, Mapping) else value


class SentencePieceTokenizer:
    """The checkpoint's tokenizer.model, giving the ids of the original slow (legacy) tokenizer.

    That tokenizer cuts the text at its added tokens (`<unk>`, `<s>`, `</s>`, `<image>`,
    ..., `</slice>`: never split, never stripped) and hands every piece in between to
    sentencepiece on its own, so each piece gets sentencepiece's dummy-prefix space (the
    `<用户>` at the start becomes "▁", "<用户>"). A fast tokenizer converted from the same
    model differs exactly there. Decoding follows the slow tokenizer too. Picklable.
    """

    padding_side = "left"
    chat_template = None

    def __init__(self, model_proto: bytes, added_tokens: Mapping[int, str], *, bos_token: str = "<s>",
                 eos_token: str = "</s>", unk_token: str = "<unk>", pad_token: str | None = "<unk>",
                 special_tokens: Sequence[str] = (), add_bos_token: bool = True) -> None:
        self.model_proto = bytes(model_proto)
        self.added_tokens = {int(k): str(v) for k, v in added_tokens.items()}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.add_bos_token = add_bos_token
        self.special_tokens = frozenset(t for t in (bos_token, eos_token, unk_token, pad_token, *special_tokens) if t)
        self._setup()

    def _setup(self) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.model_proto)
        self._added_ids = {text: i for i, text in self.added_tokens.items()}
        for text in self.special_tokens:
            self._added_ids.setdefault(text, self._sp.piece_to_id(text))
        ordered = sorted(self._added_ids, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")")
        self.special_ids = frozenset(self._added_ids[t] for t in self.special_tokens)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    @classmethod
    def from_folder(cls, folder: str | Path) -> SentencePieceTokenizer:
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if config.get("legacy") is False:
            raise NotImplementedError("MiniCPM-V 2.0 port: only the legacy sentencepiece rule (legacy=true) is ported")
        added = {int(i): _content(v) for i, v in (config.get("added_tokens_decoder") or {}).items()} or _DEFAULT_ADDED
        extra = [_content(t) for t in config.get("additional_special_tokens") or ()]
        return cls(
            (folder / "tokenizer.model").read_bytes(),
            added,
            bos_token=_content(config.get("bos_token", "<s>")),
            eos_token=_content(config.get("eos_token", "</s>")),
            unk_token=_content(config.get("unk_token", "<unk>")),
            pad_token=_content(config.get("pad_token", "<unk>")),
            special_tokens=[t for t in extra if t],
            add_bos_token=bool(config.get("add_bos_token", True)),
        )

    # ---- ids -------------------------------------------------------------------------------
    def token_id(self, token: str) -> int:
        return self._added_ids[token] if token in self._added_ids else self._sp.piece_to_id(token)

    @property
    def bos_token_id(self) -> int:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def unk_token_id(self) -> int:
        return self.token_id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_id(self.pad_token)

    def __len__(self) -> int:
        return max(self._sp.get_piece_size(), max(self.added_tokens, default=-1) + 1)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        vocab.update(self._added_ids)
        return vocab

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        return self.token_id(tokens) if isinstance(tokens, str) else [self.token_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        def one(i: int) -> str:
            return self.added_tokens.get(int(i)) or self._sp.id_to_piece(int(i))

        return one(ids) if isinstance(ids, int) else [one(i) for i in ids]

    # ---- encode / decode -----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        for part in self._splitter.split(text):
            if not part:
                continue
            if part in self._added_ids:
                ids.append(self._added_ids[part])
            else:
                ids.extend(self._sp.encode(part))
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def decode(self, ids: Any, skip_special_tokens: bool = False, **_: Any) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ([ids] if isinstance(ids, int) else ids)]
        pieces = [self.convert_ids_to_tokens(i) for i in ids if not (skip_special_tokens and i in self.special_ids)]
        if not pieces:
            return ""
        if pieces[0].startswith(SPIECE_UNDERLINE):  # the dummy prefix the encoder added
            pieces[0] = pieces[0][1:]
        text, run, after_special = "", [], False
        for k, piece in enumerate(pieces):
            if piece in self.special_tokens:
                if not after_special and k:
                    text += " "
                text += self._sp.decode_pieces(run) + piece
                run, after_special = [], True
            else:
                run.append(piece)
                after_special = False
        return text + self._sp.decode_pieces(run)

    def batch_decode(self, rows: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens, **kwargs) for r in rows]


def load_tokenizer(folder: str | Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.from_folder(folder)


# ---------------------------------------------------------------------------------------
# input builder
# ---------------------------------------------------------------------------------------


def image_text(plan: TilePlan) -> str:
    """The placeholder text the original processor puts where the image goes.

    `<image>` + 64 `<unk>` + `</image>` for the overview; when sliced, `<slice>`, one line
    per grid row of such blocks, `</slice>`; then a newline.
    """
    block = IMAGE_START + IMAGE_PLACEHOLDER * plan.tokens_per_tile + IMAGE_END
    if not plan.thumbnail:
        return block + "\n"
    rows = "\n".join(block * plan.cols for _ in range(plan.rows))
    return block + SLICE_START + rows + SLICE_END + "\n"


def chat_text(question: str, plan: TilePlan) -> str:
    """The prompt of the official chat(): `<用户>` + image placeholder + "\n" + question + `<AI>` (one)."""
    return USER_TAG + image_text(plan) + question + ASSISTANT_TAG


def _pixel_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) float32: the normalised value of every uint8 level, with the processor's float32 ops
    (x / 255, minus mean, over std)."""
    levels = np.arange(256, dtype=np.float32) / 255
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((levels[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)


class MiniCPMV2Builder(InputBuilder):
    """Pages -> MiniCPM-V 2.0 inputs: LLaVA-UHD slices (overview first), the chat() prompt.

    Slices of one page have two sizes (overview, grid slices), so the pixel values are
    packed as uint8 codes of shape (1, 1, sum H*W, 3) (`CodedPixels`), with the slice
    sizes in `image_inputs["tile_sizes"]`; `encode_page` unpacks them on the device.
    """

    family = NAME
    # 2: one <AI>, as the official chat() (1 had the fork's processor's second <AI>)
    chat_format = "2"
    generation_defaults = GENERATION_DEFAULTS

    def __init__(self, tokenizer: SentencePieceTokenizer, model_config: MiniCPMV2Config, *,
                 tasks: Sequence[str] = (DESCRIPTION, OCR, CHART), chart_questions: Sequence[str] = (),
                 max_slices: int | None = None, scale_resolution: int | None = None,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        self.tokenizer = tokenizer
        self.image_processor = None
        self.tasks = tuple(tasks)
        self.chart_questions = tuple(chart_questions)
        self.chat_template = None
        self.max_slices = int(max_slices if max_slices is not None else model_config.max_slice_nums)
        self.scale_resolution = int(scale_resolution if scale_resolution is not None else model_config.scale_resolution)
        self.patch_size = int(model_config.patch_size)
        self.tokens_per_tile = int(model_config.query_num)
        self.im_start_id = int(model_config.im_start_token_id)
        self.im_end_id = int(model_config.im_end_token_id)
        self.image_token_id = tokenizer.unk_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else 0)
        self.table = _pixel_table(mean, std)

    def plan(self, width: int, height: int) -> TilePlan:
        from pipeline import tiling

        return tiling.plan_minicpm(width, height, max_slices=self.max_slices, scale_resolution=self.scale_resolution,
                                   patch_size=self.patch_size, tokens_per_tile=self.tokens_per_tile)

    def slices(self, image: "Image.Image", plan: TilePlan, thumbnail: "Image.Image | None" = None) -> list["Image.Image"]:
        """The images the model sees, in its order: the overview (when sliced) then the slices row-major."""
        from PIL import Image

        from pipeline import tiling

        tiles = tiling.cut_tiles(image, plan, Image.Resampling.BICUBIC, thumbnail=thumbnail)
        return [tiles[-1], *tiles[:-1]] if plan.thumbnail else tiles

    def pixels(self, image: "Image.Image", plan: TilePlan, thumbnail: "Image.Image | None" = None
               ) -> tuple[CodedPixels, dict[str, np.ndarray]]:
        images = self.slices(image, plan, thumbnail)
        arrays = [np.asarray(im.convert("RGB") if im.mode != "RGB" else im) for im in images]
        sizes = np.asarray([a.shape[:2] for a in arrays], dtype=np.int64)
        codes = np.concatenate([a.reshape(-1, 3) for a in arrays])[None, None]
        return CodedPixels(codes=np.ascontiguousarray(codes), table=self.table), {"tile_sizes": sizes}

    def image_text(self, plan: TilePlan) -> str:
        return image_text(plan)

    def chat_text(self, prompt: str, plan: TilePlan) -> str:
        return chat_text(prompt, plan)

    def encode_text(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), dtype=np.int64)

    def penalty_start_ids(self) -> tuple[int, ...]:
        """The original generates from embeddings: its penalised ids are a dummy `<s>` and the answer."""
        return (self.tokenizer.bos_token_id,)

    def decode_answer(self, tokens: Sequence[int]) -> str:
        """As the original's `_decode_text`: pad/`<unk>` ids dropped, special tokens KEPT (its `<ref>`,
        `<box>`, `<quad>`, `<point>` grounding tags are part of the answer)."""
        return self.tokenizer.decode([int(t) for t in tokens if int(t) != 0]).strip()

    def placeholder_count(self, ids: np.ndarray) -> int:
        opened = np.cumsum(ids == self.im_start_id)
        closed = np.cumsum(ids == self.im_end_id)
        return int(((opened > closed) & (ids != self.im_start_id)).sum())

    def build(self, page: PageImage, plan: TilePlan) -> PreparedPage:
        from pipeline.inference.adapters import _rgb

        pixel_values, image_inputs = self.pixels(_rgb(page.image), plan, thumbnail=page.thumbnail)
        prompt_ids = {key: self.encode_text(self.chat_text(p, plan)) for key, p in self.task_prompts(page.text).items()}
        counts = {self.placeholder_count(ids) for ids in prompt_ids.values()}
        if counts and counts != {plan.visual_tokens}:
            raise ValueError(f"prompt holds {sorted(counts)} image tokens, the plan says {plan.visual_tokens}")
        return PreparedPage(
            doc_id=page.doc_id, uri=page.uri, page_number=page.page_number, kind=page.kind, text=page.text,
            plan=plan, family=self.family, pixels=pixel_values, image_inputs=image_inputs, prompts=prompt_ids,
            image_tokens=plan.visual_tokens,
        )

    def encode_page(self, model: Any, page: PreparedPage) -> PageFeatures:
        pixel_values = page.pixel_tensor(input_device(model), model.dtype)
        return PageFeatures(model.encode_packed(pixel_values, page.image_inputs["tile_sizes"]))

    def feature_inputs(self, model: Any, feats: Sequence[PageFeatures], input_ids: torch.Tensor) -> dict[str, Any]:
        return {"image_features": torch.cat([f.features for f in feats])}

    def naive_inputs(self, prepared: PreparedPage, key: str, device: Any) -> dict[str, Any]:
        ids = torch.from_numpy(prepared.prompts[key])[None].to(device)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": prepared.pixel_tensor(device),
            "tile_sizes": torch.from_numpy(prepared.image_inputs["tile_sizes"]),
        }


def load_builder(folder: str | Path, model_config: MiniCPMV2Config | None = None, *,
                 tasks: Sequence[str] = (DESCRIPTION, OCR, CHART), chart_questions: Sequence[str] = (),
                 **tiling_overrides: Any) -> MiniCPMV2Builder:
    """The builder for the checkpoint in `folder` (tokenizer + slicing settings, no weights).

    `tiling_overrides`: `max_slices` (`max_tiles` is accepted for it) and
    `scale_resolution`; None keeps the checkpoint's own (preprocessor_config.json, then
    config.json).
    """
    folder = Path(folder)
    config = model_config if model_config is not None else load_config(folder)
    pre_path = folder / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    max_slices = tiling_overrides.get("max_slices", tiling_overrides.get("max_tiles"))
    scale = tiling_overrides.get("scale_resolution")
    return MiniCPMV2Builder(
        load_tokenizer(folder), config, tasks=tasks, chart_questions=chart_questions,
        max_slices=max_slices if max_slices is not None else pre.get("max_slice_nums"),
        scale_resolution=scale if scale is not None else pre.get("scale_resolution"),
        mean=pre.get("norm_mean", (0.5, 0.5, 0.5)), std=pre.get("norm_std", (0.5, 0.5, 0.5)),
    )


# ---------------------------------------------------------------------------------------
# tiny checkpoint (tests, smoke runs)
# ---------------------------------------------------------------------------------------

_RESERVED = [f"<reserved_{i}>" for i in range(3, 101)]  # the real vocabulary's ids 3..100
_SPECIALS = [_DEFAULT_ADDED[i] for i in range(101, 113)]
_WORDS = ("describe the page image text chart table figure what is shown in this picture please answer "
          "yes no question read all of it title revenue costs grew fell region north south east west "
          "a an and or to for with on at by from as is are was were be has have report quarter percent "
          "图 片 描 述 这 是 什 么 你 好 答").split()


def _train_tiny_sentencepiece(path: Path, seed: int, vocab_size: int = 512) -> None:
    """A tiny BPE sentencepiece model laid out like the real one: <unk> 0, <s> 1, </s> 2, reserved
    3..100, <image> 101 ... </slice> 112, then <用户> and <AI>, byte fallback, "\n" kept."""
    import io
    import random

    import sentencepiece

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list(_WORDS) + ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) + rng.choice(("", "\n", "?", ".")) for _ in range(3000)]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, user_defined_symbols=_RESERVED + _SPECIALS + [USER_TAG, ASSISTANT_TAG],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )
    path.write_bytes(buffer.getvalue())


def tiny_config_dict(vocab_size: int = 512) -> dict[str, Any]:
    """The official config.json of MiniCPM-V 2.0 with tiny sizes and a `vision_config` for the small tower."""
    return {
        "_name_or_path": "openbmb/MiniCPM-V-2",
        "architectures": list(ARCHITECTURES),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dim_model_base": 32,
        "drop_vision_last_layer": True,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 256,  # the resampler has hidden_size // 128 heads
        "image_size": 448,
        "initializer_range": 0.3,
        "intermediate_size": 512,
        "max_position_embeddings": 4096,
        "max_slice_nums": 9,
        "mm_use_im_start_end": True,
        "model_type": MODEL_TYPES[0],
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "patch_size": 14,
        "pretraining_tp": 1,
        "query_num": 64,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "scale_depth": 1.4,
        "scale_emb": 12,
        "scale_resolution": 448,
        "slice_mode": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.36.0",
        "use_cache": True,
        "vision_encoder": "vit_so400m_patch14_siglip_384.webli",
        "vision_config": {"hidden_size": 64, "intermediate_size": 239, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "patch_size": 14, "image_size": 384},
        "vocab_size": vocab_size,
    }


def _tokenizer_files() -> dict[str, Any]:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in sorted(_DEFAULT_ADDED.items())}
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "additional_special_tokens": _SPECIALS, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": True, "pad_token": "<unk>", "padding_side": "right", "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "MiniCPMVTokenizer", "unk_token": "<unk>",
    }
    plain = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {"additional_special_tokens": _SPECIALS, "bos_token": {"content": "<s>", **plain},
                   "eos_token": {"content": "</s>", **plain}, "pad_token": "<unk>",
                   "unk_token": {"content": "<unk>", **plain}}
    preprocessor = {"image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
                    "max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14, "image_feature_size": 64,
                    "im_start": IMAGE_START, "im_end": IMAGE_END, "slice_start": SLICE_START, "slice_end": SLICE_END,
                    "unk": IMAGE_PLACEHOLDER, "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5]}
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special_map,
            "preprocessor_config.json": preprocessor,
            "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.0"}}


def make_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """A few-MB MiniCPM-V 2.0 folder in the official layout (random weights, tiny sentencepiece model)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _train_tiny_sentencepiece(directory / "tokenizer.model", seed)
    raw = tiny_config_dict()
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    for name, content in _tokenizer_files().items():
        (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False))
    config = MiniCPMV2Config.from_dict(raw)
    torch.manual_seed(seed)
    model = MiniCPMV2ForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms away from 1/0 so that their weights matter in tests
        for name, param in model.named_parameters():
            if re.search(r"norm|ln_", name):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


__all__ = [
    "ARCHITECTURES",
    "FIRST_DEVICE",
    "LAST_DEVICE",
    "MODEL_TYPES",
    "NAME",
    "TILING_POLICY",
    "MiniCPMV2Builder",
    "MiniCPMV2Config",
    "MiniCPMV2ForConditionalGeneration",
    "SentencePieceTokenizer",
    "chat_text",
    "image_text",
    "load_builder",
    "load_config",
    "load_model",
    "load_tokenizer",
    "make_tiny_model",
    "meta_model",
    "recognise",
    "vision_spec",
]
