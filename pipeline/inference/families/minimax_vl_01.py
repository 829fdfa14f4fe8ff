"""MiniMax-VL-01 (MiniMaxAI/MiniMax-VL-01) ported natively to transformers 5.

The checkpoint ships remote code (`MiniMaxVL01ForConditionalGeneration`, a CLIP ViT + a
two-layer MLP projector + MiniMax-Text-01); that code is not public here, so this port
follows the facts stated by vLLM 0.23.0's port (`vllm/model_executor/models/
minimax_vl_01.py` + `minimax_text_01.py`) and by the model's own processor:

* vision: transformers' `CLIPVisionModel` under `vision_tower.vision_model.*`, the output of
  layer `vision_feature_layer` (no post layernorm: the checkpoint has none), class token
  dropped (`vision_feature_select_strategy="default"`);
* projector `multi_modal_projector.linear_1 -> gelu -> linear_2` (biases), `image_newline`;
* LLM: transformers' native `minimax` pieces (lightning attention, softmax attention, RMSNorm,
  the decoder-layer arithmetic), composed so the keys are the official ones
  (`language_model.model.layers.N.block_sparse_moe.experts.E.w1|w2|w3`, `...gate`), with two
  things the native class does not do: rotary embedding on the first `rotary_dim` channels of
  each head only (MiniMax-Text-01 rotates 64 of 128; the native class rotates all) and the
  lightning-attention decay tables kept out of the state dict (they are derived);
* anyres: the pinpoint with the best effective resolution, the page resized keeping its
  aspect ratio (bicubic) and centred on black padding, 336 px tiles row-major, a plain
  336x336 thumbnail FIRST, CLIP mean/std; features: the thumbnail's 576 first, then the
  tiles' features with the padding rows/columns cut away (LLaVA-NeXT `unpad_image`) and
  `image_newline` after every row. A page costs `(w_num + 1) * h_num + 576` image tokens,
  `w_num` x `h_num` being the unpadded feature grid (the processor's `get_num_token`).
* chat: `<beginning_of_sentence>system ai_setting=assistant\\n...<end_of_sentence>\\n`,
  `<beginning_of_sentence>user name=user\\n<image>...question<end_of_sentence>\\n`,
  `<beginning_of_sentence>ai name=assistant\\n`; generation stops at `<end_of_sentence>`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationMixin,
    MiniMaxConfig,
    PretrainedConfig,
)
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llava_next.modeling_llava_next import unpad_image
from transformers.models.minimax import modeling_minimax as native
from transformers.utils.deprecation import deprecate_kwarg

from pipeline.inference.adapters import (
    CodedPixels,
    InputBuilder,
    PageFeatures,
    PreparedPage,
    UnsupportedModelError,
    input_device,
)
from pipeline.inference.families import load_strict
from pipeline.records import TileBox, TilePlan

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

NAME = "minimax_vl_01"
MODEL_TYPES: tuple[str, ...] = ("minimax_vl_01",)
ARCHITECTURES: tuple[str, ...] = ("MiniMaxVL01ForConditionalGeneration",)
TILING_POLICY = "minimax"
FIRST_DEVICE: tuple[str, ...] = (
    "vision_tower",
    "multi_modal_projector",
    "image_newline",
    "language_model.model.embed_tokens",
    "language_model.model.rotary_emb",
)
LAST_DEVICE: tuple[str, ...] = ("language_model.model.norm", "language_model.lm_head")

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
# page geometry: the processor's anyres rule
# ---------------------------------------------------------------------------------------


def best_canvas(width: int, height: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (width, height) pinpoint the processor picks: the largest effective resolution
    (the image scaled to fit, never above its own pixels), then the least wasted area;
    the first in list order on a full tie."""
    best, best_effective, best_wasted = None, -1, math.inf
    for cw, ch in pinpoints:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cw * ch - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cw), int(ch)), effective, wasted
    if best is None:
        raise ValueError("no pinpoints")
    return best


def unpadded_grid(width: int, height: int, grid_w: int, grid_h: int) -> tuple[int, int]:
    """(w_num, h_num): the part of a grid_w x grid_h feature grid that holds the page, the
    centred padding bands removed (integer arithmetic, as the processor counts it)."""
    if width * grid_h > height * grid_w:  # wider than the canvas: bands above and below
        content = height * grid_w // width
        return grid_w, grid_h - 2 * ((grid_h - content) // 2)
    content = width * grid_h // height
    return grid_w - 2 * ((grid_w - content) // 2), grid_h


def keep_ratio_size(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): the page resized into the canvas keeping its aspect
    ratio, pasted centred (the processor's keepratio_resize)."""
    if width * canvas_h > height * canvas_w:
        new_h = int(canvas_w * height / width)
        return canvas_w, new_h, 0, (canvas_h - new_h) // 2
    new_w = int(canvas_h * width / height)
    return new_w, canvas_h, (canvas_w - new_w) // 2, 0


@dataclass(frozen=True, slots=True)
class MiniMaxTilePlan(TilePlan):
    """A TilePlan with the anyres facts the token count needs.

    The page is resized to (content_width, content_height), pasted at (left, top) on a
    black resized_width x resized_height canvas and cut into `boxes`; the thumbnail is
    the whole page stretched to thumbnail_size. Image tokens are not tiles x tokens:
    the thumbnail's grid_side^2, then (w_num + 1) * h_num for the unpadded tile grid.
    """

    image_width: int = 0
    image_height: int = 0
    content_width: int = 0
    content_height: int = 0
    left: int = 0
    top: int = 0
    w_num: int = 0
    h_num: int = 0
    base_tokens: int = 0

    @property
    def visual_tokens(self) -> int:
        return (self.w_num + 1) * self.h_num + self.base_tokens


def plan_anyres(width: int, height: int, pinpoints: Sequence[Sequence[int]], tile: int = 336,
                patch: int = 14) -> MiniMaxTilePlan:
    """MiniMax-VL-01's plan for a width x height image (pixels)."""
    if width < 1 or height < 1:
        raise ValueError(f"page size must be positive whole pixels, got {width!r} x {height!r}")
    cw, ch = best_canvas(width, height, pinpoints)
    cols, rows = cw // tile, ch // tile
    side = tile // patch
    w_num, h_num = unpadded_grid(width, height, cw // patch, ch // patch)
    new_w, new_h, left, top = keep_ratio_size(width, height, cw, ch)
    boxes = tuple(TileBox(c * tile, r * tile, (c + 1) * tile, (r + 1) * tile) for r in range(rows) for c in range(cols))
    return MiniMaxTilePlan(
        policy="minimax", cols=cols, rows=rows, tile_width=tile, tile_height=tile, resized_width=cw,
        resized_height=ch, boxes=boxes, thumbnail=True, thumbnail_size=(tile, tile), tokens_per_tile=side * side,
        image_width=width, image_height=height, content_width=new_w, content_height=new_h, left=left, top=top,
        w_num=w_num, h_num=h_num, base_tokens=side * side,
    )


def cut_page(image: "Image.Image", plan: MiniMaxTilePlan, thumbnail: "Image.Image | None" = None) -> list["Image.Image"]:
    """[thumbnail, tile 0, tile 1, ...] as the processor makes them (bicubic, black padding)."""
    from PIL import Image

    bicubic = Image.Resampling.BICUBIC
    image = image if image.mode == "RGB" else image.convert("RGB")
    thumb_size = plan.thumbnail_size or (plan.tile_width, plan.tile_height)
    if thumbnail is not None and thumbnail.size == thumb_size:
        thumb = thumbnail if thumbnail.mode == "RGB" else thumbnail.convert("RGB")
    else:
        thumb = image.resize(thumb_size, bicubic)
    canvas = Image.new("RGB", (plan.resized_width, plan.resized_height), (0, 0, 0))
    canvas.paste(image.resize((plan.content_width, plan.content_height), bicubic), (plan.left, plan.top))
    return [thumb] + [canvas.crop(box.as_tuple()) for box in plan.boxes]


def pixel_table(mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """(3, 256) float32: torchvision's ToTensor (x / 255 in float32) then Normalize."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((levels[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------------------
# the language model: native MiniMax pieces under the official names
# ---------------------------------------------------------------------------------------


class MiniMaxVL01RotaryEmbedding(native.MiniMaxRotaryEmbedding):
    """RoPE over the first rotary_dim channels of a head (head_dim * partial_rotary_factor)."""

    @staticmethod
    def compute_default_rope_parameters(config: MiniMaxConfig, **kwargs: Any) -> tuple[torch.Tensor, float]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        base = config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin in float32 whatever the model's dtype (the original's tables are float32)."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def rotate_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first `cos.shape[-1]` channels of each head, computed in float32 (the original's
    cos/sin are float32 and promote the product) and cast back to the input's dtype."""
    rot = cos.shape[-1]
    x_rot = x[..., :rot].float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = x_rot * cos + native.rotate_half(x_rot) * sin
    return torch.cat((rotated, x[..., rot:].float()), dim=-1).to(x.dtype)


class MiniMaxVL01Attention(native.MiniMaxAttention):
    """Softmax attention whose RoPE touches only the first rotary_dim channels (neox style)."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Cache | None = None, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = rotate_partial(q, cos, sin), rotate_partial(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, native.eager_attention_forward
        )
        out, weights = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                              sliding_window=getattr(self.config, "sliding_window", None),
                              **{k_: v_ for k_, v_ in kwargs.items() if k_ not in ("use_cache", "position_ids")})
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


LIGHTNING_BLOCK = 256  # the original's block length (a constant there; config.block_size is not read)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """(heads, 1, 1) float32: the ALiBi slopes the original builds (`_build_slope_tensor`), with its
    rule for a head count that is not a power of two."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    def slopes(n: int) -> list[float]:
        if math.log2(n).is_integer():
            return power_of_2(n)
        closest = 2 ** math.floor(math.log2(n))
        return power_of_2(closest) + slopes(2 * closest)[0::2][: n - closest]

    return torch.tensor(slopes(num_heads), dtype=torch.float32).reshape(num_heads, 1, 1)


class MiniMaxVL01LightningAttention(native.MiniMaxLightningAttention):
    """Lightning attention computed as MiniMax-Text-01's remote code computes it, in any dtype:
    the slopes and the decay tables in float32 (derived on the fly, never weights and never cast
    with the model), the recurrent KV state in float32, the intra-block products (Q K^T decayed,
    times V) and the inter-block term in float32, 256-token blocks. Only what the original does in
    the model's dtype stays there: the projections, Q K^T itself, each block's K^T V increment and,
    in decoding, the state read-out (the state cast to the model's dtype). transformers' native
    class keeps all of it in the model's dtype (bf16: ~2 % relative error per layer at 16k tokens
    against fp64, the original ~0.2 %)."""

    def __init__(self, config: MiniMaxConfig, layer_idx: int) -> None:
        nn.Module.__init__(self)
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_attention_heads = config.num_attention_heads
        self.num_hidden_layers = config.num_hidden_layers
        self.block_size = LIGHTNING_BLOCK
        self.act_fn = ACT2FN[config.hidden_act]
        self.norm = native.MiniMaxRMSNorm(self.head_dim * self.num_attention_heads)
        self.qkv_proj = nn.Linear(config.hidden_size, self.num_attention_heads * self.head_dim * 3, bias=False)
        self.out_proj = nn.Linear(self.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        self.output_gate = nn.Linear(config.hidden_size, self.num_attention_heads * self.head_dim, bias=False)
        self.layer_type = config.layer_types[layer_idx]

    def slope_rate(self, device: Any) -> torch.Tensor:
        """(heads, 1, 1) float32: the ALiBi slopes scaled down with depth, as the original
        (`1 - idx / (layers - 1) + 1e-5`; transformers' native class puts the 1e-5 inside the division)."""
        factor = 1 - self.layer_idx / max(self.num_hidden_layers - 1, 1) + 1e-5
        return alibi_slopes(self.num_attention_heads).to(device) * factor

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any, attention_mask: Any,
                cache: Cache | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq_len, _ = hidden_states.shape
        qkv = self.act_fn(self.qkv_proj(hidden_states))
        qkv = native.apply_mask_to_padding_states(qkv, attention_mask)
        qkv = qkv.reshape(batch, seq_len, self.num_attention_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in torch.split(qkv, self.head_dim, dim=3))
        slope = self.slope_rate(q.device)
        state = cache.get_linear_cache(self.layer_idx) if cache is not None else None
        if state is None or (isinstance(state, list) and not state):
            out, state = self._prefill(q, k, v, slope)
        else:
            out, state = self._decode(q, k, v, slope, state)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.num_attention_heads * self.head_dim)
        out = self.norm(out)
        out = F.sigmoid(self.output_gate(hidden_states)) * out
        out = self.out_proj(out)
        if cache is not None:
            cache.set_linear_cache(self.layer_idx, state)
        return out, state

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.block_size
        batch, heads, n, dim = q.shape
        steps = torch.arange(block, device=q.device, dtype=torch.float32) + 1
        q_decay = torch.exp(-slope * steps.reshape(-1, 1))
        k_decay = torch.exp(-slope * (block - steps.reshape(-1, 1)))
        offset = steps[:, None] - steps[None, :]
        diag_decay = torch.exp(torch.where(offset >= 0, -slope * offset[None, None], float("-inf")))
        state = torch.zeros(batch, heads, dim, v.shape[-1], dtype=torch.float32, device=q.device)
        out = torch.empty(batch, heads, n, v.shape[-1], dtype=q.dtype, device=q.device)
        for start in range(0, n, block):
            end = min(start + block, n)
            m = end - start
            qi, ki, vi = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
            inter = torch.matmul(qi * q_decay[:, :m], state)
            scores = torch.matmul(qi, ki.transpose(-1, -2)).float() * diag_decay[:, :, :m, :m]
            intra = torch.matmul(scores, vi.float())
            out[:, :, start:end] = inter + intra
            increment = torch.matmul((ki * k_decay[:, -m:]).transpose(-1, -2).to(vi.dtype), vi)
            state = torch.exp(-slope * m) * state + increment
        return out, state

    @staticmethod
    def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, state: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = torch.exp(-slope)
        outs = []
        for i in range(q.shape[2]):
            state = ratio * state + torch.matmul(k[:, :, i : i + 1].transpose(-1, -2), v[:, :, i : i + 1])
            outs.append(torch.matmul(q[:, :, i : i + 1], state.to(q.dtype)))
        return torch.cat(outs, dim=-2), state


class MiniMaxVL01SparseMoe(nn.Module):
    """`block_sparse_moe`: a softmax router (`gate` in the model's dtype, softmax in float32, as the
    original remote code; vLLM runs the gate in float32) choosing top-k
    experts, weights renormalised; expert = w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: MiniMaxConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(MiniMaxVL01Expert(config) for _ in range(config.num_local_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in torch.unique(chosen).tolist():
            rows, slot = torch.where(chosen == e)
            out[rows] += self.experts[e](x[rows]) * weights[rows, slot, None]  # a token meets an expert once
        return out.reshape(shape)


class MiniMaxVL01Expert(nn.Module):
    def __init__(self, config: MiniMaxConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class MiniMaxVL01DecoderLayer(native.MiniMaxDecoderLayer):
    """The native decoder layer (postnorm residuals scaled by alpha/beta) with the MoE under
    its official name `block_sparse_moe`."""

    def __init__(self, config: MiniMaxConfig, layer_idx: int) -> None:
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.block_type = config.layer_types[layer_idx]
        self.input_layernorm = native.MiniMaxRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = native.MiniMaxRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.block_type == "linear_attention":
            self.self_attn = MiniMaxVL01LightningAttention(config, layer_idx)
            self.attn_alpha_factor, self.attn_beta_factor = config.linear_attn_alpha_factor, config.linear_attn_beta_factor
        else:
            self.self_attn = MiniMaxVL01Attention(config, layer_idx)
            self.attn_alpha_factor, self.attn_beta_factor = config.full_attn_alpha_factor, config.full_attn_beta_factor
        self.mlp_alpha_factor, self.mlp_beta_factor = config.mlp_alpha_factor, config.mlp_beta_factor
        self.block_sparse_moe = MiniMaxVL01SparseMoe(config)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None, use_cache: bool | None = False,
                **kwargs: Any) -> torch.Tensor:
        hidden_states = self.input_layernorm(hidden_states)
        residual = hidden_states
        attn, _ = self.self_attn(hidden_states=hidden_states, position_embeddings=position_embeddings,
                                 attention_mask=attention_mask, cache=cache, **kwargs)
        hidden_states = residual * self.attn_alpha_factor + attn * self.attn_beta_factor
        hidden_states = self.post_attention_layernorm(hidden_states)
        residual = hidden_states
        moe = self.block_sparse_moe(hidden_states)
        return residual * self.mlp_alpha_factor + moe * self.mlp_beta_factor


class MiniMaxVL01Cache(native.MiniMaxCache):
    """MiniMaxCache that answers length and mask-size questions from the first softmax
    layer. The native cache creates a plain layer for every index up to the one updated, so
    with MiniMax-01's layout (layer 0 is lightning attention) it would report 0 tokens seen
    at every decode step and build wrong masks for left-padded rows."""

    def __init__(self, full_layer: int = 0) -> None:
        super().__init__()
        self.full_layer = full_layer

    def _index(self, layer_idx: int | None) -> int:
        return self.full_layer if not layer_idx else layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._index(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._index(layer_idx))

    def get_query_offset(self, layer_idx: int = 0) -> Any:
        return super().get_query_offset(self._index(layer_idx))


class MiniMaxVL01TextModel(native.MiniMaxModel):
    """transformers' MiniMaxModel (same forward, same MiniMaxCache) built from the layers above."""

    def __init__(self, config: MiniMaxConfig) -> None:
        native.MiniMaxPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(MiniMaxVL01DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = native.MiniMaxRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MiniMaxVL01RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class MiniMaxVL01LanguageModel(nn.Module):
    """`language_model`: `.model` (the decoder) and `.lm_head`."""

    def __init__(self, config: MiniMaxConfig) -> None:
        super().__init__()
        self.model = MiniMaxVL01TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class MiniMaxVL01VisionTower(nn.Module):
    """`vision_tower.vision_model`: transformers' CLIPVisionModel without its post layernorm
    (the checkpoint has none; the features are taken before it)."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.vision_model = CLIPVisionModel(config)
        self.vision_model.post_layernorm = nn.Identity()

    def forward(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        out = self.vision_model(pixel_values, output_hidden_states=True)
        return out.hidden_states[layer]


class MiniMaxVL01Projector(nn.Module):
    def __init__(self, config: MiniMaxVL01Config) -> None:
        super().__init__()
        bias = bool(config.multimodal_projector_bias)
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class MiniMaxVL01ForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """MiniMax-VL-01 with the official key names (see the module docstring)."""

    config_class = MiniMaxVL01Config
    config: MiniMaxVL01Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["MiniMaxVL01DecoderLayer", "CLIPEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def __init__(self, config: MiniMaxVL01Config) -> None:
        super().__init__(config)
        self.vision_tower = MiniMaxVL01VisionTower(config.vision_config)
        self.multi_modal_projector = MiniMaxVL01Projector(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.language_model = MiniMaxVL01LanguageModel(config.text_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        from transformers import initialization as init

        super()._init_weights(module)
        if module is self:
            std = self.config.text_config.initializer_range
            init.normal_(self.image_newline, mean=0.0, std=std)
        if type(module).__name__ == "CLIPVisionEmbeddings":
            std = self.config.vision_config.initializer_range
            init.normal_(module.class_embedding, mean=0.0, std=std)
            init.normal_(module.patch_embedding.weight, mean=0.0, std=std)
            init.normal_(module.position_embedding.weight, mean=0.0, std=std)
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.language_model.lm_head = value

    # ---- images ---------------------------------------------------------------------------
    def tile_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, T, T) -> (tiles, patches, text hidden): CLIP layer, class token dropped, projector."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        hidden = self.vision_tower(pixel_values.to(dtype), self.config.vision_feature_layer)
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return self.multi_modal_projector(hidden)

    def pack_page(self, features: torch.Tensor, plan: MiniMaxTilePlan) -> torch.Tensor:
        """Thumbnail features, then the tiles' unpadded grid with image_newline after each row."""
        side = self.config.grid_side
        base, tiles = features[0], features[1:]
        grid = tiles.view(plan.rows, plan.cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
        grid = grid.flatten(1, 2).flatten(2, 3)  # (D, rows*side, cols*side)
        grid = unpad_image(grid, (plan.image_height, plan.image_width))
        newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.dtype)
        grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat((base, grid), dim=0)

    def encode_page(self, pixel_values: torch.Tensor, plan: MiniMaxTilePlan) -> torch.Tensor:
        """One page's image embeddings (plan.visual_tokens, text hidden), in prompt order."""
        packed = self.pack_page(self.tile_features(pixel_values), plan)
        if packed.shape[0] != plan.visual_tokens:
            raise ValueError(f"page gives {packed.shape[0]} image features, the plan says {plan.visual_tokens}")
        return packed

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
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
        image_plans: Sequence[MiniMaxTilePlan] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits; at the prefill the `<image>` positions of `input_ids` take `image_features`
        (every placeholder of the batch, in order), or the features of `pixel_values` (one
        tensor per page, thumbnail first) cut as `image_plans` say; later steps ignore them."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill and image_features is None and pixel_values is not None:
            pages = [pixel_values] if isinstance(pixel_values, torch.Tensor) else list(pixel_values)
            if image_plans is None or len(image_plans) != len(pages):
                raise ValueError("pixel_values need one image_plans entry per page")
            image_features = torch.cat([self.encode_page(p, plan) for p, plan in zip(pages, image_plans)])
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            mask = input_ids == self.config.image_token_index
            count = int(mask.sum()) if prefill else 0
            if count or (prefill and image_features is not None):
                if image_features is None:
                    raise ValueError(f"{count} image placeholders but no image_features")
                flat = image_features.reshape(-1, inputs_embeds.shape[-1]).to(inputs_embeds.device, inputs_embeds.dtype)
                if flat.shape[0] != count:
                    raise ValueError(f"{count} image placeholders, {flat.shape[0]} image feature vectors")
                inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], flat)
        if use_cache and cache is None:
            kinds = self.config.text_config.layer_types
            cache = MiniMaxVL01Cache(kinds.index("full_attention") if "full_attention" in kinds else 0)
        out = self.language_model.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.language_model.lm_head(hidden).float()
        return CausalLMOutputWithPast(logits=logits, cache=out.cache if use_cache else None)

    def prepare_inputs_for_generation(self, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any) -> dict:
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("image_features", "pixel_values", "image_plans"):
                inputs.pop(key, None)
        return inputs


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


def meta_model(config: MiniMaxVL01Config) -> MiniMaxVL01ForConditionalGeneration:
    """The model's modules on the meta device (for device maps; no memory, no weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return MiniMaxVL01ForConditionalGeneration(config)


def placement(meta: nn.Module | MiniMaxVL01Config, n_gpus: int) -> dict[str, int]:
    """Module -> GPU as the model card places it: vision tower, projector, image_newline and
    the embeddings on GPU 0, the decoder layers split evenly in order (layer l on GPU
    l * n // L; the card's `l // (L // n)` when n divides L), norm and lm_head on the last."""
    if n_gpus < 1:
        raise ValueError("need at least one GPU")
    config = meta if isinstance(meta, MiniMaxVL01Config) else meta.config
    layers = int(config.text_config.num_hidden_layers)
    last = n_gpus - 1
    out = {name: 0 for name in FIRST_DEVICE}
    out.update({f"language_model.model.layers.{i}": i * n_gpus // layers for i in range(layers)})
    out.update({name: last for name in LAST_DEVICE})
    return out


def load_model(
    folder: str | Path,
    *,
    dtype: Any,
    device_map: Any = None,
    attn_implementation: str = "sdpa",
) -> MiniMaxVL01ForConditionalGeneration:
    """Weights from the folder's safetensors (no remote code), in eval mode.

    Raises if a weight is missing or one is left over: the keys must be the official ones.
    """
    model = load_strict(MiniMaxVL01ForConditionalGeneration, folder, load_config(folder), dtype=dtype,
                        device_map=device_map, attn_implementation=attn_implementation, layout="MiniMax-VL-01")
    return model.eval()


# ---------------------------------------------------------------------------------------
# input builder
# ---------------------------------------------------------------------------------------


# The official tokenizer_config.json's chat template, reduced to system/user/assistant turns
# (the official one adds function-call roles); `chat_text` builds the same string directly.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<beginning_of_sentence>system ai_setting=assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}"
    "{% else %}{{ '<beginning_of_sentence>user name=user\\n' }}{% endif %}"
    "{% for item in message['content'] %}{% if item.type == 'image' %}<image>"
    "{% elif item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}"
    "{{ '<end_of_sentence>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}{% endif %}"
)


def chat_text(question: str, image_tokens: int, system: str | None = DEFAULT_SYSTEM) -> str:
    """The prompt MiniMax-VL-01's chat template gives for [system], user [image, question],
    with the generation prompt, `<image>` expanded as the processor does."""
    text = f"{BOS}system ai_setting=assistant\n{system}{EOS}\n" if system is not None else ""
    text += f"{BOS}user name=user\n{IMAGE_TOKEN * image_tokens}{question}{EOS}\n"
    return text + f"{BOS}ai name=assistant\n"


class MiniMaxVL01Builder(InputBuilder):
    """MiniMax-VL-01 pages: anyres tiles (thumbnail first) and the model's chat format."""

    family = NAME
    placeholder = IMAGE_TOKEN

    def __init__(self, tokenizer: Any, model_config: MiniMaxVL01Config, *, tasks: Sequence[str],
                 chart_questions: Sequence[str] = (), pinpoints: Sequence[Sequence[int]] | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 system: str | None = DEFAULT_SYSTEM) -> None:
        super().__init__(tokenizer, None, model_config, tasks=tasks, chart_questions=chart_questions,
                         chat_template=getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE)
        self.pinpoints = [list(p) for p in (pinpoints or model_config.image_grid_pinpoints)]
        self.tile = int(model_config.tile_size)
        self.patch = int(model_config.vision_config.patch_size)
        self.table = pixel_table(mean, std)
        self.system = system

    def plan(self, width: int, height: int) -> MiniMaxTilePlan:
        return plan_anyres(width, height, self.pinpoints, self.tile, self.patch)

    def pixels(self, image: "Image.Image", plan: TilePlan, thumbnail: "Image.Image | None" = None
               ) -> tuple[CodedPixels, dict[str, np.ndarray]]:
        if not isinstance(plan, MiniMaxTilePlan):
            raise TypeError("MiniMax-VL-01 needs the plan of its own builder")
        tiles = cut_page(image, plan, thumbnail)
        codes = np.stack([np.asarray(t) for t in tiles])
        return CodedPixels(codes=np.ascontiguousarray(codes), table=self.table), {}

    def image_text(self, plan: TilePlan) -> str:
        return IMAGE_TOKEN * plan.visual_tokens

    def chat_text(self, prompt: str, plan: TilePlan) -> str:
        return chat_text(prompt, plan.visual_tokens, self.system)

    def encode_text(self, text: str) -> np.ndarray:
        """The chat text's ids, without the tokenizer's own special tokens: the chat format writes
        every turn's `<beginning_of_sentence>` itself, so the prompt starts with exactly one,
        whether or not the checkpoint's tokenizer.json would add a BOS of its own (the real one is
        not public here; a tokenizer that adds one would otherwise give two)."""
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def encode_page(self, model: Any, page: PreparedPage) -> PageFeatures:
        pixels = page.pixel_tensor(input_device(model))
        return PageFeatures(model.encode_page(pixels, page.plan))

    def feature_inputs(self, model: Any, feats: Sequence[PageFeatures], input_ids: "torch.Tensor") -> dict[str, Any]:
        return {"image_features": torch.cat([f.features for f in feats])}

    def naive_inputs(self, prepared: PreparedPage, key: str, device: Any) -> dict[str, Any]:
        """Inputs for a plain `generate` with raw pixel values, as the model card does."""
        ids = torch.from_numpy(prepared.prompts[key])[None].to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": prepared.pixel_tensor(device), "image_plans": [prepared.plan]}


def load_tokenizer(folder: str | Path) -> Any:
    """The checkpoint's tokenizer.json (a fast byte-level BPE) with its special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def load_builder(folder: str | Path, model_config: MiniMaxVL01Config, *, tasks: Sequence[str],
                 chart_questions: Sequence[str], **tiling_overrides: Any) -> MiniMaxVL01Builder:
    """The input builder (tokenizer + page geometry + chat format; no weights).

    The pinpoints and CLIP mean/std come from preprocessor_config.json when it has them
    (the processor's own copy), else from config.json. MiniMax-VL-01 has no tile-count
    knobs: min_tiles/max_tiles overrides are refused.
    """
    extra = {k: v for k, v in tiling_overrides.items() if v is not None}
    if extra:
        raise ValueError(f"MiniMax-VL-01's anyres grid takes no overrides, got {sorted(extra)}")
    folder = Path(folder)
    pre = _read_json(folder / "preprocessor_config.json")
    pinpoints = parse_pinpoints(pre["image_grid_pinpoints"]) if pre.get("image_grid_pinpoints") else None
    return MiniMaxVL01Builder(
        load_tokenizer(folder), model_config, tasks=tasks, chart_questions=chart_questions, pinpoints=pinpoints,
        mean=tuple(pre.get("image_mean") or CLIP_MEAN), std=tuple(pre.get("image_std") or CLIP_STD),
    )


# ---------------------------------------------------------------------------------------
# tiny checkpoint for tests and smoke runs
# ---------------------------------------------------------------------------------------

# MiniMax-01's special tokens (official ids 200019 / 200020 / 200034 / 200025); here they
# follow the small BPE vocabulary.
SPECIAL_TOKENS = (BOS, EOS, "<begin_of_document>", "<end_of_document>", IMAGE_TOKEN)
TINY_TILE = 56  # 4 x 4 patches of 14 px: 16 features a tile instead of 576, same rules
TINY_INIT_RANGE = 0.3

_TINY_TEXT = (
    "Describe this page: what kind of document it is and what it shows. Transcribe all the text on the page "
    "in reading order. Does this page contain a chart, plot or diagram? Answer yes or no. The quarterly report "
    "shows revenue growth of 12 percent. Invoice number 4711, total amount due 99.50 EUR. Figure 3: temperature "
    "over time; title, axes and units. You are a helpful assistant created by MiniMax based on MiniMax-VL-01 "
    "model. system ai_setting=assistant user name=user ai name=assistant"
)


def make_tiny_tokenizer(directory: Path) -> Any:
    """A byte-level BPE tokenizer.json (as MiniMax-01 ships) + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.inference import prompts

    corpus = [_TINY_TEXT, prompts.description_prompt(), prompts.ocr_prompt(None), prompts.chart_detect_prompt(),
              prompts.chart_question_prompt("What is the highest value?")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": "<end_of_document>",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 40960000,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def tiny_config_dict(vocab_size: int, image_token: int) -> dict[str, Any]:
    """config.json in the official layout (architectures, model_type, legacy text names)."""
    layers = 4
    alpha = (2 * layers) ** 0.25  # the official alphas are (2 * 80) ** 0.25
    pinpoints = [[TINY_TILE * c, TINY_TILE * r] for c in range(1, 7) for r in range(1, 7)]
    return {
        "architectures": list(ARCHITECTURES),
        "auto_map": {"AutoConfig": "configuration_minimax_vl_01.MiniMaxVL01Config",
                     "AutoModelForCausalLM": "modeling_minimax_vl_01.MiniMaxVL01ForConditionalGeneration"},
        "model_type": "minimax_vl_01",
        "ignore_index": -100,
        "image_grid_pinpoints": pinpoints,
        "image_seq_length": (TINY_TILE // 14) ** 2,
        "image_token_index": image_token,
        "process_image_mode": "anyres",
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "torch_dtype": "float32",
        "text_config": {
            "architectures": ["MiniMaxText01ForCausalLM"],
            "model_type": "minimax_text_01",
            "attn_type_list": [0, 1, 0, 1],
            "block_size": 16,
            "head_dim": 8,
            "hidden_act": "silu",
            "hidden_size": 32,
            "initializer_range": TINY_INIT_RANGE,
            "intermediate_size": 24,
            "layernorm_full_attention_alpha": alpha,
            "layernorm_full_attention_beta": 1.0,
            "layernorm_linear_attention_alpha": alpha,
            "layernorm_linear_attention_beta": 1.0,
            "layernorm_mlp_alpha": alpha,
            "layernorm_mlp_beta": 1.0,
            "max_position_embeddings": 8192,
            "num_attention_heads": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": layers,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "postnorm": True,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rotary_dim": 4,
            "shared_intermediate_size": [0],
            "shared_moe_mode": "sigmoid",
            "tie_word_embeddings": False,
            "vocab_size": vocab_size,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_act": "gelu",
            "hidden_size": 16,
            "image_size": TINY_TILE,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 32,
            "layer_norm_eps": 1e-5,
            "num_attention_heads": 2,
            "num_channels": 3,
            "num_hidden_layers": 2,
            "patch_size": 14,
            "projection_dim": 32,
        },
    }


def make_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """A few-kB random MiniMax-VL-01 in the official layout: config.json, model.safetensors
    (official keys), tokenizer.json + tokenizer_config.json, preprocessor_config.json,
    generation_config.json. 56 px tiles instead of 336 (same anyres rules)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tokenizer = make_tiny_tokenizer(directory)
    vocab = len(tokenizer)
    raw = tiny_config_dict(vocab, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    torch.manual_seed(seed)
    model = MiniMaxVL01ForConditionalGeneration(load_config(directory)).eval()
    with torch.no_grad():  # varied greedy outputs need larger weights than the default init
        for name, param in model.named_parameters():
            if name.startswith(("vision_tower", "multi_modal_projector")) and param.ndim > 1:
                param.normal_(0.0, 0.1)
        model.image_newline.normal_(0.0, 1.0)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ImageProcessor",
        "auto_map": {"AutoImageProcessor": "image_processor.ImageProcessor"},
        "size": [TINY_TILE, TINY_TILE],
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "process_image_mode": "anyres",
        "patch_size": 14,
        "image_grid_pinpoints": raw["image_grid_pinpoints"],
    }, indent=2))
    eos = tokenizer.convert_tokens_to_ids(EOS)
    (directory / "generation_config.json").write_text(json.dumps({
        "bos_token_id": tokenizer.convert_tokens_to_ids(BOS), "eos_token_id": eos, "do_sample": False,
    }, indent=2))
    return directory
