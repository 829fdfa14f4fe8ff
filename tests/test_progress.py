"""pipeline/progress.py: the meter's figures (pure), and live progress of a real run with a tiny model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.progress import ProgressMeter, format_bytes, format_seconds, model_size_bytes


class _Stats:
    generated_tokens = 0
    model_s = 0.0


def _meter_with_plan(documents: int, shards: list[str]) -> ProgressMeter:
    meter = ProgressMeter(now=0.0)
    meter.set_total(documents, shards)
    meter.shard_sizes = [documents // len(shards)] * len(shards)
    return meter


def test_meter_figures_follow_events() -> None:
    meter = _meter_with_plan(4, ["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    meter.on_event("model_loading", 0, now=0.0)
    assert meter.snapshot(1.0).describe() == "loading model ..."
    meter.on_event("model_loaded", 2000, now=2.0)
    meter.on_event("shard", 2, now=2.0)
    for _ in range(3):
        meter.on_event("prepared", 1, now=2.5)
    meter.on_event("prepared_document", 1, now=2.5)
    meter.on_event("prepared", 1, now=2.6)
    meter.on_event("prepared_document", 1, now=2.6)
    meter.on_event("model_start", 4, now=3.0)
    busy = meter.snapshot(4.0)
    assert busy.model_busy == pytest.approx(0.5)  # 1 s in the model of 2 s since it loaded
    assert busy.pages_expected == 8  # 2 pages per document so far, 4 documents
    assert busy.pages_done == 0 and busy.eta_s is None
    meter.on_event("model_ms", 3000, now=6.0)
    meter.on_event("tokens", 400, now=6.0)
    for _ in range(4):
        meter.on_event("page", 1, now=6.0)
    meter.on_event("document", 2, now=6.0)
    snap = meter.snapshot(6.0)
    assert snap.shard_index == 1 and snap.shard_id == "aaaaaaaaaaaa" and snap.shard_pages_done == 4
    assert snap.pages_per_s == pytest.approx(1.0)  # 4 pages in the 4 s since the first shard started
    assert snap.tokens_per_s == pytest.approx(100.0)  # 400 tokens in the 4 s since the model loaded
    assert snap.model_busy == pytest.approx(0.75)
    assert snap.eta_s == pytest.approx(4.0)  # 4 of ~8 pages left at 1 page/s
    assert snap.percent == pytest.approx(50.0)
    line = snap.describe()
    assert "shard 1/2 (aaaaaaaa): 4 pages" in line and "overall 4/~8 pages" in line
    assert "100 tok/s" in line and "model 75% busy" in line and "ETA 4s" in line
    meter.on_event("shard", 2, now=6.0)
    assert meter.snapshot(6.0).shard_pages_done == 0 and meter.snapshot(6.0).shard_id == "bbbbbbbbbbbb"


def test_meter_follows_engine_counters_between_batches() -> None:
    """A batch in the model for minutes still moves the tokens/s figure (the engine counts per generate call)."""
    meter = _meter_with_plan(1, ["s"])
    stats = _Stats()
    stats.generated_tokens, stats.model_s = 50, 1.0  # counters of an engine used before
    meter.on_event("model_loaded", 100, now=0.0)
    meter.attach(stats)
    meter.on_event("shard", 1, now=0.0)
    meter.on_event("model_start", 1, now=0.0)
    stats.generated_tokens = 250
    snap = meter.snapshot(2.0)
    assert snap.generated_tokens == 200 and snap.tokens_per_s == pytest.approx(100.0)
    assert snap.pages_done == 0 and snap.model_busy == pytest.approx(1.0)


def test_meter_without_model_and_without_work() -> None:
    meter = ProgressMeter(now=0.0)
    snap = meter.snapshot(1.0)
    assert snap.percent == 100.0 and snap.model_busy is None
    meter.set_total(2, ["x"])
    meter.on_event("shard", 2, now=0.0)
    meter.on_event("prepared", 1, now=0.5)
    meter.on_event("page", 1, now=0.5)
    meter.on_event("document", 2, now=1.0)
    snap = meter.snapshot(1.0)
    assert snap.eta_s == 0.0 and "tok/s" not in snap.describe() and snap.percent == 100.0


def test_formatting_helpers(tmp_path: Path) -> None:
    assert format_seconds(59.6) == "1m00s" and format_seconds(3725) == "1h02m" and format_seconds(-3) == "0s"
    assert format_bytes(None) == "size unknown" and format_bytes(2_500_000_000) == "2.5 GB"
    assert format_bytes(1_800_000) == "1.8 MB"
    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "config.json").write_text("{}")
    assert model_size_bytes(str(tmp_path)) == 1000
    assert model_size_bytes("org/some-hub-id") is None


def test_a_real_run_moves_within_seconds_of_the_model_loading(tmp_path: Path, tiny_model, one_torch_thread) -> None:
    """Tokens and prepared pages move before the first batch comes back; the final figures
    agree with the run's summary."""
    from pipeline import runner
    from pipeline.config import RunConfig
    from tests.docs_factory import born_digital_pdf

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        (src / f"d{i}.pdf").write_bytes(born_digital_pdf(pages=2 + i))
    config = RunConfig(source=str(src), output=str(tmp_path / "out"), model=tiny_model("internvl"), progress=False,
                       prep_workers=0, max_new_tokens=12, ocr="model")
    meter = ProgressMeter()
    samples: list[tuple[float, int, int, int]] = []
    at_model_calls: list[tuple[int, int]] = []  # (tokens, pages done) the meter shows at each model call
    loaded_at: list[float] = []
    stop = threading.Event()
    wrapped: list[object] = []

    def on_event(event: str, count: int) -> None:
        meter.on_event(event, count)
        if event == "model_loaded":
            loaded_at.append(time.perf_counter())
            engine = runner.get_engine(config)
            assert engine is not None
            meter.attach(engine.stats)
            call = engine.call

            def watched(*args, **kwargs):
                snap = meter.snapshot()
                at_model_calls.append((snap.generated_tokens, snap.pages_done))
                return call(*args, **kwargs)

            engine.call = watched
            wrapped.append((engine, call))

    def sample() -> None:
        while not stop.wait(0.05):
            snap = meter.snapshot()
            samples.append((time.perf_counter(), snap.pages_prepared, snap.generated_tokens, snap.pages_done))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = runner.run(config, progress=on_event, on_plan=meter.on_plan)
    finally:
        stop.set()
        sampler.join()
        for engine, call in wrapped:  # the engine stays cached in this process
            engine.call = call
    assert loaded_at, "no model_loaded event"
    t_loaded = loaded_at[0]
    moving = [s for s in samples if s[0] >= t_loaded and (s[1] > 0 or s[2] > 0)]
    assert moving and moving[0][0] - t_loaded < 5.0
    # the engine's counters moved while the first batch was still in the model
    assert any(tokens > 0 and done == 0 for tokens, done in at_model_calls)
    final = meter.snapshot()
    assert final.pages_done == summary.pages == 5 and final.documents_done == summary.documents == 2
    assert final.generated_tokens > 0 and final.eta_s == 0.0 and final.percent == 100.0
