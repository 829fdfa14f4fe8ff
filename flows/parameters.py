"""Flow parameters generated from `RunConfig`: one list of settings, no second copy.

`config_signature()` turns `RunConfig.model_fields` into an `inspect.Signature` (name,
type with its constraints, default) and `config_docstring()` into Google-style "Args:"
lines, which Prefect reads for the parameter descriptions shown in the UI and stored in
the deployment's parameter schema. `with_config_parameters` applies both to a function
that takes `**params` before it is decorated with `@flow`.

`build_config` is the one place parameters become a `RunConfig`; a validation error is a
broken configuration, reported by field and reason only (never the values, which may
hold storage credentials).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, TypeVar

from pydantic import ValidationError

from pipeline.config import RunConfig, describe_validation_error
from pipeline.outcomes import ConfigurationError  # noqa: F401 - re-exported: what build_config raises
from pipeline.sources import public_url  # noqa: F401 - re-exported for the flows

F = TypeVar("F", bound=Callable[..., Any])


def _annotation(info: Any) -> Any:
    """The field's type, with its constraints (ge, gt, ...) so the schema carries them."""
    if info.metadata:
        return Annotated[(info.annotation, *info.metadata)]  # type: ignore[valid-type]
    return info.annotation


def config_parameters() -> list[inspect.Parameter]:
    """One keyword-only parameter per `RunConfig` field, in declaration order."""
    params = []
    for name, info in RunConfig.model_fields.items():
        default = inspect.Parameter.empty if info.is_required() else info.get_default(call_default_factory=True)
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=_annotation(info))
        )
    return params


def config_signature(extra: Iterable[inspect.Parameter] = ()) -> inspect.Signature:
    """Signature of a flow taking every `RunConfig` field (plus `extra` keyword-only ones)."""
    return inspect.Signature([*config_parameters(), *extra])


def config_docstring(summary: str, extra_help: Mapping[str, str] | None = None) -> str:
    """Google-style docstring whose Args are the field descriptions (Prefect parses them)."""
    lines = [summary.strip(), "", "Args:"]
    for name, info in RunConfig.model_fields.items():
        lines.append(f"    {name}: {' '.join((info.description or '').split())}")
    for name, text in (extra_help or {}).items():
        lines.append(f"    {name}: {' '.join(text.split())}")
    return "\n".join(lines) + "\n"


def with_config_parameters(
    summary: str,
    extra: Iterable[inspect.Parameter] = (),
    extra_help: Mapping[str, str] | None = None,
) -> Callable[[F], F]:
    """Give a `**params` function the RunConfig signature, annotations and docstring."""
    extra = list(extra)

    def apply(fn: F) -> F:
        signature = config_signature(extra)
        fn.__signature__ = signature  # type: ignore[attr-defined]
        fn.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        fn.__doc__ = config_docstring(summary, extra_help)
        return fn

    return apply


def explicit_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that differ from RunConfig's defaults.

    A flow call receives every parameter, defaults included; leaving the defaults to
    RunConfig gives the same config (and fingerprint) as `docpipe run` with the same flags.
    """
    defaults = {p.name: p.default for p in config_parameters() if p.default is not inspect.Parameter.empty}
    return {k: v for k, v in params.items() if k not in defaults or v != defaults[k]}


def build_config(params: Mapping[str, Any]) -> RunConfig:
    """Parameters -> RunConfig, or ConfigurationError naming each bad field and why."""
    try:
        return RunConfig(**explicit_settings(params))
    except ValidationError as exc:
        raise ConfigurationError(f"invalid docpipe settings: {describe_validation_error(exc)}") from None
