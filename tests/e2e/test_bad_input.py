"""Every kind of bad input ends up as its own documents row, and the run goes on.

The rasterize tests check each case at the stage; this checks the whole path: a folder
holding all of them (plus good files) through `runner.run`, one row per file, each
with its specific error, and the good files processed.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests import docs_factory as f
from pipeline import runner
from pipeline.config import RunConfig

# file name -> (bytes, expected status, expected error_type or None)
CASES = {
    "a-good.pdf": (f.born_digital_pdf(2), "ok", None),
    "b-zero-bytes.pdf": (f.zero_byte_file(), "error", "empty_file"),
    "c-html.pdf": (f.html_named_pdf(), "error", "mislabelled"),
    "d-text.pdf": (f.text_named_pdf(), "error", "mislabelled"),
    "e-truncated.pdf": (f.truncated_pdf(), "error", "no_pages"),
    "f-encrypted.pdf": (f.encrypted_pdf(), "error", "encrypted_pdf"),
    "g-zero-pages.pdf": (f.zero_page_pdf(), "error", "no_pages"),
    "h-bomb.png": (f.bomb_png(), "error", "image_too_large"),
    "i-corrupt-frame.tiff": (f.multipage_tiff(frames=3, corrupt_frame=1), "partial", "page_errors"),
    "j-huge-page.pdf": (f.page_pdf(14_400, 14_400), "ok", None),
    "k-good.png": (f.encode_image(f.chart_image(), "PNG"), "ok", None),
    "l-pdf-named.png": (f.text_pdf(2), "ok", None),  # the content decides, not the name
    "m-png-named.pdf": (f.encode_image(f.marker_image(), "PNG"), "ok", None),
    "n-cut.tiff": (f.truncated_tiff(frames=4, keep=2), "partial", "page_errors"),
    "o-cut-blank-page.pdf": (f.damaged_blank_page_pdf(), "partial", "damaged_blank_pages"),
}


@pytest.fixture(scope="module")
def run_output(tmp_path_factory) -> tuple[Path, Path]:
    src = tmp_path_factory.mktemp("bad-input")
    for name, (data, _, _) in CASES.items():
        (src / name).write_bytes(data)
    out = src.parent / (src.name + "-out")
    runner.run(RunConfig(source=str(src), output=str(out), progress=False, shard_size=4))
    return src, out


def _rows(out: Path, table: str) -> list[dict]:
    return ds.dataset(out / table, format="parquet").to_table().to_pylist()


def test_one_documents_row_per_input_file(run_output):
    src, out = run_output
    names = sorted(Path(r["source_uri"]).name for r in _rows(out, "documents"))
    assert names == sorted(p.name for p in src.iterdir())


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_case_has_its_own_clear_error(run_output, name):
    _, out = run_output
    _, status, error_type = CASES[name]
    (row,) = [r for r in _rows(out, "documents") if Path(r["source_uri"]).name == name]
    assert row["status"] == status, row
    assert row["error_type"] == error_type, row
    if error_type is not None:
        assert row["error_stage"] and len(row["error_message"]) > 10


def test_good_frames_of_a_corrupt_tiff_are_kept(run_output):
    _, out = run_output
    frames = sorted(
        (p["page_number"], p["status"], p["error_type"])
        for p in _rows(out, "pages")
        if p["source_uri"].endswith("i-corrupt-frame.tiff")
    )
    assert frames == [(1, "ok", None), (2, "error", "corrupt_image"), (3, "ok", None)]


def _pages_of(out: Path, name: str) -> list[tuple]:
    return sorted(
        (p["page_number"], p["status"], p["error_type"]) for p in _rows(out, "pages") if p["source_uri"].endswith(name)
    )


def test_misnamed_files_are_read_as_what_they_are(run_output):
    _, out = run_output
    assert _pages_of(out, "l-pdf-named.png") == [(1, "ok", None), (2, "ok", None)]
    assert _pages_of(out, "m-png-named.pdf") == [(1, "ok", None)]
    media = {Path(r["source_uri"]).name: r["media_type"] for r in _rows(out, "documents")}
    assert (media["l-pdf-named.png"], media["m-png-named.pdf"]) == ("application/pdf", "image/png")


def test_frames_before_the_cut_of_a_truncated_tiff_are_kept(run_output):
    _, out = run_output
    assert _pages_of(out, "n-cut.tiff") == [(1, "ok", None), (2, "ok", None), (3, "error", "corrupt_image")]


def test_an_oversized_page_is_rendered_lower_and_says_so(run_output):
    _, out = run_output
    (page,) = [p for p in _rows(out, "pages") if p["source_uri"].endswith("j-huge-page.pdf")]
    assert page["status"] == "ok" and page["width_px"] > 0
    assert page["dpi"] < page["requested_dpi"] and page["downscaled"] is True and page["render_note"]
