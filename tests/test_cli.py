import pytest

from pipeline.cli import build_parser, config_from_args
from pipeline.config import RunConfig


def test_every_config_field_is_a_run_option():
    parser = build_parser()
    run_parser = parser._subparsers._group_actions[0].choices["run"]  # noqa: SLF001 - introspection in a test
    dests = {a.dest for a in run_parser._actions}
    assert set(RunConfig.model_fields) <= dests


def test_options_parse_into_the_config():
    args = build_parser().parse_args(
        [
            "run", "in", "--output", "out", "--max-tiles", "6", "--tasks", "ocr", "chart",
            "--storage-options", '{"endpoint_url": "http://127.0.0.1:9"}', "--no-progress",
            "--chart-questions", "Which bar is tallest?",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.source == "in" and cfg.output == "out" and cfg.max_tiles == 6
    assert cfg.tasks == ["ocr", "chart"] and cfg.progress is False
    assert cfg.storage_options == {"endpoint_url": "http://127.0.0.1:9"}
    assert cfg.chart_questions == ["Which bar is tallest?"]
    # unspecified options keep the config's own defaults
    assert cfg.max_dpi == RunConfig.model_fields["max_dpi"].default


def test_bad_values_are_refused_by_the_parser():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "in", "--output", "o", "--tiling-policy", "hexagons"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "in", "--output", "o", "--storage-options", "[1]"])


def test_broken_configuration_exits_2(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["run", str(tmp_path), "--output", str(tmp_path / "o"), "--min-dpi", "400", "--max-dpi", "100"]) == 2
    assert "min_dpi" in capsys.readouterr().err


def test_invalid_configuration_never_echoes_values(tmp_path, capsys):
    from pipeline.cli import main

    code = main(["run", str(tmp_path), "--output", "o", "--storage-options", '{"secret": "hunter2"}', "--shard-size", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "shard_size" in err and "hunter2" not in err


def test_serve_params_parse_as_json_or_text():
    from pipeline.cli import parse_params

    assert parse_params(["source=s3://b/in", "shard_size=8", 'tasks=["ocr"]']) == {
        "source": "s3://b/in", "shard_size": 8, "tasks": ["ocr"]
    }
    with pytest.raises(ValueError):
        parse_params(["no-equals-sign"])


def test_serve_with_a_schedule_but_no_source_is_a_configuration_error(capsys):
    from pipeline.cli import main

    assert main(["serve", "--cron", "0 2 * * *"]) == 2
    assert "source" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_fails_before_any_work(tmp_path, s3_storage_options):
    """A missing bucket stands for a read-only mount: found by the probe, one line, exit 2.

    Run as a subprocess: in-process, loggers of earlier tests (Prefect's console handler)
    may write to this test's captured stderr."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(b"not read before the output is checked")
    docpipe = str(Path(sys.executable).parent / "docpipe")
    proc = subprocess.run(
        [docpipe, "run", str(src), "--output", "s3://no-such-bucket-here/out", "--no-progress",
         "--storage-options", json.dumps(s3_storage_options)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, err
    assert err[0].startswith("docpipe: output s3://no-such-bucket-here/out is not writable")
    assert "testing" not in err[0]  # no credential echoed


def _docpipe(args, env_extra, tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), **env_extra)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("hub_env", ["offline", "unreachable"])
def test_a_hub_id_without_a_hub_is_one_line_at_once_and_leaves_no_output(tmp_path, hub_env):
    """No huggingface_hub retry warnings (they took ~24 s): a probe of the hub comes first.
    An unreachable hub is a closed port on loopback, so the test means the same with a network."""
    from tests.conftest import free_port

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"not read")
    env = {"HF_HUB_OFFLINE": "1"} if hub_env == "offline" else {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    out = tmp_path / "out"
    proc = _docpipe(["run", str(src), "--output", str(out), "--model", "someorg/some-model"], env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("docpipe: model someorg/some-model cannot be resolved"), lines
    assert ("HF_HUB_OFFLINE" if hub_env == "offline" else "cannot be reached") in lines[0]
    assert not out.exists()  # the output is checked (with a probe write) only after everything else passed


def test_report_keeps_mupdf_chatter_in_the_log(tmp_path):
    from tests.docs_factory import born_digital_pdf, misplaced_object_pdf, truncated_tail_pdf

    src = tmp_path / "src"
    src.mkdir()
    (src / "tail.pdf").write_bytes(truncated_tail_pdf())
    (src / "misplaced.pdf").write_bytes(misplaced_object_pdf())
    (src / "ok.pdf").write_bytes(born_digital_pdf(1))
    out = tmp_path / "out"
    run = _docpipe(["run", str(src), "--output", str(out), "--prep-workers", "0", "--no-progress"], {}, tmp_path)
    assert run.returncode == 0, run.stderr
    quiet = _docpipe(["report", str(out), "--html", str(tmp_path / "r.html")], {}, tmp_path)
    assert quiet.returncode == 0 and "MuPDF" not in quiet.stderr + quiet.stdout, quiet.stderr
    verbose = _docpipe(["-v", "report", str(out), "--html", str(tmp_path / "r.html")], {}, tmp_path)
    assert "MuPDF on page" in verbose.stderr  # the same messages, in the log
