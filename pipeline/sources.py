"""Find input documents under any fsspec URL, hash and sniff them, and read them back.

This is the input edge of the pipeline: the only module (with `sink`) that touches
storage. Everything goes through fsspec, so a local folder, `file://`, `s3://`, `gs://`
and `memory://` behave alike.

`discover` lists candidates (recursively, in a stable order), streams each file once to
get its SHA-256 (the document id) and its first bytes (to sniff the media type), and
returns one `DocumentRef` per file. Extensions choose which files are candidates; the
content decides what a file is (a PDF named .png is a PDF). Problems found at this stage
(empty or unreadable files, content that is neither a PDF nor an image) are carried in
`DocumentRef.error`; they never stop discovery. A read that failed on a storage or network
error is marked `retryable`; bad content is not.
"""

from __future__ import annotations

import codecs
import dataclasses
import errno
import hashlib
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import fsspec
from fsspec.core import split_protocol, strip_protocol
from fsspec.implementations.local import LocalFileSystem

from pipeline.records import DocumentRef, KnownFile, Stage, StageError

log = logging.getLogger(__name__)

HEAD_BYTES = 2048  # kept from the start of each file for sniffing
CHUNK_BYTES = 8 * 1024 * 1024  # streaming read size while hashing
PDF_MARKER_WINDOW = 1024  # `%PDF-` must occur this early (as PDF readers require)

PDF_EXTENSIONS = frozenset({"pdf"})
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "jpe", "tif", "tiff", "webp", "bmp", "dib", "gif"})

OCTET_STREAM = "application/octet-stream"
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# Magic numbers of the image formats we accept, checked in order.
_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"II+\x00", "image/tiff"),  # BigTIFF
    (b"MM\x00+", "image/tiff"),  # BigTIFF
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
# Sizes of the BMP info headers in use (BITMAPCOREHEADER ... BITMAPV5HEADER).
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_HTML_MARKERS = ("<!doctype html", "<html", "<head", "<body", "<meta", "<title", "<script", "<div", "<table")
# Code points that do not occur in text: controls other than tab, LF, FF, CR, ESC; DEL; and
# U+FFFD, which the decoders put in place of bytes that are not text.
_NOT_TEXT = frozenset(set(range(0, 32)) - {9, 10, 12, 13, 27}) | {127, 0xFFFD}


# ---------------------------------------------------------------------------------------
# URLs and file systems
# ---------------------------------------------------------------------------------------


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """File system and path of `url` (a plain path is local; any fsspec URL works)."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is the local file system (so files can be renamed and opened directly)."""
    return isinstance(fs, LocalFileSystem)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL `read_bytes` reopens: an absolute path for local files (see `local_uri`),
    protocol://... otherwise."""
    return local_uri(path) if is_local(fs) else fs.unstrip_protocol(path)


def local_uri(path: str) -> str:
    """A local file's `source_uri`: its absolute path as it is, when the path is text (valid
    UTF-8); otherwise (a name in another encoding, e.g. Latin-1 `caf\xe9.pdf` from an old
    archive) its RFC 8089 `file://` URI, every byte that is not an unreserved ASCII character
    percent-encoded (`file:///data/caf%E9.pdf`). The two forms cannot meet (one starts with
    `/`, the other with `file://`) and `local_path` turns either back into the file's path."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, held as surrogates (PEP 383)
        return "file://" + quote(os.fsencode(path), safe="/")
    return path


def local_path(uri: str) -> str | None:
    """The local file system path of `uri`, or None when the file lives elsewhere. A
    `file://` URI is percent-decoded (RFC 8089), so `local_path(local_uri(p)) == p`."""
    if "::" in uri:  # chained URL (e.g. simplecache::s3://...): not a plain local file
        return None
    protocol, _ = split_protocol(uri)
    if protocol is not None and protocol not in _LOCAL_PROTOCOLS:
        return None
    if uri.startswith("file://"):
        return os.path.abspath(os.fsdecode(unquote_to_bytes(uri[len("file://"):])))
    return os.path.abspath(strip_protocol(uri) if protocol else uri)


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """All bytes of the file at `uri` (as produced by `discover`)."""
    local = local_path(uri)
    if local is not None:
        with open(local, "rb") as fh:
            return fh.read()
    fs, path = resolve(uri, storage_options)
    return fs.cat_file(path)


# ---------------------------------------------------------------------------------------
# Sniffing
# ---------------------------------------------------------------------------------------


def _is_bmp(head: bytes) -> bool:
    return len(head) >= 18 and head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES


def _as_text(head: bytes) -> str | None:
    """`head` decoded when it reads as text (UTF-8/16 or an 8-bit code page), else None.

    Binary formats reveal themselves within a few hundred bytes by NULs or by control
    characters that text never holds; the head may end in the middle of a character.
    """
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = head[: len(head) - len(head) % 2].decode("utf-16", errors="replace")
    elif not head or b"\x00" in head:
        return None
    else:
        try:
            text = codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=False)
        except UnicodeDecodeError:
            text = head.decode("cp1252", errors="replace")
    return None if any(ord(ch) in _NOT_TEXT for ch in text) else text


def _looks_like_html(text: str) -> bool:
    start = text.lstrip().lower()
    return start.startswith("<") and any(marker in start[:1024] for marker in _HTML_MARKERS)


def sniff_media_type(head: bytes) -> str:
    """Media type from the first bytes of a file (about 2 KB is enough).

    application/pdf when `%PDF-` occurs in the first 1024 bytes; image/png, image/jpeg,
    image/tiff, image/webp, image/bmp, image/gif by magic bytes; text/html and text/plain
    by heuristics; application/octet-stream otherwise.
    """
    if b"%PDF-" in head[:PDF_MARKER_WINDOW]:
        return "application/pdf"
    for magic, media_type in _IMAGE_MAGIC:
        if head.startswith(magic):
            return media_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if _is_bmp(head):
        return "image/bmp"
    text = _as_text(head)
    if text is not None:
        return "text/html" if _looks_like_html(text) else "text/plain"
    return OCTET_STREAM


def extension_of(path: str) -> str:
    """Lower-case extension without the dot ('' when there is none); spaces around it do not
    count (`report.pdf ` is a PDF by its name, and keeps its exact name as its source_uri)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].strip().lower() if "." in name.lstrip(".") else ""


def is_document_content(media_type: str) -> bool:
    """Whether sniffed content is something the rasterizer may read: a PDF or an image.

    Which image formats decode is the rasterizer's call (a GIF is refused there, with its
    own error); here only content that is neither (HTML, text, archives...) is singled out.
    """
    return media_type == "application/pdf" or media_type.startswith("image/")


def mislabel_message(extension: str, media_type: str) -> str | None:
    """Why the content makes the file unusable despite its name, or None when it does not.

    The content decides the type: a PDF named .png is read as a PDF and an image named
    .pdf as an image. Only a document-like name over content that is neither a PDF nor an
    image (an HTML error page saved as .pdf, text named .png) is reported.
    """
    if is_document_content(media_type):
        return None
    if extension in PDF_EXTENSIONS or extension in IMAGE_EXTENSIONS:
        return f"named .{extension} but content is {media_type}"
    return None


# ---------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Candidate:
    path: str  # file system path (protocol stripped)
    uri: str  # full URL, the sort key
    size: int | None  # from the listing; None when the listing did not say
    version: str | None = None  # ETag / mtime from the listing (see file_version)
    etag: str | None = None  # the store's content tag (ETag, GCS md5Hash), when it has one
    mtime: float | None = None  # last modification, unix seconds, when the listing says


# Listing keys that change whenever a file's content may have, most specific first:
# object stores' ETag / MD5, then modification times (local mtime, S3 LastModified, GCS
# updated, the memory file system's created).
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "updated", "created")


_ETAG_KEYS = ("ETag", "etag", "md5Hash")
_MTIME_KEYS = ("mtime", "LastModified", "updated", "created")


def file_etag(info: dict[str, Any]) -> str | None:
    """The object store's content tag (quotes removed), or None (local files have none)."""
    for key in _ETAG_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            return str(value).strip('"')
    return None


def file_mtime(info: dict[str, Any]) -> float | None:
    """Last modification time from a listing entry, as unix seconds; None if unknown."""
    import datetime as _dt

    for key in _MTIME_KEYS:
        value = info.get(key)
        if isinstance(value, _dt.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)).timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and value:
            try:
                parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)).timestamp()
    return None


def file_version(info: dict[str, Any]) -> str | None:
    """A string that changes when the file changes, from its listing entry; None if unknown."""
    for key in _VERSION_KEYS:
        value = info.get(key)
        if value is not None and value != "":
            return f"{key}:{str(value).strip(chr(34))}"
    return None


def _normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    cleaned = frozenset(e.strip().lower().lstrip(".") for e in extensions if e and e.strip())
    if not cleaned:
        raise ValueError("extensions must name at least one file extension")
    return cleaned


# Why a file under the source got no documents row (the run summary and the runs table count
# them, so every file is accounted for): see docs/sources.md.
SKIP_REASONS = {
    "hidden": "a name starting with '.' (a hidden folder counts once locally: it is not walked)",
    "extension": "an extension not in --extensions",
    "symlinked_folder": "a symbolic link to a folder (not walked: links can loop or lead out of the source)",
    "special": "not a regular file (a FIFO, socket or device, or a link to one)",
    "unlistable_folder": "a folder that could not be listed (its files are unknown)",
}


def _is_hidden_part(part: str) -> bool:
    return part.startswith(".") and part not in (".", "..")


def _is_hidden(root: str, path: str) -> bool:
    """Whether any part of `path` below `root` starts with a dot (`.` and `..` segments of an
    object key are not hidden names: the key is read as it is)."""
    rel = path[len(root) :] if path.startswith(root) else path
    return any(_is_hidden_part(part) for part in rel.split("/") if part)


def _list_files(fs: fsspec.AbstractFileSystem, root: str, skipped: Counter[str] | None = None,
                extensions: frozenset[str] | None = None) -> dict[str, dict[str, Any]]:
    """path -> info for every file under `root` that may be a candidate, from as few listing
    calls as possible; what is left out is counted in `skipped` by reason (SKIP_REASONS)."""
    skipped = Counter() if skipped is None else skipped
    if not is_local(fs):
        # One recursive listing (a flat, paginated LIST on object stores), sizes included.
        found = {}
        for path, info in fs.find(root, detail=True, withdirs=False).items():
            if path.endswith("/"):
                continue  # a "folder" marker object
            if _is_hidden(root, path):
                skipped["hidden"] += 1
            elif extensions is not None and extension_of(path) not in extensions:
                skipped["extension"] += 1
            else:
                found[path] = info
        return found
    return _walk_local(root.rstrip("/") or "/", skipped, extensions)


def _walk_local(root: str, skipped: Counter[str], extensions: frozenset[str] | None) -> dict[str, dict[str, Any]]:
    """A local walk that never follows a link to a folder and prunes hidden folders unread.

    A link to a regular file is a file (its target's size and time); a dangling link is
    listed too (it becomes an `unreadable` row); FIFOs, sockets and devices are skipped
    (reading one could block forever)."""
    found: dict[str, dict[str, Any]] = {}
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            if folder == root:
                raise
            _log_walk_error(exc)
            skipped["unlistable_folder"] += 1
            continue
        for entry in entries:
            path = f"{folder.rstrip('/')}/{entry.name}"
            if _is_hidden_part(entry.name):
                skipped["hidden"] += 1
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(path)
                    continue
                link = entry.is_symlink()
                try:
                    st = os.stat(path) if link else entry.stat(follow_symlinks=False)
                except OSError:  # a dangling link (or one that loops): an unreadable file
                    st = None
                if st is not None and stat.S_ISDIR(st.st_mode):
                    skipped["symlinked_folder"] += 1
                    continue
                if extensions is not None and extension_of(path) not in extensions:
                    skipped["extension"] += 1
                    continue
                if st is None:
                    found[path] = {"type": "file", "size": None, "islink": True}
                elif stat.S_ISREG(st.st_mode):
                    found[path] = {"type": "file", "size": st.st_size, "mtime": st.st_mtime, "islink": link}
                else:
                    skipped["special"] += 1
            except OSError as exc:  # vanished while listed: read (and reported) like any other file
                log.debug("listing %s: %s", path, exc)
                found[path] = {"type": "file", "size": None}
    return found


def _log_walk_error(exc: OSError) -> None:
    log.warning("skipping a folder that cannot be listed: %s", exc)


def _candidates(fs: fsspec.AbstractFileSystem, root: str, extensions: frozenset[str],
                skipped: Counter[str] | None = None) -> list[_Candidate]:
    """Files under `root` (or `root` itself) that discovery should hash, sorted by URI; what
    is left out is counted in `skipped` by reason."""
    skipped = Counter() if skipped is None else skipped
    try:
        root_info = fs.info(root)
    except FileNotFoundError:
        raise FileNotFoundError(f"source not found: {fs.unstrip_protocol(root)}") from None
    if root_info.get("type") != "directory":
        # A single file named explicitly is taken whatever its extension; content decides.
        return [_Candidate(root, full_uri(fs, root), root_info.get("size"), file_version(root_info),
                           file_etag(root_info), file_mtime(root_info))]
    out: list[_Candidate] = []
    for path, info in _list_files(fs, root, skipped, extensions).items():
        if path.endswith("/") or _is_hidden(root, path) or extension_of(path) not in extensions:
            continue  # a listing that did not filter (a replaced _list_files)
        if info.get("type", "file") == "file" and info.get("size", 0) is not None:
            out.append(_Candidate(path, full_uri(fs, path), info.get("size"), file_version(info), file_etag(info),
                                  file_mtime(info)))
        elif info.get("type", "file") == "file":  # a dangling link: reported as unreadable
            out.append(_Candidate(path, full_uri(fs, path), None))
        else:
            skipped["special"] += 1
    out.sort(key=lambda c: c.uri)
    return out


# ---------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------


def _digest(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, bytes, int]:
    """(sha256 hex, first HEAD_BYTES bytes, size) reading the file once, chunk by chunk."""
    sha = hashlib.sha256()
    head = bytearray()
    size = 0
    open_kwargs: dict[str, Any] = {} if is_local(fs) else {"block_size": CHUNK_BYTES, "cache_type": "none"}
    with fs.open(path, "rb", **open_kwargs) as fh:
        while chunk := fh.read(CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
            if len(head) < HEAD_BYTES:
                head += chunk[: HEAD_BYTES - len(head)]
    return sha.hexdigest(), bytes(head), size


def _error(type_: str, message: str, *, retryable: bool = False) -> StageError:
    return StageError(Stage.SOURCES, type_, message, retryable=retryable)


# Libraries whose exceptions are storage or network failures (clients of object stores
# and HTTP), named by module so that none of them has to be installed.
_TRANSIENT_MODULES = (
    "botocore.",
    "aiobotocore.",
    "s3fs.",
    "aiohttp.",
    "gcsfs.",
    "google.api_core.",
    "google.auth.",
    "adlfs.",
    "azure.core.",
    "requests.",
    "urllib3.",
    "http.client",
    "fsspec.exceptions",
)


# OS errors that no retry fixes: a missing or forbidden path, a symlink loop, a name too long.
_PERMANENT_OS_ERRORS = (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR,
                               errno.ENAMETOOLONG})
# S3 error codes that no retry will fix (wrong bucket, key, or missing or wrong credentials).
_PERMANENT_S3_CODES = frozenset({"AccessDenied", "NoSuchBucket", "NoSuchKey", "InvalidAccessKeyId",
                                 "SignatureDoesNotMatch", "InvalidBucketName", "AllAccessDisabled"})


def _s3_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def is_permanent(exc: BaseException) -> bool:
    """Whether `exc` (this exception alone) is a storage failure no retry fixes."""
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return True
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return True
    return _s3_error_code(exc) in _PERMANENT_S3_CODES


def _transient_one(exc: BaseException) -> bool:
    if is_permanent(exc):
        return False
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    return any(f"{cls.__module__}.".startswith(_TRANSIENT_MODULES) for cls in type(exc).__mro__)


def is_transient(exc: BaseException | None) -> bool:
    """Whether `exc` is a storage or network failure that may go away on its own: the one
    classifier of the project (documents' `error_retryable`, the flows' shard retries).

    I/O errors, timeouts, refused or reset connections and the exceptions of storage and
    network client libraries are; a missing, forbidden or looping path (ENOENT, EACCES,
    EPERM, ELOOP, ...), an S3 AccessDenied / NoSuchBucket / bad credentials, and anything
    else (a bug, a value the code did not expect) are not. Explicit causes (`raise ... from`)
    are followed, so a wrapped I/O error still counts and a wrapped permission error does not.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if is_permanent(exc):
            return False
        if _transient_one(exc):
            return True
        exc = exc.__cause__
    return False


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _make_ref(fs: fsspec.AbstractFileSystem, cand: _Candidate, known: Mapping[str, KnownFile]) -> DocumentRef:
    """Hash and sniff one candidate; any problem becomes `ref.error`, never an exception.

    A file an earlier run recorded with the same size and version is not read again: its
    recorded id and media type are reused (a nightly run over an unchanged bucket reads
    nothing but the listing).
    """
    seen = known.get(cand.uri)
    if seen is not None and cand.version is not None and (seen.size, seen.version) == (cand.size, cand.version):
        return DocumentRef(cand.uri, seen.doc_id, seen.size, seen.media_type, version=cand.version, etag=cand.etag,
                           mtime=cand.mtime)
    ref = _read_ref(fs, cand)
    # No version without a content hash (unreadable files): they are read again next time.
    return dataclasses.replace(ref, version=cand.version, etag=cand.etag, mtime=cand.mtime) if ref.doc_id else ref


def _read_ref(fs: fsspec.AbstractFileSystem, cand: _Candidate) -> DocumentRef:
    empty = _error("empty_file", "file is empty (0 bytes)")
    if cand.size == 0:
        return DocumentRef(cand.uri, _EMPTY_SHA256, 0, OCTET_STREAM, error=empty)
    try:
        doc_id, head, size = _digest(fs, cand.path)
    except Exception as exc:  # noqa: BLE001 - any failure to read one file is that file's error
        unreadable = _error("unreadable", f"cannot read file: {_describe(exc)}", retryable=is_transient(exc))
        # No content hash is known: doc_id stays empty, so once the file reads, its new
        # (uri, doc_id) key is not in the dataset and a later run picks it up.
        return DocumentRef(cand.uri, "", cand.size or 0, OCTET_STREAM, error=unreadable)
    if size == 0:  # the listing did not say, or the file was emptied since
        return DocumentRef(cand.uri, doc_id, 0, OCTET_STREAM, error=empty)
    media_type = sniff_media_type(head)
    problem = mislabel_message(extension_of(cand.path), media_type)
    return DocumentRef(cand.uri, doc_id, size, media_type, error=_error("mislabelled", problem) if problem else None)


def changed_ref(ref: DocumentRef, data: bytes) -> DocumentRef | None:
    """`ref` as the bytes `data` read now show it, when they are not the bytes it was listed
    with (the file was rewritten since discovery); None when they are the same."""
    doc_id = hashlib.sha256(data).hexdigest()
    if doc_id == ref.doc_id:
        return None
    media_type = sniff_media_type(data[:HEAD_BYTES]) if data else OCTET_STREAM
    # the earlier version the output holds (if any) stays the one replaced; the id planned is not in it
    replaces = None if ref.replaces == doc_id else ref.replaces
    return dataclasses.replace(ref, doc_id=doc_id, size=len(data), media_type=media_type, version=None, etag=None,
                               mtime=None, replaces=replaces)


def _mark_duplicates(refs: list[DocumentRef]) -> list[DocumentRef]:
    """Give each later copy of the same bytes `duplicate_of` = the first copy's URI."""
    first: dict[str, str] = {}
    out: list[DocumentRef] = []
    for ref in refs:
        if ref.error is not None:
            out.append(ref)
            continue
        original = first.setdefault(ref.doc_id, ref.uri)
        out.append(ref if original == ref.uri else dataclasses.replace(ref, duplicate_of=original))
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class Survey:
    """What discovery found under a source: one ref per candidate file, and the other files
    counted by why they got no row (SKIP_REASONS)."""

    refs: list[DocumentRef]
    skipped: dict[str, int]


def discover(
    url: str,
    *,
    extensions: Iterable[str],
    storage_options: dict[str, Any] | None = None,
    hash_workers: int = 8,
    limit: int | None = None,
    known: Mapping[str, KnownFile] | None = None,
) -> list[DocumentRef]:
    """Every candidate document under `url` (a folder, prefix or single file), hashed and sniffed.

    Sorted by URI; `limit` keeps the first N after sorting (before any hashing). Hidden
    files and folders (a name starting with '.'), links to folders, special files and
    object-store folder markers are skipped (`survey` counts them). Bad files come back
    with `error` set. Raises FileNotFoundError only when `url` itself does not exist (a
    broken configuration). `known` (uri -> what an earlier run recorded) lets unchanged
    files skip the read.
    """
    return survey(url, extensions=extensions, storage_options=storage_options, hash_workers=hash_workers,
                  limit=limit, known=known).refs


def survey(
    url: str,
    *,
    extensions: Iterable[str],
    storage_options: dict[str, Any] | None = None,
    hash_workers: int = 8,
    limit: int | None = None,
    known: Mapping[str, KnownFile] | None = None,
) -> Survey:
    """`discover`, with the files that are not candidates counted by reason."""
    known = known or {}
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    fs, root = resolve(url, storage_options)
    if not is_local(fs):
        fs.invalidate_cache(root)  # fsspec instances are shared: never list from a stale cache
    skipped: Counter[str] = Counter()
    cands = _candidates(fs, root, _normalise_extensions(extensions), skipped)
    if limit is not None:
        cands = cands[:limit]
    # Remote reads wait on the network: many threads. Local hashing is CPU/disk bound.
    cap = hash_workers if not is_local(fs) else min(hash_workers, os.cpu_count() or 1)
    workers = max(1, min(cap, len(cands)))
    if workers == 1:
        refs = [_make_ref(fs, c, known) for c in cands]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docpipe-hash") as pool:
            refs = list(pool.map(lambda c: _make_ref(fs, c, known), cands))
    return Survey(_mark_duplicates(refs), dict(sorted(skipped.items())))


def public_url(url: str) -> str:
    """The URL without any user:password part, for logs, artifacts and the runs table."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.netloc and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url
