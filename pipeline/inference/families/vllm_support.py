"""What the seed families' vLLM classes share: pages prepared by docpipe, as vLLM multimodal items.

Imports vllm: only the families' `vllm_model.py` modules import this (vLLM imports those
lazily, by the string form `register()` gave), never docpipe's engine.

A page reaches vLLM already prepared by the family's own input builder (the object the
transformers engine runs: plan, pixels as uint8 codes + a (3, 256) float table, the prompt
with every image placeholder expanded). Its image item is a dict of tensors (`PageItems`);
a plain PIL image is accepted too (vLLM's profiling, or a direct vLLM user) and goes
through the same builder. `PageProcessor` then

* needs no tokenizer (docpipe starts vLLM with `skip_tokenizer_init=True`: the prompt
  ids are the builder's, decoding is docpipe's);
* leaves the prompt ids as they are: the page's placeholder run is both the target and the
  replacement of its prompt update, so vLLM only locates it and marks the positions that
  take image embeddings (`image_token_id`);
* hands the model the coded pixels (4x smaller than float32 pixels across vLLM's process
  boundary) plus the family's extra fields; the model decodes them on its device with
  `gather_decode`, exactly as the transformers engine does.

A family subclasses `PageProcessingInfo` (how to load its builder, which fields its page
item has, the largest page) and uses `PageProcessor` / `PageDummyInputs` as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ModalityDataItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from pipeline.inference.adapters import gather_decode
from pipeline.inference.families.vllm_items import CODES, RUN, TABLE, page_tensors  # noqa: F401 (re-exported)


def decode_pixels(codes: torch.Tensor, table: torch.Tensor, device: Any) -> torch.Tensor:
    """(N, 3, H, W) float32 pixel values from codes (N, H, W, 3) and their table, on `device`."""
    return gather_decode(codes.to(device), table.to(device=device, dtype=torch.float32))


def items_of(value: Any) -> list[Any]:
    """A batched multimodal field as a list of per-item tensors (vLLM stacks equal shapes)."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    return list(value)


class PageItems(ModalityDataItems[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]):
    """Pages prepared by docpipe: one dict of tensors per page (see `page_tensors`)."""

    def __init__(self, data: Sequence[Mapping[str, torch.Tensor]]) -> None:
        super().__init__([dict(d) for d in data], "image")

    def get_count(self) -> int:
        return len(self.data)

    def get(self, index: int) -> dict[str, torch.Tensor]:
        return self.data[index]

    def get_processor_data(self) -> Mapping[str, object]:
        return {}

    def get_passthrough_data(self) -> Mapping[str, object]:
        return {}


class PageDataParser(MultiModalDataParser):
    """Images as vLLM parses them, plus docpipe's prepared pages (a dict, or a list of dicts)."""

    def _parse_image_data(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            return PageItems([data])
        if isinstance(data, (list, tuple)) and data and all(isinstance(d, Mapping) for d in data):
            return PageItems(data)
        return super()._parse_image_data(data)


class PageProcessingInfo(BaseProcessingInfo):
    """The family side of the processor. Subclasses set `family` and implement `page_item`
    (page image -> item, with the family builder), `extra_fields` and `largest_page`."""

    family: str = ""
    extra_fields: tuple[str, ...] = ()  # the family's item fields besides CODES, TABLE, RUN

    @functools.cached_property
    def builder(self) -> Any:
        """The family's input builder for this checkpoint (tokenizer + geometry; no weights)."""
        from pipeline.inference.registry import family_by_name

        code = family_by_name(self.family).code()
        model = self.ctx.model_config.model
        revision = self.ctx.model_config.revision
        config = code.load_config(model, revision=revision)
        return code.load_builder(model, config, revision=revision, trust_remote_code=False, tasks=(),
                                 chart_questions=())

    def image_token_id(self) -> int:
        """The token whose positions take image embeddings."""
        return int(self.builder.image_token_id)

    def page_item(self, image: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def largest_page(self) -> tuple[int, int]:
        """(width, height) of a page that gives the most image tokens (profiling)."""
        raise NotImplementedError

    def get_data_parser(self) -> MultiModalDataParser:
        return PageDataParser(expected_hidden_size=self._get_expected_hidden_size(),
                              allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": len(self.page_item(_blank(*self.largest_page()))[RUN])}


def _blank(width: int, height: int) -> Any:
    from PIL import Image

    return Image.new("RGB", (width, height), (255, 255, 255))


class PageDummyInputs(BaseDummyInputsBuilder[PageProcessingInfo]):
    """Profiling input: the largest page, its placeholder run as the whole prompt."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""  # unused: PageProcessor.get_dummy_inputs builds token ids itself

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any = None) -> dict:
        width, height = self.info.largest_page()
        return {"image": [_blank(width, height) for _ in range(mm_counts.get("image", 0))]}


class PageProcessor(BaseMultiModalProcessor[PageProcessingInfo]):
    """docpipe's prepared pages (or plain images, through the family builder) -> vLLM inputs."""

    requires_tokenizer = False

    def _page_items(self, mm_items: MultiModalDataItems) -> list[dict[str, torch.Tensor]]:
        if "image" not in mm_items:
            return []
        items = mm_items["image"]
        if isinstance(items, PageItems):
            return items.get_all()
        if isinstance(items, ImageProcessorItems):
            return [self.info.page_item(image) for image in items.get_all()]
        raise TypeError(f"{self.info.family}: image items of type {type(items).__name__} are not accepted")

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        pages = self._page_items(mm_items)
        fields = (CODES, TABLE, RUN, *self.info.extra_fields)
        missing = {f for page in pages for f in fields if f not in page}
        if missing:
            raise ValueError(f"{self.info.family}: a page item lacks {sorted(missing)}")
        return BatchFeature({f: [page[f] for page in pages] for f in fields})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        fields = (CODES, TABLE, RUN, *self.info.extra_fields)
        return {f: MultiModalFieldConfig.batched("image") for f in fields}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        token = self.info.image_token_id()
        runs = [page[RUN].tolist() for page in self._page_items(mm_items)]
        return [PromptReplacement(
            modality="image",
            target=lambda i: runs[i],  # the builder already expanded the page's placeholders:
            replacement=lambda i: PromptUpdateDetails.select_token_id(runs[i], token),  # located, kept
        )]

    def get_dummy_inputs(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any) -> ProcessorInputs:
        data = self.dummy_inputs.get_dummy_mm_data(seq_len, mm_counts, mm_options)
        items = self.info.parse_mm_data(data, validate=False)
        prompt = [int(t) for page in self._page_items(items) for t in page[RUN].tolist()]
        return ProcessorInputs(prompt=prompt, mm_data_items=items)


__all__ = [
    "CODES", "RUN", "TABLE", "PageDataParser", "PageDummyInputs", "PageItems", "PageProcessingInfo", "PageProcessor",
    "decode_pixels", "items_of", "page_tensors",
]
