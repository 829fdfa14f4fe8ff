"""mono_internvl: what docpipe's vLLM engine and plugin need of the family (no vllm import here).

`ARCH` is docpipe's own architecture name, selected by docpipe's engine (config format
`docpipe`), so vLLM's in-tree `InternVLChatModel` stays what it is for everyone else. The
class (`vllm_model.DocpipeMonoInternVL`) is registered in the string form: vLLM imports it
only when it builds the model. See docs/inference.md.
"""

from __future__ import annotations

from typing import Any

ARCH = "DocpipeMonoInternVL"
MODEL_CLASS = "pipeline.inference.families.mono_internvl.vllm_model:DocpipeMonoInternVL"


def register() -> None:
    """Idempotent: the architecture in vLLM's model registry (the class carries its processor)."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, MODEL_CLASS)


def placeholder_run(builder: Any, plan: Any) -> list[int]:
    """The page's image placeholders as they sit in its prompt ids: `<img>`, the `<IMG_CONTEXT>`
    run of every tile, `</img>` (added tokens only: encoded alone they give the same ids)."""
    return list(builder.tokenizer.encode(builder.image_text(plan), add_special_tokens=False))


def page_item(builder: Any, pixels: Any, plan: Any) -> dict:
    """The vLLM image item of one page: its tiles' coded pixels (thumbnail last), the run."""
    from pipeline.inference.families.vllm_items import page_tensors

    return page_tensors(pixels.codes, pixels.table, placeholder_run(builder, plan))


def request(page: Any, key: str, builder: Any) -> dict:
    """The vLLM prompt of one (page, task): the builder's prompt ids, the page as one image item."""
    return {"prompt_token_ids": [int(t) for t in page.prompts[key]],
            "multi_modal_data": {"image": page_item(builder, page.pixels, page.plan)}}


def adapt_config(config: Any) -> Any:
    """What vLLM reads of the text config. RoPE: InternLM2's dynamic NTK scaling raises the base
    only once a sequence is longer than max_position_embeddings (32k for the 2B model), which
    vLLM's static form of it does not do; so vLLM gets plain RoPE and a max model length of
    max_position_embeddings, where plain RoPE is what the original computes."""
    text = config.llm_config
    theta = float((text.rope_parameters or {}).get("rope_theta", 10000.0))
    text.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return config


def engine_args(run_config: Any, hf_config: Any) -> dict:
    """The longest sequence vLLM takes: where plain RoPE equals the original's (see adapt_config)."""
    return {"max_model_len": int(hf_config.llm_config.max_position_embeddings)}
