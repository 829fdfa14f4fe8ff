"""sources: listing, hashing, sniffing and reading documents under local, memory and S3 URLs."""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from pathlib import Path

import fsspec
import pymupdf
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from pipeline import sources
from pipeline.config import DEFAULT_EXTENSIONS
from pipeline.records import Stage
from pipeline.sources import discover, local_path, read_bytes, resolve, sniff_media_type

EXTS = list(DEFAULT_EXTENSIONS)


def _pdf(text: str) -> bytes:
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), text)
    data = doc.tobytes()
    doc.close()
    return data


def _image(fmt: str, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, fmt)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Relative path -> content. Created in an unsorted order on purpose.
TREE: dict[str, bytes] = {
    "zeta.jpeg": _image("JPEG"),
    "sub/deeper/chart.Png": _image("PNG"),
    "a.pdf": _pdf("first document"),
    "sub/Report.PDF": _pdf("second document"),
    "copy_of_a.pdf": _pdf("first document"),  # replaced below by the exact bytes of a.pdf
    "scan.TIF": _image("TIFF"),
    "empty.pdf": b"",
    "fake.pdf": b"<!DOCTYPE html><html><body>Not found</body></html>",
    "fake.png": b"just some words in a file\n",
    # never candidates:
    "notes.txt": b"plain notes",
    "README": b"no extension",
    ".hidden.pdf": _pdf("hidden"),
    ".git/objects/x.pdf": _pdf("in a hidden folder"),
    "sub/.cache/thumb.png": _image("PNG", (1, 2, 3)),
}
TREE["copy_of_a.pdf"] = TREE["a.pdf"]
CANDIDATES = sorted(
    ["zeta.jpeg", "sub/deeper/chart.Png", "a.pdf", "sub/Report.PDF", "copy_of_a.pdf", "scan.TIF",
     "empty.pdf", "fake.pdf", "fake.png"]
)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    for rel, data in TREE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _by_name(refs: list, root: str) -> dict[str, object]:
    prefix = root.rstrip("/") + "/"
    return {ref.uri.removeprefix(prefix): ref for ref in refs}


# ---- sniffing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("TIFF", "image/tiff"), ("WEBP", "image/webp"),
     ("BMP", "image/bmp"), ("GIF", "image/gif")],
)
def test_sniff_images_by_magic_bytes(fmt: str, media_type: str) -> None:
    assert sniff_media_type(_image(fmt)[:2048]) == media_type


@pytest.mark.parametrize(
    ("head", "media_type"),
    [
        (_pdf("x")[:2048], "application/pdf"),
        (b"\r\n  junk before the header %PDF-1.7\n", "application/pdf"),
        (b" " * 1100 + b"%PDF-1.7", "text/plain"),  # marker too late to be a PDF header
        (b"  <!doctype HTML>\n<html><head></head></html>", "text/html"),
        (b"<html><body>hi</body></html>", "text/html"),
        ("Grüße aus Köln\n\ttab and newline\r\n".encode(), "text/plain"),
        ("Grüße, encoded as Latin-1".encode("latin-1"), "text/plain"),
        ("a UTF-16 text".encode("utf-16"), "text/plain"),
        ("<?xml version='1.0'?><root/>".encode(), "text/plain"),
        (b"BM is also how this sentence starts", "text/plain"),  # not a BMP header
        (bytes(range(256)) * 4, "application/octet-stream"),
        (b"PK\x03\x04\x14\x00\x00\x00", "application/octet-stream"),
        (b"", "application/octet-stream"),
    ],
)
def test_sniff_documents_and_text(head: bytes, media_type: str) -> None:
    assert sniff_media_type(head) == media_type


def test_sniff_text_cut_mid_character() -> None:
    head = ("é" * 1024).encode()[:2047]  # ends in the middle of a two-byte character
    assert sniff_media_type(head) == "text/plain"


# ---- paths -----------------------------------------------------------------------------


def test_resolve_and_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = resolve("rel/dir")
    assert isinstance(fs, LocalFileSystem) and path == f"{tmp_path}/rel/dir"
    fs, path = resolve(f"file://{tmp_path}/x.pdf")
    assert isinstance(fs, LocalFileSystem) and path == f"{tmp_path}/x.pdf"
    fs, path = resolve("memory://bucket/key.pdf")
    assert isinstance(fs, MemoryFileSystem) and path == "/bucket/key.pdf"
    assert local_path("rel/x.pdf") == f"{tmp_path}/rel/x.pdf"
    assert local_path("/abs/x.pdf") == "/abs/x.pdf"
    assert local_path("file:///abs/x.pdf") == "/abs/x.pdf"
    assert local_path("s3://bucket/x.pdf") is None
    assert local_path("memory:///x.pdf") is None
    assert local_path("simplecache::s3://bucket/x.pdf") is None


# ---- local discovery -------------------------------------------------------------------


def test_discover_local_tree(tree: Path) -> None:
    refs = discover(str(tree), extensions=EXTS)
    assert [r.uri for r in refs] == [f"{tree}/{rel}" for rel in CANDIDATES]
    assert all(os.path.isabs(r.uri) and "://" not in r.uri for r in refs)
    for rel, ref in _by_name(refs, str(tree)).items():
        assert ref.doc_id == _sha(TREE[rel]), rel
        assert ref.size == len(TREE[rel]), rel
        assert read_bytes(ref.uri) == TREE[rel]
        assert local_path(ref.uri) == ref.uri
    media = {rel: ref.media_type for rel, ref in _by_name(refs, str(tree)).items()}
    assert media["a.pdf"] == media["sub/Report.PDF"] == "application/pdf"
    assert media["sub/deeper/chart.Png"] == "image/png"
    assert media["zeta.jpeg"] == "image/jpeg"
    assert media["scan.TIF"] == "image/tiff"


def test_discover_is_stable(tree: Path) -> None:
    first = discover(str(tree), extensions=EXTS, hash_workers=1)
    second = discover(str(tree), extensions=EXTS, hash_workers=4)
    assert first == second
    assert [r.uri for r in first] == sorted(r.uri for r in first)


def test_duplicates_point_at_the_first_copy(tree: Path) -> None:
    refs = _by_name(discover(str(tree), extensions=EXTS), str(tree))
    assert refs["a.pdf"].duplicate_of is None
    assert refs["copy_of_a.pdf"].duplicate_of == f"{tree}/a.pdf"
    assert refs["copy_of_a.pdf"].doc_id == refs["a.pdf"].doc_id
    assert refs["copy_of_a.pdf"].error is None
    others = [r for name, r in refs.items() if name != "copy_of_a.pdf"]
    assert all(r.duplicate_of is None for r in others)


def test_problem_files_are_data(tree: Path) -> None:
    refs = _by_name(discover(str(tree), extensions=EXTS), str(tree))
    empty = refs["empty.pdf"]
    assert empty.size == 0 and empty.doc_id == _sha(b"")
    assert (empty.error.stage, empty.error.type) == (Stage.SOURCES, "empty_file")
    fake_pdf = refs["fake.pdf"]
    assert (fake_pdf.error.stage, fake_pdf.error.type) == (Stage.SOURCES, "mislabelled")
    assert fake_pdf.error.message == "named .pdf but content is text/html"
    assert fake_pdf.media_type == "text/html" and fake_pdf.doc_id == _sha(TREE["fake.pdf"])
    fake_png = refs["fake.png"]
    assert fake_png.error.type == "mislabelled"
    assert fake_png.error.message == "named .png but content is text/plain"
    clean = [r for r in refs.values() if r.error is None]
    assert {r.uri.rsplit("/", 1)[-1] for r in clean} == {
        "a.pdf", "copy_of_a.pdf", "Report.PDF", "chart.Png", "zeta.jpeg", "scan.TIF"
    }


def test_unreadable_files_do_not_stop_discovery(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    os.symlink(tree / "no-such-target.pdf", tree / "broken.pdf")
    real_list = sources._list_files
    real_open = LocalFileSystem.open

    def list_then_delete(fs, root, *args):  # the file vanishes between listing and hashing
        found = real_list(fs, root, *args)
        (tree / "zeta.jpeg").unlink()
        return found

    def guarded_open(self, path, *args, **kwargs):
        if str(path).endswith("scan.TIF"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(sources, "_list_files", list_then_delete)
    monkeypatch.setattr(LocalFileSystem, "open", guarded_open)
    refs = _by_name(discover(str(tree), extensions=EXTS, hash_workers=3), str(tree))
    for name, cause in [("zeta.jpeg", "FileNotFoundError"), ("scan.TIF", "PermissionError"),
                        ("broken.pdf", "FileNotFoundError")]:
        error = refs[name].error
        assert (error.stage, error.type) == (Stage.SOURCES, "unreadable"), name
        assert cause in error.message, (name, error.message)
        assert not error.retryable, name  # gone, forbidden or a dangling link: no retry fixes it
        assert refs[name].doc_id == "" and refs[name].duplicate_of is None
    assert refs["a.pdf"].error is None and refs["a.pdf"].doc_id == _sha(TREE["a.pdf"])


def test_content_decides_the_type_where_the_extension_lies(tmp_path: Path) -> None:
    pdf, png, tiff = _pdf("a pdf"), _image("PNG"), _image("TIFF")
    files = {
        "pdf-named.png": (pdf, "application/pdf"),
        "pdf-named.jpg": (pdf + b"\n", "application/pdf"),
        "pdf-named.tiff": (pdf + b"\n\n", "application/pdf"),
        "png-named.pdf": (png, "image/png"),
        "tiff-named.jpg": (tiff, "image/tiff"),
        "jpeg-named.png": (_image("JPEG"), "image/jpeg"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "pdf-named.txt").write_bytes(pdf)  # extensions still choose the candidates
    refs = _by_name(discover(str(tmp_path), extensions=EXTS), str(tmp_path))
    assert set(refs) == set(files)
    for name, (data, media_type) in files.items():
        assert refs[name].error is None, (name, refs[name].error)
        assert (refs[name].media_type, refs[name].doc_id) == (media_type, _sha(data)), name


@pytest.mark.parametrize(
    ("extension", "media_type", "problem"),
    [
        ("pdf", "application/pdf", None),
        ("png", "application/pdf", None),
        ("pdf", "image/png", None),
        ("tif", "image/jpeg", None),
        ("pdf", "image/gif", None),  # an image: the rasterizer says which formats it reads
        ("pdf", "text/html", "named .pdf but content is text/html"),
        ("jpeg", "text/plain", "named .jpeg but content is text/plain"),
        ("pdf", "application/octet-stream", "named .pdf but content is application/octet-stream"),
        ("txt", "text/plain", None),  # a file named explicitly: the rasterizer rejects it
    ],
)
def test_mislabel_message(extension: str, media_type: str, problem: str | None) -> None:
    assert sources.mislabel_message(extension, media_type) == problem


def test_zip_named_pdf_is_still_mislabelled(tmp_path: Path) -> None:
    (tmp_path / "archive.pdf").write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)))
    [ref] = discover(str(tmp_path), extensions=EXTS)
    assert (ref.error.type, ref.error.retryable) == ("mislabelled", False)
    assert ref.error.message == "named .pdf but content is application/octet-stream"


def test_bad_content_is_not_retryable(tree: Path) -> None:
    refs = _by_name(discover(str(tree), extensions=EXTS), str(tree))
    for name in ("empty.pdf", "fake.pdf", "fake.png"):
        assert refs[name].error is not None and not refs[name].error.retryable, name


def _failing_memory_tree(exc: Exception, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, object]]:
    """A memory:// folder of two PDFs whose second one fails to open with `exc`."""
    fs = fsspec.filesystem("memory")
    base = f"/docpipe-test-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(f"{base}/good.pdf", TREE["a.pdf"])
    fs.pipe_file(f"{base}/flaky.pdf", TREE["sub/Report.PDF"])
    real_open = MemoryFileSystem._open

    def flaky_open(self, path, *args, **kwargs):
        if str(path).endswith("flaky.pdf"):
            raise exc
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", flaky_open)
    try:
        refs = discover(f"memory://{base}", extensions=EXTS)
    finally:
        fs.rm(base, recursive=True)
    return base, _by_name(refs, f"memory://{base}")


def _client_errors() -> list[Exception]:
    import botocore.exceptions as boto

    return [
        OSError(5, "Input/output error"),
        TimeoutError("read timed out"),
        ConnectionResetError(104, "Connection reset by peer"),
        boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
        boto.ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
        boto.ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}, "GetObject"),
    ]


@pytest.mark.parametrize("exc", _client_errors(), ids=lambda e: type(e).__name__)
def test_storage_errors_while_hashing_are_retryable(exc: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    _, refs = _failing_memory_tree(exc, monkeypatch)
    flaky = refs["flaky.pdf"].error
    assert (flaky.stage, flaky.type, flaky.retryable) == (Stage.SOURCES, "unreadable", True)
    assert type(exc).__name__ in flaky.message
    assert refs["flaky.pdf"].doc_id == ""
    assert refs["good.pdf"].error is None and refs["good.pdf"].doc_id == _sha(TREE["a.pdf"])


def test_a_bug_while_hashing_is_not_marked_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    _, refs = _failing_memory_tree(ValueError("unexpected value"), monkeypatch)
    flaky = refs["flaky.pdf"].error
    assert (flaky.type, flaky.retryable) == ("unreadable", False)


def test_is_transient() -> None:
    import errno

    import botocore.exceptions as boto

    for exc in _client_errors():
        assert sources.is_transient(exc), exc
    denied = boto.ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetObject")
    wrapped_io = RuntimeError("wrapped")
    wrapped_io.__cause__ = OSError(5, "Input/output error")
    assert sources.is_transient(wrapped_io)
    for exc in (ValueError("x"), KeyError("k"), RuntimeError("r"), MemoryError(), None,
                PermissionError(13, "Permission denied"), OSError(errno.ELOOP, "Too many levels of symbolic links"),
                OSError(errno.EACCES, "Permission denied"), FileNotFoundError(2, "gone"), denied):
        assert not sources.is_transient(exc), exc


def test_the_flows_retry_exactly_what_documents_retry() -> None:
    """One classifier: a shard task retries an error iff a document's row would be retryable."""
    import errno

    from flows import tasks

    for exc in [*_client_errors(), PermissionError(13, "denied"), OSError(errno.ELOOP, "loop"), ValueError("x")]:
        assert tasks.is_transient(exc) is sources.is_transient(exc), exc


def test_single_file_url(tree: Path) -> None:
    [ref] = discover(str(tree / "sub" / "Report.PDF"), extensions=EXTS)
    assert ref.uri == f"{tree}/sub/Report.PDF"
    assert ref.doc_id == _sha(TREE["sub/Report.PDF"]) and ref.media_type == "application/pdf"
    # A file named explicitly is taken even when its extension is not listed.
    [txt] = discover(str(tree / "notes.txt"), extensions=["pdf"])
    assert txt.media_type == "text/plain" and txt.error is None


def test_file_url_gives_plain_paths(tree: Path) -> None:
    plain = discover(str(tree), extensions=EXTS)
    assert discover(f"file://{tree}", extensions=EXTS) == plain
    assert discover(f"file://{tree}/", extensions=EXTS) == plain


def test_extensions_are_case_and_dot_insensitive(tree: Path) -> None:
    refs = discover(str(tree), extensions=[".PDF"])
    assert [r.uri.removeprefix(f"{tree}/") for r in refs] == [
        "a.pdf", "copy_of_a.pdf", "empty.pdf", "fake.pdf", "sub/Report.PDF"
    ]
    with pytest.raises(ValueError):
        discover(str(tree), extensions=[" "])


def test_limit_applies_after_sorting(tree: Path) -> None:
    everything = discover(str(tree), extensions=EXTS)
    assert discover(str(tree), extensions=EXTS, limit=3) == everything[:3]
    assert len(discover(str(tree), extensions=EXTS, limit=100)) == len(everything)
    with pytest.raises(ValueError):
        discover(str(tree), extensions=EXTS, limit=0)


def test_missing_source_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="source not found"):
        discover(str(tmp_path / "nope"), extensions=EXTS)
    (tmp_path / "empty-dir").mkdir()
    assert discover(str(tmp_path / "empty-dir"), extensions=EXTS) == []


def test_memory_url() -> None:
    fs = fsspec.filesystem("memory")
    base = f"/docpipe-test-{uuid.uuid4().hex[:8]}"
    try:
        for rel, data in TREE.items():
            fs.pipe_file(f"{base}/{rel}", data)
        refs = discover(f"memory://{base}", extensions=EXTS, hash_workers=2)
        assert [r.uri for r in refs] == [f"memory://{base}/{rel}" for rel in CANDIDATES]
        by_name = _by_name(refs, f"memory://{base}")
        assert by_name["copy_of_a.pdf"].duplicate_of == f"memory://{base}/a.pdf"
        assert by_name["fake.pdf"].error.type == "mislabelled"
        for rel, ref in by_name.items():
            assert ref.doc_id == _sha(TREE[rel])
            assert read_bytes(ref.uri) == TREE[rel]
            assert local_path(ref.uri) is None
    finally:
        fs.rm(base, recursive=True)


# ---- S3 (moto server) --------------------------------------------------------------------


def test_s3_bucket(s3_bucket: str, s3_storage_options: dict) -> None:
    fs, _ = resolve(f"s3://{s3_bucket}", s3_storage_options)
    for rel, data in TREE.items():
        fs.pipe_file(f"{s3_bucket}/in/{rel}", data)
    fs.pipe_file(f"{s3_bucket}/in/sub/", b"")  # a console-made "folder" marker
    fs.pipe_file(f"{s3_bucket}/in-other/zzz.pdf", TREE["a.pdf"])  # shares the prefix text only
    fs.invalidate_cache()

    refs = discover(f"s3://{s3_bucket}/in", extensions=EXTS, storage_options=s3_storage_options, hash_workers=4)
    prefix = f"s3://{s3_bucket}/in"
    assert [r.uri for r in refs] == [f"{prefix}/{rel}" for rel in CANDIDATES]
    by_name = _by_name(refs, prefix)
    for rel, ref in by_name.items():
        assert ref.doc_id == _sha(TREE[rel]) and ref.size == len(TREE[rel])
        assert local_path(ref.uri) is None
    assert by_name["copy_of_a.pdf"].duplicate_of == f"{prefix}/a.pdf"
    assert by_name["empty.pdf"].error.type == "empty_file"
    assert by_name["fake.pdf"].error.message == "named .pdf but content is text/html"
    assert by_name["sub/deeper/chart.Png"].media_type == "image/png"
    assert read_bytes(f"{prefix}/sub/Report.PDF", s3_storage_options) == TREE["sub/Report.PDF"]
    # typed listing columns: S3's ETag of a single-part upload is the MD5 of the bytes
    import hashlib
    import time as _time

    report = by_name["sub/Report.PDF"]
    assert report.etag == hashlib.md5(TREE["sub/Report.PDF"]).hexdigest()
    assert report.mtime is not None and abs(report.mtime - _time.time()) < 600

    [single] = discover(f"{prefix}/scan.TIF", extensions=EXTS, storage_options=s3_storage_options)
    assert single.uri == f"{prefix}/scan.TIF" and single.media_type == "image/tiff"
    assert discover(prefix, extensions=EXTS, storage_options=s3_storage_options, limit=2) == refs[:2]


def test_s3_listing_costs_no_request_per_file(
    s3_bucket: str, s3_storage_options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    fs, _ = resolve(f"s3://{s3_bucket}", s3_storage_options)
    for i in range(12):
        fs.pipe_file(f"{s3_bucket}/many/d{i:02}.pdf", b"%PDF-1.4\n" + bytes([i]) * 64)
    calls: dict[str, int] = {}
    real_call = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls[method] = calls.get(method, 0) + 1
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    refs = discover(f"s3://{s3_bucket}/many", extensions=["pdf"], storage_options=s3_storage_options)
    assert len(refs) == 12 and all(r.error is None for r in refs)
    # One GET per file to hash it; sizes come from the listing, not from a HEAD per file.
    assert calls.get("get_object") == 12
    assert calls.get("head_object", 0) <= 1


# ---------------------------------------------------------------------------------------
# Skipping the read of files an earlier run recorded
# ---------------------------------------------------------------------------------------


def test_file_version_prefers_etags_then_times():
    from pipeline.sources import file_version

    assert file_version({"ETag": '"abc123"', "LastModified": "2026-01-01"}) == "ETag:abc123"
    assert file_version({"mtime": 1700000000.5, "created": 1}) == "mtime:1700000000.5"
    assert file_version({"created": 12.0}) == "created:12.0"
    assert file_version({"size": 3}) is None


def test_unchanged_known_files_are_not_read_again(tmp_path, monkeypatch):
    import os

    from pipeline import sources
    from pipeline.records import KnownFile

    (tmp_path / "a.pdf").write_bytes(b"%PDF-1.7 first")
    (tmp_path / "b.pdf").write_bytes(b"%PDF-1.7 second")
    first = {r.uri: r for r in sources.discover(str(tmp_path), extensions=["pdf"])}
    assert all(r.version and r.version.startswith("mtime:") for r in first.values())
    known = {u: KnownFile(r.size, r.version, r.doc_id, r.media_type) for u, r in first.items()}

    reads = []
    real = sources._digest
    monkeypatch.setattr(sources, "_digest", lambda fs, path: reads.append(path) or real(fs, path))
    again = {r.uri: r for r in sources.discover(str(tmp_path), extensions=["pdf"], known=known)}
    assert reads == [] and again == first

    (tmp_path / "b.pdf").write_bytes(b"%PDF-1.7 second, edited")  # new size
    st = os.stat(tmp_path / "a.pdf")
    os.utime(tmp_path / "a.pdf", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, touched
    changed = {r.uri: r for r in sources.discover(str(tmp_path), extensions=["pdf"], known=known)}
    assert sorted(reads) == sorted(str(tmp_path / n) for n in ("a.pdf", "b.pdf"))
    assert changed[str(tmp_path / "b.pdf")].doc_id != first[str(tmp_path / "b.pdf")].doc_id
    assert changed[str(tmp_path / "a.pdf")].doc_id == first[str(tmp_path / "a.pdf")].doc_id


def test_bucket_objects_carry_their_etag(s3_bucket, s3_storage_options):
    import s3fs

    from pipeline.sources import discover

    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.pipe(f"{s3_bucket}/in/a.pdf", b"%PDF-1.7 bucket")
    (ref,) = discover(f"s3://{s3_bucket}/in", extensions=["pdf"], storage_options=s3_storage_options)
    assert ref.version and ref.version.startswith("ETag:") and '"' not in ref.version


# ---- every file accounted for: odd names, links, hidden and special files ----------------

# Names that hold (one row each, their exact source_uri), and one that is not UTF-8.
ODD_NAMES = ["new\nline.pdf", "tab\there.pdf", "esc\x1b[31m.pdf", "x" * 251 + ".pdf", "caf\u00e9.pdf",
             "cafe\u0301.pdf", "Case.pdf", "case.pdf", "rtl\u202efdp.pdf", "<img src=x onerror=alert(1)>.pdf", "ends in space.pdf "]
LATIN1 = b"caf\xe9-latin1.pdf"


def test_every_local_file_is_a_row_or_a_counted_skip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(ODD_NAMES):
        (src / name).write_bytes(_pdf(f"odd {i}"))
    latin_bytes = _pdf("latin-1 name")
    with open(os.path.join(os.fsencode(src), LATIN1), "wb") as fh:
        fh.write(latin_bytes)
    (src / "target.pdf").write_bytes(_pdf("target of a link"))
    (src / "link.pdf").symlink_to(src / "target.pdf")  # a link to a file: read through it
    (src / "dangling.pdf").symlink_to(tmp_path / "nowhere.pdf")  # an unreadable row
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "far.pdf").write_bytes(_pdf("outside the source"))
    (src / "linked-folder").symlink_to(elsewhere, target_is_directory=True)  # not walked
    (src / "loop").symlink_to(src, target_is_directory=True)  # not walked (would loop)
    os.mkfifo(src / "pipe.pdf")  # reading it would block forever
    (src / ".hidden.pdf").write_bytes(_pdf("hidden"))
    (src / ".git").mkdir()
    (src / ".git" / "x.pdf").write_bytes(_pdf("in a hidden folder"))
    (src / "notes.txt").write_text("other extension")

    found = sources.survey(str(src), extensions=EXTS)
    names = {os.path.basename(os.fsencode(local_path(r.uri))): r for r in found.refs}
    expected = {os.fsencode(n) for n in ODD_NAMES} | {LATIN1, b"target.pdf", b"link.pdf", b"dangling.pdf"}
    assert set(names) == expected and len(found.refs) == len(expected)
    assert found.skipped == {"extension": 1, "hidden": 2, "special": 1, "symlinked_folder": 2}
    for name in ODD_NAMES:  # the exact path, as it is
        assert names[os.fsencode(name)].uri == f"{src}/{name}"
    latin = names[LATIN1]
    assert latin.uri == f"file://{src}/caf%E9-latin1.pdf"  # RFC 8089, other bytes percent-encoded
    assert latin.error is None and read_bytes(latin.uri) == latin_bytes
    assert os.fsencode(local_path(latin.uri)) == os.fsencode(src) + b"/" + LATIN1
    assert names[b"link.pdf"].error is None and names[b"link.pdf"].doc_id == names[b"target.pdf"].doc_id
    assert names[b"target.pdf"].duplicate_of == f"{src}/link.pdf"  # the same bytes: a duplicate row
    assert names[b"dangling.pdf"].error.type == "unreadable"
    assert names[os.fsencode("ends in space.pdf ")].media_type == "application/pdf"


def test_local_uri_round_trips_and_never_meets_a_plain_path(tmp_path: Path) -> None:
    plain = f"{tmp_path}/caf%E9.pdf"  # a real name that looks like an escape
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.pdf")
    assert sources.local_uri(plain) == plain and local_path(plain) == plain
    assert sources.local_uri(odd) == f"file://{tmp_path}/caf%E9.pdf" != plain
    assert local_path(sources.local_uri(odd)) == odd


def test_object_keys_with_dot_segments_and_spaces_are_rows(s3_bucket: str, s3_storage_options: dict) -> None:
    fs, _ = resolve(f"s3://{s3_bucket}", s3_storage_options)
    keys = ["in/a.pdf", "in/../up.pdf", "in/./here.pdf", "in//double.pdf", "in/space.pdf ", "in/.hidden.pdf",
            "in/.cache/x.pdf", "in/notes.txt"]
    data = {key: _pdf(f"key {i}") for i, key in enumerate(keys)}
    for key in keys:
        fs.pipe_file(f"{s3_bucket}/{key}", data[key])
    fs.invalidate_cache()
    found = sources.survey(f"s3://{s3_bucket}/in", extensions=EXTS, storage_options=s3_storage_options)
    uris = {r.uri: r for r in found.refs}
    assert set(uris) == {f"s3://{s3_bucket}/{k}" for k in keys[:5]}
    assert found.skipped == {"hidden": 2, "extension": 1}
    for key in keys[:5]:
        ref = uris[f"s3://{s3_bucket}/{key}"]
        assert ref.error is None and read_bytes(ref.uri, s3_storage_options) == data[key]
