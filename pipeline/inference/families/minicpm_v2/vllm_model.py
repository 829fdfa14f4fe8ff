"""minicpm_v2: MiniCPM-V 2.0 as a vLLM model (docpipe's architecture `DocpipeMiniCPMV2`).

Imported by vLLM only (the string form in `vllm.py`). Weights load under the official names
(`vpm.*`, `resampler.*`, `llm.model.*`, `llm.lm_head.weight`); a key the model does not
have, or a weight the checkpoint lacks, is an error, as in the transformers port.

* Language model (MiniCPM-2.4B) from vLLM's layers: fused QKV and gate/up projections
  (column parallel), row-parallel output projections, vLLM's paged `Attention` (its KV
  cache, prefix caching, continuous batching), vLLM's RMSNorm, RoPE and vocabulary-parallel
  embedding and head; tensor parallel over `--tensor-parallel-size` GPUs. MiniCPM's
  scalings as the original: embeddings times `scale_emb` (image embeddings are not
  scaled), each residual branch times `scale_depth / sqrt(layers)`, the final hidden state
  divided by `hidden_size / dim_model_base` before the head.
* Vision tower and resampler: the transformers port's own modules
  (`modeling.VisionTower`, `modeling.Resampler`, `modeling.encode_slices`), replicated on
  every rank. They run once per page (vLLM's encoder cache keeps a page's features for
  all its requests), so they are not where the time goes; sharing them keeps the image
  features those of the port, which is checked against the original code.
* Inputs: pages prepared by the family's builder (`vllm.page_item`): coded pixels of the
  overview and slices packed (3, sum H*W) as the transformers engine packs them, decoded
  on the device; one run of `query_num` embeddings per slice, in the prompt's order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.multimodal import MULTIMODAL_REGISTRY

from pipeline.inference.families.minicpm_v2.configuration import vision_spec
from pipeline.inference.families.minicpm_v2.modeling import Resampler, VisionTower, encode_slices, unpack_slices
from pipeline.inference.families.vllm_support import (
    CODES,
    TABLE,
    PageDummyInputs,
    PageProcessingInfo,
    PageProcessor,
    decode_pixels,
    items_of,
)

TILE_SIZES = "tile_sizes"


class MiniCPMV2ProcessingInfo(PageProcessingInfo):
    family = "minicpm_v2"
    extra_fields = (TILE_SIZES,)

    def page_item(self, image: Any) -> dict[str, torch.Tensor]:
        from pipeline.inference.families.minicpm_v2.vllm import page_item

        builder = self.builder
        image = image.convert("RGB") if image.mode != "RGB" else image
        plan = builder.plan(*image.size)
        pixels, image_inputs = builder.pixels(image, plan)
        return page_item(builder, pixels, image_inputs, plan)

    def largest_page(self) -> tuple[int, int]:
        # the most slices: max_slices slices (+ the overview) for a page far above scale_resolution^2
        side = self.builder.scale_resolution * 4
        return side, side


# ---------------------------------------------------------------------------------------
# the language model (MiniCPM-2.4B) from vLLM's layers
# ---------------------------------------------------------------------------------------


class MiniCPMAttention(nn.Module):
    def __init__(self, config: Any, cache_config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size

        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % tp or (kv_heads % tp and tp % kv_heads):
            raise ValueError(f"MiniCPM-V 2.0: {heads} heads / {kv_heads} key-value heads do not split over {tp} GPUs")
        self.head_dim = config.hidden_size // heads
        self.num_heads = heads // tp
        self.num_kv_heads = max(1, kv_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads, bias=config.attention_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias=config.attention_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        # cos/sin in the model's dtype (computed in float32 and rounded, as the original's tables)
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=config.rope_parameters)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # the rotation in float32 (the rounded tables upcast), as the original computes it for bf16 weights
        q32, k32 = self.rotary_emb(positions, q.float(), k.float())
        out = self.attn(q32.to(q.dtype), k32.to(k.dtype), v)
        return self.o_proj(out)[0]


class MiniCPMMLP(nn.Module):
    def __init__(self, config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"MiniCPM-V 2.0: activation {config.hidden_act!r} is not supported")
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)[0]))[0]


class MiniCPMDecoderLayer(nn.Module):
    def __init__(self, config: Any, cache_config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        self.self_attn = MiniCPMAttention(config, cache_config, quant_config, f"{prefix}.self_attn")
        self.mlp = MiniCPMMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.branch_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden_states))
        hidden_states = hidden_states + attn * self.branch_scale
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)) * self.branch_scale


class MiniCPMModel(nn.Module):
    """`llm.model`: embeddings (scaled by scale_emb), decoder layers, final norm."""

    def __init__(self, config: Any, cache_config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        self.scale_emb = float(config.scale_emb)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MiniCPMDecoderLayer(config, cache_config, quant_config, f"{prefix}.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.scale_emb

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)


class MiniCPMLM(nn.Module):
    """`llm`: the decoder and its head (the official `llm.model.*`, `llm.lm_head.weight`)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.model = MiniCPMModel(config, vllm_config.cache_config, vllm_config.quant_config, f"{prefix}.model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}.lm_head")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)


# ---------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------

# checkpoint name fragment -> (parameter fragment, shard) for the fused projections
_STACKED = (
    (".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"), (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1),
)


@MULTIMODAL_REGISTRY.register_processor(PageProcessor, info=MiniCPMV2ProcessingInfo, dummy_inputs=PageDummyInputs)
class DocpipeMiniCPMV2(nn.Module, SupportsMultiModal):
    """MiniCPM-V 2.0 for vLLM: `vpm` + `resampler` (the port's modules) and `llm` (vLLM layers)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        spec = vision_spec(config)
        keep = spec.depth - 1 if config.drop_vision_last_layer else spec.depth
        with self._mark_tower_model(vllm_config, "image"):
            self.vpm = VisionTower(spec, keep)
            self.resampler = Resampler(config.query_num, config.hidden_size, spec.width)
        with self._mark_language_model(vllm_config):
            self.llm = MiniCPMLM(vllm_config, prefix="llm")
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.scale_width = config.hidden_size / config.dim_model_base

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return None  # prompts come as token ids with the placeholders expanded (docpipe's builder)

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        """One (slices * query_num, hidden) tensor per page, rows in placeholder order."""
        device = self.vpm.pos_embed.device
        out = []
        for codes, table, sizes in zip(items_of(kwargs.get(CODES)), items_of(kwargs.get(TABLE)),
                                       items_of(kwargs.get(TILE_SIZES)), strict=True):
            values = decode_pixels(codes.reshape(1, 1, -1, 3), table, device)  # (1, 3, 1, sum H*W)
            embedded = encode_slices(self.vpm, self.resampler, unpack_slices(values, sizes.tolist()))
            out.append(embedded.reshape(-1, embedded.shape[-1]))
        return out

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self.llm(input_ids, positions, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.llm.lm_head, hidden_states / self.scale_width)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The official keys; an unknown key is an error (vLLM reports a missing one)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            for source, target, shard in _STACKED:
                if name.startswith("llm.") and source in name:
                    param = params.get(name.replace(source, target))
                    if param is None:
                        raise ValueError(f"MiniCPM-V 2.0: checkpoint weight {name} has no place in the model")
                    param.weight_loader(param, tensor, shard)
                    loaded.add(name.replace(source, target))
                    break
            else:
                param = params.get(name)
                if param is None:
                    raise ValueError(f"MiniCPM-V 2.0: checkpoint weight {name} has no place in the model")
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        return loaded
