"""What beam search costs: greedy vs MiniCPM-V 2.0's own deterministic decoding. Prints figures; asserts nothing.

MiniCPM-V 2.0's `chat(sampling=False)` is beam search with 3 beams and repetition_penalty 1.2
(the family's default here, pipeline/inference/generation.py). This runs the same pages through
the engine (prepared pages in, answers out: model time only) once per setting, each row forced
to the same length (min_new_tokens = max_new_tokens), and prints pages/s, generated tokens/s,
the peak memory of the process and the ratio to greedy, side by side.

    python bench/generation.py                          # tiny MiniCPM-V 2.0 on CPU, 8 pages, 32 tokens
    python bench/generation.py --pages 16 --new-tokens 64 --family minicpm_v2

On a tiny random model on CPU the figure is a lower bound of the cost on a GPU serving the
real 2.8B model: there a decode step is bound by reading the weights and the KV cache, and 3
beams carry 3 times the KV cache of every row (a third of the rows fit in the same memory).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(family: str, pages: int, new_tokens: int, settings: list[str]) -> None:
    import torch

    from pipeline.inference.engine import Engine
    from pipeline.inference.generation import GenerationSettings
    from pipeline.inference.loading import load_builder, load_model
    from pipeline.config import RunConfig
    from pipeline.testing import make_tiny_model, render_sample_page

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_model(family, Path(tmp) / family)
        config = RunConfig(source="x", output="y", model=str(folder), device="cpu", dtype="float32",
                           tasks=["description", "ocr"])
        loaded = load_model(config)
        builder = load_builder(config, loaded.model.config)
        docs = [render_sample_page(dpi=60.0 + 5 * (i % 4), doc_id=f"d{i}", chart=False) for i in range(pages)]
        prepared = [builder.build(p, builder.plan(*p.image.size)) for p in docs]
        rows = []
        for name in settings:
            beams, _, penalty = name.partition("-rp")
            generation = GenerationSettings(num_beams=int(beams.removeprefix("beams") or 1) if beams != "greedy" else 1,
                                            repetition_penalty=float(penalty or 1.0))
            engine = Engine(loaded.model, builder, model_id=str(folder), revision=None, dtype="float32",
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, batch_visual_tokens=1 << 20,
                            max_batch_pages=4, generation=generation)
            engine.answer(prepared[:1])  # warm-up
            engine.stats.generated_tokens = 0
            t0 = time.perf_counter()
            answers = engine.answer(prepared)
            seconds = time.perf_counter() - t0
            assert all(a.error is None for a in answers), [a.error for a in answers if a.error]
            rows.append((generation.tag, pages / seconds, engine.stats.generated_tokens / seconds))
        base = rows[0][1]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{family}, {pages} pages x 2 tasks, {new_tokens} tokens per task, CPU, batches of <= 4 pages "
              f"(process peak RSS {peak:.0f} MiB)")
        print(f"{'decoding':>14} {'pages/s':>8} {'tokens/s':>9} {'vs greedy':>9}")
        for tag, pps, tps in rows:
            print(f"{tag:>14} {pps:>8.2f} {tps:>9.1f} {pps / base:>8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="minicpm_v2")
    ap.add_argument("--pages", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--settings", default="greedy,beams3,beams3-rp1.2", help="comma-separated decodings")
    args = ap.parse_args()
    run(args.family, args.pages, args.new_tokens, args.settings.split(","))


if __name__ == "__main__":
    main()
