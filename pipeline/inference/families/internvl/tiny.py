"""internvl: a tiny random checkpoint in the -hf layout (tests, smoke runs), loaded by
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

VARIANTS: tuple[str, ...] = ("internvl",)  # the tiny checkpoints this module writes (make-tiny-model names)


def _internvl(ids: dict[str, int]) -> tuple[Any, dict[str, Any]]:
    from transformers import InternVLConfig

    vocab = len(ids)
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 448,
            # Real tiles (448 px) but 56 px patches: 8x8 patches, 16 tokens per tile after
            # the 0.5 pixel shuffle (real checkpoints: 14 px patches, 256 tokens per tile).
            "patch_size": 56,
            "initializer_range": INIT_RANGE,
        },
        text_config={"model_type": "qwen2", **text_config(vocab, ids, "<|im_end|>", "<|endoftext|>")},
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=16,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    processor = {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": False,  # the processor turns it on per call, as in the real checkpoints
        "min_patches": 1,
        "max_patches": 12,
        "size": {"height": 448, "width": 448},
        "resample": 3,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
    }
    return config, processor


_SPEC = TinySpec(
    specials=(*CHATML, "<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
    eos="<|im_end|>",
    pad="<|endoftext|>",
    named_tokens={
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
    chat_template=CHATML_TEMPLATE.replace("IMAGE", "'<IMG_CONTEXT>\\n'"),
    build=_internvl,
)


def make_tiny_model(directory: str | Path, seed: int = 0, *, variant: str = "internvl") -> Path:
    """A tiny random InternVL (-hf) checkpoint in `directory`. Offline, deterministic for a given seed."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown internvl variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return save_tiny_checkpoint(_SPEC, directory, seed=seed)[0]


__all__ = ["VARIANTS", "make_tiny_model"]
