"""`docpipe compact`: small shards merged without a reader of committed shards ever seeing a
row twice or not at all, and without changing what a rerun considers done."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest

from pipeline.cli import EXIT_OK, EXIT_OUTPUT_BUSY, main
from pipeline.config import RunConfig
from pipeline.dataset import DOCUMENTS, PAGES, RUNS, Dataset, plan_compaction
from pipeline.runner import run

SAMPLES = Path(__file__).resolve().parents[2] / "sample_docs"


def _run(src: Path, out: Path) -> None:
    run(RunConfig(source=str(src), output=str(out), shard_size=1, prep_workers=0, progress=False))


@pytest.fixture()
def nightly(tmp_path: Path) -> tuple[Path, Path]:
    """Two "nights": the sample documents one shard each, then one more file."""
    src = tmp_path / "bucket"
    shutil.copytree(SAMPLES, src, ignore=shutil.ignore_patterns("*.md", "*.py", "*.tiff"))
    out = tmp_path / "out"
    _run(src, out)
    shutil.copy(SAMPLES / "scanned_report.tiff", src / "scanned_report.tiff")
    _run(src, out)
    return src, out


def _keys(dataset: Dataset, table: str) -> Counter:
    if table == PAGES:
        cols = ["source_uri", "page_number"]
    elif table == DOCUMENTS:
        cols = ["source_uri", "doc_id"]
    else:
        cols = ["run_id"]
    t = dataset.open_table(table).to_table(columns=cols)
    return Counter(zip(*(t.column(c).to_pylist() for c in cols)))


def test_plan_groups_consecutive_small_shards() -> None:
    sizes = [("a", 3), ("b", 3), ("c", 5), ("d", 1), ("e", 9)]
    assert plan_compaction(sizes, 8) == [["a", "b"], ["c", "d"]]  # "e" alone: nothing to gain
    assert plan_compaction(sizes, 100) == [["a", "b", "c", "d", "e"]]


def test_compaction_keeps_every_row_once_and_the_done_set(nightly: tuple[Path, Path]) -> None:
    src, out = nightly
    dataset = Dataset(str(out))
    before = {t: _keys(dataset, t) for t in (PAGES, DOCUMENTS, RUNS)}
    state_before = dataset.read_state()
    assert len(dataset.part_files(DOCUMENTS)) == 6 and len(dataset.part_files(RUNS)) == 2

    result = dataset.compact(grace_s=0)
    assert result.shards_merged == 6 and result.merged_files == 1 and result.runs_merged == 2
    assert len(dataset.part_files(DOCUMENTS)) == 1 and len(dataset.part_files(PAGES)) == 1
    assert len(dataset.part_files(RUNS)) == 1
    after = {t: _keys(dataset, t) for t in (PAGES, DOCUMENTS, RUNS)}
    assert after == before and max(after[PAGES].values()) == 1
    state_after = dataset.read_state()
    assert state_after.doc_keys == state_before.doc_keys
    assert dict(state_after.known) == dict(state_before.known)

    # the rows say which file they live in, as for any shard
    (merged,) = dataset.part_files(DOCUMENTS)
    shard_ids = set(dataset.open_table(PAGES).to_table(columns=["shard_id"]).column("shard_id").to_pylist())
    assert shard_ids == {merged} and merged.startswith("c-")

    # a rerun finds everything done, and a new file lands beside the merged shard
    summary = run(RunConfig(source=str(src), output=str(out), shard_size=1, prep_workers=0, progress=False))
    assert summary.documents == 0 and summary.already_done == summary.total_documents
    again = dataset.compact(grace_s=0)  # only the runs rows: the merged one and the rerun's
    assert (again.shards_merged, again.runs_merged) == (0, 2)
    assert dataset.compact(grace_s=0).describe().startswith("nothing to compact")


def test_readers_never_see_a_row_twice_or_miss_one(nightly: tuple[Path, Path]) -> None:
    _src, out = nightly
    dataset = Dataset(str(out))
    expected = _keys(dataset, PAGES)
    seen: list[Counter] = []
    stop = threading.Event()

    def read() -> None:
        reader = Dataset(str(out))
        while not stop.is_set():
            try:
                seen.append(_keys(reader, PAGES))
            except FileNotFoundError:  # listed before the removal: reopen (loud, never short)
                continue

    thread = threading.Thread(target=read)
    thread.start()
    try:
        dataset.compact(grace_s=0.5)
    finally:
        stop.set()
        thread.join()
    assert len(seen) >= 3
    assert all(s == expected for s in seen)


def test_compaction_cut_short_is_invisible_and_finished_next_time(
    nightly: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _src, out = nightly
    dataset = Dataset(str(out))
    expected = {t: _keys(dataset, t) for t in (PAGES, DOCUMENTS)}

    # cut after the switch, before the old files are removed: readers see the merged shard only
    def boom(*_a, **_k):
        raise OSError("storage went away")

    monkeypatch.setattr(Dataset, "_remove_replaced", boom)
    with pytest.raises(OSError):
        dataset.compact(grace_s=0)
    monkeypatch.undo()
    assert len(dataset.part_files(DOCUMENTS)) == 7  # 6 old + the merged one, on disk
    assert {t: _keys(dataset, t) for t in (PAGES, DOCUMENTS)} == expected
    dataset.compact(grace_s=0)  # finishes the removal
    assert len(dataset.part_files(DOCUMENTS)) == 1
    assert {t: _keys(dataset, t) for t in (PAGES, DOCUMENTS)} == expected


def test_cut_before_the_switch_leaves_no_trace(nightly: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _src, out = nightly
    dataset = Dataset(str(out))
    expected = {t: _keys(dataset, t) for t in (PAGES, DOCUMENTS)}
    real = Dataset.write_table

    def failing_documents(self, path, table, *args, **kwargs):
        if "/documents/part-c-" in path:
            raise OSError("cut")
        return real(self, path, table, *args, **kwargs)

    monkeypatch.setattr(Dataset, "write_table", failing_documents)
    with pytest.raises(OSError):
        dataset.compact(grace_s=0)
    monkeypatch.undo()
    assert {t: _keys(dataset, t) for t in (PAGES, DOCUMENTS)} == expected
    assert dataset.read_state().doc_keys == {k for k in expected[DOCUMENTS]}
    dataset.compact(grace_s=0)
    assert {t: _keys(dataset, t) for t in (PAGES, DOCUMENTS)} == expected
    assert not list((out / "_docpipe" / "compactions").glob("documents-*.json")) or len(
        dataset.part_files(DOCUMENTS)) == 1


def test_cli_compact_and_a_busy_output(nightly: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _src, out = nightly
    lease = Dataset(str(out)).acquire("someone-else")
    try:
        assert main(["compact", str(out)]) == EXIT_OUTPUT_BUSY
    finally:
        lease.release()
    assert main(["compact", str(out)]) == EXIT_OK
    assert "merged 6 shards into 1" in capsys.readouterr().out


def test_compact_that_cannot_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A full disk (here: a file size limit of 0 bytes, the same failing write) makes compact
    fail in one line; no `_docpipe/lease/.<gen>.json.tmp-*` is left behind."""
    import resource
    import signal
    import subprocess
    import sys

    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(SAMPLES, src, ignore=shutil.ignore_patterns("*.md", "*.py", "*.tiff", "*.jp*"))
    _run(src, out)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))

    def no_room() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    docpipe = str(Path(sys.executable).parent / "docpipe")
    result = subprocess.run([docpipe, "compact", str(out)], preexec_fn=no_room, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    after = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert [p for p in after if ".tmp-" in p] == []  # was: _docpipe/lease/.000000000002.json.tmp-<hex>
    assert after == before
