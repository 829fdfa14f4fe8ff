"""Multi-GPU device maps, computed without GPUs on weightless (meta) models."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.inference.loading import (
    DevicePlan,
    ModelConfigError,
    compute_device_map,
    device_map_bytes,
    pin_to_first,
    resolve_device,
    resolve_dtype,
)

HEADROOM = 0.2
GIB = 2**30


def _internvl_8b_like():
    """InternVL vision tower + a 7B-class Qwen2 decoder (about 12.4 GiB in bf16), with the
    lm_head tied to the embeddings as in InternVL3."""
    from transformers import InternVLConfig

    return InternVLConfig(
        text_config={
            "model_type": "qwen2",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 151_674,
        },
        tie_word_embeddings=True,
    )


def _qwen2_vl_like():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config={
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152_064,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16},
    )


@pytest.fixture(scope="module")
def internvl_meta():
    from pipeline.inference.loading import _meta_model

    return _meta_model(_internvl_8b_like())


def _weights_bytes(model) -> int:
    from accelerate.utils import compute_module_sizes

    return compute_module_sizes(model, dtype=torch.bfloat16)[""]


def _check_map(model, device_map: dict[str, int], gpus: int, per_gpu: int, family: str) -> None:
    # every parameter is placed exactly once, on one of the GPUs
    names = [n for n, _ in model.named_parameters()]
    for name in names:
        owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        assert len(owners) == 1, name
    assert set(device_map.values()) == set(range(gpus))  # all GPUs carry weights
    # the vision tower, projector and embeddings sit on the first GPU
    from pipeline.inference.registry import family_by_name

    first, _last = family_by_name(family).device_groups()
    assert first
    for prefix in first:
        placed = {d for k, d in device_map.items() if k == prefix or k.startswith(prefix + ".") or prefix.startswith(k + ".")}
        assert placed == {0}, prefix
    # decoder layers are never split, and follow each other GPU by GPU
    layer = re.compile(r"\.layers\.(\d+)(\.|$)")
    keys = [k for k in device_map if layer.search(k)]
    assert all(not layer.search(k).group(2) for k in keys), "a decoder layer was split"
    devices = [device_map[k] for k in sorted(keys, key=lambda k: int(layer.search(k).group(1)))]
    assert devices == sorted(devices)
    # weights tied together (InternVL3's lm_head and embeddings) share a device
    from accelerate.utils import find_tied_parameters

    for group in find_tied_parameters(model):
        devices = {d for k, d in device_map.items() for p in group if k == "" or p == k or p.startswith(k + ".")}
        assert len(devices) == 1, group
    # no GPU holds more weights than its memory minus the headroom
    used = device_map_bytes(model, device_map, torch.bfloat16)
    assert all(b <= per_gpu * (1 - HEADROOM) for b in used.values()), used


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_internvl_split_over_fake_gpus(gpus, internvl_meta) -> None:
    total = _weights_bytes(internvl_meta)
    per_gpu = int(total / gpus * 1.4 / (1 - HEADROOM))  # tight: a balanced split needs every GPU
    device_map = compute_device_map(internvl_meta, {g: per_gpu for g in range(gpus)}, HEADROOM, torch.bfloat16)
    _check_map(internvl_meta, device_map, gpus, per_gpu, "internvl")
    from accelerate.utils import find_tied_parameters

    assert find_tied_parameters(internvl_meta)  # the tied-weights check above had something to check


def test_qwen2_vl_split_from_a_config() -> None:
    from pipeline.inference.loading import _meta_model

    config = _qwen2_vl_like()
    model = _meta_model(config)
    per_gpu = int(_weights_bytes(model) / 2 * 1.4 / (1 - HEADROOM))
    device_map = compute_device_map(config, {0: per_gpu, 1: per_gpu}, HEADROOM, torch.bfloat16)
    _check_map(model, device_map, 2, per_gpu, "qwen2_vl")


def test_a_model_that_fits_one_gpu_stays_there(internvl_meta) -> None:
    device_map = compute_device_map(internvl_meta, {0: 80 * GIB}, HEADROOM, torch.bfloat16)
    assert set(device_map.values()) == {0}


def test_too_little_memory_is_a_config_error(internvl_meta) -> None:
    with pytest.raises(ModelConfigError, match="GiB"):
        compute_device_map(internvl_meta, {0: 4 * GIB, 1: 4 * GIB}, HEADROOM, torch.bfloat16)
    with pytest.raises(ModelConfigError):
        compute_device_map(internvl_meta, {}, HEADROOM, torch.bfloat16)


def test_pin_to_first_moves_whole_groups_and_tied_weights() -> None:
    device_map = {"model.visual.blocks.0": 0, "model.visual.blocks.1": 1, "model.language_model.layers.0": 1, "lm_head": 1}
    pinned = pin_to_first(device_map, ("model.visual",), 0)
    assert pinned == {**device_map, "model.visual.blocks.1": 0}
    device_map = {"model.visual": 0, "model.language_model.embed_tokens": 1, "model.language_model.layers.0": 1, "lm_head": 2}
    tied = [["lm_head.weight", "model.language_model.embed_tokens.weight"]]
    pinned = pin_to_first(device_map, ("model.visual", "model.language_model.embed_tokens"), 0, tied)
    assert pinned == {**device_map, "model.language_model.embed_tokens": 0, "lm_head": 0}


def test_resolve_device() -> None:
    assert resolve_device("cpu", available_gpus=4) == DevicePlan("cpu")
    assert resolve_device("auto", available_gpus=0) == DevicePlan("cpu")
    assert resolve_device("auto", available_gpus=2) == DevicePlan("cuda", (0, 1))
    assert resolve_device("1,3", available_gpus=4) == DevicePlan("cuda", (1, 3))
    assert resolve_device("cuda:0", available_gpus=1).first == "cuda:0"
    for bad in ("0,0", "x", "2", ","):
        with pytest.raises(ModelConfigError):
            resolve_device(bad, available_gpus=2)


def test_resolve_dtype_on_cpu() -> None:
    assert resolve_dtype("auto", DevicePlan("cpu")) is torch.float32
    assert resolve_dtype("bfloat16", DevicePlan("cpu")) is torch.bfloat16
