"""Tiny, randomly initialised checkpoints of real VLM architectures, built offline.

`make_tiny_model(family, out_dir)` writes a folder that loads exactly like a hub
checkpoint through transformers (`AutoModelForImageTextToText`, `AutoTokenizer`,
`AutoImageProcessor(backend="pil")`): config + safetensors weights, a byte-level BPE
tokenizer trained with `tokenizers` on a few sentences (with the family's special tokens
and a chat template in the style of the real checkpoints), and the image processor
config. Nothing is downloaded. Each model is about 1 MB and builds in well under a second.

Weights use `initializer_range=0.3` so that a random model emits varied tokens (with the
default 0.02 it tends to repeat one token), which keeps batch-equality tests meaningful.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INIT_RANGE = 0.3

# Sentences the tokenizer is trained on: a little of what documents and answers contain.
_CORPUS = (
    "Describe this page: what kind of document it is and what it shows.",
    "Transcribe all the text on the page in reading order.",
    "Does the page contain a chart, plot or diagram? Answer yes or no.",
    "The quarterly report shows revenue growth of 12 percent in 2024.",
    "| Year | Revenue | Cost |\n|------|---------|------|\n| 2023 | 1.2 | 0.8 |",
    "What type of chart or figure is this? A bar chart of sales by region.",
    "What is the title of the chart? What do the axes show, with their units?",
    "Invoice number 4711, total amount due: 1,234.56 EUR, payable within 30 days.",
    "Figure 3: temperature in degrees Celsius over time in hours.",
    "The scanned letter is addressed to the board and signed by the chair.",
    "yes no Yes No YES NO true false 0 1 2 3 4 5 6 7 8 9",
    "Abstract. Introduction. Methods. Results. Discussion. References.",
)

# Jinja chat templates in the style of the real checkpoints (ChatML for InternVL3 and
# Qwen2-VL, "User:/Assistant:" for Idefics3/SmolVLM).
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ IMAGE }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class _Spec:
    """How to build one family: its special tokens and how to make config + processor."""

    specials: tuple[str, ...]
    eos: str
    pad: str
    named_tokens: dict[str, str]
    chat_template: str
    build: Callable[[dict[str, int]], tuple[Any, dict[str, Any]]]


def _text_config(vocab_size: int, ids: dict[str, int], eos: str, pad: str, **extra: Any) -> dict[str, Any]:
    """A 2-layer decoder, small enough to run in milliseconds on a CPU."""
    cfg: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "initializer_range": INIT_RANGE,
        "bos_token_id": ids[eos],
        "eos_token_id": ids[eos],
        "pad_token_id": ids[pad],
        "tie_word_embeddings": False,
    }
    cfg.update(extra)
    return cfg


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
        text_config={"model_type": "qwen2", **_text_config(vocab, ids, "<|im_end|>", "<|endoftext|>")},
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


def _qwen2_vl(ids: dict[str, int], *, v25: bool = False) -> tuple[Any, dict[str, Any]]:
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    vocab = len(ids)
    text = _text_config(
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
            "model_type": "llama", **_text_config(vocab, ids, "<end_of_utterance>", "<|endoftext|>", head_dim=64)
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


_CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_IDEFICS_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)
_QWEN_SPECIALS = (*_CHATML, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

_SPECS: dict[str, _Spec] = {
    "internvl": _Spec(
        specials=(*_CHATML, "<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        chat_template=_CHATML_TEMPLATE.replace("IMAGE", "'<IMG_CONTEXT>\\n'"),
        build=_internvl,
    ),
    "qwen2_vl": _Spec(
        specials=_QWEN_SPECIALS,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named_tokens={},
        chat_template=_CHATML_TEMPLATE.replace("IMAGE", "'<|vision_start|><|image_pad|><|vision_end|>'"),
        build=_qwen2_vl,
    ),
    "qwen2_5_vl": _Spec(
        specials=_QWEN_SPECIALS,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named_tokens={},
        chat_template=_CHATML_TEMPLATE.replace("IMAGE", "'<|vision_start|><|image_pad|><|vision_end|>'"),
        build=lambda ids: _qwen2_vl(ids, v25=True),
    ),
    "idefics3": _Spec(
        specials=_IDEFICS_SPECIALS,
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        named_tokens={},
        chat_template=_IDEFICS_TEMPLATE,
        build=_idefics3,
    ),
    "smolvlm": _Spec(
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

FAMILIES: tuple[str, ...] = tuple(_SPECS)  # served by transformers' own classes
# Ported seed families: each module writes its own tiny checkpoint in the official layout.
SEED_FAMILIES: tuple[str, ...] = ("minicpm_v2", "mono_internvl", "minimax_vl_01")
ALL_FAMILIES: tuple[str, ...] = FAMILIES + SEED_FAMILIES


def _train_tokenizer(specials: tuple[str, ...], vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer (any text encodes) with `specials` as its first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return tok


def make_tiny_model(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `family` to `out_dir` and return the folder.

    Families: internvl, qwen2_vl, qwen2_5_vl, idefics3, smolvlm (transformers' classes),
    and the seed models minicpm_v2, mono_internvl, minimax_vl_01 (official layout, built by
    their family module). Offline, deterministic for a given seed, safetensors only.
    """
    if family in SEED_FAMILIES:
        from pipeline.inference.registry import family_by_name

        return Path(family_by_name(family).implementation().make_tiny_model(out_dir, seed=seed))
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig, PreTrainedTokenizerFast

    if family not in _SPECS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(ALL_FAMILIES)}")
    spec = _SPECS[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    backend = _train_tokenizer(spec.specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=spec.eos,
        pad_token=spec.pad,
        extra_special_tokens=[t for t in spec.specials if t not in (spec.eos, spec.pad)],
        padding_side="left",
        **spec.named_tokens,
    )
    tokenizer.chat_template = spec.chat_template
    ids = dict(backend.get_vocab())

    config, processor_config = spec.build(ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=ids[spec.eos], pad_token_id=ids[spec.pad], bos_token_id=ids[spec.eos]
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2))
    if family in ("idefics3", "smolvlm"):
        # The processor's image tokens per tile, as the model really produces them; readers that
        # build the processor (vLLM) default to the full-size model's 169 otherwise.
        vision = config.vision_config
        seq_len = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        processor = {"image_seq_len": int(seq_len), "processor_class": processor_config["processor_class"]}
        (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return out


__all__ = ["ALL_FAMILIES", "FAMILIES", "INIT_RANGE", "SEED_FAMILIES", "make_tiny_model"]
