"""Regenerate the sample documents in this folder (PyMuPDF + Pillow only, deterministic).

    python sample_docs/make_samples.py            # (re)write the files next to this script
    python sample_docs/make_samples.py --out DIR  # write them elsewhere
    python sample_docs/make_samples.py --check    # exit 1 if a committed file is stale

The documents are built by `tests/docs_factory.py`, the same code the tests use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import docs_factory as f  # noqa: E402  (lives in tests/, shared with the test suite)

SCAN_DPI = 100


def _report_scans() -> list[Image.Image]:
    """Each report page as a clean greyscale scan (for the TIFF)."""
    report = f.report_pdf()
    return [
        f.render_page_image(report, page_number=n, dpi=SCAN_DPI).rotate(
            0.6 * (-1) ** n, resample=Image.Resampling.BICUBIC, fillcolor=255
        )
        for n in (1, 2, 3)
    ]


def _scan_jpeg() -> bytes:
    scan = f.scan_image(dpi=SCAN_DPI, skew_deg=1.2, noise=8.0, seed=11, pdf=f.report_pdf())
    return f.encode_image(scan, "JPEG", quality=70, dpi=(SCAN_DPI, SCAN_DPI))


def _rotated_scan_jpeg() -> bytes:
    """A scan stored lying on its side; EXIF orientation 6 says to turn it 90 degrees clockwise."""
    scan = f.scan_image(dpi=SCAN_DPI, skew_deg=-0.8, noise=8.0, seed=12, pdf=f.born_digital_pdf())
    stored = scan.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise, as the camera saved it
    exif = Image.Exif()
    exif[0x0112] = 6
    return f.encode_image(stored, "JPEG", quality=70, dpi=(SCAN_DPI, SCAN_DPI), exif=exif.tobytes())


def _multipage_tiff() -> bytes:
    first, *rest = _report_scans()
    return f.encode_image(
        first, "TIFF", save_all=True, append_images=rest, compression="tiff_deflate", dpi=(SCAN_DPI, SCAN_DPI)
    )


SAMPLES: dict[str, tuple[Callable[[], bytes], str]] = {
    "report.pdf": (f.report_pdf, "3-page born-digital report: text, a ruled table, a vector bar chart"),
    "scanned_page.jpg": (_scan_jpeg, f"report page 1 scanned at {SCAN_DPI} dpi: greyscale, skewed 1.2 deg, sensor noise"),
    "scanned_report.tiff": (_multipage_tiff, f"the 3 report pages as a multi-page greyscale TIFF at {SCAN_DPI} dpi"),
    "rotated_scan.jpg": (_rotated_scan_jpeg, "a scan stored on its side with EXIF orientation 6 (display: 90 deg clockwise)"),
    "rotated_page.pdf": (lambda: f.rotated_pdf(90), "a portrait page with text and a chart, displayed with /Rotate 90"),
    "chart.png": (lambda: f.encode_image(f.chart_image((800, 500)), "PNG", optimize=True), "a bar chart as an 800x500 PNG"),
}


def build_samples() -> dict[str, bytes]:
    """File name -> bytes of every sample."""
    return {name: make() for name, (make, _) in SAMPLES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: this folder)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, data in build_samples().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_bytes() != data:
                stale.append(name)
            continue
        path.write_bytes(data)
        print(f"{path}  {len(data) / 1024:.0f} KiB")
    if stale:
        print("stale or missing: " + ", ".join(stale) + " (run python sample_docs/make_samples.py)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
