"""The engine end to end on tiny models: PageImage -> PreparedPage -> PageAnswers.

Each family gets one tiny checkpoint and one engine per module (a few MB, loaded in
well under a second once transformers is imported). Generation is kept to a handful of
new tokens; torch runs single-threaded (2 shared cores: more threads only contend).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bench.support.forcing import force
from bench.support.static_engine import StaticEngine
from pipeline.config import RunConfig
from pipeline.inference import PROMPT_VERSION, Engine, load_engine, prompts
from pipeline.inference.adapters import CHART, DESCRIPTION, OCR, PreparedPage, chart_key
from pipeline.records import PageAnswers, Stage
from pipeline.testing import make_tiny_model, render_sample_page, sample_image_page

MAIN = ("internvl", "qwen2_vl", "idefics3")
NEW_TOKENS = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Tiny models on shared cores: one torch thread is much faster than two (conftest)."""


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-engine")
    return {f: make_tiny_model(f, root / f) for f in (*MAIN, "qwen2_5_vl", "smolvlm")}


def _config(model: Path, **kwargs: object) -> RunConfig:
    base: dict[str, object] = {"max_new_tokens": NEW_TOKENS, "device": "cpu", "ocr": "model"}
    base.update(kwargs)
    return RunConfig(source="unused", output="unused", model=str(model), **base)


@pytest.fixture(scope="module")
def engines(tiny_dirs: dict[str, Path]) -> dict[str, Engine]:
    return {f: load_engine(_config(tiny_dirs[f])) for f in MAIN}


def _prepare(engine: Engine, pages) -> list[PreparedPage]:
    b = engine.builder
    return [b.build(p, b.plan(p.image.width, p.image.height)) for p in pages]


def _pages() -> list:
    """Pages of different sizes (different tile counts, so prompts of different lengths)."""
    return [
        render_sample_page(dpi=72, doc_id="pdf"),
        sample_image_page(900, 300, seed=1, doc_id="wide"),
        sample_image_page(200, 260, seed=2, doc_id="small"),
    ]


def _content(answer: PageAnswers) -> PageAnswers:
    """An answer without its timing (the only field allowed to differ between paths)."""
    return dataclasses.replace(answer, latency_s=0.0)


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [*MAIN, "qwen2_5_vl", "smolvlm"])
def test_rendered_pdf_page_to_answers_with_all_tasks(family, tiny_dirs, engines) -> None:
    engine = engines.get(family) or load_engine(_config(tiny_dirs[family]))
    page = render_sample_page(dpi=72)
    [prepared] = _prepare(engine, [page])
    assert prepared.text == page.text and (prepared.doc_id, prepared.page_number) == (page.doc_id, 1)
    [answer] = engine.answer([prepared])

    assert answer.error is None
    from pipeline.inference.loading import content_revision

    # a plain local folder has no commit: its revision is a hash of what it holds, never null
    assert (answer.model_id, answer.model_revision) == (str(tiny_dirs[family]), content_revision(str(tiny_dirs[family])))
    assert answer.model_revision.startswith("sha256:")
    assert answer.model_dtype == "float32" and answer.prompt_version == f"{PROMPT_VERSION}/{engine.builder.family}.1/greedy"
    assert isinstance(answer.description, str) and isinstance(answer.ocr_text, str)
    # the reply to "is there a chart?" is kept, and has_chart is what it says (None: neither)
    assert isinstance(answer.chart_check_answer, str)
    assert answer.has_chart is prompts.parse_yes_no(answer.chart_check_answer)
    if answer.has_chart:
        assert [a.question for a in answer.chart_answers] == list(engine.builder.chart_questions)
    else:
        assert answer.chart_answers == ()
    asked = [DESCRIPTION, OCR, CHART] + ([chart_key(i) for i in range(4)] if answer.has_chart else [])
    assert answer.prompt_tokens == sum(len(prepared.prompts[k]) for k in asked)
    assert 3 <= answer.generated_tokens <= NEW_TOKENS * len(asked)
    assert answer.latency_s > 0


@pytest.mark.parametrize("family", MAIN)
def test_batched_shared_encoding_equals_one_at_a_time_and_naive(family, engines) -> None:
    engine = engines[family]
    prepared = _prepare(engine, _pages())
    assert len({p.visual_tokens for p in prepared}) > 1  # padding is exercised
    calls_before = engine.stats.encode_calls

    batched = engine.answer(prepared)
    assert engine.stats.encode_calls == calls_before + 1  # one vision pass for 3 pages x 3 tasks
    single = [engine.answer([p])[0] for p in prepared]
    naive = StaticEngine.like(engine).answer_naive(prepared)  # raw pixels into generate, per page and task

    assert [_content(a) for a in batched] == [_content(a) for a in single] == [_content(a) for a in naive]
    assert all(a.error is None and a.generated_tokens > 0 for a in batched)


ALL = (*MAIN, "qwen2_5_vl", "smolvlm", "minicpm_v2", "mono_internvl", "minimax_vl_01")


@pytest.fixture(scope="module")
def any_dir(tiny_dirs, tmp_path_factory) -> object:
    """The tiny checkpoint of any family, built on first use."""
    made: dict[str, Path] = dict(tiny_dirs)
    root = tmp_path_factory.mktemp("tiny-more")

    def folder(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_model(family, root / family)
        return made[family]

    return folder


def _lengths(tokenizer):
    """Forced lengths of 1-12 tokens (the chart check says yes on two pages, no on the other):
    rows end at different steps."""
    import hashlib

    yes, no = (tokenizer.encode(word, add_special_tokens=False) for word in ("yes", "no"))

    def forced(page, key):
        if key == CHART:
            return yes if page.doc_id in ("pdf", "small") else no
        return 1 + hashlib.sha256(f"{page.doc_id}/{key}".encode()).digest()[0] % 12

    return forced


@pytest.mark.parametrize("family", ALL)
def test_continuous_batches_answer_like_the_static_batches(family, any_dir) -> None:
    """Rows of every kind, ending at different steps, at most 2 decoding at once (so rows
    leave and others join all along), chart questions joining after their chart check: the
    same answers as the engine before (static generate() batches), no finished row computed,
    and each page's shared prefix prefilled once."""
    engine = load_engine(_config(any_dir(family), max_new_tokens=12, max_batch_pages=2))
    force(engine, _lengths(engine.builder.tokenizer))
    prepared = _prepare(engine, _pages())
    static = force(StaticEngine.like(engine), _lengths(engine.builder.tokenizer))
    answers = engine.answer(prepared)
    assert [_content(a) for a in answers] == [_content(a) for a in static.answer(prepared)]
    assert [a.has_chart for a in answers] == [True, False, True]
    stats = engine.stats
    assert stats.finished_slots == 0 and stats.decode_slots == stats.generated_tokens
    # every prompt token is computed once or comes from its page's prefix cache, no padding
    assert stats.cached_prompt_tokens > 0 and stats.pad_slots == 0
    assert stats.prefill_slots + stats.cached_prompt_tokens == stats.prompt_tokens


@pytest.mark.parametrize("family", ["internvl", "qwen2_vl", "minicpm_v2"])
def test_beams_answer_like_the_static_batches(family, any_dir) -> None:
    """Beam search (3 beams; MiniCPM-V 2.0's default with repetition penalty 1.2), rows ending
    on their own: the same answers as transformers' generate() in static batches."""
    engine = load_engine(_config(any_dir(family), max_new_tokens=24, max_batch_pages=3, num_beams=3))
    assert engine.generation.num_beams == 3
    with torch.no_grad():  # end tokens likelier, so that beams end at different steps on their own
        head = engine.model.get_output_embeddings().weight
        head[sorted(engine.eos_token_ids)] *= 3.0
    prepared = _prepare(engine, _pages())
    answers = engine.answer(prepared)
    assert [_content(a) for a in answers] == [_content(a) for a in StaticEngine.like(engine).answer(prepared)]
    assert sum(a.generated_tokens for a in answers) < 3 * 24 * len(prepared)  # some rows ended on their own


@pytest.mark.parametrize("family", ["internvl", "qwen2_vl", "mono_internvl", "minimax_vl_01"])
def test_each_page_image_goes_through_the_model_once(family, any_dir, monkeypatch) -> None:
    engine = load_engine(_config(any_dir(family)))
    prepared = _prepare(engine, _pages())
    image = engine.builder.image_token_id
    fed: list[int] = []
    real = engine.call

    def call(input_ids, *args, **kwargs):
        fed.append(int((input_ids == image).sum()))
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "call", call)
    answers = engine.answer(prepared)
    assert all(a.error is None for a in answers)
    assert sorted(n for n in fed if n) == sorted(p.visual_tokens for p in prepared)  # one prefill per page
    assert engine.stats.rows == 3 * len(prepared)


@pytest.mark.parametrize("family", MAIN)
def test_chart_questions_asked_only_of_chart_pages(family, engines, monkeypatch) -> None:
    engine = engines[family]
    prepared = _prepare(engine, _pages()[:2])
    questions = list(engine.builder.chart_questions)

    monkeypatch.setattr(prompts, "parse_yes_no", lambda text: True)
    with_chart = engine.answer(prepared)
    naive = StaticEngine.like(engine).answer_naive(prepared)
    for answer, reference in zip(with_chart, naive, strict=True):
        assert answer.has_chart is True
        assert [a.question for a in answer.chart_answers] == questions
        assert all(isinstance(a.answer, str) for a in answer.chart_answers)
        assert _content(answer) == _content(reference)

    monkeypatch.setattr(prompts, "parse_yes_no", lambda text: False)
    rows_before = engine.stats.rows
    without = engine.answer(prepared)
    assert engine.stats.rows - rows_before == 3 * len(prepared)  # no question rows
    assert all(a.has_chart is False and a.chart_answers == () for a in without)
    assert [a.description for a in without] == [a.description for a in with_chart]


def test_out_of_memory_splits_the_batch_and_keeps_answers(engines, monkeypatch) -> None:
    engine = engines["internvl"]
    prepared = _prepare(engine, _pages())
    reference = [_content(a) for a in engine.answer(prepared)]
    encode = engine.builder.encode
    sizes: list[int] = []

    def small_batches_only(model, pages):
        sizes.append(len(pages))
        if len(pages) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return encode(model, pages)

    monkeypatch.setattr(engine.builder, "encode", small_batches_only)
    splits = engine.stats.oom_splits
    answers = engine.answer(prepared)
    assert [_content(a) for a in answers] == reference
    assert sizes == [3, 2, 1, 1, 1] and engine.stats.oom_splits == splits + 2


@pytest.mark.parametrize(
    ("exc", "code"),
    [(torch.OutOfMemoryError("CUDA out of memory (injected)"), "out_of_memory"), (RuntimeError("boom"), "generation_failed")],
)
def test_a_page_that_fails_alone_gets_an_error_row(exc, code, engines, monkeypatch) -> None:
    engine = engines["qwen2_vl"]
    prepared = _prepare(engine, _pages())
    reference = [_content(a) for a in engine.answer(prepared)]
    encode = engine.builder.encode

    def fail_on_wide(model, pages):
        if any(p.doc_id == "wide" for p in pages):
            raise exc
        return encode(model, pages)

    monkeypatch.setattr(engine.builder, "encode", fail_on_wide)
    answers = engine.answer(prepared)
    assert [a.error for a in answers].count(None) == 2
    bad = answers[1]
    assert bad.error is not None and bad.error.stage is Stage.INFERENCE and bad.error.type == code
    assert bad.description is None and bad.model_id == engine.model_id
    assert [_content(answers[i]) for i in (0, 2)] == [reference[0], reference[2]]


def test_batches_follow_the_visual_token_budget(tiny_dirs) -> None:
    engine = load_engine(_config(tiny_dirs["idefics3"], batch_visual_tokens=300, max_batch_pages=2))
    prepared = _prepare(engine, _pages())
    costs = [p.visual_tokens for p in prepared]
    answers = engine.answer(prepared)
    assert all(a.error is None for a in answers)
    # pages packed in order under 300 tokens and 2 pages; each batch is encoded once
    from pipeline.inference.batching import pack_by_budget

    batches = pack_by_budget(costs, 300, 2)
    assert len(batches) > 1 and engine.stats.encode_calls == len(batches)


def test_token_limit_and_repetition_flags(tiny_dirs) -> None:
    """The real repetition detector on scripted generations (the tiny model's own output is
    noise): a loop that runs into the limit is flagged; a long output without a loop, or a
    loop that stopped on its own, is not."""
    limit = 24  # long enough for the detector's minimum span (16 tokens)
    engine = load_engine(_config(tiny_dirs["idefics3"], max_new_tokens=limit, tasks=["description", "ocr"]))
    words = [t for t in range(10, 200) if t not in engine.eos_token_ids]
    a, b = words[:2]
    loop = [a, b] * (limit // 2)  # repeats to the limit
    long = words[2 : 2 + limit]  # merely long: hits the limit, no loop
    stopped_loop = [a, b] * 9  # loops, then stops on its own (the end token follows)
    script: dict[str, list[int]] = {}
    force(engine, lambda page, key: script[key])  # each row produces exactly its script
    page = _prepare(engine, [sample_image_page(300, 300)])

    script.update(description=loop, ocr=loop)
    [looping] = engine.answer(page)
    assert (looping.truncated, looping.repetitive) == (True, True)
    assert looping.generated_tokens == 2 * limit

    script.update(description=long, ocr=stopped_loop)
    [fine] = engine.answer(page)
    assert (fine.truncated, fine.repetitive) == (True, False)
    assert fine.generated_tokens == limit + 19
    # the per-task flags say which task ran into the limit
    assert (fine.usage_of("description").hit_token_limit, fine.usage_of("ocr").hit_token_limit) == (True, False)

    script.update(description=stopped_loop, ocr=stopped_loop)
    [stopped] = engine.answer(page)
    assert (stopped.truncated, stopped.repetitive) == (False, False)


def test_fixed_output_lengths_with_min_new_tokens(tiny_dirs) -> None:
    engine = load_engine(_config(tiny_dirs["qwen2_vl"], tasks=["description", "ocr"]), min_new_tokens=NEW_TOKENS)
    answers = engine.answer(_prepare(engine, _pages()[:2]))
    assert [a.generated_tokens for a in answers] == [2 * NEW_TOKENS] * 2
    assert all(a.truncated and a.has_chart is None for a in answers)


def test_page_prepared_for_another_family_is_an_error(engines) -> None:
    page = sample_image_page(120, 120)
    [foreign] = _prepare(engines["qwen2_vl"], [page])
    [answer] = engines["internvl"].answer([foreign])
    assert answer.error is not None and answer.error.type == "wrong_model_family"


def test_revision_from_a_hub_snapshot_folder(tiny_dirs, tmp_path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--tiny" / "snapshots" / commit
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(tiny_dirs["internvl"], target_is_directory=True)
    engine = load_engine(_config(snapshot, tasks=["description"]))
    assert engine.revision == commit and engine.dtype == "float32"
    [answer] = engine.answer(_prepare(engine, [sample_image_page(100, 100)]))
    assert answer.model_revision == commit and answer.ocr_text is None and answer.has_chart is None


# ---- choosing the engine --------------------------------------------------------------------


def test_engine_vllm_without_vllm_is_one_line_exit_2(tiny_dirs, tmp_path, capsys, monkeypatch) -> None:
    from pipeline.cli import main
    from pipeline.inference import vllm_engine

    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    samples = Path(__file__).resolve().parents[2] / "sample_docs"
    code = main(["run", str(samples), "--output", str(tmp_path / "out"), "--model", str(tiny_dirs["idefics3"]),
                 "--engine", "vllm", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--engine vllm: vllm is not installed" in err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_auto_engine_picks_transformers_without_vllm_or_a_gpu(monkeypatch) -> None:
    from pipeline.inference import vllm_engine
    from pipeline.inference.registry import family_by_name

    family = family_by_name("idefics3")
    data = {"model_type": "idefics3", "architectures": ["Idefics3ForConditionalGeneration"]}
    auto = RunConfig(source="s", output="o", model="m")
    monkeypatch.setattr(vllm_engine, "why_not_vllm", lambda config, family, data: None)  # vLLM could serve it
    for installed, gpu, device, expected in [
        (False, True, "auto", "transformers"),
        (True, False, "auto", "transformers"),
        (True, True, "cpu", "transformers"),
        (True, True, "auto", "vllm"),
    ]:
        monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: installed)
        monkeypatch.setattr(vllm_engine, "cuda_visible", lambda: gpu)
        config = auto.model_copy(update={"device": device})
        assert vllm_engine.resolve_engine(config, family, data) == expected, (installed, gpu, device)
    forced = auto.model_copy(update={"engine": "transformers"})
    assert vllm_engine.resolve_engine(forced, family, data) == "transformers"


def test_a_seed_port_goes_to_vllm_through_docpipes_classes_greedily_only(monkeypatch) -> None:
    # the seed ports are served by docpipe's own vLLM classes (its plugin), whatever vLLM lists;
    # MiniCPM-V 2.0's own decoding (3 beams, penalty 1.2) is not vLLM's, and a family whose vLLM
    # module says it cannot run here is refused with its reason
    from pipeline.inference import vllm_engine
    from pipeline.inference.registry import family_by_name

    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_engine, "plugin_installed", lambda: True)
    minicpm = family_by_name("minicpm_v2")
    config = RunConfig(source="s", output="o", model="m", engine="vllm")
    with pytest.raises(vllm_engine.EngineUnavailable, match="beams3-rp1.2 .the minicpm_v2 family's own default"):
        vllm_engine.resolve_engine(config, minicpm, {"architectures": ["MiniCPMV"]})
    greedy = config.model_copy(update={"num_beams": 1, "repetition_penalty": 1.0})
    assert vllm_engine.resolve_engine(greedy, minicpm, {"architectures": ["MiniCPMV"]}) == "vllm"
    monkeypatch.setattr(type(minicpm), "vllm_refusal", lambda self: "no CUDA for its kernels")
    with pytest.raises(vllm_engine.EngineUnavailable, match="minicpm_v2 family cannot run on vLLM here: no CUDA"):
        vllm_engine.resolve_engine(greedy, minicpm, {"architectures": ["MiniCPMV"]})
    monkeypatch.setattr(vllm_engine, "plugin_installed", lambda: False)
    monkeypatch.setattr(type(minicpm), "vllm_refusal", lambda self: None)
    with pytest.raises(vllm_engine.EngineUnavailable, match="docpipe's vLLM plugin is not installed"):
        vllm_engine.resolve_engine(greedy, minicpm, {"architectures": ["MiniCPMV"]})


def test_pages_for_vllm_keep_the_rendered_page_and_the_same_prompts(tiny_dirs) -> None:
    # vLLM runs the family's image processor itself: a page prepared for it carries the page as
    # rendered (no pixel values), the same prompt ids as for the transformers engine, and the
    # builder pickles for the prep workers
    import pickle

    import numpy as np

    from pipeline.inference import load_builder
    from pipeline.inference.vllm_engine import VllmInputs, vllm_prompt

    builder = load_builder(_config(tiny_dirs["idefics3"]))
    wrapped = pickle.loads(pickle.dumps(VllmInputs(builder)))
    page = render_sample_page(dpi=60)
    plan = wrapped.plan(page.image.width, page.image.height)
    assert plan == builder.plan(page.image.width, page.image.height) and wrapped.family == "idefics3"
    for_vllm, for_hf = wrapped.build(page, plan), builder.build(page, plan)
    assert np.array_equal(for_vllm.image_inputs["image"], np.asarray(page.image.convert("RGB")))
    assert for_vllm.pixels.size == 0 and for_vllm.visual_tokens == for_hf.visual_tokens
    assert set(for_vllm.prompts) == set(for_hf.prompts)
    assert all(np.array_equal(for_vllm.prompts[k], for_hf.prompts[k]) for k in for_hf.prompts)
    # one image placeholder, the image before the task: a page's requests share their prefix
    texts = [vllm_prompt(builder, p) for p in builder.task_prompts(None).values()]
    assert all(t.count(builder.placeholder) == 1 for t in texts)
    cut = texts[0].index(builder.placeholder) + len(builder.placeholder)
    assert len({t[:cut] for t in texts}) == 1
