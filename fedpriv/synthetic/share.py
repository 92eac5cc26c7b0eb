"""The server's side of synthetic data: ask every hospital for its GAN's images, pool them,
and keep what a reader needs (generators, sample grids, the pool) in RUN/synthetic/.

Only what a hospital's generator made leaves it — never a real image; with
synthetic.dp=false that is allowed only because the user asked, and the ledger says ε = ∞.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fedpriv.errors import FedprivError
from fedpriv.outputs import write_json
from fedpriv.settings import RunSettings
from fedpriv.synthetic.gan import ConditionalGenerator, GanShape, save_generator
from fedpriv.synthetic.pool import SyntheticPool, save_sample_grid

log = logging.getLogger(__name__)

SYNTHETIC_DIR = "synthetic"
POOL_FILE = "pool.npz"
FACTS_FILE = "hospitals.json"
FIDELITY_FILE = "fidelity.json"  # label fidelity of each hospital's images (fedpriv.synthetic.fidelity)


@dataclass
class SharedSynthetic:
    pool: SyntheticPool
    reports: dict[int, dict] = field(default_factory=dict)  # each hospital's reply (privacy history)


def generator_path(run_dir: Path, hospital: int) -> Path:
    return Path(run_dir) / SYNTHETIC_DIR / f"generator_hospital_{hospital}.pt"


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
    released, failed = federation.synthesize()
    if failed:
        reasons = "; ".join(f"hospital {h}: {r}" for h, r in sorted(failed.items()))
        raise FedprivError(f"synthetic={settings.synthetic.name}: not every hospital produced synthetic images ({reasons})")
    folder.mkdir(parents=True, exist_ok=True)
    shape = GanShape(settings.data.image_size, settings.synthetic.latent_dim, settings.synthetic.width)
    parts, facts = {}, {}
    for hospital, (arrays, metrics) in released.items():
        images, labels = arrays.pop("images").numpy(), arrays.pop("labels").numpy()
        generator = ConditionalGenerator(shape)
        generator.load_state_dict({k.removeprefix("generator."): v for k, v in arrays.items()})
        facts[hospital] = {
            "gan_seconds": metrics["gan_seconds"],
            "discriminator_loss": metrics["gan_discriminator_loss"],
            "generator_loss": metrics["gan_generator_loss"],
            "dp": settings.synthetic.dp,
        }
        save_generator(generator, generator_path(run_dir, hospital), {"hospital": hospital, **facts[hospital]})
        save_sample_grid(images, labels, folder / f"samples_hospital_{hospital}.png", f"hospital {hospital}: synthetic samples")
        parts[hospital] = (images, labels)
    pool = SyntheticPool.pooled(parts)
    write_json(folder / FACTS_FILE, {str(h): f for h, f in facts.items()})
    pool.save(folder / POOL_FILE)
    return SharedSynthetic(pool, {h: metrics for h, (_, metrics) in released.items()})


def hospital_facts(run_dir: Path) -> dict[str, dict]:
    """Per hospital: GAN wall time and final losses (written when the pool was made)."""
    return json.loads((Path(run_dir) / SYNTHETIC_DIR / FACTS_FILE).read_text())
