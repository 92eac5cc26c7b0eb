"""Phantom abdominal CT volumes with a pancreatic lesion: deterministic by seed, hard enough for DP to cost.

Each patient has one soft-tissue-windowed volume around the pancreas: body outline, fat, bowel-like
soft tissue, spine, aorta, a curved pancreas-like organ and a lesion in it. Malignant lesions are
lobulated, irregular, ill-defined, hypodense and heterogeneous (necrotic patches, speckle) and dilate
the duct upstream; benign ones are round, sharp, homogeneous and enhancing. Every cue follows one
latent per-patient "malignancy look" whose class distributions overlap, and each site (scanner) adds
its own gain, blur (in-plane and slice thickness) and noise, so a perfect score is impossible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from fedpriv.data.records import MALIGNANT, ImageRecords

# Soft-tissue window (W400/L40) intensities, as fractions of the window (air is 0): fat, fluid, soft
# tissue, enhanced pancreas, enhanced aorta and bone (saturated).
_FAT, _FLUID, _SOFT, _PANCREAS, _AORTA, _BONE = 0.16, 0.42, 0.52, 0.68, 0.86, 1.0
#: Volumes rendered per chunk; a constant, since the random draws follow the chunking.
_CHUNK = 16
#: Satellite spheres per lesion (lobulation).
_LOBES = 4


@dataclass(frozen=True)
class PhantomCTSpec:
    """Size and difficulty of a phantom CT data set (all from the Hydra data config)."""

    num_patients: int  # one volume per patient
    volume_size: int  # cube edge in voxels (D = H = W)
    num_sites: int
    malignant_fraction: float
    class_separation: float  # distance between class means of the latent look, in std units
    noise_level: float  # scanner noise std in units of a typical CT noise (~14 HU, 0.035 of the window)


def generate_phantom_ct(spec: PhantomCTSpec, seed: int) -> ImageRecords:
    """Generate `num_patients` labelled volumes, N×1×D×H×W float32 in [0, 1] (same seed → same data)."""
    rng = np.random.default_rng(seed)
    n, size = spec.num_patients, spec.volume_size
    voxel = 2.0 / size  # lengths below are in normalised units, the volume spans [-1, 1]

    labels = (rng.random(n) < spec.malignant_fraction).astype(np.int64)
    malignant = labels == MALIGNANT
    sites = rng.integers(0, spec.num_sites, n)
    ages = np.clip(np.where(malignant, rng.normal(67, 9, n), rng.normal(57, 12, n)), 30, 90)
    male = rng.random(n) < np.where(malignant, 0.55, 0.45)
    # One latent "malignancy look" per patient drives every lesion cue, with class overlap.
    look = rng.normal(labels * spec.class_separation, 1.0) / max(spec.class_separation, 1e-6)
    look = np.clip(look, -0.6, 1.6)
    pos_look = np.clip(look, 0.0, None)

    # Anatomy, in a field of view tight around the pancreas: body ellipse (larger in men, its sides
    # may leave the field), spine, aorta and a curved, tapering pancreas.
    body_a = rng.uniform(0.88, 1.0, n) + 0.05 * male
    body_b = rng.uniform(0.70, 0.80, n) + 0.04 * male
    spine = np.stack([rng.uniform(0.48, 0.56, n), rng.normal(0.0, 0.03, n)], 1)  # (y, x)
    aorta = spine + np.stack([rng.uniform(-0.3, -0.24, n), rng.uniform(0.06, 0.14, n)], 1)
    head_x, tail_x = rng.uniform(-0.58, -0.48, n), rng.uniform(0.6, 0.72, n)
    pan_y = aorta[:, 0] - rng.uniform(0.2, 0.28, n)
    pan_bend, pan_tilt = rng.uniform(0.2, 0.5, n), rng.uniform(-0.15, 0.05, n)
    pan_z, pan_zslope = rng.normal(0.0, 0.08, n), rng.uniform(-0.3, -0.1, n)
    pan_radius = rng.uniform(0.17, 0.21, n) * np.where(ages > 70, 0.9, 1.0)  # mild atrophy with age

    # Lesion: on the pancreas axis; size, lobulation, margin, hypodensity, necrosis follow the look.
    lesion_x = rng.uniform(-0.3, 0.3, n)
    lesion_radius = np.clip(rng.uniform(0.3, 0.44, n) + 0.05 * look, 0.22, 0.52)
    # Lobulation: satellite spheres centred near the main sphere's surface, hidden inside it for a
    # benign look and bulging out of it for a malignant one; plus a margin made irregular by noise.
    lobe_dirs = rng.standard_normal((n, _LOBES, 3))
    lobe_dirs /= np.linalg.norm(lobe_dirs, axis=2, keepdims=True)
    lobe_offset = lobe_dirs * (lesion_radius[:, None] * rng.uniform(0.55, 0.95, (n, _LOBES)))[:, :, None]
    lobe_growth = np.clip(0.1 + 0.5 * look, 0.0, 0.75)[:, None] * rng.uniform(0.6, 1.0, (n, _LOBES))
    lobe_radius = lesion_radius[:, None] * lobe_growth
    irregularity = np.clip(0.05 * look + rng.normal(0, 0.01, n), 0.0, 0.1)
    margin = np.clip(0.6 + 2.0 * look + rng.normal(0, 0.4, n), 0.5, 2.5) * voxel
    # Benign lesions enhance more than the pancreas (like a neuroendocrine tumour), malignant less.
    hypodensity = np.clip(-0.08 + 0.2 * look + rng.normal(0, 0.03, n), -0.15, 0.35)
    necrosis = np.clip(0.15 * pos_look + rng.normal(0, 0.03, n), 0.0, 0.3)
    speckle = np.clip(0.01 + 0.06 * pos_look + rng.normal(0, 0.01, n), 0.0, 0.12)
    # An obstructing tumour dilates the pancreatic duct upstream of it, towards the tail.
    duct_radius = np.clip(0.01 + 0.06 * look + rng.normal(0, 0.012, n), 0.0, 0.09)

    # Site (scanner) effects: gain, in-plane blur, slice blur and noise, fixed by the seed.
    site_rng = np.random.default_rng([seed, 7919])
    site = {
        "gain": site_rng.uniform(0.88, 1.12, spec.num_sites),
        "blur_xy": site_rng.uniform(0.3, 0.8, spec.num_sites) * size / 32,
        "blur_z": site_rng.uniform(0.4, 1.3, spec.num_sites) * size / 32,
        "noise": site_rng.uniform(0.7, 1.3, spec.num_sites) * 0.035 * spec.noise_level,
    }
    # Lesion centre on the pancreas axis, a little off it in z.
    t_lesion = (lesion_x - head_x) / (tail_x - head_x)
    lesion_centre = np.stack([
        pan_z + pan_zslope * t_lesion + rng.normal(0, 0.02, n),
        pan_y + pan_bend * (t_lesion - 0.5) ** 2 + pan_tilt * t_lesion,
        lesion_x,
    ], 1)
    patients = dict(
        sites=sites, body_a=body_a, body_b=body_b, spine=spine, aorta=aorta,
        head_x=head_x, tail_x=tail_x, pan_y=pan_y, pan_bend=pan_bend, pan_tilt=pan_tilt, pan_z=pan_z,
        pan_zslope=pan_zslope, pan_radius=pan_radius, t_lesion=t_lesion, duct_radius=duct_radius,
        lesion_centre=lesion_centre, lesion_radius=lesion_radius, lobe_offset=lobe_offset,
        lobe_radius=lobe_radius, irregularity=irregularity, margin=margin,
        hypodensity=hypodensity, necrosis=necrosis, speckle=speckle,
    )

    # Render in chunks of volumes: bounded memory, and temporaries that stay in cache (~1.3× faster).
    images = np.empty((n, 1, size, size, size), dtype=np.float32)
    for first in range(0, n, _CHUNK):
        chunk = {k: v[first : first + _CHUNK] for k, v in patients.items()}
        images[first : first + _CHUNK, 0] = _render(chunk, site, size, rng)

    return ImageRecords(
        images=images,
        labels=labels,
        patient_ids=np.array([f"CT{p:05d}" for p in range(n)]),
        metadata={
            "site": np.array([f"site_{s}" for s in sites]),
            "age": np.round(ages).astype(np.int64),
            "sex": np.where(male, "M", "F"),
        },
    )


def _render(
    p: dict[str, np.ndarray], site: dict[str, np.ndarray], size: int, rng: np.random.Generator
) -> np.ndarray:
    """Volumes (n, D, H, W) of a chunk of patients from their anatomy, lesion and site parameters."""
    f32 = np.float32
    n, voxel = len(p["sites"]), 2.0 / size
    c = ((np.arange(size, dtype=f32) + 0.5) * voxel - 1.0).astype(f32)
    z, y, x = c[:, None, None], c[None, :, None], c[None, None, :]

    def col(a):  # per-volume scalars, broadcast against (n, D, H, W)
        return np.asarray(a, dtype=f32).reshape(-1, 1, 1, 1)

    # Two random fields per volume: white speckle (the scanner blur below correlates it a little)
    # and a smooth field for bowel loops and necrotic patches.
    fine = rng.standard_normal((n, size, size, size), dtype=f32)
    coarse = _unit(gaussian_filter(fine, (0, 1.6, 1.6, 1.6), truncate=3))

    # Body: air outside, fat inside, a viscera ellipse of bowel loops (soft tissue in fat).
    body_r = np.sqrt((x / col(p["body_a"])) ** 2 + (y / col(p["body_b"])) ** 2)  # (n, 1, H, W)
    body = _soft_step(1.0 - body_r, 1.2 * voxel)
    viscera = _soft_step(0.8 - body_r, 2.5 * voxel)
    bowel = _soft_step(coarse - 0.6, 1.2)
    images = body * (_FAT + viscera * (0.7 + 0.3 * bowel) * (_SOFT - _FAT) + 0.02 * fine)
    images = _paint(images, _disc(y, x, p["spine"], 0.16, voxel), _BONE)
    images = _paint(images, _disc(y, x, p["aorta"], 0.09, voxel), _AORTA)

    # Pancreas: a tube along x whose centre line bends in y and rises in z, thick head, thin tail.
    length = col(p["tail_x"] - p["head_x"])
    t = (x - col(p["head_x"])) / length  # 0 at the head, 1 at the tail; (n, 1, 1, W)
    centre_y = col(p["pan_y"]) + col(p["pan_bend"]) * (t - 0.5) ** 2 + col(p["pan_tilt"]) * t
    centre_z = col(p["pan_z"]) + col(p["pan_zslope"]) * t
    radius = col(p["pan_radius"]) * (1.15 - 0.45 * np.clip(t, 0, 1))
    overshoot = (np.clip(-t, 0, None) + np.clip(t - 1, 0, None)) * length  # rounded caps at both ends
    tube = np.sqrt((y - centre_y) ** 2 + (z - centre_z) ** 2 + overshoot**2) / radius
    pancreas = _soft_step(1.0 - tube, 0.3)
    images = _paint(images, _soft_step(1.6 - tube, 0.25) * (1 - pancreas), _FAT)  # peripancreatic fat
    images = _paint(images, pancreas, _PANCREAS + 0.015 * coarse)
    upstream = _soft_step(t - col(p["t_lesion"]), 0.05) * _soft_step(0.95 - t, 0.03)
    duct = _soft_step(col(p["duct_radius"]) - tube * radius, 0.7 * voxel) * upstream
    images = _paint(images, duct, _FLUID)

    images = _paint_lesions(images, fine, coarse, p, c)

    # Site (scanner) effects: gain, blur (in-plane and slice thickness), quantum noise.
    sites = p["sites"]
    images *= col(site["gain"][sites])
    for s in np.unique(sites):
        rows = sites == s
        sigma = (0, site["blur_z"][s], site["blur_xy"][s], site["blur_xy"][s])
        images[rows] = gaussian_filter(images[rows], sigma, truncate=3)
    images += rng.standard_normal(images.shape, dtype=f32) * col(site["noise"][sites])
    return np.clip(images, 0.0, 1.0, out=images)


def _paint_lesions(
    images: np.ndarray, fine: np.ndarray, coarse: np.ndarray, p: dict[str, np.ndarray], c: np.ndarray
) -> np.ndarray:
    """Paint each volume's lesion, computed only in a box just large enough for the chunk's lesions.

    A lesion is a union of spheres (main + satellite lobes) whose surface the smooth noise field
    displaces by up to ~`irregularity`, with a soft margin of half-width `margin`; its intensity is
    the pancreas' minus `hypodensity`, darker still in necrotic patches of its core, plus speckle.
    """
    f32, size = np.float32, len(c)
    voxel = 2.0 / size
    radius, offset, lobe_radius = p["lesion_radius"], p["lobe_offset"], p["lobe_radius"]
    reach = np.maximum(radius, (np.linalg.norm(offset, axis=2) + lobe_radius).max(axis=1))
    reach += p["margin"] + 3 * p["irregularity"]
    half = int(np.ceil(reach.max() / voxel)) + 1
    edge = min(2 * half + 1, size)
    centre = p["lesion_centre"]
    start = np.clip(np.round((centre + 1) / voxel - 0.5).astype(np.int64) - half, 0, size - edge)
    iz, iy, ix = (start[:, k, None] + np.arange(edge) for k in range(3))  # (n, edge) each
    boxes = [tuple(slice(a, a + edge) for a in corner) for corner in start]

    def crop(volumes: np.ndarray) -> np.ndarray:  # (n, edge, edge, edge); slicing beats fancy indexing
        return np.stack([volume[box] for volume, box in zip(volumes, boxes)])

    def col(a):
        return np.asarray(a, dtype=f32).reshape(-1, 1, 1, 1)

    # Separable squared distances along each axis, (n, edge, 1, 1) etc., summed per sphere.
    dz = c[iz][:, :, None, None] - col(centre[:, 0])
    dy = c[iy][:, None, :, None] - col(centre[:, 1])
    dx = c[ix][:, None, None, :] - col(centre[:, 2])
    rho = np.sqrt(dz**2 + dy**2 + dx**2)
    distance = rho - col(radius)  # signed distance to the union of spheres (negative inside)
    for j in range(offset.shape[1]):
        o = offset[:, j]
        lobe = np.sqrt((dz - col(o[:, 0])) ** 2 + (dy - col(o[:, 1])) ** 2 + (dx - col(o[:, 2])) ** 2)
        np.minimum(distance, lobe - col(lobe_radius[:, j]), out=distance)
    texture = crop(coarse)
    distance += col(p["irregularity"]) * texture
    margin = col(p["margin"])
    mass = _soft_step(-distance, margin)
    core = _soft_step(0.7 * col(radius) - rho, margin)
    necrotic = _soft_step(texture - 0.3, 0.8) * core
    speckle = col(p["speckle"]) * crop(fine)
    lesion = _PANCREAS - col(p["hypodensity"]) - col(p["necrosis"]) * necrotic + speckle
    for volume, box, painted in zip(images, boxes, _paint(crop(images), mass, lesion)):
        volume[box] = painted
    return images


def _unit(field: np.ndarray) -> np.ndarray:
    """Zero mean, unit std per volume."""
    field -= field.mean(axis=(1, 2, 3), keepdims=True)
    field /= field.std(axis=(1, 2, 3), keepdims=True) + 1e-8
    return field


def _soft_step(signed_distance, half_width) -> np.ndarray:
    """Linear ramp from 0 to 1 as the signed distance goes from -half_width to +half_width.

    Compact (exactly 0 or 1 outside the ramp) and cheaper than a logistic; the scanner blur
    rounds its corners.
    """
    step = (signed_distance * (0.5 / half_width)).astype(np.float32, copy=False)  # a new array
    step += 0.5
    return np.clip(step, 0.0, 1.0, out=step)


def _paint(images: np.ndarray, weight: np.ndarray, value) -> np.ndarray:
    """Blend `value` in where `weight` (0…1) is high: an organ replaces what would be behind it."""
    return images + weight * (value - images)


def _disc(y, x, centre_yx: np.ndarray, radius: float, voxel: float) -> np.ndarray:
    """A soft-edged tube along z with a circular cross-section, one per volume: (n, 1, H, W)."""
    cy = centre_yx[:, 0].astype(np.float32).reshape(-1, 1, 1, 1)
    cx = centre_yx[:, 1].astype(np.float32).reshape(-1, 1, 1, 1)
    return _soft_step(radius - np.sqrt((y - cy) ** 2 + (x - cx) ** 2), 1.2 * voxel)
