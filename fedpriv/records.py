"""The records a run writes, typed: one metrics line per round (`metrics.jsonl`) and the
run's summary (`summary.json`).

The server builds every line through `RoundLine` and the run its summary through `Summary`,
so a missing, misspelt or mistyped key fails where the record is made, not where it is read.
The JSON schemas shipped in `docs/schema/` are generated from these models
(`python -m fedpriv.records docs/schema`); a test keeps them current. In JSON, an undefined
metric is `null` and an infinite ε is the string `"inf"` (fedpriv.outputs.json_safe).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: A metric: a number, or null where undefined (one class only) or not evaluated.
Metric = float | None
#: An ε: a number, "inf" in JSON after a non-private step.
Epsilon = float | str


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        """The record as the dict it is written as (keys in field order; optional parts only
        when the run has them)."""
        return self.model_dump(exclude_unset=True)


class RoundLine(_Record):
    """One round of `metrics.jsonl` (docs/reference.md#metricsjsonl)."""

    round: int = Field(description="1, 2, …")
    auroc: Metric = Field(description="test split (null under evaluation.select=best_val)")
    auprc: Metric
    accuracy: Metric
    sensitivity: Metric = Field(description="at the round's threshold, malignant = positive")
    specificity: Metric
    val_auroc: Metric = Field(description="the same metrics on the validation split")
    val_auprc: Metric
    val_accuracy: Metric
    val_sensitivity: Metric
    val_specificity: Metric
    threshold: float = Field(description="decision threshold picked on the validation split (evaluation.threshold)")
    fairness: dict[str, Any] | None = Field(description="per fairness attribute, subgroup metrics and gaps on the test split")
    external: dict[str, dict[str, Metric]] | None = Field(description="per external test folder: the test metrics")
    train_loss: Metric = Field(description="example-weighted mean over the hospitals that trained")
    epsilon: dict[str, Epsilon] | None = Field(description="record-level ε per hospital, cumulative; null without local DP")
    max_epsilon: Epsilon | None
    epsilon_unconfirmed: list[int] = Field(description="hospitals whose ε counts rounds they failed in as trained")
    client_epsilon: Epsilon | None = Field(description="client-level ε so far; null without central DP")
    released: bool = Field(description="false when client-level DP withheld the round")
    hospitals_trained: list[int]
    hospitals_failed: dict[str, str] = Field(description="hospital → error")
    hospitals_exhausted: list[int] = Field(description="hospitals that declined: their privacy budget would be exceeded")
    client_seconds: dict[str, float]
    train_seconds: float
    seconds: float


class Summary(_Record):
    """`summary.json` (docs/reference.md#summaryjson): the final model's evaluation, privacy,
    partition, settings and provenance; written last, only by a finished run."""

    test: dict[str, Metric]
    test_ci95: dict[str, Any]
    fairness: dict[str, Any] | None
    val: dict[str, Metric]
    external: dict[str, dict[str, Metric]] | None
    selection: dict[str, Any]
    threshold: dict[str, Any]
    privacy: dict[str, Any]
    num_clients: int
    rounds: int
    rounds_completed: int
    local_epochs: int
    seed: int
    model: str
    data: str
    data_skipped: dict[str, Any]
    failures: dict[str, Any]
    partition: list[dict[str, Any]]
    settings: dict[str, Any]
    wall_seconds: float
    synthetic: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None


SCHEMAS = {"metrics_line.schema.json": RoundLine, "summary.schema.json": Summary}


def schemas() -> dict[str, dict]:
    """File name → JSON schema of each record."""
    return {name: model.model_json_schema() for name, model in SCHEMAS.items()}


def main(argv: list[str] | None = None) -> int:
    """Write the JSON schemas into a folder (default docs/schema)."""
    folder = Path((argv if argv is not None else sys.argv[1:] or ["docs/schema"])[0])
    folder.mkdir(parents=True, exist_ok=True)
    for name, schema in schemas().items():
        (folder / name).write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
