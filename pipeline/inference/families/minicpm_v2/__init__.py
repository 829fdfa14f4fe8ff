"""MiniCPM-V 2.0 (openbmb/MiniCPM-V-2), ported natively to transformers 5.

The checkpoint ships remote code for transformers 4.36/4.37 that does not import on 5.x;
this module rebuilds the same computation from the official `config.json` and weights,
without executing any file of the checkpoint:

* vision: SigLIP-so400m as timm builds it (`vpm.*`: patch_embed, pos_embed, blocks, norm),
  its last block dropped (`drop_vision_last_layer`), position embeddings resized bicubic
  with antialias to each slice's patch grid, exact GELU;
* resampler (`resampler.*`): `query_num` learned queries, one cross-attention with
  `hidden_size // 128` heads, keys offset by 2-D sin-cos embeddings of the slice's grid;
* language model (`llm.model.*`, `llm.lm_head.*`): MiniCPM-2.4B, a Llama-like decoder with
  embeddings scaled by `scale_emb`, residual branches by `scale_depth / sqrt(layers)` and
  the final hidden state divided by `hidden_size / dim_model_base` before the head;
* input: LLaVA-UHD slicing as the checkpoint's image processor does it (the overview image
  first, then the slices row-major, 64 `<unk>` placeholders each inside `<image>...</image>`,
  slices wrapped in `<slice>...</slice>` one grid row per line), the prompt as the official
  `chat()` builds it (`<用户>` + image + question + `<AI>`, ONE `<AI>`: openbmb's
  modeling_minicpmv.py and its fine-tuning format; the fork's later processing code appends a
  second one, which the official checkpoint never saw), tokenised with the ORIGINAL slow
  sentencepiece rule (`SentencePieceTokenizer`).

Placeholders are found as the original finds them, by position between `<image>` and
`</image>`, never by id: the placeholder id (`<unk>`, 0) is also the pad id.

Layout: `configuration.py` (config.json, recognition, placement), `modeling.py` (the
modules under the official weight names, loading), `processing.py` (the ONLY owner of the
page plan, pixels, prompt and token count: the input builder), `tiny.py` (a tiny checkpoint).
"""

from __future__ import annotations

from pipeline.inference.families.minicpm_v2.configuration import (  # noqa: F401
    ARCHITECTURES,
    FIRST_DEVICE,
    GENERATION_DEFAULTS,
    LAST_DEVICE,
    MODEL_TYPES,
    NAME,
    MiniCPMV2Config,
    load_config,
    recognise,
    vision_spec,
)
from pipeline.inference.families.minicpm_v2.modeling import (  # noqa: F401
    MiniCPMDecoderLayer,
    MiniCPMV2ForConditionalGeneration,
    load_model,
    meta_model,
)
from pipeline.inference.families.minicpm_v2.processing import (  # noqa: F401
    MiniCPMV2Builder,
    SentencePieceTokenizer,
    _content,
    chat_text,
    image_text,
    load_builder,
    load_tokenizer,
)
from pipeline.inference.families.minicpm_v2.tiny import (  # noqa: F401
    make_tiny_model,
    tiny_config_dict,
)

__all__ = [
    "ARCHITECTURES",
    "FIRST_DEVICE",
    "GENERATION_DEFAULTS",
    "LAST_DEVICE",
    "MODEL_TYPES",
    "MiniCPMDecoderLayer",
    "MiniCPMV2Builder",
    "MiniCPMV2Config",
    "MiniCPMV2ForConditionalGeneration",
    "NAME",
    "SentencePieceTokenizer",
    "chat_text",
    "image_text",
    "load_builder",
    "load_config",
    "load_model",
    "load_tokenizer",
    "make_tiny_model",
    "meta_model",
    "recognise",
    "tiny_config_dict",
    "vision_spec",
]
