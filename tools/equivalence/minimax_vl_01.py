"""MiniMax-VL-01: this port against vLLM 0.23.0's statement of the model (not in CI).

The original remote code is not public, so the check runs vLLM 0.23.0's own pure-python
pieces (read from its wheel or sdist, not imported as a package: vLLM needs CUDA) beside
this project's module:

1. token count: vLLM's `LlavaNextProcessingInfo._get_num_unpadded_features` + newline
   rows + the 576 thumbnail features, with the grid from transformers'
   `get_anyres_image_grid_shape` (what vLLM's MiniMax processor info calls), against
   `plan_anyres(...).visual_tokens`, over many page sizes and aspect ratios;
2. feature packing: vLLM's `MiniMaxVL01ForConditionalGeneration.pack_image_features` run on
   random projected features, against `pack_page` (exact equality);
3. a softmax-attention layer with MiniMax-Text-01's partial RoPE (64 of 128 channels)
   against vLLM's `RotaryEmbedding.forward_static` + a plain causal softmax;
4. the LLM against transformers' native `minimax` (same weights, full-width RoPE): max |logit diff|.

Usage:
    pip download --no-deps --only-binary :all: vllm==0.23.0 -d /tmp/vllm023   # or the sdist
    unzip -q -o /tmp/vllm023/vllm-0.23.0-*.whl 'vllm/*' -d /tmp/vllm023/src
    python tools/equivalence/minimax_vl_01.py --vllm-src /tmp/vllm023/src
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.inference.families import minimax_vl_01 as fam  # noqa: E402

OFFICIAL_PINS = [[336 * c, 336 * r] for c in range(1, 7) for r in range(1, 7)]


def function_source(path: Path, qualname: str) -> str:
    """The source of `Class.method` or `function` in a file, dedented."""
    tree = ast.parse(path.read_text())
    parts = qualname.split(".")
    nodes = tree.body
    for part in parts:
        node = next(n for n in nodes if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part)
        nodes = getattr(node, "body", [])
    return textwrap.dedent(ast.get_source_segment(path.read_text(), node))


def load_vllm_pieces(src: Path) -> dict:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    models = src / "vllm" / "model_executor" / "models"
    ns: dict = {"torch": torch, "get_anyres_image_grid_shape": get_anyres_image_grid_shape,
                "unpad_image": unpad_image}
    exec(function_source(models / "llava_next.py", "LlavaNextProcessingInfo._get_num_unpadded_features"), ns)
    exec(function_source(models / "minimax_vl_01.py", "MiniMaxVL01ForConditionalGeneration.pack_image_features"), ns)
    rope = src / "vllm" / "model_executor" / "layers" / "rotary_embedding"
    rope_ns: dict = {"torch": torch}
    exec(function_source(rope / "common.py", "ApplyRotaryEmb.forward_static"), rope_ns)
    rope_ns["ApplyRotaryEmb"] = types.SimpleNamespace(forward_static=rope_ns["forward_static"])
    exec(function_source(rope / "base.py", "RotaryEmbedding.forward_static"), rope_ns)
    exec(function_source(rope / "base.py", "RotaryEmbeddingBase._compute_inv_freq"), rope_ns)
    ns["rope"] = rope_ns
    return ns


def vllm_tokens(ns: dict, w: int, h: int) -> int:
    """vLLM's get_num_image_tokens for a CLIP-336/14 tower with the 'default' strategy."""
    grid_h, grid_w = ns["get_anyres_image_grid_shape"]((h, w), OFFICIAL_PINS, 336)
    unpadded, newlines = ns["_get_num_unpadded_features"](
        None, original_height=h, original_width=w, npatches=24, num_patch_height=grid_h, num_patch_width=grid_w)
    return unpadded + newlines + 576


def sizes(n: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(0)
    fixed = [(1, 1), (336, 336), (2016, 2016), (1700, 2200), (2200, 1700), (1920, 1080), (1080, 1920), (595, 842),
             (842, 595), (2480, 3508), (5000, 100), (100, 5000), (672, 336), (3000, 3000), (1275, 1650)]
    rand = [(int(a), int(b)) for a, b in rng.integers(1, 5000, size=(n, 2))]
    ratios = [(int(1000 * math.sqrt(r)), int(1000 / math.sqrt(r))) for r in np.linspace(0.05, 20, 400)]
    return fixed + rand + ratios


def check_tokens(ns: dict, n: int) -> None:
    cases = sizes(n)
    bad = [(w, h, vllm_tokens(ns, w, h), fam.plan_anyres(w, h, OFFICIAL_PINS).visual_tokens) for w, h in cases]
    bad = [b for b in bad if b[2] != b[3]]
    print(f"| token count (vLLM rule vs plan_anyres) | {len(cases)} page sizes | {len(bad)} differ |")
    for w, h, a, b in bad[:10]:
        print(f"|   {w}x{h} | vLLM {a} | ours {b} |")


def check_packing(ns: dict) -> None:
    torch.manual_seed(0)
    hidden = 8
    config = types.SimpleNamespace(vision_config=types.SimpleNamespace(image_size=336, patch_size=14),
                                   image_grid_pinpoints=OFFICIAL_PINS)
    newline = torch.randn(hidden)
    fake = types.SimpleNamespace(config=config, image_newline=newline)
    stub = types.SimpleNamespace(config=types.SimpleNamespace(grid_side=24), image_newline=newline)
    worst = 0
    cases = [(1700, 2200), (2200, 1700), (1920, 1080), (595, 842), (336, 336), (5000, 100), (100, 700), (1000, 999)]
    for w, h in cases:
        plan = fam.plan_anyres(w, h, OFFICIAL_PINS)
        feats = torch.randn(plan.tiles, 576, hidden)
        theirs = ns["pack_image_features"](fake, [feats], torch.tensor([[h, w]]))[0]
        ours = fam.MiniMaxVL01ForConditionalGeneration.pack_page(stub, feats, plan)
        same = theirs.shape == ours.shape and torch.equal(theirs, ours)
        worst += not same
        print(f"| packing {w}x{h} | vLLM {tuple(theirs.shape)} | ours {tuple(ours.shape)} | plan {plan.visual_tokens} "
              f"| {'equal' if same else 'DIFFERENT'} |")
    print(f"| feature packing | {len(cases)} pages | {worst} differ |")


def check_llm() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from test_family_minimax_vl_01 import _native_copy  # the same weight conversion the CI test uses

    with tempfile.TemporaryDirectory() as tmp:
        folder = fam.make_tiny_model(Path(tmp) / "tiny")
        model = fam.load_model(folder, dtype=torch.float32)
    cfg = model.config.text_config
    native = _native_copy(model, full_rotary=True)
    cfg.rope_parameters = {**cfg.rope_parameters, "partial_rotary_factor": 1.0}
    full = fam.MiniMaxVL01TextModel(cfg).eval()
    full.config._attn_implementation = "eager"
    full.load_state_dict({k.removeprefix("language_model.model."): v for k, v in model.state_dict().items()
                          if k.startswith("language_model.model.")}, strict=False)
    ids = torch.randint(0, cfg.vocab_size, (3, 300))
    with torch.no_grad():
        ours = model.language_model.lm_head(full(input_ids=ids).last_hidden_state)
        theirs = native(input_ids=ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"| LLM vs transformers MiniMaxForCausalLM (fp32, 3x300 tokens) | max abs diff {diff:.3g} "
          f"| max |logit| {theirs.abs().max().item():.3g} | greedy equal {bool((ours.argmax(-1) == theirs.argmax(-1)).all())} |")


def check_attention(ns: dict) -> None:
    """One softmax-attention layer (head_dim 128, rotary_dim 64 as MiniMax-Text-01) against
    q/k/v projections + vLLM's RotaryEmbedding.forward_static (neox, partial) + causal softmax."""
    from transformers import MiniMaxConfig

    rope_ns = ns["rope"]
    torch.manual_seed(0)
    cfg = fam.text_config_from_official({
        "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "rotary_dim": 64,
        "rope_theta": 10_000_000, "attn_type_list": [1], "num_hidden_layers": 1, "intermediate_size": 8,
        "num_local_experts": 2, "vocab_size": 10})
    assert isinstance(cfg, MiniMaxConfig)
    cfg._attn_implementation = "eager"
    layer = fam.MiniMaxVL01Attention(cfg, 0).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    rotary = fam.MiniMaxVL01RotaryEmbedding(cfg)
    n = 50
    x = torch.randn(1, n, 256)
    pos = torch.arange(n)[None]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        ours, _ = layer(x, rotary(x, pos), mask)
        q, k, v = layer.q_proj(x[0]), layer.k_proj(x[0]), layer.v_proj(x[0])
        fake = types.SimpleNamespace(rotary_dim=64)
        inv = rope_ns["_compute_inv_freq"](fake, 10_000_000.0)
        freqs = torch.einsum("i,j -> ij", torch.arange(n, dtype=torch.float), inv)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        q, k = rope_ns["forward_static"](pos[0], q, k, 128, 64, cache, True)
        q = q.view(n, 4, 128).transpose(0, 1)
        k = k.view(n, 2, 128).transpose(0, 1).repeat_interleave(2, 0)
        v = v.view(n, 2, 128).transpose(0, 1).repeat_interleave(2, 0)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(128) + mask[0], dim=-1) @ v
        ref = layer.o_proj(att.transpose(0, 1).reshape(n, 512))
    print(f"| softmax attention, partial RoPE (64 of 128) vs vLLM rotary | max abs diff "
          f"{(ours[0] - ref).abs().max().item():.3g} | max |out| {ref.abs().max().item():.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-src", type=Path, default=Path("/tmp/vllm023/src"))
    parser.add_argument("--sizes", type=int, default=20000)
    args = parser.parse_args()
    ns = load_vllm_pieces(args.vllm_src)
    check_tokens(ns, args.sizes)
    check_packing(ns)
    check_attention(ns)
    check_llm()


if __name__ == "__main__":
    main()
