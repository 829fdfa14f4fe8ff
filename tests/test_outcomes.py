"""One map from a failure to how a run ends: `docpipe run` and the flows both end by it."""

from __future__ import annotations

import ast
import logging
import signal
from pathlib import Path

import pytest
from prefect.exceptions import TerminationSignal
from pydantic import ValidationError

from flows import tasks
from flows.ingest import ingest
from pipeline import outcomes, runner
from pipeline.cli import Terminated, main
from pipeline.config import RunConfig
from pipeline.dataset import LeaseLost, OutputBusy, OutputUnsafe
from pipeline.outcomes import ConfigurationError, OutputIncomplete, RunFailed, SettingsChanged
from pipeline.preflight import SetupError
from pipeline.prepare import PrepWorkersFailing
from pipeline.shard.run import DeviceFailure

ROOT = Path(__file__).resolve().parents[1]
RESUME = "finished shards are kept; run the same command again to resume"


def _validation_error() -> ValidationError:
    try:
        RunConfig(source="in", output="out", shard_size=0, storage_options={"secret": "s3cr3t"})
    except ValidationError as exc:
        return exc
    raise AssertionError("shard_size=0 is valid?")


BUSY = "output /out is in use by run r1 (host h, pid 1)"
INVALID = "invalid configuration: shard_size: Input should be greater than or equal to 1"
# the failure -> (exit code, the command's line, a flow run's Failed message or None when the
# flow run raises it, the runs row's status and message), as docpipe ended runs before the table
CASES = [
    (SetupError("source not found: /in"), 2, "source not found: /in", "source not found: /in",
     "failed", "SetupError: source not found: /in"),
    (ConfigurationError("invalid docpipe settings: shard_size"), 2, "invalid docpipe settings: shard_size",
     "invalid docpipe settings: shard_size", "failed", "ConfigurationError: invalid docpipe settings: shard_size"),
    (SettingsChanged("other settings"), 2, "other settings", "other settings", "failed",
     "SettingsChanged: other settings"),
    (OutputUnsafe("/out is a link"), 2, "/out is a link", "OutputUnsafe: /out is a link", "failed",
     "OutputUnsafe: /out is a link"),
    (PrepWorkersFailing("workers keep dying"), 2, "workers keep dying", "PrepWorkersFailing: workers keep dying",
     "failed", "PrepWorkersFailing: workers keep dying"),
    (OutputBusy(BUSY), 3, f"{BUSY}; try again when it has finished, or pass --wait-for-output-s", BUSY,
     "failed", f"OutputBusy: {BUSY}"),
    (DeviceFailure("the model failed"), 1, f"the model failed; {RESUME}", "DeviceFailure: the model failed",
     "failed", "DeviceFailure: the model failed"),
    (LeaseLost("run r1 lost the output"), 1, f"run r1 lost the output; {RESUME}",
     "LeaseLost: run r1 lost the output", "failed", "LeaseLost: run r1 lost the output"),
    (OutputIncomplete("1 of the 2 shards"), 1, "1 of the 2 shards", "1 of the 2 shards", "failed",
     "OutputIncomplete: 1 of the 2 shards"),
    (RunFailed("2 of 4 shards failed"), 1, "2 of 4 shards failed", "2 of 4 shards failed", "failed",
     "2 of 4 shards failed"),
    (ConnectionResetError("reset by peer"), 1, f"storage error: ConnectionResetError: reset by peer; {RESUME}",
     None, "failed", "ConnectionResetError: reset by peer"),
    (_validation_error(), 2, INVALID, None, "failed", f"ValidationError: {INVALID.split(': ', 1)[1]}"),
    (KeyboardInterrupt(), 130, f"interrupted; {RESUME}", None, "interrupted", "interrupted by the user"),
    (Terminated(signal.SIGTERM), 143, f"terminated by SIGTERM; {RESUME}", None, "interrupted",
     "terminated by SIGTERM"),
    (Terminated(signal.SIGHUP), 129, f"terminated by SIGHUP; {RESUME}", None, "interrupted", "terminated by SIGHUP"),
    (ZeroDivisionError("a bug"), 1, "run failed: ZeroDivisionError: a bug (run with -v for the traceback)", None,
     "failed", "ZeroDivisionError: a bug"),
]
IDS = [type(case[0]).__name__ + (f"-{case[0].signum}" if isinstance(case[0], Terminated) else "") for case in CASES]


def _raising(exc: BaseException):
    def execute(self, execution):
        raise exc

    return execute


@pytest.mark.parametrize(("exc", "code", "line", "flow", "status", "row"), CASES, ids=IDS)
def test_the_command_ends_as_the_table_says(exc, code, line, flow, status, row, tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    monkeypatch.setattr(runner.Run, "check_setup", lambda self: None)
    monkeypatch.setattr(runner.Run, "execute", _raising(exc))
    assert main(["run", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress"]) == code
    assert capsys.readouterr().err == f"docpipe: {line}\n"


@pytest.mark.parametrize(("exc", "code", "line", "flow", "status", "row"),
                         [*CASES, (TerminationSignal(15), 143, "", None, "interrupted", "terminated by signal 15")],
                         ids=[*IDS, "TerminationSignal"])
def test_a_flow_run_and_the_runs_row_end_as_the_table_says(exc, code, line, flow, status, row, tmp_path: Path,
                                                          monkeypatch):
    monkeypatch.setattr(tasks, "get_run_logger", lambda: logging.getLogger("docpipe.test"))
    monkeypatch.setattr(runner.Run, "execute", _raising(exc))
    if flow is None:  # Prefect ends the flow run: a traceback, or Cancelled for a signal
        with pytest.raises(type(exc)):
            ingest.fn(source=str(tmp_path / "in"), output=str(tmp_path / "out"))
    else:
        state = ingest.fn(source=str(tmp_path / "in"), output=str(tmp_path / "out"))
        assert state.is_failed() and state.message == flow
    assert outcomes.run_status(exc) == status and outcomes.run_message(exc) == row
    assert "s3cr3t" not in outcomes.run_message(exc) + outcomes.flow_message(exc)


@pytest.mark.parametrize(("command", "again"), [("compact", "compact"), ("verify", "verify --repair")])
def test_compact_and_verify_say_a_busy_output_in_their_words(command, again, tmp_path: Path, monkeypatch, capsys):
    from pipeline.dataset import Dataset

    def busy(self, *args, **kwargs):
        raise OutputBusy(BUSY)

    (tmp_path / "out" / "runs").mkdir(parents=True)
    monkeypatch.setattr(Dataset, "acquire", busy)
    assert main([command, str(tmp_path / "out"), *(["--repair"] if command == "verify" else [])]) == 3
    assert capsys.readouterr().err == f"docpipe: {BUSY}; {again} when it has finished, or pass --wait-for-output-s\n"


# ---- every failure raised on purpose is in the table ------------------------------------

# Exception classes of pipeline/ and flows/ that never end a run, and why.
NEVER_END_A_RUN = {
    "ModelConfigError": "the setup checks say it as a SetupError (pipeline/preflight.py) before any work",
    "UnsupportedModelError": "the setup checks say it as a SetupError (pipeline/preflight.py) before any work",
    "EngineUnavailable": "the setup checks say it as a SetupError (pipeline/preflight.py) before any work",
    "OutputNotWritable": "the setup checks say it as a SetupError (its subclass OutputUnsafe is in the table)",
    "Terminated": "docpipe's SIGTERM/SIGHUP: a KeyboardInterrupt, which is in the table",
    "ReportError": "`docpipe report`'s, not a run's",
    "_PageTooLarge": "caught in pipeline/rasterize/pdf.py: the page is rendered smaller or becomes an error row",
    "_TooLarge": "caught in pipeline/report/thumbnails.py: the thumbnail is left out",
    "UnsupportedCacheError": "raised inside a model call: the page engine makes it the batch's pages' error rows",
}


def raised_classes(roots: list[Path]) -> dict[str, set[str]]:
    """Exception classes defined under `roots` and raised there (`raise Name(...)`), with the
    files that raise them."""
    defined: set[str] = set()
    raised: dict[str, set[str]] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ClassDef):
                    defined.add(node.name)
                elif isinstance(node, ast.Raise) and node.exc is not None:
                    target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                    name = getattr(target, "attr", None) or getattr(target, "id", None)
                    if name:
                        raised.setdefault(name, set()).add(path.relative_to(root.parent).as_posix())
    return {name: files for name, files in raised.items() if name in defined}


def _tabled() -> set[str]:
    return {key if isinstance(key, str) else key.__name__ for key, _outcome in outcomes.FAILURES}


def test_every_failure_a_run_raises_on_purpose_is_in_the_table(tmp_path: Path) -> None:
    roots = [ROOT / "pipeline", ROOT / "flows"]
    ours = raised_classes(roots)
    assert sorted(set(ours) - _tabled() - set(NEVER_END_A_RUN)) == []
    # no stale entries: what the table and the list name is raised by our code, or by pydantic,
    # the operating system, Python (Ctrl-C) or Prefect (a cancelled flow run)
    not_ours = {"ValidationError", "OSError", "KeyboardInterrupt", "TerminationSignal"}
    assert (_tabled() | set(NEVER_END_A_RUN)) - set(ours) == not_ours
    # the check is not blind: a new failure raised on purpose and left out of the table is found
    planted = tmp_path / "pipeline"
    planted.mkdir()
    (planted / "new.py").write_text("class QuotaExceeded(RuntimeError):\n    pass\n\n\ndef f():\n"
                                    "    raise QuotaExceeded('too many pages')\n")
    assert set(raised_classes([planted])) - _tabled() == {"QuotaExceeded"}


def test_both_surfaces_take_their_failures_from_the_table() -> None:
    """The flows catch exactly the table's failures that have a flow line; the command has no
    list of its own (`_cmd_run` asks the table)."""
    expected = {key for key, outcome in outcomes.FAILURES if isinstance(key, type) and outcome.flow is not None}
    assert set(outcomes.flow_failures()) == expected
    assert not hasattr(tasks, "expected_failures") and not hasattr(tasks, "describe_failure")
    source = (ROOT / "pipeline" / "cli.py").read_text()
    run_source = source[source.index("def _cmd_run"):source.index("def _cmd_make_tiny_model")]
    assert "except (" not in run_source and "SetupError" not in run_source
