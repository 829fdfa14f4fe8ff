"""A year of nightly runs, before and after `docpipe compact`: files, query times.

    .venv/bin/python bench/compaction.py [--nights 365] [--repeat 5]

A nightly run over a bucket commits a small shard (pages and documents files) and a runs
row each night. This builds such an output: one real run over sample_docs (no model; 6
documents, 10 pages) gives the rows, which are copied for every night under new source
URIs, ids and dates and committed night by night through `Dataset.commit_shard` and
`write_run`, as a run would. Then it times, best of `--repeat`, DuckDB queries that glob
the files, pyarrow reading the committed pages (`open_table`) and a run's resume check
(`read_state`), runs `Dataset.compact`, and times them again. Prints one table.
Not a test: tests/dataset/test_compaction.py holds the assertions.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from pipeline.config import RunConfig  # noqa: E402
from pipeline.dataset import DOCUMENTS, PAGES, RUNS, Dataset  # noqa: E402
from pipeline.runner import run  # noqa: E402
from schemas import DOCUMENTS_SCHEMA, PAGES_SCHEMA, RUNS_SCHEMA  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "sample_docs"


def seed_rows(work: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Rows of one real run over sample_docs: (documents, pages, runs row)."""
    out = work / "seed"
    run(RunConfig(source=str(SAMPLES), output=str(out), prep_workers=0, progress=False))
    ds = Dataset(str(out))
    return (ds.open_table(DOCUMENTS).to_table().to_pylist(), ds.open_table(PAGES).to_table().to_pylist(),
            ds.read_runs()[-1])


def build_year(out: Path, nights: int, seed: tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]) -> None:
    docs, pages, run_row = seed
    dataset = Dataset(str(out))
    for night in range(nights):
        run_id = f"night-{night:03d}"
        shard = hashlib.sha256(run_id.encode()).hexdigest()[:20]
        shift = timedelta(days=night)
        ids: dict[str, tuple[str, str]] = {}
        night_docs = []
        for d in docs:
            uri = d["source_uri"].replace(str(SAMPLES), f"s3://bucket/incoming/{night:03d}")
            doc_id = hashlib.sha256(f"{night}:{d['doc_id']}".encode()).hexdigest()
            ids[d["doc_id"]] = (uri, doc_id)
            night_docs.append({**d, "source_uri": uri, "doc_id": doc_id, "shard_id": shard, "run_id": run_id,
                               "duplicate_of": None, "processed_at": d["processed_at"] + shift})
        night_pages = [{**p, "source_uri": ids[p["doc_id"]][0], "doc_id": ids[p["doc_id"]][1], "shard_id": shard,
                        "run_id": run_id} for p in pages]
        dataset.commit_shard(shard, pa.Table.from_pylist(night_pages, schema=PAGES_SCHEMA),
                             pa.Table.from_pylist(night_docs, schema=DOCUMENTS_SCHEMA))
        dataset.write_run({**run_row, "run_id": run_id, "started_at": run_row["started_at"] + shift,
                           "ended_at": run_row["ended_at"] + shift})
    assert RUNS_SCHEMA is not None


def best_of(repeat: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(out: Path, repeat: int) -> dict[str, float]:
    import duckdb

    con = duckdb.connect()
    o = str(out)
    queries = {
        "DuckDB: pages by page kind (glob pages/*.parquet)":
            f"SELECT page_kind, count(*), sum(text_layer_chars) FROM read_parquet('{o}/pages/*.parquet') GROUP BY 1",
        "DuckDB: documents JOIN pages by status":
            f"SELECT d.status, count(*) FROM read_parquet('{o}/documents/*.parquet') d "
            f"JOIN read_parquet('{o}/pages/*.parquet') p USING (doc_id) GROUP BY 1",
        "DuckDB: pages of the latest run's fingerprint (README query)":
            f"SELECT count(*) FROM read_parquet('{o}/pages/*.parquet') p WHERE p.config_fingerprint = "
            f"(SELECT config_fingerprint FROM read_parquet('{o}/runs/*.parquet', union_by_name=true) "
            f"WHERE status = 'completed' ORDER BY lease_generation DESC NULLS LAST, started_at DESC LIMIT 1)",
    }
    figures = {name: best_of(repeat, lambda q=q: con.sql(q).fetchall()) for name, q in queries.items()}
    dataset = Dataset(o)
    figures["pyarrow: Dataset.open_table('pages').to_table()"] = best_of(
        repeat, lambda: dataset.open_table(PAGES).to_table())
    figures["resume check: Dataset.read_state()"] = best_of(repeat, lambda: dataset.read_state())
    return figures


def count_files(out: Path) -> int:
    return sum(1 for t in (PAGES, DOCUMENTS, RUNS) for _ in (out / t).glob("*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="docpipe-compact-") as tmp:
        work = Path(tmp)
        seed = seed_rows(work)
        out = work / "year"
        t0 = time.perf_counter()
        build_year(out, args.nights, seed)
        print(f"built {args.nights} nights ({len(seed[0])} documents, {len(seed[1])} pages each) "
              f"in {time.perf_counter() - t0:.1f} s")
        files_before = count_files(out)
        before = measure(out, args.repeat)
        result = Dataset(str(out)).compact(grace_s=0)
        print(result.describe())
        files_after = count_files(out)
        after = measure(out, args.repeat)
        print()
        print(f"| query ({args.nights} nights, best of {args.repeat}) | before: {files_before} files | "
              f"after: {files_after} files | speed-up |")
        print("|---|---|---|---|")
        for name in before:
            print(f"| {name} | {before[name] * 1000:.0f} ms | {after[name] * 1000:.0f} ms | "
                  f"{before[name] / after[name]:.1f}x |")
        print(f"| `docpipe compact` itself | | {result.seconds:.1f} s | |")


if __name__ == "__main__":
    main()
