"""What every family's tiny checkpoint builder shares (tests, smoke runs), built offline.

Each family writes its own tiny checkpoint in `pipeline/inference/families/<name>/tiny.py`
(found through the registry: `pipeline.testing.make_tiny_model(name, dir)`, `docpipe
make-tiny-model NAME DIR`). The families transformers has classes for share what is here: a
byte-level BPE tokenizer trained with `tokenizers` on a few sentences (with the family's
special tokens and a chat template in the style of the real checkpoints), a 2-layer text
config, and `save_tiny_checkpoint`, which writes a folder that loads exactly like a hub
checkpoint through transformers (`AutoModelForImageTextToText`, `AutoTokenizer`,
`AutoImageProcessor(backend="pil")`): config + safetensors weights, the tokenizer and the
image processor config. Nothing is downloaded. Each model is about 1 MB and builds in well
under a second.

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

# A Jinja ChatML template in the style of the real checkpoints (InternVL3, Qwen2-VL);
# IMAGE is replaced by the family's image text.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ IMAGE }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class TinySpec:
    """How to build one tiny checkpoint: its special tokens and how to make config + processor."""

    specials: tuple[str, ...]
    eos: str
    pad: str
    named_tokens: dict[str, str]
    chat_template: str
    build: Callable[[dict[str, int]], tuple[Any, dict[str, Any]]]


def text_config(vocab_size: int, ids: dict[str, int], eos: str, pad: str, **extra: Any) -> dict[str, Any]:
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


def train_tokenizer(specials: tuple[str, ...], vocab_size: int = 400) -> Any:
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


def save_tiny_checkpoint(spec: TinySpec, out_dir: str | Path, *, seed: int = 0) -> tuple[Path, Any, dict[str, Any]]:
    """Write a tiny random checkpoint of a family transformers has classes for to `out_dir`:
    (the folder, the model config, the image processor config). Offline, deterministic for a
    given seed, safetensors only."""
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        GenerationConfig,
        PreTrainedTokenizerFast,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    backend = train_tokenizer(spec.specials)
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
    return out, config, processor_config


__all__ = ["CHATML", "CHATML_TEMPLATE", "INIT_RANGE", "TinySpec", "save_tiny_checkpoint", "text_config",
           "train_tokenizer"]
