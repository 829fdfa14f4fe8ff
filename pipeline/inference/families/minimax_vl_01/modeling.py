"""minimax_vl_01: the model: modules under the official weight names, loading. See the package docstring."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, GenerationMixin, MiniMaxConfig
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llava_next.modeling_llava_next import unpad_image
from transformers.models.minimax import modeling_minimax as native

from pipeline.inference.families import load_strict
from pipeline.inference.families.compat import cache_kwargs, lm_output, output_cache
from pipeline.inference.families.minimax_vl_01.configuration import (
    FIRST_DEVICE,
    LAST_DEVICE,
    MiniMaxVL01Config,
    load_config,
)
from pipeline.tiling import MiniMaxTilePlan

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
        elif seq_len > 1:  # a prompt continued after a cached one (a task after its page's shared prefix)
            out, state = self._prefill(q, k, v, slope, state)
        else:
            out, state = self._decode(q, k, v, slope, state)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.num_attention_heads * self.head_dim)
        out = self.norm(out)
        out = F.sigmoid(self.output_gate(hidden_states)) * out
        out = self.out_proj(out)
        if cache is not None:
            cache.set_linear_cache(self.layer_idx, state)
        return out, state

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                 state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Blockwise over `n` tokens from the recurrent `state` (zeros: the start of the sequence);
        a state carried in is decayed into each block exactly as one from an earlier block."""
        block = self.block_size
        batch, heads, n, dim = q.shape
        steps = torch.arange(block, device=q.device, dtype=torch.float32) + 1
        q_decay = torch.exp(-slope * steps.reshape(-1, 1))
        k_decay = torch.exp(-slope * (block - steps.reshape(-1, 1)))
        offset = steps[:, None] - steps[None, :]
        diag_decay = torch.exp(torch.where(offset >= 0, -slope * offset[None, None], float("-inf")))
        if state is None:
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

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None, use_cache: bool | None = False,
                past_key_values: Cache | None = None, **kwargs: Any) -> torch.Tensor:
        cache = cache if cache is not None else past_key_values  # 5.19's MiniMaxModel passes past_key_values
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

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search's reorder, the lightning states included (the native cache reorders only
        the softmax layers, so each beam would go on with another beam's linear-attention state)."""
        super().reorder_cache(beam_idx)
        for i, state in enumerate(self.linear_cache):
            if isinstance(state, torch.Tensor):
                self.linear_cache[i] = state.index_select(0, beam_idx.to(state.device))


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
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> Any:
        """Logits; at the prefill the `<image>` positions of `input_ids` take `image_features`
        (every placeholder of the batch, in order), or the features of `pixel_values` (one
        tensor per page, thumbnail first) cut as `image_plans` say; later steps ignore them.
        (`past_key_values`: the cache's name in transformers 5.19, families.compat.)"""
        cache = cache if cache is not None else past_key_values
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
            use_cache=use_cache, **cache_kwargs(cache),
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.language_model.lm_head(hidden).float()
        return lm_output(logits, output_cache(out) if use_cache else None)

    def prepare_inputs_for_generation(self, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any) -> dict:
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("image_features", "pixel_values", "image_plans"):
                inputs.pop(key, None)
        return inputs


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
    dtype: torch.dtype,
    device_map: dict[str, int] | None = None,
    attn_implementation: str = "sdpa",
) -> MiniMaxVL01ForConditionalGeneration:
    """Weights from the folder's safetensors (no remote code), in eval mode.

    Raises if a weight is missing or one is left over: the keys must be the official ones.
    """
    model = load_strict(MiniMaxVL01ForConditionalGeneration, folder, load_config(folder), dtype=dtype,
                        device_map=device_map, attn_implementation=attn_implementation, layout="MiniMax-VL-01")
    return model.eval()
