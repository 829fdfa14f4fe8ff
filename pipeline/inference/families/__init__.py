"""Model families: one folder each (`families/<name>/`), and the one interface loading uses.

Every family is driven through a `FamilyCode` (`Family.code()` in the registry): its config,
a weightless model for device maps, the model and the input builder, whatever the family
is. `PortedCode` serves the seed models ported here (their package's `load_config`,
`meta_model`, `load_model`, `load_builder`, read from a local folder; no file of the
checkpoint runs); `NativeCode` serves the families transformers has classes for (thin over
the Auto classes, with the family's builder from its folder). Also shared: loading a
ported checkpoint folder strictly (its safetensors only, every weight under exactly the
official name).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from pipeline.inference.checkpoint import model_folder

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from pipeline.inference.adapters import InputBuilder

# Where a model's modules go: {module prefix: GPU index} ("" for the whole model), or None (one device)
DeviceMap: TypeAlias = "dict[str, int] | None"
# A family's own multi-GPU placement: (weightless model, number of GPUs) -> {module prefix: GPU index}
Placement: TypeAlias = "Callable[[PreTrainedModel, int], dict[str, int]]"

log = logging.getLogger(__name__)

_MISMATCHES = ("missing_keys", "unexpected_keys", "mismatched_keys")


def load_strict(model_class: type[PreTrainedModel], folder: str | Path, config: PretrainedConfig, *,
                dtype: torch.dtype, device_map: DeviceMap = None, attn_implementation: str = "sdpa",
                layout: str) -> PreTrainedModel:
    """`model_class.from_pretrained(folder)` from safetensors, in eval mode, refusing a folder
    whose weights are not exactly the official `layout`'s (a missing weight would otherwise be
    left at its random initial value without a word)."""
    kwargs: dict[str, Any] = {"config": config, "dtype": dtype, "use_safetensors": True,
                              "attn_implementation": attn_implementation, "output_loading_info": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    loaded: Any = model_class.from_pretrained(str(folder), **kwargs)  # (model, loading info)
    model, info = loaded
    bad = {k: v for k, v in info.items() if k in _MISMATCHES and v}
    if bad:
        raise ValueError(f"{folder}: weights do not match the {layout} layout: {bad}")
    return model.eval()


class FamilyCode(Protocol):
    """The family seam: what loading needs of a family. `model` is a local folder or a hub id."""

    def load_config(self, model: str, *, revision: str | None = None,
                    trust_remote_code: bool = False) -> PretrainedConfig: ...

    def meta_model(self, model_config: PretrainedConfig) -> PreTrainedModel: ...

    def load_model(self, model: str, *, revision: str | None, trust_remote_code: bool, dtype: torch.dtype,
                   device_map: DeviceMap, attn_implementation: str) -> PreTrainedModel: ...

    def load_builder(self, model: str, model_config: PretrainedConfig | None, *, revision: str | None,
                     trust_remote_code: bool, tasks: Sequence[str], chart_questions: Sequence[str],
                     **tile_overrides: int | None) -> InputBuilder: ...

    def placement(self) -> Placement | None: ...  # None: accelerate's balance alone

    def int8_skip_modules(self, num_hidden_layers: int) -> Sequence[str]: ...


class PortedCode:
    """A family ported here: its package's functions, on a local copy of the checkpoint."""

    def __init__(self, name: str, module: str) -> None:
        self.name = name
        self.module = importlib.import_module(module)

    def load_config(self, model: str, *, revision: str | None = None,
                    trust_remote_code: bool = False) -> PretrainedConfig:
        return self.module.load_config(model_folder(model, revision))

    def meta_model(self, model_config: PretrainedConfig) -> PreTrainedModel:
        return self.module.meta_model(model_config)

    def load_model(self, model: str, *, revision: str | None, trust_remote_code: bool, dtype: torch.dtype,
                   device_map: DeviceMap, attn_implementation: str) -> PreTrainedModel:
        if trust_remote_code:
            log.info("%s is ported natively: no code of the checkpoint runs (trust_remote_code has no effect)",
                     self.name)
        return self.module.load_model(model_folder(model, revision, weights=True), dtype=dtype,
                                      device_map=device_map, attn_implementation=attn_implementation)

    def load_builder(self, model: str, model_config: PretrainedConfig | None, *, revision: str | None,
                     trust_remote_code: bool, tasks: Sequence[str], chart_questions: Sequence[str],
                     **tile_overrides: int | None) -> InputBuilder:
        folder = model_folder(model, revision)
        if model_config is None:
            model_config = self.module.load_config(folder)
        overrides = {k: v for k, v in tile_overrides.items() if v is not None}  # None: the checkpoint's own
        return self.module.load_builder(folder, model_config, tasks=tuple(tasks), chart_questions=tuple(chart_questions),
                                        **overrides)

    def placement(self) -> Placement | None:
        return getattr(self.module, "placement", None)

    def int8_skip_modules(self, num_hidden_layers: int) -> Sequence[str]:
        listed = getattr(self.module, "int8_skip_modules", None)
        return tuple(listed(num_hidden_layers)) if listed is not None else ("lm_head",)


class NativeCode:
    """A family transformers has classes for: thin over the Auto classes (safetensors only,
    `trust_remote_code` passed through), with the family's input builder."""

    def __init__(self, name: str, builder: type[InputBuilder], tile_overrides: Sequence[str] = ()) -> None:
        self.name = name
        self.builder = builder
        self.tile_overrides = tuple(tile_overrides)

    def load_config(self, model: str, *, revision: str | None = None,
                    trust_remote_code: bool = False) -> PretrainedConfig:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model), revision=revision, trust_remote_code=trust_remote_code)

    def meta_model(self, model_config: PretrainedConfig) -> PreTrainedModel:
        from accelerate import init_empty_weights
        from transformers import AutoModelForImageTextToText

        with init_empty_weights():
            return AutoModelForImageTextToText.from_config(model_config)

    def load_model(self, model: str, *, revision: str | None, trust_remote_code: bool, dtype: torch.dtype,
                   device_map: DeviceMap, attn_implementation: str) -> PreTrainedModel:
        from transformers import AutoModelForImageTextToText

        kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": dtype,
                                  "use_safetensors": True}
        if device_map is not None:
            kwargs["device_map"] = device_map
        return AutoModelForImageTextToText.from_pretrained(model, attn_implementation=attn_implementation, **kwargs)

    def load_builder(self, model: str, model_config: PretrainedConfig | None, *, revision: str | None,
                     trust_remote_code: bool, tasks: Sequence[str], chart_questions: Sequence[str],
                     **tile_overrides: int | None) -> InputBuilder:
        from transformers import AutoImageProcessor, AutoTokenizer

        from pipeline.inference.adapters import load_chat_template

        common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        if model_config is None:
            model_config = self.load_config(model, revision=revision, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model, **common)
        tokenizer.padding_side = "left"
        image_processor = AutoImageProcessor.from_pretrained(model, backend="pil", **common)
        local = Path(model) if Path(model).is_dir() else None
        kwargs: dict[str, Any] = {
            "tasks": tuple(tasks),
            "chart_questions": tuple(chart_questions),
            "chat_template": getattr(tokenizer, "chat_template", None) or load_chat_template(local),
        }
        for name in self.tile_overrides:  # None: the checkpoint's own bound
            kwargs[name] = tile_overrides.get(name)
        return self.builder(tokenizer, image_processor, model_config, **kwargs)

    def placement(self) -> Placement | None:
        return None

    def int8_skip_modules(self, num_hidden_layers: int) -> Sequence[str]:
        return ("lm_head",)
