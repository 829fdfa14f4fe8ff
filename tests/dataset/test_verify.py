"""`docpipe verify` and the run's own check: every table verified (runs/ too), a live output
checked for settled damage only, and a path without an output told so."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import EXIT_BAD_CONFIG, EXIT_NOTHING_PROCESSED, EXIT_OK, main
from pipeline.dataset import Dataset
from schemas import RUNS_SCHEMA
from tests.prefect_support import expected_pages, make_corpus, pages_by_name, read_rows


def _run(src: Path, out: Path, *extra: str) -> int:
    return main(["run", str(src), "--output", str(out), "--no-progress", "--prep-workers", "0", *extra])


def _runs_file_with(out: Path, name: str, table: pa.Table) -> Path:
    path = out / "runs" / f"part-{name}.parquet"
    pq.write_table(table, path)
    return path


def _bad_runs_files(out: Path) -> dict[str, str]:
    """Damaged, foreign and wrong-schema files in runs/ -> the kind verify must name."""
    (good,) = (out / "runs").glob("part-*.parquet")
    row = pq.read_table(good)
    foreign = _runs_file_with(out, "foreign", pa.table({"x": [1, 2]}))  # someone's Parquet file
    # a runs table whose started_at is missing (what made `run` and `report` fail with a TypeError)
    _runs_file_with(out, "no-start", row.drop_columns(["started_at"]).replace_schema_metadata(RUNS_SCHEMA.metadata))
    nulls = row.set_column(row.schema.get_field_index("started_at"), "started_at",
                           pa.nulls(1, pa.timestamp("us", tz="UTC")))
    _runs_file_with(out, "null-start", nulls.replace_schema_metadata(RUNS_SCHEMA.metadata))
    (out / "runs" / "part-text.parquet").write_text("not parquet")
    return {foreign.name: "runs_foreign", "part-no-start.parquet": "runs_schema",
            "part-null-start.parquet": "runs_schema", "part-text.parquet": "runs_unreadable"}


def test_damaged_foreign_and_wrong_schema_runs_files_are_found_and_quarantined(tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    expected = make_corpus(src, 3)
    assert _run(src, out) == EXIT_OK
    bad = _bad_runs_files(out)
    capsys.readouterr()
    assert main(["verify", str(out)]) == EXIT_NOTHING_PROCESSED  # was: "ok: ... is consistent"
    found = {line.split(":")[0] for line in capsys.readouterr().out.splitlines()}
    assert found == set(bad.values())
    # readers that do not repair leave them out rather than failing (was: TypeError in report and run)
    assert [r["status"] for r in Dataset(str(out)).read_runs()] == ["completed"]
    assert main(["report", str(out), "--html", str(tmp_path / "r.html")]) == EXIT_OK
    assert _run(src, out) == EXIT_OK  # the next run moves them aside
    quarantined = {p.name for p in (out / "_docpipe" / "quarantine").rglob("*.parquet")}
    assert quarantined == set(bad)
    assert main(["verify", str(out)]) == EXIT_OK
    assert pages_by_name(read_rows(str(out), "pages")) == expected_pages(expected)
    assert [r["status"] for r in Dataset(str(out)).read_runs()] == ["completed", "completed"]


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_verify_of_a_path_without_an_output_says_so(tmp_path: Path, capsys, where: str) -> None:
    target = tmp_path / "nothing-here"
    if where == "empty":
        target.mkdir()
    assert main(["verify", str(target)]) == EXIT_BAD_CONFIG  # was: "ok: ... is consistent", exit 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("docpipe: no docpipe output at ")
    assert not target.exists() or not any(target.iterdir())


def test_verify_of_an_empty_bucket_prefix_says_so(s3_bucket: str, s3_storage_options: dict, capsys) -> None:
    import json

    assert main(["verify", f"s3://{s3_bucket}/nothing", "--storage-options",
                 json.dumps(s3_storage_options)]) == EXIT_BAD_CONFIG
    assert "no docpipe output" in capsys.readouterr().err


@pytest.mark.slow
def test_verify_during_a_run_reports_only_settled_damage(tmp_path: Path) -> None:
    """A run stopped right after a commit (its pages still staged: the state every commit passes
    through) holds the output: plain `verify` says so and finds nothing wrong; a file damaged
    meanwhile is still reported."""
    from tests.e2e.test_faults import DOCPIPE, _stalled, _wake

    src, out = tmp_path / "in", tmp_path / "out"
    make_corpus(src, 4)
    assert _run(src, out, "--shard-size", "2") == EXIT_OK
    added = make_corpus(src, 4, start=10)  # the next night's files
    stalled = _stalled("after_commit", src, out, tmp_path, "--shard-size", "2")
    try:
        live = subprocess.run([DOCPIPE, "verify", str(out)], capture_output=True, text=True, timeout=120)
        assert live.returncode == 0, live.stdout + live.stderr  # was: exit 1, pages_staged reported as damage
        assert "holds the output" in live.stdout and "pages_staged" not in live.stdout
        victim = sorted((out / "pages").glob("part-*.parquet"))[0]
        victim.write_bytes(b"\0" * victim.stat().st_size)
        damaged = subprocess.run([DOCPIPE, "verify", str(out)], capture_output=True, text=True, timeout=120)
        assert damaged.returncode == 1 and "pages_unreadable" in damaged.stdout, damaged.stdout
        assert "pages_staged" not in damaged.stdout
    finally:
        code, err = _wake(stalled)
    assert code == 0, err
    assert set(added) <= {Path(d["source_uri"]).name for d in read_rows(str(out), "documents")}
