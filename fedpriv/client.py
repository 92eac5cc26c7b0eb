"""One hospital's local round: load its own shard, train (DP-SGD or not), report back.

Only weights, counts and metrics leave the hospital (its privacy history is a list of
mechanisms: σ, sample rate, steps). Its privacy state is kept on its own disk
(fedpriv.privacy.hospital_state), so it survives crashes, timeouts and resumes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedpriv.data.partition import partition_by_patient
from fedpriv.data.records import ImageRecords
from fedpriv.data.sources import load_splits
from fedpriv.devices import backend_device
from fedpriv.models import build_model
from fedpriv.errors import FedprivError
from fedpriv.privacy.accounting import calibrate_noise_multiplier, epsilon_spent, poisson_plan
from fedpriv.privacy.engine import make_private
from fedpriv.privacy.hospital_state import HospitalPrivacyState, SpentRound, history_metrics, release_digest
from fedpriv.settings import DataSettings, FaultSettings, PartitionSettings, RunSettings
from fedpriv.training import RecordDataset, make_optimizer, proximal_pull, train_epochs
from strategies import UNIFORM_WEIGHT


@functools.lru_cache(maxsize=2)
def federation_rows(
    data: DataSettings, num_clients: int, partition: PartitionSettings, seed: int
) -> tuple[ImageRecords, list[np.ndarray]]:
    """The training split and every hospital's rows of it, built once per worker process:
    a worker serving a thousand hospitals loads (or generates) the data once, not per hospital."""
    train = load_splits(data, seed).train
    return train, partition_by_patient(train, num_clients, partition, seed)


def hospital_rows(settings: RunSettings, hospital: int) -> tuple[ImageRecords, np.ndarray]:
    """The (cached) training split and this hospital's row indices in it."""
    train, shards = federation_rows(settings.data, settings.num_clients, settings.partition, settings.seed)
    return train, shards[hospital]


@functools.lru_cache(maxsize=8)
def hospital_shard(settings: RunSettings, hospital: int) -> ImageRecords:
    """This hospital's training records (a few recent hospitals kept per worker process)."""
    train, rows = hospital_rows(settings, hospital)
    return train.subset(rows)


def round_seed(seed: int, server_round: int, hospital: int) -> int:
    """Distinct, reproducible seed for each (run seed, round, hospital)."""
    return (seed * 1_000_003 + server_round * 1_009 + hospital) % (2**31)


@dataclass(frozen=True)
class HospitalTrainer:
    """The ClientApp's work, as a plain callable (see federation.HospitalTrain).

    `state_dir` stands for each hospital's own disk: its privacy state lives there
    (`hospital_<k>.json`), written before any update leaves the hospital.
    """

    settings: RunSettings
    state_dir: str

    def state_path(self, hospital: int) -> Path:
        return Path(self.state_dir) / f"hospital_{hospital}.json"

    def describe(self, hospital: int) -> dict:
        """Counts and the privacy history: what the server may know about this hospital."""
        train, rows = hospital_rows(self.settings, hospital)  # counts only: no image copies
        facts = {"num_examples": len(rows), "num_patients": len(np.unique(train.patient_ids[rows]))}
        return facts | history_metrics(HospitalPrivacyState.load(self.state_path(hospital)))

    def __call__(self, hospital: int, weights: dict, config: dict) -> tuple[dict, dict]:
        s = self.settings
        started = time.perf_counter()
        server_round = int(config["server-round"])
        threads = int(dict(s.backend.client_resources).get("num_cpus", 1))
        torch.set_num_threads(max(1, threads))
        seed = round_seed(s.seed, server_round, hospital)
        torch.manual_seed(seed)
        device = backend_device(s.backend)
        shard = hospital_shard(s, hospital)
        model = build_model(s.model, s.data.image_size)
        model.load_state_dict(weights)
        model.to(device)
        optimizer = make_optimizer(model, s.training)
        mu = float(config.get("proximal-mu", 0.0))
        after_step = proximal_pull(model, weights, s.training.lr, mu) if mu > 0 else None
        loader = DataLoader(
            RecordDataset(shard, s.data.augment),
            batch_size=s.training.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        metrics = {"hospital": hospital, "num-examples": len(shard), UNIFORM_WEIGHT: 1}
        if s.privacy.local:
            weights, privacy_metrics = self._train_private(model, optimizer, loader, hospital, server_round, seed, after_step)
            metrics.update(privacy_metrics)
        else:
            metrics["train_loss"] = train_epochs(model, optimizer, loader, s.local_epochs, False, after_step)
            weights = model.state_dict()
        weights = {k: v.cpu() for k, v in weights.items()}  # what leaves the hospital (no copy on the CPU)
        inject_fault(s.faults, s.seed, server_round, hospital)
        metrics["seconds"] = time.perf_counter() - started
        return weights, metrics

    def _train_private(self, model, optimizer, loader, hospital: int, server_round: int, seed: int, after_step):
        s, p = self.settings, self.settings.privacy
        n = len(loader.dataset)
        sample_rate, steps_per_epoch = poisson_plan(n, s.training.batch_size)
        path = self.state_path(hospital)
        state = HospitalPrivacyState.load(path)
        if state.noise_multiplier is None:  # calibrated once, for the whole planned run
            planned = s.rounds * s.local_epochs * steps_per_epoch
            state.noise_multiplier = calibrate_noise_multiplier(p.target_epsilon, p.delta, sample_rate, planned)
        sigma, before = state.noise_multiplier, state.history
        steps = s.local_epochs * steps_per_epoch
        if epsilon_spent(before + [(sigma, sample_rate, steps)], p.delta) > p.budget:
            # This hospital's budget would be exceeded: it does not train, and says why.
            unchanged = {k: v.detach().clone() for k, v in model.state_dict().items()}
            metrics = {"budget_exhausted": 1, "epsilon": epsilon_spent(before, p.delta), **history_metrics(state)}
            return unchanged, metrics
        device = next(model.parameters()).device
        noise = torch.Generator(device=device).manual_seed(seed + 1)
        session = make_private(model, optimizer, loader, sigma, p.max_grad_norm, before, noise, p.grad_sample_mode)
        loss = train_epochs(
            session.model, session.optimizer, session.loader, s.local_epochs, True, after_step, session.ghost_loss
        )
        released = {k: v.cpu() for k, v in session.unwrapped_state().items()}
        accounted = sum(n for *_, n in session.history) - sum(n for *_, n in before)
        if accounted != steps:  # the accountant is the ground truth of what DP-SGD ran
            raise FedprivError(f"hospital {hospital}: Opacus accounted {accounted} DP-SGD steps, expected {steps}")
        state.record(SpentRound(server_round, sigma, sample_rate, steps, release_digest(released)))
        state.save(path)  # before the update leaves: a crash from here on cannot lose this round
        metrics = {
            "train_loss": loss,
            "epsilon": epsilon_spent(state.history, p.delta),
            "noise_multiplier": sigma,
            "sample_rate": sample_rate,
            "steps": steps,
            **history_metrics(state),
        }
        return released, metrics


def inject_fault(faults: FaultSettings, seed: int, server_round: int, hospital: int) -> None:
    """`faults.client_failure_rate` / `client_hang_rate`: after training (so its privacy is
    spent), a hospital crashes, or hangs past the server's timeout; seeded per round."""
    if faults.client_failure_rate == 0 and faults.client_hang_rate == 0:
        return
    draw = np.random.default_rng([seed, server_round, hospital, 7]).random()
    if draw < faults.client_failure_rate:
        raise RuntimeError(f"injected failure (faults.client_failure_rate={faults.client_failure_rate})")
    if draw < faults.client_failure_rate + faults.client_hang_rate:
        time.sleep(faults.client_timeout * 1.5)
