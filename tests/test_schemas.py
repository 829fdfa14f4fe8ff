"""schemas: the output contract is described, versioned, exported and consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

import schemas
from schemas import DOCUMENTS_SCHEMA, ERROR_FIELDS, PAGES_SCHEMA, SCHEMA_VERSION, SCHEMAS, TABLE_KEY, VERSION_KEY
from schemas.export import main as export_main
from schemas.export import render

SCHEMA_DIR = Path(schemas.__file__).parent


def _all_fields(fields: list[pa.Field] | pa.Schema, prefix: str = "") -> list[tuple[str, pa.Field]]:
    """Every field, nested struct and list members included, with a dotted name."""
    out: list[tuple[str, pa.Field]] = []
    for f in fields:
        name = f"{prefix}{f.name}"
        out.append((name, f))
        type_ = f.type
        while pa.types.is_list(type_):
            type_ = type_.value_type
        if pa.types.is_struct(type_):
            out += _all_fields([type_.field(i) for i in range(type_.num_fields)], f"{name}.")
    return out


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_field_is_described(name: str) -> None:
    fields = _all_fields(SCHEMAS[name])
    assert len(fields) == len(SCHEMAS[name]) + (2 if name == "pages" else 0)  # pages: chart question/answer
    undescribed = [n for n, f in fields if not (f.metadata or {}).get(b"description", b"").strip()]
    assert undescribed == []
    assert (SCHEMAS[name].metadata or {}).get(b"description", b"").strip()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_version_metadata(name: str) -> None:
    meta = SCHEMAS[name].metadata
    assert meta[VERSION_KEY] == SCHEMA_VERSION.encode()
    assert meta[TABLE_KEY] == name.encode()
    major, minor = SCHEMA_VERSION.split(".")
    assert major.isdigit() and minor.isdigit()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_exports_are_current(name: str) -> None:
    on_disk = (SCHEMA_DIR / f"{name}.json").read_text()
    assert on_disk == render(name), f"run `python -m schemas.export` to refresh schemas/{name}.json"
    doc = json.loads(on_disk)
    assert doc["schema_version"] == SCHEMA_VERSION and doc["table"] == name
    assert [f["name"] for f in doc["fields"]] == SCHEMAS[name].names


def test_export_writes_what_render_gives(tmp_path: Path) -> None:
    assert export_main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.json" for n in SCHEMAS)
    for name in SCHEMAS:
        assert (tmp_path / f"{name}.json").read_text() == render(name)


def test_tables_share_error_and_provenance_columns() -> None:
    error_names = [name for name, _ in ERROR_FIELDS]
    shared = [*error_names, "doc_id", "source_uri", "shard_id", "run_id", "config_fingerprint"]
    for name in shared:
        page_field, doc_field = PAGES_SCHEMA.field(name), DOCUMENTS_SCHEMA.field(name)
        assert page_field.type == doc_field.type and page_field.nullable == doc_field.nullable, name
    for name in error_names:
        assert PAGES_SCHEMA.field(name).nullable
        assert PAGES_SCHEMA.field(name).metadata == DOCUMENTS_SCHEMA.field(name).metadata
    # The error columns sit together, in the same order, in both tables.
    for schema in (PAGES_SCHEMA, DOCUMENTS_SCHEMA):
        start = schema.get_field_index(error_names[0])
        assert schema.names[start : start + len(error_names)] == error_names


def test_field_names_are_unique_and_snake_case() -> None:
    for schema in SCHEMAS.values():
        assert len(set(schema.names)) == len(schema.names)
        assert all(n == n.lower() and n.replace("_", "").isalnum() for n in schema.names)
