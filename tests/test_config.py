import pytest
from pydantic import ValidationError

from pipeline.config import DEFAULT_CHART_QUESTIONS, RunConfig, field_help


def test_every_field_has_help_and_a_type():
    for name, info in RunConfig.model_fields.items():
        assert info.description and len(info.description) > 10, name
        assert info.annotation is not None, name


def test_defaults_are_usable():
    cfg = RunConfig(source="in", output="out")
    assert cfg.tiling_policy == "internvl"
    assert cfg.model is None
    assert cfg.trust_remote_code is False
    assert cfg.tasks == ["description", "ocr", "chart"]
    assert "pdf" in cfg.extensions


@pytest.mark.parametrize(
    "bad",
    [
        {"min_dpi": 300, "max_dpi": 100},
        {"min_tiles": 13, "max_tiles": 12},
        {"tasks": ["summarise"]},
        {"tiling_policy": "square"},
        {"shard_size": 0},
        {"extensions": [" "]},
        {"not_a_setting": 1},
    ],
)
def test_broken_configuration_is_rejected(bad):
    with pytest.raises(ValidationError):
        RunConfig(source="in", output="out", **bad)


def test_extensions_are_normalised():
    cfg = RunConfig(source="in", output="out", extensions=[".PDF", "Png", "pdf"])
    assert cfg.extensions == ["pdf", "png"]


def test_fingerprint_tracks_only_output_changing_settings():
    base = RunConfig(source="a", output="b")
    # where and how fast: same outputs, same fingerprint
    assert base.fingerprint() == RunConfig(source="c", output="d", shard_size=3, prep_workers=4).fingerprint()
    # what is asked or how pages are tiled: different outputs
    assert base.fingerprint() != RunConfig(source="a", output="b", max_tiles=6).fingerprint()
    assert base.fingerprint() != RunConfig(source="a", output="b", model="m").fingerprint()
    assert base.fingerprint() != RunConfig(source="a", output="b", chart_questions=["Q?"]).fingerprint()


def test_storage_options_never_appear_in_public_dict():
    cfg = RunConfig(source="s3://b/p", output="s3://b/o", storage_options={"key": "AKIA", "secret": "hunter2"})
    public = cfg.public_dict()
    assert "hunter2" not in str(public) and "AKIA" not in str(public)
    assert public["storage_options"] == ["key", "secret"]


def test_chart_questions_extend_the_default_set():
    cfg = RunConfig(source="a", output="b", chart_questions=["Which year is highest?"])
    assert cfg.all_chart_questions() == [*DEFAULT_CHART_QUESTIONS, "Which year is highest?"]
    only = RunConfig(source="a", output="b", chart_questions=["Q?"], default_chart_questions=False)
    assert only.all_chart_questions() == ["Q?"]


def test_field_help_lists_every_field():
    assert set(field_help()) == set(RunConfig.model_fields)


def test_defaults_are_normalised_like_explicit_values():
    from pipeline.config import DEFAULT_EXTENSIONS

    implicit = RunConfig(source="a", output="b")
    explicit = RunConfig(source="a", output="b", extensions=list(DEFAULT_EXTENSIONS), tasks=["description", "ocr", "chart"])
    assert implicit.extensions == explicit.extensions == sorted(DEFAULT_EXTENSIONS)
    assert implicit.fingerprint() == explicit.fingerprint()


def test_every_field_has_one_stage_and_its_roles_declared_once():
    from pipeline.config import ENGINE_FIELDS, FIELD_STAGE, FIELD_TABLE, OUTPUT_FIELDS

    names = [name for name, _, _ in FIELD_TABLE]
    assert sorted(names) == sorted(RunConfig.model_fields) and len(names) == len(set(names))
    assert {stage for _, stage, _ in FIELD_TABLE} == {"where", "rasterize", "tiling", "inference", "execution"}
    assert all(roles <= {"output", "engine"} for _, _, roles in FIELD_TABLE)
    # what the output's rows depend on is part of the fingerprint; where the data is and how work is cut are not
    assert {"model", "tasks", "max_dpi", "tiling_policy", "ocr_max_new_tokens"} <= OUTPUT_FIELDS
    assert not {"source", "output", "shard_size", "prep_workers", "device", "engine"} & OUTPUT_FIELDS
    # a loaded engine is reused across shards and runs whose other settings differ
    assert {"model", "dtype", "device", "max_batch_pages", "engine"} <= ENGINE_FIELDS
    assert not {"source", "output", "shard_size", "prep_workers", "run_id"} & ENGINE_FIELDS
    assert FIELD_STAGE["device"] == "inference"


def test_the_fingerprint_and_the_engine_key_follow_the_declared_roles():
    from pipeline import runner
    from pipeline.config import ENGINE_FIELDS, OUTPUT_FIELDS

    base = RunConfig(source="in", output="out", model="m")
    for name, value in (("shard_size", 7), ("prep_workers", 3), ("device", "cpu"), ("max_dpi", 250.0),
                        ("tasks", ["ocr"])):
        other = base.model_copy(update={name: value})
        assert (other.fingerprint() != base.fingerprint()) == (name in OUTPUT_FIELDS), name
        assert (runner._engine_key(other) != runner._engine_key(base)) == (name in ENGINE_FIELDS), name


def test_run_help_groups_options_by_stage():
    from pipeline.cli import build_parser

    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]  # noqa: SLF001
    titles = [g.title for g in run_parser._action_groups]  # noqa: SLF001
    assert {"where settings", "rasterize settings", "tiling settings", "inference settings",
            "execution settings"} <= set(titles)


def test_upgrading_keeps_existing_outputs_resumable():
    """A default run's fingerprint is the one docpipe wrote before the decoding fields existed
    (a6ca0ee): an output written then resumes after the upgrade instead of exiting 2 as
    "written with other settings". Setting a later field still changes the fingerprint."""
    default = RunConfig(source="a", output="b")
    assert default.fingerprint() == "a1dfe4ab36c86830"
    assert "num_beams" not in default.output_settings()
    assert RunConfig(source="a", output="b", num_beams=3).fingerprint() != default.fingerprint()
    assert RunConfig(source="a", output="b", repetition_penalty=1.2).fingerprint() != default.fingerprint()
