"""Images of random processes and a contrastive (SimCLR) prior learned on them.

No record and no download: dead-leaves images (occluding disks and ellipses with power-law
radii, Baradad et al. 2021) and 1/f^β textures (the statistics of mammographic tissue), mixed,
generated on the fly. The encoder learns features that tell two augmented views of one image
from views of the others (NT-Xent, Chen et al. 2020), as in DP-RandP (Tang et al. 2023).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def dead_leaves(rng: np.random.Generator, n: int, size: int, leaves: int = 60) -> np.ndarray:
    """`n` images of `leaves` occluding ellipses, radii ~ r^-3 on [size/40, size/4], random
    grey levels and orientations, drawn back to front; values in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.broadcast_to(rng.uniform(0, 1, (n, 1, 1)), (n, size, size)).astype(np.float32).copy()
    r_min, r_max = size / 40, size / 4
    for _ in range(leaves):
        u = rng.uniform(0, 1, n)
        radius = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5  # density ∝ r^-3
        aspect = rng.uniform(0.4, 1.0, n)
        angle = rng.uniform(0, np.pi, n)
        cy, cx = rng.uniform(0, size, (2, n))
        dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
        cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        along, across = dx * cos + dy * sin, -dx * sin + dy * cos
        inside = (along / radius[:, None, None]) ** 2 + (across / (radius * aspect)[:, None, None]) ** 2 <= 1
        grey = rng.uniform(0, 1, n).astype(np.float32)
        images = np.where(inside, grey[:, None, None], images)
    return images


def power_law_texture(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """`n` textures with a 1/f^β power spectrum, β ~ U(1.5, 3.5) per image, scaled to [0, 1]."""
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
    f[0, 0] = 1.0
    beta = rng.uniform(1.5, 3.5, (n, 1, 1))
    amplitude = f[None] ** (-beta / 2)
    amplitude[:, 0, 0] = 0.0
    texture = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, size, size))) * amplitude))
    low, high = texture.min(axis=(1, 2), keepdims=True), texture.max(axis=(1, 2), keepdims=True)
    return ((texture - low) / (high - low + 1e-8)).astype(np.float32)


def random_process_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """A batch (n, 1, size, size) in [0, 1]: dead leaves over a 1/f texture, blended with a
    random weight per image (from pure leaves to pure texture)."""
    weight = rng.uniform(0, 1, (n, 1, 1)).astype(np.float32)
    mixed = weight * dead_leaves(rng, n, size) + (1 - weight) * power_law_texture(rng, n, size)
    return mixed[:, None]


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view per image: a random resized crop (scale 0.25–1), rotation, flip,
    contrast/brightness jitter and noise — SimCLR's augmentations for grayscale."""
    n = len(images)
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    scale = (0.25 + 0.75 * u(n)).sqrt()  # edge of the crop, as a fraction of the image
    angle = u(n) * 2 * math.pi
    flip = torch.where(u(n) < 0.5, -1.0, 1.0)
    shift = (1 - scale)[:, None] * (2 * u(n, 2) - 1)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)
    contrast = 0.6 + 0.8 * u(n, 1, 1, 1)
    brightness = 0.2 * (2 * u(n, 1, 1, 1) - 1)
    mean = views.mean(dim=(2, 3), keepdim=True)
    views = (views - mean) * contrast + mean + brightness
    views = views + 0.03 * u(n, 1, 1, 1) * torch.randn(views.shape, generator=generator)
    return views.clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalized-temperature cross entropy: each view must pick its twin among
    the 2n − 1 other views of the batch."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


class Projection(nn.Module):
    """SimCLR's projection head on pooled features; discarded after pretraining."""

    def __init__(self, features: int, out: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
