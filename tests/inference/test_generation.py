"""Generation settings: family defaults, run overrides, the answer-only repetition penalty."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from pipeline.config import RunConfig
from pipeline.inference.generation import GREEDY, AnswerRepetitionPenalty, GenerationSettings
from pipeline.inference.registry import BY_NAME


def test_each_family_owns_its_default_decoding() -> None:
    # MiniCPM-V 2.0's chat(sampling=False) is 3 beams + repetition_penalty 1.2; the others are greedy
    assert BY_NAME["minicpm_v2"].generation_defaults() == GenerationSettings(num_beams=3, repetition_penalty=1.2)
    for name in ("mono_internvl", "minimax_vl_01", "internvl", "qwen2_vl", "idefics3"):
        assert BY_NAME[name].generation_defaults() == GREEDY, name


def test_overrides_and_tags() -> None:
    minicpm = GenerationSettings(num_beams=3, repetition_penalty=1.2)
    assert minicpm.tag == "beams3-rp1.2" and GREEDY.tag == "greedy"
    assert minicpm.override() == minicpm
    assert minicpm.override(num_beams=1).tag == "greedy-rp1.2"
    assert minicpm.override(num_beams=1, repetition_penalty=1.0) == GREEDY
    assert GREEDY.override(repetition_penalty=1.05).tag == "greedy-rp1.05"
    assert minicpm.config_kwargs() == {"do_sample": False, "num_beams": 3}
    assert GREEDY.logits_processors(10) == []
    with pytest.raises(ValueError, match="num_beams"):
        GenerationSettings(num_beams=0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        GenerationSettings(repetition_penalty=0.0)


def test_run_config_takes_the_overrides() -> None:
    config = RunConfig(source="x", output="y", num_beams=1, repetition_penalty=1.0)
    assert GenerationSettings(3, 1.2).override(config.num_beams, config.repetition_penalty) == GREEDY
    assert RunConfig(source="x", output="y").num_beams is None  # None: the family's own
    # they change what is written, so they are output settings (the fingerprint covers them)
    assert config.fingerprint() != RunConfig(source="x", output="y").fingerprint()
    assert "family" in RunConfig.model_fields["num_beams"].description


def test_penalty_counts_the_answer_and_start_ids_never_the_prompt() -> None:
    torch.manual_seed(0)
    prompt, answer = torch.tensor([[5, 6, 7, 8], [0, 5, 9, 9]]), torch.tensor([[3, 5], [4, 4]])
    ids = torch.cat([prompt, answer], dim=1)
    scores = torch.randn(2, 12)
    got = AnswerRepetitionPenalty(1.2, prompt_width=4, start_ids=(1,))(ids, scores.clone())
    # the same as transformers' own processor run on [start ids] + answer only (what an embeddings-only
    # generate, as MiniCPM-V 2.0's original, sees)
    want = RepetitionPenaltyLogitsProcessor(1.2)(torch.cat([torch.ones(2, 1, dtype=torch.long), answer], 1),
                                                 scores.clone())
    assert torch.equal(got, want)
    touched = (got != scores).nonzero()[:, 1].unique().tolist()
    assert set(touched) <= {1, 3, 4, 5} and 6 not in touched and 7 not in touched  # prompt tokens 6..9 untouched
    assert torch.equal(AnswerRepetitionPenalty(1.2, prompt_width=6)(ids, scores.clone())[:, [6, 7, 8, 9]],
                       scores[:, [6, 7, 8, 9]])
