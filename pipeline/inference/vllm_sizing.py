"""How a model is laid out for the vLLM engine on N GPUs, from its config alone (`docpipe devices`).

vLLM splits the language model over `--tensor-parallel-size` GPUs (every layer cut across
them; a mixture of experts may instead place whole experts per GPU: expert parallel), keeps
the vision side whole on each, and gives what is left of `--gpu-memory-utilization` of each
GPU to its paged KV cache. So, unlike the transformers engine's accelerate map (whole layers
per GPU, one GPU at a time), the question is the smallest tensor-parallel size whose weights
leave room for the cache, and how many such instances the GPUs hold (data parallel: one
docpipe worker per instance). Pure arithmetic on a weightless (meta) model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# the smallest share of a GPU's vLLM memory left for the KV cache before a larger split is chosen
MIN_CACHE_SHARE = 0.1
SEQUENCE_TOKENS = 4096  # a request of the sizing's "sequences in flight": a page's image, prompt and answer


@dataclass(frozen=True)
class VllmSizing:
    tensor_parallel: int
    instances: int  # gpus // tensor_parallel: one docpipe worker each
    expert_parallel: bool
    weights_per_gpu: int  # bytes
    cache_room_per_gpu: int  # bytes of KV cache (util * memory - weights), before vLLM's activation peak
    kv_bytes_per_token: int  # per GPU, all softmax-attention layers
    attention_layers: int  # layers with a KV cache
    linear_layers: int  # layers with a fixed per-sequence state instead (MiniMax's lightning attention)
    state_bytes_per_sequence: int  # per GPU, those layers' state
    fits: bool

    @property
    def cache_tokens(self) -> int:
        return self.cache_room_per_gpu // self.kv_bytes_per_token if self.kv_bytes_per_token else 0

    def flags(self) -> str:
        flags = f"--engine vllm --tensor-parallel-size {self.tensor_parallel}"
        return flags + (" (expert parallel for the MoE layers: set by docpipe)" if self.expert_parallel else "")

    def lines(self, gpus: int, gpu_memory: int, utilization: float) -> list[str]:
        mib, gib = 2**20, 2**30
        out = [f"vLLM: {self.flags()}"]
        if not self.fits:
            out.append(f"  does not fit: {self.weights_per_gpu / gib:.2f} GiB of weights per GPU even split {gpus} "
                       f"ways, {utilization:.0%} of {gpu_memory / gib:.2f} GiB usable")
            return out
        where = "one instance over all GPUs" if self.instances == 1 else (
            f"{self.instances} instances of {self.tensor_parallel} GPU(s): run one docpipe worker per instance")
        out.append(f"  {where}; {self.weights_per_gpu / gib:.2f} GiB of weights per GPU "
                   f"(language model split {self.tensor_parallel} way(s), vision side whole on each)")
        state = (f"; the {self.linear_layers} linear-attention layers keep {self.state_bytes_per_sequence / mib:.1f} "
                 f"MiB a sequence instead" if self.linear_layers else "")
        out.append(f"  KV cache: {self.kv_bytes_per_token / 1024:.1f} KiB per token per GPU "
                   f"({self.attention_layers} attention layers{state})")
        out.append(f"  room for it at --gpu-memory-utilization {utilization:g}: {self.cache_room_per_gpu / gib:.2f} GiB "
                   f"per GPU, about {self.cache_tokens:,} tokens or {self.sequences():,} sequences of "
                   f"{SEQUENCE_TOKENS:,} tokens in flight (less vLLM's activation peak, measured at start)")
        return out

    def sequences(self, tokens: int = 0) -> int:
        """Sequences of `tokens` (SEQUENCE_TOKENS: a page's prompt and answer) the cache room holds."""
        each = (tokens or SEQUENCE_TOKENS) * self.kv_bytes_per_token + self.state_bytes_per_sequence
        return self.cache_room_per_gpu // each if each else 0


def _divides(heads: int, kv_heads: int, tp: int) -> bool:
    return heads % tp == 0 and (kv_heads % tp == 0 or tp % kv_heads == 0)


def size_for_vllm(model: Any, text_config: Any, *, gpus: int, gpu_memory: int, utilization: float,
                  weight_bytes: float, replicated: Sequence[str], kv_bytes: int = 2) -> VllmSizing:
    """The smallest tensor-parallel size (a power of two up to `gpus` that splits the heads)
    whose weights leave at least MIN_CACHE_SHARE of the usable memory for the KV cache; the
    largest one if none does. `replicated`: module prefixes vLLM keeps whole on every GPU
    (the vision side). `weight_bytes`: bytes per weight (2 for bf16, ~1 for int8/fp8)."""
    total = sum(p.numel() for p in model.parameters())
    whole = sum(p.numel() for n, p in model.named_parameters() if any(n == r or n.startswith(r + ".") for r in replicated))
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    kinds = list(getattr(text_config, "layer_types", None) or [])
    layers = int(text_config.num_hidden_layers)
    linear = sum(1 for k in kinds if "linear" in str(k))
    attention = layers - linear
    experts = int(getattr(text_config, "num_local_experts", 0) or getattr(text_config, "num_experts", 0) or 0)
    usable = int(gpu_memory * utilization)
    candidates = [t for t in (1, 2, 4, 8, 16, 32) if t <= gpus and _divides(heads, kv_heads, t)] or [1]
    def weights_at(tp: int) -> int:
        return int(((total - whole) / tp + whole) * weight_bytes)

    # the smallest split leaving MIN_CACHE_SHARE for the cache; else the largest one, if it leaves any
    tp = next((t for t in candidates if usable - weights_at(t) >= MIN_CACHE_SHARE * usable), candidates[-1])
    weights = weights_at(tp)
    kv_per_gpu = max(1, kv_heads // tp)
    kv_token = attention * 2 * kv_per_gpu * head_dim * kv_bytes
    state = linear * max(1, heads // tp) * head_dim * head_dim * 4  # fp32 (heads, d, d) per layer
    return VllmSizing(
        tensor_parallel=tp, instances=max(1, gpus // tp), expert_parallel=experts > 1 and tp > 1,
        weights_per_gpu=weights, cache_room_per_gpu=max(0, usable - weights), kv_bytes_per_token=kv_token,
        attention_layers=attention, linear_layers=linear, state_bytes_per_sequence=state, fits=weights < usable,
    )


__all__ = ["MIN_CACHE_SHARE", "SEQUENCE_TOKENS", "VllmSizing", "size_for_vllm"]
