"""Per-family input building: the small part of inference that differs between models.

One `InputBuilder` subclass per family knows three things:

* `plan(width, height)`: the tiling the family really applies to an image of that size;
* `build(page, plan)`: CPU work done ahead of the model (tiles, normalised pixel values,
  tokenised task prompts with the image placeholders expanded as the family's
  transformers processor does); the result, a `PreparedPage`, is picklable;
* `encode(model, pages)` and `rows_to_inputs(...)`: how the model turns pixel values into
  image features once per page, and how the features of several prompts are handed to
  `generate` (`mm_encoder_outputs`), so all tasks of a page share one image encoding.

Builders hold a tokenizer and an image processor, never weights, and pickle small, so the
runner can send them to CPU worker processes. Nothing here needs torchvision: the PIL
image processors of transformers are used (AutoProcessor cannot be built without it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from pipeline import tiling
from pipeline.inference import prompts
from pipeline.inference.checkpoint import UnsupportedModelError
from pipeline.inference.generation import GREEDY, GenerationSettings
from pipeline.records import PageImage, PageKind, TilePlan

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

# Task keys of a prepared page. Chart questions are "chart:<index>".
DESCRIPTION, OCR, CHART = "description", "ocr", "chart"


def chart_key(index: int) -> str:
    """Prompt key of the `index`-th chart question."""
    return f"{CHART}:{index}"


@dataclass(frozen=True, eq=False)
class PreparedPage:
    """A page ready for the model: pixel values and tokenised task prompts (picklable).

    `prompts` maps a task key (description, ocr, chart, chart:0, chart:1, ...) to the
    prompt token ids, image placeholders included. `image_inputs` holds the family's
    extra image arrays (e.g. Qwen2-VL's image_grid_thw).
    """

    doc_id: str
    uri: str
    page_number: int
    kind: PageKind | None
    text: str | None  # the page's text layer, kept for the record
    plan: TilePlan
    family: str
    pixels: np.ndarray | CodedPixels  # float32 pixel values, or uint8 codes + table (InternVL)
    image_inputs: Mapping[str, np.ndarray]
    prompts: Mapping[str, np.ndarray]
    image_tokens: int  # image placeholder tokens in each prompt (== plan.visual_tokens)

    @property
    def visual_tokens(self) -> int:
        return self.plan.visual_tokens

    @property
    def pixel_values(self) -> np.ndarray:
        """The float32 pixel values the model takes (decoded on the CPU when coded)."""
        return self.pixels.decode() if isinstance(self.pixels, CodedPixels) else self.pixels

    def pixel_tensor(self, device: Any, dtype: Any = None) -> torch.Tensor:
        """The pixel values as a tensor on `device` (coded pixels are decoded there)."""
        import torch

        if isinstance(self.pixels, CodedPixels):
            tensor = self.pixels.to_torch(device)
        else:
            tensor = torch.from_numpy(self.pixels).to(device)
        return tensor if dtype is None else tensor.to(dtype)


@dataclass(frozen=True, eq=False)
class CodedPixels:
    """Normalised pixel values as uint8 codes (tiles, H, W, 3) and a float32 table (3, 256).

    value[n, c, y, x] = table[c, codes[n, y, x, c]]: a quarter of the float32 size to pickle
    between processes and to copy to the GPU, where the lookup gives the very same values.
    """

    codes: np.ndarray
    table: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, h, w, c = self.codes.shape
        return (n, c, h, w)

    def decode(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float32)
        for channel in range(3):
            out[:, channel] = self.table[channel][self.codes[..., channel]]
        return out

    def to_torch(self, device: Any) -> torch.Tensor:
        import torch

        if torch.device(device).type == "cpu":  # numpy's table lookup is the fast one on a CPU
            return torch.from_numpy(self.decode())
        # only the uint8 codes cross to the device; the lookup happens there
        return gather_decode(torch.from_numpy(self.codes).to(device), torch.from_numpy(self.table).to(device))


def gather_decode(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """values (N, 3, H, W) from codes (N, H, W, 3) and table (3, 256) by one gather, on their device."""
    import torch

    offsets = torch.arange(3, device=codes.device) * 256  # channel c's entries start at 256 * c
    return table.flatten()[codes.long() + offsets].permute(0, 3, 1, 2).contiguous()


@dataclass
class PageFeatures:
    """Image features of one page on the model's device, shared by all of its prompts."""

    features: torch.Tensor  # family layout; see each builder's encode()
    extra: dict[str, Any] = field(default_factory=dict)


class PageBuilder(tiling.PageGeometry, Protocol):
    """The builder seam: what preparation (pipeline.prepare) and the shard ask of a model's
    input builder: its family, its page geometry and `build`. `InputBuilder` is the one
    implementation; a test stand-in may be smaller."""

    @property
    def family(self) -> str: ...

    def build(self, page: PageImage, plan: TilePlan) -> PreparedPage: ...


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else {}


def normalise_tiles(tiles: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float], scale: float) -> CodedPixels:
    """PIL tiles -> coded pixel values (tiles, 3, H, W): x * scale, minus mean, over std.

    Computed through a 256-entry table per channel with the same float ops as
    transformers' rescale + normalize (float64 multiply, float32 subtract and divide), so
    the values are identical, at a fraction of the cost of doing it per pixel; kept as
    uint8 codes plus the table until the model's device does the lookup.
    """
    arr = np.stack([np.asarray(_rgb(t)) for t in tiles])  # N, H, W, 3 uint8
    levels = (np.arange(256, dtype=np.float64) * scale).astype(np.float32)
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    table = (levels[None, :] - mean32[:, None]) / std32[:, None]  # 3 x 256, float32
    return CodedPixels(codes=np.ascontiguousarray(arr), table=table.astype(np.float32))


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


# ---------------------------------------------------------------------------------------
# base builder
# ---------------------------------------------------------------------------------------


_MEMO_SIZE = 1024  # distinct page sizes remembered per builder (documents repeat a few sizes)


def _memoized(method: Any, slot: str) -> Any:
    """`method(self, *args)` remembered per builder instance and arguments: a page's geometry
    (its plan, its render size) is computed once per size however many stages ask for it
    (the rasterizer's render size and canvas, preparation's plan, the builder's own build)."""

    @functools.wraps(method)
    def remembered(self: Any, *args: Any) -> Any:
        memo = self.__dict__.setdefault(slot, {})
        found = memo.get(args)
        if found is None:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            found = memo[args] = method(self, *args)
        return found

    remembered.memoized = True  # type: ignore[attr-defined]
    return remembered


class InputBuilder:
    """Builds model inputs for one checkpoint. Subclasses implement one family each.

    `plan` and `target_size` are pure functions of the page size for a given builder; every
    subclass's are remembered per size (`_memoized`), so no stage plans a page twice.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, slot in (("plan", "_plan_memo"), ("target_size", "_target_memo")):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "memoized", False):
                setattr(cls, name, _memoized(method, slot))

    family: ClassVar[str] = ""
    placeholder: str = ""  # what the chat template emits for an image
    # The family's chat format, bumped whenever the text around the task prompt changes
    # (it is part of every row's prompt version), and its original's deterministic decoding.
    chat_format: ClassVar[str] = "1"
    generation_defaults: ClassVar[GenerationSettings] = GREEDY

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        model_config: Any,
        *,
        tasks: Sequence[str] = (DESCRIPTION, OCR, CHART),
        chart_questions: Sequence[str] = (),
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tasks = tuple(tasks)
        self.chart_questions = tuple(chart_questions)
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise UnsupportedModelError("the checkpoint has no chat template (chat_template.jinja or .json)")
        self.image_token_id = int(model_config.image_token_id)
        self.pad_token_id = self._pad_id(tokenizer, model_config)

    # ---- prompt version, decoding ---------------------------------------------------------
    def prompt_version(self, generation: GenerationSettings) -> str:
        """What the rows record as their prompt version: the task prompts' version, this
        family's chat format and the effective decoding, e.g. `v2-1a2b3c4d/minicpm_v2.2/beams3-rp1.2`."""
        return f"{prompts.PROMPT_VERSION}/{self.family}.{self.chat_format}/{generation.tag}"

    def penalty_start_ids(self) -> tuple[int, ...]:
        """Ids the repetition penalty counts besides the answer's own (pipeline.inference.generation)."""
        return ()

    def decode_answer(self, tokens: Sequence[int]) -> str:
        """An answer's text from its ids (end of turn already cut), as the family's original decodes it."""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()

    # ---- construction ---------------------------------------------------------------
    @staticmethod
    def _pad_id(tokenizer: Any, model_config: Any) -> int:
        for candidate in (
            tokenizer.pad_token_id,
            getattr(getattr(model_config, "text_config", None), "pad_token_id", None),
            tokenizer.eos_token_id,
        ):
            if candidate is not None:
                return int(candidate)
        return 0

    # ---- page geometry (the model owns it) ----------------------------------------------
    # True when the family's preprocessing stretches every page to its plan's canvas
    # (resized_width x resized_height) whatever the page's aspect ratio, so the rasterizer
    # may render straight at that canvas (and the thumbnail at its size). False: pages are
    # rendered at their own aspect ratio and the family's preprocessing resizes them.
    stretches_to_canvas: ClassVar[bool] = False

    def target_size(self, width_pt: float, height_pt: float) -> tuple[int, int]:
        """Pixel size (aspect ratio of the page) to render a width_pt x height_pt page at, so
        that this family's own preprocessing only ever downsamples it: the smallest such size
        whose plan's canvas fits inside it. The rasterizer clamps it to its DPI bounds."""
        return tiling.fixed_point_render_size(self.plan, width_pt, height_pt)

    # ---- tiling ------------------------------------------------------------------------
    def plan(self, width: int, height: int) -> TilePlan:
        """The tiling this family applies to an image of `width` x `height` pixels."""
        raise NotImplementedError

    def pixels(
        self, image: Image.Image, plan: TilePlan, thumbnail: Image.Image | None = None
    ) -> tuple[np.ndarray | CodedPixels, dict[str, np.ndarray]]:
        """Pixel values (and extra image arrays) for `image` cut as `plan` says."""
        raise NotImplementedError

    def image_text(self, plan: TilePlan) -> str:
        """The expanded image placeholder text for a page with this plan."""
        raise NotImplementedError

    # ---- prompts ------------------------------------------------------------------------
    def task_prompts(self, text_layer: str | None) -> dict[str, str]:
        """Task key -> prompt text, for the run's tasks (chart questions included)."""
        out: dict[str, str] = {}
        if DESCRIPTION in self.tasks:
            out[DESCRIPTION] = prompts.description_prompt()
        if OCR in self.tasks:
            out[OCR] = prompts.ocr_prompt(text_layer)
        if CHART in self.tasks:
            out[CHART] = prompts.chart_detect_prompt()
            for i, question in enumerate(self.chart_questions):
                out[chart_key(i)] = prompts.chart_question_prompt(question)
        return out

    def chat_text(self, prompt: str, plan: TilePlan) -> str:
        """The full prompt text, as the family's processor would tokenise it."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )
        count = text.count(self.placeholder)
        if count != 1:
            raise UnsupportedModelError(
                f"chat template produced {count} image placeholders {self.placeholder!r}, expected 1"
            )
        return text.replace(self.placeholder, self.image_text(plan), 1)

    def encode_text(self, text: str) -> np.ndarray:
        """Token ids of a full prompt (special tokens as the transformers processors add them)."""
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and text.startswith(bos))
        ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    # ---- the CPU side -----------------------------------------------------------------
    def build(self, page: PageImage, plan: TilePlan, prompts: Mapping[str, str] | None = None) -> PreparedPage:
        """Tiles, pixel values and tokenised prompts for one page (CPU only; raises on a bad page):
        the run's task prompts, or `prompts` (key -> prompt text, e.g. `ask`'s one question)."""
        return build_page(self, page, plan, prompts)

    def placeholder_count(self, ids: np.ndarray) -> int:
        """Image placeholder tokens in a prompt's ids (checked against the plan's visual tokens)."""
        return int((ids == self.image_token_id).sum())

    # ---- the model side ---------------------------------------------------------------
    def encode(self, model: Any, pages: Sequence[PreparedPage]) -> list[PageFeatures]:
        """Image features of `pages`, one vision-encoder call per page (all of its tiles).

        Per page rather than one call for the whole batch: the vision batch is already
        the page's tiles, and it avoids copying the batch's pixel values (hundreds of MB
        of float32 for a batch of InternVL pages) into one fresh buffer.
        """
        return [self.encode_page(model, page) for page in pages]

    def encode_page(self, model: Any, page: PreparedPage) -> PageFeatures:
        """Image features of one page on the model's input device."""
        raise NotImplementedError

    def rows_to_inputs(self, model: Any, rows: Sequence[tuple[np.ndarray, PageFeatures]]) -> dict[str, Any]:
        """`generate` keyword arguments for prompts `rows` (left padded), images pre-encoded."""
        import torch

        device = input_device(model)
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            input_ids[i, width - len(ids) :] = torch.from_numpy(ids)
            attention_mask[i, width - len(ids) :] = 1
        inputs: dict[str, Any] = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
        }
        inputs.update(self.feature_inputs(model, [feats for _, feats in rows], inputs["input_ids"]))
        return inputs

    def feature_inputs(self, model: Any, feats: Sequence[PageFeatures], input_ids: torch.Tensor) -> dict[str, Any]:
        """The `mm_encoder_outputs` (and any extra inputs) for these rows' features."""
        raise NotImplementedError

    def naive_inputs(self, prepared: PreparedPage, key: str, device: Any) -> dict[str, Any]:
        """Inputs for plain `generate` with raw pixel values, as the model cards do (bench, tests)."""
        raise NotImplementedError

    # ---- positions and the image span (the engine's prefix sharing) -----------------------
    def image_end(self, ids: np.ndarray) -> int:
        """Index just after the prompt's last image placeholder (0: none). A prefix shared by a
        page's tasks is only prefilled apart when it holds the whole image."""
        where = np.flatnonzero(np.asarray(ids) == self.image_token_id)
        return int(where[-1]) + 1 if len(where) else 0

    def prefill_positions(self, model: Any, input_ids: torch.Tensor, inputs: Mapping[str, Any]
                          ) -> tuple[torch.Tensor, int]:
        """Position ids to prefill `input_ids` (one unpadded prompt, or the start of one, whose
        image inputs are `inputs`) from an empty cache; and the rope offset of what follows it:
        the token at text index n after it sits at position n + offset (`position_ids`)."""
        import torch

        return torch.arange(input_ids.shape[1], device=input_ids.device)[None], 0

    def position_ids(self, text_positions: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Position ids of tokens at `text_positions` (rows, length: index among the row's real
        tokens) of rows whose prefill left rope offsets `offsets` (rows,); plain 1-D positions here."""
        return text_positions


InputBuilder.target_size = _memoized(InputBuilder.target_size, "_target_memo")  # type: ignore[method-assign]


def build_page(
    builder: InputBuilder,
    page: PageImage,
    plan: TilePlan,
    prompts: Mapping[str, str] | None = None,
    *,
    pixels: tuple[np.ndarray | CodedPixels, Mapping[str, np.ndarray]] | None = None,
) -> PreparedPage:
    """The one place a `PreparedPage` is made (runs, `ask`, the vLLM engine's preparation).

    The prompt ids are the family's chat text of each prompt (`prompts`, by key; default: the
    run's tasks for the page's text layer), tokenised as its processor does, with as many image
    placeholders as `plan` has visual tokens (checked). The pixel side is the family's own
    (`builder.pixels`, the page cut as `plan` says) unless `pixels` gives it: (pixel values,
    extra image arrays), e.g. the vLLM engine's page image for a family vLLM preprocesses itself.
    """
    if pixels is None:
        pixels = builder.pixels(_rgb(page.image), plan, thumbnail=page.thumbnail)
    pixel_values, image_inputs = pixels
    texts = builder.task_prompts(page.text) if prompts is None else prompts
    prompt_ids = {key: builder.encode_text(builder.chat_text(p, plan)) for key, p in texts.items()}
    image_tokens = {builder.placeholder_count(ids) for ids in prompt_ids.values()}
    if image_tokens and image_tokens != {plan.visual_tokens}:
        raise ValueError(f"prompt holds {sorted(image_tokens)} image tokens, the plan says {plan.visual_tokens}")
    return PreparedPage(
        doc_id=page.doc_id,
        uri=page.uri,
        page_number=page.page_number,
        kind=page.kind,
        text=page.text,
        plan=plan,
        family=builder.family,
        pixels=pixel_values,
        image_inputs=image_inputs,
        prompts=prompt_ids,
        image_tokens=plan.visual_tokens,
    )


def input_device(model: Any) -> Any:
    """Where inputs go: the device of the input embeddings (first device of a sharded model)."""
    return model.get_input_embeddings().weight.device


def encoder_outputs(features: Any) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {"image": BaseModelOutputWithPooling(pooler_output=features)}



def load_chat_template(folder: Path | None) -> str | None:
    """A chat template stored beside the processor (chat_template.jinja or legacy .json)."""
    if folder is None:
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = _read_json(folder, "chat_template.json")
    template = legacy.get("chat_template")
    return template if isinstance(template, str) else None


__all__ = [
    "CHART",
    "DESCRIPTION",
    "InputBuilder",
    "OCR",
    "PageBuilder",
    "PageFeatures",
    "PreparedPage",
    "UnsupportedModelError",
    "build_page",
    "chart_key",
    "encoder_outputs",
    "normalise_tiles",
    "input_device",
    "load_chat_template",
]
