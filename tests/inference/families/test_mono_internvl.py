"""Mono-InternVL-2B ported natively: layout, page geometry, chat format, batched decoding.

The fixture `tests/fixtures/mono_internvl_ref/` holds what the ORIGINAL code produced
(tools/equivalence/mono_internvl.py --write-fixture): its tokenizer files and saved
config.json, the prompt ids its chat() built for three page sizes and questions, and the
original tokenizer's ids and decodes for a few awkward strings. Logits and greedy ids
against the original are checked by that tool, not here (the original cannot run in CI).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.support.static_engine import StaticEngine
from pipeline.inference import Engine
from pipeline.inference.adapters import CHART, DESCRIPTION, OCR
from pipeline.inference.families import mono_internvl as mono
from pipeline.testing import sample_image_page

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "mono_internvl_ref"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Tiny models on shared cores: one torch thread is much faster than two (conftest)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mono.make_tiny_model(tmp_path_factory.mktemp("mono") / "tiny", seed=0)


@pytest.fixture(scope="module")
def model(tiny: Path) -> mono.MonoInternVLForConditionalGeneration:
    return mono.load_model(tiny, dtype=torch.float32)


def _builder(folder: Path, **overrides: int) -> mono.MonoInternVLBuilder:
    return mono.load_builder(
        folder, mono.load_config(folder), tasks=(DESCRIPTION, OCR, CHART), chart_questions=("What is the title?",),
        **overrides,
    )


# ---------------------------------------------------------------------------------------
# checkpoint layout and recognition
# ---------------------------------------------------------------------------------------

OFFICIAL_KEY = (
    r"vision_model\.embeddings\.(class_embedding|position_embedding|patch_embedding\.(weight|bias))"
    r"|mlp1\.[013]\.(weight|bias)"
    r"|language_model\.model\.tok_embeddings\.weight"
    r"|language_model\.model\.layers\.\d+\.(attention\.(wqkv|wo)|feed_forward(_ve)?\.w[123])\.weight"
    r"|language_model\.model\.layers\.\d+\.(attention_norm|ffn_norm)\.weight"
    r"|language_model\.model\.norm\.weight|language_model\.output\.weight"
)


def test_tiny_folder_has_the_official_layout_and_loads_exactly(tiny: Path, model: torch.nn.Module) -> None:
    import re

    from safetensors import safe_open

    raw = json.loads((tiny / "config.json").read_text())
    assert raw["architectures"] == ["InternVLChatModel"] and raw["model_type"] == "internvl_chat"
    assert raw["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"]
    assert raw["vision_config"]["model_type"] == "intern_vit_patch"
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "model.safetensors"):
        assert (tiny / name).is_file(), name
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    bad = sorted(k for k in keys if not re.fullmatch(OFFICIAL_KEY, k))
    assert not bad, bad
    assert any(".feed_forward_ve.w1." in k for k in keys) and "vision_model.embeddings.class_embedding" in keys
    assert set(model.state_dict()) == keys  # load_model raises on missing/unexpected keys
    assert mono.recognise(raw)


def test_meta_model_has_the_checkpoint_keys_and_no_storage(tiny: Path) -> None:
    meta = mono.meta_model(mono.load_config(tiny))
    assert all(p.device.type == "meta" for p in meta.parameters())
    names = {n for n, _ in meta.named_parameters()}
    assert "language_model.model.layers.1.feed_forward_ve.w2.weight" in names
    assert any(n.startswith(mono.FIRST_DEVICE) for n in names)
    assert any(n.startswith(mono.LAST_DEVICE) for n in names)


def test_regular_internvl_is_not_mono() -> None:
    raw = json.loads((FIXTURE / "config.json").read_text())  # as the original code saved it
    assert mono.recognise(raw)
    plain_llm = {**raw, "llm_config": {**raw["llm_config"], "architectures": ["InternLM2ForCausalLM"]}}
    assert not mono.recognise(plain_llm)
    # the vision config does not decide (vLLM's and lmdeploy's rule): whatever model_type or layer count it
    # states, the LLM with visual experts makes it Mono-InternVL
    for vision in ({"model_type": "intern_vit_6b", "num_hidden_layers": 24}, {"model_type": "intern_vit_patch"},
                   {"model_type": "intern_vit_6b", "num_hidden_layers": 0}):
        assert mono.recognise({**raw, "vision_config": {**raw["vision_config"], **vision}})
    assert not mono.recognise({"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl"})
    assert not mono.recognise({**raw, "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"})


def test_config_reads_the_original_saved_config() -> None:
    config = mono.MonoInternVLConfig.from_pretrained(FIXTURE)
    assert config.template == "internlm2-chat" and config.ps_version == "v2" and config.select_layer == -1
    assert config.num_image_token == 256 and config.tile_size == 448
    llm = config.llm_config
    assert (llm.hidden_size, llm.num_attention_heads, llm.num_key_value_heads, llm.bias) == (64, 4, 2, False)
    assert llm.rope_parameters["rope_type"] == "dynamic" and llm.rope_parameters["rope_theta"] == 1000000
    assert config.get_text_config() is llm


# ---------------------------------------------------------------------------------------
# page geometry
# ---------------------------------------------------------------------------------------


def _dynamic_preprocess_grid(width: int, height: int, max_num: int = 12, tile: int = 448) -> tuple[int, int]:
    """InternVL's rule, stated directly: among (cols, rows) with 1 <= cols*rows <= max_num,
    in increasing tile count (ties in generation order), the smallest |aspect difference|
    wins; an equal difference later in the list wins only when the page area is more
    than half the candidate grid's area."""
    seen: list[tuple[int, int]] = []
    for n in range(1, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if i * j <= max_num and (i, j) not in seen:
                    seen.append((i, j))
    candidates = sorted(set(seen), key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(width / height - cols / rows)
        if diff < best_diff or (diff == best_diff and width * height > 0.5 * tile * tile * cols * rows):
            best, best_diff = (cols, rows), diff
    return best


def test_plan_follows_dynamic_preprocess_over_many_sizes(tiny: Path) -> None:
    builder = _builder(tiny)
    rng = np.random.default_rng(3)
    sizes = [(448, 448), (896, 448), (1000, 600), (600, 1400), (1700, 2200), (2400, 500), (300, 3000), (1, 1)]
    sizes += [tuple(int(v) for v in rng.integers(50, 4000, 2)) for _ in range(200)]
    for width, height in sizes:
        plan = builder.plan(width, height)
        cols, rows = _dynamic_preprocess_grid(width, height)
        assert (plan.cols, plan.rows) == (cols, rows), (width, height)
        assert (plan.resized_width, plan.resized_height) == (448 * cols, 448 * rows)
        tiles = cols * rows + (1 if cols * rows > 1 else 0)
        assert plan.tiles == tiles and plan.visual_tokens == 64 * tiles
        assert builder.image_text(plan).count(mono.IMG_CONTEXT) == plan.visual_tokens


def test_prepared_page_pixels_are_torchvision_normalised(tiny: Path) -> None:
    builder = _builder(tiny, max_tiles=4)
    page = sample_image_page(700, 500, seed=2)
    prepared = builder.build(page, builder.plan(700, 500))
    pixels = prepared.pixel_values
    assert pixels.shape == (prepared.plan.tiles, 3, 448, 448) and pixels.dtype == np.float32
    # the first tile, computed the torchvision way (ToTensor: / 255 in float32, then Normalize)
    tile = np.asarray(page.image.resize((448 * prepared.plan.cols, 448 * prepared.plan.rows), 3).crop((0, 0, 448, 448)))
    expected = (tile.astype(np.float32) / np.float32(255) - np.float32(mono.IMAGENET_MEAN)) / np.float32(mono.IMAGENET_STD)
    np.testing.assert_array_equal(pixels[0], expected.transpose(2, 0, 1))
    for ids in prepared.prompts.values():
        assert int((ids == builder.image_token_id).sum()) == prepared.plan.visual_tokens


# ---------------------------------------------------------------------------------------
# chat format and tokenizer against the original's ids
# ---------------------------------------------------------------------------------------


def test_prompt_ids_equal_the_original_chat_format() -> None:
    reference = json.loads((FIXTURE / "reference.json").read_text())
    config = mono.MonoInternVLConfig.from_pretrained(FIXTURE)
    builder = mono.MonoInternVLBuilder(mono.InternLM2Tokenizer.from_folder(FIXTURE), config)
    for case in reference["cases"]:
        width, height = (int(v) for v in case["size"].split("x"))
        plan = builder.plan(width, height)
        assert plan.tiles == case["tiles"] and plan.visual_tokens == case["image_tokens"]
        text = builder.chat_text(case["question"], plan)
        run = mono.IMG_CONTEXT * plan.visual_tokens
        assert text.replace(run, mono.IMG_CONTEXT, 1) == case["query_image_run_collapsed"]
        assert builder.encode_text(text).tolist() == case["input_ids"], case["size"]


def test_tokenizer_matches_the_original_slow_tokenizer() -> None:
    ref = json.loads((FIXTURE / "reference.json").read_text())["tokenizer"]
    tokenizer = mono.InternLM2Tokenizer.from_folder(FIXTURE)
    for text, ids in zip(ref["strings"], ref["ids"], strict=True):
        assert tokenizer.encode(text) == ids, text
    for ids, text, raw in zip(ref["decode_inputs"], ref["decoded"], ref["decoded_raw"], strict=True):
        assert tokenizer.decode(ids, skip_special_tokens=True) == text, ids
        assert tokenizer.decode(ids) == raw, ids
    assert tokenizer.pad_token_id == ref["pad"] and tokenizer.eos_token_id == ref["eos"]
    builder = mono.MonoInternVLBuilder(tokenizer, mono.MonoInternVLConfig.from_pretrained(FIXTURE))
    assert builder.tokenizer.eos_token_id == ref["im_end"]  # generation stops at the end of turn, as chat()
    assert builder.tokenizer.get_vocab()["<|im_end|>"] == ref["im_end"]


def test_builder_pickles_without_weights(tiny: Path) -> None:
    builder = _builder(tiny)
    clone = pickle.loads(pickle.dumps(builder))
    text = builder.chat_text("Describe the page.", builder.plan(900, 1200))
    assert clone.encode_text(text).tolist() == builder.encode_text(text).tolist()
    assert clone.tokenizer.eos_token_id == builder.tokenizer.eos_token_id
    assert len(pickle.dumps(builder)) < 200_000


# ---------------------------------------------------------------------------------------
# the model: visual experts, batched generation
# ---------------------------------------------------------------------------------------


def test_visual_experts_serve_image_positions_at_prefill_only(tiny: Path) -> None:
    model = mono.load_model(tiny, dtype=torch.float32)
    builder = _builder(tiny, max_tiles=2)
    prepared = builder.build(sample_image_page(600, 400, seed=5), builder.plan(600, 400))
    ids = torch.from_numpy(prepared.prompts[DESCRIPTION])[None]
    text_ids = ids[:, -12:]  # the question's tail: no image placeholder
    pixels = torch.from_numpy(prepared.pixel_values)
    with torch.no_grad():
        with_image = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
        text_only = model(input_ids=text_ids, use_cache=False).logits
        for layer in model.language_model.model.layers:
            layer.feed_forward_ve.w2.weight.mul_(3.0)
        assert not torch.allclose(model(input_ids=ids, pixel_values=pixels, use_cache=False).logits, with_image)
        torch.testing.assert_close(model(input_ids=text_ids, use_cache=False).logits, text_only, rtol=0, atol=0)


def test_batched_left_padded_generate_equals_one_prompt_at_a_time(tiny: Path, model: torch.nn.Module) -> None:
    builder = _builder(tiny, max_tiles=4)
    pages = [builder.build(sample_image_page(w, h, seed=s), builder.plan(w, h))
             for w, h, s in ((700, 500, 1), (500, 900, 2))]
    engine = Engine(model, builder, model_id="tiny", revision=None, dtype="float32", max_new_tokens=6,
                    batch_visual_tokens=10_000, max_batch_pages=8, min_new_tokens=6)
    static = StaticEngine.like(engine)
    with torch.inference_mode():
        features = builder.encode(model, pages)
        rows = [(0, DESCRIPTION), (1, OCR), (0, mono_chart_key())]
        prompt_ids = [pages[i].prompts[key] for i, key in rows]
        assert len({len(p) for p in prompt_ids}) == 3  # different lengths: left padding is exercised
        batched = engine.generate(prompt_ids, [features[i] for i, _ in rows])
        for (i, key), gen in zip(rows, batched, strict=True):
            alone = engine.generate([pages[i].prompts[key]], [features[i]])[0]
            naive = static._generate_naive(pages[i], key)  # raw pixel values, as the model card does
            assert gen.tokens == alone.tokens == naive.tokens, (i, key)
    assert len({t for gen in batched for t in gen.tokens}) > 2  # the tiny model does not emit one token


def mono_chart_key() -> str:
    from pipeline.inference.adapters import chart_key

    return chart_key(0)


def test_load_model_refuses_a_folder_whose_keys_differ(tiny: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, tmp_path / name)
    state = load_file(str(tiny / "model.safetensors"))
    state["language_model.model.layers.0.feed_forward_ve.w9.weight"] = state.pop(
        "language_model.model.layers.0.feed_forward_ve.w1.weight"
    )
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="feed_forward_ve"):
        mono.load_model(tmp_path, dtype=torch.float32)
    with pytest.raises(TypeError, match="max_slices"):
        mono.load_builder(tiny, mono.load_config(tiny), tasks=(DESCRIPTION,), chart_questions=(), max_slices=3)


def test_a_checkpoint_with_vit_encoder_weights_is_refused(tiny: Path, tmp_path: Path) -> None:
    """The other side of recognising by the LLM alone: a ViT encoder in the weights is not silently dropped."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "vit"
    shutil.copytree(tiny, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["vision_model.encoder.layers.0.attn.qkv.weight"] = torch.zeros(3, 3)
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected_keys"):
        mono.load_model(broken, dtype=torch.float32)
