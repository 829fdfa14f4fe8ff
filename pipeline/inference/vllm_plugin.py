"""docpipe's vLLM plugin: the seed families' vLLM classes, registered in every vLLM process.

Installed with docpipe as the entry point `docpipe` of the group `vllm.general_plugins`
(pyproject.toml); vLLM calls `register()` in each of its processes (the one that builds
`vllm.LLM`, its engine core, every worker), so it is re-entrant and cheap: it registers

* the config parser `docpipe` (`LLM(config_format="docpipe")`): a seed checkpoint's
  config.json read by the family's own config class (`family.code().load_config`), its
  `architectures` set to the family's docpipe-owned vLLM architecture (`DocpipeMiniCPMV2`,
  ...), then the family's `adapt_config` if it has one. Nothing of the checkpoint runs;
* every family's vLLM architecture, through the module its registry entry names
  (`Family.vllm_module`, `pipeline.inference.families.<name>.vllm`): its `register()` names
  the model class in the string form (`"module:Class"`, imported only when vLLM builds it)
  and the class carries its multimodal processor.

The architecture names are docpipe's own, chosen by docpipe's engine (`config_format` and
`hf_overrides`), so installing docpipe never changes what vLLM does with a checkpoint
that names vLLM's in-tree `MiniCPMV` or `InternVLChatModel`. A family whose module is
missing or fails to register is logged and left out; vLLM goes on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG_FORMAT = "docpipe"  # LLM(config_format=...) for the seed families

_registered: set[str] = set()  # what this process has registered already


def register() -> None:
    """The `vllm.general_plugins` entry point: the config parser and every family's architecture."""
    if CONFIG_FORMAT not in _registered:
        try:
            _register_config_parser()
            _registered.add(CONFIG_FORMAT)
        except Exception as exc:  # noqa: BLE001 - a plugin never takes vLLM down
            log.warning("docpipe: could not register its vLLM config parser: %s", exc)
    from pipeline.inference.registry import FAMILIES

    for family in FAMILIES:
        if family.vllm_module is None or family.name in _registered:
            continue
        refusal = family.vllm_refusal()
        if refusal is not None:  # not built or not runnable here: `--engine vllm` says why, in one line
            log.debug("docpipe: the %s family is not registered in vLLM: %s", family.name, refusal)
            continue
        try:
            family.vllm().register()
            _registered.add(family.name)
        except Exception as exc:  # noqa: BLE001
            log.warning("docpipe: the %s family's vLLM module did not register: %s: %s",
                        family.name, type(exc).__name__, exc)


def read_seed_config(model: str | Path, revision: str | None = None) -> tuple[dict[str, Any], Any]:
    """(config.json as a dict, the family's own config object for vLLM): what the `docpipe`
    config format gives vLLM. Raises ValueError for a checkpoint no family serves through vLLM."""
    from pipeline.inference.checkpoint import model_folder
    from pipeline.inference.registry import recognise

    folder = Path(model_folder(str(model), revision))
    raw = json.loads((folder / "config.json").read_text())
    family = recognise(raw)
    if family.vllm_module is None:
        raise ValueError(f"{model}: the {family.name} family is served by vLLM's own classes, not docpipe's")
    module = family.vllm()
    config = family.code().load_config(str(folder))
    config.architectures = [module.ARCH]
    adapt = getattr(module, "adapt_config", None)
    if adapt is not None:
        config = adapt(config)
    return raw, config


def _register_config_parser() -> None:
    from vllm.transformers_utils.config import register_config_parser
    from vllm.transformers_utils.config_parser_base import ConfigParserBase

    class DocpipeConfigParser(ConfigParserBase):
        """A seed checkpoint's config through its family's config class (no remote code)."""

        def parse(self, model: str | Path, trust_remote_code: bool, revision: str | None = None,
                  code_revision: str | None = None, **kwargs: Any) -> tuple[dict, Any]:
            return read_seed_config(model, revision)

    register_config_parser(CONFIG_FORMAT)(DocpipeConfigParser)


__all__ = ["CONFIG_FORMAT", "read_seed_config", "register"]
