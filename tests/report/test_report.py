"""`docpipe report`: the page for a real run over sample_docs, loaded in headless Chromium.

The browser is driven over the DevTools protocol (a websocket on loopback): the page must
load with no console message, no exception, no failed load and no request leaving the
file (everything inline), every image must decode, and a screenshot of the gallery must
show something (pixel variance). Needs Debian's `chromium` (README, Install).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import RunConfig
from pipeline.report import (
    RunData,
    build_html,
    gallery_cards,
    make_report,
    render_thumbnail,
    select_gallery,
    summarize_run,
    write_report,
)
from pipeline.runner import run

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_docs"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def finished_run(sample_run) -> Path:
    """sample_docs plus an empty file (a document error), run with a tiny InternVL, then
    run again with nothing new (a nightly rerun: the latest run holds no rows): the session's
    `sample_run` (conftest), which other modules read too."""
    return sample_run.output


# ---------------------------------------------------------------------------------------
# The page's content
# ---------------------------------------------------------------------------------------


def test_report_has_every_page_and_the_error(finished_run: Path, tmp_path: Path) -> None:
    """After a no-op rerun the report (of the whole output, by default) still shows its content."""
    dest = tmp_path / "r.html"
    result = write_report(str(finished_run), str(dest))
    html = dest.read_text()
    assert result.scope == "output" and result.runs == 2
    assert result.pages == 10 and result.gallery_pages == 10  # sample_docs: 10 pages, all under the sample
    from pipeline.dataset import Dataset

    assert all(f"<td><code>{r['run_id']}</code></td>" in html for r in Dataset(str(finished_run)).read_runs())
    assert "docpipe output" in html
    assert html.count('class="card') == 10
    assert "empty_file" in html  # the document error, with its type ...
    assert html.count("data:image/jpeg;base64,") == 10  # a thumbnail for every card
    assert html.count("data:image/png;base64,") >= 3  # page kinds, errors, tokens, throughput
    assert "http://" not in html and "https://" not in html  # nothing to fetch


def test_one_runs_own_rows_with_run(finished_run: Path) -> None:
    from pipeline.dataset import Dataset

    first, rerun = (r["run_id"] for r in Dataset(str(finished_run)).read_runs())
    assert make_report(str(finished_run), first).pages == 10
    empty = make_report(str(finished_run), rerun)
    assert empty.scope == "run" and empty.pages == 0 and "No pages in this run." in empty.html


def test_latest_rows_keep_the_newest_row_of_each_page_of_the_current_version() -> None:
    from datetime import datetime, timedelta

    from pipeline.report import latest_rows

    t0 = datetime(2026, 1, 1)
    docs = [{"source_uri": "a.pdf", "doc_id": "v1", "processed_at": t0},
            {"source_uri": "a.pdf", "doc_id": "v2", "processed_at": t0 + timedelta(days=1)},  # the file changed
            {"source_uri": "b.pdf", "doc_id": "b", "processed_at": t0}]
    pages = [{"source_uri": "a.pdf", "doc_id": "v1", "page_number": n, "processed_at": t0} for n in (1, 2, 3)]
    pages += [{"source_uri": "a.pdf", "doc_id": "v2", "page_number": 1, "processed_at": t0 + timedelta(days=1)}]
    pages += [{"source_uri": "b.pdf", "doc_id": "b", "page_number": 1, "processed_at": t0, "run_id": "old"},
              {"source_uri": "b.pdf", "doc_id": "b", "page_number": 1, "processed_at": t0 + timedelta(hours=1),
               "run_id": "reprocessed"}]
    kept_docs, kept_pages = latest_rows(docs, pages)
    assert [(d["source_uri"], d["doc_id"]) for d in kept_docs] == [("a.pdf", "v2"), ("b.pdf", "b")]
    assert [(p["source_uri"], p["page_number"], p.get("run_id")) for p in kept_pages] == [
        ("a.pdf", 1, None), ("b.pdf", 1, "reprocessed")]


def test_gallery_shows_error_pages_first() -> None:
    pages = [{"source_uri": f"/d/{c}.pdf", "page_number": 1, "status": "ok"} for c in "abc"]
    pages.append({"source_uri": "/d/z.pdf", "page_number": 1, "status": "error", "error_type": "corrupt_image"})
    chosen, _ = select_gallery(pages, sample=10)
    assert [p["source_uri"] for p in chosen] == ["/d/z.pdf", "/d/a.pdf", "/d/b.pdf", "/d/c.pdf"]


def test_unknown_run_is_refused(finished_run: Path, tmp_path: Path) -> None:
    from pipeline.report import ReportError

    with pytest.raises(ReportError, match="no run 'nope'"):
        make_report(str(finished_run), "nope")


def test_cli_report(finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import EXIT_BAD_CONFIG, EXIT_OK, main

    dest = tmp_path / "cli.html"
    assert main(["report", str(finished_run), "--html", str(dest), "--sample", "2"]) == EXIT_OK
    assert "report of output" in (said := capsys.readouterr().out) and "(2 of 10 pages in the gallery)" in said
    assert dest.read_text().count('class="card') == 2
    assert main(["report", str(finished_run), "--run", "nope", "--html", str(tmp_path / "x.html")]) == EXIT_BAD_CONFIG
    assert capsys.readouterr().err.startswith("docpipe: no run 'nope'")


def test_gallery_takes_every_error_page_and_a_bounded_sample() -> None:
    pages = [{"source_uri": f"s3://b/{i:03d}.pdf", "page_number": 1, "status": "ok"} for i in range(100)]
    pages += [{"source_uri": f"s3://b/e{i}.tif", "page_number": 2, "status": "error", "error_type": "corrupt_image"}
              for i in range(7)]
    chosen, left_out = select_gallery(pages, sample=10)
    assert len(chosen) == 17 and left_out == 0
    assert sum(p["status"] == "error" for p in chosen) == 7
    assert chosen == select_gallery(list(reversed(pages)), sample=10)[0]  # the same pick whatever the order
    capped, left_out = select_gallery(pages, sample=0, max_errors=3)
    assert len(capped) == 3 and left_out == 4


def test_extracted_text_is_shown_as_text() -> None:
    page = {"source_uri": "/d/x.pdf", "page_number": 1, "status": "ok", "description": "<script>alert(1)</script>\x1b",
            "chart_answers": [{"question": "q?", "answer": "<b>a</b>"}], "truncated": True}
    data = RunData(run={"run_id": "r1", "status": "completed"}, documents=[], pages=[page], output="/o")
    html = build_html(data, summarize_run(data), [], gallery_cards([page], {}))
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;a&lt;/b&gt;" in html and ">truncated<" in html


def test_thumbnails_follow_rotation() -> None:
    rotated_pdf = render_thumbnail((SAMPLES / "rotated_page.pdf").read_bytes(), "application/pdf", 1)
    assert rotated_pdf.data and rotated_pdf.width > rotated_pdf.height  # /Rotate 90 shows landscape
    exif_scan = render_thumbnail((SAMPLES / "rotated_scan.jpg").read_bytes(), "image/jpeg", 1)
    assert exif_scan.data and exif_scan.height > exif_scan.width  # upright after EXIF orientation 6
    third = render_thumbnail((SAMPLES / "scanned_report.tiff").read_bytes(), "image/tiff", 3)
    assert third.data and third.note is None
    broken = render_thumbnail(b"%PDF-1.7 nothing", "application/pdf", 1)
    assert broken.data is None and broken.note and broken.note.startswith("could not render")


# ---------------------------------------------------------------------------------------
# Bounded: only what the run rendered, from the bytes it read, in time
# ---------------------------------------------------------------------------------------


@pytest.fixture()
def replaced_sources(tmp_path: Path) -> tuple[Path, Path]:
    """An output whose sources were replaced after the run: the PNG by a 169 MP PNG (over the
    run's decode limit), the PDF by a CPU-bomb PDF; one more PDF is left as it was."""
    from PIL import Image

    from tests.docs_factory import bomb_png, cpu_bomb_pdf, make_pdf

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (300, 200), "white").save(src / "scan.png")
    make_pdf(src / "report.pdf", 1)
    make_pdf(src / "kept.pdf", 1, text="kept as it was")
    out = tmp_path / "out"
    run(RunConfig(source=str(src), output=str(out), prep_workers=0, progress=False))
    (src / "scan.png").write_bytes(bomb_png(13_000, 13_000))  # 169 MP: under Pillow's hard limit, over the run's
    (src / "report.pdf").write_bytes(cpu_bomb_pdf(segments=100_000))  # minutes to draw
    return src, out


def _notes(html: str) -> list[str]:
    import re

    return re.findall(r'<p class="none">([^<]*)</p>', html)


def test_the_report_never_decodes_a_source_replaced_since_the_run(replaced_sources: tuple[Path, Path]) -> None:
    _src, out = replaced_sources
    t0 = time.monotonic()
    result = make_report(str(out))
    assert time.monotonic() - t0 < 60  # neither bomb was drawn (one takes minutes, the other 2 GB)
    notes = _notes(result.html)
    assert notes.count("not rendered: the source changed since the run (its bytes are not the ones it read)") == 2
    assert result.html.count("data:image/jpeg;base64,") == 1  # kept.pdf, unchanged


def test_thumbnails_stop_at_their_time_limits(tmp_path: Path) -> None:
    """A page that takes too long is killed in its worker; the next one is drawn by a fresh one;
    past the report's deadline nothing more is drawn."""
    import hashlib

    from pipeline.report import ThumbLimits, render_thumbnails
    from tests.docs_factory import cpu_bomb_pdf, make_pdf

    bomb, fine = tmp_path / "bomb.pdf", make_pdf(tmp_path / "fine.pdf", 1)
    bomb.write_bytes(cpu_bomb_pdf(segments=100_000))

    def row(path: Path, **extra: Any) -> dict[str, Any]:
        return {"source_uri": str(path), "page_number": 1, "width_px": 1700, "height_px": 2200,
                "doc_id": hashlib.sha256(path.read_bytes()).hexdigest(), **extra}

    media = {str(bomb): "application/pdf", str(fine): "application/pdf"}
    t0 = time.monotonic()
    got = render_thumbnails([row(bomb), row(fine)], media, limits=ThumbLimits(per_thumb_s=1.0))
    assert time.monotonic() - t0 < 30
    assert got[(str(bomb), 1)].note == "not rendered: drawing it took over 1 s"
    assert got[(str(fine), 1)].data  # a fresh worker drew the next one
    late = render_thumbnails([row(fine)], media, limits=ThumbLimits(deadline=time.monotonic() - 1))
    assert late[(str(fine), 1)].note == "not rendered: the report's time for thumbnails ran out"
    refused = render_thumbnails([{"source_uri": str(fine), "page_number": 1, "error_type": "image_too_large"}], media)
    assert refused[(str(fine), 1)].note == "not rendered: the run did not render this page (image_too_large)"


def test_an_image_over_the_runs_decode_limit_is_never_decoded() -> None:
    from tests.docs_factory import bomb_png

    thumb = render_thumbnail(bomb_png(13_000, 13_000), "image/png", 1)
    assert thumb.data is None and "decompression-bomb limit" in (thumb.note or "")


def test_the_flows_report_step_has_a_time_limit(replaced_sources: tuple[Path, Path]) -> None:
    import flows.tasks
    from pipeline.report import publish_markdown

    _src, out = replaced_sources
    run_id = _run_ids(out)[-1]
    assert 0 < flows.tasks.REPORT_TIMEOUT_S <= 300
    note = publish_markdown(str(out), run_id, timeout_s=0.0)
    html = (out / "_docpipe" / "reports" / f"{run_id}.html").read_text()
    assert "ran out" in html and "data:image/jpeg" not in html and "report" in note


def _run_ids(out: Path) -> list[str]:
    from pipeline.dataset import Dataset

    return [r["run_id"] for r in Dataset(str(out)).read_runs()]


# ---------------------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------------------


class DevTools:
    """A minimal DevTools protocol client: commands by id, events collected."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=20)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        wanted = self.next_id
        self.ws.send(json.dumps({"id": wanted, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.1))))

    def close(self) -> None:
        self.ws.close()


def _start_chromium(profile: Path) -> tuple[subprocess.Popen, str]:
    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium is not installed: apt-get install -y chromium (README, Install)")
    proc = subprocess.Popen(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--window-size=1280,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("Chromium did not start its DevTools endpoint")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
        targets = json.load(resp)
    page = next(t for t in targets if t.get("type") == "page")
    return proc, page["webSocketDebuggerUrl"]


def test_report_loads_cleanly_in_chromium(finished_run: Path, tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    dest = tmp_path / "report.html"
    write_report(str(finished_run), str(dest))
    proc, ws_url = _start_chromium(tmp_path / "profile")
    try:
        tools = DevTools(ws_url)
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.send(f"{domain}.enable")
        tools.send("Page.navigate", url=dest.as_uri())
        tools.wait_for("Page.loadEventFired")
        state = tools.send("Runtime.evaluate", returnByValue=True, expression="""(() => {
            const imgs = [...document.images];
            document.getElementById('gallery').scrollIntoView();
            return {cards: document.querySelectorAll('.card').length, images: imgs.length,
                    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length};
        })()""")["result"]["value"]
        time.sleep(0.3)  # let the scroll paint
        shot = tools.send("Page.captureScreenshot", format="png")["data"]
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    problems = []
    for e in tools.events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            problems.append(params["exceptionDetails"].get("text"))
        elif method == "Runtime.consoleAPICalled":
            problems.append(f"console.{params.get('type')}")
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            problems.append(params["entry"].get("text"))
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("data:", "file:")):
                problems.append(f"request to {url}")
        elif method == "Network.loadingFailed":
            problems.append(f"load failed: {params.get('errorText')}")
    assert problems == []
    assert state == {"cards": 10, "images": state["images"], "broken": 0} and state["images"] >= 13

    import base64

    png = Image.open(io.BytesIO(base64.b64decode(shot))).convert("L")
    (tmp_path / "gallery.png").write_bytes(base64.b64decode(shot))
    assert png.size[0] >= 1000
    assert ImageStat.Stat(png).stddev[0] > 20  # thumbnails and text, not a blank page


def test_markdown_notes_show_a_run_id_and_a_url_as_text(tmp_path: Path) -> None:
    """A backtick in a run id (or a URL) must not end its code span and let the rest become HTML
    in Prefect's markdown artifact (run ids are checked, but library callers and old outputs)."""
    from markdown_it import MarkdownIt

    from pipeline.report import publish_markdown

    run_id = "r`<img src=x onerror=alert(1)>"
    output = str(tmp_path / "no`<b>such</b>-output")
    note = publish_markdown(output, run_id)  # no such output: the "could not be written" note
    rendered = MarkdownIt("commonmark", {"html": True}).render(note)
    assert "<img" not in rendered and "<b>" not in rendered, rendered
    assert "&lt;img src=x onerror=alert(1)&gt;" in rendered


def test_markdown_text_is_never_markup() -> None:
    from markdown_it import MarkdownIt

    from pipeline.report.markdown import md_block, md_code, md_text

    source = (f"## run {md_code('`x`')} failed\n\n{md_text('<script>x</script> [link](javascript:alert(1)) *b*')}\n\n"
              + md_block("docpipe report 'a```b'"))
    rendered = MarkdownIt("commonmark", {"html": True}).render(source)
    assert "<script" not in rendered and "<a " not in rendered and "<em>" not in rendered, rendered
    assert "<code>`x`</code>" in rendered and "a```b" in rendered
