"""The same config and seed give identical metrics and ε: on the Ray backend, with one
hospital training at a time or several at once, with client sampling and central noise;
and with the hospitals in the test process (tests/in_process.py, which other tests use).
(Torch threads per hospital = backend.client_resources.num_cpus; a different thread count
may change float reductions, so every run here uses one thread per hospital.)"""

import json

import torch

from conftest import SAMPLED_LOCAL_CENTRAL, make_settings
from fedpriv.experiment import run_experiment
from in_process import run_in_process

TIMING = ("seconds", "train_seconds", "client_seconds")


def _lines(run_dir):
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def test_same_seed_same_results_with_one_or_several_concurrent_hospitals(tmp_path, sampled_local_central_run):
    many_dir, many = sampled_local_central_run  # 2 CPUs, 1 per hospital: two train at once
    backend = many["settings"]["backend"]
    assert dict(backend["init_args"])["num_cpus"] == 2 and dict(backend["client_resources"])["num_cpus"] == 1
    one_cpu = [o for o in SAMPLED_LOCAL_CENTRAL if not o.startswith("+backend.init_args.num_cpus=")]
    one = run_experiment(make_settings([*one_cpu, "+backend.init_args.num_cpus=1"]), tmp_path / "one")  # one at a time
    assert _lines(tmp_path / "one") == _lines(many_dir)
    assert one["test"] == many["test"] and one["privacy"] == many["privacy"] and one["test_ci95"] == many["test_ci95"]
    assert len({tuple(line["hospitals_trained"]) for line in _lines(many_dir)}) > 1  # sampling varied by round


def test_hospitals_in_this_process_give_the_result_of_the_engine(tmp_path, sampled_local_central_run):
    """What lets tests of hospital and server logic skip the engine: the same sample of
    hospitals per round, metrics, ledger, ε and final weights, bit for bit."""
    engine_dir, engine = sampled_local_central_run
    ours = run_in_process(make_settings(SAMPLED_LOCAL_CENTRAL), tmp_path)
    assert _lines(tmp_path) == _lines(engine_dir)
    assert ours["test"] == engine["test"] and ours["privacy"] == engine["privacy"] and ours["test_ci95"] == engine["test_ci95"]
    assert json.loads((tmp_path / "ledger.json").read_text()) == json.loads((engine_dir / "ledger.json").read_text())
    weights, theirs = torch.load(tmp_path / "model.pt"), torch.load(engine_dir / "model.pt")
    assert all(torch.equal(weights[k], theirs[k]) for k in theirs)
