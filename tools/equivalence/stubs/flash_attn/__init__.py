"""A CPU stand-in for the flash-attn package, for running original remote code that calls it
(MiniMax-Text-01's softmax-attention layers) on a machine without CUDA. Only for
tools/equivalence: never imported by the pipeline.

Plain causal attention with the softmax in float32 and the output in the inputs' dtype, the
causal mask aligned bottom-right (flash-attn >= 2.1); heads of k/v repeated for grouped queries.
Flash attention's own tiling rounds differently in bf16, so a bf16 comparison through this stub
carries a little of that difference.
"""

from __future__ import annotations

import torch

__version__ = "2.6.3"  # what it stands in for


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool) -> torch.Tensor:
    """q (s, h, d), k/v (t, hk, d) -> (s, h, d)."""
    s, h, d = q.shape
    t, hk, _ = k.shape
    if hk != h:
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    scale = d**-0.5 if scale is None else scale
    scores = torch.einsum("shd,thd->hst", q.float(), k.float()) * scale
    if causal:
        allowed = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(diagonal=t - s)
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("hst,thd->shd", weights, v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    """(b, s, h, d) inputs."""
    if window_size not in ((-1, -1), None) and max(window_size) >= 0:
        raise NotImplementedError("sliding windows are not stood in for")
    return torch.stack([_attend(q[i], k[i], v[i], softmax_scale, causal) for i in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    """(total, h, d) inputs, sequences delimited by the cumulative lengths."""
    if window_size not in ((-1, -1), None) and max(window_size) >= 0:
        raise NotImplementedError("sliding windows are not stood in for")
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        out[cq[i] : cq[i + 1]] = _attend(q[cq[i] : cq[i + 1]], k[ck[i] : ck[i + 1]], v[ck[i] : ck[i + 1]],
                                         softmax_scale, causal)
    return out
