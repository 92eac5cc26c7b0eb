"""Typed records: every metrics line and summary is made through fedpriv.records, the shipped
JSON schemas are the ones the models generate, and a real run's files validate against them."""

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from fedpriv.records import RoundLine, Summary, schemas

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "docs" / "schema"


def test_the_shipped_schemas_are_generated_from_the_records():
    for name, schema in schemas().items():
        shipped = json.loads((SCHEMA_DIR / name).read_text())
        assert shipped == schema, f"docs/schema/{name} is stale: run python -m fedpriv.records docs/schema"


def test_a_run_writes_records_that_validate_against_the_shipped_schemas(sampled_local_central_run):
    run_dir, _ = sampled_local_central_run
    line_schema = json.loads((SCHEMA_DIR / "metrics_line.schema.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines
    for line in lines:
        jsonschema.validate(line, line_schema)
    summary = json.loads((run_dir / "summary.json").read_text())
    jsonschema.validate(summary, json.loads((SCHEMA_DIR / "summary.schema.json").read_text()))
    assert "provenance" in summary and "synthetic" not in summary  # optional parts only when the run has them


def test_a_misspelt_or_missing_key_fails_where_the_record_is_made(sampled_local_central_run):
    run_dir, _ = sampled_local_central_run
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert RoundLine(**line).to_dict() == line
    with pytest.raises(ValidationError, match="max_epsilonn"):
        RoundLine(**{**line, "max_epsilonn": 1.0})
    with pytest.raises(ValidationError, match="released"):
        RoundLine(**{k: v for k, v in line.items() if k != "released"})
    summary = json.loads((run_dir / "summary.json").read_text())
    with pytest.raises(ValidationError, match="rounds_completed"):
        Summary(**{**summary, "rounds_completed": "all"})
