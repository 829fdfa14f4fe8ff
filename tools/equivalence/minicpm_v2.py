"""MiniCPM-V 2.0: this project's native port against the ORIGINAL remote code, number for number.

Not part of the test suite: the original code cannot be vendored and needs its own venv
(transformers 4.37.2, timm 0.9.10, ...). For each case the reference harness
(../shared/refharness) builds a tiny random checkpoint in the official layout with the
original classes, runs them on a random image and saves prompt ids, pixel values, logits
and greedy ids; then this script loads the same folder with the project
(`pipeline.inference.families.minicpm_v2`, no remote code) and compares.

    python tools/equivalence/minicpm_v2.py [--harness ../shared/refharness] [--work /tmp/minicpm_v2-ref]
                                           [--venv /tmp/ref-venv] [--cases 448x448,1000x600,...]
    python tools/equivalence/minicpm_v2.py --write-fixture tests/fixtures/minicpm_v2_prompt_ids.json

One table row per case; exit status 1 when any case differs (ids unequal or logits
beyond 1e-4).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DEFAULT_CASES = "448x448,1000x600,600x1400,1700x2200,300x200,2000x500"
QUESTIONS = ("What is in this picture?", "Describe the page briefly, please.")
TOLERANCE = 1e-4


def run_reference(work: Path, size: str, seed: int, question: str, case_dir: Path) -> Path:
    """Run the harness once; returns the saved reference_io.pt (moved into case_dir with the checkpoint)."""
    env = {**os.environ, "REF_SEED": str(seed), "REF_SIZE": size, "REF_QUESTION": question}
    folder = case_dir / "checkpoint"
    log = case_dir / "reference.log"
    with log.open("w") as out:
        subprocess.run([str(work / "venv" / "bin" / "python"), "run_minicpmv2.py", "--out", str(folder)],
                       cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    saved = case_dir / "reference_io.pt"
    shutil.move(str(work / "out" / "minicpmv2_reference_io.pt"), saved)
    return saved


# Texts whose ids the fixture records: user symbols, prefix spaces, newlines, added tokens, Chinese.
FIXTURE_TEXTS = (
    "<用户>hello<AI>",
    " leading space and  two spaces",
    "<用户>(<image>./</image>)What is in this picture?<AI><AI>",
    "line one\nline two\n\n<slice>x</slice> <image> after",
    "你好, 这是什么? <AI> answer",
    "<s>already a bos</s> tail",
)
FIXTURE_PROMPTS = ((448, 448, "What is in this picture?"), (1000, 600, "Describe the page."),
                   (600, 1400, "Is there a chart? Answer yes or no."), (1700, 2200, " spaced  question "))
FIXTURE_DECODE = ((1, 473, 113, 5, 200, 300, 2), (102, 112, 473, 511, 202), (250, 251, 101, 0, 0, 102, 252))

_FIXTURE_SCRIPT = r"""
import json, sys
import harness_common  # the torchvision stub
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer
folder, texts, prompts, decodes = sys.argv[1], *map(json.loads, sys.argv[2:5])
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
proc = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
out = {"texts": [{"text": t, "ids": tok.encode(t)} for t in texts], "prompts": [], "decode": []}
for w, h, q in prompts:
    prompt = tok.apply_chat_template([{"role": "user", "content": q}])
    ids = proc(prompt, [Image.new("RGB", (w, h), (120, 30, 200))], return_tensors="pt")["input_ids"][0].tolist()
    out["prompts"].append({"width": w, "height": h, "question": q, "ids": ids})
for ids in decodes:
    out["decode"].append({"ids": ids, "skip_special_tokens": tok.decode(ids, skip_special_tokens=True),
                          "raw": tok.decode(ids)})
print(json.dumps(out, ensure_ascii=False))
"""


def write_fixture(work: Path, folder: Path, path: Path) -> None:
    """Ids the ORIGINAL slow tokenizer and processor give, with the tiny tokenizer.model they came from."""
    import base64
    import json

    result = subprocess.run(
        [str(work / "venv" / "bin" / "python"), "-c", _FIXTURE_SCRIPT, str(folder), json.dumps(FIXTURE_TEXTS),
         json.dumps(FIXTURE_PROMPTS), json.dumps(FIXTURE_DECODE)],
        cwd=work, capture_output=True, text=True, check=True,
    )
    data = json.loads(result.stdout.strip().splitlines()[-1])
    data = {
        "how": "tools/equivalence/minicpm_v2.py --write-fixture: the reference harness (../shared/refharness, "
               "REF_SEED=0) trained tokenizer.model; the ORIGINAL MiniCPMVTokenizer (slow, transformers 4.37.2) "
               "and MiniCPMVProcessor produced the ids from it (chat prompts: apply_chat_template + processor "
               "on a plain image of that size)",
        "tokenizer_model_base64": base64.b64encode((folder / "tokenizer.model").read_bytes()).decode(),
        **data,
    }
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")


def compare(folder: Path, reference: Path) -> dict[str, object]:
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.inference.families import minicpm_v2 as fam

    ref = torch.load(reference, weights_only=True)
    image = Image.fromarray(ref["image_uint8"].numpy(), "RGB")
    model = fam.load_model(folder, dtype=torch.float32)
    builder = fam.load_builder(folder, model.config)
    plan = builder.plan(*image.size)
    ids = builder.encode_text(builder.chat_text(ref["question"], plan))
    ref_ids = ref["input_ids"][0].long()
    ids_equal = ids.tolist() == ref_ids.tolist()

    coded, extra = builder.pixels(image, plan)
    flat = torch.from_numpy(coded.decode()).reshape(3, -1)
    ref_slices = [t.float() for t in ref["pixel_values"][0]]
    sizes = [tuple(int(v) for v in hw) for hw in extra["tile_sizes"]]
    pixel_diff, offset = 0.0, 0
    slices_equal = sizes == [tuple(t.shape[-2:]) for t in ref_slices]
    if slices_equal:
        for (h, w), want in zip(sizes, ref_slices):
            got = flat[:, offset : offset + h * w].reshape(3, h, w)
            pixel_diff = max(pixel_diff, float((got - want).abs().max()))
            offset += h * w

    with torch.inference_mode():
        inputs = torch.from_numpy(ids)[None]
        out = model(input_ids=inputs, pixel_values=flat, tile_sizes=extra["tile_sizes"], use_cache=False)
        logits_diff = float((out.logits - ref["logits"].float()).abs().max()) if ids_equal else float("nan")
        new_tokens = ref["greedy_ids"].shape[1] - 1  # the original's output starts with a dummy <s>
        gen = model.generate(
            input_ids=inputs, attention_mask=torch.ones_like(inputs), pixel_values=flat,
            tile_sizes=torch.from_numpy(extra["tile_sizes"]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, num_beams=1, eos_token_id=builder.tokenizer.eos_token_id,
            pad_token_id=builder.pad_token_id,
        )
    greedy = gen[0, inputs.shape[1] :].tolist()
    ref_greedy = ref["greedy_ids"][0, 1:].tolist()
    return {
        "slices": f"{plan.cols}x{plan.rows}" + ("+ov" if plan.thumbnail else ""),
        "tokens": len(ids),
        "ids_equal": ids_equal,
        "pixels_max_diff": pixel_diff if slices_equal else float("nan"),
        "logits_max_diff": logits_diff,
        "greedy_equal": greedy == ref_greedy,
        "greedy": greedy,
        "ref_greedy": ref_greedy,
        "ok": bool(ids_equal and slices_equal and logits_diff <= TOLERANCE and greedy == ref_greedy
                   and np.isfinite(logits_diff)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", type=Path, default=ROOT.parent / "shared" / "refharness")
    ap.add_argument("--work", type=Path, default=Path("/tmp/minicpm_v2-ref"))
    ap.add_argument("--venv", type=Path, default=Path("/tmp/ref-venv"))
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated WxH image sizes")
    ap.add_argument("--write-fixture", type=Path, default=None,
                    help="write the prompt-id fixture of the tests (ids from the original tokenizer) and stop")
    args = ap.parse_args()

    if not (args.work / "run_minicpmv2.py").is_file():
        shutil.copytree(args.harness, args.work, dirs_exist_ok=True)
    if not (args.work / "venv").exists():
        (args.work / "venv").symlink_to(args.venv)
    (args.work / "out").mkdir(exist_ok=True)

    if args.write_fixture is not None:
        case_dir = args.work / "cases" / "fixture"
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        run_reference(args.work, "448x448", 0, QUESTIONS[0], case_dir)
        write_fixture(args.work, case_dir / "checkpoint", args.write_fixture)
        print(f"wrote {args.write_fixture}")
        return 0

    header = f"{'case':>10} {'seed':>4} {'slices':>7} {'tokens':>6} {'ids':>5} {'pixels':>9} {'logits':>9} {'greedy':>6}"
    print(header)
    failures = 0
    for n, size in enumerate(args.cases.split(",")):
        case_dir = args.work / "cases" / f"{n}_{size}"
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        seed, question = n, QUESTIONS[n % len(QUESTIONS)]
        reference = run_reference(args.work, size, seed, question, case_dir)
        row = compare(case_dir / "checkpoint", reference)
        failures += not row["ok"]
        print(f"{size:>10} {seed:>4} {row['slices']:>7} {row['tokens']:>6} {str(row['ids_equal']):>5} "
              f"{row['pixels_max_diff']:>9.2e} {row['logits_max_diff']:>9.2e} {str(row['greedy_equal']):>6}"
              + ("" if row["greedy_equal"] else f"  ours {row['greedy']} ref {row['ref_greedy']}"), flush=True)
    print("ALL EQUAL" if not failures else f"{failures} case(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
