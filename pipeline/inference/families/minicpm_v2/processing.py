"""minicpm_v2: processing: page plan, pixels, tokenizer, chat format and prompt ids (the input builder). See the package docstring."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.inference.adapters import (
    CHART,
    DESCRIPTION,
    OCR,
    CodedPixels,
    InputBuilder,
    PageFeatures,
    PreparedPage,
    input_device,
)
from pipeline.inference.families.minicpm_v2.configuration import (
    ASSISTANT_TAG,
    GENERATION_DEFAULTS,
    IMAGE_END,
    IMAGE_PLACEHOLDER,
    IMAGE_START,
    NAME,
    SLICE_END,
    SLICE_START,
    SPIECE_UNDERLINE,
    USER_TAG,
    MiniCPMV2Config,
    load_config,
)
from pipeline.records import TilePlan

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


# ---------------------------------------------------------------------------------------
# tokenizer: the original slow sentencepiece rule
# ---------------------------------------------------------------------------------------

_DEFAULT_ADDED = {0: "<unk>", 1: "<s>", 2: "</s>", 101: "<image>", 102: "</image>", 103: "<ref>", 104: "</ref>",
                  105: "<box>", 106: "</box>", 107: "<quad>", 108: "</quad>", 109: "<point>", 110: "</point>",
                  111: "<slice>", 112: "</slice>"}


def _content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, Mapping) else value


class SentencePieceTokenizer:
    """The checkpoint's tokenizer.model, giving the ids of the original slow (legacy) tokenizer.

    That tokenizer cuts the text at its added tokens (`<unk>`, `<s>`, `</s>`, `<image>`,
    ..., `</slice>`: never split, never stripped) and hands every piece in between to
    sentencepiece on its own, so each piece gets sentencepiece's dummy-prefix space (the
    `<用户>` at the start becomes "▁", "<用户>"). A fast tokenizer converted from the same
    model differs exactly there. Decoding follows the slow tokenizer too. Picklable.
    """

    padding_side = "left"
    chat_template = None

    def __init__(self, model_proto: bytes, added_tokens: Mapping[int, str], *, bos_token: str = "<s>",
                 eos_token: str = "</s>", unk_token: str = "<unk>", pad_token: str | None = "<unk>",
                 special_tokens: Sequence[str] = (), add_bos_token: bool = True) -> None:
        self.model_proto = bytes(model_proto)
        self.added_tokens = {int(k): str(v) for k, v in added_tokens.items()}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.add_bos_token = add_bos_token
        self.special_tokens = frozenset(t for t in (bos_token, eos_token, unk_token, pad_token, *special_tokens) if t)
        self._setup()

    def _setup(self) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.model_proto)
        self._added_ids = {text: i for i, text in self.added_tokens.items()}
        for text in self.special_tokens:
            self._added_ids.setdefault(text, self._sp.piece_to_id(text))
        ordered = sorted(self._added_ids, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")")
        self.special_ids = frozenset(self._added_ids[t] for t in self.special_tokens)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    @classmethod
    def from_folder(cls, folder: str | Path) -> SentencePieceTokenizer:
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if config.get("legacy") is False:
            raise NotImplementedError("MiniCPM-V 2.0 port: only the legacy sentencepiece rule (legacy=true) is ported")
        added = {int(i): _content(v) for i, v in (config.get("added_tokens_decoder") or {}).items()} or _DEFAULT_ADDED
        extra = [_content(t) for t in config.get("additional_special_tokens") or ()]
        return cls(
            (folder / "tokenizer.model").read_bytes(),
            added,
            bos_token=_content(config.get("bos_token", "<s>")),
            eos_token=_content(config.get("eos_token", "</s>")),
            unk_token=_content(config.get("unk_token", "<unk>")),
            pad_token=_content(config.get("pad_token", "<unk>")),
            special_tokens=[t for t in extra if t],
            add_bos_token=bool(config.get("add_bos_token", True)),
        )

    # ---- ids -------------------------------------------------------------------------------
    def token_id(self, token: str) -> int:
        return self._added_ids[token] if token in self._added_ids else self._sp.piece_to_id(token)

    @property
    def bos_token_id(self) -> int:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def unk_token_id(self) -> int:
        return self.token_id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_id(self.pad_token)

    def __len__(self) -> int:
        return max(self._sp.get_piece_size(), max(self.added_tokens, default=-1) + 1)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        vocab.update(self._added_ids)
        return vocab

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        return self.token_id(tokens) if isinstance(tokens, str) else [self.token_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        def one(i: int) -> str:
            return self.added_tokens.get(int(i)) or self._sp.id_to_piece(int(i))

        return one(ids) if isinstance(ids, int) else [one(i) for i in ids]

    # ---- encode / decode -----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        for part in self._splitter.split(text):
            if not part:
                continue
            if part in self._added_ids:
                ids.append(self._added_ids[part])
            else:
                ids.extend(self._sp.encode(part))
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def decode(self, ids: Any, skip_special_tokens: bool = False, **_: Any) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ([ids] if isinstance(ids, int) else ids)]
        pieces = [self.convert_ids_to_tokens(i) for i in ids if not (skip_special_tokens and i in self.special_ids)]
        if not pieces:
            return ""
        if pieces[0].startswith(SPIECE_UNDERLINE):  # the dummy prefix the encoder added
            pieces[0] = pieces[0][1:]
        text, run, after_special = "", [], False
        for k, piece in enumerate(pieces):
            if piece in self.special_tokens:
                if not after_special and k:
                    text += " "
                text += self._sp.decode_pieces(run) + piece
                run, after_special = [], True
            else:
                run.append(piece)
                after_special = False
        return text + self._sp.decode_pieces(run)

    def batch_decode(self, rows: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens, **kwargs) for r in rows]


def load_tokenizer(folder: str | Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.from_folder(folder)


# ---------------------------------------------------------------------------------------
# input builder
# ---------------------------------------------------------------------------------------


def image_text(plan: TilePlan) -> str:
    """The placeholder text the original processor puts where the image goes.

    `<image>` + 64 `<unk>` + `</image>` for the overview; when sliced, `<slice>`, one line
    per grid row of such blocks, `</slice>`; then a newline.
    """
    block = IMAGE_START + IMAGE_PLACEHOLDER * plan.tokens_per_tile + IMAGE_END
    if not plan.thumbnail:
        return block + "\n"
    rows = "\n".join(block * plan.cols for _ in range(plan.rows))
    return block + SLICE_START + rows + SLICE_END + "\n"


def chat_text(question: str, plan: TilePlan) -> str:
    """The prompt of the official chat(): `<用户>` + image placeholder + "\n" + question + `<AI>` (one)."""
    return USER_TAG + image_text(plan) + question + ASSISTANT_TAG


def _pixel_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) float32: the normalised value of every uint8 level, with the processor's float32 ops
    (x / 255, minus mean, over std)."""
    levels = np.arange(256, dtype=np.float32) / 255
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((levels[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)


class MiniCPMV2Builder(InputBuilder):
    """Pages -> MiniCPM-V 2.0 inputs: LLaVA-UHD slices (overview first), the chat() prompt.

    Slices of one page have two sizes (overview, grid slices), so the pixel values are
    packed as uint8 codes of shape (1, 1, sum H*W, 3) (`CodedPixels`), with the slice
    sizes in `image_inputs["tile_sizes"]`; `encode_page` unpacks them on the device.
    """

    family = NAME
    # 2: one <AI>, as the official chat() (1 had the fork's processor's second <AI>)
    chat_format = "2"
    generation_defaults = GENERATION_DEFAULTS

    def __init__(self, tokenizer: SentencePieceTokenizer, model_config: MiniCPMV2Config, *,
                 tasks: Sequence[str] = (DESCRIPTION, OCR, CHART), chart_questions: Sequence[str] = (),
                 max_slices: int | None = None, scale_resolution: int | None = None,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        self.tokenizer = tokenizer
        self.image_processor = None
        self.tasks = tuple(tasks)
        self.chart_questions = tuple(chart_questions)
        self.chat_template = None
        self.max_slices = int(max_slices if max_slices is not None else model_config.max_slice_nums)
        self.scale_resolution = int(scale_resolution if scale_resolution is not None else model_config.scale_resolution)
        self.patch_size = int(model_config.patch_size)
        self.tokens_per_tile = int(model_config.query_num)
        self.im_start_id = int(model_config.im_start_token_id)
        self.im_end_id = int(model_config.im_end_token_id)
        self.image_token_id = tokenizer.unk_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else 0)
        self.table = _pixel_table(mean, std)

    def plan(self, width: int, height: int) -> TilePlan:
        from pipeline import tiling

        return tiling.plan_minicpm(width, height, max_slices=self.max_slices, scale_resolution=self.scale_resolution,
                                   patch_size=self.patch_size, tokens_per_tile=self.tokens_per_tile)

    def slices(self, image: "Image.Image", plan: TilePlan, thumbnail: "Image.Image | None" = None) -> list["Image.Image"]:
        """The images the model sees, in its order: the overview (when sliced) then the slices row-major."""
        from PIL import Image

        from pipeline import tiling

        tiles = tiling.cut_tiles(image, plan, Image.Resampling.BICUBIC, thumbnail=thumbnail)
        return [tiles[-1], *tiles[:-1]] if plan.thumbnail else tiles

    def pixels(self, image: "Image.Image", plan: TilePlan, thumbnail: "Image.Image | None" = None
               ) -> tuple[CodedPixels, dict[str, np.ndarray]]:
        images = self.slices(image, plan, thumbnail)
        arrays = [np.asarray(im.convert("RGB") if im.mode != "RGB" else im) for im in images]
        sizes = np.asarray([a.shape[:2] for a in arrays], dtype=np.int64)
        codes = np.concatenate([a.reshape(-1, 3) for a in arrays])[None, None]
        return CodedPixels(codes=np.ascontiguousarray(codes), table=self.table), {"tile_sizes": sizes}

    def image_text(self, plan: TilePlan) -> str:
        return image_text(plan)

    def chat_text(self, prompt: str, plan: TilePlan) -> str:
        return chat_text(prompt, plan)

    def encode_text(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), dtype=np.int64)

    def penalty_start_ids(self) -> tuple[int, ...]:
        """The original generates from embeddings: its penalised ids are a dummy `<s>` and the answer."""
        return (self.tokenizer.bos_token_id,)

    def decode_answer(self, tokens: Sequence[int]) -> str:
        """As the original's `_decode_text`: pad/`<unk>` ids dropped, special tokens KEPT (its `<ref>`,
        `<box>`, `<quad>`, `<point>` grounding tags are part of the answer)."""
        return self.tokenizer.decode([int(t) for t in tokens if int(t) != 0]).strip()

    def image_end(self, ids: np.ndarray) -> int:
        """Just after the last `</image>`: the placeholders are `<unk>` ids, which a text layer may hold too."""
        where = np.flatnonzero(np.asarray(ids) == self.im_end_id)
        return int(where[-1]) + 1 if len(where) else 0

    def placeholder_count(self, ids: np.ndarray) -> int:
        """Ids between `<image>` and `</image>` (its placeholders are `<unk>`, which a text layer may hold too)."""
        opened = np.cumsum(ids == self.im_start_id)
        closed = np.cumsum(ids == self.im_end_id)
        return int(((opened > closed) & (ids != self.im_start_id)).sum())

    def encode_page(self, model: Any, page: PreparedPage) -> PageFeatures:
        pixel_values = page.pixel_tensor(input_device(model), model.dtype)
        return PageFeatures(model.encode_packed(pixel_values, page.image_inputs["tile_sizes"]))

    def feature_inputs(self, model: Any, feats: Sequence[PageFeatures], input_ids: torch.Tensor) -> dict[str, Any]:
        return {"image_features": torch.cat([f.features for f in feats])}

    def naive_inputs(self, prepared: PreparedPage, key: str, device: Any) -> dict[str, Any]:
        ids = torch.from_numpy(prepared.prompts[key])[None].to(device)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": prepared.pixel_tensor(device),
            "tile_sizes": torch.from_numpy(prepared.image_inputs["tile_sizes"]),
        }


def load_builder(folder: str | Path, model_config: MiniCPMV2Config | None = None, *,
                 tasks: Sequence[str] = (DESCRIPTION, OCR, CHART), chart_questions: Sequence[str] = (),
                 **tiling_overrides: Any) -> MiniCPMV2Builder:
    """The builder for the checkpoint in `folder` (tokenizer + slicing settings, no weights).

    `tiling_overrides`: `max_slices` (`max_tiles` is accepted for it) and
    `scale_resolution`; None keeps the checkpoint's own (preprocessor_config.json, then
    config.json).
    """
    folder = Path(folder)
    config = model_config if model_config is not None else load_config(folder)
    pre_path = folder / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    max_slices = tiling_overrides.get("max_slices", tiling_overrides.get("max_tiles"))
    scale = tiling_overrides.get("scale_resolution")
    return MiniCPMV2Builder(
        load_tokenizer(folder), config, tasks=tasks, chart_questions=chart_questions,
        max_slices=max_slices if max_slices is not None else pre.get("max_slice_nums"),
        scale_resolution=scale if scale is not None else pre.get("scale_resolution"),
        mean=pre.get("norm_mean", (0.5, 0.5, 0.5)), std=pre.get("norm_std", (0.5, 0.5, 0.5)),
    )
