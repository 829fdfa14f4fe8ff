"""qwen2_vl: tiny random Qwen2-VL and Qwen2.5-VL checkpoints (tests, smoke runs), loaded by
transformers' own classes. The shared tokenizer training and saving are in
pipeline.testing.tiny_models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.testing.tiny_models import (
    CHATML,
    CHATML_TEMPLATE,
    INIT_RANGE,
    TinySpec,
    save_tiny_checkpoint,
    text_config,
)

VARIANTS: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")  # the tiny checkpoints this module writes


def _qwen2_vl(ids: dict[str, int], *, v25: bool = False) -> tuple[Any, dict[str, Any]]:
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    vocab = len(ids)
    text = text_config(
        vocab,
        ids,
        "<|im_end|>",
        "<|endoftext|>",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    if v25:
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "initializer_range": INIT_RANGE,
        }
        cls = Qwen2_5_VLConfig
    else:
        vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": INIT_RANGE,
        }
        cls = Qwen2VLConfig
    config = cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    processor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor" if v25 else "Qwen2VLProcessor",
        # Few visual tokens for speed: at most 64 merged patches (real checkpoints allow ~16k).
        "min_pixels": 28 * 28 * 4,
        "max_pixels": 28 * 28 * 64,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "resample": 3,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }
    return config, processor


_QWEN_SPECIALS = (*CHATML, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _spec(build: Any) -> TinySpec:
    return TinySpec(
        specials=_QWEN_SPECIALS,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named_tokens={},
        chat_template=CHATML_TEMPLATE.replace("IMAGE", "'<|vision_start|><|image_pad|><|vision_end|>'"),
        build=build,
    )


_SPECS: dict[str, TinySpec] = {"qwen2_vl": _spec(_qwen2_vl), "qwen2_5_vl": _spec(lambda ids: _qwen2_vl(ids, v25=True))}


def make_tiny_model(directory: str | Path, seed: int = 0, *, variant: str = "qwen2_vl") -> Path:
    """A tiny random Qwen2-VL (`variant="qwen2_5_vl"`: Qwen2.5-VL) checkpoint in `directory`.
    Offline, deterministic for a given seed."""
    if variant not in _SPECS:
        raise ValueError(f"unknown qwen2_vl variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return save_tiny_checkpoint(_SPECS[variant], directory, seed=seed)[0]


__all__ = ["VARIANTS", "make_tiny_model"]
