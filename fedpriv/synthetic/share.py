"""The server's side of synthetic data: ask every hospital for its GAN's images — or, under
synthetic.federated, train one GAN across the hospitals and draw the images from it — pool
them, and keep what a reader needs (generators, sample grids, the pool) in RUN/synthetic/.

Only what a hospital's GAN made leaves it — its generator's images, or under
synthetic.federated both networks' weights after DP-SGD — never a real image; with
synthetic.dp=false that is allowed only because the user asked, and the ledger says ε = ∞.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedpriv.errors import FedprivError
from fedpriv.outputs import write_json
from fedpriv.protocol import NUM_EXAMPLES
from fedpriv.settings import RunSettings
from fedpriv.synthetic.gan import ConditionalDiscriminator, ConditionalGenerator, GanShape, balanced_labels, generate, save_generator
from fedpriv.synthetic.merf import run_embedding, train_generator
from fedpriv.synthetic.pool import FEDERATED_GAN, SyntheticPool, save_sample_grid
from fedpriv.synthetic.prior import gan_prior
from fedpriv.synthetic.train import gan_state, split_state

log = logging.getLogger(__name__)

SYNTHETIC_DIR = "synthetic"
POOL_FILE = "pool.npz"
FACTS_FILE = "hospitals.json"
FIDELITY_FILE = "fidelity.json"  # label fidelity of each hospital's images (fedpriv.synthetic.fidelity)
FEDERATED_GAN_FILE = "federated_gan.pt"  # the federated GAN's networks after its last finished round (resume)


@dataclass
class SharedSynthetic:
    pool: SyntheticPool
    reports: dict[int, dict] = field(default_factory=dict)  # each hospital's reply (privacy history)


def made_by(hospital: int) -> str:
    """Whose images: `hospital_<k>`, or `federated` for the federated GAN's (FEDERATED_GAN)."""
    return "federated" if hospital == FEDERATED_GAN else f"hospital_{hospital}"


def generator_path(run_dir: Path, hospital: int) -> Path:
    return Path(run_dir) / SYNTHETIC_DIR / f"generator_{made_by(hospital)}.pt"


def share_synthetic(federation, settings: RunSettings, run_dir: Path) -> SharedSynthetic:
    """Every hospital trains its GAN; the server pools the images. A resumed run whose pool
    was already saved reuses it (the hospitals' records already hold the GANs' spending)."""
    folder = Path(run_dir) / SYNTHETIC_DIR
    if (folder / POOL_FILE).exists():
        return SharedSynthetic(SyntheticPool.load(folder / POOL_FILE))
    if not settings.synthetic.dp:
        log.warning(
            "synthetic.dp=false: every hospital shares images from a GAN trained WITHOUT differential privacy; "
            "their ε is ∞ in the ledger and summary"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if settings.synthetic.generator == "merf":
        generators, facts, reports = _train_merf_generator(federation, settings)
    elif settings.synthetic.federated:
        generators, facts, reports = _train_federated_gan(federation, settings, folder)
    else:
        generators, facts, reports = _train_hospital_gans(federation, settings)
    parts = {}
    for hospital, (generator, images, labels) in generators.items():
        save_generator(generator, generator_path(run_dir, hospital), {"hospital": hospital, **facts[hospital]})
        who = "federated GAN" if hospital == FEDERATED_GAN else f"hospital {hospital}"
        save_sample_grid(images, labels, folder / f"samples_{made_by(hospital)}.png", f"{who}: synthetic samples")
        parts[hospital] = (images, labels)
    pool = SyntheticPool.pooled(parts)
    write_json(folder / FACTS_FILE, {str(h): f for h, f in facts.items()})
    pool.save(folder / POOL_FILE)
    return SharedSynthetic(pool, reports)


def _not_every_hospital(settings: RunSettings, failed: dict[int, str], what: str) -> FedprivError:
    reasons = "; ".join(f"hospital {h}: {r}" for h, r in sorted(failed.items()))
    return FedprivError(f"synthetic={settings.synthetic.name}: not every hospital {what} ({reasons})")


def _train_hospital_gans(federation, settings: RunSettings):
    """Every hospital trains its own GAN and releases images from it."""
    released, failed = federation.synthesize()
    if failed:
        raise _not_every_hospital(settings, failed, "produced synthetic images")
    shape = GanShape(settings.data.image_size, settings.synthetic.latent_dim, settings.synthetic.width)
    generators, facts = {}, {}
    for hospital, (arrays, metrics) in released.items():
        images, labels = arrays.pop("images").numpy(), arrays.pop("labels").numpy()
        generator = ConditionalGenerator(shape)
        generator.load_state_dict(split_state(arrays, "generator"))
        facts[hospital] = _facts(settings, metrics, metrics["gan_seconds"])
        generators[hospital] = (generator, images, labels)
    return generators, facts, {h: metrics for h, (_, metrics) in released.items()}


def _facts(settings: RunSettings, metrics: dict, seconds: float) -> dict:
    return {
        "gan_seconds": seconds,
        "discriminator_loss": metrics["gan_discriminator_loss"],
        "generator_loss": metrics["gan_generator_loss"],
        "dp": settings.synthetic.dp,
    }


def _train_federated_gan(federation, settings: RunSettings, folder: Path):
    """synthetic.federated: `rounds` GAN rounds at every hospital, the server averaging both
    networks (weighted by records, in hospital order); the server then draws the pool from
    the global generator (samples_per_class per class for each hospital). The networks after
    each round are saved, so a resumed run goes on from the last finished round."""
    g = settings.synthetic
    progress = folder / FEDERATED_GAN_FILE
    if progress.exists():
        saved = torch.load(progress, weights_only=True)
        done, weights, seconds, reports = saved["round"], saved["weights"], saved["seconds"], saved["reports"]
    else:
        done, weights, seconds, reports = 0, initial_gan(settings), {}, {}
    for gan_round in range(done + 1, g.rounds + 1):
        released, failed = federation.train_gan_round(gan_round, weights)
        if failed:
            raise _not_every_hospital(settings, failed, f"finished GAN round {gan_round}")
        weights = average_networks({h: (arrays, metrics[NUM_EXAMPLES]) for h, (arrays, metrics) in released.items()})
        for hospital, (_, metrics) in released.items():
            seconds[hospital] = seconds.get(hospital, 0.0) + metrics["gan_seconds"]
            reports[hospital] = metrics  # the latest reply carries the hospital's whole record
        torch.save({"round": gan_round, "weights": weights, "seconds": seconds, "reports": reports}, progress)
        log.info("federated GAN round %d/%d", gan_round, g.rounds)
    shape = GanShape(settings.data.image_size, g.latent_dim, g.width)
    generator = ConditionalGenerator(shape)
    generator.load_state_dict(split_state(weights, "generator"))
    labels = balanced_labels(g.samples_per_class * len(reports))
    images = generate(generator, labels, settings.seed)
    last = reports[min(reports)]
    facts = {FEDERATED_GAN: {**_facts(settings, last, sum(seconds.values())), "rounds": g.rounds,
                             "hospital_seconds": {str(h): v for h, v in sorted(seconds.items())}}}
    return {FEDERATED_GAN: (generator, images, labels)}, facts, reports


def _train_merf_generator(federation, settings: RunSettings):
    """synthetic.generator=merf: every hospital releases its noisy class sums once; the
    server adds them (in hospital order), trains the generator to match the class means and
    draws the pool (samples_per_class per class for each hospital)."""
    g = settings.synthetic
    released, failed = federation.synthesize()
    if failed:
        raise _not_every_hospital(settings, failed, "released its class sums")
    order = sorted(released)
    sums = sum(released[h][0]["sums"] for h in order)
    counts = sum(released[h][0]["counts"] for h in order)
    started = time.perf_counter()
    generator = train_generator(run_embedding(settings), sums, counts, g, settings.data.image_size, settings.seed)
    labels = balanced_labels(g.samples_per_class * len(order))
    images = generate(generator, labels, settings.seed)
    facts = {FEDERATED_GAN: {
        "gan_seconds": time.perf_counter() - started,  # the server's generator training
        "hospital_seconds": {str(h): released[h][1]["gan_seconds"] for h in order},
        "generator": "merf",
        "dp": g.dp,
    }}
    return {FEDERATED_GAN: (generator, images, labels)}, facts, {h: released[h][1] for h in order}


def initial_gan(settings: RunSettings) -> dict[str, torch.Tensor]:
    """The federated GAN's networks before round 1: the GAN prior, or seeded random ones."""
    prior = gan_prior(settings)
    if prior is not None:
        return prior[0]
    torch.manual_seed(settings.seed)
    shape = GanShape(settings.data.image_size, settings.synthetic.latent_dim, settings.synthetic.width)
    return gan_state(ConditionalGenerator(shape), ConditionalDiscriminator(shape))


def average_networks(replies: dict[int, tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Both networks averaged over the hospitals, weighted by their record counts, summed in
    hospital order (float sums do not commute)."""
    order = sorted(replies)
    total = sum(replies[h][1] for h in order)
    first = replies[order[0]][0]
    return {
        name: sum((replies[h][0][name].double() * (replies[h][1] / total) for h in order), torch.zeros_like(first[name], dtype=torch.float64)).to(first[name].dtype)
        for name in first
    }


def hospital_facts(run_dir: Path) -> dict[str, dict]:
    """Per hospital: GAN wall time and final losses (written when the pool was made)."""
    return json.loads((Path(run_dir) / SYNTHETIC_DIR / FACTS_FILE).read_text())
