"""Client-level DP (privacy=central): Flower's server-side DP wrappers, configured from
fedpriv's privacy settings. σ comes calibrated from fedpriv.privacy.plan."""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedpriv.settings import PrivacySettings


def with_client_level_dp(strategy: Strategy, privacy: PrivacySettings, noise_multiplier: float, sampled: int) -> Strategy:
    """`strategy` wrapped in Flower's server-side fixed- or adaptive-clipping DP wrapper.

    Adaptive clipping also releases a noisy count of clipped updates (std σ_b); Flower then
    noises the update with σ_Δ = (σ⁻² − (2σ_b)⁻²)^-½ so that both releases together are a
    Gaussian mechanism with noise multiplier σ (Andrew et al. 2021) — the ledger's σ.
    """
    if privacy.clipping == "adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            strategy,
            noise_multiplier=noise_multiplier,
            num_sampled_clients=sampled,
            initial_clipping_norm=privacy.update_clip_norm,
            target_clipped_quantile=privacy.target_clipped_quantile,
            clip_norm_lr=privacy.clip_norm_lr,
            # Flower's default m/20 only works for hundreds of hospitals; σ_b = max(m/20, σ)
            # keeps the update's noise within 1.16σ for small federations.
            clipped_count_stddev=max(sampled / 20, noise_multiplier),
        )
    return DifferentialPrivacyServerSideFixedClipping(
        strategy, noise_multiplier=noise_multiplier, clipping_norm=privacy.update_clip_norm, num_sampled_clients=sampled
    )
