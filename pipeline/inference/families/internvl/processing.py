"""InternVL (the -hf checkpoints: InternVL2.5 / InternVL3): the input builder over transformers' own classes (the model loads with
`AutoModelForImageTextToText`; see pipeline.inference.registry)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import tiling
from pipeline.inference.adapters import (
    CodedPixels,
    InputBuilder,
    PageFeatures,
    PreparedPage,
    encoder_outputs,
    input_device,
    normalise_tiles,
)
from pipeline.records import TilePlan

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image


class InternVLBuilder(InputBuilder):
    """InternVL: 448 px tiles on the grid closest to the page's aspect + a thumbnail.

    Tiles come from `pipeline.tiling` (the same policy as transformers'
    GotOcr2ImageProcessor with crop_to_patches); the prompt expands the chat template's
    `<IMG_CONTEXT>` into `<img>` + `<IMG_CONTEXT>` x tokens x tiles + `</img>`.
    """

    family = "internvl"
    stretches_to_canvas = True  # the page is resized to the grid's canvas, aspect ratio or not

    def __init__(self, tokenizer: Any, image_processor: Any, model_config: Any, *, min_tiles: int | None = None,
                 max_tiles: int | None = None, **kwargs: Any) -> None:
        super().__init__(tokenizer, image_processor, model_config, **kwargs)
        ip = image_processor
        self.placeholder = getattr(tokenizer, "context_image_token", None) or "<IMG_CONTEXT>"
        self.start_token = getattr(tokenizer, "start_image_token", None) or "<img>"
        self.end_token = getattr(tokenizer, "end_image_token", None) or "</img>"
        size = ip.size
        self.tile_size = int(size["height"] if isinstance(size, Mapping) else size.height)
        self.min_tiles = int(min_tiles if min_tiles is not None else getattr(ip, "min_patches", 1))
        self.max_tiles = int(max_tiles if max_tiles is not None else getattr(ip, "max_patches", 12))
        self.tokens_per_tile = int(model_config.image_seq_length)
        self.mean = tuple(float(v) for v in ip.image_mean)
        self.std = tuple(float(v) for v in ip.image_std)
        self.scale = float(ip.rescale_factor)
        self.resample = int(getattr(ip, "resample", 3))  # PIL numbering; 3 = bicubic

    def plan(self, width: int, height: int) -> TilePlan:

        return tiling.plan_internvl(
            width,
            height,
            min_num=self.min_tiles,
            max_num=self.max_tiles,
            image_size=self.tile_size,
            use_thumbnail=True,
            tokens_per_tile=self.tokens_per_tile,
        )

    def pixels(
        self, image: "Image.Image", plan: TilePlan, thumbnail: "Image.Image | None" = None
    ) -> tuple["np.ndarray | CodedPixels", dict[str, np.ndarray]]:
        from PIL import Image


        # A thumbnail the rasterizer rendered directly (PDF pages) replaces the bicubic one.
        tiles = tiling.cut_tiles(image, plan, Image.Resampling(self.resample), thumbnail=thumbnail)
        return normalise_tiles(tiles, self.mean, self.std, self.scale), {}

    def image_text(self, plan: TilePlan) -> str:
        return self.start_token + self.placeholder * (self.tokens_per_tile * plan.tiles) + self.end_token

    def encode_page(self, model: Any, page: PreparedPage) -> PageFeatures:

        pixel_values = page.pixel_tensor(input_device(model), model.dtype)
        return PageFeatures(model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output)

    def feature_inputs(self, model: Any, feats: Sequence[PageFeatures], input_ids: "torch.Tensor") -> dict[str, Any]:
        import torch

        return {"mm_encoder_outputs": encoder_outputs(torch.cat([f.features for f in feats]))}

    def naive_inputs(self, prepared: PreparedPage, key: str, device: Any) -> dict[str, Any]:
        import torch

        ids = torch.from_numpy(prepared.prompts[key])[None].to(device)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": prepared.pixel_tensor(device),
        }
