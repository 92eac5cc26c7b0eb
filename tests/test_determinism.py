"""The same config and seed give identical metrics and ε: on the Ray backend, with one
hospital training at a time or several at once, with client sampling and central noise.
(Torch threads per hospital = backend.client_resources.num_cpus; a different thread count
may change float reductions, so both runs here use one thread per hospital.)"""

import json

from conftest import TINY, make_settings
from fedpriv.experiment import run_experiment

TIMING = ("seconds", "train_seconds", "client_seconds")


def _lines(run_dir):
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def test_same_seed_same_results_with_one_or_several_concurrent_hospitals(tmp_path):
    base = [*TINY, "num_clients=4", "rounds=2", "strategy.clients_per_round=3", "privacy=local_central"]
    one = run_experiment(make_settings([*base, "+backend.init_args.num_cpus=1"]), tmp_path / "one")  # one at a time
    many = run_experiment(make_settings([*base, "backend.client_resources.num_cpus=0.5"]), tmp_path / "many")
    assert _lines(tmp_path / "one") == _lines(tmp_path / "many")
    assert one["test"] == many["test"] and one["privacy"] == many["privacy"] and one["test_ci95"] == many["test_ci95"]
    assert len({tuple(line["hospitals_trained"]) for line in _lines(tmp_path / "one")}) > 1  # sampling varied by round
