"""minicpm_v2: a tiny random checkpoint in the official layout (tests, smoke runs). See the package docstring."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.inference.families.minicpm_v2.configuration import (
    ARCHITECTURES,
    ASSISTANT_TAG,
    IMAGE_END,
    IMAGE_PLACEHOLDER,
    IMAGE_START,
    MODEL_TYPES,
    SLICE_END,
    SLICE_START,
    USER_TAG,
    MiniCPMV2Config,
)
from pipeline.inference.families.minicpm_v2.modeling import MiniCPMV2ForConditionalGeneration
from pipeline.inference.families.minicpm_v2.processing import _DEFAULT_ADDED

# ---------------------------------------------------------------------------------------
# tiny checkpoint (tests, smoke runs)
# ---------------------------------------------------------------------------------------

_RESERVED = [f"<reserved_{i}>" for i in range(3, 101)]  # the real vocabulary's ids 3..100
_SPECIALS = [_DEFAULT_ADDED[i] for i in range(101, 113)]
_WORDS = ("describe the page image text chart table figure what is shown in this picture please answer "
          "yes no question read all of it title revenue costs grew fell region north south east west "
          "a an and or to for with on at by from as is are was were be has have report quarter percent "
          "图 片 描 述 这 是 什 么 你 好 答").split()


def _train_tiny_sentencepiece(path: Path, seed: int, vocab_size: int = 512) -> None:
    """A tiny BPE sentencepiece model laid out like the real one: <unk> 0, <s> 1, </s> 2, reserved
    3..100, <image> 101 ... </slice> 112, then <用户> and <AI>, byte fallback, "\n" kept."""
    import io
    import random

    import sentencepiece

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list(_WORDS) + ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) + rng.choice(("", "\n", "?", ".")) for _ in range(3000)]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, user_defined_symbols=_RESERVED + _SPECIALS + [USER_TAG, ASSISTANT_TAG],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )
    path.write_bytes(buffer.getvalue())


def tiny_config_dict(vocab_size: int = 512) -> dict[str, Any]:
    """The official config.json of MiniCPM-V 2.0 with tiny sizes and a `vision_config` for the small tower."""
    return {
        "_name_or_path": "openbmb/MiniCPM-V-2",
        "architectures": list(ARCHITECTURES),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dim_model_base": 32,
        "drop_vision_last_layer": True,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 256,  # the resampler has hidden_size // 128 heads
        "image_size": 448,
        "initializer_range": 0.3,
        "intermediate_size": 512,
        "max_position_embeddings": 4096,
        "max_slice_nums": 9,
        "mm_use_im_start_end": True,
        "model_type": MODEL_TYPES[0],
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "patch_size": 14,
        "pretraining_tp": 1,
        "query_num": 64,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "scale_depth": 1.4,
        "scale_emb": 12,
        "scale_resolution": 448,
        "slice_mode": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.36.0",
        "use_cache": True,
        "vision_encoder": "vit_so400m_patch14_siglip_384.webli",
        "vision_config": {"hidden_size": 64, "intermediate_size": 239, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "patch_size": 14, "image_size": 384},
        "vocab_size": vocab_size,
    }


def _tokenizer_files() -> dict[str, Any]:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in sorted(_DEFAULT_ADDED.items())}
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "additional_special_tokens": _SPECIALS, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": True, "pad_token": "<unk>", "padding_side": "right", "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "MiniCPMVTokenizer", "unk_token": "<unk>",
    }
    plain = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {"additional_special_tokens": _SPECIALS, "bos_token": {"content": "<s>", **plain},
                   "eos_token": {"content": "</s>", **plain}, "pad_token": "<unk>",
                   "unk_token": {"content": "<unk>", **plain}}
    preprocessor = {"image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
                    "max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14, "image_feature_size": 64,
                    "im_start": IMAGE_START, "im_end": IMAGE_END, "slice_start": SLICE_START, "slice_end": SLICE_END,
                    "unk": IMAGE_PLACEHOLDER, "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5]}
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special_map,
            "preprocessor_config.json": preprocessor,
            "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.0"}}


def make_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """A few-MB MiniCPM-V 2.0 folder in the official layout (random weights, tiny sentencepiece model)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _train_tiny_sentencepiece(directory / "tokenizer.model", seed)
    raw = tiny_config_dict()
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    for name, content in _tokenizer_files().items():
        (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False))
    config = MiniCPMV2Config.from_dict(raw)
    torch.manual_seed(seed)
    model = MiniCPMV2ForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms away from 1/0 so that their weights matter in tests
        for name, param in model.named_parameters():
            if re.search(r"norm|ln_", name):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
