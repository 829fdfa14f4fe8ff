"""Tiny random checkpoints of real architectures, built offline."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from pipeline.testing import FAMILIES, make_tiny_model

CLASSES = {
    "internvl": "InternVLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
}
IMAGE_TOKENS = {
    "internvl": "<IMG_CONTEXT>",
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
}


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_loads_like_a_hub_checkpoint(family: str, tmp_path: Path) -> None:
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoTokenizer,
    )

    make_tiny_model(family, tmp_path / "warm")  # imports happen here, not in the timing below
    start = time.perf_counter()
    path = make_tiny_model(family, tmp_path / family)
    built_s = time.perf_counter() - start
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # safetensors only
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 5_000_000, size
    print(f"{family}: built in {built_s:.2f}s, {size / 1e6:.1f} MB")  # reported, not asserted

    config = AutoConfig.from_pretrained(path)
    assert config.model_type == family
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True)
    assert type(model).__name__ == CLASSES[family]
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and tokenizer.eos_token and tokenizer.pad_token
    image_token = IMAGE_TOKENS[family]
    assert tokenizer(image_token * 3, add_special_tokens=False)["input_ids"] == [config.image_token_id] * 3
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    AutoImageProcessor.from_pretrained(path, backend="pil")  # no torchvision needed
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert "Hello" in text and text.count(image_token) == 1


def test_seed_decides_the_weights(tmp_path: Path) -> None:
    a = make_tiny_model("qwen2_vl", tmp_path / "a", seed=1)
    b = make_tiny_model("qwen2_vl", tmp_path / "b", seed=1)
    c = make_tiny_model("qwen2_vl", tmp_path / "c", seed=2)
    assert _digest(a) == _digest(b) != _digest(c)


def test_random_weights_give_varied_tokens(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    path = make_tiny_model("internvl", tmp_path / "m")
    model = AutoModelForImageTextToText.from_pretrained(path)
    ids = torch.arange(10, 60)[None]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert len(set(out[0, ids.shape[1]:].tolist())) > 3  # initializer_range 0.3: not one repeated token


def test_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        make_tiny_model("llava", tmp_path)


SEED_LAYOUT = {  # the official config.json names of the seed checkpoints
    "minicpm_v2": ("minicpmv", "MiniCPMV", "tokenizer.model"),
    "mono_internvl": ("internvl_chat", "InternVLChatModel", "tokenizer.model"),
    "minimax_vl_01": ("minimax_vl_01", "MiniMaxVL01ForConditionalGeneration", "tokenizer.json"),
}


@pytest.mark.parametrize("family", sorted(SEED_LAYOUT))
def test_make_tiny_model_cli_builds_the_seed_families_in_their_official_layout(family: str, tmp_path: Path, capsys) -> None:
    import json

    from pipeline.cli import main
    from pipeline.inference.registry import recognise
    from pipeline.testing import SEED_FAMILIES

    assert family in SEED_FAMILIES
    assert main(["make-tiny-model", family, str(tmp_path / family)]) == 0
    assert str(tmp_path / family) in capsys.readouterr().out
    folder = tmp_path / family
    config = json.loads((folder / "config.json").read_text())
    model_type, architecture, tokenizer_file = SEED_LAYOUT[family]
    assert config["model_type"] == model_type and config["architectures"] == [architecture]
    assert recognise(config).name == family
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", tokenizer_file} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth", ".py")) for name in names)  # no code, safetensors only


def test_every_family_writes_its_tiny_checkpoints_with_its_own_builder(tmp_path: Path, capsys) -> None:
    # one path for every family: the registry entry names the tiny checkpoints, the family's
    # tiny.py writes them, and each is recognised as that family
    import json

    from pipeline.cli import main
    from pipeline.inference.registry import FAMILIES as REGISTRY
    from pipeline.inference.registry import recognise
    from pipeline.testing import TINY_MODELS

    # the five transformers ones, the three seeds and the seeds' vLLM-CPU variants (text head_dim 64)
    variants = [n for f in REGISTRY if f.name in SEED_LAYOUT for n in f.tiny_names if n != f.name]
    assert "mono_internvl_vllm" in variants
    assert sorted(TINY_MODELS) == sorted([*CLASSES, *SEED_LAYOUT, *variants])
    for family in REGISTRY:
        assert family.tiny_names[0] == family.name
        for name in family.tiny_names:
            assert main(["make-tiny-model", name, str(tmp_path / name)]) == 0
            config = json.loads((tmp_path / name / "config.json").read_text())
            assert recognise(config) == family, name
    assert len(capsys.readouterr().out.splitlines()) == len(TINY_MODELS)
