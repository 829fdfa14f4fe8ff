"""How a run ends: one table from each failure a run raises on purpose to its outcome.

`docpipe run` and the Prefect flows end a run the same way. A failure found in `FAILURES` (by
its class or the nearest base class listed) is a user's mistake or the world's, said in one line
and no traceback: the command prints its `line` and exits with its `exit_code`; a flow run ends
Failed with its `flow` line as the state message (or, where `flow` is None, as Prefect ends it: a
traceback, or Cancelled for a signal); the runs row gets its `status` and its `row` message.
Anything not in the table is a bug of ours and keeps its traceback (the command prints one line
and exits 1, the traceback with -v; a flow run fails with it).

The lines are templates: `{message}` (the exception's text; a pydantic error is described by field
and reason only, never its values), `{type}` (its class name), `{resume}` (`RESUME`), `{again}`
(what to run again: "try again", "compact", "verify --repair"). A signal's exit code is 128 + its
number (Ctrl-C: 130). tests/test_outcomes.py checks that every exception class pipeline/ and
flows/ raise is either in the table or named there as one that never ends a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from pydantic import ValidationError

from pipeline.config import describe_validation_error
from pipeline.dataset import LeaseLost, OutputBusy, OutputUnsafe
from pipeline.preflight import SetupError
from pipeline.prepare import PrepWorkersFailing
from pipeline.records import RunStatus
from pipeline.redaction import one_line
from pipeline.shard.run import DeviceFailure

EXIT_OK = 0
EXIT_NOTHING_PROCESSED = 1  # also: the run failed (device failure, storage failure); a rerun resumes
EXIT_BAD_CONFIG = 2
EXIT_OUTPUT_BUSY = 3  # another live run owns the output
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); SIGTERM ends with 143 and SIGHUP with 129 (128 + the signal's number)

RESUME = "finished shards are kept; run the same command again to resume"


class ConfigurationError(ValueError):
    """The run's settings are invalid (a flow's parameters): the run stops before doing any work."""


class SettingsChanged(ValueError):
    """The output holds rows written with other output settings and the run did not ask to reprocess."""


class OutputIncomplete(RuntimeError):
    """Shards this run committed are not whole in the output (checked at its end): it did not succeed."""


class RunFailed(RuntimeError):
    """A run ended for a reason already said in one line (shards failed: a rerun resumes)."""


Line = str | Callable[[BaseException], str]
_NAMED = "{type}: {message}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run that met one kind of failure ends (see the module docstring)."""

    exit_code: int  # `docpipe run`'s exit code (a signal's: 128 + its number)
    line: Line  # the command's one line on stderr (after "docpipe: ")
    flow: Line | None  # a flow run's Failed state message; None: Prefect ends it (traceback, or Cancelled)
    status: RunStatus = RunStatus.FAILED  # the runs row, when the run got as far as writing one
    row: Line = _NAMED  # the runs row's message
    debug_traceback: bool = False  # the command also logs the traceback at DEBUG (`-v` shows it)


def _signal_number(exc: BaseException) -> int | None:
    """The signal that stopped the run: docpipe's SIGTERM/SIGHUP (`signum`), Prefect's (`signal`)."""
    return getattr(exc, "signum", None) or getattr(exc, "signal", None)


def stopped_words(exc: BaseException) -> str:
    """What stopped a command: "terminated by SIGTERM" (docpipe's SIGTERM/SIGHUP), else "interrupted"."""
    return str(exc) if getattr(exc, "signum", None) else "interrupted"


def _terminated_row(exc: BaseException) -> str:
    signum = _signal_number(exc)
    return f"terminated by signal {signum}" if signum else "terminated"


def _stopped_line(exc: BaseException) -> str:
    return f"{stopped_words(exc)}; {RESUME}"

# (the failure: a class, or the name of one docpipe cannot import (Prefect's), its outcome)
FAILURES: tuple[tuple[type[BaseException] | str, Outcome], ...] = (
    # the settings and the setup: nothing was done
    (ValidationError, Outcome(EXIT_BAD_CONFIG, "invalid configuration: {message}", None)),
    (ConfigurationError, Outcome(EXIT_BAD_CONFIG, "{message}", "{message}")),
    (SetupError, Outcome(EXIT_BAD_CONFIG, "{message}", "{message}")),
    (SettingsChanged, Outcome(EXIT_BAD_CONFIG, "{message}", "{message}")),
    (OutputUnsafe, Outcome(EXIT_BAD_CONFIG, "{message}", _NAMED)),
    (PrepWorkersFailing, Outcome(EXIT_BAD_CONFIG, "{message}", _NAMED)),  # the environment cannot run workers
    (OutputBusy, Outcome(EXIT_OUTPUT_BUSY, "{message}; {again} when it has finished, or pass --wait-for-output-s",
                         "{message}")),
    # the run stopped or did not succeed: a rerun resumes
    (DeviceFailure, Outcome(EXIT_NOTHING_PROCESSED, "{message}; {resume}", _NAMED)),
    (LeaseLost, Outcome(EXIT_NOTHING_PROCESSED, "{message}; {resume}", _NAMED)),
    (OutputIncomplete, Outcome(EXIT_NOTHING_PROCESSED, "{message}", "{message}")),
    (RunFailed, Outcome(EXIT_NOTHING_PROCESSED, "{message}", "{message}", row="{message}")),
    # storage failing while writing; in a flow run the shard tasks retry a transient one, and what
    # reaches the flow keeps its traceback
    (OSError, Outcome(EXIT_NOTHING_PROCESSED, "storage error: {type}: {message}; {resume}", None,
                      debug_traceback=True)),
    # stopped by a person or a signal
    (KeyboardInterrupt, Outcome(EXIT_INTERRUPTED, _stopped_line, None, RunStatus.INTERRUPTED,
                                row=lambda e: str(e) or "interrupted by the user")),
    ("TerminationSignal", Outcome(EXIT_INTERRUPTED, _stopped_line, None, RunStatus.INTERRUPTED, row=_terminated_row)),
)

_BY_CLASS = {key: outcome for key, outcome in FAILURES if isinstance(key, type)}
_BY_NAME = {key: outcome for key, outcome in FAILURES if isinstance(key, str)}


def outcome_of(exc: BaseException) -> Outcome | None:
    """The outcome of the nearest class of `exc` in the table; None for a bug of ours."""
    for cls in type(exc).__mro__:
        found = _BY_CLASS.get(cls) or _BY_NAME.get(cls.__name__)
        if found is not None:
            return found
    return None


def _render(line: Line, exc: BaseException, again: str = "try again") -> str:
    if callable(line):
        return line(exc)
    message = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
    return line.format(message=message, type=type(exc).__name__, resume=RESUME, again=again)


def exit_code(exc: BaseException, outcome: Outcome) -> int:
    signum = getattr(exc, "signum", None)
    return 128 + signum if signum else outcome.exit_code


class CommandEnd(NamedTuple):
    code: int
    line: str
    debug_traceback: bool


def command_end(exc: BaseException, *, again: str = "try again") -> CommandEnd | None:
    """How a command that met `exc` ends (exit code, one line); None for a bug of ours (raise it)."""
    outcome = outcome_of(exc)
    if outcome is None:
        return None
    return CommandEnd(exit_code(exc, outcome), one_line(_render(outcome.line, exc, again)), outcome.debug_traceback)


def flow_failures() -> tuple[type[BaseException], ...]:
    """The failures that end a flow run Failed in one line, without a traceback."""
    return tuple(key for key, outcome in FAILURES if isinstance(key, type) and outcome.flow is not None)


def flow_message(exc: BaseException) -> str:
    """One line about `exc` for a flow run (its state, its log, its failure artifact): the table's
    `flow` line, or "Type: message" for anything else (no credential of a URL, whoever's message it
    quotes)."""
    outcome = outcome_of(exc)
    line = outcome.flow if outcome is not None and outcome.flow is not None else _NAMED
    return one_line(_render(line, exc))


def run_status(exc: BaseException) -> RunStatus:
    """The runs row's status for a run that ended with `exc` (`failed` for a bug of ours)."""
    outcome = outcome_of(exc)
    return outcome.status if outcome is not None else RunStatus.FAILED


def run_message(exc: BaseException) -> str:
    """The runs row's message for a run that ended with `exc`, on one line."""
    outcome = outcome_of(exc)
    return one_line(_render(outcome.row if outcome is not None else _NAMED, exc))


__all__ = [
    "EXIT_BAD_CONFIG", "EXIT_INTERRUPTED", "EXIT_NOTHING_PROCESSED", "EXIT_OK", "EXIT_OUTPUT_BUSY", "FAILURES",
    "RESUME", "CommandEnd", "ConfigurationError", "Outcome", "OutputIncomplete", "RunFailed", "SettingsChanged",
    "command_end", "exit_code", "flow_failures", "flow_message", "outcome_of", "run_message", "run_status",
    "stopped_words",
]
