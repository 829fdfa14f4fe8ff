"""`docpipe run` prints only docpipe's own lines: no transformers progress bars or advice,
no Pillow warnings (from the run or its spawned prep workers); those go to the log (-v)."""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest


SAMPLES = Path(__file__).resolve().parents[2] / "sample_docs"
DOCPIPE = str(Path(sys.executable).parent / "docpipe")

# What docpipe itself writes to stderr: "docpipe: ..." lines, its log lines, the plan notes.
_OURS = re.compile(
    r"^(docpipe: |\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) (pipeline|flows|docpipe)[.:]"
    r"|\d+ of \d+ documents already in |no --model given)"
)


def _bad_exif_jpeg(path: Path) -> None:
    """A JPEG whose EXIF claims more bytes than it has: Pillow warns while reading it."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x010E] = "a description"
    exif[0x0112] = 1
    buf = io.BytesIO()
    Image.new("RGB", (300, 400), "white").save(buf, "JPEG", exif=exif.tobytes())
    data = bytearray(buf.getvalue())
    tiff = data.find(b"Exif\x00\x00") + 6
    order = "<" if data[tiff:tiff + 2] == b"II" else ">"
    (entries,) = struct.unpack_from(order + "H", data, tiff + 8)
    for k in range(entries):
        entry = tiff + 10 + 12 * k
        if struct.unpack_from(order + "H", data, entry)[0] == 0x010E:
            struct.pack_into(order + "I", data, entry + 4, 5000)  # count far past the end
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    """A few sample documents (a rotated PDF page, an EXIF-rotated scan, a chart) and a JPEG with broken EXIF."""
    src = tmp_path_factory.mktemp("quiet") / "docs"
    src.mkdir()
    for name in ("rotated_page.pdf", "rotated_scan.jpg", "chart.png"):
        shutil.copy(SAMPLES / name, src / name)
    _bad_exif_jpeg(src / "bad_exif.jpg")
    return src


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PYTHONWARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        env.pop(key, None)  # as a user's shell has them: unset
    return env


def test_pillow_warns_on_the_test_file(docs: Path) -> None:
    import warnings

    from PIL import Image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(docs / "bad_exif.jpg") as image:
            image.getexif()
    assert caught  # otherwise the test below proves nothing


def test_run_with_a_model_prints_only_docpipe_lines(docs: Path, tmp_path: Path, tiny_model) -> None:
    model = tiny_model("internvl")
    out = tmp_path / "out"
    proc = subprocess.run(
        [DOCPIPE, "run", str(docs), "--output", str(out), "--model", str(model), "--device", "cpu",
         "--max-new-tokens", "2", "--no-progress"],  # one spawned prep worker (the default)
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    foreign = [line for line in proc.stderr.splitlines() if line.strip() and not _OURS.match(line)]
    assert foreign == [], proc.stderr
    assert "Loading weights" not in proc.stdout and "Warning" not in proc.stdout
    assert f"docpipe report {out} --html report.html" in proc.stdout  # the summary says how to see the pages


def test_library_warnings_go_to_the_log_with_verbose(docs: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [DOCPIPE, "-v", "run", str(docs), "--output", str(tmp_path / "out"), "--prep-workers", "0", "--no-progress"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    logged = [line for line in proc.stderr.splitlines() if " DEBUG py.warnings: " in line]
    assert any("UserWarning" in line and "tag" in line.lower() for line in logged), proc.stderr[-3000:]
