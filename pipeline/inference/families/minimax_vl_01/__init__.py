"""MiniMax-VL-01 (MiniMaxAI/MiniMax-VL-01) ported natively to transformers 5.

The checkpoint ships remote code (`MiniMaxVL01ForConditionalGeneration`, a CLIP ViT + a
two-layer MLP projector + MiniMax-Text-01); that code is not public here, so this port
follows the facts stated by vLLM 0.23.0's port (`vllm/model_executor/models/
minimax_vl_01.py` + `minimax_text_01.py`) and by the model's own processor:

* vision: transformers' `CLIPVisionModel` under `vision_tower.vision_model.*`, the output of
  layer `vision_feature_layer` (no post layernorm: the checkpoint has none), class token
  dropped (`vision_feature_select_strategy="default"`);
* projector `multi_modal_projector.linear_1 -> gelu -> linear_2` (biases), `image_newline`;
* LLM: transformers' native `minimax` pieces (lightning attention, softmax attention, RMSNorm,
  the decoder-layer arithmetic), composed so the keys are the official ones
  (`language_model.model.layers.N.block_sparse_moe.experts.E.w1|w2|w3`, `...gate`), with two
  things the native class does not do: rotary embedding on the first `rotary_dim` channels of
  each head only (MiniMax-Text-01 rotates 64 of 128; the native class rotates all) and the
  lightning-attention decay tables kept out of the state dict (they are derived);
* anyres: the pinpoint with the best effective resolution, the page resized keeping its
  aspect ratio (bicubic) and centred on black padding, 336 px tiles row-major, a plain
  336x336 thumbnail FIRST, CLIP mean/std; features: the thumbnail's 576 first, then the
  tiles' features with the padding rows/columns cut away (LLaVA-NeXT `unpad_image`) and
  `image_newline` after every row. A page costs `(w_num + 1) * h_num + 576` image tokens,
  `w_num` x `h_num` being the unpadded feature grid (the processor's `get_num_token`).
* chat: `<beginning_of_sentence>system ai_setting=assistant\n...<end_of_sentence>\n`,
  `<beginning_of_sentence>user name=user\n<image>...question<end_of_sentence>\n`,
  `<beginning_of_sentence>ai name=assistant\n`; generation stops at `<end_of_sentence>`.

Layout: `configuration.py` (config.json, recognition, placement), `modeling.py` (the
modules under the official weight names, loading), `processing.py` (the ONLY owner of the
page plan, pixels, prompt and token count: the input builder), `tiny.py` (a tiny checkpoint).
"""

from __future__ import annotations

from pipeline.inference.checkpoint import UnsupportedModelError  # noqa: F401  (raised by its config reader)
from pipeline.inference.families.minimax_vl_01.configuration import (  # noqa: F401
    BOS,
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_SYSTEM,
    FIRST_DEVICE,
    LAST_DEVICE,
    NAME,
    MiniMaxVL01Config,
    int8_skip_modules,
    load_config,
    parse_pinpoints,
    recognise,
    text_config_from_official,
)
from pipeline.inference.families.minimax_vl_01.modeling import (  # noqa: F401
    MiniMaxVL01Attention,
    MiniMaxVL01ForConditionalGeneration,
    MiniMaxVL01LightningAttention,
    MiniMaxVL01RotaryEmbedding,
    MiniMaxVL01TextModel,
    alibi_slopes,
    load_model,
    meta_model,
    placement,
)
from pipeline.inference.families.minimax_vl_01.processing import (  # noqa: F401
    MiniMaxVL01Builder,
    chat_text,
    load_builder,
    plan_anyres,
)
from pipeline.inference.families.minimax_vl_01.tiny import (  # noqa: F401
    make_tiny_model,
    tiny_config_dict,
)

__all__ = [
    "BOS",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_SYSTEM",
    "FIRST_DEVICE",
    "LAST_DEVICE",
    "MiniMaxVL01Attention",
    "MiniMaxVL01Builder",
    "MiniMaxVL01Config",
    "MiniMaxVL01ForConditionalGeneration",
    "MiniMaxVL01LightningAttention",
    "MiniMaxVL01RotaryEmbedding",
    "MiniMaxVL01TextModel",
    "NAME",
    "alibi_slopes",
    "chat_text",
    "int8_skip_modules",
    "load_builder",
    "load_config",
    "load_model",
    "make_tiny_model",
    "meta_model",
    "parse_pinpoints",
    "placement",
    "plan_anyres",
    "recognise",
    "text_config_from_official",
    "tiny_config_dict",
]
