"""Inference throughput: the model cards' naive loop vs the engine. Prints figures; asserts nothing.

(a) naive: one page and one task at a time, raw pixel values into `generate` (the image
    is encoded again for every task), as the model cards' quick-starts do;
(b) engine: pages batched by visual-token budget, left padding, one image encoding per
    page shared by all its tasks (prepared pages in, answers out: model time only);
(c) pipeline: the same engine behind the whole runner, one-page PDFs read, rasterized and
    prepared in `--prep-workers` processes while the model works, Parquet written; its
    wall time includes all of that (the workers are started on a warm-up shard first, as in
    a long run), so its "busy" share is the one that says whether the model waits for the CPU.

Same model, pages and output lengths (min_new_tokens = max_new_tokens fixes them), greedy.
Each path runs in a fresh subprocess so peak memory is its own.

    python bench/inference.py                      # CPU: tiny InternVL, 6 pages
    python bench/inference.py --family qwen2_vl    # other tiny families
    python bench/inference.py --real-size          # GPU: InternVL3-1B at full size, random
                                                   # bf16 weights, 13 tiles/page, 256 tokens/task
"""

from __future__ import annotations

import argparse
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


def _config(args: argparse.Namespace, model_dir: Path, **more: Any) -> Any:
    """The run settings every path shares (model, output lengths, batching, device)."""
    from pipeline.config import RunConfig

    settings: dict[str, Any] = {"source": "unused", "output": "unused", **more}
    return RunConfig(
        model=str(model_dir),
        max_new_tokens=args.new_tokens,
        batch_visual_tokens=args.budget,
        max_batch_pages=args.max_batch_pages,
        device=args.device,
        dtype=args.dtype,
        **settings,
    )


def _engine(args: argparse.Namespace, model_dir: Path) -> Any:
    """The engine under test: a tiny checkpoint from disk, or (real size) random weights made on the GPU."""
    import torch

    from pipeline.inference import Engine, load_builder, load_engine

    config = _config(args, model_dir)
    if not args.real_size:
        return load_engine(config, min_new_tokens=args.new_tokens)
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    real = internvl3_1b_config(
        tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    device = {"auto": "cuda", "cuda": "cuda", "cpu": "cpu"}.get(args.device, f"cuda:{args.device}")
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(real, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    builder = load_builder(config, model_config=real)
    return Engine(
        model,
        builder,
        model_id="InternVL3-1B-hf (architecture, random weights)",
        revision=None,
        dtype=str(dtype).removeprefix("torch."),
        max_new_tokens=args.new_tokens,
        batch_visual_tokens=args.budget,
        max_batch_pages=args.max_batch_pages,
        min_new_tokens=args.new_tokens,
    )


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
        (shard,) = runner.discover_work(config).shards
        # Start the prep workers on a warm-up shard of other documents first, as the first
        # shard of a long run does (a worker takes seconds to import torch/transformers).
        warm_src = work / "warm"
        warm_src.mkdir()
        for i in range(args.prep_workers):
            (warm_src / f"warm{i}.pdf").write_bytes(sample_pdf(title=f"Warm-up {i}"))
        warm = config.model_copy(update={"source": str(warm_src), "output": str(work / "warm-out")})
        for warm_shard in runner.discover_work(warm).shards:
            runner.process_shard(warm_shard, warm, run_id="warm-up", engine=engine)
        cuda = torch.cuda.is_available() and next(engine.model.parameters()).is_cuda
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = engine.stats.model_s, engine.stats.generated_tokens, engine.stats.generate_calls, engine.stats.encode_s
        t0 = time.perf_counter()
        result = runner.process_shard(shard, config, run_id="bench", engine=engine)
        wall = time.perf_counter() - t0
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
    torch.set_num_threads(args.threads)
    engine = _engine(args, model_dir)
    builder = engine.builder
    pages = _pages(args.pages, args.width, args.height)
    t0 = time.perf_counter()
    prepared = [builder.build(p, builder.plan(p.image.width, p.image.height)) for p in pages]
    prep_s = time.perf_counter() - t0
    run = engine.answer_naive if args.only == "naive" else engine.answer
    run(prepared[:1])  # warm-up (kernels, allocator), not timed
    cuda = torch.cuda.is_available() and next(engine.model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = engine.stats.model_s, engine.stats.generated_tokens, engine.stats.generate_calls, engine.stats.encode_s
    t0 = time.perf_counter()
    answers = run(prepared)
    if cuda:
        torch.cuda.synchronize()
    answer_s = time.perf_counter() - t0
    errors = [a.error for a in answers if a.error is not None]
    model_s = engine.stats.model_s - before[0]
    return {
        "path": args.only,
        "pages": len(prepared),
        "tiles_per_page": sum(p.plan.tiles for p in prepared) / len(prepared),
        "visual_tokens_per_page": sum(p.visual_tokens for p in prepared) / len(prepared),
        "prep_s": prep_s,
        "answer_s": answer_s,
        "model_s": model_s,
        "generated_tokens": engine.stats.generated_tokens - before[1],
        "generate_calls": engine.stats.generate_calls - before[2],
        "encode_s": engine.stats.encode_s - before[3] if args.only == "engine" else None,
        "errors": [str(e) for e in errors],
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": engine.dtype,
    }


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="internvl", help="tiny model family (CPU path)")
    parser.add_argument("--real-size", action="store_true", help="InternVL3-1B at full size, random bf16 weights, GPU")
    parser.add_argument("--pages", type=int, default=None, help="pages per path (6 tiny, 8 real size)")
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
    parser.add_argument("--only", choices=["naive", "engine", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.pages = args.pages or (8 if args.real_size else 6)
    args.new_tokens = args.new_tokens or (256 if args.real_size else 16)
    args.pipeline_pages = args.pipeline_pages or (64 if args.real_size else 24)
    if args.real_size:
        args.family = "internvl"

    if args.only:  # child process: one path, JSON on the last line
        print(json.dumps(run_path(args, Path(args.model_dir))))
        return

    from pipeline.testing import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(args.family, Path(tmp) / args.family)
        results = {}
        for path in ("naive", "engine", "pipeline"):
            child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
            child += ["--only", path, "--model-dir", str(model_dir)]
            env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
            done = subprocess.run(child, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{path} path failed")
            results[path] = json.loads(done.stdout.strip().splitlines()[-1])

    a, b, c = results["naive"], results["engine"], results["pipeline"]
    size = "InternVL3-1B architecture (random weights)" if args.real_size else f"tiny {args.family}"
    print(
        f"{size} on {a['device']} ({a['dtype']}): {a['pages']} pages of {args.width}x{args.height} px, "
        f"{a['tiles_per_page']:.0f} tiles / {a['visual_tokens_per_page']:.0f} visual tokens per page, "
        f"{args.new_tokens} new tokens per task"
    )
    for result in (a, b, c):
        _print(result)
        if result["errors"]:
            print(f"    errors: {result['errors'][:3]}")
    if a["generated_tokens"] != b["generated_tokens"]:
        print(f"  note: generated tokens differ ({a['generated_tokens']} vs {b['generated_tokens']})")
    naive_ps = a["pages"] / a["answer_s"]
    print(f"  engine / naive: {(b['pages'] / b['answer_s']) / naive_ps:.2f}x pages/s (prepared pages, model only)")
    print(
        f"  pipeline / naive: {(c['pages'] / c['answer_s']) / naive_ps:.2f}x pages/s "
        f"(pipeline: {c['pages']} one-page PDFs end to end, {args.prep_workers} prep workers, model busy "
        f"{c['model_s'] / c['answer_s']:.0%} of wall)"
    )


if __name__ == "__main__":
    main()
