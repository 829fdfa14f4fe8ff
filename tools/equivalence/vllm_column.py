"""The vLLM column of the seed equivalence tools: docpipe's vLLM classes' greedy ids on a case.

`vllm_greedy(family, folder, image, question, tokens=...)` runs the case's checkpoint through
docpipe's vLLM engine set-up (the plugin's config format and architecture, no tokenizer,
the family builder's prompt ids and coded pixels, `request()` of the family's vllm.py) in a
child process (vLLM starts engine processes; one checkpoint per child) and returns the
greedy ids and the prompt ids vLLM ran, or a string saying why the column is n/a here:
vllm not importable (run the tool from the vLLM virtualenv, .venv-vllm: the ports run on
its transformers too), or a text head_dim vLLM's CPU attention refuses (the harness's tiny
Mono-InternVL has 16).

    python tools/equivalence/vllm_column.py FAMILY FOLDER IMAGE.npy QUESTION TOKENS   (the child)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)  # what vLLM's CPU attention takes


def _text_head_dim(folder: Path) -> int:
    raw = json.loads((folder / "config.json").read_text())
    text = raw.get("llm_config") or raw.get("text_config") or raw
    return int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])


def vllm_greedy(family: str, folder: Path, image: Any, question: str, *, tokens: int,
                min_tokens: int | None = None) -> dict | str:
    """{"ids": greedy ids, "prompt_ids": what vLLM ran} or why n/a. At most `tokens`; the stop id
    (the builder's end of turn) is refused before `min_tokens` (default: all of them, as
    generate(min_new_tokens=tokens) does)."""
    import numpy as np

    if importlib.util.find_spec("vllm") is None:
        return "n/a: no vllm (run from .venv-vllm)"
    import torch

    head_dim = _text_head_dim(folder)
    if not torch.cuda.is_available() and head_dim not in CPU_HEAD_DIMS:
        return f"n/a: head_dim {head_dim} (vLLM-CPU)"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.npy"
        np.save(path, np.asarray(image, dtype=np.uint8))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   VLLM_LOGGING_LEVEL="WARNING")
        least = tokens if min_tokens is None else min_tokens
        done = subprocess.run([sys.executable, __file__, family, str(folder), str(path), question, str(tokens),
                               str(least)],
                              capture_output=True, text=True, timeout=900, env=env)
    if done.returncode:
        return f"vLLM failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(family_name: str, folder: str, image_path: str, question: str, tokens: int, least: int) -> dict:
    import types

    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    from pipeline.config import RunConfig
    from pipeline.inference.registry import family_by_name
    from pipeline.inference.vllm_engine import seed_engine_args

    family = family_by_name(family_name)
    code = family.code()
    config = code.load_config(folder)
    builder = code.load_builder(folder, config, revision=None, trust_remote_code=False, tasks=(), chart_questions=())
    image = Image.fromarray(np.load(image_path), "RGB")
    plan = builder.plan(*image.size)
    pixels, image_inputs = builder.pixels(image, plan)
    ids = builder.encode_text(builder.chat_text(question, plan))
    page = types.SimpleNamespace(prompts={"q": ids}, pixels=pixels, image_inputs=image_inputs, plan=plan)
    prompt = family.vllm().request(page, "q", builder)
    run = RunConfig(source=folder, output=str(Path(folder) / "_unused"), model=folder)
    llm = LLM(model=folder, dtype="float32", seed=0, enable_prefix_caching=False, limit_mm_per_prompt={"image": 1},
              **seed_engine_args(run, family))
    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=least, detokenize=False,
                            stop_token_ids=[int(builder.tokenizer.eos_token_id)])
    try:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
    finally:  # stop vLLM's engine processes now (left running, they would hold the parent's pipes)
        llm.llm_engine.engine_core.shutdown()
    return {"ids": list(out.outputs[0].token_ids), "prompt_ids": list(out.prompt_token_ids),
            "prompt_ids_equal": list(out.prompt_token_ids) == [int(t) for t in ids]}


if __name__ == "__main__":
    family_name, folder, image_path, question, tokens, least = sys.argv[1:7]
    print(json.dumps(_child(family_name, folder, image_path, question, int(tokens), int(least))))
    sys.stdout.flush()
    import atexit

    atexit._run_exitfuncs()  # vLLM's own clean-up, then out: its teardown can abort the interpreter's
    os._exit(0)
