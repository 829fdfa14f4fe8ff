"""minicpm_v2: what docpipe's vLLM engine and plugin need of the family (no vllm import here).

`ARCH` is docpipe's own architecture name, selected by docpipe's engine (config format
`docpipe`), so vLLM's in-tree `MiniCPMV` stays what it is for everyone else. The class
(`vllm_model.DocpipeMiniCPMV2`) is registered in the string form: vLLM imports it only when
it builds the model. See /work/notes/vllm-contract.md and docs/inference.md.
"""

from __future__ import annotations

from typing import Any

ARCH = "DocpipeMiniCPMV2"
MODEL_CLASS = "pipeline.inference.families.minicpm_v2.vllm_model:DocpipeMiniCPMV2"


def register() -> None:
    """Idempotent: the architecture in vLLM's model registry (the class carries its processor)."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, MODEL_CLASS)


def placeholder_run(builder: Any, plan: Any) -> list[int]:
    """The page's image placeholders as they sit in its prompt ids: `<image>` ... up to the last
    `</image>` / `</slice>` (the newline after them belongs to the question's text piece)."""
    from pipeline.inference.families.minicpm_v2.processing import image_text

    return list(builder.tokenizer.encode(image_text(plan).removesuffix("\n"), add_special_tokens=False))


def page_item(builder: Any, pixels: Any, image_inputs: dict, plan: Any) -> dict:
    """The vLLM image item of one page: its slices' coded pixels (overview first, packed as the
    transformers engine packs them), their sizes, the placeholder run."""
    from pipeline.inference.families.vllm_items import page_tensors

    return page_tensors(pixels.codes, pixels.table, placeholder_run(builder, plan),
                        tile_sizes=image_inputs["tile_sizes"])


def request(page: Any, key: str, builder: Any) -> dict:
    """The vLLM prompt of one (page, task): the builder's prompt ids, the page as one image item."""
    return {"prompt_token_ids": [int(t) for t in page.prompts[key]],
            "multi_modal_data": {"image": page_item(builder, page.pixels, page.image_inputs, page.plan)}}


def adapt_config(config: Any) -> Any:
    """What vLLM reads of an hf_config that MiniCPMV2Config leaves implicit: rope_parameters
    (the port reads rope_theta_value) and the max model length."""
    config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta_value}
    return config
