"""A checkpoint's config.json, read before anything else of it (local folder, hub cache or hub).

Loading, the set-up checks and the engines all start from it; nothing of the checkpoint is
executed. A folder that is not a checkpoint, an unknown hub id or an unreachable hub is a
`ModelConfigError` with one line that says which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ModelConfigError(ValueError):
    """The model settings cannot work (no config.json, bad device list, no memory, ...)."""


class UnsupportedModelError(ValueError):
    """The checkpoint is not of a family this pipeline can drive natively."""


HUB_PROBE_S = 1.5


def hub_unreachable(timeout_s: float = HUB_PROBE_S) -> str | None:
    """Why the model hub cannot be asked (offline mode, or no connection within `timeout_s`), else None.

    huggingface_hub retries a failed request five times with back-off; a probe of the
    hub's host first turns an offline machine into one line in under two seconds.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"the hub ({host}) cannot be reached: {exc.strerror or type(exc).__name__}")

    thread = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"the hub ({host}) did not answer within {timeout_s:.1f} s"
    return outcome[0]


def read_model_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """The checkpoint's config.json as a dict (local folder, or the hub / its local cache)."""
    path = Path(model)
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise ModelConfigError(f"model folder {model} has no config.json: it is not a model checkpoint")
    elif path.exists():
        raise ModelConfigError(f"model {model} is a file; give the checkpoint's folder")
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelConfigError(f"model folder not found: {model}")
    else:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        cached = try_to_load_from_cache(model, "config.json", revision=revision)
        if isinstance(cached, str):
            file = Path(cached)
        else:
            unreachable = hub_unreachable()
            if unreachable:  # say so at once, not after huggingface_hub's retries (~25 s of warnings)
                raise ModelConfigError(
                    f"model {model} cannot be resolved: no local folder of that name, not in the hub cache, and "
                    f"{unreachable}; give the checkpoint's folder, or download it first"
                )
            try:
                file = Path(hf_hub_download(model, "config.json", revision=revision))
            except LocalEntryNotFoundError:
                raise ModelConfigError(
                    f"model {model} cannot be resolved: no local folder of that name, not in the hub cache, and the "
                    "hub cannot be reached (offline)"
                ) from None
            except EntryNotFoundError:
                raise ModelConfigError(f"model {model} has no config.json on the hub: it is not a model checkpoint") from None
            except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated, ...
                text = str(exc).strip().splitlines()
                reason = text[0] if text else type(exc).__name__
                raise ModelConfigError(
                    f"model {model} cannot be resolved: no local folder of that name, not in the hub cache, "
                    f"and the hub said: {reason}"
                ) from None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"model {model}: config.json cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"model {model}: config.json is not a JSON object")
    return data


def model_folder(model: str, revision: str | None = None, *, weights: bool = False) -> Path:
    """A local folder holding the checkpoint's files: `model` itself when it is a folder,
    else the hub snapshot (config and tokenizer files; the weights too with `weights`)."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"] + (["*.safetensors"] if weights else [])
    return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))


__all__ = ["HUB_PROBE_S", "ModelConfigError", "UnsupportedModelError", "hub_unreachable", "model_folder", "read_model_config"]
