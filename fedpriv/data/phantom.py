"""Phantom mammography mass patches: deterministic by seed, hard enough for DP to cost.

Malignant masses are irregular, spiculated and ill-defined; benign ones are round, smooth and
circumscribed. The two classes overlap in every cue (shape irregularity, spiculation, margin
sharpness), lesions sit on power-law (1/f^beta) tissue texture whose density varies, and each
site (scanner) adds its own gain, blur and noise, so a perfect score is impossible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from fedpriv.data.records import ImageRecords


@dataclass(frozen=True)
class PhantomSpec:
    """Size and difficulty of a phantom data set (all from the Hydra data config)."""

    num_patients: int
    images_per_patient: int
    image_size: int
    num_sites: int
    malignant_fraction: float
    class_separation: float  # distance between class means of the shape cues, in std units
    noise_level: float  # std of the additive detector noise, relative to tissue contrast


def generate_phantom_mammo(spec: PhantomSpec, seed: int) -> ImageRecords:
    """Generate `num_patients × images_per_patient` labelled patches (same seed → same data)."""
    rng = np.random.default_rng(seed)
    n_pat, views, size = spec.num_patients, spec.images_per_patient, spec.image_size
    scale = size / 64.0

    labels = (rng.random(n_pat) < spec.malignant_fraction).astype(np.int64)
    sites = rng.integers(0, spec.num_sites, n_pat)
    ages = np.clip(np.where(labels == 1, rng.normal(61, 10, n_pat), rng.normal(53, 11, n_pat)), 30, 90)
    # One latent "malignancy look" per patient drives every cue, with class overlap.
    look = rng.normal(labels * spec.class_separation, 1.0) / max(spec.class_separation, 1e-6)
    look = np.clip(look, -0.6, 1.6)
    radius = np.clip(rng.uniform(6.0, 10.0, n_pat) + 2.5 * look, 4.0, 15.0) * scale
    harmonics = rng.normal(0.0, 1.0, (n_pat, 7)) * np.clip(0.02 + 0.15 * look, 0.0, None)[:, None]
    phases = rng.uniform(0, 2 * np.pi, (n_pat, 7))
    n_spicules = rng.poisson(np.clip(8.0 * look - 1.0, 0.0, None))
    margin_width = np.clip(0.4 + 1.4 * look + rng.normal(0, 0.3, n_pat), 0.3, 3.0) * scale
    # Site (scanner) effects: gain, blur and noise differ per site, fixed by the seed.
    site_rng = np.random.default_rng([seed, 7919])
    site_gain = site_rng.uniform(0.8, 1.2, spec.num_sites)
    site_blur = site_rng.uniform(0.3, 1.0, spec.num_sites) * scale
    site_noise = site_rng.uniform(0.7, 1.3, spec.num_sites) * spec.noise_level

    n = n_pat * views
    patient_of = np.repeat(np.arange(n_pat), views)
    texture = _power_law_texture(rng, n, size, beta=3.0)
    density = rng.uniform(0.2, 0.8, n)
    # Per view: lesion position, rotation and scale jitter; the lesion's shape is the patient's.
    f32 = np.float32  # float32 throughout: half the memory traffic of float64
    centre = (size / 2 + rng.uniform(-4, 4, (n, 2)) * scale).astype(f32)
    rotation = rng.uniform(0, 2 * np.pi, n).astype(f32)
    r_view = (radius[patient_of] * rng.uniform(0.9, 1.1, n)).astype(f32)
    contrast = np.clip(0.22 + 0.12 * look[patient_of] + rng.normal(0, 0.03, n), 0.08, 0.6) * (1.1 - 0.4 * density)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy = yy[None] - centre[:, 0, None, None]
    dx = xx[None] - centre[:, 1, None, None]
    rho = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx) - rotation[:, None, None]
    wobble = np.zeros_like(rho)
    for j, k in enumerate(range(2, 9)):
        amplitude, phase = harmonics[patient_of, j].astype(f32), phases[patient_of, j].astype(f32)
        wobble += amplitude[:, None, None] * np.cos(k * theta + phase[:, None, None])
    boundary = r_view[:, None, None] * (1 + wobble)
    edge = (rho - boundary) / margin_width[patient_of, None, None].astype(f32)
    mass = 1.0 / (1.0 + np.exp(np.clip(edge, -30, 30)))
    mass += _spicules(rng, n_spicules[patient_of], centre, r_view, yy, xx, scale)
    images = (0.3 + 0.2 * density[:, None, None] + 0.06 * texture + contrast[:, None, None] * mass).astype(f32)
    # Site (scanner) effects: gain, blur, detector noise.
    site_of = sites[patient_of]
    images *= site_gain[site_of, None, None]
    for s in range(spec.num_sites):
        rows = site_of == s
        images[rows] = gaussian_filter(images[rows], (0, site_blur[s], site_blur[s]))
    images += rng.standard_normal(images.shape, dtype=f32) * (0.05 * site_noise[site_of]).astype(f32)[:, None, None]
    images = np.clip(images, 0.0, 1.0).astype(np.float32)[:, None]

    return ImageRecords(
        images=images,
        labels=labels[patient_of],
        patient_ids=np.array([f"PH{p:05d}" for p in patient_of]),
        metadata={
            "site": np.array([f"site_{s}" for s in sites[patient_of]]),
            "age": np.round(ages[patient_of]).astype(np.int64),
            "breast_density": density.astype(np.float32),
        },
    )


def _power_law_texture(rng: np.random.Generator, n: int, size: int, beta: float) -> np.ndarray:
    """Unit-variance noise with a 1/f^beta power spectrum, the classic mammographic texture."""
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
    f[0, 0] = 1.0
    amplitude = f ** (-beta / 2)
    amplitude[0, 0] = 0.0
    spectrum = np.fft.fft2(rng.standard_normal((n, size, size))) * amplitude
    texture = np.real(np.fft.ifft2(spectrum))
    texture -= texture.mean(axis=(1, 2), keepdims=True)
    texture /= texture.std(axis=(1, 2), keepdims=True) + 1e-8
    return texture.astype(np.float32)


def _spicules(rng, counts, centre, radius, yy, xx, scale) -> np.ndarray:
    """Thin bright lines radiating from each mass border, fading with distance."""
    out = np.zeros((len(counts), *yy.shape), dtype=np.float32)
    for j in range(int(counts.max(initial=0))):
        rows = np.flatnonzero(counts > j)
        angle = rng.uniform(0, 2 * np.pi, len(rows)).astype(np.float32)
        direction = np.stack([np.sin(angle), np.cos(angle)], 1)[:, :, None, None]
        start = centre[rows, :, None, None] + direction * radius[rows, None, None, None] * 0.8
        length = (radius[rows] * rng.uniform(0.6, 1.5, len(rows))).astype(np.float32)[:, None, None]
        rel_y, rel_x = yy[None] - start[:, 0], xx[None] - start[:, 1]
        t = np.clip((rel_y * direction[:, 0] + rel_x * direction[:, 1]) / length, 0.0, 1.0)
        dist = np.hypot(rel_y - t * length * direction[:, 0], rel_x - t * length * direction[:, 1])
        line = np.exp(-(dist**2) / (2 * (0.6 * scale) ** 2)) * (1 - t) * 0.8
        out[rows] = np.maximum(out[rows], line)
    return out
