"""mono_internvl: Mono-InternVL-2B as a vLLM model (docpipe's architecture `DocpipeMonoInternVL`).

Imported by vLLM only (the string form in `vllm.py`). Weights load under the official names
(`vision_model.embeddings.*`, `mlp1.{0,1,3}`, `language_model.model.*`,
`language_model.output.weight`); an unknown key is an error and vLLM reports a missing one.

* Language model (InternLM2 with visual experts) from vLLM's layers: `wqkv` as a
  column-parallel fused QKV projection (the checkpoint's packing, per key-value group its
  query heads then its key and value head, is unpacked into q, k, v once at loading, so
  tensor parallelism needs no gather at run time), row-parallel `wo`, both feed-forward
  networks (`feed_forward`, `feed_forward_ve`) as merged column-parallel w1/w3 plus
  row-parallel w2, vLLM's paged `Attention`, RMSNorm, RoPE, vocabulary-parallel embedding
  and head; tensor parallel over `--tensor-parallel-size` GPUs.
* Visual experts as the original routes them: at the prefill the image positions go through
  `feed_forward_ve` and every other position through `feed_forward`; decoded tokens are
  text. vLLM's own mask of the positions that hold image embeddings (`is_multimodal`, given
  to `embed_input_ids` of the same step) selects them, so chunked prefill and prefix-cache
  hits keep the routing (a cached image prefix was computed with the experts).
* Vision side: the transformers port's own modules (patch embedding with resized position
  embeddings, pixel shuffle, `mlp1`), replicated on every rank; a page's features are
  computed once (vLLM's encoder cache) and are those of the port.
* RoPE: plain, with `max_model_len` = max_position_embeddings (`vllm.adapt_config`): the
  original's dynamic NTK scaling only acts on longer sequences.
"""

from __future__ import annotations

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

from pipeline.inference.families.mono_internvl.modeling import MonoVisionModel, image_features, projector
from pipeline.inference.families.vllm_support import (
    CODES,
    TABLE,
    PageDummyInputs,
    PageProcessingInfo,
    PageProcessor,
    decode_pixels,
    items_of,
)


class MonoInternVLProcessingInfo(PageProcessingInfo):
    family = "mono_internvl"

    def page_item(self, image: Any) -> dict[str, torch.Tensor]:
        from pipeline.inference.families.mono_internvl.vllm import page_item

        builder = self.builder
        image = image.convert("RGB") if image.mode != "RGB" else image
        plan = builder.plan(*image.size)
        pixels, _ = builder.pixels(image, plan)
        return page_item(builder, pixels, plan)

    def largest_page(self) -> tuple[int, int]:
        # max_tiles tiles in one row (+ the thumbnail): the most tokens a page can give
        builder = self.builder
        return builder.tile_size * builder.max_tiles, builder.tile_size


# ---------------------------------------------------------------------------------------
# the language model (InternLM2 with visual experts) from vLLM's layers
# ---------------------------------------------------------------------------------------


class InternLM2Attention(nn.Module):
    def __init__(self, config: Any, cache_config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size

        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % tp or (kv_heads % tp and tp % kv_heads):
            raise ValueError(f"Mono-InternVL: {heads} heads / {kv_heads} key-value heads do not split over {tp} GPUs")
        self.head_dim = config.hidden_size // heads
        self.total_heads, self.total_kv_heads = heads, kv_heads
        self.num_heads, self.num_kv_heads = heads // tp, max(1, kv_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.wqkv = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads, bias=config.bias,
                                      quant_config=quant_config, prefix=f"{prefix}.wqkv")
        self.wo = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias=config.bias,
                                    quant_config=quant_config, prefix=f"{prefix}.wo")
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=config.rope_parameters)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.wqkv(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.wo(self.attn(q, k, v))[0]

    def unpack_wqkv(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """The checkpoint's wqkv (weight or bias): per key-value group its query heads, then its
        key head, then its value head -> the q, k, v blocks QKVParallelLinear loads."""
        groups = self.total_heads // self.total_kv_heads
        rest = packed.shape[1:]
        grouped = packed.reshape(self.total_kv_heads, groups + 2, self.head_dim, *rest)
        return {"q": grouped[:, :groups].reshape(-1, *rest), "k": grouped[:, groups].reshape(-1, *rest),
                "v": grouped[:, groups + 1].reshape(-1, *rest)}


class InternLM2MLP(nn.Module):
    def __init__(self, config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"Mono-InternVL: activation {config.hidden_act!r} is not supported")
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.w2 = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                    quant_config=quant_config, prefix=f"{prefix}.w2")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.gate_up_proj(x)[0]))[0]


class InternLM2VEDecoderLayer(nn.Module):
    def __init__(self, config: Any, cache_config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        self.attention = InternLM2Attention(config, cache_config, quant_config, f"{prefix}.attention")
        self.feed_forward = InternLM2MLP(config, quant_config, f"{prefix}.feed_forward")
        self.feed_forward_ve = InternLM2MLP(config, quant_config, f"{prefix}.feed_forward_ve")
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, visual: torch.Tensor | None
                ) -> torch.Tensor:
        """`visual`: a (tokens,) bool mask of the image positions, None when there are none."""
        hidden_states = hidden_states + self.attention(positions, self.attention_norm(hidden_states))
        normed = self.ffn_norm(hidden_states)
        if visual is None:
            return hidden_states + self.feed_forward(normed)
        out = torch.empty_like(normed)
        out[visual] = self.feed_forward_ve(normed[visual])
        text = ~visual
        if bool(text.any()):
            out[text] = self.feed_forward(normed[text])
        return hidden_states + out


class InternLM2VEModel(nn.Module):
    """`language_model.model`: embeddings, decoder layers, final norm."""

    def __init__(self, config: Any, cache_config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        self.tok_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InternLM2VEDecoderLayer(config, cache_config, quant_config, f"{prefix}.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None,
                visual: torch.Tensor | None) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden, visual)
        return self.norm(hidden)


class InternLM2VELM(nn.Module):
    """`language_model`: the decoder and its `output` head."""

    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_text_config
        self.model = InternLM2VEModel(config, vllm_config.cache_config, vllm_config.quant_config, f"{prefix}.model")
        self.output = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                     prefix=f"{prefix}.output")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None, visual: torch.Tensor | None = None, **kwargs: Any
                ) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds, visual)


# ---------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------

_MERGED = ((".w1.", ".gate_up_proj.", 0), (".w3.", ".gate_up_proj.", 1))


@MULTIMODAL_REGISTRY.register_processor(PageProcessor, info=MonoInternVLProcessingInfo, dummy_inputs=PageDummyInputs)
class DocpipeMonoInternVL(nn.Module, SupportsMultiModal):
    """Mono-InternVL for vLLM: `vision_model` + `mlp1` (the port's modules), `language_model` (vLLM layers)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_model = MonoVisionModel(config.vision_config)
            self.mlp1 = projector(config)
        with self._mark_language_model(vllm_config):
            self.language_model = InternLM2VELM(vllm_config, prefix="language_model")
        self.logits_processor = LogitsProcessor(config.llm_config.vocab_size)
        self._visual: torch.Tensor | None = None  # this step's image positions (embed_input_ids -> forward)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return None  # prompts come as token ids with the placeholders expanded (docpipe's builder)

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        """One (tiles * tokens_per_tile, hidden) tensor per page, rows in placeholder order."""
        device = self.mlp1[1].weight.device
        out = []
        for codes, table in zip(items_of(kwargs.get(CODES)), items_of(kwargs.get(TABLE)), strict=True):
            features = image_features(self.vision_model, self.mlp1, decode_pixels(codes, table, device), self.config)
            out.append(features.reshape(-1, features.shape[-1]))
        return out

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        # the positions that take image embeddings are the ones the visual experts see in forward()
        visual = None
        if is_multimodal is not None and multimodal_embeddings is not None and len(multimodal_embeddings):
            visual = is_multimodal.to(device=input_ids.device, dtype=torch.bool)
        self._visual = visual if visual is not None and bool(visual.any()) else None
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        visual, self._visual = self._visual, None
        tokens = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        if visual is not None and visual.shape[0] != tokens:  # not this step's (a profiling run)
            visual = None
        return self.language_model(input_ids, positions, inputs_embeds=inputs_embeds, visual=visual)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.language_model.output, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The official keys; an unknown key is an error (vLLM reports a missing one)."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()

        def param_of(name: str, source: str) -> nn.Parameter:
            if name not in params:
                raise ValueError(f"Mono-InternVL: checkpoint weight {source} has no place in the model")
            loaded.add(name)
            return params[name]

        for name, tensor in weights:
            if ".attention.wqkv." in name:
                param = param_of(name, name)
                attention = modules[name.rsplit(".wqkv.", 1)[0]]
                for shard, block in attention.unpack_wqkv(tensor).items():
                    param.weight_loader(param, block, shard)
                continue
            for source, target, shard in _MERGED:
                if name.startswith("language_model.") and source in name:
                    param = param_of(name.replace(source, target), name)
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                param = param_of(name, name)
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        return loaded
