"""The GAN's public prior (`synthetic.prior=phantom`): the conditional GAN trained without DP
on procedural phantom masses — public images from a seed stream of the prior's own, never a
record — so every hospital's DP training adapts a generator that can already draw masses of
both kinds instead of starting from noise. Computed once and cached like the classifier's
prior (fedpriv.priors.cache); recorded in the ledger as a public step with ε = 0.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from fedpriv.data.phantom import PhantomSpec, generate_phantom_mammo
from fedpriv.priors.build import PRIOR_STREAM
from fedpriv.priors.cache import cached
from fedpriv.settings import RunSettings
from fedpriv.synthetic.train import gan_state, train_gan

log = logging.getLogger(__name__)

#: Phantom patients (two views each) the GAN prior learns from.
PRIOR_PATIENTS = 1000
#: Mixed into the prior's seed: the GAN prior's stream differs from the classifier prior's.
GAN_STREAM = 0x47414E


def gan_prior(settings: RunSettings) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Both networks' prior weights (`generator.*`, `discriminator.*`) and the public step
    that made them; None under synthetic.prior=none."""
    g = settings.synthetic
    if g.prior == "none":
        return None
    shape = {
        "gan": {k: getattr(g, k) for k in ("latent_dim", "width", "lr", "batch_size", "prior_epochs")},
        "phantom_patients": PRIOR_PATIENTS,
        "image_size": settings.data.image_size,
        "seed": settings.prior.seed,
    }
    started = time.perf_counter()
    weights, key, reused = cached(settings.prior.cache_dir, "gan_phantom", shape, lambda: _train(settings))
    log.info("GAN prior %s in %.1f s (key %s)", "read from the cache" if reused else "computed", time.perf_counter() - started, key)
    return weights, {"mechanism": "public-gan-prior", "epsilon": 0.0, "source": "synthetic.prior=phantom", "cache_key": key}


def _train(settings: RunSettings) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng([settings.prior.seed, PRIOR_STREAM, GAN_STREAM])
    spec = PhantomSpec(PRIOR_PATIENTS, 2, settings.data.image_size, 4, 0.5, 3.0, 1.0)
    records = generate_phantom_mammo(spec, int(rng.integers(2**31)))
    gan = dataclasses.replace(settings.synthetic, epochs=settings.synthetic.prior_epochs)
    trained = train_gan(records, gan, augment=True, noise_multiplier=None, seed=int(rng.integers(2**31)))
    return gan_state(trained.generator, trained.discriminator)
