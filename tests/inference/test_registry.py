"""pipeline/inference/registry.py: each family's identity is declared once, in its entry."""

from __future__ import annotations

import pytest

from pipeline.inference import registry
from pipeline.inference.generation import GREEDY, GenerationSettings

PORTS = ("minicpm_v2", "mono_internvl", "minimax_vl_01")


def test_the_entry_answers_placement_and_decoding_without_the_family_module(monkeypatch) -> None:
    """Placement groups and default decoding are fields of the entry, not attributes read
    from the family's module with defaults (a misspelt constant there went unnoticed)."""

    def no_module(self):
        raise AssertionError(f"{self.name}: the family's module was consulted")

    monkeypatch.setattr(registry.Family, "implementation", no_module)
    minicpm = registry.family_by_name("minicpm_v2")
    assert minicpm.generation_defaults() == GenerationSettings(num_beams=3, repetition_penalty=1.2)
    assert minicpm.device_groups() == (("vpm", "resampler", "llm.model.embed_tokens"), ("llm.model.norm", "llm.lm_head"))
    for name in PORTS:
        first, last = registry.family_by_name(name).device_groups()
        assert first and last
    assert registry.family_by_name("mono_internvl").generation_defaults() == GREEDY


@pytest.mark.parametrize("name", PORTS)
def test_a_port_reads_its_identity_from_its_entry(name: str) -> None:
    import importlib

    entry = registry.family_by_name(name)
    configuration = importlib.import_module(f"pipeline.inference.families.{name}.configuration")
    assert configuration.FAMILY is entry
    assert (configuration.NAME, configuration.MODEL_TYPES, configuration.ARCHITECTURES) == (
        entry.name, entry.model_types, entry.architectures)
    assert (configuration.FIRST_DEVICE, configuration.LAST_DEVICE) == entry.device_groups()
    assert not hasattr(configuration, "TILING_POLICY")  # the entry's tiling_policy is the one read


def test_every_builder_names_the_family_of_its_entry() -> None:
    """A builder's `family` (stamped on every PreparedPage, checked by the engines) is its entry's name."""
    import importlib

    for family in registry.FAMILIES:
        if family.module is None:
            builder = family.builder_class()
        else:
            package = importlib.import_module(family.module)
            builder = next(v for k, v in vars(package).items() if k.endswith("Builder") and isinstance(v, type))
        assert builder.family == family.name, (builder, family.name)
