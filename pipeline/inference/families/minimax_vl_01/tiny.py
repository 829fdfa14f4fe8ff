"""minimax_vl_01: a tiny random checkpoint in the official layout (tests, smoke runs). See the package docstring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.inference.families.minimax_vl_01.configuration import (
    ARCHITECTURES,
    BOS,
    CLIP_MEAN,
    CLIP_STD,
    EOS,
    IMAGE_TOKEN,
    load_config,
)
from pipeline.inference.families.minimax_vl_01.modeling import MiniMaxVL01ForConditionalGeneration
from pipeline.inference.families.minimax_vl_01.processing import CHAT_TEMPLATE

# ---------------------------------------------------------------------------------------
# tiny checkpoint for tests and smoke runs
# ---------------------------------------------------------------------------------------

# MiniMax-01's special tokens (official ids 200019 / 200020 / 200034 / 200025); here they
# follow the small BPE vocabulary.
SPECIAL_TOKENS = (BOS, EOS, "<begin_of_document>", "<end_of_document>", IMAGE_TOKEN)
TINY_TILE = 56  # 4 x 4 patches of 14 px: 16 features a tile instead of 576, same rules
TINY_INIT_RANGE = 0.3
# The tiny checkpoints make-tiny-model writes besides the plain one: `minimax_vl_01_vllm` has a
# text head_dim of 64 (rotary 32 of 64, as the real 64 of 128), because vLLM's CPU attention
# takes head sizes 32, 64, 80, ... only; everything else is the plain tiny model's.
VARIANTS: tuple[str, ...] = ("minimax_vl_01_vllm",)
_HEAD_DIM = {"minimax_vl_01": 8, "minimax_vl_01_vllm": 64}

_TINY_TEXT = (
    "Describe this page: what kind of document it is and what it shows. Transcribe all the text on the page "
    "in reading order. Does this page contain a chart, plot or diagram? Answer yes or no. The quarterly report "
    "shows revenue growth of 12 percent. Invoice number 4711, total amount due 99.50 EUR. Figure 3: temperature "
    "over time; title, axes and units. You are a helpful assistant created by MiniMax based on MiniMax-VL-01 "
    "model. system ai_setting=assistant user name=user ai name=assistant"
)


def make_tiny_tokenizer(directory: Path) -> Any:
    """A byte-level BPE tokenizer.json (as MiniMax-01 ships) + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.inference import prompts

    corpus = [_TINY_TEXT, prompts.description_prompt(), prompts.ocr_prompt(None), prompts.chart_detect_prompt(),
              prompts.chart_question_prompt("What is the highest value?")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": "<end_of_document>",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 40960000,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def tiny_config_dict(vocab_size: int, image_token: int, *, head_dim: int = 8) -> dict[str, Any]:
    """config.json in the official layout (architectures, model_type, legacy text names); the
    text heads are `head_dim` wide, RoPE on the first half of each."""
    layers = 4
    alpha = (2 * layers) ** 0.25  # the official alphas are (2 * 80) ** 0.25
    pinpoints = [[TINY_TILE * c, TINY_TILE * r] for c in range(1, 7) for r in range(1, 7)]
    return {
        "architectures": list(ARCHITECTURES),
        "auto_map": {"AutoConfig": "configuration_minimax_vl_01.MiniMaxVL01Config",
                     "AutoModelForCausalLM": "modeling_minimax_vl_01.MiniMaxVL01ForConditionalGeneration"},
        "model_type": "minimax_vl_01",
        "ignore_index": -100,
        "image_grid_pinpoints": pinpoints,
        "image_seq_length": (TINY_TILE // 14) ** 2,
        "image_token_index": image_token,
        "process_image_mode": "anyres",
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "torch_dtype": "float32",
        "text_config": {
            "architectures": ["MiniMaxText01ForCausalLM"],
            "model_type": "minimax_text_01",
            "attn_type_list": [0, 1, 0, 1],
            "block_size": 16,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "hidden_size": 32,
            "initializer_range": TINY_INIT_RANGE,
            "intermediate_size": 24,
            "layernorm_full_attention_alpha": alpha,
            "layernorm_full_attention_beta": 1.0,
            "layernorm_linear_attention_alpha": alpha,
            "layernorm_linear_attention_beta": 1.0,
            "layernorm_mlp_alpha": alpha,
            "layernorm_mlp_beta": 1.0,
            "max_position_embeddings": 8192,
            "num_attention_heads": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": layers,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "postnorm": True,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rotary_dim": head_dim // 2,
            "shared_intermediate_size": [0],
            "shared_moe_mode": "sigmoid",
            "tie_word_embeddings": False,
            "vocab_size": vocab_size,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_act": "gelu",
            "hidden_size": 16,
            "image_size": TINY_TILE,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 32,
            "layer_norm_eps": 1e-5,
            "num_attention_heads": 2,
            "num_channels": 3,
            "num_hidden_layers": 2,
            "patch_size": 14,
            "projection_dim": 32,
        },
    }


def make_tiny_model(directory: str | Path, seed: int = 0, *, variant: str = "minimax_vl_01") -> Path:
    """A few-kB random MiniMax-VL-01 in the official layout: config.json, model.safetensors
    (official keys), tokenizer.json + tokenizer_config.json, preprocessor_config.json,
    generation_config.json. 56 px tiles instead of 336 (same anyres rules). `variant`
    "minimax_vl_01_vllm": text head_dim 64, which vLLM's CPU build can serve (see VARIANTS)."""
    from safetensors.torch import save_file

    if variant not in _HEAD_DIM:
        raise ValueError(f"unknown minimax_vl_01 variant {variant!r}; choose one of {', '.join(_HEAD_DIM)}")
    directory = Path(directory)
    tokenizer = make_tiny_tokenizer(directory)
    vocab = len(tokenizer)
    raw = tiny_config_dict(vocab, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), head_dim=_HEAD_DIM[variant])
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    torch.manual_seed(seed)
    model = MiniMaxVL01ForConditionalGeneration(load_config(directory)).eval()
    with torch.no_grad():  # varied greedy outputs need larger weights than the default init
        for name, param in model.named_parameters():
            if name.startswith(("vision_tower", "multi_modal_projector")) and param.ndim > 1:
                param.normal_(0.0, 0.1)
        model.image_newline.normal_(0.0, 1.0)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ImageProcessor",
        "auto_map": {"AutoImageProcessor": "image_processor.ImageProcessor"},
        "size": [TINY_TILE, TINY_TILE],
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "process_image_mode": "anyres",
        "patch_size": 14,
        "image_grid_pinpoints": raw["image_grid_pinpoints"],
    }, indent=2))
    eos = tokenizer.convert_tokens_to_ids(EOS)
    (directory / "generation_config.json").write_text(json.dumps({
        "bos_token_id": tokenizer.convert_tokens_to_ids(BOS), "eos_token_id": eos, "do_sample": False,
    }, indent=2))
    return directory
