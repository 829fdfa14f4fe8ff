"""Model loading: device, dtype, multi-GPU device map, revision, and the input builder.

The checkpoint's config.json is read once and its family recognised by
`pipeline.inference.registry`; everything else goes through the family's `FamilyCode`
(`family.code()`, pipeline.inference.families), the same calls for every family: native
ones load through `AutoModelForImageTextToText` from a local folder or a hub id
(safetensors only, `trust_remote_code` passed through, off by default), ported ones (the
seed models) through their package, which never executes a file of the checkpoint. On several GPUs the model is
loaded once, sharded by a device map: the family's own placement when it has one
(MiniMax-VL-01: the model card's), else `accelerate.infer_auto_device_map` balanced
over the GPUs, never splitting a decoder layer, with the family's first-GPU modules
(vision encoder, projector, token embeddings) on the first GPU and its last-GPU modules
(final norm, lm_head) on the last one used.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from pipeline.config import RunConfig
from pipeline.inference.adapters import InputBuilder
from pipeline.inference.checkpoint import ModelConfigError, model_folder, read_model_config
from pipeline.inference.generation import GenerationSettings
from pipeline.inference.registry import Family, family_by_name, recognise

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

# A checkpoint's config object, or a model (weightless or not: its own config)
ConfigOrModel: TypeAlias = "PretrainedConfig | PreTrainedModel"

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class DevicePlan:
    """Where the model runs: CPU, or one or more CUDA devices (ids as torch sees them)."""

    kind: str  # "cpu" or "cuda"
    gpus: tuple[int, ...] = ()

    @property
    def first(self) -> str:
        return f"cuda:{self.gpus[0]}" if self.kind == "cuda" else "cpu"


def resolve_device(device: str, available_gpus: int | None = None) -> DevicePlan:
    """`auto` -> every visible GPU (CPU when none); `cpu`; or a list of GPU ids like `0,1`."""
    if available_gpus is None:
        import torch

        available_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    value = device.strip().lower()
    if value == "cpu":
        return DevicePlan("cpu")
    if value == "auto":
        return DevicePlan("cuda", tuple(range(available_gpus))) if available_gpus else DevicePlan("cpu")
    value = value.replace("cuda:", "")
    try:
        ids = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise ModelConfigError(f"device must be auto, cpu or GPU ids like 0,1; got {device!r}") from None
    if not ids or len(set(ids)) != len(ids):
        raise ModelConfigError(f"device lists no GPU ids or repeats one: {device!r}")
    missing = [i for i in ids if i >= available_gpus or i < 0]
    if missing:
        raise ModelConfigError(f"GPU ids {missing} are not visible ({available_gpus} GPUs visible)")
    return DevicePlan("cuda", ids)


def resolve_dtype(dtype: str, plan: DevicePlan) -> torch.dtype:
    """`auto` -> bfloat16 on GPU (float16 where bf16 is unsupported), float32 on CPU."""
    import torch

    if dtype == "auto":
        if plan.kind == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def attention_implementation(plan: DevicePlan, dtype: torch.dtype) -> str:
    """flash_attention_2 on GPU in half precision when the package is installed, else sdpa."""
    import torch

    half = dtype in (torch.float16, torch.bfloat16)
    if plan.kind == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# ---------------------------------------------------------------------------------------
# device maps
# ---------------------------------------------------------------------------------------


def family_for(config_or_model: Mapping[str, Any] | ConfigOrModel, family: Family | str | None = None) -> Family:
    """The registry family of a config (a config.json dict or a config object) or a model."""
    import torch

    if isinstance(family, Family):
        return family
    if isinstance(family, str):
        return family_by_name(family)
    config = config_or_model.config if isinstance(config_or_model, torch.nn.Module) else config_or_model
    return recognise(config if isinstance(config, Mapping) else config.to_dict())


def model_config_for(family: Family, folder: str | Path, revision: str | None = None,
                     trust_remote_code: bool = False) -> PretrainedConfig:
    """The config object of the checkpoint in `folder` (a local folder or a hub id)."""
    return family.code().load_config(str(folder), revision=revision, trust_remote_code=trust_remote_code)


def _meta_model(config_or_model: ConfigOrModel, family: Family | str | None = None) -> PreTrainedModel:
    """A weightless (meta) model for a config; a model is returned unchanged."""
    import torch

    if isinstance(config_or_model, torch.nn.Module):
        return config_or_model
    return family_for(config_or_model, family).code().meta_model(config_or_model)


meta_model = _meta_model


def _in_group(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def compute_device_map(
    config_or_model: ConfigOrModel,
    gpu_memory: Mapping[int, int],
    headroom: float,
    dtype: torch.dtype,
    *,
    family: Family | str | None = None,
    special_dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[str, int]:
    """Module name -> GPU id for one model instance sharded over `gpu_memory`'s GPUs.

    `gpu_memory` is each GPU's total memory in bytes; weights may use total*(1-headroom).
    A family with its own placement (`placement(meta, n_gpus)` in its module: MiniMax-VL-01)
    gets it, checked against the memory. Otherwise the split is balanced over the GPUs
    (accelerate's get_balanced_memory + infer_auto_device_map on a meta model, whole
    `_no_split_modules`), then the family's first-GPU modules (vision encoder, projector,
    token embeddings) are pinned to the first GPU, where inputs go, and its last-GPU
    modules (final norm, lm_head) to the last GPU the split uses. Raises ModelConfigError
    when the weights do not fit. No GPU is needed. `special_dtypes` (parameter name ->
    dtype) sizes some weights in another dtype than `dtype` (see `int8_special_dtypes`).
    """
    from accelerate.utils import (
        compute_module_sizes,
        find_tied_parameters,
        get_balanced_memory,
        infer_auto_device_map,
    )

    if not gpu_memory:
        raise ModelConfigError("no GPU memory given for the device map")
    fam = family_for(config_or_model, family)
    model = _meta_model(config_or_model, fam)
    model.tie_weights()  # a meta model from a config is not tied yet; tied weights share a device
    tied = [list(group) for group in find_tied_parameters(model)]
    gpus = sorted(gpu_memory)
    limits = {g: int(gpu_memory[g] * (1.0 - headroom)) for g in gpus}
    no_split = sorted(set(getattr(model, "_no_split_modules", None) or []))
    special = dict(special_dtypes) if special_dtypes else None
    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)
    if sizes[""] > sum(limits.values()):
        raise ModelConfigError(
            f"the weights need {sizes[''] / 2**30:.1f} GiB but the GPUs offer {sum(limits.values()) / 2**30:.1f} GiB "
            f"after {headroom:.0%} headroom; add GPUs or lower gpu_memory_headroom"
        )
    first, last = fam.device_groups()

    own = fam.code().placement()
    if own is not None and len(gpus) > 1:
        placed = {name: gpus[index] for name, index in own(model, len(gpus)).items()}
        used = _bytes_per_device(sizes, placed)
        over = {g: b for g, b in used.items() if b > limits[g]}
        if over:
            worst = max(over, key=lambda g: over[g])
            raise ModelConfigError(
                f"the {fam.name} placement over {len(gpus)} GPUs puts {over[worst] / 2**30:.1f} GiB of weights on GPU "
                f"{worst}, which offers {limits[worst] / 2**30:.1f} GiB after {headroom:.0%} headroom; add GPUs, use "
                "GPUs with more memory or lower gpu_memory_headroom"
            )
        return placed

    def attempt(budget: dict[int, int]) -> dict[str, int] | None:
        """A split within `budget`, pinned; where pinning overfills a GPU, that GPU's
        budget shrinks by the excess and the split is tried again."""
        budget = dict(budget)
        for _ in range(8):
            found = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype,
                                          special_dtypes=special)
            if any(not isinstance(d, int) for d in found.values()):
                return None  # something went to cpu/disk: it does not fit
            pinned = split_around(model, dict(found), (*first, *last))
            if last:
                pinned = pin_to(pinned, last, max(pinned.values()))
            pinned = pin_to_first(pinned, first, gpus[0], tied)
            used = _bytes_per_device(sizes, pinned)
            over = {g: used.get(g, 0) - limits[g] for g in gpus if used.get(g, 0) > limits[g]}
            if not over:
                return pinned
            for g, excess in over.items():
                budget[g] -= excess
            if any(budget[g] <= 0 for g in over):
                return None
        return None

    with _quiet_accelerate():
        budgets = [limits]
        if len(gpus) > 1:
            balanced = get_balanced_memory(model, max_memory=dict(limits), no_split_module_classes=no_split, dtype=dtype,
                                           special_dtypes=special)
            budgets.insert(0, {g: min(limits[g], int(balanced.get(g, limits[g]))) for g in gpus})
        for budget in budgets:
            device_map = attempt(budget)
            if device_map is not None:
                return device_map
    raise ModelConfigError(
        f"the model ({sizes[''] / 2**30:.1f} GiB) cannot be split over GPUs {gpus} with "
        f"{headroom:.0%} headroom without splitting a layer; add GPUs or lower gpu_memory_headroom"
    )


@contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """Silence accelerate's 'device N is not available' warnings (maps for absent GPUs)."""
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _bytes_per_device(sizes: Mapping[str, int], device_map: Mapping[str, int]) -> dict[int, int]:
    used: dict[int, int] = {}
    for name, device in device_map.items():
        used[device] = used.get(device, 0) + sizes.get(name, 0)  # a module with no weights is absent
    return used


def split_around(model: torch.nn.Module, device_map: dict[str, int], prefixes: Sequence[str]) -> dict[str, int]:
    """`device_map` with every key that holds one of `prefixes` inside it (e.g. a whole
    `model.language_model` holding `model.language_model.embed_tokens`) replaced by its
    children and direct parameters, on the same device, until each prefix can be moved alone."""
    out = dict(device_map)
    for prefix in prefixes:
        while True:
            outer = next((k for k in out if k == "" or prefix.startswith(k + ".")), None)
            if outer is None:
                break
            device = out.pop(outer)
            try:
                module = model.get_submodule(outer)
            except AttributeError:  # a parameter key: nothing to split
                out[outer] = device
                break
            dot = f"{outer}." if outer else ""
            for name, _ in module.named_children():
                out[dot + name] = device
            for name, _ in module.named_parameters(recurse=False):
                out[dot + name] = device
            for name, _ in module.named_buffers(recurse=False):
                out[dot + name] = device
    return out


def pin_to(device_map: dict[str, int], prefixes: Sequence[str], device: int) -> dict[str, int]:
    """Put every module under `prefixes` on `device` (wherever the split put its parts)."""
    return {name: device if _in_group(name, prefixes) else d for name, d in device_map.items()}


def pin_to_first(
    device_map: dict[str, int], prefixes: Sequence[str], first: int, tied: Sequence[Sequence[str]] = ()
) -> dict[str, int]:
    """Put every module under `prefixes` on device `first` (a prefix mapped as a whole, or
    its parts, wherever the split put them), with the modules of any parameters tied to
    them (e.g. an lm_head sharing the embedding matrix)."""
    moving = list(prefixes)
    for group in tied:
        if any(_in_group(param, prefixes) for param in group):
            moving += [param.rsplit(".", 1)[0] for param in group]
    return {name: first if _in_group(name, moving) else device for name, device in device_map.items()}


def device_map_bytes(
    config_or_model: ConfigOrModel, device_map: Mapping[str, int], dtype: torch.dtype, *,
    family: Family | str | None = None, special_dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[int, int]:
    """Bytes of weights each device holds under `device_map` (for checks and logs)."""
    from accelerate.utils import compute_module_sizes

    special = dict(special_dtypes) if special_dtypes else None
    sizes = compute_module_sizes(_meta_model(config_or_model, family), dtype=dtype, special_dtypes=special)
    return _bytes_per_device(sizes, device_map)


def int8_special_dtypes(model: PreTrainedModel, family: Family, keep_dtype: torch.dtype | None = None
                        ) -> dict[str, torch.dtype]:
    """For sizing int8 weights (dtype=torch.int8): the parameters that stay in `keep_dtype`
    (bf16). Only `nn.Linear` weights are converted, as weight-only int8 schemes do, and
    not those under the family's `modules_to_not_convert` (MiniMax-VL-01: the model card's
    list, `int8_skip_modules`; other families: lm_head), matched as substrings of the
    module name as transformers' quantizers match them. Sizing only: no quantization
    library is wired into loading."""
    import torch

    keep_dtype = keep_dtype or torch.bfloat16
    skip = tuple(family.code().int8_skip_modules(int(model.config.get_text_config().num_hidden_layers)))
    converted: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(key in name for key in skip):
            converted.add(f"{name}.weight")
    return {name: keep_dtype for name, _ in model.named_parameters() if name not in converted}


def top_level_map(model: torch.nn.Module, device_map: Mapping[str, int]) -> dict[str, int]:
    """`device_map` for display: a map that places the whole model ({"": gpu}) is spelled
    out as the model's top-level modules (and its direct parameters, e.g. image_newline)."""
    if set(device_map) != {""}:
        return dict(device_map)
    gpu = device_map[""]
    names = [name for name, _ in model.named_children()]
    names += [name for name, _ in model.named_parameters(recurse=False)]
    return {name: gpu for name in names}


def gpu_total_memory(gpus: Sequence[int]) -> dict[int, int]:
    """Total memory of each visible GPU, in bytes."""
    import torch

    return {g: int(torch.cuda.get_device_properties(g).total_memory) for g in gpus}


# ---------------------------------------------------------------------------------------
# revision
# ---------------------------------------------------------------------------------------


def resolve_revision(model_ref: str, requested: str | None, model_config: Any) -> str | None:
    """The commit the weights came from: the hub's commit hash (recorded in the config on
    download), a snapshot folder's name, a local folder's content hash, or what was asked."""
    commit = getattr(model_config, "_commit_hash", None)
    if isinstance(commit, str) and _COMMIT.match(commit):
        return commit
    path = Path(model_ref)
    if path.is_dir():
        for part in reversed(path.absolute().parts):
            if _COMMIT.match(part):
                return part
    if path.is_dir():
        return content_revision(model_ref)  # a plain local folder: a hash of what it holds
    return requested  # a hub branch or tag as asked (the commit was not recorded)


def content_revision(model_ref: str, requested: str | None = None) -> str | None:
    """A revision for the record without loading anything: for a local folder, a content
    hash ("sha256:...") of its weight files' names, sizes and safetensors headers (cheap:
    the tensors are not read); for a hub id, a requested 40-hex commit or the snapshot
    folder's name, else the requested branch or tag."""
    import hashlib
    import struct

    path = Path(model_ref)
    if not path.is_dir():
        return requested
    for part in reversed(path.absolute().parts):
        if _COMMIT.match(part):
            return part
    digest = hashlib.sha256()
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") or p.name.endswith(".index.json"))
    for file in weights:
        digest.update(f"{file.name}\t{file.stat().st_size}\n".encode())
        if file.suffix == ".safetensors":
            with open(file, "rb") as fh:
                head = fh.read(8)
                if len(head) == 8:
                    (size,) = struct.unpack("<Q", head)
                    digest.update(fh.read(min(size, 64 * 2**20)))
        elif file.name.endswith(".index.json"):
            digest.update(file.read_bytes())
    return "sha256:" + digest.hexdigest()[:24] if weights else None


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: PreTrainedModel
    builder: InputBuilder
    family: str
    model_id: str
    revision: str | None
    dtype: torch.dtype
    device: DevicePlan
    device_map: dict[str, int] | None


def _tile_override(config: RunConfig, name: str) -> int | None:
    """A tile bound the user set (None: the checkpoint's own is used)."""
    return getattr(config, name)


def _recognise_model(config: RunConfig) -> Family:
    """The checkpoint's family from its config.json (read once, no weights, no remote code)."""
    if config.model is None:
        raise ModelConfigError("no model configured")
    return recognise(read_model_config(config.model, config.revision))


def generation_settings(config: RunConfig) -> GenerationSettings | None:
    """The decoding a run uses: its model family's default with the run's overrides (None without a model)."""
    if config.model is None:
        return None
    defaults = _recognise_model(config).generation_defaults()
    return defaults.override(config.num_beams, config.repetition_penalty)


def load_builder(config: RunConfig, model_config: PretrainedConfig | None = None, *, family: Family | None = None) -> InputBuilder:
    """The input builder for `config.model` (tokenizer + image processor; no weights)."""
    if config.model is None:
        raise ModelConfigError("no model configured")
    family = family or _recognise_model(config)
    return family.code().load_builder(
        config.model, model_config, revision=config.revision, trust_remote_code=config.trust_remote_code,
        tasks=tuple(config.tasks), chart_questions=tuple(config.all_chart_questions()),
        **{name: _tile_override(config, name) for name in ("min_tiles", "max_tiles")},
    )


def load_model(config: RunConfig) -> LoadedModel:
    """Load `config.model` once for this process, on CPU, one GPU, or sharded over several."""
    if config.model is None:
        raise ModelConfigError("no model configured")
    family = _recognise_model(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    code = family.code()
    model_config = code.load_config(config.model, revision=config.revision, trust_remote_code=config.trust_remote_code)

    device_map: dict[str, int] | None = None
    if device.kind == "cuda" and len(device.gpus) > 1:
        meta = _meta_model(model_config, family)
        device_map = compute_device_map(
            meta, gpu_total_memory(device.gpus), config.gpu_memory_headroom, dtype, family=family
        )
        log.info("device map over GPUs %s: %s bytes", device.gpus, device_map_bytes(meta, device_map, dtype, family=family))
        load_map: Any = device_map
    elif device.kind == "cuda":
        load_map = {"": device.gpus[0]}
    else:
        load_map = None

    preferred = attention_implementation(device, dtype)
    model = None
    for attn in dict.fromkeys((preferred, "sdpa", "eager")):
        try:
            model = code.load_model(config.model, revision=config.revision, trust_remote_code=config.trust_remote_code,
                                    dtype=dtype, device_map=load_map, attn_implementation=attn)
            break
        except (ValueError, ImportError) as exc:
            if not re.search(r"attention|attn", str(exc), re.IGNORECASE):
                raise
            log.warning("attention implementation %s unavailable (%s); trying the next", attn, exc)
    if model is None:
        raise ModelConfigError(f"no attention implementation works for {config.model}")
    model.eval()
    builder = load_builder(config, model.config, family=family)
    return LoadedModel(
        model=model,
        builder=builder,
        family=family.name,
        model_id=config.model,
        revision=resolve_revision(config.model, config.revision, model.config),
        dtype=dtype,
        device=device,
        device_map=device_map,
    )


__all__ = [
    "DevicePlan",
    "LoadedModel",
    "ModelConfigError",
    "attention_implementation",
    "compute_device_map",
    "device_map_bytes",
    "dtype_name",
    "family_for",
    "int8_special_dtypes",
    "load_builder",
    "load_model",
    "meta_model",
    "model_config_for",
    "model_folder",
    "pin_to",
    "pin_to_first",
    "top_level_map",
    "resolve_device",
    "resolve_dtype",
    "resolve_revision",
]
