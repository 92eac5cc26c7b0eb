"""`python -m fedpriv.data check data=… data.root=…`: read every record and report, no training;
`python -m fedpriv.data manifest DICOM_DIR --labels CSV --out manifest.csv`: a manifest CSV
from the DICOM files' tags (see fedpriv.data.dicom_manifest).

Exit status: 0 when everything is readable and consistent (check) or the manifest was
written (manifest), 1 when problems were found, 2 when the settings themselves are wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedpriv import CONFIG_DIR

USAGE = """usage: {prog} check data=NAME [data.KEY=VALUE ...]
       {prog} manifest DICOM_DIR --labels CSV --out manifest.csv [--label-column label] [--patient-pattern REGEX]"""
#: Rows of a list (problems, left-out files) shown on the console; the rest are counted.
SHOWN = 10


def main(argv: list[str], prog: str = "python -m fedpriv.data") -> int:
    console = Console()
    if argv and argv[0] == "check":
        return check(argv[1:], console)
    if argv and argv[0] == "manifest":
        return manifest(argv[1:], console, f"{prog} manifest")
    console.print(USAGE.format(prog=prog), highlight=False)
    return 2


def check(overrides: list[str], console: Console) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedpriv.data.check import check_data
    from fedpriv.errors import FedprivError
    from fedpriv.config import settings_from_config
    from fedpriv.settings import config_error

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            settings = settings_from_config(compose("simulate", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as error:  # unknown option, misspelt key, override syntax
        return _fail(console, config_error(error))
    except FedprivError as error:
        return _fail(console, error)
    report = check_data(settings.data, settings.seed)
    table = Table(title=f"data={settings.data.name}: records per split (item shape {report.shape})")
    for column in ("split", "images", "patients", "malignant", "benign", "images per site"):
        table.add_column(column, justify="right")
    for split, counts in report.counts.items():
        sites = ", ".join(f"{k}: {v}" for k, v in report.sites.get(split, {}).items()) or "—"
        table.add_row(split, *(str(counts[k]) for k in ("images", "patients", "malignant", "benign")), sites)
    if report.counts:
        console.print(table)
    if report.problems:
        console.print(f"[bold red]{len(report.problems)} problem(s):[/]")
        for message in report.problems:
            console.print(f"  • {message}", soft_wrap=True)
        return 1
    console.print("[green]every record is readable and consistent[/]")
    return 0


def manifest(argv: list[str], console: Console, prog: str) -> int:
    from fedpriv.data.dicom_manifest import build_manifest
    from fedpriv.errors import FedprivError

    parser = argparse.ArgumentParser(prog=prog, description="Write a manifest CSV (data=manifest) from a folder of DICOM files and a CSV of labels.")
    parser.add_argument("dicom_dir", type=Path, help="folder of DICOM files (searched at any depth; .dcm suffix optional)")
    parser.add_argument("--labels", type=Path, required=True, help=(
        "CSV with a `label` column and key columns named after DICOM keywords (PatientID, StudyInstanceUID, "
        "SOPInstanceUID, AccessionNumber, ...; several form one key) or `file` (path relative to DICOM_DIR, or file name); "
        "other columns (e.g. split, age) are copied into the manifest"))
    parser.add_argument("--out", type=Path, required=True, help="manifest CSV to write (file paths in it are relative to its folder)")
    parser.add_argument("--label-column", default="label", help="the labels CSV's label column (default: label)")
    parser.add_argument("--patient-pattern", help="regex whose first group is the patient id within PatientID (e.g. '(P_\\d+)'); a PatientID key in --labels is matched against it")
    args = parser.parse_args(argv)
    try:
        result = build_manifest(args.dicom_dir, args.labels, args.out, args.label_column, args.patient_pattern)
    except FedprivError as error:
        return _fail(console, error)
    counts = {}
    for row in result.rows:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    by_label = ", ".join(f"{n} labelled {label!r}" for label, n in sorted(counts.items()))
    console.print(f"wrote {args.out}: {len(result.rows)} images of {result.patients} patients ({by_label})", highlight=False)
    for title, items in (("without a label in " + str(args.labels), result.unlabelled), ("skipped", result.skipped)):
        if items:
            console.print(f"[yellow]{len(items)} file(s) {title}:[/]")
            for item in items[:SHOWN]:
                console.print(f"  • {item}", soft_wrap=True, highlight=False)
            if len(items) > SHOWN:
                console.print(f"  … {len(items) - SHOWN} more")
    if result.without_patient:
        console.print(
            f"[yellow]{result.without_patient} image(s) have no PatientID:[/] fine for an external test set "
            "(data.external_test), not for training, which splits and partitions by patient", highlight=False)
    console.print(f"train on it:  fedpriv simulate data=manifest data.manifest={args.out}", highlight=False)
    if set(counts) - {"0", "1", "malignant", "benign"}:
        console.print(f"  and map your labels to 1 (malignant) / 0 (benign): data.labels='{{{', '.join(f'{k}: ?' for k in sorted(counts))}}}'", highlight=False)
    return 0


def _fail(console: Console, error: Exception) -> int:
    console.print(f"[bold red]fedpriv:[/] {escape(str(error))}", soft_wrap=True)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
