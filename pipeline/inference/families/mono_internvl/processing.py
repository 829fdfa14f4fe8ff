"""mono_internvl: processing: page plan, pixels, tokenizer, chat format and prompt ids (the input builder). See the package docstring."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    UnsupportedModelError,
    input_device,
)
from pipeline.inference.families.mono_internvl.configuration import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    NAME,
    MonoInternVLConfig,
    recognise,
)
from pipeline.records import TilePlan

# ---------------------------------------------------------------------------------------
# tokenizer: the sentencepiece model, as the original slow tokenizer uses it
# ---------------------------------------------------------------------------------------

# PreTrainedTokenizer.clean_up_tokenization (transformers 4.37), which InternLM2Tokenizer's
# convert_tokens_to_string applies unconditionally.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class InternLM2Tokenizer:
    """InternLM2's tokenizer without its remote class: `tokenizer.model` + added tokens.

    Encoding as the original (a transformers 4.37 slow tokenizer) does it: the text is
    cut at every added token (tokenizer_config's `added_tokens_decoder` and the named
    special tokens; longest match first; spaces beside one stripped only where it says lstrip/rstrip), every other
    piece is encoded by sentencepiece on its own (so each gets sentencepiece's own
    dummy prefix), and BOS goes in front when `add_bos_token`. Decoding drops the special
    ids when asked and joins the pieces with sentencepiece.

    `eos_token_id` is the id generation stops at: `</s>` by default; the builder makes
    it the chat's end of turn (`<|im_end|>`), the one id the original `chat()` stops at.
    Pickles as the model's bytes (sentencepiece processors do not pickle).
    """

    def __init__(
        self,
        model_proto: bytes,
        added_tokens: Mapping[str, int],
        special_tokens: Sequence[str],
        *,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str | None = "</s>",
        add_bos_token: bool = True,
        stop_token: str | None = None,
        strip: Mapping[str, tuple[bool, bool]] | None = None,
    ) -> None:
        self._proto = bytes(model_proto)
        self.added_tokens = dict(added_tokens)
        self.strip = dict(strip or {})  # added token -> (lstrip, rstrip): whitespace it swallows beside it
        self.add_bos_token = add_bos_token
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.stop_token = stop_token
        self._special_names = tuple(special_tokens)
        self._setup()

    def _setup(self) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(self._proto)
        # Named special tokens split the text too (4.37 adds them to the added-token map).
        for token in (self.bos_token, self.eos_token, self.unk_token, self.pad_token):
            if token is not None and token not in self.added_tokens:
                self.added_tokens[token] = self.sp.piece_to_id(token)
        self._id_to_added = {i: t for t, i in self.added_tokens.items()}
        named = [t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t is not None]
        self._special_strings = frozenset((*named, *self._special_names))
        self.all_special_ids = frozenset(self.convert_tokens_to_ids(t) for t in self._special_strings)
        # added tokens decoded on their own: the non-special ones, and special ones past the sp vocabulary
        self._standalone_ids = frozenset(
            i for t, i in self.added_tokens.items() if t not in self._special_strings or i >= self.vocab_size
        )
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")") if alternatives else None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("sp", "_splitter", "_id_to_added", "all_special_ids", "_special_strings", "_standalone_ids"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, *, stop_token: str | None = None) -> InternLM2Tokenizer:
        folder = Path(folder)
        cfg = _read_json(folder / "tokenizer_config.json")
        smap = _read_json(folder / "special_tokens_map.json")
        added: dict[str, int] = {}
        specials: list[str] = []
        strip: dict[str, tuple[bool, bool]] = {}
        for index, entry in (cfg.get("added_tokens_decoder") or {}).items():
            content = entry["content"] if isinstance(entry, Mapping) else str(entry)
            added[content] = int(index)
            if isinstance(entry, Mapping):
                strip[content] = (bool(entry.get("lstrip")), bool(entry.get("rstrip")))
            if not isinstance(entry, Mapping) or entry.get("special", True):
                specials.append(content)
        for content, index in _read_json(folder / "added_tokens.json").items():
            added.setdefault(content, int(index))
        for source in (cfg, smap):
            for entry in source.get("additional_special_tokens") or []:
                specials.append(entry["content"] if isinstance(entry, Mapping) else str(entry))

        def named(key: str, default: str | None) -> str | None:
            value = cfg.get(key, smap.get(key, default))
            return value.get("content") if isinstance(value, Mapping) else value

        return cls(
            (folder / "tokenizer.model").read_bytes(),
            added,
            specials,
            bos_token=named("bos_token", "<s>") or "<s>",
            eos_token=named("eos_token", "</s>") or "</s>",
            unk_token=named("unk_token", "<unk>") or "<unk>",
            pad_token=named("pad_token", "</s>"),
            add_bos_token=bool(cfg.get("add_bos_token", True)),
            stop_token=stop_token,
            strip=strip,
        )

    # ---- ids ------------------------------------------------------------------------------
    def convert_tokens_to_ids(self, token: str) -> int:
        if token in self.added_tokens:
            return self.added_tokens[token]
        return int(self.sp.piece_to_id(token))

    def convert_ids_to_tokens(self, index: int) -> str:
        return self._id_to_added.get(int(index)) or self.sp.id_to_piece(int(index))

    @property
    def bos_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.stop_token or self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.convert_tokens_to_ids(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def __len__(self) -> int:
        return len(self.get_vocab())

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens)
        return vocab

    # ---- encode / decode -----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        parts = self._splitter.split(text) if self._splitter is not None else [text]
        for k in range(1, len(parts), 2):  # added tokens flagged lstrip/rstrip eat the spaces beside them
            lstrip, rstrip = self.strip.get(parts[k], (False, False))
            if lstrip:
                parts[k - 1] = parts[k - 1].rstrip()
            if rstrip:
                parts[k + 1] = parts[k + 1].lstrip()
        for k, part in enumerate(parts):
            if not part:
                continue
            if k % 2:  # an added token
                ids.append(self.added_tokens[part])
            else:
                ids.extend(int(i) for i in self.sp.encode(part))
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as the original's decode (transformers 4.37 slow path) gives it.

        Runs of ordinary pieces are joined by sentencepiece; added tokens that are not
        special, and special added tokens beyond the sentencepiece vocabulary, stand
        alone and are joined to their neighbours with a space; special tokens inside the
        sentencepiece vocabulary follow InternLM2Tokenizer's own spacing rule.
        """
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = ids.tolist()
        texts: list[str] = []
        run: list[int] = []
        for index in (int(i) for i in ids):
            if skip_special_tokens and index in self.all_special_ids:
                continue
            if index in self._standalone_ids:
                if run:
                    text = self._pieces_text(run)
                    if text:
                        texts.append(text)
                    run = []
                texts.append(self._id_to_added[index])
            else:
                run.append(index)
        if run:
            texts.append(self._pieces_text(run))
        return " ".join(texts)

    def _pieces_text(self, ids: list[int]) -> str:
        """InternLM2Tokenizer.convert_tokens_to_string: special tokens met here get a space
        before them (unless right after another), the rest is sentencepiece's text; then
        the 4.37 clean-up of spaces before punctuation."""
        out, run, after_special = "", [], False
        for index in ids:
            token = self.convert_ids_to_tokens(index)
            if token in self._special_strings:
                out += ("" if after_special else " ") + self.sp.decode(run) + token
                run, after_special = [], True
            else:
                run.append(index)
                after_special = False
        out += self.sp.decode(run)
        for old, new in _CLEANUPS:
            out = out.replace(old, new)
        return out

    def batch_decode(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]


# ---------------------------------------------------------------------------------------
# chat format (the conversation templates of the original conversation.py)
# ---------------------------------------------------------------------------------------

_INTERNVL_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


@dataclass(frozen=True)
class ChatTemplate:
    """An MPT-style conversation: system, then role + message + sep per turn, no newlines
    between turns; the assistant's role is left open for generation."""

    name: str
    system: str
    user: str
    assistant: str
    sep: str

    def prompt(self, question: str) -> str:
        return self.system + self.sep + self.user + question + self.sep + self.assistant


CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    name: ChatTemplate(
        name=name,
        system="<|im_start|>system\n" + _INTERNVL_SYSTEM,
        user="<|im_start|>user\n",
        assistant="<|im_start|>assistant\n",
        sep="<|im_end|>",
    )
    for name in ("internlm2-chat", "Hermes-2")
}


def chat_template(name: str | None) -> ChatTemplate:
    try:
        return CHAT_TEMPLATES[name or "internlm2-chat"]
    except KeyError:
        raise UnsupportedModelError(
            f"conversation template {name!r} is not supported; known: {', '.join(CHAT_TEMPLATES)}"
        ) from None


# ---------------------------------------------------------------------------------------
# input builder
# ---------------------------------------------------------------------------------------


def _pixel_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) float32: torchvision's ToTensor (x / 255 in float32) then Normalize."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((levels[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)


class MonoInternVLBuilder(InputBuilder):
    """Pages -> tiles, pixel values and prompts as Mono-InternVL's own chat() builds them."""

    family = NAME
    placeholder = IMG_CONTEXT

    def __init__(
        self,
        tokenizer: InternLM2Tokenizer,
        model_config: MonoInternVLConfig,
        *,
        tasks: Sequence[str] = (DESCRIPTION, OCR, CHART),
        chart_questions: Sequence[str] = (),
        min_tiles: int | None = None,
        max_tiles: int | None = None,
    ) -> None:
        self.template = chat_template(model_config.template)
        self.tokenizer = tokenizer
        self.tokenizer.stop_token = self.template.sep
        self.image_processor = None
        self.chat_template = None
        self.tasks = tuple(tasks)
        self.chart_questions = tuple(chart_questions)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else tokenizer.convert_tokens_to_ids(tokenizer.eos_token))
        self.tile_size = model_config.tile_size
        self.tokens_per_tile = model_config.num_image_token
        self.min_tiles = int(min_tiles if min_tiles is not None else model_config.min_dynamic_patch)
        self.max_tiles = int(max_tiles if max_tiles is not None else model_config.max_dynamic_patch)
        self.use_thumbnail = bool(model_config.use_thumbnail)
        self.table = _pixel_table(IMAGENET_MEAN, IMAGENET_STD)

    def plan(self, width: int, height: int) -> TilePlan:
        from pipeline import tiling

        return tiling.plan_internvl(
            width,
            height,
            min_num=self.min_tiles,
            max_num=self.max_tiles,
            image_size=self.tile_size,
            use_thumbnail=self.use_thumbnail,
            tokens_per_tile=self.tokens_per_tile,
        )

    def pixels(self, image: Any, plan: TilePlan, thumbnail: Any = None) -> tuple[CodedPixels, dict[str, np.ndarray]]:
        from PIL import Image

        from pipeline import tiling

        # The README's load_image: PIL's default (bicubic) resize, then ToTensor + Normalize.
        tiles = tiling.cut_tiles(image, plan, Image.Resampling.BICUBIC, thumbnail=thumbnail)
        codes = np.stack([np.asarray(t.convert("RGB") if t.mode != "RGB" else t) for t in tiles])
        return CodedPixels(codes=np.ascontiguousarray(codes), table=self.table), {}

    def image_text(self, plan: TilePlan) -> str:
        return IMG_START + IMG_CONTEXT * (self.tokens_per_tile * plan.tiles) + IMG_END

    def chat_text(self, prompt: str, plan: TilePlan) -> str:
        return self.template.prompt(self.image_text(plan) + "\n" + prompt)

    def encode_text(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), dtype=np.int64)

    def encode_page(self, model: Any, page: PreparedPage) -> PageFeatures:
        pixel_values = page.pixel_tensor(input_device(model), model.dtype)
        features = model.get_image_features(pixel_values)
        return PageFeatures(features.reshape(-1, features.shape[-1]))

    def feature_inputs(self, model: Any, feats: Sequence[PageFeatures], input_ids: torch.Tensor) -> dict[str, Any]:
        return {"image_features": torch.cat([f.features for f in feats])}

    def naive_inputs(self, prepared: PreparedPage, key: str, device: Any) -> dict[str, Any]:
        ids = torch.from_numpy(prepared.prompts[key])[None].to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": prepared.pixel_tensor(device)}


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_config(folder: str | Path) -> MonoInternVLConfig:
    """The official config.json as a MonoInternVLConfig, `image_token_id` from the tokenizer."""
    folder = Path(folder)
    raw = _read_json(folder / "config.json")
    if not recognise(raw):
        raise UnsupportedModelError(f"{folder} is not a Mono-InternVL checkpoint")
    config = MonoInternVLConfig.from_pretrained(folder)
    if config.image_token_id is None and (folder / "tokenizer.model").is_file():
        config.image_token_id = InternLM2Tokenizer.from_folder(folder).convert_tokens_to_ids(IMG_CONTEXT)
    return config


def load_builder(
    folder: str | Path,
    model_config: MonoInternVLConfig,
    *,
    tasks: Sequence[str],
    chart_questions: Sequence[str],
    **tiling_overrides: Any,
) -> MonoInternVLBuilder:
    """The input builder (tokenizer + page geometry + chat format; no weights).

    `tiling_overrides`: `min_tiles` / `max_tiles` (None: the config's min/max_dynamic_patch).
    """
    unknown = set(tiling_overrides) - {"min_tiles", "max_tiles"}
    if unknown:
        raise TypeError(f"unknown tiling overrides for {NAME}: {sorted(unknown)}")
    tokenizer = InternLM2Tokenizer.from_folder(folder)
    return MonoInternVLBuilder(
        tokenizer,
        model_config,
        tasks=tasks,
        chart_questions=chart_questions,
        min_tiles=tiling_overrides.get("min_tiles"),
        max_tiles=tiling_overrides.get("max_tiles"),
    )
