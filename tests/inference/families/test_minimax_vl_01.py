"""MiniMax-VL-01 native port: official layout, anyres plan and token count, the LLM against
transformers' own `minimax` model, the vision tower against CLIPVisionModel, the chat
format, batched == one-at-a-time greedy, and the 8-GPU placement of the model card.

The original code is not public, so the reference statements here are written from the
model's processor rule (`get_num_token` / `get_w_h_num`) and from vLLM 0.23.0's port,
independently of the module under test (tools/equivalence/minimax_vl_01.py runs vLLM's
own helpers against the module over many more sizes)."""

from __future__ import annotations

import json
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.inference.families import minimax_vl_01 as fam
from pipeline.records import PageImage, PageKind, RenderInfo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fam.make_tiny_model(tmp_path_factory.mktemp("minimax") / "tiny", seed=0)


@pytest.fixture(scope="module")
def model(tiny: Path) -> fam.MiniMaxVL01ForConditionalGeneration:
    return fam.load_model(tiny, dtype=torch.float32)


@pytest.fixture(scope="module")
def builder(tiny: Path, model: fam.MiniMaxVL01ForConditionalGeneration) -> fam.MiniMaxVL01Builder:
    return fam.load_builder(tiny, model.config, tasks=("description", "ocr", "chart"), chart_questions=("Why?",))


# ---- reference statements (written from the processor's code, exact fractions) -------------


def ref_best(w: int, h: int, pins: list[list[int]]) -> tuple[int, int]:
    best, key = None, None
    for cw, ch in pins:
        s = min(Fraction(cw, w), Fraction(ch, h))
        eff = min(int(w * s) * int(h * s), w * h)
        k = (eff, -(cw * ch - eff))
        if key is None or k > key:
            best, key = (cw, ch), k
    return best


def ref_tokens(w: int, h: int, pins: list[list[int]], tile: int, patch: int) -> int:
    cw, ch = ref_best(w, h, pins)
    gw, gh = cw // patch, ch // patch
    if Fraction(w, h) > Fraction(gw, gh):
        new_h = h * gw // w
        w_num, h_num = gw, gh - 2 * ((gh - new_h) // 2)
    else:
        new_w = w * gh // h
        w_num, h_num = gw - 2 * ((gw - new_w) // 2), gh
    return (w_num + 1) * h_num + (tile // patch) ** 2


OFFICIAL_PINS = [[336 * c, 336 * r] for c in range(1, 7) for r in range(1, 7)]


def _sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    sizes = [(1, 1), (336, 336), (337, 335), (2016, 2016), (1700, 2200), (2200, 1700), (1920, 1080), (595, 842),
             (5000, 100), (100, 5000), (3000, 3000), (672, 336)]
    sizes += [(int(a), int(b)) for a, b in rng.integers(1, 4000, size=(n, 2))]
    return sizes


# ---- tests ------------------------------------------------------------------------------------


def test_tiny_folder_is_official_layout(tiny: Path, model: fam.MiniMaxVL01ForConditionalGeneration) -> None:
    raw = json.loads((tiny / "config.json").read_text())
    assert raw["architectures"] == ["MiniMaxVL01ForConditionalGeneration"] and raw["model_type"] == "minimax_vl_01"
    assert raw["text_config"]["model_type"] == "minimax_text_01" and "attn_type_list" in raw["text_config"]
    assert fam.recognise(raw)
    assert {p.name for p in tiny.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                 "tokenizer_config.json", "generation_config.json"}
    from safetensors import safe_open

    keys = set(safe_open(str(tiny / "model.safetensors"), "pt").keys())
    assert keys == set(model.state_dict())  # load_model already raises on missing/unexpected keys
    assert {"image_newline", "language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
            "language_model.model.norm.weight", "multi_modal_projector.linear_2.bias",
            "vision_tower.vision_model.pre_layrnorm.weight",
            "language_model.model.layers.0.self_attn.qkv_proj.weight",
            "language_model.model.layers.0.self_attn.output_gate.weight",
            "language_model.model.layers.1.self_attn.q_proj.weight",
            "language_model.model.layers.3.block_sparse_moe.gate.weight",
            "language_model.model.layers.3.block_sparse_moe.experts.2.w3.weight"} <= keys
    assert not any("post_layernorm" in k or "decay" in k or "slope" in k or "inv_freq" in k for k in keys)


def test_config_reads_legacy_text_config(tiny: Path) -> None:
    cfg = fam.load_config(tiny)
    t = cfg.text_config
    assert t.layer_types == ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    assert t.rope_parameters["partial_rotary_factor"] == 0.5 and t.rotary_dim == 4
    assert t.full_attn_alpha_factor == pytest.approx(8**0.25)
    with pytest.raises(fam.UnsupportedModelError):
        fam.text_config_from_official({**json.loads((tiny / "config.json").read_text())["text_config"],
                                       "postnorm": False})
    pins = fam.parse_pinpoints("[(336, 336), (336, 672)]")
    assert pins == [[336, 336], [336, 672]]


@pytest.mark.parametrize("seed", [0, 1])
def test_token_count_follows_processor_rule(seed: int) -> None:
    for w, h in _sizes(300, seed):
        plan = fam.plan_anyres(w, h, OFFICIAL_PINS)
        assert plan.visual_tokens == ref_tokens(w, h, OFFICIAL_PINS, 336, 14), (w, h)
        assert (plan.resized_width, plan.resized_height) == ref_best(w, h, OFFICIAL_PINS)
        assert len(plan.boxes) == plan.cols * plan.rows and plan.tiles == plan.cols * plan.rows + 1
    a4 = fam.plan_anyres(1700, 2200, OFFICIAL_PINS)
    assert (a4.cols, a4.rows, a4.visual_tokens) == (5, 6, (112 + 1) * 144 + 576)  # 1700*144//2200 = 111, padding 4 a side


def test_features_match_plan_and_pixels(model: fam.MiniMaxVL01ForConditionalGeneration,
                                        builder: fam.MiniMaxVL01Builder) -> None:
    rng = np.random.default_rng(0)
    for w, h in [(200, 150), (150, 400), (57, 300), (400, 60), (56, 56)]:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        plan = builder.plan(w, h)
        pixels, _ = builder.pixels(image, plan)
        values = pixels.decode()
        assert values.shape == (plan.tiles, 3, 56, 56)
        # thumbnail first: the page stretched to 56x56 (bicubic), CLIP-normalised via ToTensor + Normalize
        thumb = torch.from_numpy(np.array(image.resize((56, 56), Image.Resampling.BICUBIC))).permute(2, 0, 1)
        expect = (thumb.float() / 255 - torch.tensor(fam.CLIP_MEAN)[:, None, None]) / torch.tensor(fam.CLIP_STD)[:, None, None]
        assert torch.equal(torch.from_numpy(values[0]), expect)
        with torch.no_grad():
            feats = model.encode_page(torch.from_numpy(values), plan)
        assert feats.shape == (plan.visual_tokens, 32)
        # the last feature of each unpadded row is image_newline
        row = plan.w_num + 1
        newline_rows = feats[plan.base_tokens + row - 1 :: row]
        assert newline_rows.shape[0] == plan.h_num
        assert torch.equal(newline_rows, model.image_newline.expand_as(newline_rows))


def test_vision_tower_is_clip(model: fam.MiniMaxVL01ForConditionalGeneration) -> None:
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel(model.config.vision_config).eval()
    state = {k.removeprefix("vision_tower.vision_model."): v for k, v in model.state_dict().items()
             if k.startswith("vision_tower.")}
    missing, unexpected = clip.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= {"post_layernorm.weight", "post_layernorm.bias"}
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        ours = model.vision_tower(x, -1)
        theirs = clip(x).last_hidden_state  # last layer, before the (unused) post layernorm
        proj = model.tile_features(x)
    assert torch.equal(ours, theirs)
    assert torch.allclose(proj, model.multi_modal_projector.linear_2(
        torch.nn.functional.gelu(model.multi_modal_projector.linear_1(theirs[:, 1:]))), atol=0, rtol=0)


def _native_copy(model: fam.MiniMaxVL01ForConditionalGeneration, full_rotary: bool):
    """transformers' MiniMaxForCausalLM with the same weights (experts stacked as it keeps them)."""
    from transformers import MiniMaxForCausalLM

    cfg = model.config.text_config.__class__.from_dict(model.config.text_config.to_dict())
    if full_rotary:
        cfg.rope_parameters = {**cfg.rope_parameters, "partial_rotary_factor": 1.0}
    cfg._attn_implementation = "eager"
    native = MiniMaxForCausalLM(cfg).eval()
    ours = {k.removeprefix("language_model."): v for k, v in model.state_dict().items() if k.startswith("language_model.")}
    state = {}
    for k, v in ours.items():
        if ".block_sparse_moe.experts." in k:
            continue
        state[k.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = v
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        n = cfg.num_local_experts
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([ours[f"{p}.{e}.w1.weight"], ours[f"{p}.{e}.w3.weight"]]) for e in range(n)])
        state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([ours[f"{p}.{e}.w2.weight"] for e in range(n)])
    missing, unexpected = native.load_state_dict(state, strict=False)
    assert unexpected == [] and all(("decay" in m or "slope" in m) for m in missing)
    return native


def test_llm_equals_transformers_minimax(model: fam.MiniMaxVL01ForConditionalGeneration) -> None:
    """With full-width RoPE our LLM is transformers' MiniMax (same weights -> same logits);
    with MiniMax-Text-01's partial RoPE it differs from it (the native class rotates all
    channels), and only in the softmax-attention layers."""
    native = _native_copy(model, full_rotary=True)
    ids = torch.randint(0, model.config.text_config.vocab_size, (2, 37))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ours_cfg = model.config.text_config
    saved = ours_cfg.rope_parameters
    try:
        ours_cfg.rope_parameters = {**saved, "partial_rotary_factor": 1.0}
        full = fam.MiniMaxVL01TextModel(ours_cfg)
        full.load_state_dict({k.removeprefix("language_model.model."): v for k, v in model.state_dict().items()
                              if k.startswith("language_model.model.")}, strict=False)
        full.config._attn_implementation = "eager"
        full.eval()
        with torch.no_grad():
            hidden = full(input_ids=ids, attention_mask=mask).last_hidden_state
            ours = model.language_model.lm_head(hidden)
            theirs = native(input_ids=ids, attention_mask=mask).logits
    finally:
        ours_cfg.rope_parameters = saved
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, theirs.abs().max().item())
    with torch.no_grad():
        partial = model(input_ids=ids, attention_mask=mask).logits
    assert (partial - theirs).abs().max().item() > 1e-3  # the partial rotary is really applied


def test_partial_rotary_leaves_tail_channels(model: fam.MiniMaxVL01ForConditionalGeneration) -> None:
    emb = model.language_model.model.rotary_emb
    cfg = model.config.text_config
    assert emb.inv_freq.shape == (cfg.rotary_dim // 2,)
    expect = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, cfg.rotary_dim, 2).float() / cfg.rotary_dim))
    assert torch.allclose(emb.inv_freq, expect)


def test_prompt_format(builder: fam.MiniMaxVL01Builder, tiny: Path) -> None:
    plan = builder.plan(200, 150)
    text = builder.chat_text("Describe it.", plan)
    n = plan.visual_tokens
    assert text == ("<beginning_of_sentence>system ai_setting=assistant\n" + fam.DEFAULT_SYSTEM + "<end_of_sentence>\n"
                    "<beginning_of_sentence>user name=user\n" + "<image>" * n + "Describe it.<end_of_sentence>\n"
                    "<beginning_of_sentence>ai name=assistant\n")
    messages = [{"role": "system", "content": [{"type": "text", "text": fam.DEFAULT_SYSTEM}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    templ = builder.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert templ.replace("<image>", "<image>" * n) == text
    ids = builder.encode_text(text)
    tok = builder.tokenizer
    assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == n
    assert ids[0] == tok.convert_tokens_to_ids("<beginning_of_sentence>")  # no extra BOS
    assert tok.eos_token == "<end_of_sentence>"


def _page(w: int, h: int, seed: int) -> PageImage:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return PageImage("d", "mem://d", 1, image, RenderInfo(w, h, None), PageKind.IMAGE)


def test_batched_left_padded_equals_one_at_a_time(model: fam.MiniMaxVL01ForConditionalGeneration,
                                                  builder: fam.MiniMaxVL01Builder) -> None:
    from transformers import GenerationConfig

    pages = [_page(112, 84, 1), _page(60, 130, 2)]
    prepared = [builder.build(p, builder.plan(p.image.width, p.image.height)) for p in pages]
    restored = pickle.loads(pickle.dumps(prepared[0]))
    assert restored.plan == prepared[0].plan and restored.plan.visual_tokens == prepared[0].plan.visual_tokens
    pickle.loads(pickle.dumps(builder))
    eos = builder.tokenizer.convert_tokens_to_ids("<end_of_sentence>")
    gen = GenerationConfig(max_new_tokens=6, do_sample=False, num_beams=1, eos_token_id=[eos],
                           pad_token_id=builder.pad_token_id)
    with torch.no_grad():
        feats = [builder.encode_page(model, p) for p in prepared]
        rows = [(prepared[0].prompts["description"], feats[0]), (prepared[1].prompts["ocr"], feats[1]),
                (prepared[0].prompts["chart:0"], feats[0])]
        assert len({len(r[0]) for r in rows}) == 3
        inputs = builder.rows_to_inputs(model, rows)
        width = inputs["input_ids"].shape[1]
        batched = model.generate(**inputs, generation_config=gen)[:, width:].tolist()
        singles = []
        for row in rows:
            one = builder.rows_to_inputs(model, [row])
            singles.append(model.generate(**one, generation_config=gen)[0, one["input_ids"].shape[1]:].tolist())
        one = builder.rows_to_inputs(model, [rows[1]])
        uncached = model.generate(**one, generation_config=gen, use_cache=False)[0, one["input_ids"].shape[1]:].tolist()
        naive = builder.naive_inputs(prepared[0], "description", "cpu")
        plain = model.generate(**naive, generation_config=gen)[0, naive["input_ids"].shape[1]:].tolist()

    def cut(ids: list[int]) -> list[int]:
        return ids[: ids.index(eos)] if eos in ids else ids

    assert [cut(b) for b in batched] == [cut(s) for s in singles]
    assert cut(plain) == cut(singles[0])
    assert cut(uncached) == cut(singles[1])  # the lightning/KV cache gives what full recomputation gives
    assert len({tuple(cut(s)) for s in singles}) > 1  # varied outputs make the comparison meaningful


def test_placement_follows_model_card(tiny: Path) -> None:
    raw = json.loads((tiny / "config.json").read_text())
    raw["text_config"].update(num_hidden_layers=80, attn_type_list=[int((i + 1) % 8 == 0) for i in range(80)])
    cfg = fam.MiniMaxVL01Config(**{k: v for k, v in raw.items() if k != "auto_map"})
    for n in (8, 2):
        m = fam.placement(cfg, n)
        per = 80 // n
        assert all(m[f"language_model.model.layers.{i}"] == i // per for i in range(80))
        for key in ("vision_tower", "multi_modal_projector", "image_newline", "language_model.model.embed_tokens"):
            assert m[key] == 0
        assert m["language_model.model.norm"] == n - 1 and m["language_model.lm_head"] == n - 1
    meta = fam.meta_model(fam.load_config(tiny))
    m = fam.placement(meta, 3)
    names = {n for n, _ in meta.named_parameters()} | {n for n, _ in meta.named_buffers()}
    assert all(any(n == k or n.startswith(k + ".") for k in m) for n in names)  # every tensor has a GPU
    assert [m[f"language_model.model.layers.{i}"] for i in range(4)] == [0, 0, 1, 2]


def test_engine_batched_equals_naive(model: fam.MiniMaxVL01ForConditionalGeneration,
                                     builder: fam.MiniMaxVL01Builder) -> None:
    from pipeline.inference.engine import Engine

    engine = Engine(model, builder, model_id="tiny", revision=None, dtype="float32", max_new_tokens=4,
                    batch_visual_tokens=10_000, max_batch_pages=4)
    assert builder.tokenizer.convert_tokens_to_ids("<end_of_sentence>") in engine.eos_token_ids
    pages = [builder.build(p, builder.plan(p.image.width, p.image.height)) for p in (_page(90, 70, 3), _page(70, 150, 4))]
    from bench.support.static_engine import StaticEngine

    batched, naive = engine.answer(pages), StaticEngine.like(engine).answer_naive(pages)
    assert [a.error for a in batched] == [None, None]
    keys = ("description", "ocr_text", "chart_check_answer", "generated_tokens")
    assert [[getattr(a, k) for k in keys] for a in batched] == [[getattr(a, k) for k in keys] for a in naive]


# ---------------------------------------------------------------------------------------
# bf16: lightning attention as precise as the original (fp32 slopes, decays, state)
# ---------------------------------------------------------------------------------------

# The ORIGINAL MiniMax-Text-01 lightning layer's own relative error in bf16 against the fp64 definition,
# on exactly this input and these weights (pipeline.testing.lightning.random_layer(128, 8, 16, 700, seed=1),
# layer 1 of 4), measured by `python tools/equivalence/minimax_vl_01_original.py` (the original remote code
# run in the reference venv): prefill of 700 tokens, and decoding the last 16 one at a time.
ORIGINAL_PREFILL_ERROR = 4.346e-3
ORIGINAL_DECODE_ERROR = 4.511e-3


def test_lightning_layer_in_bf16_is_within_the_originals_own_error() -> None:
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    from pipeline.testing.lightning import layer_errors, random_layer

    x, weights = random_layer(128, 8, 16, 700, seed=1)
    prefill, decode = layer_errors(x, weights, 8, 16, 4, 1, 16)
    assert prefill <= 1.02 * ORIGINAL_PREFILL_ERROR and decode <= 1.02 * ORIGINAL_DECODE_ERROR, (prefill, decode)
    # what it replaced: transformers' native class keeps the decays and the state in bf16
    native_prefill, native_decode = layer_errors(x, weights, 8, 16, 4, 1, 16, layer_class=MiniMaxLightningAttention)
    assert native_prefill > 1.02 * ORIGINAL_PREFILL_ERROR and native_decode > 2 * ORIGINAL_DECODE_ERROR


def test_lightning_layer_in_fp32_equals_its_definition() -> None:
    from pipeline.testing.lightning import layer_errors, random_layer

    x, weights = random_layer(64, 4, 16, 300, seed=2)
    prefill, decode = layer_errors(x.float(), {k: v.float() for k, v in weights.items()}, 4, 16, 4, 2, 8)
    assert prefill < 1e-5 and decode < 1e-5


def test_rope_and_decays_stay_float32_in_a_bf16_model(tiny) -> None:
    from pipeline.inference.families.minimax_vl_01 import MiniMaxVL01LightningAttention, alibi_slopes

    model = fam.load_model(tiny, dtype=torch.bfloat16)
    lm = model.language_model.model
    cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), torch.arange(5)[None])
    assert cos.dtype == sin.dtype == torch.float32
    layer = next(m for m in model.modules() if isinstance(m, MiniMaxVL01LightningAttention))
    assert layer.slope_rate("cpu").dtype == torch.float32 and not list(layer.buffers())
    # the original's slopes, also for a head count that is not a power of two
    assert torch.allclose(alibi_slopes(8).flatten(), torch.tensor([2.0 ** (-(i + 1)) for i in range(8)]))
    assert alibi_slopes(6).flatten().tolist()[:4] == alibi_slopes(4).flatten().tolist()


# ---------------------------------------------------------------------------------------
# the released checkpoint's key set (its index is not reachable here: a public statement of it)
# ---------------------------------------------------------------------------------------

# huggingface/transformers' tests/models/minimax_vl_01/test_conversion_minimax_vl_01.py (commit 8029eef)
# states the exact key manifest of MiniMaxAI/MiniMax-VL-01's model.safetensors.index.json: 8,637 keys,
# sha256 of the sorted keys joined by newlines below. The rules it gives are rebuilt here independently;
# equal digests mean the same set.
RELEASED_KEYS_SHA256 = "d0caf1b714cdfc4caa65b56cbec591668d77b0e2a5d6cf3b5af169531311c886"


def _released_keys() -> set[str]:
    keys = {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
            "language_model.lm_head.weight", "image_newline",
            *(f"vision_tower.vision_model.embeddings.{k}" for k in
              ("class_embedding", "patch_embedding.weight", "position_embedding.weight")),
            *(f"vision_tower.vision_model.pre_layrnorm.{w}" for w in ("weight", "bias")),
            *(f"multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias"))}
    for n in range(80):
        p = f"language_model.model.layers.{n}"
        keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                 f"{p}.block_sparse_moe.gate.weight"}
        softmax = (n + 1) % 8 == 0
        keys |= {f"{p}.self_attn.{m}.weight" for m in
                 (("q_proj", "k_proj", "v_proj", "o_proj") if softmax else ("qkv_proj", "output_gate", "norm", "out_proj"))}
        keys |= {f"{p}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(32) for w in ("w1", "w2", "w3")}
    for n in range(24):
        p = f"vision_tower.vision_model.encoder.layers.{n}"
        keys |= {f"{p}.{m}.{w}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
                 for w in ("weight", "bias")}
    return keys


def test_full_size_keys_are_the_released_checkpoints(tmp_path: Path) -> None:
    import hashlib

    from tests.inference.test_devices import official_minimax_vl_01_config

    released = _released_keys()
    assert len(released) == 8_637
    assert hashlib.sha256("\n".join(sorted(released)).encode()).hexdigest() == RELEASED_KEYS_SHA256
    (tmp_path / "config.json").write_text(json.dumps(official_minimax_vl_01_config()))
    meta = fam.meta_model(fam.load_config(tmp_path))
    ours = {k for k in meta.state_dict() if not k.endswith("position_ids")}  # CLIP's non-persistent buffer
    assert ours == released  # no post_layernorm: CLIP's last norm is not in the checkpoint


def test_one_bos_whether_or_not_the_tokenizer_adds_one(builder: fam.MiniMaxVL01Builder) -> None:
    """The real tokenizer.json is not public: with or without a BOS-adding post-processor, the prompt starts
    with the chat format's one <beginning_of_sentence>."""
    import copy

    from tokenizers import processors

    text = builder.chat_text("Describe it.", builder.plan(200, 150))
    plain = builder.encode_text(text)
    bos = builder.tokenizer.convert_tokens_to_ids("<beginning_of_sentence>")
    adding = copy.deepcopy(builder)
    adding.tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<beginning_of_sentence> $A", special_tokens=[("<beginning_of_sentence>", bos)])
    assert adding.tokenizer(text)["input_ids"][:2] == [bos, bos]  # what a plain call would give
    assert adding.encode_text(text).tolist() == plain.tolist()
    assert plain[0] == bos and plain[1] != bos
