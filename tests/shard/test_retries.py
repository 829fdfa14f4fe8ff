"""Transient is not permanent: retried in the run, then by the next run; a broken device stops the shard."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import runner, sources
from pipeline.ledger import RetryPolicy
from pipeline.shard import run as shard_run
from pipeline.config import RunConfig
from pipeline.inference.batching import BatchRule
from pipeline.inference.page_engine import EngineStats
from pipeline.records import PageAnswers, Stage, StageError
from tests.prefect_support import make_corpus, page_key_counts, read_rows


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard_run, "POLICY", RetryPolicy(backoff_s=(0.0,)))


@pytest.fixture()
def flaky_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Reads of files named in the returned dict fail with a connection reset that many times."""
    failures: dict[str, int] = {}
    real = sources.read_bytes

    def read(uri: str, storage_options=None) -> bytes:
        name = uri.rsplit("/", 1)[-1]
        if failures.get(name, 0) > 0:
            failures[name] -= 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return real(uri, storage_options)

    monkeypatch.setattr(sources, "local_path", lambda uri: None)  # read through fsspec, like a bucket
    monkeypatch.setattr(sources, "read_bytes", read)
    return failures


def _config(src: Path, out: Path, **kw) -> RunConfig:
    return RunConfig(source=str(src), output=str(out), progress=False, prep_workers=0, shard_size=2, **kw)


def test_a_read_that_fails_once_is_retried_within_the_run(tmp_path: Path, flaky_reads: dict[str, int]):
    src, out = tmp_path / "in", tmp_path / "out"
    expected = make_corpus(src, 4)
    flaky_reads["doc-001.pdf"] = 1
    summary = runner.run(_config(src, out))
    assert summary.documents_by_status == {"ok": 4} and flaky_reads["doc-001.pdf"] == 0
    docs = {Path(d["source_uri"]).name: d for d in read_rows(str(out), "documents")}
    assert docs["doc-001.pdf"]["attempt"] == 1 and docs["doc-001.pdf"]["error_type"] is None
    assert len(read_rows(str(out), "pages")) == sum(expected.values())


def test_a_failure_that_outlasts_the_run_is_retried_by_the_next_run_and_replaced(
    tmp_path: Path, flaky_reads: dict[str, int]
):
    src, out = tmp_path / "in", tmp_path / "out"
    expected = make_corpus(src, 4)
    flaky_reads["doc-002.pdf"] = shard_run.POLICY.rounds  # every try of this run fails
    first = runner.run(_config(src, out))
    assert first.documents_by_status == {"ok": 3, "error": 1}
    (failed,) = [d for d in read_rows(str(out), "documents") if d["status"] == "error"]
    assert failed["error_retryable"] is True and failed["attempt"] == 1 and failed["pages_ok"] == 0
    assert not [p for p in read_rows(str(out), "pages") if p["source_uri"] == failed["source_uri"]]

    second = runner.run(_config(src, out))  # the store is back
    assert second.documents == 1 and second.documents_by_status == {"ok": 1}
    docs = read_rows(str(out), "documents")
    assert len(docs) == 4 and all(d["status"] == "ok" for d in docs)  # the failure row was replaced
    assert {d["attempt"] for d in docs if d["source_uri"] == failed["source_uri"]} == {2}
    pages = read_rows(str(out), "pages")
    assert len(pages) == sum(expected.values()) and max(page_key_counts(pages).values()) == 1
    assert runner.run(_config(src, out)).documents == 0  # and then it is done


def test_retries_stop_after_the_last_attempt(tmp_path: Path, flaky_reads: dict[str, int]):
    src, out = tmp_path / "in", tmp_path / "out"
    make_corpus(src, 1)
    flaky_reads["doc-000.pdf"] = 10**6  # never comes back
    attempts = []
    for _ in range(4):
        runner.run(_config(src, out))
        attempts.append([(d["attempt"], d["error_retryable"]) for d in read_rows(str(out), "documents")])
    assert attempts == [[(1, True)], [(2, True)], [(3, False)], [(3, False)]]


def test_a_copy_of_a_failed_file_shares_its_failure_not_duplicate_status(tmp_path: Path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.pdf").write_bytes(b"%PDF-1.7\nnot really a pdf at all")
    (src / "copy-of-a.pdf").write_bytes((src / "a.pdf").read_bytes())
    runner.run(_config(src, out))
    docs = {Path(d["source_uri"]).name: d for d in read_rows(str(out), "documents")}
    assert docs["a.pdf"]["status"] == "error"
    assert docs["copy-of-a.pdf"]["status"] == "error" and docs["copy-of-a.pdf"]["duplicate_of"] is not None
    assert docs["copy-of-a.pdf"]["error_type"] == docs["a.pdf"]["error_type"]
    assert "same bytes as" in docs["copy-of-a.pdf"]["error_message"]


class _BrokenDevice:
    """An engine whose device fails every batch, as a poisoned CUDA context does."""

    model_id, revision, dtype, prompt_version = "broken", None, "float32", "p"
    batch_rule = BatchRule(10**9, 1)  # one page a batch, as the run's max_batch_pages=1 says
    stats = EngineStats()

    class builder:  # noqa: N801 - stands in for an InputBuilder
        family = "internvl"
        stretches_to_canvas = True  # the internvl policy's geometry, as a run without a model has

        @staticmethod
        def target_size(width_pt: float, height_pt: float):
            from pipeline import tiling

            return tiling.TilingOptions().target_size(width_pt, height_pt)

        @staticmethod
        def plan(width: int, height: int):
            from pipeline import tiling

            return tiling.plan_internvl(width, height)

        @staticmethod
        def build(page, plan):
            return object()

    def __init__(self) -> None:
        self.calls = 0

    def answer(self, pages):
        self.calls += 1
        err = StageError(Stage.INFERENCE, "generation_failed", "AcceleratorError: CUDA error: an illegal memory access",
                         retryable=True)
        return [PageAnswers(self.model_id, None, self.dtype, self.prompt_version, error=err) for _ in pages]


def test_a_device_that_fails_every_batch_stops_the_shard_with_one_error(tmp_path: Path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    make_corpus(src, 6)
    engine = _BrokenDevice()
    monkeypatch.setattr(runner, "get_engine", lambda config: engine)
    cfg = _config(src, out, max_batch_pages=1, model=str(tmp_path / "unused-model"))
    with pytest.raises(runner.DeviceFailure, match="every page of 2 consecutive batches"):
        runner.run(cfg)
    assert engine.calls == 2  # stopped at once, not one error per remaining page
    assert read_rows(str(out), "documents") == [] and read_rows(str(out), "pages") == []
    (run,) = read_rows(str(out), "runs")
    assert run["status"] == "failed" and "DeviceFailure" in run["message"]


def test_a_file_rewritten_after_a_retryable_failure_replaces_the_failure_row(
    tmp_path: Path, flaky_reads: dict[str, int]
):
    from tests.prefect_support import make_pdf

    src, out = tmp_path / "in", tmp_path / "out"
    make_corpus(src, 2)
    flaky_reads["doc-001.pdf"] = shard_run.POLICY.rounds  # every try of this run fails
    runner.run(_config(src, out))
    (failed,) = [d for d in read_rows(str(out), "documents") if d["status"] == "error"]
    make_pdf(src / "doc-001.pdf", 3, "a new version")  # rewritten before the next run
    runner.run(_config(src, out))
    rows = [d for d in read_rows(str(out), "documents") if d["source_uri"] == failed["source_uri"]]
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["replaces_doc_id"] == failed["doc_id"]
    assert len([p for p in read_rows(str(out), "pages") if p["source_uri"] == failed["source_uri"]]) == 3


def test_a_document_that_times_out_is_given_up_and_tried_again_only_when_asked(tmp_path: Path):
    """A CPU-bomb page: the first timeout is final (its first page stands), later runs leave it
    alone, `--retry-timeouts` tries it once more and its new row replaces the old one."""
    import time

    from tests.docs_factory import cpu_bomb_pdf, make_pdf

    src, out = tmp_path / "in", tmp_path / "out"
    make_pdf(src / "fine.pdf", 2)
    (src / "bomb.pdf").write_bytes(cpu_bomb_pdf(segments=40_000, good_pages=1))
    cfg = _config(src, out, document_timeout_s=1.5).model_copy(update={"prep_workers": 1})
    first = runner.run(cfg)
    assert first.errors_by_type == {"document_timeout": 1}
    [bomb] = [d for d in read_rows(str(out), "documents") if d["source_uri"].endswith("bomb.pdf")]
    assert (bomb["status"], bomb["error_type"], bomb["error_retryable"], bomb["attempt"]) == (
        "partial", "document_timeout", False, 1)
    assert "--retry-timeouts" in bomb["error_message"]
    t0 = time.monotonic()
    second = runner.run(cfg)  # the default: not tried again, no time spent on it
    assert second.documents == 0 and second.already_done == 2 and time.monotonic() - t0 < 1.5
    third = runner.run(cfg.model_copy(update={"retry_timeouts": True}))
    assert third.documents == 1 and third.errors_by_type == {"document_timeout": 1}
    docs = [d for d in read_rows(str(out), "documents") if d["source_uri"].endswith("bomb.pdf")]
    assert [(d["attempt"], d["error_type"]) for d in docs] == [(2, "document_timeout")]  # one row, replaced
    pages = read_rows(str(out), "pages")
    assert [p["page_number"] for p in pages if p["source_uri"].endswith("bomb.pdf")] == [1]  # its first page, once
    assert max(page_key_counts(pages).values()) == 1
    from pipeline.cli import main

    assert main(["verify", str(out)]) == 0
