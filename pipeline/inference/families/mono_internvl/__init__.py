"""Mono-InternVL-2B (OpenGVLab/Mono-InternVL-2B), ported natively to transformers 5.

The checkpoint ships remote code written for transformers 4.37 (tuple KV cache, a custom
InternLM2 tokenizer class); nothing of it is imported or executed here. What the model is:

* **No vision transformer.** `vision_model.embeddings` is only a 14 px patch convolution
  plus learned position embeddings (resized bicubically to the patch grid); the class
  token is computed by the original and then thrown away, so it is skipped here.
* **Projector** `mlp1`: LayerNorm, Linear, GELU, Linear over the pixel-shuffled patches
  (2x2 neighbours concatenated: 1024 patches of a 448 px tile -> 256 image tokens).
* **LLM with visual experts** (InternLM2VEForCausalLM): an InternLM2 decoder whose
  layers hold two feed-forward networks. During the prefill, the positions holding the
  `<IMG_CONTEXT>` placeholder go through `feed_forward_ve`, every other position through
  the LLM's own `feed_forward`; on decode steps (the original: whenever a layer has a
  past key/value) every token goes through `feed_forward`. Attention is shared: `wqkv`
  packs, per key-value group, the group's query heads, then its key, then its value.
* **Pages**: InternVL's dynamic tiling (448 px tiles on the closest-aspect grid, plus a
  thumbnail), ImageNet mean/std as torchvision's ToTensor + Normalize compute them.
* **Chat**: the conversation template named in config.json (`internlm2-chat`), built the
  way the original `chat()` does: system prompt, `<img>` + placeholders + `</img>`, a
  newline, the question; generation stops at `<|im_end|>` only.
* **Tokenizer**: the sentencepiece model `tokenizer.model`, read with `sentencepiece`
  directly and wrapped so that it gives the ids the original slow tokenizer gives (added
  tokens split out first, each piece of text encoded on its own, BOS in front).

Key names are the official ones, so an official folder loads with no key renamed.

Layout: `configuration.py` (config.json, recognition, placement), `modeling.py` (the
modules under the official weight names, loading), `processing.py` (the ONLY owner of the
page plan, pixels, prompt and token count: the input builder), `tiny.py` (a tiny checkpoint).
"""

from __future__ import annotations

from pipeline.inference.families.mono_internvl.configuration import (  # noqa: F401
    ARCHITECTURES,
    FIRST_DEVICE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_CONTEXT,
    LAST_DEVICE,
    MODEL_TYPES,
    NAME,
    InternLM2VEConfig,
    MonoInternVisionConfig,
    MonoInternVLConfig,
    recognise,
)
from pipeline.inference.families.mono_internvl.modeling import (  # noqa: F401
    InternLM2VEForCausalLM,
    MonoInternVLForConditionalGeneration,
    load_model,
    meta_model,
    pixel_shuffle,
)
from pipeline.inference.families.mono_internvl.processing import (  # noqa: F401
    CHAT_TEMPLATES,
    InternLM2Tokenizer,
    MonoInternVLBuilder,
    chat_template,
    load_builder,
    load_config,
)
from pipeline.inference.families.mono_internvl.tiny import (  # noqa: F401
    CHAT_SPECIAL_TOKENS,
    make_tiny_model,
)

__all__ = [
    "ARCHITECTURES",
    "CHAT_SPECIAL_TOKENS",
    "CHAT_TEMPLATES",
    "FIRST_DEVICE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_CONTEXT",
    "InternLM2Tokenizer",
    "InternLM2VEConfig",
    "InternLM2VEForCausalLM",
    "LAST_DEVICE",
    "MODEL_TYPES",
    "MonoInternVLBuilder",
    "MonoInternVLConfig",
    "MonoInternVLForConditionalGeneration",
    "MonoInternVisionConfig",
    "NAME",
    "chat_template",
    "load_builder",
    "load_config",
    "load_model",
    "make_tiny_model",
    "meta_model",
    "pixel_shuffle",
    "recognise",
]
