"""minimax_vl_01: processing: page plan, pixels, tokenizer, chat format and prompt ids (the input builder). See the package docstring."""

from __future__ import annotations

from collections.abc import Sequence
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
    NAME,
    MiniMaxVL01Config,
    _read_json,
    parse_pinpoints,
)
from pipeline.records import TilePlan
from pipeline.tiling import MiniMaxTilePlan, plan_minimax

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


# ---------------------------------------------------------------------------------------
# page geometry: the processor's anyres rule
# ---------------------------------------------------------------------------------------


def plan_anyres(width: int, height: int, pinpoints: Sequence[Sequence[int]], tile: int = 336,
                patch: int = 14) -> MiniMaxTilePlan:
    """MiniMax-VL-01's plan for a width x height image (pixels): `pipeline.tiling.plan_minimax`,
    the one home of the anyres rule (the no-model `--tiling-policy minimax` uses it too)."""
    return plan_minimax(width, height, pinpoints=[tuple(p) for p in pinpoints], tile_size=tile, patch_size=patch)


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
