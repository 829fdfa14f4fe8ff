"""The one typed run configuration.

Every setting of a run is declared here once, with its type, default and help text. The
CLI (`docpipe run`), the Prefect flow parameters and the deployments are all generated
from this model, so there is no second list of options to drift out of sync.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TilingPolicyName = Literal["internvl", "minimax", "minicpm"]
TaskName = Literal["description", "ocr", "chart"]
OcrMode = Literal["auto", "model", "text_layer"]

# A run id names files (runs/part-<id>.parquet, _docpipe/reports/<id>.html) and shows in reports
# and Prefect artifacts: checked before the run takes the output, so it never needs escaping twice.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

DEFAULT_EXTENSIONS = ("pdf", "png", "jpg", "jpeg", "tif", "tiff", "webp", "bmp")

DEFAULT_CHART_QUESTIONS = (
    "What type of chart or figure is this?",
    "What is the title of the chart?",
    "What do the axes show, with their units?",
    "Give the data shown in the chart as a Markdown table.",
)

# ---- every field's stage and roles, declared once ---------------------------------------
# A field belongs to one stage (the CLI groups its options by stage) and has the roles that
# say where it matters:
#   "output": it changes what is written for a page: part of the fingerprint (`output_settings`),
#             so a rerun with another value refuses to mix rows unless --reprocess;
#   "engine": it changes what a loaded model does: part of the engine cache key
#             (`runner.get_engine` reloads the model when one of these differs).
# Fields with neither (where the data is, how the work is cut and scheduled) change neither.
# tests/test_config.py checks that every field is declared here exactly once.
_OUT, _ENG = "output", "engine"

Dtype = Literal["auto", "bfloat16", "float16", "float32"]  # the model dtypes --dtype takes
FIELD_TABLE: tuple[tuple[str, str, frozenset[str]], ...] = tuple(
    (name, stage, frozenset(roles))
    for stage, fields in (
        ("where", (
            ("source", ()), ("output", ()), ("storage_options", ()), ("extensions", (_OUT,)), ("limit", ()),
        )),
        ("rasterize", (
            ("min_dpi", (_OUT, _ENG)), ("max_dpi", (_OUT, _ENG)), ("max_page_pixels", (_OUT, _ENG)),
            ("extract_text_layer", (_OUT, _ENG)),
        )),
        ("tiling", (
            ("tiling_policy", (_OUT, _ENG)), ("min_tiles", (_OUT, _ENG)), ("max_tiles", (_OUT, _ENG)),
            ("tokens_per_tile", (_OUT, _ENG)),
        )),
        ("inference", (
            ("model", (_OUT, _ENG)), ("revision", (_OUT, _ENG)), ("trust_remote_code", (_OUT, _ENG)),
            ("tasks", (_OUT, _ENG)), ("chart_questions", (_OUT, _ENG)), ("default_chart_questions", (_OUT, _ENG)),
            ("ocr", (_OUT, _ENG)), ("ocr_max_new_tokens", (_OUT, _ENG)), ("description_max_new_tokens", (_OUT, _ENG)),
            ("chart_check_max_new_tokens", (_OUT, _ENG)), ("chart_answer_max_new_tokens", (_OUT, _ENG)),
            ("max_new_tokens", (_OUT, _ENG)), ("num_beams", (_OUT, _ENG)), ("repetition_penalty", (_OUT, _ENG)),
            ("dtype", (_OUT, _ENG)), ("device", (_ENG,)), ("gpu_memory_headroom", (_ENG,)),
            ("batch_visual_tokens", (_ENG,)), ("max_batch_pages", (_ENG,)), ("engine", (_ENG,)),
            ("tensor_parallel_size", (_ENG,)), ("gpu_memory_utilization", (_ENG,)), ("vllm_max_pages", (_ENG,)),
        )),
        ("execution", (
            ("shard_size", ()), ("prep_workers", ()), ("prefetch_pages", ()), ("document_timeout_s", ()),
            ("retry_timeouts", ()), ("run_id", ()), ("reprocess", ()), ("wait_for_output_s", ()), ("progress", ()),
        )),
    )
    for name, roles in fields
)
FIELD_STAGE: dict[str, str] = {name: stage for name, stage, _ in FIELD_TABLE}


def fields_with(role: str) -> frozenset[str]:
    """The fields declared with `role` ("output" or "engine")."""
    return frozenset(name for name, _, roles in FIELD_TABLE if role in roles)


OUTPUT_FIELDS = fields_with(_OUT)
ENGINE_FIELDS = fields_with(_ENG)
# Fields left out of the fingerprint (so a rerun with a different shard size or progress
# setting still recognises finished work).
_NON_OUTPUT_FIELDS = frozenset(FIELD_STAGE) - OUTPUT_FIELDS
# Output fields added after outputs already existed: while unset (None) they are left out of
# the fingerprint, so upgrading docpipe does not turn every existing output into "written with
# other settings" (a nightly job would exit 2 after the upgrade). Set, they count as usual.
# A new output field whose default is None belongs here.
_OUTPUT_FIELDS_ADDED_LATER = frozenset({"num_beams", "repetition_penalty"})


class RunConfig(BaseModel):
    """Settings of one ingestion run (CLI, flow parameters and deployments share it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- where -------------------------------------------------------------------
    source: str = Field(
        description="Folder or bucket prefix to ingest: a path, file://, s3://, gs://, memory:// URL, or a single file.",
    )
    output: str = Field(
        description="Dataset root to write Parquet under (OUT/documents, OUT/pages): a path or any fsspec URL.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for source and output, e.g. {\"endpoint_url\": \"http://127.0.0.1:9000\"}. "
        "Credentials may go here or, better, in the environment; they are never logged or written.",
    )
    extensions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXTENSIONS),
        validate_default=True,
        description="File extensions to consider (case-insensitive, without dot). Content is sniffed as well.",
    )
    limit: int | None = Field(
        default=None, ge=1, description="Process at most this many documents (after sorting); for trial runs."
    )

    # ---- rasterize -------------------------------------------------------------
    min_dpi: float = Field(default=72.0, gt=0, description="Lowest resolution a PDF page is rendered at.")
    max_dpi: float = Field(default=300.0, gt=0, description="Highest resolution a PDF page is rendered at.")
    max_page_pixels: int = Field(
        default=12_000_000,
        ge=10_000,
        description="Pixel budget per rendered page; larger renders are scaled down (and the row says so).",
    )
    extract_text_layer: bool = Field(default=True, description="Extract the visible PDF text layer for each page.")

    # ---- tiling -----------------------------------------------------------------
    tiling_policy: TilingPolicyName = Field(
        default="internvl",
        description="Dynamic-resolution tiling: internvl (448 px tiles), minimax (336 px grid up to 2016 px), "
        "minicpm (LLaVA-UHD slices up to ~1.8 MP).",
    )
    min_tiles: int | None = Field(
        default=None,
        ge=1,
        description="InternVL policy: fewest tiles per page. Default: the checkpoint's own, else 1.",
    )
    max_tiles: int | None = Field(
        default=None,
        ge=1,
        description="InternVL/MiniCPM policies: most tiles (slices) per page. Default: the checkpoint's own, "
        "else 12 (InternVL) or 9 (MiniCPM, its limit). MiniMax ignores it (its grid is 1..6 per side).",
    )
    tokens_per_tile: int | None = Field(
        default=None,
        ge=1,
        description="Visual tokens per tile; default is the policy's own (InternVL 256, MiniMax 576, MiniCPM 64).",
    )

    # ---- inference ----------------------------------------------------------------
    model: str | None = Field(
        default=None,
        description="Model folder or hub id of an image-text-to-text checkpoint (suggested: OpenGVLab/InternVL3-1B-hf). "
        "No default: without it no model runs and the model columns stay null.",
    )
    revision: str | None = Field(default=None, description="Model revision (branch, tag or commit) when loading from a hub.")
    trust_remote_code: bool = Field(
        default=False, description="Allow the checkpoint's own Python code to run. Off unless you ask for it."
    )
    tasks: list[TaskName] = Field(
        default_factory=lambda: ["description", "ocr", "chart"],
        validate_default=True,
        description="What to ask the model for each page.",
    )
    chart_questions: list[str] = Field(
        default_factory=list,
        description="Extra questions for pages that hold a chart, asked after the default set.",
    )
    default_chart_questions: bool = Field(
        default=True, description="Ask the built-in chart questions (type, title, axes, data table)."
    )
    ocr: OcrMode = Field(
        default="auto",
        description="Where ocr_text comes from: auto (the PDF text layer of born-digital pages, and of scans' OCR "
        "layers, when it passes the quality check in pipeline/textlayer.py; the model for every other page), model "
        "(always the model) or text_layer (never the model: the text layer, null without one).",
    )
    ocr_max_new_tokens: int = Field(
        default=2048, ge=1, description="Generation limit of the OCR task (a dense page is 800-1,500 tokens)."
    )
    description_max_new_tokens: int = Field(
        default=256, ge=1, description="Generation limit of the page description (two to four sentences)."
    )
    chart_check_max_new_tokens: int = Field(
        default=4, ge=1, description="Generation limit of the yes/no chart check (one word, plus end of turn)."
    )
    chart_answer_max_new_tokens: int = Field(
        default=512, ge=1, description="Generation limit of each chart question's answer (room for a data table)."
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description="One generation limit for every task, replacing the four per-task limits (quick trials); "
        "unset: the per-task limits apply.",
    )
    num_beams: int | None = Field(
        default=None,
        ge=1,
        description="Beams of the deterministic decoding; unset: the model family's own default (MiniCPM-V 2.0: 3, "
        "as its chat(sampling=False); Mono-InternVL, MiniMax-VL-01 and the native families: 1, greedy). 1 is the "
        "fastest; recorded in the rows' prompt_version.",
    )
    repetition_penalty: float | None = Field(
        default=None,
        gt=0.0,
        description="Repetition penalty over each answer's own tokens (never the prompt); unset: the family's own "
        "default (MiniCPM-V 2.0: 1.2, others 1.0 = none). Recorded in the rows' prompt_version.",
    )
    dtype: Dtype = Field(
        default="auto", description="Model dtype: auto is bfloat16 on GPU, float32 on CPU."
    )
    device: str = Field(
        default="auto",
        description="auto (all visible GPUs, else CPU), cpu, or a comma-separated list of GPU ids to shard one model "
        "over (0,1; cuda:0,cuda:1 means the same). Ids that are not visible are an error before any work.",
    )
    gpu_memory_headroom: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="Share of each GPU's memory kept free of weights for activations and the KV cache.",
    )
    batch_visual_tokens: int = Field(
        default=16_384, ge=1, description="Batch pages together up to this many visual tokens."
    )
    max_batch_pages: int = Field(default=16, ge=1, description="Upper bound on pages per batch.")
    engine: Literal["auto", "transformers", "vllm"] = Field(
        default="auto",
        description="Inference engine: transformers (continuous batching, every family, CPU or GPU), vllm (offline "
        "vLLM: continuous batching and prefix caching; families vLLM serves; needs vllm installed), or auto "
        "(vllm when it is installed, a CUDA GPU is visible and vLLM serves the model's family, else transformers).",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="vLLM engine: GPUs one model instance is split over (tensor parallel)."
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="vLLM engine: share of each GPU's memory vLLM may use (weights, "
        "activations and KV cache)."
    )
    vllm_max_pages: int = Field(
        default=256, ge=1, description="vLLM engine: pages handed to vLLM at once (all their requests in flight "
        "together); bounds the prepared pages held in memory."
    )

    # ---- execution ---------------------------------------------------------------
    shard_size: int = Field(default=64, ge=1, description="Documents per shard (one Parquet file per table per shard).")
    prep_workers: int = Field(
        default=1,
        ge=0,
        description="CPU worker processes preparing pages while the model works; they also enforce the "
        "document timeout (0: prepare in the main process, timeout checked between pages only).",
    )
    prefetch_pages: int = Field(default=32, ge=1, description="Prepared pages buffered ahead of the model.")
    document_timeout_s: float = Field(
        default=600.0, gt=0, description="A document taking longer than this to prepare becomes a document_timeout "
        "row (the pages it got stand). The row is final: a timeout is not transient, so later runs leave the "
        "document alone (with the defaults one pathological file costs this long once, over all runs).",
    )
    retry_timeouts: bool = Field(
        default=False, description="Try again the documents an earlier run gave up on for taking longer than "
        "--document-timeout-s (pass a larger --document-timeout-s with it); each run asked tries them once more.",
    )
    run_id: str | None = Field(
        default=None, description="Identifier of this run (generated when not given): 1-128 letters, digits, '.', "
        "'_' or '-', starting with a letter or digit (it names the run's files and shows in reports).",
    )
    reprocess: bool = Field(
        default=False,
        description="Redo documents that the output holds from runs with other output settings (new rows are added "
        "beside the old ones; select one answer per page by config_fingerprint, see the runs table). Without it, a "
        "run whose settings differ from the output's refuses to start.",
    )
    wait_for_output_s: float = Field(
        default=0.0,
        ge=0.0,
        description="When another live run owns the output, wait up to this many seconds for it (0: exit at once "
        "with a one-line message, exit code 3).",
    )
    progress: bool = Field(default=True, description="Show a progress bar on the terminal.")

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        cleaned = sorted({v.lower().lstrip(".") for v in value if v.strip()})
        if not cleaned:
            raise ValueError("extensions must name at least one file extension")
        return cleaned

    @field_validator("run_id")
    @classmethod
    def _check_run_id(cls, value: str | None) -> str | None:
        if not value:
            return None  # not given: generated
        if not RUN_ID_RE.fullmatch(value):
            raise ValueError("a run id is 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("tasks")
    @classmethod
    def _dedupe_tasks(cls, value: list[str]) -> list[str]:
        seen: list[str] = []
        for task in value:
            if task not in seen:
                seen.append(task)
        return seen

    @model_validator(mode="after")
    def _check_ranges(self) -> "RunConfig":
        if self.min_dpi > self.max_dpi:
            raise ValueError(f"min_dpi ({self.min_dpi}) is above max_dpi ({self.max_dpi})")
        if self.min_tiles is not None and self.max_tiles is not None and self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles ({self.min_tiles}) is above max_tiles ({self.max_tiles})")
        return self

    # ---- derived -------------------------------------------------------------------
    def all_chart_questions(self) -> list[str]:
        base = list(DEFAULT_CHART_QUESTIONS) if self.default_chart_questions else []
        return base + [q for q in self.chart_questions if q not in base]

    def task_budgets(self) -> dict[str, int]:
        """Generation limit per kind of model row: description, ocr, chart_check, chart_answer."""
        if self.max_new_tokens is not None:
            return dict.fromkeys(("description", "ocr", "chart_check", "chart_answer"), self.max_new_tokens)
        return {
            "description": self.description_max_new_tokens,
            "ocr": self.ocr_max_new_tokens,
            "chart_check": self.chart_check_max_new_tokens,
            "chart_answer": self.chart_answer_max_new_tokens,
        }

    def fingerprint(self) -> str:
        """Short hash of the settings that change what is written for a page."""
        blob = json.dumps(self.output_settings(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def tiling_policy_explicit(self) -> bool:
        """Whether the tiling policy was chosen rather than left at its default."""
        return "tiling_policy" in self.model_fields_set

    def output_settings(self) -> dict[str, Any]:
        """The settings the fingerprint covers (what changes the rows written)."""
        unset_later = {name for name in _OUTPUT_FIELDS_ADDED_LATER if getattr(self, name) is None}
        return json.loads(json.dumps(self.model_dump(exclude=set(_NON_OUTPUT_FIELDS) | unset_later), default=str))

    def public_dict(self) -> dict[str, Any]:
        """Settings safe to log or store: storage options are reduced to their keys."""
        data = self.model_dump()
        data["storage_options"] = sorted(self.storage_options)
        return data


def describe_validation_error(exc: ValidationError) -> str:
    """`field: reason` pairs, without the offending values (they may be secrets)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def field_help() -> dict[str, tuple[Any, str]]:
    """Field name -> (default, help) for generated CLIs and docs."""
    out: dict[str, tuple[Any, str]] = {}
    for name, info in RunConfig.model_fields.items():
        default = info.get_default(call_default_factory=True) if not info.is_required() else None
        out[name] = (default, info.description or "")
    return out
