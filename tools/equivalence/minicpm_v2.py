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

Each case is compared three ways: fp32 (prompt ids and pixels equal, logits within 1e-4,
8 greedy ids equal, through `generate()` and through the Engine: two rows that share the
image's prefill); bf16 (the original run as its model card does, `.to(torch.bfloat16)`:
greedy ids equal and our logits no further from the original's bf16 than its own bf16 error
from fp32); and the family's default decoding, chat(sampling=False)'s 3 beams with
repetition_penalty 1.2, through this project's Engine on two rows at once (ids and the
decoded text equal to the original's generate() + _decode_text). The reference prompt is the
official chat() one (REF_PROMPT=official: one <AI>).

The vLLM column: the same checkpoint, image and question through docpipe's vLLM classes
(`--engine vllm`'s set-up, tools/equivalence/vllm_column.py), fp32 greedy: vLLM's prompt ids
equal the original's and its greedy ids equal the original's fp32 greedy ids. Run the tool
from the vLLM virtualenv (.venv-vllm) for it; elsewhere it says n/a.

One table row per case; exit status 1 when any case differs.
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
    # REF_PROMPT=official: the prompt of openbmb's chat(), "<用户>" + image + "\n" + question + "<AI>" (one <AI>)
    env = {**os.environ, "REF_SEED": str(seed), "REF_SIZE": size, "REF_QUESTION": question, "REF_PROMPT": "official"}
    folder = case_dir / "checkpoint"
    log = case_dir / "reference.log"
    with log.open("w") as out:
        subprocess.run([str(work / "venv" / "bin" / "python"), "run_minicpmv2.py", "--out", str(folder)],
                       cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    saved = case_dir / "reference_io.pt"
    shutil.move(str(work / "out" / "minicpmv2_reference_io.pt"), saved)
    with log.open("a") as out:
        subprocess.run([str(work / "venv" / "bin" / "python"), "-c", _EXTRA_SCRIPT, str(folder), str(saved),
                        str(case_dir / "reference_extra.pt"), str(BEAM_TOKENS)],
                       cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return saved


BEAM_TOKENS = 8
# Run by the reference venv on the harness's checkpoint and inputs: the ORIGINAL model in bf16 (logits, greedy
# ids) and the ORIGINAL deterministic chat() setting (num_beams=3, repetition_penalty=1.2) in fp32.
_EXTRA_SCRIPT = r"""
import json, os, sys
import harness_common  # noqa: F401  (torchvision stub, offline caches)
import torch
folder, io_path, out_path, beam_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
override = json.load(open(os.path.join(folder, "config.json")))["_harness_vision_override"]
import timm
_create = timm.create_model
def _tiny(name, *a, **kw):
    if name.startswith("vit_so400m_patch14_siglip_384"):
        kw = {**kw, **override}
    return _create(name, *a, **kw)
timm.create_model = _tiny
from transformers import AutoModel, AutoTokenizer
ref = torch.load(io_path, weights_only=False)
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = ref["input_ids"]
out = {}
for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    # as the model card: from_pretrained(torch_dtype=...) then .to(dtype) (from_pretrained alone leaves a float32
    # tensor in the resampler, and the original then fails on mixed dtypes)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, torch_dtype=dtype).to(dtype=dtype).eval()
    pv = [[t.to(dtype) for t in img] for img in ref["pixel_values"]]
    inputs = {"input_ids": ids, "pixel_values": pv, "image_sizes": ref["image_sizes"],
              "image_bounds": ref["image_bounds"]}
    with torch.inference_mode():
        if name == "bf16":
            data = {**inputs, "position_ids": torch.arange(ids.shape[1]).unsqueeze(0)}
            out["bf16_logits"] = model(data).logits.float()
            new = ref["greedy_ids"].shape[1] - 1
            out["bf16_greedy_ids"] = model.generate(**inputs, tokenizer=tok, max_new_tokens=new, min_new_tokens=new,
                                                    do_sample=False, num_beams=1)
        else:  # chat(sampling=False)'s settings, through the same generate() chat() calls
            out["beam_ids"] = model.generate(**inputs, tokenizer=tok, max_new_tokens=beam_tokens, num_beams=3,
                                             repetition_penalty=1.2)
            out["beam_text"] = model._decode_text(out["beam_ids"], tok)[0]
torch.save(out, out_path)
"""


# Texts whose ids the fixture records: user symbols, prefix spaces, newlines, added tokens, Chinese.
FIXTURE_TEXTS = (
    "<用户>hello<AI>",
    " leading space and  two spaces",
    "<用户>(<image>./</image>)What is in this picture?<AI>",
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
    # the official chat() prompt: the processor puts the image placeholder + "\n" and appends ONE <AI>
    prompt = "<用户>(<image>./</image>)" + q
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
               "and MiniCPMVProcessor produced the ids from it (chat prompts: the official chat() prompt, "
               "'<用户>(<image>./</image>)' + question through the processor, which puts the image placeholder and "
               "appends one <AI>, on a plain image of that size)",
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

    extra_ref = torch.load(reference.parent / "reference_extra.pt", weights_only=False)
    # bf16: both in bf16 on the same weights and inputs; the fp32 logits are the truth both are measured against
    model16 = fam.load_model(folder, dtype=torch.bfloat16)
    with torch.inference_mode():
        logits16 = model16(input_ids=inputs, pixel_values=flat.to(torch.bfloat16), tile_sizes=extra["tile_sizes"],
                           use_cache=False).logits.float()
        gen16 = model16.generate(
            input_ids=inputs, attention_mask=torch.ones_like(inputs), pixel_values=flat.to(torch.bfloat16),
            tile_sizes=torch.from_numpy(extra["tile_sizes"]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, num_beams=1, eos_token_id=builder.tokenizer.eos_token_id,
            pad_token_id=builder.pad_token_id)
    ref16 = extra_ref["bf16_logits"].float()
    truth = ref["logits"].float()
    bf16 = {
        "logits_vs_ref_bf16": float((logits16 - ref16).abs().max()) if ids_equal else float("nan"),
        "ours_vs_fp32": float((logits16 - truth).abs().max()) if ids_equal else float("nan"),
        "ref_vs_fp32": float((ref16 - truth).abs().max()),
        "greedy_equal": gen16[0, inputs.shape[1]:].tolist() == extra_ref["bf16_greedy_ids"][0, 1:].tolist(),
    }

    # the family's default decoding (chat(sampling=False): 3 beams, repetition_penalty 1.2) through the engine
    from pipeline.inference.engine import Engine
    from pipeline.inference.generation import GREEDY

    engine = Engine(model, builder, model_id=str(folder), revision=None, dtype="float32",
                    max_new_tokens=BEAM_TOKENS, batch_visual_tokens=1 << 30, max_batch_pages=4)
    with torch.inference_mode():
        feats = model.encode_packed(flat, extra["tile_sizes"])
        from pipeline.inference.adapters import PageFeatures

        beam = engine.generate([ids, ids], [PageFeatures(feats), PageFeatures(feats)], kind="ocr")
        # greedy through the engine too: two rows sharing the image's prefill (the second row only reads its copy)
        greedy_engine = Engine(model, builder, model_id=str(folder), revision=None, dtype="float32",
                               max_new_tokens=new_tokens, batch_visual_tokens=1 << 30, max_batch_pages=4,
                               min_new_tokens=new_tokens, generation=GREEDY)
        shared = PageFeatures(feats)
        engine_greedy = greedy_engine.generate([ids, ids], [shared, shared])
    ref_beam = extra_ref["beam_ids"][0, 1:].tolist()
    stop = next((k for k, t in enumerate(ref_beam) if t == builder.tokenizer.eos_token_id), None)
    ref_beam = ref_beam if stop is None else ref_beam[:stop]
    from tools.equivalence.vllm_column import vllm_greedy

    served = vllm_greedy("minicpm_v2", folder, ref["image_uint8"].numpy(), ref["question"], tokens=new_tokens)
    vllm = served if isinstance(served, str) else (
        served["prompt_ids"] == ref_ids.tolist() and served["ids"] == ref_greedy)
    beams = {
        "setting": engine.generation.tag,
        "ids_equal": beam[0].tokens == ref_beam and beam[1].tokens == ref_beam,
        "text_equal": beam[0].text == extra_ref["beam_text"],
        "ours": beam[0].tokens, "ref": ref_beam, "ours_text": beam[0].text, "ref_text": extra_ref["beam_text"],
    }
    return {
        "slices": f"{plan.cols}x{plan.rows}" + ("+ov" if plan.thumbnail else ""),
        "tokens": len(ids),
        "ids_equal": ids_equal,
        "pixels_max_diff": pixel_diff if slices_equal else float("nan"),
        "logits_max_diff": logits_diff,
        "greedy_equal": greedy == ref_greedy,
        "engine_greedy_equal": all(g.tokens == ref_greedy for g in engine_greedy),
        "greedy": greedy,
        "ref_greedy": ref_greedy,
        "bf16": bf16,
        "beams": beams,
        "vllm": vllm,
        "vllm_ids": None if isinstance(served, str) else served["ids"],
        # bf16: greedy ids equal and logits no further from the original's bf16 than its own bf16 error
        "ok": bool(ids_equal and slices_equal and logits_diff <= TOLERANCE and greedy == ref_greedy
                   and all(g.tokens == ref_greedy for g in engine_greedy)
                   and np.isfinite(logits_diff) and bf16["greedy_equal"]
                   and bf16["logits_vs_ref_bf16"] <= max(bf16["ref_vs_fp32"], TOLERANCE)
                   and beams["ids_equal"] and beams["text_equal"] and vllm is not False),
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

    header = (f"{'case':>10} {'seed':>4} {'slices':>7} {'tokens':>6} {'ids':>5} {'pixels':>9} {'logits':>9} "
              f"{'greedy':>6} {'engine':>6} | bf16: {'vs_ref':>8} {'ours-fp32':>9} {'ref-fp32':>9} {'greedy':>6} | "
              f"{'decoding':>12} {'ids':>5} {'text':>5} | vLLM greedy")
    print(header)
    failures = 0
    for n, size in enumerate(args.cases.split(",")):
        case_dir = args.work / "cases" / f"{n}_{size}"
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        seed, question = n, QUESTIONS[n % len(QUESTIONS)]
        reference = run_reference(args.work, size, seed, question, case_dir)
        row = compare(case_dir / "checkpoint", reference)
        b, m = row["bf16"], row["beams"]
        failures += not row["ok"]
        print(f"{size:>10} {seed:>4} {row['slices']:>7} {row['tokens']:>6} {str(row['ids_equal']):>5} "
              f"{row['pixels_max_diff']:>9.2e} {row['logits_max_diff']:>9.2e} {str(row['greedy_equal']):>6} "
              f"{str(row['engine_greedy_equal']):>6} | "
              f"      {b['logits_vs_ref_bf16']:>8.2e} {b['ours_vs_fp32']:>9.2e} {b['ref_vs_fp32']:>9.2e} "
              f"{str(b['greedy_equal']):>6} | {m['setting']:>12} {str(m['ids_equal']):>5} {str(m['text_equal']):>5}"
              f" | {row['vllm']}"
              + ("" if row["vllm"] is not False else f"  vllm {row['vllm_ids']} ref {row['ref_greedy']}")
              + ("" if row["greedy_equal"] else f"  ours {row['greedy']} ref {row['ref_greedy']}")
              + ("" if m["ids_equal"] and m["text_equal"] else f"  beams ours {m['ours']} {m['ours_text']!r} "
                 f"ref {m['ref']} {m['ref_text']!r}"), flush=True)
    print("ALL EQUAL" if not failures else f"{failures} case(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
