"""`pipeline.inference.ask` and `docpipe ask`: one question about one image, in each
family's own chat format and decoding (greedy; MiniCPM-V 2.0: its chat()'s 3 beams and repetition
penalty); the same ids as a plain `generate` on raw pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.inference import Engine, ask
from pipeline.inference.ask import ASK_KEY, load_ask_engine, prepare_question

FAMILIES = ("internvl", "qwen2_vl", "idefics3", "minicpm_v2", "mono_internvl", "minimax_vl_01")
QUESTION = "What is shown in this picture?"
NEW_TOKENS = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Tiny models on shared cores: one torch thread is much faster than two (conftest)."""


def _image(width: int = 160, height: int = 120, seed: int = 0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def engines(tiny_model) -> dict[str, Engine]:
    return {f: load_ask_engine(tiny_model(f), device="cpu", max_new_tokens=NEW_TOKENS) for f in FAMILIES}


def _plain_generate(engine: Engine, image, question: str) -> list[int]:
    """The model card's way: raw pixel values and the prompt straight into generate()."""
    from transformers import GenerationConfig

    prepared = prepare_question(engine.builder, image, question)
    inputs = engine.builder.naive_inputs(prepared, ASK_KEY, "cpu")
    from transformers import LogitsProcessorList

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, **engine.generation.config_kwargs(),
                              eos_token_id=sorted(engine.eos_token_ids), pad_token_id=engine.builder.pad_token_id)
    processors = engine.generation.logits_processors(inputs["input_ids"].shape[1], engine.builder.penalty_start_ids())
    with torch.inference_mode():
        out = engine.model.generate(**inputs, generation_config=config, logits_processor=LogitsProcessorList(processors))
    row = out[0, inputs["input_ids"].shape[1]:].tolist()
    stop = next((k for k, t in enumerate(row) if t in engine.eos_token_ids), len(row))
    return row[:stop]


@pytest.mark.parametrize("family", FAMILIES)
def test_ask_answers_in_the_family_chat_format_greedily(family: str, engines) -> None:
    engine = engines[family]
    image = _image(seed=FAMILIES.index(family))
    answer = ask(engine, image, QUESTION, max_new_tokens=NEW_TOKENS)
    tokenizer = engine.builder.tokenizer
    prompt_text = tokenizer.decode(list(answer.prompt_ids), skip_special_tokens=False)
    assert QUESTION.lower().rstrip("?") in prompt_text.lower()  # the question, inside the chat format
    plan = engine.builder.plan(image.width, image.height)
    assert plan.visual_tokens > 0 and len(answer.prompt_ids) > plan.visual_tokens
    assert answer.token_ids, "the tiny model stopped at once: nothing was compared"
    assert not set(answer.token_ids) & engine.eos_token_ids  # end of turn excluded
    assert list(answer.token_ids) == _plain_generate(engine, image, QUESTION)
    assert answer.text == engine.builder.decode_answer(list(answer.token_ids))
    assert answer.hit_token_limit == (len(answer.token_ids) == NEW_TOKENS)
    # another question changes the prompt, and only where the question is
    other = ask(engine, image, "Describe the page.", max_new_tokens=2)
    assert other.prompt_ids != answer.prompt_ids and len(other.token_ids) <= 2


def test_a_page_read_as_a_run_reads_it_is_answered_as_the_run_answers_it(tmp_path: Path, engines) -> None:
    """`ask` takes a run's path: a page the rasterizer read (the model's own render size), prepared by
    the builder with the question as its one prompt, answered by the engine: asked a task's prompt,
    it answers what the run answers for that task."""
    from pipeline.config import RunConfig
    from pipeline.inference import prompts
    from pipeline.rasterize import RasterOptions, open_document
    from tests.docs_factory import born_digital_pdf

    engine = engines["qwen2_vl"]  # its builder's tasks: description only (load_ask_engine)
    builder = engine.builder
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(born_digital_pdf(pages=1))
    options = RasterOptions.from_config(RunConfig(source=str(tmp_path), output=str(tmp_path / "out")), geometry=builder)
    opened = open_document(str(pdf), uri=str(pdf), doc_id="d", media_type="application/pdf")
    with opened:
        [page] = list(opened.pages(options))
    run = engine.answer([builder.build(page, builder.plan(page.render.width, page.render.height))])[0]
    answer = ask(engine, page, prompts.description_prompt(), max_new_tokens=NEW_TOKENS)
    assert run.error is None and answer.token_ids
    assert answer.text == run.description
    assert len(answer.token_ids) + (not answer.hit_token_limit) == run.generated_tokens  # its end token counted


def test_docpipe_ask_prints_the_same_answer(tmp_path: Path, capsys, engines, tiny_model) -> None:
    folder = tiny_model("qwen2_vl")  # the same folder as engines["qwen2_vl"]
    image_path = tmp_path / "page.png"
    _image(seed=5).save(image_path)
    code = main(["ask", str(folder), str(image_path), QUESTION, "--max-new-tokens", "4", "--device", "cpu", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    printed = json.loads(out)
    expected = ask(engines["qwen2_vl"], _image(seed=5), QUESTION, max_new_tokens=4)
    assert printed["token_ids"] == list(expected.token_ids) and printed["prompt_ids"] == list(expected.prompt_ids)
    assert printed["text"] == expected.text
    assert main(["ask", str(folder), str(tmp_path / "missing.png"), QUESTION]) == 2


def test_a_pdf_page_or_tiff_frame_is_the_image(tmp_path: Path) -> None:
    from PIL import ImageChops

    from pipeline.inference.ask import read_page
    from tests.docs_factory import born_digital_pdf, multipage_tiff

    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(born_digital_pdf(pages=2))
    first, second = read_page(str(pdf), 1).image, read_page(str(pdf), 2).image
    assert first.mode == "RGB" and first.size == (1700, 2200)  # Letter at 200 DPI
    assert ImageChops.difference(first, second).getbbox() is not None  # another page, not page 1 again
    assert read_page(str(pdf), 1, dpi=72).image.size == (612, 792)
    tiff = tmp_path / "scan.tif"
    tiff.write_bytes(multipage_tiff(frames=3))
    assert read_page(str(tiff), 3).image.size == read_page(str(tiff), 1).image.size
    with pytest.raises(ValueError, match="has 2 page"):
        read_page(str(pdf), 3)
    with pytest.raises(ValueError, match="has 3 frame"):
        read_page(str(tiff), 4)


def test_docpipe_ask_on_a_pdf_page(tmp_path: Path, capsys, tiny_model) -> None:
    from tests.docs_factory import born_digital_pdf

    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(born_digital_pdf(pages=2))
    model = tiny_model("internvl")
    code = main(["ask", model, str(pdf), QUESTION, "--page", "2", "--max-new-tokens", "3", "--device", "cpu",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) <= 3
    assert main(["ask", model, str(pdf), QUESTION, "--page", "5"]) == 2
    assert capsys.readouterr().err.strip() == f"docpipe: {pdf} has 2 page(s), not 5"
