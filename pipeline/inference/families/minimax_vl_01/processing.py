"""minimax_vl_01: processing: page plan, pixels, tokenizer, chat format and prompt ids (the input builder). See the package docstring."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.inference.adapters import CodedPixels, InputBuilder, PageFeatures, PreparedPage, input_device
from pipeline.inference.families.minimax_vl_01.configuration import (
    BOS,
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_SYSTEM,
    EOS,
    IMAGE_TOKEN,
    MiniMaxVL01Config,
    NAME,
    _read_json,
    parse_pinpoints,
)
from pipeline.records import TileBox, TilePlan

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


# ---------------------------------------------------------------------------------------
# page geometry: the processor's anyres rule
# ---------------------------------------------------------------------------------------


def best_canvas(width: int, height: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (width, height) pinpoint the processor picks: the largest effective resolution
    (the image scaled to fit, never above its own pixels), then the least wasted area;
    the first in list order on a full tie."""
    best, best_effective, best_wasted = None, -1, math.inf
    for cw, ch in pinpoints:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cw * ch - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cw), int(ch)), effective, wasted
    if best is None:
        raise ValueError("no pinpoints")
    return best


def unpadded_grid(width: int, height: int, grid_w: int, grid_h: int) -> tuple[int, int]:
    """(w_num, h_num): the part of a grid_w x grid_h feature grid that holds the page, the
    centred padding bands removed (integer arithmetic, as the processor counts it)."""
    if width * grid_h > height * grid_w:  # wider than the canvas: bands above and below
        content = height * grid_w // width
        return grid_w, grid_h - 2 * ((grid_h - content) // 2)
    content = width * grid_h // height
    return grid_w - 2 * ((grid_w - content) // 2), grid_h


def keep_ratio_size(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): the page resized into the canvas keeping its aspect
    ratio, pasted centred (the processor's keepratio_resize)."""
    if width * canvas_h > height * canvas_w:
        new_h = int(canvas_w * height / width)
        return canvas_w, new_h, 0, (canvas_h - new_h) // 2
    new_w = int(canvas_h * width / height)
    return new_w, canvas_h, (canvas_w - new_w) // 2, 0


@dataclass(frozen=True, slots=True)
class MiniMaxTilePlan(TilePlan):
    """A TilePlan with the anyres facts the token count needs.

    The page is resized to (content_width, content_height), pasted at (left, top) on a
    black resized_width x resized_height canvas and cut into `boxes`; the thumbnail is
    the whole page stretched to thumbnail_size. Image tokens are not tiles x tokens:
    the thumbnail's grid_side^2, then (w_num + 1) * h_num for the unpadded tile grid.
    """

    image_width: int = 0
    image_height: int = 0
    content_width: int = 0
    content_height: int = 0
    left: int = 0
    top: int = 0
    w_num: int = 0
    h_num: int = 0
    base_tokens: int = 0

    @property
    def visual_tokens(self) -> int:
        return (self.w_num + 1) * self.h_num + self.base_tokens


def plan_anyres(width: int, height: int, pinpoints: Sequence[Sequence[int]], tile: int = 336,
                patch: int = 14) -> MiniMaxTilePlan:
    """MiniMax-VL-01's plan for a width x height image (pixels)."""
    if width < 1 or height < 1:
        raise ValueError(f"page size must be positive whole pixels, got {width!r} x {height!r}")
    cw, ch = best_canvas(width, height, pinpoints)
    cols, rows = cw // tile, ch // tile
    side = tile // patch
    w_num, h_num = unpadded_grid(width, height, cw // patch, ch // patch)
    new_w, new_h, left, top = keep_ratio_size(width, height, cw, ch)
    boxes = tuple(TileBox(c * tile, r * tile, (c + 1) * tile, (r + 1) * tile) for r in range(rows) for c in range(cols))
    return MiniMaxTilePlan(
        policy="minimax", cols=cols, rows=rows, tile_width=tile, tile_height=tile, resized_width=cw,
        resized_height=ch, boxes=boxes, thumbnail=True, thumbnail_size=(tile, tile), tokens_per_tile=side * side,
        image_width=width, image_height=height, content_width=new_w, content_height=new_h, left=left, top=top,
        w_num=w_num, h_num=h_num, base_tokens=side * side,
    )


def cut_page(image: "Image.Image", plan: MiniMaxTilePlan, thumbnail: "Image.Image | None" = None) -> list["Image.Image"]:
    """[thumbnail, tile 0, tile 1, ...] as the processor makes them (bicubic, black padding)."""
    from PIL import Image

    bicubic = Image.Resampling.BICUBIC
    image = image if image.mode == "RGB" else image.convert("RGB")
    thumb_size = plan.thumbnail_size or (plan.tile_width, plan.tile_height)
    if thumbnail is not None and thumbnail.size == thumb_size:
        thumb = thumbnail if thumbnail.mode == "RGB" else thumbnail.convert("RGB")
    else:
        thumb = image.resize(thumb_size, bicubic)
    canvas = Image.new("RGB", (plan.resized_width, plan.resized_height), (0, 0, 0))
    canvas.paste(image.resize((plan.content_width, plan.content_height), bicubic), (plan.left, plan.top))
    return [thumb] + [canvas.crop(box.as_tuple()) for box in plan.boxes]


def pixel_table(mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """(3, 256) float32: torchvision's ToTensor (x / 255 in float32) then Normalize."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((levels[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------------------
# input builder
# ---------------------------------------------------------------------------------------


# The official tokenizer_config.json's chat template, reduced to system/user/assistant turns
# (the official one adds function-call roles); `chat_text` builds the same string directly.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<beginning_of_sentence>system ai_setting=assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}"
    "{% else %}{{ '<beginning_of_sentence>user name=user\\n' }}{% endif %}"
    "{% for item in message['content'] %}{% if item.type == 'image' %}<image>"
    "{% elif item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}"
    "{{ '<end_of_sentence>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}{% endif %}"
)


def chat_text(question: str, image_tokens: int, system: str | None = DEFAULT_SYSTEM) -> str:
    """The prompt MiniMax-VL-01's chat template gives for [system], user [image, question],
    with the generation prompt, `<image>` expanded as the processor does."""
    text = f"{BOS}system ai_setting=assistant\n{system}{EOS}\n" if system is not None else ""
    text += f"{BOS}user name=user\n{IMAGE_TOKEN * image_tokens}{question}{EOS}\n"
    return text + f"{BOS}ai name=assistant\n"


class MiniMaxVL01Builder(InputBuilder):
    """MiniMax-VL-01 pages: anyres tiles (thumbnail first) and the model's chat format."""

    family = NAME
    placeholder = IMAGE_TOKEN

    def __init__(self, tokenizer: Any, model_config: MiniMaxVL01Config, *, tasks: Sequence[str],
                 chart_questions: Sequence[str] = (), pinpoints: Sequence[Sequence[int]] | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 system: str | None = DEFAULT_SYSTEM) -> None:
        super().__init__(tokenizer, None, model_config, tasks=tasks, chart_questions=chart_questions,
                         chat_template=getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE)
        self.pinpoints = [list(p) for p in (pinpoints or model_config.image_grid_pinpoints)]
        self.tile = int(model_config.tile_size)
        self.patch = int(model_config.vision_config.patch_size)
        self.table = pixel_table(mean, std)
        self.system = system

    def plan(self, width: int, height: int) -> MiniMaxTilePlan:
        return plan_anyres(width, height, self.pinpoints, self.tile, self.patch)

    def pixels(self, image: "Image.Image", plan: TilePlan, thumbnail: "Image.Image | None" = None
               ) -> tuple[CodedPixels, dict[str, np.ndarray]]:
        if not isinstance(plan, MiniMaxTilePlan):
            raise TypeError("MiniMax-VL-01 needs the plan of its own builder")
        tiles = cut_page(image, plan, thumbnail)
        codes = np.stack([np.asarray(t) for t in tiles])
        return CodedPixels(codes=np.ascontiguousarray(codes), table=self.table), {}

    def image_text(self, plan: TilePlan) -> str:
        return IMAGE_TOKEN * plan.visual_tokens

    def chat_text(self, prompt: str, plan: TilePlan) -> str:
        return chat_text(prompt, plan.visual_tokens, self.system)

    def encode_text(self, text: str) -> np.ndarray:
        """The chat text's ids, without the tokenizer's own special tokens: the chat format writes
        every turn's `<beginning_of_sentence>` itself, so the prompt starts with exactly one,
        whether or not the checkpoint's tokenizer.json would add a BOS of its own (the real one is
        not public here; a tokenizer that adds one would otherwise give two)."""
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def encode_page(self, model: Any, page: PreparedPage) -> PageFeatures:
        pixels = page.pixel_tensor(input_device(model))
        return PageFeatures(model.encode_page(pixels, page.plan))

    def feature_inputs(self, model: Any, feats: Sequence[PageFeatures], input_ids: "torch.Tensor") -> dict[str, Any]:
        return {"image_features": torch.cat([f.features for f in feats])}

    def naive_inputs(self, prepared: PreparedPage, key: str, device: Any) -> dict[str, Any]:
        """Inputs for a plain `generate` with raw pixel values, as the model card does."""
        ids = torch.from_numpy(prepared.prompts[key])[None].to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": prepared.pixel_tensor(device), "image_plans": [prepared.plan]}


def load_tokenizer(folder: str | Path) -> Any:
    """The checkpoint's tokenizer.json (a fast byte-level BPE) with its special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def load_builder(folder: str | Path, model_config: MiniMaxVL01Config, *, tasks: Sequence[str],
                 chart_questions: Sequence[str], **tiling_overrides: Any) -> MiniMaxVL01Builder:
    """The input builder (tokenizer + page geometry + chat format; no weights).

    The pinpoints and CLIP mean/std come from preprocessor_config.json when it has them
    (the processor's own copy), else from config.json. MiniMax-VL-01 has no tile-count
    knobs: min_tiles/max_tiles overrides are refused.
    """
    extra = {k: v for k, v in tiling_overrides.items() if v is not None}
    if extra:
        raise ValueError(f"MiniMax-VL-01's anyres grid takes no overrides, got {sorted(extra)}")
    folder = Path(folder)
    pre = _read_json(folder / "preprocessor_config.json")
    pinpoints = parse_pinpoints(pre["image_grid_pinpoints"]) if pre.get("image_grid_pinpoints") else None
    return MiniMaxVL01Builder(
        load_tokenizer(folder), model_config, tasks=tasks, chart_questions=chart_questions, pinpoints=pinpoints,
        mean=tuple(pre.get("image_mean") or CLIP_MEAN), std=tuple(pre.get("image_std") or CLIP_STD),
    )
