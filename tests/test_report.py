"""The report on tiny real runs: grouping by setting, mean ± std over seeds, files written."""

import math

import pytest

from conftest import TINY, make_settings
from fedpriv.errors import FedprivError
from fedpriv.experiment import run_experiment
from fedpriv.report import find_runs, group_settings, main, run_record, table_rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for i, seed in enumerate((0, 1)):
        overrides = [*TINY, "num_clients=1", "rounds=1", "privacy.target_epsilon=4", f"seed={seed}"]
        run_experiment(make_settings(overrides), root / str(i))
    (root / "broken").mkdir()  # an unfinished run: no summary.json, not reported
    (root / "broken" / "metrics.jsonl").write_text("")
    return root


def test_runs_differing_by_seed_form_one_setting(sweep):
    records = [run_record(r) for r in find_runs([sweep])]
    assert len(records) == 2 and {r["seed"] for r in records} == {0, 1}
    rows = table_rows(group_settings(records))
    assert len(rows) == 1 and rows[0]["seeds"] == 2 and rows[0]["epsilon"] == 4.0
    aurocs = [r["auroc"] for r in records]
    assert rows[0]["auroc"] == pytest.approx(sum(aurocs) / 2)
    assert math.isfinite(rows[0]["auroc_std"]) and "site.spd" in rows[0]


def test_cli_writes_tables_and_plots(sweep, tmp_path):
    assert main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    for name in ("report.md", "report.csv", "auroc_vs_epsilon.png", "fairness_vs_epsilon.png", "learning_curves.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "± " in text and "epsilon~spd[site]" in text


def test_folder_without_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FedprivError, match="no finished runs"):
        find_runs([tmp_path])
    assert main([str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
