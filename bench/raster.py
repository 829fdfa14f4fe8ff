"""Benchmark: the CPU stage (rasterize + tile) against bare PyMuPDF rendering, and memory.

    python bench/raster.py [--pages 20] [--repeat 3] [--skip-memory]

1. Speed, on one core: born-digital pages (sample_docs/report.pdf repeated) and scanned
   pages (sample_docs/scanned_page.jpg placed on PDF pages, as scanners write them).
   For each page the pipeline's stage (open, render at the tiling policy's size, text
   layer, page kind, tile plan, cut tiles) is timed side by side with bare
   `page.get_pixmap` at the same pixel size, and the ratio of their speeds is printed.
   The best of `--repeat` runs is kept for both, to damp a noisy machine.
2. Peak RSS of `docpipe run` (no model, --prep-workers 0 so every stage is in the one
   measured process) in a fresh process for 20 pages, for 2,000 pages in 100 documents,
   and for one 2,000-page document, made from the sample by repetition.

Figures go to stdout; nothing is asserted (this is not a test).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pymupdf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import rasterize, tiling  # noqa: E402
from pipeline.records import PageImage  # noqa: E402

SAMPLES = ROOT / "sample_docs"


def born_digital_pdf(pages: int) -> bytes:
    src = pymupdf.open(SAMPLES / "report.pdf")
    out = pymupdf.open()
    while out.page_count < pages:
        out.insert_pdf(src, to_page=min(src.page_count, pages - out.page_count) - 1)
    data = out.tobytes()
    out.close()
    src.close()
    return data


def scanned_pdf(pages: int) -> bytes:
    scan = (SAMPLES / "scanned_page.jpg").read_bytes()
    out = pymupdf.open()
    for _ in range(pages):
        page = out.new_page(width=612, height=792)
        page.insert_image(page.rect, stream=scan)
    data = out.tobytes()
    out.close()
    return data


def time_pipeline(data: bytes, options: rasterize.RasterOptions, cut: bool) -> tuple[float, list[tuple[int, int]]]:
    sizes = []
    t0 = time.perf_counter()
    doc = rasterize.open_document(data, uri="bench", doc_id="bench", media_type="application/pdf")
    assert not isinstance(doc, Exception) and hasattr(doc, "pages"), doc
    with doc:
        for item in doc.pages(options):
            assert isinstance(item, PageImage), item
            plan = tiling.plan_tiles(item.render.width, item.render.height, options.tiling)
            if cut:
                tiles = tiling.cut_tiles(item.image, plan, thumbnail=item.thumbnail)
                assert len(tiles) == plan.tiles
            sizes.append((item.render.width, item.render.height))
    return time.perf_counter() - t0, sizes


def time_bare(data: bytes, sizes: list[tuple[int, int]]) -> float:
    t0 = time.perf_counter()
    with pymupdf.open(stream=data, filetype="pdf") as doc:
        for page, (w, h) in zip(doc, sizes, strict=True):
            rect = page.rect
            page.get_pixmap(
                matrix=pymupdf.Matrix((w - 1e-3) / rect.width, (h - 1e-3) / rect.height),
                colorspace=pymupdf.csRGB,
                alpha=False,
            )
    return time.perf_counter() - t0


def speed(pages: int, repeat: int) -> None:
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        core = "pinned to one core"
    except (AttributeError, OSError):
        core = "not pinned"
    print(f"## Speed ({pages} pages per kind, best of {repeat}, {core})")
    print(f"{'pages':<14}{'variant':<34}{'pipeline p/s':>13}{'bare p/s':>10}{'ratio':>8}")
    for kind, data in (("born-digital", born_digital_pdf(pages)), ("scanned", scanned_pdf(pages))):
        variants = (
            ("rasterize + text + kind + tiles", rasterize.RasterOptions(), True),
            ("rasterize + kind + tiles", rasterize.RasterOptions(extract_text=False), True),
            ("rasterize + text + kind + plan", rasterize.RasterOptions(), False),
        )
        for name, options, cut in variants:
            best_pipe, best_bare = float("inf"), float("inf")
            for _ in range(repeat):
                t_pipe, sizes = time_pipeline(data, options, cut)
                t_bare = time_bare(data, sizes)
                best_pipe, best_bare = min(best_pipe, t_pipe), min(best_bare, t_bare)
            pipe_ps, bare_ps = pages / best_pipe, pages / best_bare
            print(f"{kind:<14}{name:<34}{pipe_ps:>13.1f}{bare_ps:>10.1f}{pipe_ps / bare_ps:>8.2f}")
    print(f"render size: {sizes[0][0]}x{sizes[0][1]} px (the InternVL tile canvas of a Letter page)")


CHILD = """
import resource, sys, time
from pipeline.config import RunConfig
from pipeline.runner import run
t = time.perf_counter()
s = run(RunConfig(source=sys.argv[1], output=sys.argv[2], progress=False, prep_workers=0))  # all in this process
print(s.pages, round(time.perf_counter() - t, 2), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(source: Path, out: Path) -> tuple[int, float, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    pages, seconds, kib = proc.stdout.split()[-3:]
    return int(pages), float(seconds), int(kib) / 1024


def memory() -> None:
    print("\n## Peak RSS of `docpipe run` (no model), fresh process each")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        twenty = born_digital_pdf(20)
        small = root / "small"
        small.mkdir()
        (small / "doc.pdf").write_bytes(twenty)
        many = root / "many"
        many.mkdir()
        for i in range(100):  # distinct bytes per file, or they would be duplicates
            (many / f"doc{i:03d}.pdf").write_bytes(twenty + f"\n% copy {i}\n".encode())
        long = root / "long"
        long.mkdir()
        (long / "doc.pdf").write_bytes(born_digital_pdf(2000))
        results = {}
        for name, src in (("20 pages, 1 document", small), ("2,000 pages, 100 documents", many), ("2,000 pages, 1 document", long)):
            results[name] = peak_rss(src, root / f"out-{src.name}")
        base = results["20 pages, 1 document"][2]
        print(f"{'input':<30}{'pages':>7}{'seconds':>9}{'peak RSS MiB':>14}{'vs 20 pages':>13}")
        for name, (pages, seconds, mib) in results.items():
            print(f"{name:<30}{pages:>7}{seconds:>9.1f}{mib:>14.1f}{mib / base:>13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if not args.skip_memory:
        memory()  # first, before this process pins itself to one core
    speed(args.pages, args.repeat)


if __name__ == "__main__":
    main()
