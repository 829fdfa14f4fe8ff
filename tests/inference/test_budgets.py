"""Per-task token limits, finished rows leaving the batch at once, OCR routed by page kind,
forced output lengths (benchmarks), the order rows start in, and the OOM back-off releasing
the failed batch.

A tiny InternVL checkpoint; torch single-threaded (2 shared cores).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch

from bench.support.forcing import force
from bench.support.static_engine import StaticEngine, schedule_rows
from pipeline.config import RunConfig
from pipeline.inference import Engine, load_engine
from pipeline.inference.adapters import CHART, OCR, PreparedPage
from pipeline.inference.engine import row_kind, schedule
from pipeline.sink import _answer_columns
from pipeline.testing import make_tiny_model, render_sample_page, sample_image_page

BUDGETS = {"description": 5, "ocr": 9, "chart_check": 2, "chart_answer": 3}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Tiny models on shared cores: one torch thread is much faster than two (conftest)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-budgets")
    return {f: make_tiny_model(f, root / f) for f in ("internvl",)}


def _config(model: Path, **kwargs: object) -> RunConfig:
    limits = {f"{k}_max_new_tokens": v for k, v in BUDGETS.items()}
    return RunConfig(source="unused", output="unused", model=str(model), device="cpu", **{**limits, **kwargs})


def _prepare(engine: Engine, pages) -> list[PreparedPage]:
    b = engine.builder
    return [b.build(p, b.plan(p.image.width, p.image.height)) for p in pages]


def _pages() -> list:
    return [
        render_sample_page(dpi=72, doc_id="pdf"),  # born-digital, with a clean text layer
        sample_image_page(900, 300, seed=1, doc_id="wide"),
        sample_image_page(200, 260, seed=2, doc_id="small"),
    ]


def _recording(engine: Engine, monkeypatch) -> list[tuple[int, int]]:
    """Record (rows, tokens per row) of every forward pass of the model."""
    calls: list[tuple[int, int]] = []
    real = engine.call

    def call(input_ids, *args, **kwargs):
        calls.append(tuple(input_ids.shape))
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "call", call)
    return calls


# ---------------------------------------------------------------------------------------


def test_config_budgets_and_the_override() -> None:
    cfg = RunConfig(source="a", output="b")
    assert cfg.task_budgets() == {"description": 256, "ocr": 2048, "chart_check": 4, "chart_answer": 512}
    assert cfg.ocr == "auto"
    assert set(RunConfig(source="a", output="b", max_new_tokens=7).task_budgets().values()) == {7}
    assert cfg.fingerprint() != RunConfig(source="a", output="b", ocr_max_new_tokens=4096).fingerprint()
    assert cfg.fingerprint() != RunConfig(source="a", output="b", ocr="model").fingerprint()


def test_each_task_stops_at_its_own_limit(tiny) -> None:
    """Every row is forced to run long: each stops at its own kind's limit, and the table
    columns say so per task."""
    engine = force(load_engine(_config(tiny["internvl"], ocr="model")), lambda page, key: 1000)
    [answer] = engine.answer(_prepare(engine, [_pages()[1]]))
    usage = {kind: answer.usage_of(kind) for kind in ("description", "ocr", "chart_check", "chart_answers")}
    assert usage["description"].generated_tokens == 5 and usage["ocr"].generated_tokens == 9
    assert usage["chart_check"].generated_tokens == 2 and usage["chart_answers"] is None  # no "yes" forced
    assert all(u.hit_token_limit for u in usage.values() if u is not None) and answer.truncated
    columns = _answer_columns(answer)
    assert (columns["ocr_generated_tokens"], columns["ocr_truncated"], columns["chart_answers_prompt_tokens"]) == (9, True, None)
    assert columns["ocr_source"] == "model"


def test_a_finished_row_leaves_the_batch_at_once(tiny, monkeypatch) -> None:
    """OCR rows run 8 tokens, descriptions 4, chart checks 1: after its last token a row is
    never computed again, so the decode steps hold 3 + 3 rows for 3 steps, then the 3 OCR
    rows alone for 4 more (a static batch would carry all 9 rows for 7 steps)."""
    lengths = {"description": 4, "ocr": 8, "chart_check": 1, "chart_answer": 3}
    engine = force(load_engine(_config(tiny["internvl"], ocr="model")), lambda page, key: lengths[row_kind(key)])
    calls = _recording(engine, monkeypatch)
    answers = engine.answer(_prepare(engine, _pages()))
    assert all(a.error is None and not a.truncated for a in answers)
    steps = [rows for rows, width in calls if width == 1]
    assert steps == [6, 6, 6, 3, 3, 3, 3]  # each row's first token comes from its prefill
    assert engine.stats.finished_slots == 0
    assert engine.stats.decode_slots == engine.stats.generated_tokens == 3 * (4 + 8 + 1)


def test_forcing_the_vllm_engine_is_a_subclass_over_the_same_llm(tiny) -> None:
    """The vLLM engine has no forcing of its own: `force` gives a bench `ForcedVllmEngine` over the
    same `vllm.LLM`, whose rows keep every decoded token (no end token was allowed before the forced
    length) and whose forced ids stand for the output; without forcing, rows end at their end token."""
    from types import SimpleNamespace

    from bench.support.forcing import ForcedVllmEngine
    from pipeline.inference import load_builder
    from pipeline.inference.vllm_engine import VllmEngine

    builder = load_builder(_config(tiny["internvl"]))
    llm = SimpleNamespace(llm_engine=None)  # no vLLM here: the rows are read, no request is made
    plain = VllmEngine(llm, builder, model_id="m", revision=None, dtype="float32", max_new_tokens=BUDGETS,
                       max_pages=4)
    assert not hasattr(plain, "forced_output")
    yes = builder.tokenizer.encode("yes", add_special_tokens=False)
    forced = force(plain, lambda page, key: yes if key == CHART else 5)
    assert isinstance(forced, ForcedVllmEngine) and forced.llm is llm and forced.budgets == plain.budgets
    page = builder.build(sample_image_page(200, 260), builder.plan(200, 260))
    end = min(plain.eos_token_ids)
    decoded = [7, end, 8, 9, 10]  # the random model said an end token on the way: ignored when forced
    row = forced._row(page, OCR, decoded)
    assert row.tokens == decoded and row.generated_tokens == 5 and not row.hit_limit
    check = forced._row(page, CHART, [11, 12])
    assert check.tokens == yes and check.text == "yes" and check.generated_tokens == 2
    cut = plain._row(page, OCR, decoded)
    assert cut.tokens == [7] and cut.generated_tokens == 2


def test_forced_tokens_say_yes_and_the_chart_questions_follow(tiny) -> None:
    """A benchmark can force the chart check's answer; batched and naive paths agree."""
    engine = load_engine(_config(tiny["internvl"], ocr="model"))
    yes = engine.builder.tokenizer.encode("yes", add_special_tokens=False)
    forced = lambda page, key: yes if key == CHART else 3  # noqa: E731
    force(engine, forced)
    prepared = _prepare(engine, _pages()[1:])
    batched = engine.answer(prepared)
    naive = force(StaticEngine.like(engine), forced).answer_naive(prepared)
    for answer, reference in zip(batched, naive, strict=True):
        assert answer.has_chart is True and len(answer.chart_answers) == len(engine.builder.chart_questions)
        assert answer.usage_of("chart_answers").generated_tokens == 3 * len(engine.builder.chart_questions)
        assert answer.description == reference.description and answer.chart_answers == reference.chart_answers
        assert answer.usage == reference.usage


def test_ocr_auto_uses_the_text_layer_of_born_digital_pages(tiny) -> None:
    engine = load_engine(_config(tiny["internvl"]))  # ocr=auto, the default
    assert engine.ocr == "auto"
    prepared = _prepare(engine, _pages())
    rows = engine.stats.rows
    answers = engine.answer(prepared)
    pdf, wide, small = answers
    assert pdf.ocr_source == "text_layer" and pdf.ocr_text == prepared[0].text and pdf.ocr_text
    assert pdf.usage_of("ocr") is None  # no model row
    assert wide.ocr_source == small.ocr_source == "model" and wide.usage_of("ocr") is not None
    assert engine.stats.rows - rows == 3 + 3 + 2  # descriptions, chart checks, the two image pages' OCR
    assert [a.ocr_text for a in StaticEngine.like(engine).answer_naive(prepared)] == [a.ocr_text for a in answers]

    text_only = load_engine(_config(tiny["internvl"], ocr="text_layer"))
    pdf, wide, _ = text_only.answer(_prepare(text_only, _pages()))
    assert (pdf.ocr_source, wide.ocr_source, wide.ocr_text) == ("text_layer", None, None)
    assert wide.usage_of("ocr") is None


def test_rows_start_chart_checks_first_then_the_longest_ocr() -> None:
    class Page:  # the two fields schedule reads
        def __init__(self, text, visual_tokens):
            self.text, self.visual_tokens = text, visual_tokens

    pages = [Page("x" * 10, 64), Page(None, 64), Page("x" * 900, 64)]
    keys = [("description", OCR, CHART)] * 3
    assert schedule(pages, keys) == [  # type: ignore[arg-type]
        (0, CHART), (1, CHART), (2, CHART), (2, OCR), (1, OCR), (0, OCR),
        (0, "description"), (1, "description"), (2, "description"),
    ]


def test_schedule_rows_orders_ocr_by_expected_length() -> None:
    class Page:  # the two fields schedule_rows reads
        def __init__(self, text, visual_tokens):
            self.text, self.visual_tokens = text, visual_tokens

    pages = [Page("x" * 10, 64), Page(None, 64), Page("x" * 900, 64)]
    rows = [(i, key) for i in range(3) for key in ("description", OCR, CHART)]
    calls = schedule_rows(rows, pages, budget=128, max_rows=8)  # type: ignore[arg-type]
    assert [kind for kind, _ in calls] == ["chart_check", "chart_check", "description", "description", "ocr", "ocr"]
    ocr_rows = [row for kind, group in calls if kind == "ocr" for row in group]
    assert ocr_rows == [(2, OCR), (1, OCR), (0, OCR)]  # 900 chars (225 tokens), 64 visual tokens, 10 chars


def test_out_of_memory_halves_run_after_the_failed_batch_is_released(tiny, monkeypatch) -> None:
    """The failed batch's image features and input ids are dead (weak references cleared)
    when its halves start: nothing of the failed attempt rides along with the retry."""
    engine = load_engine(_config(tiny["internvl"], ocr="model"))
    prepared = _prepare(engine, _pages())
    reference = engine.answer(prepared)
    real_encode, real_call = engine.builder.encode, engine.call
    failed: list[weakref.ref] = []
    alive_at_retry: list[bool] = []
    state = {"failed": False}

    def encode(model, pages):
        feats = real_encode(model, pages)
        if not state["failed"]:
            failed.extend(weakref.ref(f.features) for f in feats)
        else:
            alive_at_retry.append(any(ref() is not None for ref in failed))
        return feats

    def call(input_ids, *args, **kwargs):
        if not state["failed"]:
            failed.append(weakref.ref(input_ids))
            state["failed"] = True
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_call(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine.builder, "encode", encode)
    monkeypatch.setattr(engine, "call", call)
    answers = engine.answer(prepared)
    assert len(failed) == 4 and alive_at_retry == [False, False]  # 3 pages' features + 1 input batch
    assert engine.stats.oom_splits == 1
    assert [a.ocr_text for a in answers] == [a.ocr_text for a in reference]
    assert all(a.error is None for a in answers)
