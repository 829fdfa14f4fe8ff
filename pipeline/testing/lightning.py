"""Lightning attention by its definition, in float64: the ground truth for precision checks.

One MiniMax-Text-01 lightning-attention layer, written from the formula rather than from any
implementation: qkv = act(x Wqkv^T) split per head; o_t = sum_{s <= t} exp(-slope (t - s))
(q_t . k_s) v_s; then RMSNorm over all heads, a sigmoid output gate and the output projection.
Imports torch only, so the reference harness's venv can load it too (tools/equivalence).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def lightning_fp64(x: torch.Tensor, weights: Mapping[str, torch.Tensor], slope: torch.Tensor, heads: int,
                   eps: float = 1e-6) -> torch.Tensor:
    """(batch, n, hidden) -> (batch, n, hidden) in float64. `weights`: qkv_proj, output_gate,
    out_proj (Linear weights) and norm (RMSNorm weight); `slope`: (heads, 1, 1) decay rates."""
    x = x.double()
    w = {k: v.double() for k, v in weights.items()}
    batch, n, _ = x.shape
    qkv = F.silu(x @ w["qkv_proj"].T).reshape(batch, n, heads, -1)
    q, k, v = (t.transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    t = torch.arange(n, dtype=torch.float64)
    gap = t[:, None] - t[None, :]
    decay = torch.where(gap >= 0, torch.exp(-slope.double() * gap), torch.zeros((), dtype=torch.float64))
    out = ((q @ k.transpose(-1, -2)) * decay) @ v
    out = out.transpose(1, 2).reshape(batch, n, -1)
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps) * w["norm"]
    return (torch.sigmoid(x @ w["output_gate"].T) * out) @ w["out_proj"].T


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    """||got - truth|| / ||truth|| (Frobenius), in float64."""
    return float((got.double() - truth).norm() / truth.norm())


def random_layer(hidden: int, heads: int, head_dim: int, tokens: int, seed: int = 0
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """bf16 input (1, tokens, hidden) and bf16 layer weights, drawn in a fixed order from `seed`
    (the same in any venv, whatever the module's own parameter order)."""
    g = torch.Generator().manual_seed(seed)
    width = heads * head_dim
    weights = {
        "qkv_proj": torch.randn(3 * width, hidden, generator=g) * 0.1,
        "output_gate": torch.randn(width, hidden, generator=g) * 0.1,
        "out_proj": torch.randn(hidden, width, generator=g) * 0.1,
        "norm": 1.0 + torch.randn(width, generator=g) * 0.1,
    }
    x = torch.randn(1, tokens, hidden, generator=g)
    return x.to(torch.bfloat16), {k: v.to(torch.bfloat16) for k, v in weights.items()}


def layer_errors(x: torch.Tensor, weights: dict[str, torch.Tensor], heads: int, head_dim: int, layers: int,
                 layer_idx: int, decode: int, layer_class: type | None = None) -> tuple[float, float]:
    """Relative errors against `lightning_fp64` of MiniMax-VL-01's lightning layer (or `layer_class`, a
    transformers-`minimax`-style class) in the weights' dtype: prefill of all of `x`, and decoding its
    last `decode` tokens one at a time after a prefill of the rest."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    from pipeline.inference.families import minimax_vl_01 as fam

    config = fam.text_config_from_official({
        "hidden_size": x.shape[-1], "num_attention_heads": heads, "head_dim": head_dim,
        "num_hidden_layers": layers, "attn_type_list": [0] * layers, "hidden_act": "silu",
        "intermediate_size": 8, "num_local_experts": 2, "num_key_value_heads": 2, "vocab_size": 8})
    layer = (layer_class or fam.MiniMaxVL01LightningAttention)(config, layer_idx).eval().to(x.dtype)
    with torch.no_grad():
        for name, w in weights.items():
            getattr(layer, name).weight.copy_(w)
    slope = fam.MiniMaxVL01LightningAttention.slope_rate(layer, "cpu") if layer_class is None else \
        fam.MiniMaxVL01LightningAttention.slope_rate(fam.MiniMaxVL01LightningAttention(config, layer_idx), "cpu")
    truth = lightning_fp64(x, weights, slope, heads)
    with torch.inference_mode():
        prefill = layer(x, None, None)[0]
        cache = MiniMaxCache()
        layer(x[:, :-decode], None, None, cache=cache)
        steps = [layer(x[:, i : i + 1], None, None, cache=cache)[0] for i in range(x.shape[1] - decode, x.shape[1])]
    return relative_error(prefill, truth), relative_error(torch.cat(steps, 1), truth[:, -decode:])
