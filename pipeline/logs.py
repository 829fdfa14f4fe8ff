"""Console logging for the `docpipe` command: docpipe's own lines on stderr, other
libraries' chatter in the log at DEBUG (shown with `-v`).

A run's console is for the people running it: progress, the summary and docpipe's own
warnings. Libraries speak there too unless told otherwise: transformers draws a progress
bar for every weight load and logs advice, Pillow warns about damaged EXIF blocks (which
docpipe already records in the row), a Prefect server started on the fly tries to send
telemetry and logs the failure when offline. Some of that happens in child processes
(prep workers are spawned, Prefect runs flows in subprocesses), where this process's
`warnings` and `logging` set-up does not reach; the environment does, so the settings
that tame children are environment variables, set before any child starts or any of those
libraries is imported, and never overriding a value the user set.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import MutableMapping
from typing import Any, TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WARNINGS_LOGGER = "py.warnings"


def quiet_environment(verbose: bool) -> dict[str, str]:
    """Environment settings that keep other libraries off the console (pure).

    - `HF_HUB_DISABLE_PROGRESS_BARS`: transformers' "Loading weights" / "Writing model
      shards" bars (read when transformers is imported).
    - `TRANSFORMERS_VERBOSITY`: transformers logs through its own stderr handler, not
      through ours; `error` keeps its warnings and advice out; `-v` lets its warnings through
      (`warning`), never its INFO (hundreds of lines of model config per load).
    - `PREFECT_SERVER_ANALYTICS_ENABLED`: a Prefect server started by `docpipe serve`
      (or a temporary one) would send telemetry and log its failure when offline.
    - `PYTHONWARNINGS=ignore` for child processes without `-v`: a spawned prep worker's
      Pillow warnings (EXIF, decompression-bomb notices) would otherwise print to the
      shared stderr; this process routes its own warnings to the log instead.
    """
    env = {
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "warning" if verbose else "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "0" if verbose else "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    if not verbose:
        env["PYTHONWARNINGS"] = "ignore"
    return env


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """`warnings.showwarning` replacement: a library's warning is a DEBUG line of the log."""
    logging.getLogger(WARNINGS_LOGGER).debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)


def configure(verbose: bool, environ: MutableMapping[str, str] | None = None) -> None:
    """Set up logging for one `docpipe` command (call first in `main`).

    docpipe's loggers print WARNING and above (everything with `-v`); Python warnings,
    whoever raises them, become DEBUG records of `py.warnings`; the environment for
    libraries and child processes is set as `quiet_environment` says (user values win).
    """
    env: MutableMapping[str, Any] = os.environ if environ is None else environ
    for key, value in quiet_environment(verbose).items():
        env.setdefault(key, value)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format=LOG_FORMAT)
    warnings.showwarning = _log_warning
    # Chatty third-party loggers that use the root handler: their INFO is not ours.
    for name in ("matplotlib", "PIL", "fsspec", "urllib3", "botocore", "s3fs", "aiobotocore", "httpx"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)


def quiet_mupdf() -> None:
    """Keep MuPDF's own error and warning lines (damaged PDFs print dozens) off the console;
    they are kept in `pymupdf.TOOLS.mupdf_warnings()`, which `mupdf_to_log` moves to the log."""
    import pymupdf

    pymupdf.TOOLS.mupdf_display_errors(False)
    pymupdf.TOOLS.mupdf_display_warnings(False)


def mupdf_to_log(logger: logging.Logger, context: str) -> None:
    """Move what MuPDF said since the last call into `logger` at DEBUG (shown with `-v`)."""
    import pymupdf

    said = pymupdf.TOOLS.mupdf_warnings(reset=True)
    if said:
        logger.debug("MuPDF on %s: %s", context, " | ".join(said.splitlines()))
