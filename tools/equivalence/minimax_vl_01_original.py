"""MiniMax-VL-01's language model: this port against the ORIGINAL MiniMax-Text-01 remote code.

Not part of the test suite (the original code cannot be vendored; it needs transformers 4.x).
The model repositories' remote code is not reachable from here, but a public GitHub repository
carries a copy of the original `modeling_minimax_text_01.py` + `configuration_minimax_text_01.py`
(zzp1012/nanoGPT, commit 07c618b, files at the repository root as first added; later commits
edit them). This script takes them from a bare mirror (`fetch github:zzp1012/nanoGPT`), runs them
in the reference venv (../shared/refharness/setup.sh: transformers 4.37.2, plus einops) on a tiny
random MiniMax-Text-01, and compares this project's `language_model` on the same weights:

* key layout: the original's state_dict keys under `language_model.` == the port's (strict);
* per case (random token ids, lengths across the original's 256-token lightning blocks): fp32
  logits (max |diff|) and 8 greedy ids; bf16 (the original as its model card runs it:
  `.to(torch.bfloat16)`) logits against the original's bf16, each against the fp32 truth, and
  8 greedy ids; the 8 greedy ids also through this project's Engine (the prompt prefilled as a
  shared prefix plus a 5-token suffix continued from its cache, as a page's rows are);
* one lightning-attention layer alone in bf16 against an fp64 evaluation of its definition
  (pipeline/testing/lightning.py): the original's relative error and the port's.

Harness-only interventions (nothing in the original files is edited): its softmax-attention
layers call flash-attn, which needs CUDA, so `tools/equivalence/stubs/flash_attn` (plain causal
attention, float32 softmax) is put on sys.path and its functions into the module's namespace.
The vision tower (transformers' CLIP) and projector are not covered: MiniMax-VL-01's own remote
code is not public here (tools/equivalence/minimax_vl_01.py checks them against vLLM's port).

    python tools/equivalence/minimax_vl_01_original.py [--git-dir /work/.mirror/zzp1012+nanoGPT/repo]
        [--rev 07c618b] [--venv /tmp/ref-venv] [--work /tmp/minimax-ref]

Exit status 1 when a case differs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CASES = ((0, 40), (1, 300), (2, 700))  # (seed, tokens): one block, two blocks, three blocks
NEW_TOKENS = 8
VOCAB = 512
TOLERANCE = 1e-4
LAYER = {"hidden_size": 128, "num_attention_heads": 8, "head_dim": 16, "layers": 4, "layer_idx": 1, "tokens": 700,
         "decode": 16}

_REF_SCRIPT = r"""
import importlib.util, json, os, sys
work, stubs, project = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, stubs)
sys.path.insert(0, os.path.join(work, "src"))
import torch
import flash_attn, flash_attn.bert_padding as fab
import minimax_ref.modeling_minimax_text_01 as M
M.flash_attn_func, M.flash_attn_varlen_func = flash_attn.flash_attn_func, flash_attn.flash_attn_varlen_func
M.index_first_axis, M.pad_input, M.unpad_input = fab.index_first_axis, fab.pad_input, fab.unpad_input
M._flash_supports_window_size = True
spec = importlib.util.spec_from_file_location("lightning", os.path.join(project, "pipeline", "testing", "lightning.py"))
L = importlib.util.module_from_spec(spec); spec.loader.exec_module(L)
torch.set_num_threads(2)
cfg = json.load(open(os.path.join(work, "text_config.json")))
cases = json.loads(sys.argv[4]); new_tokens = int(sys.argv[5]); layer_spec = json.loads(sys.argv[6])
torch.manual_seed(0)
config = M.MiniMaxText01Config(**cfg)
model = M.MiniMaxText01ForCausalLM(config).eval()
with torch.no_grad():  # larger than the default init, so greedy ids vary
    for p in model.parameters():
        p.normal_(0.0, cfg["initializer_range"])
ckpt = os.path.join(work, "checkpoint")
model.save_pretrained(ckpt, safe_serialization=True)
out = {"keys": sorted(model.state_dict()), "cases": []}
model16 = M.MiniMaxText01ForCausalLM(config).eval()
model16.load_state_dict(model.state_dict())
model16 = model16.to(torch.bfloat16)  # as the model card: from_pretrained(torch_dtype=bf16) and .to(bf16)
for seed, n in cases:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg["vocab_size"] - 1, (1, n), generator=g)  # the last id is the port's image token
    row = {"seed": seed, "ids": ids}
    with torch.inference_mode():
        for name, m in (("fp32", model), ("bf16", model16)):
            row[name + "_logits"] = m(ids, use_cache=False).logits.float()
            gen = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=2)
            row[name + "_greedy"] = gen[0, n:].tolist()
    out["cases"].append(row)
# one lightning layer alone, bf16 vs the fp64 definition
ls = layer_spec
lc = M.MiniMaxText01Config(hidden_size=ls["hidden_size"], num_attention_heads=ls["num_attention_heads"],
                           head_dim=ls["head_dim"], hidden_act="silu")
layer = M.MiniMaxText01LightningAttention(lc, ls["layer_idx"]).eval()
x, weights = L.random_layer(ls["hidden_size"], ls["num_attention_heads"], ls["head_dim"], ls["tokens"], seed=1)
layer = layer.to(torch.bfloat16)
with torch.no_grad():
    for name, w in weights.items():
        getattr(layer, name).weight.copy_(w)
slope = M.MiniMaxText01Model._build_slope_tensor(ls["num_attention_heads"]) * (1 - ls["layer_idx"] / (ls["layers"] - 1) + 1e-5)
with torch.inference_mode():
    y16 = layer(x, slope_rate=slope)[0]
truth = L.lightning_fp64(x, weights, slope, ls["num_attention_heads"])
# decoding: the last DECODE tokens one at a time after a prefill of the rest (the recurrent state)
decode = ls["decode"]
with torch.inference_mode():
    _, _, kv = layer(x[:, :-decode], slope_rate=slope, use_cache=True)
    steps = []
    for i in range(ls["tokens"] - decode, ls["tokens"]):
        y, _, kv = layer(x[:, i:i + 1], past_key_value=kv, slope_rate=slope, use_cache=True)
        steps.append(y)
out["layer"] = {"x": x, "weights": weights, "slope": slope, "y_bf16": y16,
                "rel_error": L.relative_error(y16, truth),
                "decode_rel_error": L.relative_error(torch.cat(steps, 1), truth[:, -decode:])}
torch.save(out, os.path.join(work, "reference.pt"))
print("reference done", len(out["keys"]), "keys")
"""


def text_config() -> dict:
    """The port's tiny text config in the original's naming (MiniMaxText01Config)."""
    from pipeline.inference.families import minimax_vl_01 as fam

    cfg = dict(fam.tiny_config_dict(VOCAB, VOCAB - 1)["text_config"])
    for key in ("architectures", "model_type", "block_size"):
        cfg.pop(key, None)
    cfg["shared_intermediate_size"] = 0  # the original tests `> 0` on it
    cfg["vocab_size"] = VOCAB
    cfg["initializer_range"] = 0.3
    return cfg


def port_model(work: Path, cfg: dict, dtype):
    """The port's full model with the original's weights under `language_model.` (vision random)."""
    import torch
    from safetensors.torch import load_file

    from pipeline.inference.families import minimax_vl_01 as fam

    raw = fam.tiny_config_dict(VOCAB, VOCAB - 1)
    raw["text_config"] = {**raw["text_config"], **{k: v for k, v in cfg.items() if k != "shared_intermediate_size"}}
    folder = work / "port"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    torch.manual_seed(0)
    model = fam.MiniMaxVL01ForConditionalGeneration(fam.load_config(folder)).eval()
    weights = {}
    for f in sorted((work / "checkpoint").glob("*.safetensors")):
        weights.update(load_file(str(f)))
    ours = {k for k in model.state_dict() if k.startswith("language_model.")}
    theirs = {"language_model." + k for k in weights}
    if ours != theirs:
        raise SystemExit(f"key layouts differ: only ours {sorted(ours - theirs)[:8]}, only theirs "
                         f"{sorted(theirs - ours)[:8]}")
    missing = model.load_state_dict({"language_model." + k: v for k, v in weights.items()}, strict=False)
    assert not missing.unexpected_keys
    return model.to(dtype).eval(), len(weights)


def engine_greedy(model, ids) -> list[int]:
    """Greedy ids of `ids` (1, n) through this project's Engine, which prefills it as the engine
    prefills a page's rows: the first n - 5 tokens into a prefix cache shared with a second row
    (`ids` with other last tokens), then the last 5 from that cache, the lightning state carried
    into the block computation of the suffix; then decodes."""
    import types

    import numpy as np
    import torch

    from pipeline.inference.adapters import InputBuilder
    from pipeline.inference.engine import Engine
    from pipeline.inference.generation import GREEDY

    class TokenRows(InputBuilder):  # what the Engine reads of a builder, for prompts without an image
        family = "minimax_vl_01"

        def __init__(self) -> None:
            self.tokenizer = types.SimpleNamespace(eos_token_id=2, get_vocab=dict, decode=lambda ids, **kw: "")
            self.pad_token_id, self.image_token_id = 0, VOCAB - 1

    engine = Engine(model, TokenRows(), model_id="ref", revision=None, dtype=str(model.dtype), max_new_tokens=NEW_TOKENS,
                    batch_visual_tokens=1 << 30, max_batch_pages=4, min_new_tokens=NEW_TOKENS, generation=GREEDY)
    engine.eos_token_ids = {2}  # as the original's generate() call
    row = ids[0].numpy().astype(np.int64)
    other = row.copy()
    other[-5:] = (other[-5:] + 1) % (VOCAB - 1)
    with torch.inference_mode():
        return engine.generate([row, other], [None, None])[0].tokens


def port_layer_error(ref_layer: dict) -> tuple[float, float]:
    """The port's lightning layer on the same bf16 weights and input: (prefill, decode) relative errors."""
    from pipeline.testing.lightning import layer_errors

    ls = LAYER
    return layer_errors(ref_layer["x"], ref_layer["weights"], ls["num_attention_heads"], ls["head_dim"],
                        ls["layers"], ls["layer_idx"], ls["decode"])


def _cut(ids: list[int], eos: int = 2) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--git-dir", type=Path, default=Path("/work/.mirror/zzp1012+nanoGPT/repo"))
    ap.add_argument("--rev", default="07c618b")
    ap.add_argument("--venv", type=Path, default=Path("/tmp/ref-venv"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/minimax-ref"))
    args = ap.parse_args()

    import torch

    shutil.rmtree(args.work, ignore_errors=True)
    package = args.work / "src" / "minimax_ref"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("modeling_minimax_text_01.py", "configuration_minimax_text_01.py"):
        blob = subprocess.run(["git", "--git-dir", str(args.git_dir), "show", f"{args.rev}:{name}"],
                              check=True, capture_output=True).stdout
        (package / name).write_bytes(blob)
    cfg = text_config()
    (args.work / "text_config.json").write_text(json.dumps(cfg, indent=1))
    subprocess.run([str(args.venv / "bin" / "python"), "-c", _REF_SCRIPT, str(args.work),
                    str(Path(__file__).parent / "stubs"), str(ROOT), json.dumps(CASES), str(NEW_TOKENS),
                    json.dumps(LAYER)], check=True)
    ref = torch.load(args.work / "reference.pt", weights_only=False)

    model32, n_keys = port_model(args.work, cfg, torch.float32)
    model16, _ = port_model(args.work, cfg, torch.bfloat16)
    print(f"key layout: the original's {n_keys} language-model keys == the port's (strict)")
    print(f"{'tokens':>6} {'seed':>4} | fp32: {'logits':>9} {'greedy':>6} {'engine':>6} | bf16 max: {'vs_orig':>9} "
          f"{'ours-fp32':>9} {'orig-fp32':>9} | median: {'vs_orig':>9} {'orig-fp32':>9} {'greedy':>6} {'engine':>6}")
    failures = 0
    for row in ref["cases"]:
        ids = row["ids"]
        n = ids.shape[1]
        got = {}
        with torch.inference_mode():
            for name, m in (("fp32", model32), ("bf16", model16)):
                got[name + "_logits"] = m(input_ids=ids, use_cache=False).logits.float()
                gen = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, pad_token_id=0,
                                 eos_token_id=2)
                got[name + "_greedy"] = gen[0, n:].tolist()
                got[name + "_engine"] = engine_greedy(m, ids)
        d32 = float((got["fp32_logits"] - row["fp32_logits"]).abs().max())
        d16 = float((got["bf16_logits"] - row["bf16_logits"]).abs().max())
        ours16 = float((got["bf16_logits"] - row["fp32_logits"]).abs().max())
        orig16 = float((row["bf16_logits"] - row["fp32_logits"]).abs().max())
        g32, g16 = got["fp32_greedy"] == row["fp32_greedy"], got["bf16_greedy"] == row["bf16_greedy"]
        e32, e16 = (got[f"{p}_engine"] == _cut(row[f"{p}_greedy"]) for p in ("fp32", "bf16"))
        # bf16: a few positions differ more where the router's top-2 is a near tie (both roundings are
        # the original's own kind of error); the typical (median) difference must stay below the
        # original's own typical bf16 error, and the greedy ids must be equal
        med16 = float((got["bf16_logits"] - row["bf16_logits"]).abs().amax(-1).median())
        med_orig = float((row["bf16_logits"] - row["fp32_logits"]).abs().amax(-1).median())
        # the engine in bf16 is reported, not required: a prompt prefilled in two parts (a page's shared
        # prefix, then the task's suffix) rounds differently from one prefill, as any prefix cache does
        ok = d32 <= TOLERANCE and g32 and g16 and med16 <= med_orig and e32
        failures += not ok
        print(f"{n:>6} {row['seed']:>4} |       {d32:>9.2e} {str(g32):>6} {str(e32):>6} |           {d16:>9.2e} "
              f"{ours16:>9.2e} {orig16:>9.2e} |         {med16:>9.2e} {med_orig:>9.2e} {str(g16):>6} {str(e16):>6}"
              + ("" if ok else "  DIFFERS"), flush=True)
        if not (g32 and g16):
            print("   greedy ours", got["fp32_greedy"], got["bf16_greedy"], "orig", row["fp32_greedy"],
                  row["bf16_greedy"])
    ours_prefill, ours_decode = port_layer_error(ref["layer"])
    print(f"one lightning layer in bf16 ({LAYER['tokens']} tokens, {LAYER['num_attention_heads']} heads x "
          f"{LAYER['head_dim']}), relative error against fp64: prefill original {ref['layer']['rel_error']:.3e}, "
          f"port {ours_prefill:.3e}; decoding the last {LAYER['decode']} original "
          f"{ref['layer']['decode_rel_error']:.3e}, port {ours_decode:.3e}")
    failures += ours_prefill > 1.1 * ref["layer"]["rel_error"] or ours_decode > 1.1 * ref["layer"]["decode_rel_error"]
    print("ALL EQUAL" if not failures else f"{failures} check(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
