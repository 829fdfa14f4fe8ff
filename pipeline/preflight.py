"""Set-up checks that run before any work: a broken setting fails in a second, in one line.

`check_setup(config)` checks, in order, that the source exists, that the output can be
written (a probe file), that the model folder or hub id resolves to a supported family
(reading its config.json only: no weights, no remote code) and that the device ids exist.
Each problem is a `SetupError` whose message names the setting; the CLI prints it as one
line and exits 2, the flows fail before discovery.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig
from pipeline.redaction import one_line

log = logging.getLogger(__name__)


class SetupError(ValueError):
    """A setting that cannot work; the message is one line and names the setting."""


@dataclass(frozen=True, slots=True)
class ModelCheck:
    """What the model check found out (reused by the loader)."""

    family: str
    model_type: str
    config: dict[str, Any]


def check_setup(config: RunConfig) -> ModelCheck | None:
    """Raise SetupError for the first broken setting; return the model's family when set."""
    from pipeline.redaction import remember_url

    remember_url(config.source)  # a library's message may quote the URL: its user-info is masked
    remember_url(config.output)
    check_source(config)
    model = check_model(config)
    check_device(config)
    check_engine(config, model)
    check_output(config)  # last: the only check that writes (a probe), so a failed setup leaves no output behind
    return model


def check_source(config: RunConfig) -> None:
    from pipeline.sources import public_url, resolve

    where = public_url(config.source)
    try:
        fs, root = resolve(config.source, config.storage_options)
        if not fs.exists(root):
            raise SetupError(f"source not found: {where}")
    except SetupError:
        raise
    except (ValueError, ImportError) as exc:  # unknown protocol, missing fsspec backend
        raise SetupError(f"source {where} cannot be opened: {one_line(str(exc))}") from None
    except PermissionError:
        raise SetupError(f"source {where} cannot be read: permission denied") from None
    except OSError as exc:
        raise SetupError(f"source {where} cannot be reached: {exc.strerror or type(exc).__name__}") from None
    except Exception as exc:  # noqa: BLE001 - botocore and friends: say what, not a traceback
        raise SetupError(f"source {where} cannot be reached: {type(exc).__name__}: {one_line(str(exc))}") from None


def check_output(config: RunConfig) -> None:
    from pipeline.dataset import Dataset, OutputNotWritable
    from pipeline.sources import public_url

    where = public_url(config.output)
    try:
        Dataset(config.output, config.storage_options).check_writable()
    except OutputNotWritable as exc:
        raise SetupError(str(exc)) from None
    except (ValueError, ImportError) as exc:
        raise SetupError(f"output {where} cannot be opened: {one_line(str(exc))}") from None
    except Exception as exc:  # noqa: BLE001
        raise SetupError(f"output {where} is not writable: {type(exc).__name__}: {one_line(str(exc))}") from None


def read_model_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """The checkpoint's config.json as a dict (pipeline.inference.checkpoint); a SetupError when it cannot be read."""
    from pipeline.inference.checkpoint import ModelConfigError
    from pipeline.inference.checkpoint import read_model_config as read

    try:
        return read(model, revision)
    except ModelConfigError as exc:
        raise SetupError(str(exc)) from None


def check_model(config: RunConfig) -> ModelCheck | None:
    if config.model is None:
        return None
    from pipeline.inference.registry import UnsupportedModelError, recognise

    data = read_model_config(config.model, config.revision)
    try:
        family = recognise(data)
    except UnsupportedModelError as exc:
        raise SetupError(f"model {config.model}: {exc}") from None
    if config.tiling_policy_explicit() and config.tiling_policy != family.tiling_policy:
        raise SetupError(
            f"--tiling-policy {config.tiling_policy} contradicts the model, whose family ({family.name}) tiles pages "
            f"its own way ({family.tiling_policy}); leave --tiling-policy out when a model is set"
        )
    return ModelCheck(family=family.name, model_type=str(data.get("model_type", "")), config=data)


def check_device(config: RunConfig) -> None:
    if config.model is None:
        return
    from pipeline.inference.loading import ModelConfigError, resolve_device

    try:
        resolve_device(config.device)
    except ModelConfigError as exc:
        raise SetupError(f"--device {config.device}: {exc}") from None


def check_engine(config: RunConfig, model: ModelCheck | None) -> None:
    """`--engine vllm` where vLLM cannot serve the run is a setup error (the engine's module says why)."""
    if model is None or config.engine == "transformers":
        return
    from pipeline.inference.registry import family_by_name
    from pipeline.inference.vllm_engine import EngineUnavailable, resolve_engine

    try:
        resolve_engine(config, family_by_name(model.family), model.config)
    except EngineUnavailable as exc:
        raise SetupError(str(exc)) from None


__all__ = ["ModelCheck", "SetupError", "check_setup", "read_model_config"]
