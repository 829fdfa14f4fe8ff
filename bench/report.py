"""How `docpipe report` scales: the whole-output report of a synthetic output of N pages.

Runs sample_docs once without a model (a real output: runs table, schemas), then replaces
its rows by N pages (N/10 documents of 10 pages, 1,000 documents per shard file) copied
from a real row, and times `make_report` over the whole output. The sources of the
synthetic rows do not exist, so the gallery's thumbnails are notes: this measures reading,
aggregating, choosing and rendering the page, not PDF rendering (which is per shown page).

    python bench/report.py --pages 100000 20000
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
PER_DOC = 10
PER_SHARD = 1000


def synthetic_output(base: Path, pages: int) -> Path:
    from pipeline.config import RunConfig
    from pipeline.runner import run

    out = base / f"out-{pages}"
    run(RunConfig(source=str(ROOT / "sample_docs"), output=str(out), prep_workers=0, progress=False))
    page_row = pq.read_table(next((out / "pages").glob("*.parquet"))).slice(0, 1)
    docs = pq.read_table(next((out / "documents").glob("*.parquet")))
    doc_row = docs.filter(pc.equal(docs["status"], "ok")).slice(0, 1)
    for old in [*(out / "pages").glob("*.parquet"), *(out / "documents").glob("*.parquet")]:
        old.unlink()
    n_docs = pages // PER_DOC

    def put(table: pa.Table, name: str, values: list) -> pa.Table:
        return table.set_column(table.schema.get_field_index(name), name,
                                pa.array(values, table.schema.field(name).type))

    for start in range(0, n_docs, PER_SHARD):
        ids = range(start, min(start + PER_SHARD, n_docs))
        shard = f"bench{start:010d}"
        pt = pa.concat_tables([page_row] * (len(ids) * PER_DOC))
        pt = put(pt, "source_uri", [f"/bench/doc{d:07d}.pdf" for d in ids for _ in range(PER_DOC)])
        pt = put(pt, "doc_id", [f"d{d:07d}" for d in ids for _ in range(PER_DOC)])
        pt = put(pt, "page_number", [p + 1 for _ in ids for p in range(PER_DOC)])
        pt = put(pt, "shard_id", [shard] * len(pt))
        dt = pa.concat_tables([doc_row] * len(ids))
        dt = put(dt, "source_uri", [f"/bench/doc{d:07d}.pdf" for d in ids])
        dt = put(dt, "doc_id", [f"d{d:07d}" for d in ids])
        dt = put(dt, "shard_id", [shard] * len(dt))
        pq.write_table(pt, out / "pages" / f"part-{shard}.parquet")
        pq.write_table(dt, out / "documents" / f"part-{shard}.parquet")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, nargs="+", default=[20_000, 100_000])
    args = parser.parse_args()
    from pipeline.report import make_report

    base = Path(tempfile.mkdtemp(prefix="docpipe-bench-report-"))
    try:
        print(f"{'pages':>8} {'report s':>9} {'html KB':>8} {'gallery':>8} {'max RSS MB':>11}")
        for pages in args.pages:
            out = synthetic_output(base, pages)
            t0 = time.perf_counter()
            result = make_report(str(out))
            seconds = time.perf_counter() - t0
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{result.pages:>8} {seconds:>9.2f} {len(result.html) / 1024:>8.0f} {result.gallery_pages:>8} "
                  f"{rss:>11.0f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
