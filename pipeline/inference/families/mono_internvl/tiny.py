"""mono_internvl: a tiny random checkpoint in the official layout (tests, smoke runs). See the package docstring."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.inference.families.mono_internvl.configuration import (
    ARCHITECTURES,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    LLM_ARCHITECTURE,
)
from pipeline.inference.families.mono_internvl.modeling import MonoInternVLForConditionalGeneration
from pipeline.inference.families.mono_internvl.processing import load_config

# ---------------------------------------------------------------------------------------
# tiny checkpoint for tests and smoke runs
# ---------------------------------------------------------------------------------------

# InternLM2 / InternVL special tokens, in their order at the end of the vocabulary
# (real ids 92538 .. 92552); here they follow the small sentencepiece vocabulary.
CHAT_SPECIAL_TOKENS = (
    "<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>",
    IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)
TINY_SP_VOCAB = 320
TINY_INIT_RANGE = 0.3
# The tiny checkpoints make-tiny-model writes besides the plain one: `mono_internvl_vllm` has a
# text head_dim of 64 (2 heads of 64 over 1 key-value head: grouped-query, as the real model),
# because vLLM's CPU attention refuses head_dim 16; everything else is the plain tiny model's.
VARIANTS: tuple[str, ...] = ("mono_internvl_vllm",)
_TEXT_SIZES = {  # hidden_size, intermediate_size, num_attention_heads, num_key_value_heads
    "mono_internvl": (64, 128, 4, 2),
    "mono_internvl_vllm": (128, 256, 2, 1),
}

_TINY_WORDS = (
    "describe this page what kind of document it is and what it shows transcribe all the text on "
    "the page in reading order does contain a chart plot or diagram answer yes no the quarterly report "
    "revenue growth percent invoice number total amount due figure temperature over time title axes units "
    "please image picture color red blue green hello world briefly shown question 图 片 描 述 这 是 什 么 你 好"
).split()


def _train_tiny_sentencepiece(path: Path, seed: int) -> None:
    """A small BPE sentencepiece model with InternLM2's conventions: <unk> 0, <s> 1, </s> 2,
    byte fallback, newlines kept (identity normalisation, no whitespace folding)."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list(_TINY_WORDS) + ["".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(60)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) + rng.choice(["", "\n", ".", "?"]) for _ in range(800)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=TINY_SP_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(buffer.getvalue())


def tiny_config_dict(vocab_size: int, variant: str = "mono_internvl") -> dict[str, Any]:
    """config.json of a tiny Mono-InternVL in the official InternVLChatModel layout.

    448 px tiles with 28 px patches: 16x16 patches, 64 image tokens a tile (the real
    model: 14 px, 256). Two decoder layers with grouped-query attention (`variant`: the
    text sizes, see _TEXT_SIZES).
    """
    hidden, intermediate, heads, kv_heads = _TEXT_SIZES[variant]
    return {
        "architectures": list(ARCHITECTURES),
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internlm2-chat",
        "use_thumbnail": True,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "pad2square": False,
        "torch_dtype": "float32",
        "llm_config": {
            "architectures": [LLM_ARCHITECTURE],
            "model_type": "internlm2",
            "auto_map": {
                "AutoConfig": "configuration_internlm2.InternLM2Config",
                "AutoModel": "modeling_internlm2_ve.InternLM2VEForCausalLM",
                "AutoModelForCausalLM": "modeling_internlm2_ve.InternLM2VEForCausalLM",
            },
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "vocab_size": vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000,
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
            "bias": False,
            "attn_implementation": "eager",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "initializer_range": TINY_INIT_RANGE,
            "torch_dtype": "float32",
        },
        "vision_config": {
            "architectures": ["InternVisionPatchModel"],
            "model_type": "intern_vit_patch",
            "hidden_size": 32,
            "image_size": 448,
            "patch_size": 28,
            "num_channels": 3,
            "num_hidden_layers": 0,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "use_flash_attn": False,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
            "initializer_range": TINY_INIT_RANGE,
            "torch_dtype": "float32",
        },
    }


def make_tiny_model(directory: str | Path, seed: int = 0, variant: str = "mono_internvl") -> Path:
    """Write a tiny random Mono-InternVL folder in the official layout; returns the folder.

    config.json (official architectures/model_type/fields), model.safetensors (official
    keys), tokenizer.model (a small sentencepiece model, <unk>/<s>/</s> at 0/1/2) with
    tokenizer_config.json listing InternLM2's 15 chat/image tokens at the end of the
    vocabulary, special_tokens_map.json and generation_config.json (stops at <|im_end|>).
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _train_tiny_sentencepiece(out / "tokenizer.model", seed)
    vocab = TINY_SP_VOCAB + len(CHAT_SPECIAL_TOKENS)
    specials = {str(TINY_SP_VOCAB + i): t for i, t in enumerate(CHAT_SPECIAL_TOKENS)}
    tokenizer_config = {
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "tokenizer_class": "InternLM2Tokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "added_tokens_decoder": {
            **{str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
               for i, t in enumerate(("<unk>", "<s>", "</s>"))},
            **{i: {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": True} for i, t in specials.items()},
        },
        "additional_special_tokens": list(CHAT_SPECIAL_TOKENS),
    }
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
                   "additional_special_tokens": list(CHAT_SPECIAL_TOKENS)}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=1))
    if variant not in _TEXT_SIZES:
        raise ValueError(f"unknown tiny Mono-InternVL variant {variant!r}; known: {', '.join(_TEXT_SIZES)}")
    raw = tiny_config_dict(vocab, variant)
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    im_end = TINY_SP_VOCAB + CHAT_SPECIAL_TOKENS.index("<|im_end|>")
    (out / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": [im_end], "pad_token_id": 2})
    )

    torch.manual_seed(seed)
    config = load_config(out)
    model = MonoInternVLForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms away from 1/0, so a wrong norm shows in the numbers
        for name, param in model.named_parameters():
            if re.search(r"norm|mlp1\.0", name):
                delta = torch.randn(param.shape, generator=generator)
                param.copy_((1.0 + 0.1 * delta) if name.endswith("weight") else 0.05 * delta)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
