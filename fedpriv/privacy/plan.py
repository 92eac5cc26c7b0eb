"""Each hospital's privacy plan, fixed before training: the GAN's DP-SGD (when synthetic data
is shared) and the classifier's DP-SGD, calibrated so that together they spend exactly
privacy.target_epsilon. Hospitals and the server's pre-run checks compute it the same way."""

from __future__ import annotations

from dataclasses import dataclass

from fedpriv.privacy.accounting import History, calibrate_noise_multiplier, epsilon_spent, poisson_plan
from fedpriv.settings import PrivacySettings, RunSettings


@dataclass(frozen=True)
class Mechanism:
    """The Poisson-subsampled Gaussian mechanism of one DP-SGD session (σ = 0: no DP)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def gan_mechanism(settings: RunSettings, real_records: int) -> Mechanism | None:
    """DP-SGD on the discriminator over the hospital's whole GAN training — or, under
    synthetic.generator=merf, the one Gaussian release of its class sums (q = 1, one step) —
    (None: no synthetic data; σ = 0 with synthetic.dp=false). It alone spends
    epsilon_share × target ε."""
    g, p = settings.synthetic, settings.privacy
    if not g.enabled:
        return None
    if g.generator == "merf":
        sample_rate, steps = 1.0, 1
    else:
        sample_rate, per_epoch = poisson_plan(real_records, g.batch_size)
        steps = g.epochs * per_epoch
    if not g.dp:
        return Mechanism(0.0, sample_rate, steps)
    sigma = calibrate_noise_multiplier(g.epsilon_share * p.target_epsilon, p.delta, sample_rate, steps, key="synthetic.epsilon_share × privacy.target_epsilon")
    return Mechanism(sigma, sample_rate, steps)


def synthetic_per_round(settings: RunSettings, real_records: int) -> int:
    """Synthetic images a hospital mixes into each local round (synthetic=augment)."""
    g = settings.synthetic
    return round(g.mix_ratio * real_records) if g.name == "augment" else 0


def classifier_mechanism(settings: RunSettings, real_records: int) -> Mechanism:
    """One round of the classifier's DP-SGD; σ is calibrated once for the whole planned run,
    composed with the hospital's DP GAN (a non-private GAN is excluded: its ε is ∞ anyway,
    and the classifier keeps its own guarantee). Poisson sampling runs over the real records
    plus the synthetic ones mixed in: each real record is sampled with the same rate."""
    p, t = settings.privacy, settings.training
    sample_rate, per_epoch = poisson_plan(real_records + synthetic_per_round(settings, real_records), t.batch_size)
    gan = gan_mechanism(settings, real_records)
    prior = (gan.entry,) if gan is not None and gan.noise_multiplier > 0 else ()
    planned = settings.rounds * settings.local_epochs * per_epoch
    sigma = calibrate_noise_multiplier(p.target_epsilon, p.delta, sample_rate, planned, prior)
    return Mechanism(sigma, sample_rate, settings.local_epochs * per_epoch)


def central_noise_multiplier(settings: RunSettings) -> float:
    """σ of client-level DP-FedAvg, calibrated so the planned rounds land on
    privacy.client_target_epsilon. Accounted without amplification by client sampling
    (q = 1): Flower samples a fixed number of hospitals, for which Poisson-subsampling
    amplification does not hold, so this is an honest upper bound."""
    p = settings.privacy
    return calibrate_noise_multiplier(p.client_target_epsilon, p.delta, 1.0, settings.rounds, key="privacy.client_target_epsilon")


def fits_budget(history: History, session: tuple[float, float, int], privacy: PrivacySettings) -> bool:
    """Whether a hospital with this history may run one more session within its budget. Only
    sessions that added noise count: a GAN without DP (σ = 0) makes its ε ∞ anyway, and the
    budget then governs the classifier alone."""
    private = [entry for entry in history if entry[0] > 0]
    return epsilon_spent([*private, session], privacy.delta) <= privacy.budget
