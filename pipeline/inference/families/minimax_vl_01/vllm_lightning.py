"""minimax_vl_01: lightning attention as plain PyTorch, in vLLM's layout (the CPU path of the vLLM class).

vLLM's `MiniMaxText01LinearAttention` runs the lightning-attention recurrence with Triton
kernels (`lightning_attention` for a prompt chunk, `linear_decode_forward_triton` for
decoding), which need a GPU. These two functions compute the same recurrence with torch
only, on the layout those kernels use, so `vllm_model.LightningAttention` can swap them in
on a CPU behind the same layer interface:

    o_t = q_t . S_t,   S_t = exp(-slope) S_{t-1} + k_t^T v_t    (per head; S: head_dim x head_dim)

`state` is S after the last token already seen (zeros for a new sequence), the recurrent
KV state vLLM keeps per sequence in its linear-attention cache. Prefill walks the chunk in
blocks of `block` tokens as MiniMax-Text-01's original code does (inside a block the decayed
Q K^T V products, across blocks the state), everything in float32. Imports torch only.
"""

from __future__ import annotations

import torch


def lightning_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, slope: torch.Tensor,
                      block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's chunk: q, k, v (heads, n, head_dim), `state` (heads, head_dim, head_dim) before
    the chunk, `slope` (heads, 1, 1). Returns the output (heads, n, head_dim) and the state after the
    chunk, both float32."""
    q, k, v = q.float(), k.float(), v.float()
    slope = slope.float().to(q.device)
    state = state.float()
    heads, n, _ = q.shape
    steps = torch.arange(1, block + 1, device=q.device, dtype=torch.float32)
    q_decay = torch.exp(-slope * steps[:, None])  # (h, block, 1): query i sees the state decayed i+1 times
    k_decay = torch.exp(-slope * (block - steps[:, None]))  # (h, block, 1): key j decays block-1-j times
    gap = steps[:, None] - steps[None, :]
    diag = torch.exp(torch.where(gap >= 0, -slope * gap, float("-inf")))  # (h, block, block), causal
    out = torch.empty(heads, n, v.shape[-1], dtype=torch.float32, device=q.device)
    for start in range(0, n, block):
        end = min(start + block, n)
        m = end - start
        qi, ki, vi = q[:, start:end], k[:, start:end], v[:, start:end]
        inter = (qi * q_decay[:, :m]) @ state
        intra = ((qi @ ki.transpose(-1, -2)) * diag[:, :m, :m]) @ vi
        out[:, start:end] = inter + intra
        state = torch.exp(-slope * m) * state + (ki * k_decay[:, block - m:]).transpose(-1, -2) @ vi
    return out, state


def lightning_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, slope: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token for each of a batch of sequences: q, k, v (batch, heads, head_dim), `state`
    (batch, heads, head_dim, head_dim). Returns the output (batch, heads, head_dim) and the new
    state, float32."""
    q, k, v = q.float(), k.float(), v.float()
    state = torch.exp(-slope.float().to(q.device)) * state.float() + k[..., :, None] * v[..., None, :]
    return (q[..., None, :] @ state).squeeze(-2), state


__all__ = ["lightning_decode", "lightning_prefill"]
