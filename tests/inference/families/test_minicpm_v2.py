"""MiniCPM-V 2.0 port: official layout, the model's own slicing, batched greedy, original prompt ids."""

from __future__ import annotations

import base64
import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.inference.families import minicpm_v2 as fam
from pipeline.inference.generation import GREEDY

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "minicpm_v2_prompt_ids.json"

# Key patterns of the real checkpoint (openbmb/MiniCPM-V-2, model.safetensors.index.json), layer numbers as N.
REAL_PATTERNS = {
    "llm.lm_head.weight", "llm.model.embed_tokens.weight", "llm.model.norm.weight",
    *(f"llm.model.layers.N.{p}.weight" for p in (
        "input_layernorm", "post_attention_layernorm", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
        "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")),
    "resampler.attn.in_proj_bias", "resampler.attn.in_proj_weight", "resampler.attn.out_proj.bias",
    "resampler.attn.out_proj.weight", "resampler.kv_proj.weight", "resampler.ln_kv.bias", "resampler.ln_kv.weight",
    "resampler.ln_post.bias", "resampler.ln_post.weight", "resampler.ln_q.bias", "resampler.ln_q.weight",
    "resampler.pos_embed", "resampler.proj", "resampler.query",
    *(f"vpm.blocks.N.{p}.{w}" for p in ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2", "norm1", "norm2")
      for w in ("weight", "bias")),
    "vpm.norm.bias", "vpm.norm.weight", "vpm.patch_embed.proj.bias", "vpm.patch_embed.proj.weight", "vpm.pos_embed",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one torch thread is faster, and far faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fam.make_tiny_model(tmp_path_factory.mktemp("minicpm_v2"), seed=0)


@pytest.fixture(scope="module")
def model(tiny: Path) -> fam.MiniCPMV2ForConditionalGeneration:
    return fam.load_model(tiny, dtype=torch.float32)


@pytest.fixture(scope="module")
def builder(tiny: Path, model: fam.MiniCPMV2ForConditionalGeneration) -> fam.MiniCPMV2Builder:
    return fam.load_builder(tiny, model.config)


# ---------------------------------------------------------------------------------------
# layout and loading
# ---------------------------------------------------------------------------------------


def test_tiny_folder_has_the_official_layout(tiny: Path) -> None:
    from safetensors import safe_open

    raw = json.loads((tiny / "config.json").read_text())
    assert raw["architectures"] == ["MiniCPMV"] and raw["model_type"] == "minicpmv"
    assert raw["vision_encoder"].startswith("vit_so400m_patch14_siglip_384") and "vision_config" in raw
    assert fam.recognise(raw)
    assert not fam.recognise({**raw, "version": 2.6})  # MiniCPM-V 2.6 shares model_type and architecture
    assert not fam.recognise({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json"):
        assert (tiny / name).is_file(), name
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert {re.sub(r"\.\d+\.", ".N.", k) for k in keys} == REAL_PATTERNS
    # vision_config.num_hidden_layers counts the block that drop_vision_last_layer removes
    blocks = {int(k.split(".")[2]) for k in keys if k.startswith("vpm.blocks.")}
    assert blocks == set(range(raw["vision_config"]["num_hidden_layers"] - 1))


def test_loads_with_no_missing_or_unexpected_keys(tiny: Path) -> None:
    config = fam.load_config(tiny)
    loaded, info = fam.MiniCPMV2ForConditionalGeneration.from_pretrained(
        str(tiny), config=config, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    spec = fam.vision_spec(config)
    assert (spec.width, spec.depth, spec.heads) == (64, 3, 2)
    assert loaded.resampler.attn.num_heads == config.hidden_size // 128


def test_placement_prefixes_name_real_modules(tiny: Path) -> None:
    meta = fam.meta_model(fam.load_config(tiny))
    names = {name for name, _ in meta.named_modules()}
    for prefix in fam.FIRST_DEVICE + fam.LAST_DEVICE:
        assert prefix in names, prefix
    assert "MiniCPMDecoderLayer" in meta._no_split_modules
    assert all(p.device.type == "meta" for p in meta.parameters())


# ---------------------------------------------------------------------------------------
# slicing: an independent statement of the image processor's rule
# ---------------------------------------------------------------------------------------


def _nearest(length: float, step: int) -> int:
    return max(round(length / step) * step, step)


def _scaled(w: float, h: float, upscale: bool, res: int = 448, patch: int = 14) -> tuple[int, int]:
    if w * h > res * res or upscale:
        r = w / h
        h = int(res / math.sqrt(r))
        w = int(h * r)
    return _nearest(w, patch), _nearest(h, patch)


def _reference_slicing(w: int, h: int, max_slices: int = 9) -> tuple[tuple[int, int], list[tuple[int, int, int, int]], tuple[int, int] | None]:
    """(first image size, slice boxes in the refined image, refined size or None) per the processor."""
    multiple = min(math.ceil(w * h / 448**2), max_slices)
    if multiple <= 1:
        return _scaled(w, h, True), [], None
    grids = [[m, n // m] for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slices
             for m in range(1, n + 1) if n % m == 0]
    best, err = [1, 1], float("inf")
    for g in grids:
        e = abs(math.log(w / h) - math.log(g[0] / g[1]))
        if e < err:
            best, err = g, e
    cw, ch = _nearest(w, best[0]) / best[0], _nearest(h, best[1]) / best[1]
    sw, sh = _scaled(cw, ch, True)
    boxes = [(x, y, x + sw, y + sh) for y in range(0, sh * best[1], sh) for x in range(0, sw * best[0], sw)]
    return _scaled(w, h, False), boxes, (sw * best[0], sh * best[1])


SIZES = [(w, h) for w in (1, 14, 100, 447, 448, 449, 612, 1000, 1344, 1700, 2481, 5000)
         for h in (1, 30, 200, 448, 600, 792, 1400, 2200, 3508, 9000)]


@pytest.mark.parametrize("max_slices", [9, 4])
def test_plan_follows_the_image_processor(builder: fam.MiniCPMV2Builder, max_slices: int) -> None:
    b = pickle.loads(pickle.dumps(builder))
    b.max_slices = max_slices
    for w, h in SIZES:
        first, boxes, refined = _reference_slicing(w, h, max_slices)
        plan = b.plan(w, h)
        if refined is None:
            assert not plan.thumbnail and plan.tiles == 1, (w, h)
            assert (plan.resized_width, plan.resized_height) == first, (w, h)
        else:
            assert plan.thumbnail and plan.thumbnail_size == first, (w, h)
            assert (plan.resized_width, plan.resized_height) == refined, (w, h)
            assert [bx.as_tuple() for bx in plan.boxes] == boxes, (w, h)
        assert plan.visual_tokens == 64 * (1 + len(boxes))


@pytest.mark.parametrize("size", [(448, 448), (1000, 600), (600, 1400), (1700, 2200)])
def test_pixels_and_prompt_match_the_plan(builder: fam.MiniCPMV2Builder, size: tuple[int, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    plan = builder.plan(*size)
    coded, extra = builder.pixels(image, plan)
    first, boxes, _ = _reference_slicing(*size)
    want = [first[::-1]] + [(b[3] - b[1], b[2] - b[0]) for b in boxes]  # overview first, then row-major
    assert [tuple(s) for s in extra["tile_sizes"]] == want
    assert coded.decode().shape == (1, 3, 1, sum(h * w for h, w in want))
    # normalisation as the processor: x / 255 in float32, then (x - 0.5) / 0.5
    first_pixels = coded.decode()[0, :, 0, : want[0][0] * want[0][1]].reshape(3, *want[0])
    resized = np.asarray(image.resize(first, Image.Resampling.BICUBIC)).astype(np.float32) / 255
    assert np.array_equal(first_pixels, ((resized - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1))
    text = builder.chat_text("Q?", plan)
    assert text.startswith("<用户><image>") and text.endswith("\nQ?<AI>") and text.count("<AI>") == 1
    assert text.count("<slice>") == (1 if boxes else 0) and text.count("<image>") == len(want)
    ids = builder.encode_text(text)
    assert builder.placeholder_count(ids) == plan.visual_tokens


# ---------------------------------------------------------------------------------------
# generation: batched left-padded rows == one at a time
# ---------------------------------------------------------------------------------------


def _greedy(model, builder, rows, max_new_tokens=8) -> list[list[int]]:
    from transformers import GenerationConfig

    inputs = builder.rows_to_inputs(model, rows)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=[builder.tokenizer.eos_token_id], pad_token_id=builder.pad_token_id)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def test_batched_generation_equals_one_at_a_time(model, builder) -> None:
    from pipeline.testing import render_sample_page

    page = render_sample_page(dpi=72.0)  # 612 x 792: sliced, overview first
    plan = builder.plan(*page.image.size)
    assert plan.thumbnail
    prepared = pickle.loads(pickle.dumps(builder)).build(page, plan)
    prompts = list(prepared.prompts.values())
    assert len({len(p) for p in prompts}) == len(prompts) >= 3  # different lengths: real left padding
    with torch.inference_mode():
        feats = builder.encode(model, [prepared])[0]
    batched = _greedy(model, builder, [(ids, feats) for ids in prompts])
    single = [_greedy(model, builder, [(ids, feats)])[0] for ids in prompts]
    assert batched == single
    assert len({t for row in single for t in row}) > 3  # varied outputs, so the comparison means something
    # the naive path (raw pixel values into generate) gives the same as pre-encoded features
    naive = builder.naive_inputs(prepared, next(iter(prepared.prompts)), "cpu")
    from transformers import GenerationConfig

    with torch.inference_mode():
        out = model.generate(**naive, generation_config=GenerationConfig(
            max_new_tokens=8, do_sample=False, num_beams=1, eos_token_id=[2], pad_token_id=builder.pad_token_id))
    assert out[0, naive["input_ids"].shape[1]:].tolist() == single[0]


def test_engine_answers_like_the_naive_path(model, builder) -> None:
    from pipeline.inference.engine import Engine
    from pipeline.testing import render_sample_page

    pages = [render_sample_page(dpi=72.0, doc_id="a"), render_sample_page(dpi=50.0, doc_id="b", chart=False)]
    prepared = [builder.build(p, builder.plan(*p.image.size)) for p in pages]
    engine = Engine(model, builder, model_id="tiny", revision=None, dtype="float32", max_new_tokens=6,
                    batch_visual_tokens=10_000, max_batch_pages=4)
    from bench.support.static_engine import StaticEngine

    batched, naive = engine.answer(prepared), StaticEngine.like(engine).answer_naive(prepared)
    assert [a.error for a in batched] == [None, None]
    assert [(a.description, a.ocr_text, a.chart_check_answer) for a in batched] == [
        (a.description, a.ocr_text, a.chart_check_answer) for a in naive]


# ---------------------------------------------------------------------------------------
# tokenizer and prompt ids: what the ORIGINAL code produced (fixture)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def fixture_tokenizer(original: dict, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> fam.SentencePieceTokenizer:
    folder = tmp_path_factory.mktemp("minicpm_v2_tok")
    (folder / "tokenizer.model").write_bytes(base64.b64decode(original["tokenizer_model_base64"]))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_text((tiny / name).read_text())
    return fam.load_tokenizer(folder)


def test_text_ids_equal_the_original_slow_tokenizer(original: dict, fixture_tokenizer) -> None:
    for case in original["texts"]:
        assert fixture_tokenizer.encode(case["text"]) == case["ids"], case["text"]
    assert fixture_tokenizer.encode("<用户>hi")[:3] == [1, fixture_tokenizer.convert_tokens_to_ids("\u2581"), 113]


def test_chat_prompt_ids_equal_the_original(original: dict, fixture_tokenizer) -> None:
    b = fam.MiniCPMV2Builder(fixture_tokenizer, fam.MiniCPMV2Config.from_dict(fam.tiny_config_dict()))
    for case in original["prompts"]:
        plan = b.plan(case["width"], case["height"])
        assert b.encode_text(b.chat_text(case["question"], plan)).tolist() == case["ids"], case["question"]


def test_decode_follows_the_original(original: dict, fixture_tokenizer) -> None:
    for case in original["decode"]:
        assert fixture_tokenizer.decode(case["ids"], skip_special_tokens=True) == case["skip_special_tokens"]
        assert fixture_tokenizer.decode(case["ids"]) == case["raw"]
    tok = pickle.loads(pickle.dumps(fixture_tokenizer))
    assert tok.encode("hello world") == fixture_tokenizer.encode("hello world")
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0 and tok.get_vocab()["<image>"] == 101


def test_a_folder_with_a_weight_missing_is_refused(tiny: Path, tmp_path: Path) -> None:
    """A missing weight would otherwise stay at its random initial value, silently."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights.pop(next(k for k in weights if k.startswith("resampler.")))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not match the MiniCPM-V 2.0 layout"):
        fam.load_model(broken, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# the family's own decoding: chat(sampling=False) = 3 beams, repetition_penalty 1.2
# ---------------------------------------------------------------------------------------


def test_beam_search_batched_equals_one_at_a_time(model, builder) -> None:
    """Beams copy each row; the image features must follow their rows (the model's own expansion)."""
    from pipeline.inference.engine import Engine
    from pipeline.testing import render_sample_page

    pages = [render_sample_page(dpi=72.0, doc_id="a"), render_sample_page(dpi=50.0, doc_id="b", chart=False)]
    prepared = [builder.build(p, builder.plan(*p.image.size)) for p in pages]
    engine = Engine(model, builder, model_id="tiny", revision=None, dtype="float32", max_new_tokens=6,
                    batch_visual_tokens=10_000, max_batch_pages=4)
    assert engine.generation.tag == "beams3-rp1.2"
    assert engine.prompt_version.endswith("/minicpm_v2.2/beams3-rp1.2")
    with torch.inference_mode():
        feats = builder.encode(model, prepared)
    rows = [(ids, feats[i]) for i, page in enumerate(prepared) for ids in page.prompts.values()]
    batched = engine.generate([ids for ids, _ in rows], [f for _, f in rows])
    single = [engine.generate([ids], [f])[0] for ids, f in rows]
    assert [g.tokens for g in batched] == [g.tokens for g in single]
    assert len({t for g in single for t in g.tokens}) > 3
    greedy = Engine(model, builder, model_id="tiny", revision=None, dtype="float32", max_new_tokens=6,
                    batch_visual_tokens=10_000, max_batch_pages=4, generation=GREEDY)
    assert greedy.prompt_version.endswith("/minicpm_v2.2/greedy") and greedy.prompt_version != engine.prompt_version


def test_answers_keep_the_grounding_tags(builder) -> None:
    """The original decodes without skip_special_tokens: <ref>/<box> stay in the answer; pads go."""
    tok = builder.tokenizer
    ids = [tok.token_id("<ref>"), *tok.encode("cat", add_special_tokens=False), tok.token_id("</ref>"),
           tok.token_id("<box>"), *tok.encode("1 2", add_special_tokens=False), tok.token_id("</box>"), 0]
    text = builder.decode_answer(ids)
    assert text.startswith("<ref>") and "</ref>" in text and "<box>" in text and text.endswith("</box>")
    assert "<unk>" not in text


def test_the_runs_table_records_the_effective_decoding(tiny: Path) -> None:
    from pipeline.config import RunConfig
    from pipeline.runner import _generation

    config = RunConfig(source="x", output="y", model=str(tiny))
    assert _generation(config) == {"num_beams": 3, "repetition_penalty": 1.2, "do_sample": False}
    assert _generation(config.model_copy(update={"num_beams": 1})) == {
        "num_beams": 1, "repetition_penalty": 1.2, "do_sample": False}
    assert _generation(RunConfig(source="x", output="y")) is None
