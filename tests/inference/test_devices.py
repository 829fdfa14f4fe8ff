"""`docpipe devices`: where every module goes on N GPUs, from config.json alone (no GPU,
no weights), for every supported family, and the model card's 8-GPU placement of the
real-size MiniMax-VL-01."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pipeline.cli import main, parse_memory_size
from pipeline.inference.loading import meta_model, model_config_for
from pipeline.inference.registry import recognise
from pipeline.testing import make_tiny_model

TINY = ("internvl", "qwen2_vl", "idefics3", "minicpm_v2", "mono_internvl", "minimax_vl_01")
FAMILY_OF = {"internvl": "internvl", "qwen2_vl": "qwen2_vl", "idefics3": "idefics3"}
LAYER = re.compile(r"\.layers\.(\d+)$")


def official_minimax_vl_01_config() -> dict:
    """MiniMax-VL-01's config.json as published (MiniMaxAI/MiniMax-VL-01): a CLIP ViT-L/14 at
    336 px (303M), MiniMax-Text-01 with 80 layers of 32 experts (456B in all)."""
    layers = 80
    alpha = (2 * layers) ** 0.25
    return {
        "architectures": ["MiniMaxVL01ForConditionalGeneration"],
        "model_type": "minimax_vl_01",
        "auto_map": {"AutoConfig": "configuration_minimax_vl_01.MiniMaxVL01Config",
                     "AutoModelForCausalLM": "modeling_minimax_vl_01.MiniMaxVL01ForConditionalGeneration"},
        "image_grid_pinpoints": [[336 * c, 336 * r] for c in range(1, 7) for r in range(1, 7)],
        "image_seq_length": 576,
        "image_token_index": 200025,
        "process_image_mode": "anyres",
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "torch_dtype": "bfloat16",
        "text_config": {
            "architectures": ["MiniMaxText01ForCausalLM"],
            "model_type": "minimax_text_01",
            "attn_type_list": ([0] * 7 + [1]) * 10,  # a softmax-attention layer after every 7 lightning ones
            "block_size": 256,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 6144,
            "intermediate_size": 9216,
            "layernorm_full_attention_alpha": alpha,
            "layernorm_full_attention_beta": 1.0,
            "layernorm_linear_attention_alpha": alpha,
            "layernorm_linear_attention_beta": 1.0,
            "layernorm_mlp_alpha": alpha,
            "layernorm_mlp_beta": 1.0,
            "max_position_embeddings": 10_240_000,
            "num_attention_heads": 64,
            "num_experts_per_tok": 2,
            "num_hidden_layers": layers,
            "num_key_value_heads": 8,
            "num_local_experts": 32,
            "postnorm": True,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10_000_000,
            "rotary_dim": 64,
            "shared_intermediate_size": [0],
            "tie_word_embeddings": False,
            "vocab_size": 200_064,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_act": "quick_gelu",
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
        },
    }


def _devices(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["devices", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _owner(name: str, device_map: dict[str, int]) -> list[str]:
    return [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]


def test_memory_sizes() -> None:
    assert parse_memory_size("80GiB") == 80 * 2**30
    assert parse_memory_size("141GB") == 141 * 10**9
    assert parse_memory_size("1.5 TiB") == int(1.5 * 2**40)
    assert parse_memory_size("24000MiB") == 24000 * 2**20
    for bad in ("80", "80 gigs", "-1GB", "", "0GB"):
        if bad == "80":
            assert parse_memory_size(bad) == 80  # a plain number is bytes
            continue
        with pytest.raises(ValueError):
            parse_memory_size(bad)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_model(name, root / name) for name in TINY}


@pytest.mark.parametrize("name", TINY)
def test_every_family_is_split_over_two_gpus_from_its_config(name: str, tiny_dirs, capsys) -> None:
    folder = tiny_dirs[name]
    family = recognise(json.loads((folder / "config.json").read_text()))
    assert family.name == FAMILY_OF.get(name, name)
    model = meta_model(model_config_for(family, folder), family)
    assert all(p.device.type == "meta" for p in model.parameters())  # no weights were read
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=torch.bfloat16)
    total = sizes[""]
    first, last = family.device_groups()
    pinned_first = sum(sizes.get(prefix, 0) for prefix in first)
    limit = max(0.75 * total, 1.03 * pinned_first)  # (some tiny models are mostly vision tower)
    assert limit < total  # one GPU is too small, two are enough
    per_gpu = int(limit / 0.8)  # 20 % headroom
    code, out, err = _devices(capsys, str(folder), "--gpus", "2", "--gpu-memory", str(per_gpu), "--json")
    assert code == 0, err
    device_map = json.loads(out)
    assert set(device_map.values()) == {0, 1}
    for param, _ in model.named_parameters():  # every weight is placed exactly once
        assert len(_owner(param, device_map)) == 1, param
    for prefix in first:  # vision side and embeddings where the inputs go
        placed = {d for k, d in device_map.items() if k == prefix or k.startswith(prefix + ".") or prefix.startswith(k + ".")}
        assert placed == {0}, prefix
    for prefix in last:  # final norm and lm_head on the last GPU
        placed = {d for k, d in device_map.items() if k == prefix or k.startswith(prefix + ".") or prefix.startswith(k + ".")}
        assert placed == {1}, prefix
    layers = sorted((int(LAYER.search(k).group(1)), d) for k, d in device_map.items() if LAYER.search(k))
    assert [d for _, d in layers] == sorted(d for _, d in layers)  # decoder layers in order, GPU by GPU

    code, out, _ = _devices(capsys, str(folder), "--gpus", "2", "--gpu-memory", str(per_gpu))
    assert code == 0 and "GPU 0:" in out and "GPU 1:" in out and family.name in out


def test_one_gpu_lists_the_top_level_modules(tiny_dirs, capsys) -> None:
    code, out, _ = _devices(capsys, str(tiny_dirs["minicpm_v2"]), "--gpus", "1", "--gpu-memory", "1GiB", "--json")
    assert code == 0
    device_map = json.loads(out)
    assert {"vpm", "resampler"} <= set(device_map) and set(device_map.values()) == {0}
    assert all(k.startswith(("vpm", "resampler", "llm", "rotary")) for k in device_map)


def test_too_little_memory_and_unknown_models_are_one_line_errors(tiny_dirs, tmp_path, capsys) -> None:
    code, out, err = _devices(capsys, str(tiny_dirs["mono_internvl"]), "--gpus", "2", "--gpu-memory", "1000")
    assert code == 2 and not out and err.count("\n") == 1 and "GiB" in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    code, out, err = _devices(capsys, str(tmp_path), "--gpus", "2", "--gpu-memory", "80GiB")
    assert code == 2 and "llava_next" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def minimax_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("minimax-vl-01")
    (folder / "config.json").write_text(json.dumps(official_minimax_vl_01_config()))
    return folder


def test_minimax_vl_01_gets_the_model_cards_8_gpu_placement(minimax_folder, capsys) -> None:
    # bf16 weights are ~851 GiB: eight 141 GB GPUs hold them with 10 % kept free (the card itself used int8)
    code, out, err = _devices(capsys, str(minimax_folder), "--gpus", "8", "--gpu-memory", "141GB", "--headroom", "0.1",
                              "--json")
    assert code == 0, err
    device_map = json.loads(out)
    expected = {
        "vision_tower": 0,
        "multi_modal_projector": 0,
        "image_newline": 0,
        "language_model.model.embed_tokens": 0,
        "language_model.model.norm": 7,
        "language_model.lm_head": 7,
        # the card: layers_per_device = 80 // 8, layer i * 10 + j on GPU i
        **{f"language_model.model.layers.{i * 10 + j}": i for i in range(8) for j in range(10)},
    }
    assert {k: device_map.get(k) for k in expected} == expected
    assert set(device_map) - set(expected) <= {"language_model.model.rotary_emb"}  # weightless, with the embeddings
    assert device_map.get("language_model.model.rotary_emb", 0) == 0


def test_minimax_vl_01_summary_counts_456b_split_evenly(minimax_folder, capsys) -> None:
    code, out, err = _devices(capsys, str(minimax_folder), "--gpus", "8", "--gpu-memory", "141GB", "--headroom", "0.1")
    assert code == 0, err
    params = float(re.search(r"([0-9.]+) B parameters", out).group(1))
    assert 450 < params < 462  # the model card's 456B: the config above is the real one
    per_gpu = [float(x) for x in re.findall(r"GPU \d: +([0-9.]+) GiB of weights", out)]
    assert len(per_gpu) == 8 and max(per_gpu) - min(per_gpu) < 0.05 * max(per_gpu)  # even split
    assert max(per_gpu) <= 141e9 * 0.9 / 2**30  # (with the default 20 % kept free it would not fit)


def test_minimax_vl_01_in_int8_fits_eight_80gb_gpus_as_the_card_runs_it(minimax_folder, capsys) -> None:
    # the card: int8 weights (its modules_to_not_convert kept in bf16) on 8 GPUs, default headroom
    code, out, err = _devices(capsys, str(minimax_folder), "--gpus", "8", "--gpu-memory", "80GB", "--dtype", "int8")
    assert code == 0, err
    per_gpu = [float(x) for x in re.findall(r"GPU \d: +([0-9.]+) GiB of weights", out)]
    limit = 80e9 * 0.8 / 2**30
    assert len(per_gpu) == 8 and max(per_gpu) <= limit
    # ~1 byte per converted weight plus the bf16 vision side, embeddings, lm_head and routers
    assert 456e9 / 2**30 < sum(per_gpu) < 470e9 / 2**30
    assert per_gpu[0] > per_gpu[1] and per_gpu[7] > per_gpu[1]  # bf16 embeddings / lm_head on the ends
    assert "language_model.model.layers.79     GPU 7" in out and "vision_tower" in out


def test_vllm_sizing_of_minimax_vl_01_is_one_instance_over_8_gpus_with_expert_parallel(minimax_folder, capsys) -> None:
    # the real deployment: 8 x 141 GB, bf16; vLLM splits every layer over the 8 GPUs (whole experts
    # per GPU for the MoE), keeps the 0.3B vision side whole on each and caches keys and values of
    # the 10 softmax-attention layers only (the 70 lightning layers keep a per-sequence state)
    code, out, err = _devices(capsys, str(minimax_folder), "--gpus", "8", "--gpu-memory", "141GB", "--headroom", "0.1")
    assert code == 0, err
    assert "vLLM: --engine vllm --tensor-parallel-size 8 (expert parallel" in out
    weights = float(re.search(r"one instance over all GPUs; ([0-9.]+) GiB of weights per GPU", out).group(1))
    assert 456e9 * 2 / 8 / 2**30 < weights < 456e9 * 2 / 8 / 2**30 + 1  # an eighth of the bf16 weights + the vision side
    assert "KV cache: 5.0 KiB per token per GPU (10 attention layers; the 70 linear-attention layers" in out
    room = float(re.search(r"at --gpu-memory-utilization 0.9: ([0-9.]+) GiB per GPU", out).group(1))
    assert abs(room - (141e9 * 0.9 / 2**30 - weights)) < 0.02


def test_vllm_sizing_of_a_small_model_is_one_instance_per_gpu(tiny_dirs, capsys) -> None:
    code, out, err = _devices(capsys, str(tiny_dirs["mono_internvl"]), "--gpus", "2", "--gpu-memory", "80GiB")
    assert code == 0, err
    assert "vLLM: --engine vllm --tensor-parallel-size 1\n" in out
    assert "2 instances of 1 GPU(s): run one docpipe worker per instance" in out
