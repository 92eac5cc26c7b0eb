"""The report on tiny real runs: grouping by setting, mean ± std over seeds, files written."""

import math

import pytest

from conftest import TINY, make_settings
from in_process import run_in_process
from fedpriv.errors import FedprivError
from fedpriv.report import auroc_drops, find_runs, group_settings, main, run_record, table_rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, central_baseline_run):
    """The folders the report reads: two local-DP runs differing only by seed, and the
    non-private run of the same setting and seed 0 (conftest.CENTRAL_BASELINE, shared)."""
    root = tmp_path_factory.mktemp("sweep")
    for seed in (0, 1):
        overrides = [*TINY, "num_clients=1", "privacy.target_epsilon=4", f"seed={seed}", "audit=mia"]
        run_in_process(make_settings(overrides), root / str(seed))
    (root / "broken").mkdir()  # an unfinished run: no summary.json, not reported
    (root / "broken" / "metrics.jsonl").write_text("")
    return [root, central_baseline_run[0]]


def test_runs_differing_by_seed_form_one_setting(sweep):
    records = [run_record(r) for r in find_runs(sweep)]
    assert len(records) == 3 and {r["seed"] for r in records} == {0, 1}
    rows = table_rows(group_settings(records))
    dp, plain = sorted(rows, key=lambda row: row["privacy"])  # local, none
    assert len(rows) == 2 and dp["seeds"] == 2 and dp["epsilon"] == 4.0
    assert plain["privacy"] == "none" and plain["seeds"] == 1
    aurocs = [r["auroc"] for r in records if r["privacy"] == "local"]
    assert dp["auroc"] == pytest.approx(sum(aurocs) / 2)
    assert math.isfinite(dp["auroc_std"]) and "site.spd" in dp
    assert 0 <= dp["audit_epsilon"] <= 4.0 and 0 <= dp["audit_auroc"] <= 1


def test_cli_writes_tables_and_plots(sweep, tmp_path):
    assert main([*map(str, sweep), "--out", str(tmp_path / "report")]) == 0
    names = ("report.md", "report.csv", "auroc_vs_epsilon.png", "fairness_vs_epsilon.png", "learning_curves.png", "audit_vs_epsilon.png")
    for name in names:
        assert (tmp_path / "report" / name).stat().st_size > 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "± " in text and "epsilon~spd[site]" in text and "auroc_drop~subgroup_size" in text


def _record(privacy, seed, groups):
    return {"data": "d", "model": "m", "privacy": privacy, "epsilon": 1.0 if privacy != "none" else math.inf,
            "client_epsilon": math.inf, "clip": "1" if privacy != "none" else "-", "synthetic": "none", "num_clients": 2, "strategy": "fedavg", "partition": "iid", "rounds": 3,
            "training": "sgd lr=0.2 cosine K=1 ema=0.6 best_val", "seed": seed, "groups": {"age": groups}}


def test_auroc_drop_pairs_each_dp_run_with_its_non_private_twin():
    records = [
        _record("none", 0, {"young": (0.9, 10), "old": (0.8, 40)}),
        _record("local", 0, {"young": (0.6, 10), "old": (0.75, 40)}),
        _record("local", 1, {"young": (0.1, 10), "old": (0.1, 40)}),  # no twin with seed 1: left out
        _record("none", 1 + 1, {"young": (0.5, 10), "old": (math.nan, 40)}),
    ]
    drops = sorted(auroc_drops(records))
    assert drops == [pytest.approx((0.05, 40, 0.8)), pytest.approx((0.3, 10, 0.9))]
    records += [_record("local", 0, {"mid": (0.5, 20)}) | {"strategy": "fedprox"}]  # twin differs: left out
    assert len(auroc_drops(records)) == 2


def test_runs_that_differ_only_in_a_training_technique_are_separate_settings():
    from fedpriv.report import _training_setting, group_settings

    settings = {"training": {"optimizer": "sgd", "lr": 0.2, "batch_size": 221, "lr_schedule": "cosine", "augmentations": 4},
                "evaluation": {"ema": 0.6, "select": "best_val"}}
    assert _training_setting(settings) == "sgd lr=0.2 B=221 cosine K=4 ema=0.6 best_val thr=0.5"
    settings["evaluation"]["ema"] = None
    assert _training_setting(settings) == "sgd lr=0.2 B=221 cosine K=4 no-ema best_val thr=0.5"
    from fedpriv.report import _model_setting  # a width or depth change is another setting too

    assert _model_setting("cnn", {"widths": [16, 32, 64]}) == "cnn(widths=[16, 32, 64])" and _model_setting("cnn", {}) == "cnn"
    assert _model_setting("vit", [["depth", 2], ["embed_dim", 64]]) == "vit(depth=2, embed_dim=64)"  # as summary.json stores them
    from fedpriv.report import _clip_setting  # and so is a clipping norm or its schedule

    assert _clip_setting({"max_grad_norm": 10.0, "final_max_grad_norm": 2.0}) == "10→2"
    assert _clip_setting({"max_grad_norm": 1.0}) == "1" and _clip_setting({"mode": "none"}) == "-"
    records = [_record("local", seed, {}) for seed in (0, 1)]
    records += [_record("local", seed, {}) | {"training": "sgd lr=0.2 constant K=1 ema=0.6 best_val"} for seed in (0, 1)]
    records += [_record("local", seed, {}) | {"clip": "1→0.5"} for seed in (0, 1)]
    assert sorted(len(runs) for runs in group_settings(records).values()) == [2, 2, 2]


def test_folder_without_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FedprivError, match="no finished runs"):
        find_runs([tmp_path])
    assert main([str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_a_column_only_some_settings_have_is_a_dash_in_the_others():
    from fedpriv.report import _cell

    with_gan = {"auroc": 0.7, "auroc_std": 0.01, "tstr_auroc": 0.6, "tstr_auroc_std": 0.02}
    real_only = {"auroc": 0.65, "auroc_std": 0.01}
    assert _cell(with_gan, "tstr_auroc") == "0.600 ± 0.020" and _cell(real_only, "tstr_auroc") == "—"


def _row(epsilon, auroc, privacy="local", num_clients=1):
    return _record(privacy, 0, {}) | {"epsilon": epsilon, "num_clients": num_clients, "auroc": auroc, "auroc_std": 0.01}


def test_published_numbers_are_set_against_each_series_at_their_epsilons(tmp_path):
    from fedpriv.report import load_reference, reference_comparison

    path = tmp_path / "published.csv"
    path.write_text("name,epsilon,auroc\nplain,1,0.525\nplain,6,0.572\nplain,inf,0.778\n")
    reference = load_reference(path)
    assert reference[-1] == {"name": "plain", "epsilon": math.inf, "auroc": 0.778}
    rows = [_row(1.0, 0.60), _row(6.0, 0.55), _row(math.inf, 0.70, privacy="none"),  # central: above at ε=1 only
            _row(1.0, 0.53, num_clients=3), _row(6.0, 0.58, num_clients=3)]  # 3 hospitals: above at both, no ∞ run
    text = "\n".join(reference_comparison(rows, reference))
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert lines["| published: plain"].startswith("| published: plain | 0.525 | 0.572 | 0.778 |")
    assert lines["| fedpriv: num_clients=1"] == "| fedpriv: num_clients=1 | 0.600 ± 0.010 | 0.550 ± 0.010 | 0.700 ± 0.010 | 1/3 |"
    assert lines["| fedpriv: num_clients=3"] == "| fedpriv: num_clients=3 | 0.530 ± 0.010 | 0.580 ± 0.010 | — | 2/2 |"


def test_settings_differing_only_in_clipping_are_separate_series_sharing_the_non_private_twin():
    from fedpriv.report import reference_comparison

    reference = [{"name": "plain", "epsilon": e, "auroc": a} for e, a in ((6.0, 0.572), (math.inf, 0.778))]
    rows = [_row(6.0, 0.61), _row(6.0, 0.59) | {"clip": "1→0.5"}, _row(math.inf, 0.70, privacy="none")]
    lines = [line for line in reference_comparison(rows, reference) if line.startswith("| fedpriv")]
    assert lines == ["| fedpriv: clip=1 | 0.610 ± 0.010 | 0.700 ± 0.010 | 1/2 |",
                     "| fedpriv: clip=1→0.5 | 0.590 ± 0.010 | 0.700 ± 0.010 | 1/2 |"]


@pytest.mark.parametrize("content, message", [
    ("name,eps,auroc\nplain,1,0.5\n", "columns name, epsilon, auroc"),
    ("name,epsilon,auroc\nplain,one,0.5\n", "line 2: epsilon and auroc must be numbers"),
    ("name,epsilon,auroc\nplain,1,0.5\nplain,6,1.5\n", "line 3: needs a name, epsilon > 0 and auroc in"),
    (None, "cannot be read"),
])
def test_a_bad_reference_file_is_named_with_its_line(tmp_path, content, message):
    from fedpriv.report import load_reference

    path = tmp_path / "published.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(FedprivError, match=message) as caught:
        load_reference(path)
    assert str(path) in str(caught.value)


def _full_record(privacy, epsilon, seed, auroc):
    """A run's record as run_record makes it, for the report's tables and plots."""
    return {
        "run": f"r{privacy}{epsilon}{seed}", "data": "d 32px", "model": "m", "privacy": privacy, "epsilon": epsilon,
        "client_epsilon": math.inf, "clip": "1" if privacy != "none" else "-", "synthetic": "none", "num_clients": 3,
        "strategy": "fedavg", "partition": "iid", "rounds": 3, "training": "sgd lr=0.1 B=8 constant K=1 no-ema last thr=youden",
        "seed": seed, "spent_epsilon": epsilon, "auroc": auroc, "auprc": auroc, "accuracy": 0.7, "sensitivity": 0.7,
        "specificity": 0.7, "fairness": {"site": {"spd": 0.1, "worst_group_auroc": auroc - 0.1, "auroc_gap": 0.1,
                                                  "equalized_odds_difference": 0.1}},
        "groups": {}, "tstr_auroc": math.nan, "audit_auroc": math.nan, "audit_epsilon": math.nan,
        "curve_split": "test", "curve": [(1, auroc - 0.2), (2, auroc - 0.1), (3, auroc)], "external": {},
    }


def test_one_seed_shows_no_spread_nan_is_null_and_every_dotted_line_is_labelled(tmp_path, monkeypatch):
    import json

    from matplotlib.figure import Figure

    from fedpriv.report import correlations, write_report

    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), original(self, *a, **k))[1])
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig=None: None)
    records = [_full_record("local", 1.0, 0, 0.7), _full_record("local", 1.0, 1, 0.8), _full_record("local", 8.0, 0, 0.85),
               _full_record("none", math.inf, 0, 0.9)]
    rows = table_rows(group_settings(records))
    correlation = correlations(records)
    assert math.isnan(correlation["auroc_drop~subgroup_size"]["r"])  # no subgroups: undefined
    written = write_report(rows, records, correlation, tmp_path)
    for name in ("auroc_vs_epsilon.png", "fairness_vs_epsilon.png", "learning_curves.png"):
        assert tmp_path / name in written and (tmp_path / name).stat().st_size > 0

    text = (tmp_path / "correlations.json").read_text()
    assert "NaN" not in text and json.loads(text)["auroc_drop~subgroup_size"]["r"] is None
    table = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| d 32px")]
    assert len(table) == 3 and any("| 0.750 ± 0.071 |" in line for line in table)  # two seeds: mean ± std
    single = [line for line in table if "| 0.900 |" in line or "| 0.850 |" in line]
    assert len(single) == 2 and all("±" not in line for line in single)  # one seed: the value alone, never "± 0.000"

    against_epsilon = [fig for fig in saved if fig.axes[0].get_xlabel().startswith("target ε")]
    assert len(against_epsilon) == 2  # AUROC and SPD against ε
    for fig in against_epsilon:
        ax = fig.axes[0]
        dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert dotted and all(not line.get_label().startswith("_") for line in dotted)  # each in the legend
        assert all(line.get_label().startswith("no DP: ") for line in dotted)
    curves = next(fig for fig in saved if fig.axes[0].get_xlabel() == "round")
    assert all(float(t).is_integer() for t in curves.axes[0].get_xticks())  # whole rounds on the learning curves
