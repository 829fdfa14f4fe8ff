"""Credentials in a URL never leave the process in a message (pipeline/redaction.py), and run
ids are checked before the output is touched and escaped wherever they are shown."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline import redaction
from pipeline.cli import EXIT_BAD_CONFIG, main

KEY, SECRET = "AKIAFAKEKEY0001", "s3cr3tSECRETvalue"


def test_user_info_is_masked_wherever_it_appears() -> None:
    redaction.remember_url(f"s3://{KEY}:{SECRET}@bucket/in")
    text = f'Invalid bucket name "{KEY}:{SECRET}@bucket"; key {KEY}; ftp://bob:pw@host/x'
    cleaned = redaction.redact(text)
    assert KEY not in cleaned and SECRET not in cleaned and "bob:pw" not in cleaned
    assert "ftp://***@host/x" in cleaned and '"***@bucket"' in cleaned
    assert redaction.one_line("first\n  second\n") == "first second"


def test_library_log_records_are_masked(capsys: pytest.CaptureFixture[str]) -> None:
    redaction.remember_url(f"s3://{KEY}:{SECRET}@bucket/in")
    handler = logging.StreamHandler()
    logger = logging.getLogger("botocore.test-redaction")
    logger.propagate = False  # only this handler (earlier tests' root handlers hold closed streams)
    logger.addHandler(handler)
    redaction.install(logger)
    try:
        logger.error("bucket %s is invalid", f"{KEY}:{SECRET}@bucket")
        try:
            raise ValueError(f"s3://{KEY}:{SECRET}@bucket/x")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "bucket ***@bucket is invalid" in err and "ValueError: s3://***@bucket/x" in err
    assert KEY not in err and SECRET not in err


@pytest.mark.parametrize("command", ["run-source", "run-output", "verify", "verify --repair", "compact", "report"])
def test_credentials_in_an_s3_url_are_never_printed(
    command: str, s3_bucket: str, s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{KEY}:{SECRET}@{s3_bucket}/docs"
    options = ["--storage-options", json.dumps({"endpoint_url": s3_endpoint})]
    src = tmp_path / "src"
    src.mkdir()
    argv = {
        "run-source": ["run", url, "--output", str(tmp_path / "out"), "--no-progress", *options],
        "run-output": ["run", str(src), "--output", url, "--no-progress", *options],
        "verify": ["verify", url, *options],
        "verify --repair": ["verify", url, "--repair", *options],
        "compact": ["compact", url, *options],
        "report": ["report", url, "--html", str(tmp_path / "r.html"), *options],
    }[command]
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (EXIT_BAD_CONFIG, 1) and err.count("\n") == 1, err  # one line
    assert KEY not in err and SECRET not in err, err


@pytest.mark.parametrize("run_id", ["../escape", "a`b<img src=x onerror=alert(1)>", "x" * 129, ".hidden", "a/b"])
def test_a_bad_run_id_is_refused_before_the_output_is_touched(
    run_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.pdf").write_bytes(b"%PDF-1.4")
    out = tmp_path / "out"
    assert main(["run", str(src), "--output", str(out), "--no-progress", "--run-id", run_id]) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "run_id" in err and err.count("\n") == 1
    assert not out.exists()  # no lease, no probe: nothing written


def test_begin_run_checks_a_run_id_given_directly(tmp_path: Path) -> None:
    from pipeline.config import RunConfig
    from pipeline.preflight import SetupError
    from pipeline.runner import begin_run

    config = RunConfig(source=str(tmp_path), output=str(tmp_path / "out"))
    with pytest.raises(SetupError, match="invalid run id"):
        begin_run(config, "../x")
    assert not (tmp_path / "out").exists()
