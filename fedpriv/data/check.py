"""Read every record a `data=` config describes and report counts and problems, without training."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fedpriv.data.records import MALIGNANT, DataProblems
from fedpriv.data.sources import SOURCES
from fedpriv.errors import FedprivError
from fedpriv.settings import DataSettings


@dataclass
class DataReport:
    """Per split: images, patients, malignant, benign and images per site; every problem found."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sites: dict[str, dict[str, int]] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    problems: list[str] = field(default_factory=list)


def check_data(settings: DataSettings, seed: int) -> DataReport:
    """Every unreadable or inconsistent item is listed, not just the first one."""
    problems = DataProblems(collect=True)
    report = DataReport(problems=problems.messages)
    try:
        splits = SOURCES[settings.source](settings, seed, problems)
    except FedprivError as error:  # nothing usable to count (e.g. a missing folder or column)
        problems.messages.append(str(error))
        return report
    try:
        splits.check_disjoint_patients(f"data={settings.name}")
    except FedprivError as error:
        problems.messages.append(str(error))
    for name, part in {**splits.parts, **{f"external {k}": v for k, v in splits.external.items()}}.items():
        malignant = int((part.labels == MALIGNANT).sum())
        report.counts[name] = {
            "images": len(part),
            "patients": len(part.patients),
            "malignant": malignant,
            "benign": len(part) - malignant,
        }
        if "site" in part.metadata:
            report.sites[name] = dict(sorted(Counter(part.metadata["site"].astype(str).tolist()).items()))
        if len(part) == 0:
            problems.messages.append(f"the {name} split is empty")
    report.shape = tuple(splits.train.images.shape[1:])
    return report
