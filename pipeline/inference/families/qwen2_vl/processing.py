"""Qwen2-VL / Qwen2.5-VL: the input builder over transformers' own classes (the model loads with
`AutoModelForImageTextToText`; see pipeline.inference.registry)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.inference.adapters import (
    CodedPixels,
    InputBuilder,
    PageFeatures,
    PreparedPage,
    encoder_outputs,
    input_device,
)
from pipeline.records import TileBox, TilePlan

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image


def qwen_smart_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides multiples of `factor`, area within [min, max] pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


class Qwen2VLBuilder(InputBuilder):
    """Qwen2-VL / Qwen2.5-VL: the whole page at native resolution (within a pixel budget),
    14 px patches merged 2x2 into one token: one "tile" whose token count depends on size."""

    family = "qwen2_vl"

    def __init__(self, tokenizer: Any, image_processor: Any, model_config: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, image_processor, model_config, **kwargs)
        ip = image_processor
        self.placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.patch = int(ip.patch_size)
        self.merge = int(ip.merge_size)
        size = ip.size
        get = size.get if isinstance(size, Mapping) else (lambda k: getattr(size, k))
        self.min_pixels = int(get("shortest_edge"))
        self.max_pixels = int(get("longest_edge"))

    def plan(self, width: int, height: int) -> TilePlan:
        h, w = qwen_smart_size(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)
        tokens = (h // self.patch) * (w // self.patch) // (self.merge**2)
        return TilePlan(
            policy="qwen2_vl",
            cols=1,
            rows=1,
            tile_width=w,
            tile_height=h,
            resized_width=w,
            resized_height=h,
            boxes=(TileBox(0, 0, w, h),),
            thumbnail=False,
            thumbnail_size=None,
            tokens_per_tile=tokens,
        )

    def pixels(
        self, image: "Image.Image", plan: TilePlan, thumbnail: "Image.Image | None" = None
    ) -> tuple["np.ndarray | CodedPixels", dict[str, np.ndarray]]:
        out = self.image_processor.preprocess([image], return_tensors="np")
        grid = np.asarray(out["image_grid_thw"], dtype=np.int64)
        expected = [1, plan.resized_height // self.patch, plan.resized_width // self.patch]
        if grid.tolist() != [expected]:
            raise ValueError(f"image processor grid {grid.tolist()} differs from the plan {expected}")
        return np.asarray(out["pixel_values"], dtype=np.float32), {"image_grid_thw": grid}

    def image_text(self, plan: TilePlan) -> str:
        return self.placeholder.replace("<|image_pad|>", self.image_token * plan.visual_tokens)

    def encode_page(self, model: Any, page: PreparedPage) -> PageFeatures:
        import torch

        device = input_device(model)
        pixel_values = torch.from_numpy(page.pixel_values).to(device, model.dtype)
        grid = torch.from_numpy(page.image_inputs["image_grid_thw"]).to(device)
        out = model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid, return_dict=True)
        return PageFeatures(out.pooler_output[0], {"grid": grid})

    def feature_inputs(self, model: Any, feats: Sequence[PageFeatures], input_ids: "torch.Tensor") -> dict[str, Any]:
        import torch

        return {
            "mm_encoder_outputs": encoder_outputs(tuple(f.features for f in feats)),
            "image_grid_thw": torch.cat([f.extra["grid"] for f in feats]),
            "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32),
        }

    def prefill_positions(self, model: Any, input_ids: "torch.Tensor", inputs: Mapping[str, Any]
                          ) -> tuple["torch.Tensor", int]:
        """M-RoPE: the (temporal, height, width) positions of the image's tokens and 1-D ones for
        text, from transformers' own `get_rope_index`, behind the text positions the model reads
        for its mask (4, 1, length); text after the prefill sits at its index plus the offset."""
        import torch

        if "image_grid_thw" not in inputs:
            return super().prefill_positions(model, input_ids, inputs)
        rope, offset = model.model.get_rope_index(
            input_ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
        text = torch.arange(input_ids.shape[1], device=input_ids.device)[None, None]
        return torch.cat((text, rope.to(input_ids.device))), int(offset.reshape(-1)[0])

    def position_ids(self, text_positions: "torch.Tensor", offsets: "torch.Tensor") -> "torch.Tensor":
        """Text after the image: all three M-RoPE axes at index + offset, behind the plain text positions."""
        import torch

        shifted = text_positions + offsets[:, None].to(text_positions.device)
        return torch.stack((text_positions, shifted, shifted, shifted))

    def naive_inputs(self, prepared: PreparedPage, key: str, device: Any) -> dict[str, Any]:
        import torch

        ids = torch.from_numpy(prepared.prompts[key])[None].to(device)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.from_numpy(prepared.pixel_values).to(device),
            "image_grid_thw": torch.from_numpy(prepared.image_inputs["image_grid_thw"]).to(device),
            "mm_token_type_ids": (ids == self.image_token_id).to(torch.int32),
        }
