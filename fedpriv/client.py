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
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from fedpriv.data.partition import partition_by_patient
from fedpriv.data.records import ImageRecords
from fedpriv.data.sources import load_splits
from fedpriv.devices import backend_device
from fedpriv.models import build_model, freeze_backbone
from fedpriv.errors import FedprivError
from fedpriv.head_inputs import classifier, head_inputs
from fedpriv.privacy.accounting import epsilon_spent, poisson_plan
from fedpriv.privacy.engine import make_private
from fedpriv.privacy.hospital_state import (
    SYNTHETIC_ROUND,
    HospitalPrivacyState,
    gan_round_id,
    SpentRound,
    history_metrics,
    release_digest,
)
from fedpriv.protocol import NUM_EXAMPLES, UNIFORM_WEIGHT, round_seed
from fedpriv.privacy.plan import classifier_mechanism, fits_budget, gan_mechanism, synthetic_per_round
from fedpriv.schedule import StepPlan, follow_clip_schedule, follow_lr_schedule
from fedpriv.settings import DataSettings, FaultSettings, PartitionSettings, RunSettings, TrainingSettings
from fedpriv.synthetic.gan import balanced_labels, generate
from fedpriv.synthetic.merf import class_sums, noised, run_embedding
from fedpriv.synthetic.pool import SyntheticPool
from fedpriv.synthetic.prior import gan_prior
from fedpriv.synthetic.train import gan_state, train_gan
from fedpriv.training import RecordDataset, make_optimizer, proximal_pull, train_epochs


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


def backbone_frozen(training: TrainingSettings, server_round: int) -> bool:
    """training.freeze=backbone: only the head trains in rounds 1..freeze_rounds (every round
    when null), then everything (DP-RandP's linear probing before fine-tuning)."""
    if training.freeze != "backbone":
        return False
    return training.freeze_rounds is None or server_round <= training.freeze_rounds


@dataclass(frozen=True)
class HospitalTrainer:
    """The ClientApp's work, in plain Python (federation.Hospitals).

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

    def _start(self, server_round: int, hospital: int) -> int:
        """Torch threads from the client's resources; the seed of this (round, hospital)."""
        threads = int(dict(self.settings.backend.client_resources).get("num_cpus", 1))
        torch.set_num_threads(max(1, threads))
        seed = round_seed(self.settings.seed, server_round, hospital)
        torch.manual_seed(seed)
        return seed

    def synthesize(self, hospital: int) -> tuple[dict, dict]:
        """Train this hospital's conditional GAN on its own shard and release labelled
        synthetic images and the generator (DP by post-processing under synthetic.dp=true).

        The GAN's DP-SGD session is recorded (round SYNTHETIC_ROUND) before anything leaves.
        """
        g = self.settings.synthetic
        if g.generator == "merf":
            return self._release_class_sums(hospital)
        prior = gan_prior(self.settings)
        trained, seed, metrics_of = self._gan_session(hospital, SYNTHETIC_ROUND, prior[0] if prior is not None else None, g.epochs)
        labels = balanced_labels(g.samples_per_class)
        images = generate(trained.generator, labels, seed + 2)
        released = {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}
        released |= {f"generator.{k}": v for k, v in trained.generator.state_dict().items()}
        return released, metrics_of(released)

    def train_gan_round(self, hospital: int, gan_round: int, weights: dict) -> tuple[dict, dict]:
        """One round of the federated GAN (synthetic.federated): `epochs / rounds` passes of
        DP-SGD on the discriminator over this hospital's shard, starting from the global
        networks; releases both networks (the discriminator is DP-SGD's output, the generator
        its post-processing), recorded before they leave."""
        g = self.settings.synthetic
        round_id = gan_round_id(gan_round, g.rounds)
        trained, _, metrics_of = self._gan_session(hospital, round_id, weights, g.epochs // g.rounds)
        released = gan_state(trained.generator, trained.discriminator)
        return released, metrics_of(released)

    def _gan_session(self, hospital: int, round_id: int, start: dict | None, epochs: int):
        """Train the GAN on this hospital's shard for `epochs` (DP-SGD on the discriminator
        under synthetic.dp); returns the trained GAN, the session's seed, and a function that
        records the session under `round_id` for a release and gives the reply's metrics."""
        s, g = self.settings, self.settings.synthetic
        seed = self._start(round_id, hospital)
        shard = hospital_shard(s, hospital)
        mechanism = gan_mechanism(s, len(shard))
        steps = mechanism.steps * epochs // g.epochs  # this session's share of the planned GAN training
        trained = train_gan(
            shard, g, s.data.augment, mechanism.noise_multiplier if g.dp else None, seed, backend_device(s.backend),
            start=start, epochs=epochs,
        )
        if g.dp and sum(n for *_, n in trained.history) != steps:
            raise FedprivError(f"hospital {hospital}: Opacus accounted {trained.history} for the GAN, expected {steps} steps of {mechanism}")

        def record(released: dict) -> dict:
            session = SpentRound(round_id, mechanism.noise_multiplier, mechanism.sample_rate, steps, release_digest(released))
            losses = {"gan_discriminator_loss": trained.discriminator_loss, "gan_generator_loss": trained.generator_loss}
            return self._recorded(hospital, session, len(shard), trained.seconds) | losses

        return trained, seed, record

    def _release_class_sums(self, hospital: int) -> tuple[dict, dict]:
        """synthetic.generator=merf: this hospital's per-class sums of the embedding of its
        images, and its class counts, under the Gaussian mechanism (fedpriv.synthetic.merf);
        recorded (round SYNTHETIC_ROUND) before they leave."""
        s = self.settings
        started = time.perf_counter()
        seed = self._start(SYNTHETIC_ROUND, hospital)
        shard = hospital_shard(s, hospital)
        mechanism = gan_mechanism(s, len(shard))
        sums, counts = class_sums(run_embedding(s), shard)
        released = noised(sums, counts, mechanism.noise_multiplier, seed + 2)
        session = SpentRound(SYNTHETIC_ROUND, *mechanism.entry, release_digest(released))
        return released, self._recorded(hospital, session, len(shard), time.perf_counter() - started)

    def _recorded(self, hospital: int, session: SpentRound, records: int, seconds: float) -> dict:
        """Record a synthetic-data session in the hospital's own state (before its release
        leaves); the reply's metrics."""
        state = HospitalPrivacyState.record_at(self.state_path(hospital), session)
        return {
            NUM_EXAMPLES: records,
            "gan_seconds": seconds,
            "epsilon": epsilon_spent(state.history, self.settings.privacy.delta or 0.0),
            **history_metrics(state),
        }

    def __call__(self, hospital: int, weights: dict, config: dict, shared: dict | None = None) -> tuple[dict, dict]:
        """One local round; `shared` is the server's pooled synthetic set (synthetic=augment)."""
        s = self.settings
        started = time.perf_counter()
        server_round = int(config["server-round"])
        seed = self._start(server_round, hospital)
        device = backend_device(s.backend)
        shard = hospital_shard(s, hospital)
        model = build_model(s.model, s.data.image_size)
        model.load_state_dict(weights)
        frozen = backbone_frozen(s.training, server_round)
        if frozen:
            freeze_backbone(model, s.model.name)
        model.to(device)
        views = s.training.augmentations
        dataset = RecordDataset(shard, s.data.augment, views)
        mixed = synthetic_per_round(s, len(shard))
        if mixed:
            if shared is None:
                raise FedprivError(f"hospital {hospital}: synthetic=augment but the server sent no synthetic images")
            extra = SyntheticPool.from_arrays(shared).draw(mixed, seed + 3)
            dataset = ConcatDataset([dataset, RecordDataset(extra, s.data.augment, views)])
        trained, trained_weights = model, weights
        inputs = head_inputs(model, shard.images, s.training.eval_batch_size) if frozen and not (s.data.augment or mixed) else None
        if inputs is not None:  # only the head trains: on what the frozen backbone makes of each record, computed once
            name, trained = classifier(model)
            trained_weights = {k.removeprefix(f"{name}."): v for k, v in weights.items() if k.startswith(f"{name}.")}
            dataset = TensorDataset(inputs, torch.from_numpy(shard.labels.astype(np.float32)).to(inputs.device))
        loader = DataLoader(
            dataset,
            batch_size=s.training.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        steps_per_round = s.local_epochs * poisson_plan(len(dataset), s.training.batch_size)[1]
        plan = StepPlan.of_round(server_round, s.rounds, steps_per_round)
        optimizer = self._optimizer(trained, trained_weights, plan, float(config.get("proximal-mu", 0.0)))
        metrics = {"hospital": hospital, NUM_EXAMPLES: len(shard), UNIFORM_WEIGHT: 1}
        if s.privacy.local:
            weights, privacy_metrics = self._train_private(model, trained, optimizer, loader, hospital, server_round, seed, plan)
            metrics.update(privacy_metrics)
        else:
            metrics["train_loss"] = train_epochs(trained, optimizer, loader, s.local_epochs, False, views)
            weights = model.state_dict()
        weights = {k: v.cpu() for k, v in weights.items()}  # what leaves the hospital (no copy on the CPU)
        inject_fault(s.faults, s.seed, server_round, hospital)
        metrics["seconds"] = time.perf_counter() - started
        return weights, metrics

    def _optimizer(self, model, weights: dict, plan: StepPlan, mu: float) -> torch.optim.Optimizer:
        """The local optimizer, its learning rate following training.lr_schedule from this
        round's place in the planned run (rounds × steps per round), and FedProx's pull."""
        t = self.settings.training
        optimizer = make_optimizer(model, t)
        follow_lr_schedule(optimizer, t.lr_schedule, t.lr, plan)
        if mu > 0:
            optimizer.register_step_post_hook(proximal_pull(model, weights, mu))
        return optimizer

    def _train_private(self, model, trained, optimizer, loader, hospital: int, server_round: int, seed: int, plan: StepPlan):
        """DP-SGD on `trained` (the model, or its head alone when it reads cached backbone
        outputs: fedpriv.head_inputs); releases the whole model, recorded first."""
        s, p = self.settings, self.settings.privacy
        mechanism = classifier_mechanism(s, len(hospital_shard(s, hospital)))
        sample_rate, steps = mechanism.sample_rate, mechanism.steps
        path = self.state_path(hospital)
        state = HospitalPrivacyState.load(path)
        if state.noise_multiplier is None:  # calibrated once, for the whole planned run
            state.noise_multiplier = mechanism.noise_multiplier
        sigma, before = state.noise_multiplier, state.history
        if not fits_budget(before, (sigma, sample_rate, steps), p):
            # This hospital's budget would be exceeded: it does not train, and says why.
            unchanged = {k: v.detach().clone() for k, v in model.state_dict().items()}
            metrics = {"budget_exhausted": 1, "epsilon": epsilon_spent(before, p.delta), **history_metrics(state)}
            return unchanged, metrics
        device = next(model.parameters()).device
        noise = torch.Generator(device=device).manual_seed(seed + 1)
        session = make_private(trained, optimizer, loader, sigma, p.max_grad_norm, before, noise, p.grad_sample_mode)
        if p.final_max_grad_norm is not None:
            follow_clip_schedule(optimizer, session.set_clip_norm, p.max_grad_norm, p.final_max_grad_norm, plan)
        with session.physical_batches(s.training.max_physical_batch_size) as batches:
            loss = train_epochs(
                session.model, session.optimizer, batches, s.local_epochs, True, s.training.augmentations, session.ghost_loss
            )
        # Opacus trained `trained`'s own parameters in place: the whole model holds them
        released = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        # The accountant is the ground truth of what DP-SGD ran (it merges equal consecutive entries).
        accounted = sum(n for *_, n in session.history) - sum(n for *_, n in before)
        if accounted != steps or session.history[-1][:2] != (sigma, sample_rate):
            raise FedprivError(
                f"hospital {hospital}: Opacus accounted {accounted} steps ending {session.history[-1]}, "
                f"expected {steps} at σ={sigma}, q={sample_rate}"
            )
        # before the update leaves: a crash from here on cannot lose this round
        state = HospitalPrivacyState.record_at(path, SpentRound(server_round, sigma, sample_rate, steps, release_digest(released)), sigma)
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
