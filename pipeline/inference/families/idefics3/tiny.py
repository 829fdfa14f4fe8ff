"""idefics3: tiny random Idefics3 and SmolVLM checkpoints (tests, smoke runs), loaded by
transformers' own classes and by vLLM (CPU) alike. The shared tokenizer training and saving are
in pipeline.testing.tiny_models.

vLLM's CPU build needs two things of them (tests/inference/test_vllm_engine.py): a text head_dim of 64
(its CPU attention refuses 16), and `processor_config.json` saying how many image tokens a
tile really gives (`image_seq_len`; vLLM's processor defaults to the full-size model's 169).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.testing.tiny_models import (
    INIT_RANGE,
    TinySpec,
    save_tiny_checkpoint,
    text_config,
)

VARIANTS: tuple[str, ...] = ("idefics3", "smolvlm")  # the tiny checkpoints this module writes

# "User:/Assistant:" chat format of the real Idefics3/SmolVLM checkpoints.
_IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _idefics3(ids: dict[str, int], *, smol: bool = False) -> tuple[Any, dict[str, Any]]:
    from transformers import Idefics3Config, SmolVLMConfig

    vocab = len(ids)
    tile = 112  # vision encoder input; 8x8 patches of 14 px, scale factor 2 -> 16 tokens per tile
    cls = SmolVLMConfig if smol else Idefics3Config
    config = cls(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": tile,
            "patch_size": 14,
            "initializer_range": INIT_RANGE,
        },
        # head_dim 64: vLLM's CPU attention refuses 16 (64 / 4 heads), so the same checkpoint serves both engines
        text_config={
            "model_type": "llama", **text_config(vocab, ids, "<end_of_utterance>", "<|endoftext|>", head_dim=64)
        },
        image_token_id=ids["<image>"],
        scale_factor=2,
        tie_word_embeddings=False,
    )
    processor = {
        "image_processor_type": "SmolVLMImageProcessor" if smol else "Idefics3ImageProcessor",
        "processor_class": "SmolVLMProcessor" if smol else "Idefics3Processor",
        "do_image_splitting": True,
        "size": {"longest_edge": 4 * tile},
        "max_image_size": {"longest_edge": tile},
        "resample": 1,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pad": True,
        "do_convert_rgb": True,
    }
    return config, processor


_IDEFICS_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)

_SPECS: dict[str, TinySpec] = {
    "idefics3": TinySpec(
        specials=_IDEFICS_SPECIALS,
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        named_tokens={},
        chat_template=_IDEFICS_TEMPLATE,
        build=_idefics3,
    ),
    "smolvlm": TinySpec(
        specials=_IDEFICS_SPECIALS,
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        named_tokens={
            "fake_image_token": "<fake_token_around_image>",
            "image_token": "<image>",
            "global_image_token": "<global-img>",
        },
        chat_template=_IDEFICS_TEMPLATE,
        build=lambda ids: _idefics3(ids, smol=True),
    ),
}


def make_tiny_model(directory: str | Path, seed: int = 0, *, variant: str = "idefics3") -> Path:
    """A tiny random Idefics3 (`variant="smolvlm"`: SmolVLM) checkpoint in `directory`.
    Offline, deterministic for a given seed."""
    if variant not in _SPECS:
        raise ValueError(f"unknown idefics3 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    out, config, processor_config = save_tiny_checkpoint(_SPECS[variant], directory, seed=seed)
    # The processor's image tokens per tile, as the model really produces them; readers that
    # build the processor (vLLM) default to the full-size model's 169 otherwise.
    vision = config.vision_config
    seq_len = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
    processor = {"image_seq_len": int(seq_len), "processor_class": processor_config["processor_class"]}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return out


__all__ = ["VARIANTS", "make_tiny_model"]
