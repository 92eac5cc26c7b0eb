"""One hospital's local round: load its own shard, train (DP-SGD or not), report back.

Only weights, counts and metrics leave the hospital. Its privacy state (σ and the
accountant's history) is kept in the node's persistent state between rounds.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from fedpriv.data.partition import partition_by_patient
from fedpriv.data.records import ImageRecords
from fedpriv.data.sources import load_splits
from fedpriv.models import build_model
from fedpriv.privacy.accounting import History, calibrate_noise_multiplier, epsilon_spent, poisson_plan
from fedpriv.privacy.engine import make_private
from fedpriv.settings import RunSettings
from fedpriv.training import RecordDataset, make_optimizer, proximal_pull, train_epochs
from strategies import UNIFORM_WEIGHT


@functools.lru_cache(maxsize=8)
def hospital_shard(settings: RunSettings, hospital: int) -> ImageRecords:
    """This hospital's training records (loaded once per worker process)."""
    splits = load_splits(settings.data, settings.seed)
    shards = partition_by_patient(splits.train, settings.num_clients, settings.partition, settings.seed)
    return splits.train.subset(shards[hospital])


def round_seed(seed: int, server_round: int, hospital: int) -> int:
    """Distinct, reproducible seed for each (run seed, round, hospital)."""
    return (seed * 1_000_003 + server_round * 1_009 + hospital) % (2**31)


@dataclass(frozen=True)
class HospitalTrainer:
    """The ClientApp's work, as a plain callable (see federation.HospitalTrain)."""

    settings: RunSettings

    def describe(self, hospital: int) -> dict:
        shard = hospital_shard(self.settings, hospital)
        return {"num_examples": len(shard), "num_patients": len(shard.patients)}

    def __call__(self, hospital: int, weights: dict, config: dict, saved: dict) -> tuple[dict, dict, dict]:
        s = self.settings
        started = time.perf_counter()
        threads = int(dict(s.backend.client_resources).get("num_cpus", 1))
        torch.set_num_threads(max(1, threads))
        seed = round_seed(s.seed, int(config["server-round"]), hospital)
        torch.manual_seed(seed)
        shard = hospital_shard(s, hospital)
        model = build_model(s.model, s.data.image_size)
        model.load_state_dict(weights)
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
            weights, privacy_metrics, saved = self._train_private(
                model, optimizer, loader, len(shard), saved, seed, after_step
            )
            metrics.update(privacy_metrics)
        else:
            metrics["train_loss"] = train_epochs(model, optimizer, loader, s.local_epochs, False, after_step)
            weights = model.state_dict()
        metrics["seconds"] = time.perf_counter() - started
        return weights, metrics, saved

    def _train_private(self, model, optimizer, loader, n: int, saved: dict, seed: int, after_step):
        s, p = self.settings, self.settings.privacy
        sample_rate, steps_per_epoch = poisson_plan(n, s.training.batch_size)
        if "noise_multiplier" in saved:
            sigma = float(saved["noise_multiplier"])
        else:  # calibrated once, for the whole planned run
            planned = s.rounds * s.local_epochs * steps_per_epoch
            sigma = calibrate_noise_multiplier(p.target_epsilon, p.delta, sample_rate, planned)
        before = _decode_history(saved)
        next_round = before + [(sigma, sample_rate, s.local_epochs * steps_per_epoch)]
        if epsilon_spent(next_round, p.delta) > p.budget:
            # This hospital's budget would be exceeded: it does not train, and says why.
            unchanged = {k: v.detach().clone() for k, v in model.state_dict().items()}
            metrics = {"budget_exhausted": 1, "epsilon": epsilon_spent(before, p.delta)}
            return unchanged, metrics, saved
        session = make_private(
            model, optimizer, loader, sigma, p.max_grad_norm, before, torch.Generator().manual_seed(seed + 1)
        )
        loss = train_epochs(session.model, session.optimizer, session.loader, s.local_epochs, True, after_step)
        after = session.history
        metrics = {
            "train_loss": loss,
            "epsilon": session.epsilon(p.delta),
            "noise_multiplier": sigma,
            "sample_rate": sample_rate,
            "steps": sum(n for _, _, n in after) - sum(n for _, _, n in before),
        }
        return session.unwrapped_state(), metrics, {"noise_multiplier": sigma, **_encode_history(after)}


def _encode_history(history: History) -> dict:
    return {
        "history_sigma": [h[0] for h in history],
        "history_rate": [h[1] for h in history],
        "history_steps": [h[2] for h in history],
    }


def _decode_history(saved: dict) -> History:
    if "history_sigma" not in saved:
        return []
    return list(zip(saved["history_sigma"], saved["history_rate"], saved["history_steps"]))
