"""What a paper takes from a run: the decision threshold chosen on validation, strict JSON with
null for what is undefined or never ran, and plots whose rounds, loss and legends read right."""

import json
import math

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from conftest import CENTRAL_BASELINE, make_settings
from fedpriv.errors import FedprivError
from fedpriv.metrics import binary_metrics, choose_threshold, parse_threshold
from fedpriv.outputs import RunDirectory, describe_round, to_json

matplotlib.use("Agg")


def strict_json(path):
    """json.loads that refuses the bare NaN / Infinity that Python's json would accept."""
    return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{path.name} holds a bare {name}"))


def test_threshold_rules_pick_on_the_scores_given():
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.35, 0.3, 0.6, 0.8, 0.7, 0.9])
    # Youden's J (sens + spec − 1) is 0.5 at 0.3, 0.6 and 0.8: the highest such threshold
    assert choose_threshold(labels, scores, "youden") == 0.8
    assert choose_threshold(labels, scores, "sensitivity@0.9") == 0.3  # the highest with sensitivity ≥ 0.9
    assert binary_metrics(labels, scores, 0.3)["sensitivity"] == 1.0
    assert choose_threshold(labels, scores, "specificity@0.75") == 0.6  # the lowest with specificity ≥ 0.75
    assert choose_threshold(labels, scores, 0.5) == 0.5 and choose_threshold(labels, scores, "0.5") == 0.5
    assert math.isnan(choose_threshold(np.zeros(4), scores[:4], "youden"))  # one class: no rule applies
    for bad in ("youden2", "sensitivity@", "sensitivity@1.5", 1.0, 0, "median"):
        with pytest.raises(ValueError):
            parse_threshold(bad)
    with pytest.raises(FedprivError, match=r"evaluation.threshold='sens@0.9'.*youden, sensitivity@X"):
        make_settings(["evaluation.threshold=sens@0.9"])


def test_run_reports_metrics_at_the_threshold_chosen_on_validation_and_null_for_dp_that_never_ran(central_baseline_run):
    run_dir, summary = central_baseline_run  # conftest.CENTRAL_BASELINE: one hospital, privacy=none
    import torch

    from fedpriv.data.sources import load_splits
    from fedpriv.server import global_model
    from fedpriv.training import predict

    settings = make_settings(CENTRAL_BASELINE)
    splits = load_splits(settings.data, settings.seed)
    model = global_model(settings, torch.load(run_dir / "model.pt"))
    val, test = predict(model, splits.val, 256), predict(model, splits.test, 256)
    threshold = choose_threshold(splits.val.labels, val, "youden")
    assert summary["threshold"] == {"rule": "youden", "value": pytest.approx(threshold), "chosen_on": "val"}
    expected = binary_metrics(splits.test.labels, test, threshold)
    for key in ("accuracy", "sensitivity", "specificity"):
        assert summary["test"][key] == pytest.approx(expected[key])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < line["threshold"] < 1 for line in lines) and lines[-1]["threshold"] == pytest.approx(threshold)

    ledger = strict_json(run_dir / "ledger.json")  # no DP at either level: no ε, rather than ε = 0
    assert ledger["client_level_epsilon"] is None and set(ledger["epsilon"].values()) == {None}
    for name in ("summary.json", "partition.json"):
        strict_json(run_dir / name)


def test_dp_epsilons_stay_numbers_where_dp_ran(sampled_local_central_run):
    run_dir, _ = sampled_local_central_run  # record- and client-level DP
    ledger = strict_json(run_dir / "ledger.json")
    assert ledger["client_level_epsilon"] > 0 and all(e > 0 for e in ledger["epsilon"].values())


def test_json_has_null_for_nan_and_a_string_for_infinity():
    text = to_json({"r": float("nan"), "eps": math.inf, "n": np.float32("nan"), "k": np.int64(3), "t": (1.0, math.nan)})
    assert json.loads(text) == {"r": None, "eps": "inf", "n": None, "k": 3, "t": [1.0, None]}


def _lines(rounds=5, epsilon=True):
    return [
        {"round": r, "auroc": 0.3 + 0.1 * r, "val_auroc": 0.25 + 0.1 * r, "sensitivity": 0.7, "specificity": 0.6,
         "threshold": 0.42, "train_loss": 1.0 / r, "max_epsilon": 2.0 * r if epsilon else None, "client_epsilon": None,
         "hospitals_failed": {}, "hospitals_exhausted": [], "released": True, "seconds": 3.21}
        for r in range(1, rounds + 1)
    ]


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved while the test runs (left open for inspection)."""
    saved = []
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig=None: None)
    return saved


def _inside_axes(fig, legend, ax) -> bool:
    fig.canvas.draw()
    return legend.get_window_extent().overlaps(ax.get_window_extent())


def test_rounds_plot_has_integer_rounds_training_loss_and_a_legend_off_the_data(tmp_path, figures):
    RunDirectory(tmp_path).plot_rounds(_lines(rounds=3))
    (fig,) = figures
    auroc, loss = fig.axes[0], fig.axes[1]
    assert loss.get_ylabel().startswith("training loss") and list(loss.lines[0].get_ydata()) == [1.0, 0.5, 1 / 3]
    ticks = [t for t in loss.get_xticks() if 1 <= t <= 3]
    assert ticks == [1, 2, 3]  # whole rounds only, no 1.5
    assert auroc.get_ylim()[0] < 0.4  # an AUROC of 0.4 is shown, not cut off
    (legend,) = fig.legends  # one legend for AUROC and ε, outside every axes
    assert {t.get_text() for t in legend.get_texts()} == {"test AUROC", "validation AUROC", "ε spent (max over hospitals)"}
    assert not any(_inside_axes(fig, legend, ax) for ax in fig.axes)


def test_partition_legend_does_not_cover_the_bars(tmp_path, figures):
    RunDirectory(tmp_path).plot_partition([{"hospital": h, "benign": 30, "malignant": 20} for h in range(4)])
    (fig,) = figures
    ax = fig.axes[0]
    assert not _inside_axes(fig, ax.get_legend(), ax)


def test_round_line_says_auroc_threshold_loss_and_epsilon():
    text = describe_round(_lines()[1], 5)
    assert text == "round 2/5  AUROC 0.500 val 0.450  sens 0.70 spec 0.60 @0.42  loss 0.500  ε 4.00  3.2 s"
