"""The Prefect flows in-process against the session's Prefect server: parameters, artifacts, retries, errors."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.utilities.callables import parameter_schema

from flows import fanout as fanout_mod
from flows import tasks
from flows.fanout import ChildRun, fanout, process_shard_flow, triage
from flows.ingest import ingest
from flows.parameters import ConfigurationError, build_config, public_url
from pipeline import runner
from pipeline.config import RunConfig
from tests.prefect_support import (
    expected_pages,
    make_corpus,
    make_png,
    page_key_counts,
    pages_by_name,
    read_rows,
    write_bytes_s3,
)

SECRET = "s3cr3t-DOCPIPE-never-shown"


# ---------------------------------------------------------------------------------------
# Parameters: generated from RunConfig
# ---------------------------------------------------------------------------------------


def _field_defaults() -> dict[str, Any]:
    return {
        name: (inspect.Parameter.empty if info.is_required() else info.get_default(call_default_factory=True))
        for name, info in RunConfig.model_fields.items()
    }


def test_ingest_parameters_are_exactly_the_runconfig_fields():
    params = inspect.signature(ingest.fn).parameters
    assert list(params) == list(RunConfig.model_fields)
    assert {name: p.default for name, p in params.items()} == _field_defaults()


def test_parameter_schema_carries_required_fields_types_constraints_and_help():
    schema = ingest.parameters.model_dump_for_openapi()
    props = schema["properties"]
    assert schema["required"] == ["source", "output"]
    assert set(props) == set(RunConfig.model_fields)
    for name, info in RunConfig.model_fields.items():
        assert props[name]["description"] == " ".join((info.description or "").split())
    assert props["shard_size"]["minimum"] == 1 and props["shard_size"]["default"] == 64
    assert props["tiling_policy"]["enum"] == ["internvl", "minimax", "minicpm"]
    assert props["storage_options"]["type"] == "object"


def test_deploy_sees_the_same_schema_as_the_flow_object():
    # `prefect deploy` loads the entrypoint and calls parameter_schema on it.
    from prefect.flows import load_flow_from_entrypoint

    import flows.ingest

    loaded = load_flow_from_entrypoint(f"{flows.ingest.__file__}:ingest")
    assert loaded.name == "docpipe-ingest"
    assert parameter_schema(loaded).model_dump_for_openapi() == ingest.parameters.model_dump_for_openapi()


def test_fanout_parameters_are_runconfig_plus_its_own():
    params = inspect.signature(fanout.fn).parameters
    assert list(params) == [*RunConfig.model_fields, "shard_deployment", "max_resubmits"]
    assert params["shard_deployment"].default == "docpipe-process-shard/process-shard"
    child = process_shard_flow.parameters.model_dump_for_openapi()
    assert child["required"] == ["shard", "config", "run_id"]


def test_bad_settings_name_the_field_but_never_echo_values():
    with pytest.raises(ConfigurationError) as err:
        build_config({"source": "in", "output": "out", "shard_size": 0, "storage_options": {"secret": SECRET},
                      "no_such_setting": SECRET})
    message = str(err.value)
    assert "shard_size" in message and "no_such_setting" in message
    assert SECRET not in message
    with pytest.raises(ConfigurationError, match="min_dpi"):
        build_config({"source": "in", "output": "out", "min_dpi": 400, "max_dpi": 100})
    assert build_config({"source": "in", "output": "out", "shard_size": "3"}).shard_size == 3


def test_flow_settings_equal_cli_settings_for_the_same_flags():
    # A flow call passes every default explicitly; the config (and its fingerprint, part
    # of every shard id) must still equal the one `docpipe run` builds from the same flags.
    params = {name: p.default for name, p in inspect.signature(ingest.fn).parameters.items()}
    params.update(source="in", output="out", shard_size=5)
    built = build_config(params)
    assert built == RunConfig(source="in", output="out", shard_size=5)
    assert built.fingerprint() == RunConfig(source="in", output="out").fingerprint()


def test_served_deployment_checks_its_schedule_and_defaults_up_front():
    from flows.deploy import ingest_deployment

    with pytest.raises(ValueError, match="source"):
        ingest_deployment("nightly", cron="0 2 * * *")
    with pytest.raises(ConfigurationError, match="shard_size"):
        ingest_deployment("nightly", cron="0 2 * * *", parameters={"source": "in", "output": "out", "shard_size": 0})
    deployment = ingest_deployment("nightly", cron="0 2 * * *", parameters={"source": "in", "output": "out"})
    assert deployment.name == "nightly" and deployment.entrypoint == "flows.ingest.ingest"
    assert deployment.schedules[0].schedule.cron == "0 2 * * *"
    assert deployment.parameters == {"source": "in", "output": "out"}
    assert ingest_deployment("adhoc").schedules == []


def test_public_url_drops_user_info():
    assert public_url("s3://AKIA:secret@bucket/out") == "s3://bucket/out"
    assert public_url("s3://bucket/out") == "s3://bucket/out"
    assert public_url("/data/out") == "/data/out"


# ---------------------------------------------------------------------------------------
# Retry policy and fan-out triage (pure)
# ---------------------------------------------------------------------------------------


def _client_error(code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "x"}}, "PutObject")


def _wrapped(inner: BaseException) -> RuntimeError:
    try:
        raise RuntimeError("write failed") from inner
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OSError("connection reset"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (_client_error("SlowDown"), True),
        (_client_error("InternalError"), True),
        (_client_error("AccessDenied"), False),
        (_client_error("NoSuchBucket"), False),
        (_wrapped(OSError("broken pipe")), True),
        (PermissionError("denied"), False),
        (FileNotFoundError("no such source"), False),
        (_wrapped(FileNotFoundError("gone")), False),
        (ValueError("bad value"), False),
        (KeyError("refs"), False),
        (ConfigurationError("invalid docpipe settings"), False),
        (None, False),
    ],
)
def test_only_transient_storage_errors_are_retried(exc, transient):
    assert tasks.is_transient(exc) is transient


def test_botocore_connection_errors_are_transient():
    from botocore.exceptions import EndpointConnectionError

    assert tasks.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))


@pytest.mark.parametrize(
    ("state", "attempts", "verdict"),
    [
        (StateType.COMPLETED, 1, "done"),
        (StateType.FAILED, 1, "resubmit"),
        (StateType.CRASHED, 1, "resubmit"),
        (StateType.CRASHED, 2, "failed"),
        (StateType.FAILED, 2, "failed"),
        (StateType.CANCELLED, 1, "failed"),
        (StateType.RUNNING, 5, "wait"),
        (StateType.SCHEDULED, 1, "wait"),
        (StateType.PENDING, 1, "wait"),
        (None, 1, "wait"),
    ],
)
def test_triage_of_child_runs(state, attempts, verdict):
    assert triage(state, attempts, max_resubmits=1) == verdict


def test_no_resubmits_when_disabled():
    assert triage(StateType.CRASHED, 1, max_resubmits=0) == "failed"


# ---------------------------------------------------------------------------------------
# Flows against a temporary Prefect server
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api(prefect_server):
    """The flows run in this process against the session's Prefect server."""
    with temporary_settings(updates={PREFECT_HOME: str(prefect_server.home), PREFECT_API_URL: prefect_server.api_url,
                                     PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        yield


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """5 small PDFs (1-3 pages), a PNG and a broken PDF."""
    src = tmp_path / "in"
    expected = make_corpus(src, 5)
    make_png(src / "scan.png", "a scanned page")
    expected["scan.png"] = 1
    (src / "broken.pdf").write_bytes(b"%PDF-1.7\nthis is not really a pdf")
    return src, expected


def _artifacts(flow_run_id) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def _summary_table(flow_run_id) -> dict[str, Any]:
    tables = [a for a in _artifacts(flow_run_id) if a.key == tasks.SUMMARY_KEY]
    assert len(tables) == 1
    return {row["metric"]: row["value"] for row in json.loads(tables[0].data)}


def _flow_run_logs(flow_run_id) -> str:
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # send what is queued before reading it back
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def _shard_task_runs(flow_run_id) -> list[Any]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
    return [r for r in runs if r.name.startswith("shard-")]


@pytest.mark.slow
def test_ingest_folder_every_page_once_with_artifacts(prefect_api, corpus, tmp_path: Path):
    src, expected = corpus
    out = tmp_path / "out"
    state = ingest(source=str(src), output=str(out), shard_size=2, return_state=True)
    assert state.is_completed(), state.message
    pages = read_rows(str(out), "pages")
    assert pages_by_name(pages) == expected_pages(expected)
    assert max(page_key_counts(pages).values()) == 1
    docs = {Path(d["source_uri"]).name: d for d in read_rows(str(out), "documents")}
    assert len(docs) == 7
    assert docs["broken.pdf"]["status"] == "error" and docs["broken.pdf"]["error_type"]
    assert all(p["description"] is None for p in pages)  # no model: model columns null

    flow_run_id = state.state_details.flow_run_id
    assert len(_shard_task_runs(flow_run_id)) == 4  # 7 documents, shard_size 2: one task per shard
    table = _summary_table(flow_run_id)
    assert table["pages"] == sum(expected.values()) == len(pages)
    assert table["documents processed"] == 7
    assert table["output"] == str(out)
    assert table["model"].startswith("none")
    assert any(metric.startswith("error: ") for metric in table)
    progress = [a for a in _artifacts(flow_run_id) if a.type == "progress"]
    assert len(progress) == 1 and float(progress[0].data) == 100.0
    # the same figures as the terminal's line: current shard, pages, pages/s (no model: no tokens)
    assert progress[0].description.startswith("run `") and "4 of 4 shards finished" in progress[0].description
    assert "shard 4/4" in progress[0].description and "pages/s" in progress[0].description
    assert "tok/s" not in progress[0].description

    # A rerun finds everything done and writes nothing.
    files_before = sorted(p.name for t in ("pages", "documents") for p in (out / t).glob("*.parquet"))
    again = ingest(source=str(src), output=str(out), shard_size=2, return_state=True)
    assert again.is_completed()
    rerun = _summary_table(again.state_details.flow_run_id)
    assert rerun["documents processed"] == 0 and rerun["documents already done (skipped)"] == 7
    assert sorted(p.name for t in ("pages", "documents") for p in (out / t).glob("*.parquet")) == files_before


@pytest.mark.slow
def test_ingest_bucket_keeps_credentials_out_of_logs_artifacts_and_parquet(
    prefect_api, corpus, s3_bucket: str, s3_endpoint: str, tmp_path: Path
):
    src, expected = corpus
    options = {"endpoint_url": s3_endpoint, "key": "AKIDOCPIPETEST", "secret": SECRET}
    write_bytes_s3(src, f"{s3_bucket}/incoming", options)
    output = f"s3://{s3_bucket}/parquet"
    state = ingest(source=f"s3://{s3_bucket}/incoming", output=output, storage_options=options, shard_size=3,
                   return_state=True)
    assert state.is_completed(), state.message
    pages = read_rows(output, "pages", options)
    assert pages_by_name(pages) == expected_pages(expected)

    flow_run_id = state.state_details.flow_run_id
    logs = _flow_run_logs(flow_run_id)
    assert "storage_options" in logs and "endpoint_url" in logs  # settings are logged, keys only
    assert SECRET not in logs and "AKIDOCPIPETEST" not in logs
    for artifact in _artifacts(flow_run_id):
        assert SECRET not in f"{artifact.data} {artifact.description}"
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    for path in fs.find(f"{s3_bucket}/parquet"):
        assert SECRET.encode() not in fs.cat(path)


@pytest.mark.slow
def test_broken_configuration_fails_fast_and_writes_nothing(prefect_api, corpus, tmp_path: Path):
    src, _ = corpus
    out = tmp_path / "out"
    state = ingest(source=str(src), output=str(out), min_dpi=400, max_dpi=100, return_state=True)
    assert state.is_failed()
    assert "min_dpi" in (state.message or "") or "min_dpi" in repr(state.result(raise_on_failure=False))
    assert not out.exists()
    assert _shard_task_runs(state.state_details.flow_run_id) == []


@pytest.mark.slow
def test_missing_source_fails_without_retries(prefect_api, tmp_path: Path):
    state = ingest(source=str(tmp_path / "nowhere"), output=str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    assert "source not found" in (state.message or "")
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    assert runs == []  # the setup check fails before discovery, and nothing retries it
    assert not (tmp_path / "out" / "documents").exists()
    # the reason is where people look: an ERROR line of the run's log (what `--watch` streams)
    # and the run's failure artifact
    flow_run_id = state.state_details.flow_run_id
    assert "failed: source not found" in _flow_run_logs(flow_run_id)
    failure = [a for a in _artifacts(flow_run_id) if a.key == tasks.FAILURE_KEY]
    assert len(failure) == 1 and "source not found" in str(failure[0].data)


@pytest.mark.slow
def test_an_expected_failure_ends_the_flow_run_in_one_line_and_a_bug_keeps_its_traceback(
    prefect_api, tmp_path: Path, monkeypatch
):
    state = ingest(source=str(tmp_path / "nowhere"), output=str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    message = state.message or ""
    assert message.startswith("source not found") and "\n" not in message, message
    assert "ConfigurationError" not in message and "encountered an exception" not in message  # the reason alone
    logs = _flow_run_logs(state.state_details.flow_run_id)
    assert f"failed: {message}" in logs  # the one line, where `--watch` and the UI show it
    assert "Traceback" not in logs and "Encountered exception" not in logs, logs

    def bug(run):  # not a user's mistake: our own error keeps its traceback
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(runner.Run, "begin", bug)
    state = ingest(source=str(tmp_path / "nowhere"), output=str(tmp_path / "out"), return_state=True)
    assert state.is_failed() and "ZeroDivisionError" in (state.message or "")
    assert "Traceback" in _flow_run_logs(state.state_details.flow_run_id)


def plan_elsewhere(config: RunConfig, tmp_path: Path) -> runner.WorkPlan:
    """The shards a run of `config` will cut (shard ids do not depend on the output), planned
    in a scratch output so the real one stays empty."""
    scratch = config.model_copy(update={"output": str(tmp_path / f"scratch-{len(list(tmp_path.iterdir()))}")})
    handle = runner.begin_run(scratch)
    try:
        return runner.discover_work(scratch, handle)
    finally:
        runner.end_run(handle, "completed")


@pytest.fixture()
def instant_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "process_shard_task", tasks.process_shard_task.with_options(retry_delay_seconds=0))


@pytest.mark.slow
def test_transient_storage_error_is_retried(prefect_api, corpus, tmp_path: Path, monkeypatch, instant_retries):
    src, expected = corpus
    calls: dict[str, int] = {}
    real = runner.process_shard

    def flaky(shard, config, **kwargs):
        calls[shard.shard_id] = calls.get(shard.shard_id, 0) + 1
        if calls[shard.shard_id] == 1:
            raise ConnectionResetError("connection reset by peer (simulated)")
        return real(shard, config, **kwargs)

    monkeypatch.setattr(runner, "process_shard", flaky)
    out = tmp_path / "out"
    state = ingest(source=str(src), output=str(out), shard_size=4, return_state=True)
    assert state.is_completed(), state.message
    assert sorted(calls.values()) == [2, 2]  # two shards, each failed once then succeeded
    assert pages_by_name(read_rows(str(out), "pages")) == expected_pages(expected)


@pytest.mark.slow
def test_bad_shard_is_not_retried_others_finish_and_rerun_resumes(
    prefect_api, corpus, tmp_path: Path, monkeypatch, instant_retries
):
    src, expected = corpus
    calls: list[str] = []
    real = runner.process_shard
    plan = plan_elsewhere(RunConfig(source=str(src), output=str(tmp_path / "out"), shard_size=2), tmp_path)
    doomed = plan.shards[1].shard_id

    def picky(shard, config, **kwargs):
        calls.append(shard.shard_id)
        if shard.shard_id == doomed:
            raise ValueError("a programming error (simulated)")
        return real(shard, config, **kwargs)

    monkeypatch.setattr(runner, "process_shard", picky)
    out = tmp_path / "out"
    state = ingest(source=str(src), output=str(out), shard_size=2, return_state=True)
    assert state.is_failed()
    assert calls.count(doomed) == 1  # never retried
    assert len(calls) == len(plan.shards)  # the other shards still ran
    assert doomed in (state.message or "") or doomed in repr(state.result(raise_on_failure=False))
    done = {d["shard_id"] for d in read_rows(str(out), "documents")}
    assert doomed not in done and len(done) == len(plan.shards) - 1

    monkeypatch.setattr(runner, "process_shard", real)
    again = ingest(source=str(src), output=str(out), shard_size=2, return_state=True)
    assert again.is_completed(), again.message
    table = _summary_table(again.state_details.flow_run_id)
    assert table["documents processed"] == len(plan.shards[1].refs)
    pages = read_rows(str(out), "pages")
    assert pages_by_name(pages) == expected_pages(expected)
    assert max(page_key_counts(pages).values()) == 1


@pytest.mark.slow
def test_child_flow_publishes_its_result_for_the_parent(prefect_api, corpus, tmp_path: Path):
    src, _ = corpus
    config = RunConfig(source=str(src), output=str(tmp_path / "out"), shard_size=3)
    shard = plan_elsewhere(config, tmp_path).shards[0]
    state = process_shard_flow(shard=shard.to_dict(), config=config.model_dump(mode="json"), run_id="run-x",
                               return_state=True)
    assert state.is_completed(), state.message
    returned = state.result()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))[0]
        assert run.name == f"shard-{shard.shard_id}"
        result = fanout_mod._read_result(client, ChildRun(shard, flow_run_id))
    assert result.shard_id == shard.shard_id and result.documents == 3
    assert result.pages == returned["pages"] > 0
    rows = read_rows(str(tmp_path / "out"), "documents")
    assert {r["run_id"] for r in rows} == {"run-x"}
