"""Orchestration figures: server start-up, deploy time, pages/s with one and two workers.

    .venv/bin/python bench/flows.py [--docs 40] [--shard-size 4]

Starts a throw-away Prefect server on 127.0.0.1 (PREFECT_HOME in a temp dir), a process
work pool, the deployments of prefect.yaml, and workers; runs `docpipe-fanout` with one
then two `gpu` workers and `docpipe-ingest` with one; prints a table; stops everything.
Without a model the figures measure the orchestration (process start per child run,
polling), not inference. Prints figures only: nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.prefect_support import PrefectStack, make_corpus, page_key_counts, read_rows  # noqa: E402

POOL = "docpipe"


def _summary(stack: PrefectStack, deployment: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        with get_client(sync_client=True) as client:
            art = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["docpipe-run-summary"])),
                                        sort=ArtifactSort.CREATED_DESC, limit=1)[0]
    return {row["metric"]: row["value"] for row in json.loads(art.data)}


def _run(stack: PrefectStack, deployment: str, src: Path, out: Path, shard_size: int) -> dict[str, object]:
    t0 = time.monotonic()
    stack.cli("deployment", "run", deployment, "--param", f"source={src}", "--param", f"output={out}",
              "--param", f"shard_size={shard_size}", "--watch", "--watch-timeout", "900", timeout_s=960)
    wall = time.monotonic() - t0
    pages = read_rows(str(out), "pages")
    table = _summary(stack, deployment)
    dupes = sum(c - 1 for c in page_key_counts(pages).values() if c > 1)
    return {"deployment": deployment, "pages": len(pages), "duplicates": dupes, "flow_s": table["seconds"],
            "pages_per_s": table["pages/s"], "cli_wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--shard-size", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="docpipe-bench-") as tmp:
        base = Path(tmp)
        src = base / "in"
        expected = make_corpus(src, args.docs)
        print(f"corpus: {args.docs} PDFs, {sum(expected.values())} pages, shard_size {args.shard_size}")
        stack = PrefectStack(home=base / "home", log_dir=base / "logs")
        try:
            stack.start_server()
            print(f"server start-up: {stack.startup_s:.1f} s")
            t0 = time.monotonic()
            stack.create_pool(POOL)
            stack.deploy_all()
            print(f"work-pool create + deploy --all: {time.monotonic() - t0:.1f} s")
            stack.start_worker(POOL, "control", "control", limit=None)
            stack.start_worker(POOL, "gpu", "gpu-0", CUDA_VISIBLE_DEVICES="0")
            rows = [
                {"workers": 1, **_run(stack, "docpipe-ingest/ingest", src, base / "out-ingest", args.shard_size)},
                {"workers": 1, **_run(stack, "docpipe-fanout/fanout", src, base / "out-1", args.shard_size)},
            ]
            stack.start_worker(POOL, "gpu", "gpu-1", CUDA_VISIBLE_DEVICES="1")
            rows.append({"workers": 2, **_run(stack, "docpipe-fanout/fanout", src, base / "out-2", args.shard_size)})
        finally:
            stack.close()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
