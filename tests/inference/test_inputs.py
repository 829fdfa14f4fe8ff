"""Input building per family against transformers' own processors (the reference).

AutoProcessor cannot be built without torchvision (every video processor needs it), so
the reference processors are built directly with their PIL image processor and the
class check for the (absent) video processor switched off for the test.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import RunConfig
from pipeline.inference import adapters
from pipeline.inference.families.idefics3 import idefics3_grid
from pipeline.inference.registry import UnsupportedModelError, recognise
from pipeline.inference.loading import load_builder
from pipeline.testing import make_tiny_model, render_sample_page, sample_image_page

FAMILIES = ("internvl", "qwen2_vl", "idefics3", "qwen2_5_vl", "smolvlm")
SIZES = [(1700, 2200), (2200, 1700), (640, 480), (300, 300), (100, 1400), (3000, 200), (57, 41)]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-inputs")
    return {family: make_tiny_model(family, root / family) for family in FAMILIES}


def _config(model: Path, **kwargs: object) -> RunConfig:
    return RunConfig(source="unused", output="unused", model=str(model), **kwargs)


@pytest.fixture(scope="module")
def builders(tiny_dirs: dict[str, Path]) -> dict[str, adapters.InputBuilder]:
    return {family: load_builder(_config(path)) for family, path in tiny_dirs.items()}


@pytest.fixture()
def reference_processor(monkeypatch: pytest.MonkeyPatch):
    """Build transformers' processor for a tiny model (no video processor, no torchvision)."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Idefics3Processor,
        InternVLProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLProcessor,
    )
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    classes = {
        "internvl": InternVLProcessor,
        "qwen2_vl": Qwen2VLProcessor,
        "qwen2_5_vl": Qwen2_5_VLProcessor,
        "idefics3": Idefics3Processor,
        # SmolVLMProcessor needs `num2words` (for video prompts); its image prompt string is
        # Idefics3's, so Idefics3Processor with SmolVLM's image processor is the reference.
        "smolvlm": Idefics3Processor,
    }

    def build(family: str, path: Path, **kwargs: object):
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        extra: dict[str, object] = {"chat_template": tokenizer.chat_template, **kwargs}
        if family not in ("idefics3", "smolvlm"):
            extra["video_processor"] = None
        return classes[family](image_processor=image_processor, tokenizer=tokenizer, **extra)

    return build


def _reference_kwargs(family: str, builder: adapters.InputBuilder) -> dict[str, object]:
    if family == "internvl":
        return {"image_seq_length": builder.tokens_per_tile}
    if family in ("idefics3", "smolvlm"):
        return {"image_seq_len": builder.tokens_per_tile}
    return {}


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_equal_the_transformers_processor(family, tiny_dirs, builders, reference_processor) -> None:
    builder = builders[family]
    processor = reference_processor(family, tiny_dirs[family], **_reference_kwargs(family, builder))
    page = render_sample_page(dpi=100)
    plan = builder.plan(page.image.width, page.image.height)
    prepared = builder.build(page, plan)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "TEXT"}]}]
    for key, prompt in builder.task_prompts(page.text).items():
        template = builder.tokenizer.apply_chat_template(
            [{**messages[0], "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        expected = processor(images=[page.image], text=[template], return_tensors="np")
        assert prepared.prompts[key].tolist() == expected["input_ids"][0].tolist(), key

    pixels = expected["pixel_values"]
    if family in ("idefics3", "smolvlm"):
        pixels = pixels[0]
        assert np.array_equal(prepared.image_inputs["pixel_attention_mask"], expected["pixel_attention_mask"][0])
    assert prepared.pixel_values.shape == pixels.shape
    np.testing.assert_allclose(prepared.pixel_values, pixels, rtol=0, atol=1e-6)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        assert prepared.image_inputs["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
        mm_types = expected["mm_token_type_ids"][0]
        assert int(mm_types.sum()) == plan.visual_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_in_every_prompt_equal_the_plan(family, builders) -> None:
    builder = builders[family]
    for width, height in SIZES[:4]:
        page = sample_image_page(width, height)
        plan = builder.plan(width, height)
        prepared = builder.build(page, plan)
        assert prepared.image_tokens == plan.visual_tokens > 0
        for key, ids in prepared.prompts.items():
            assert int((ids == builder.image_token_id).sum()) == plan.visual_tokens, key
        tiles = prepared.pixel_values.shape[0]
        if family in ("internvl", "idefics3", "smolvlm"):
            assert tiles == plan.tiles
        else:  # Qwen2-VL: one "tile" of 14 px patches, 4 patches per token (2x2 merge)
            assert tiles == plan.visual_tokens * 4


def test_internvl_plan_matches_the_image_processor(builders) -> None:
    builder = builders["internvl"]
    processor = builder.image_processor
    for width, height in SIZES:
        plan = builder.plan(width, height)
        kwargs = {"crop_to_patches": True, "max_patches": builder.max_tiles, "min_patches": builder.min_tiles}
        assert plan.tiles == processor.get_number_of_image_patches(height, width, kwargs), (width, height)
        assert plan.policy == "internvl" and plan.tokens_per_tile == builder.tokens_per_tile
    letter = builder.plan(1700, 2200)  # the design note's example: 3x4 grid + thumbnail
    assert (letter.cols, letter.rows, letter.tiles) == (3, 4, 13)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_plan_matches_the_image_processor(family, builders) -> None:
    builder = builders[family]
    processor = builder.image_processor
    for width, height in SIZES:
        plan = builder.plan(width, height)
        patches = processor.get_number_of_image_patches(height, width, {})
        assert plan.visual_tokens == patches // builder.merge**2, (width, height)
        assert plan.tiles == 1 and plan.policy == "qwen2_vl"
        assert plan.resized_width % 28 == 0 and plan.resized_height % 28 == 0


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_plan_matches_the_image_processor(family, builders) -> None:
    from PIL import Image

    builder = builders[family]
    for width, height in SIZES:
        out = builder.image_processor.preprocess(
            [[Image.new("RGB", (width, height), (200, 10, 10))]], return_row_col_info=True, return_tensors="np"
        )
        rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        plan = builder.plan(width, height)
        assert out["pixel_values"].shape[1] == plan.tiles, (width, height)
        if rows == 0:
            assert not plan.thumbnail and plan.tiles == 1
        else:
            assert (plan.rows, plan.cols, plan.thumbnail) == (rows, cols, True)


def test_idefics3_grid_is_pure_and_bounded() -> None:
    h, w, rows, cols = idefics3_grid(2200, 1700, longest_edge=1456, tile=364)
    assert (h % 364, w % 364) == (0, 0) and rows * cols == (h // 364) * (w // 364)
    assert idefics3_grid(2200, 1700, longest_edge=1456, tile=364, split=False) == (364, 364, 0, 0)


@pytest.mark.parametrize("family", ["internvl", "qwen2_vl", "idefics3"])
def test_builder_pickles_and_builds_the_same(family, builders) -> None:
    builder = builders[family]
    clone = pickle.loads(pickle.dumps(builder))
    assert len(pickle.dumps(builder)) < 1_000_000  # tokenizer + processor, no weights
    page = render_sample_page(dpi=60)
    plan = builder.plan(page.image.width, page.image.height)
    assert clone.plan(page.image.width, page.image.height) == plan
    a, b = builder.build(page, plan), clone.build(page, plan)
    assert np.array_equal(a.pixel_values, b.pixel_values)
    assert {k: v.tolist() for k, v in a.prompts.items()} == {k: v.tolist() for k, v in b.prompts.items()}
    restored = pickle.loads(pickle.dumps(a))  # a prepared page travels between processes too
    assert restored.doc_id == page.doc_id and restored.text == page.text and restored.plan == plan


def test_prompts_cover_the_tasks_and_chart_questions(tiny_dirs) -> None:
    cfg = _config(tiny_dirs["qwen2_vl"], tasks=["ocr", "chart"], chart_questions=["Which year is highest?"])
    builder = load_builder(cfg)
    page = render_sample_page(dpi=50)
    prepared = builder.build(page, builder.plan(page.image.width, page.image.height))
    questions = cfg.all_chart_questions()
    assert set(prepared.prompts) == {"ocr", "chart", *(adapters.chart_key(i) for i in range(len(questions)))}
    ocr_text = builder.tokenizer.decode(prepared.prompts["ocr"].tolist())
    assert "Revenue grew by 12 percent" in ocr_text  # the text layer is the OCR anchor
    last = builder.tokenizer.decode(prepared.prompts[adapters.chart_key(len(questions) - 1)].tolist())
    assert "Which year is highest?" in last


def test_tile_bounds_follow_the_checkpoint_unless_set(tiny_dirs) -> None:
    default = load_builder(_config(tiny_dirs["internvl"]))
    assert (default.min_tiles, default.max_tiles) == (1, 12)  # preprocessor_config.json
    capped = load_builder(_config(tiny_dirs["internvl"], max_tiles=4))
    assert capped.max_tiles == 4 and capped.plan(1700, 2200).tiles <= 5


def test_unknown_family_and_missing_template_are_config_errors(tiny_dirs, tmp_path) -> None:
    with pytest.raises(UnsupportedModelError, match="llava_next"):
        recognise({"model_type": "llava_next", "architectures": ["LlavaNextForConditionalGeneration"]})
    broken = make_tiny_model("qwen2_vl", tmp_path / "no-template")
    (broken / "chat_template.jinja").unlink()
    with pytest.raises(UnsupportedModelError, match="chat template"):
        load_builder(_config(broken))


def test_internvl_pixels_travel_as_uint8_codes_and_decode_identically(tiny_dirs, builders, reference_processor) -> None:
    import torch

    from pipeline.inference.adapters import CodedPixels, gather_decode

    builder = builders["internvl"]
    page = render_sample_page(dpi=100)
    prepared = builder.build(page, builder.plan(page.image.width, page.image.height))
    assert isinstance(prepared.pixels, CodedPixels) and prepared.pixels.codes.dtype == np.uint8
    values = prepared.pixel_values  # the numpy decode (what a CPU model gets)
    assert values.dtype == np.float32 and values.shape == prepared.pixels.shape
    # ... equals transformers' own pixel values for the page
    processor = reference_processor("internvl", tiny_dirs["internvl"], **_reference_kwargs("internvl", builder))
    expected = processor(images=[page.image], text=[processor.image_token], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6)
    # the device decode (one gather where the codes are) gives the very same values
    codes, table = torch.from_numpy(prepared.pixels.codes), torch.from_numpy(prepared.pixels.table)
    assert torch.equal(gather_decode(codes, table), torch.from_numpy(values))
    assert torch.equal(prepared.pixel_tensor("cpu"), torch.from_numpy(values))
    assert prepared.pixel_tensor("cpu", torch.bfloat16).dtype == torch.bfloat16
    # what crosses from a prep worker to the model process is about a quarter of float32
    assert len(pickle.dumps(prepared)) < 0.3 * values.nbytes


def _random_coded(seed: int = 0):
    from pipeline.inference.adapters import CodedPixels

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    codes[0, 0, :3] = [[0, 0, 0], [255, 255, 255], [0, 128, 255]]  # both ends of the table, every channel
    return CodedPixels(codes=codes, table=rng.standard_normal((3, 256)).astype(np.float32))


def test_gather_decode_equals_the_numpy_decode() -> None:
    """The one-gather decode used on accelerators, run for real (on CPU tensors)."""
    import torch

    from pipeline.inference.adapters import gather_decode

    coded = _random_coded()
    reference = np.empty(coded.shape, dtype=np.float32)  # value[n, c, y, x] = table[c, codes[n, y, x, c]]
    for n, y, x, c in np.ndindex(coded.codes.shape):
        reference[n, c, y, x] = coded.table[c, coded.codes[n, y, x, c]]
    gathered = gather_decode(torch.from_numpy(coded.codes), torch.from_numpy(coded.table))
    assert gathered.dtype == torch.float32 and gathered.is_contiguous()
    assert torch.equal(gathered, torch.from_numpy(reference))
    assert np.array_equal(coded.decode(), reference)


def test_to_torch_off_the_cpu_moves_only_codes_and_gathers_there(monkeypatch) -> None:
    """A device that is not the CPU takes the gather path, on that device (the meta device
    runs it without memory or values: placement, shape and dtype are what it checks)."""
    import torch

    from pipeline.inference import adapters

    calls: list[tuple[str, str, torch.dtype]] = []
    real = adapters.gather_decode

    def spy(codes, table):
        calls.append((codes.device.type, table.device.type, codes.dtype))
        return real(codes, table)

    monkeypatch.setattr(adapters, "gather_decode", spy)
    coded = _random_coded()
    out = coded.to_torch("meta")
    assert calls == [("meta", "meta", torch.uint8)]  # the uint8 codes cross, not float32 values
    assert (out.device.type, tuple(out.shape), out.dtype) == ("meta", coded.shape, torch.float32)
    assert torch.equal(coded.to_torch("cpu"), torch.from_numpy(coded.decode()))
    assert calls == [("meta", "meta", torch.uint8)]  # the CPU takes numpy's lookup instead


def test_one_function_makes_every_prepared_page() -> None:
    """A `PreparedPage` is made in one place, `adapters.build_page` (every builder's `build`, `ask`'s
    page, the vLLM engine's preparation): no other code in the package constructs one."""
    import ast

    root = Path(__file__).resolve().parents[2] / "pipeline"
    makers = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "PreparedPage":
                scope = node
                while scope in parents and not isinstance(scope, ast.FunctionDef):
                    scope = parents[scope]
                makers.append(f"{path.relative_to(root.parent)}:{getattr(scope, 'name', '<module>')}")
    assert makers == ["pipeline/inference/adapters.py:build_page"]
