"""The output contract: versioned Arrow schemas of the `documents` and `pages` tables.

Every field carries a description (Arrow field metadata key `description`), and every
Parquet file carries `docpipe.schema_version` and `docpipe.table` in its schema metadata.
`python -m schemas.export` writes the JSON copies (documents.json, pages.json) next to
this file for non-Python consumers; a test checks they are current.

Versioning: bump the minor version for added nullable columns (readers keep working),
the major version for anything else.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.7"
VERSION_KEY = b"docpipe.schema_version"
TABLE_KEY = b"docpipe.table"


def _f(name: str, type_: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={b"description": description.encode()})


ERROR_FIELDS = (
    ("error_stage", "Stage that failed: sources, rasterize, tiling, inference, sink or timeout; null when none did."),
    ("error_type", "Stable machine-readable error code, e.g. encrypted_pdf, not_a_pdf, empty_file; null when none."),
    ("error_message", "Human-readable explanation of the error; null when none."),
)


def _error_fields() -> list[pa.Field]:
    return [_f(name, pa.string(), desc) for name, desc in ERROR_FIELDS] + [
        _f(
            "error_retryable",
            pa.bool_(),
            "True when the error may go away by itself (storage or network error, timeout, crashed worker, device "
            "failure): a later run tries the document again and drops this row once it has a newer one. False for "
            "bad input, which is recorded once; null when there is no error.",
        )
    ]


DOCUMENTS_FIELDS: list[pa.Field] = [
    _f("doc_id", pa.string(), "SHA-256 (hex) of the file's bytes; equal bytes give the same id.", nullable=False),
    _f("source_uri", pa.string(), "Full URL or path of the input file, exactly as listed; a local name that is not "
       "valid UTF-8 is given as its RFC 8089 file:// URI with every other byte percent-encoded "
       "(file:///data/caf%E9.pdf).", nullable=False),
    _f("size_bytes", pa.int64(), "File size in bytes."),
    _f("media_type", pa.string(), "Media type sniffed from the content (application/pdf, image/png, ...)."),
    _f("page_count", pa.int32(), "Pages (or image frames) in the file; null when it could not be opened."),
    _f("pages_ok", pa.int32(), "Pages written to the pages table with status ok.", nullable=False),
    _f("pages_failed", pa.int32(), "Pages written to the pages table with status error.", nullable=False),
    _f(
        "status",
        pa.string(),
        "ok: every page processed; partial: some pages failed; error: nothing usable; "
        "duplicate: same bytes as another input (see duplicate_of), pages not repeated.",
        nullable=False,
    ),
    _f(
        "source_version",
        pa.string(),
        "Opaque change token from the file's listing (prefixed ETag or modification time) that later runs compare "
        "to skip re-reading an unchanged file; for analysis use source_etag and source_mtime.",
    ),
    _f("source_etag", pa.string(), "The object store's content tag (S3 ETag, GCS md5Hash) when it was read; null for "
       "local files."),
    _f("source_mtime", pa.timestamp("us", tz="UTC"), "The file's last modification time from its listing, UTC."),
    _f("duplicate_of", pa.string(), "source_uri of the input with the same bytes that was processed, for duplicates."),
    _f("replaces_doc_id", pa.string(), "doc_id of the row of the same source_uri this row replaced: the file's "
       "earlier version (other bytes), or \"\" for an earlier row that recorded the file as unreadable (no id); null "
       "when there was none. Once this row commits, the replaced documents and pages rows are removed: one row per "
       "file (latest wins; a file that turns unreadable, e.g. into a dangling link, replaces its older row too)."),
    *_error_fields(),
    _f("attempt", pa.int32(), "How many runs have tried this document (1 the first time; retryable failures are "
       "tried again up to 3 times).", nullable=False),
    _f("open_note", pa.string(), "What the reader had to do to open the file, e.g. that MuPDF repaired a damaged PDF."),
    _f("rasterize_s", pa.float64(), "Seconds spent opening and rasterizing the document."),
    _f("tiling_s", pa.float64(), "Seconds spent planning and cutting tiles."),
    _f("inference_s", pa.float64(), "Seconds of model time attributed to this document's pages."),
    _f("total_s", pa.float64(), "Seconds spent on the document: preparation (open, render, tile: wall time in its "
       "worker) plus inference_s. Preparation and inference of different documents overlap, so these do not add up "
       "to a run's wall time."),
    _f("shard_id", pa.string(), "Shard (unit of work and of output files) the document was processed in.", nullable=False),
    _f("run_id", pa.string(), "Run that wrote this row.", nullable=False),
    _f("config_fingerprint", pa.string(), "Hash of the settings that change page outputs.", nullable=False),
    _f("processed_at", pa.timestamp("us", tz="UTC"), "When the row was written.", nullable=False),
]

# Per-task token accounting of the pages table: three flat columns per kind of model row
# (flat rather than structs so that any SQL engine filters on them directly).
TASK_USAGE_COLUMNS = (
    ("description", "the page description"),
    ("ocr", "model OCR (null when the text layer was used)"),
    ("chart_check", "the yes/no chart check"),
    ("chart_answers", "the chart questions, summed over the questions asked"),
)


def _task_usage_fields() -> list[pa.Field]:
    fields = []
    for task, what in TASK_USAGE_COLUMNS:
        fields += [
            _f(f"{task}_prompt_tokens", pa.int32(), f"Prompt tokens (image tokens included) of {what}; null when not run."),
            _f(f"{task}_generated_tokens", pa.int32(), f"Tokens generated for {what}; null when not run."),
            _f(f"{task}_truncated", pa.bool_(), f"{what[0].upper() + what[1:]} stopped at its token limit; null when not run."),
        ]
    return fields


CHART_ANSWER_TYPE = pa.struct(
    [
        _f("question", pa.string(), "Question asked about the chart.", nullable=False),
        _f("answer", pa.string(), "The model's answer; null when it gave none."),
    ]
)

PAGES_FIELDS: list[pa.Field] = [
    _f("doc_id", pa.string(), "SHA-256 of the document this page belongs to.", nullable=False),
    _f("source_uri", pa.string(), "URL or path of the document.", nullable=False),
    _f("page_number", pa.int32(), "1-based page (or image frame) number.", nullable=False),
    _f(
        "page_kind",
        pa.string(),
        "born_digital, scan (an image of a page, from a PDF or an image file that looks like paper), scan_with_ocr, "
        "blank, or image (a photo, chart or figure image file); null if the page failed to render.",
    ),
    _f("width_px", pa.int32(), "Rendered width in pixels."),
    _f("height_px", pa.int32(), "Rendered height in pixels."),
    _f("dpi", pa.float32(), "Rendered resolution in dots per inch (null for images without resolution)."),
    _f("requested_dpi", pa.float32(), "Resolution the tiling policy asked for before any budget or limit."),
    _f("downscaled", pa.bool_(), "True when the render was lowered below the request (pixel budget or renderer limit)."),
    _f("render_note", pa.string(), "Why the render differs from the request, when it does."),
    _f("rotation", pa.int16(), "Rotation applied in degrees (PDF /Rotate or EXIF orientation)."),
    _f(
        "tiling_policy",
        pa.string(),
        "Tiling the page was planned with: internvl, minimax or minicpm; with a model, the model family's own "
        "(internvl, qwen2_vl, idefics3).",
    ),
    _f("grid_cols", pa.int16(), "Tile grid columns."),
    _f("grid_rows", pa.int16(), "Tile grid rows."),
    _f("tile_count", pa.int16(), "Tiles fed to the model, thumbnail or overview included."),
    _f("has_thumbnail", pa.bool_(), "Whether a whole-page thumbnail/overview tile was added."),
    _f("visual_tokens", pa.int32(), "Visual tokens for this page under the policy's tokens-per-tile."),
    _f("text_layer", pa.string(), "Visible text layer of the PDF page (null for images or when not extracted)."),
    _f("text_layer_chars", pa.int32(), "Characters in text_layer (0 when empty, null when not extracted)."),
    # ---- model columns (null when the run has no model) ---------------------------------
    _f("description", pa.string(), "The model's description of what the page is and shows."),
    _f("ocr_text", pa.string(), "All text on the page in reading order (plain text or Markdown tables)."),
    _f("has_chart", pa.bool_(), "Whether the model found a chart, plot or diagram on the page."),
    _f(
        "chart_check_answer",
        pa.string(),
        "The model's reply when asked whether the page holds a chart; has_chart is null when it was neither yes nor no.",
    ),
    _f(
        "chart_check_status",
        pa.string(),
        "Why has_chart is what it is: chart / no_chart (the model said yes / no), unclear (its reply was neither: "
        "has_chart is null and chart_check_answer holds its words), not_asked (the chart task was not in the run's "
        "tasks), failed (the model failed on the page: see error_type); null when no model ran for the page (no "
        "--model, or the page failed before the model).",
    ),
    _f("chart_answers", pa.list_(pa.field("element", CHART_ANSWER_TYPE)), "Answers to the run's chart questions (empty when no chart)."),
    _f("model_id", pa.string(), "Model folder or hub id that produced the model columns."),
    _f("model_revision", pa.string(), "Model commit hash or revision, when known."),
    _f("model_dtype", pa.string(), "Weights dtype used for generation."),
    _f("prompt_version", pa.string(), "Version of the prompt set used."),
    _f("prompt_tokens", pa.int32(), "Prompt tokens over all tasks of the page (image tokens included)."),
    _f("generated_tokens", pa.int32(), "Tokens generated over all tasks of the page."),
    _f("inference_latency_s", pa.float64(), "Model seconds attributed to this page (its share of its batches)."),
    _f("truncated", pa.bool_(), "Some task stopped at its token limit (see the per-task *_truncated columns)."),
    _f("repetitive", pa.bool_(), "Some task hit the token limit by repeating itself."),
    _f(
        "ocr_source",
        pa.string(),
        "Where ocr_text came from: text_layer (the PDF's own text layer, which passed the quality check; no model "
        "OCR), model, or null (OCR not asked, or neither source for this page).",
    ),
    *_task_usage_fields(),
    # ---- status ---------------------------------------------------------------------------
    _f("status", pa.string(), "ok or error.", nullable=False),
    *_error_fields(),
    _f("shard_id", pa.string(), "Shard the page was processed in.", nullable=False),
    _f("processed_at", pa.timestamp("us", tz="UTC"), "When the page's row was made (after the model answered)."),
    _f("run_id", pa.string(), "Run that wrote this row.", nullable=False),
    _f("config_fingerprint", pa.string(), "Hash of the settings that change page outputs.", nullable=False),
]


def _schema(fields: list[pa.Field], table: str, description: str) -> pa.Schema:
    return pa.schema(
        fields,
        metadata={
            VERSION_KEY: SCHEMA_VERSION.encode(),
            TABLE_KEY: table.encode(),
            b"description": description.encode(),
        },
    )


DOCUMENTS_SCHEMA = _schema(
    DOCUMENTS_FIELDS, "documents", "One row per input file, whatever happened to it."
)
PAGES_SCHEMA = _schema(PAGES_FIELDS, "pages", "One row per page (or image frame) of every processed document.")

RUNS_FIELDS: list[pa.Field] = [
    _f("run_id", pa.string(), "The run's identifier (rows of the other tables carry it).", nullable=False),
    _f("status", pa.string(), "running, completed, failed (some shards failed; a rerun resumes) or interrupted.",
       nullable=False),
    _f("started_at", pa.timestamp("us", tz="UTC"), "When the run took the output's lease.", nullable=False),
    _f("ended_at", pa.timestamp("us", tz="UTC"), "When the run ended; null while it runs (or if it died)."),
    _f("source", pa.string(), "The source URL, without credentials.", nullable=False),
    _f("config_fingerprint", pa.string(), "Hash of the output-affecting settings (as in the other tables).",
       nullable=False),
    _f("output_settings", pa.string(), "JSON of the settings that change what is written (those the fingerprint "
       "covers).", nullable=False),
    _f("settings", pa.string(), "JSON of every public setting of the run (storage options reduced to their keys).",
       nullable=False),
    _f("reprocess", pa.bool_(), "The run was asked to redo documents written with other settings.", nullable=False),
    _f("model_id", pa.string(), "Model folder or hub id; null without a model."),
    _f("model_revision", pa.string(), "Hub commit, or for a local folder a content hash of its weight files' names, "
       "sizes and safetensors headers; null without a model."),
    _f("docpipe_version", pa.string(), "docpipe version.", nullable=False),
    _f("transformers_version", pa.string(), "transformers version (null when not installed)."),
    _f("torch_version", pa.string(), "torch version (null when not installed)."),
    _f("python_version", pa.string(), "Python version.", nullable=False),
    _f("host", pa.string(), "Host name of the machine that ran it.", nullable=False),
    _f("documents_discovered", pa.int64(), "Documents found under the source."),
    _f("documents_processed", pa.int64(), "Documents this run wrote rows for."),
    _f("pages", pa.int64(), "Pages this run wrote rows for."),
    _f("pages_failed", pa.int64(), "Of which with status error."),
    _f("files_skipped", pa.int64(), "Files under the source that got no documents row (hidden, other extensions, "
       "links to folders, special files); by reason in counts.files_skipped."),
    _f("counts", pa.string(), "JSON: documents by status, errors by type, and files skipped by reason."),
    _f("message", pa.string(), "Why the run failed or was interrupted, when it did."),
    _f("lease_generation", pa.int64(), "The output's lease generation the run held: it grows with every run that "
       "takes the output, so it orders runs as the output saw them (the latest run has the largest; started_at "
       "comes from the clock of the machine that ran it). Null for runs written before schema 1.7."),
]

RUNS_SCHEMA = _schema(RUNS_FIELDS, "runs", "One row per run that wrote to this output: settings, versions, counts.")

SCHEMAS: dict[str, pa.Schema] = {"documents": DOCUMENTS_SCHEMA, "pages": PAGES_SCHEMA, "runs": RUNS_SCHEMA}


def _type_to_json(type_: pa.DataType) -> object:
    if pa.types.is_struct(type_):
        return {"struct": [_field_to_json(type_.field(i)) for i in range(type_.num_fields)]}
    if pa.types.is_list(type_):
        return {"list": _type_to_json(type_.value_type)}
    return str(type_)


def _field_to_json(f: pa.Field) -> dict[str, object]:
    return {
        "name": f.name,
        "type": _type_to_json(f.type),
        "nullable": f.nullable,
        "description": (f.metadata or {}).get(b"description", b"").decode(),
    }


def schema_to_json(name: str) -> dict[str, object]:
    schema = SCHEMAS[name]
    meta = schema.metadata or {}
    return {
        "table": name,
        "schema_version": SCHEMA_VERSION,
        "description": meta.get(b"description", b"").decode(),
        "fields": [_field_to_json(f) for f in schema],
    }
