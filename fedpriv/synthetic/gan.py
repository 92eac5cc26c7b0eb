"""The conditional DCGAN of Osuala et al. (mammo_dp): the generator takes noise plus an
embedded malignancy label; the discriminator sees the label as an extra image channel.

Only layers Opacus has per-sample grad samplers for are in the discriminator (Conv2d,
GroupNorm, Embedding; no BatchNorm), so DP-SGD trains it with per-layer hooks. The
generator never sees a real image: it is DP by post-processing of the discriminator.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpriv.errors import FedprivError

NUM_CLASSES = 2  # 0 benign, 1 malignant


@dataclass(frozen=True)
class GanShape:
    """What fixes the networks' shapes (saved with a generator so it can be rebuilt)."""

    image_size: int
    latent_dim: int
    width: int

    @property
    def stages(self) -> int:
        """Up/down-sampling stages between 4×4 and image_size×image_size."""
        return int(math.log2(self.image_size)) - 2


class ConditionalGenerator(nn.Module):
    """(noise, label) → a grayscale image in [-1, 1]; transposed convs double the edge per stage."""

    def __init__(self, shape: GanShape) -> None:
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(NUM_CLASSES, shape.latent_dim)
        channels = [shape.width * 2 ** (shape.stages - 1 - i) for i in range(shape.stages)]
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(2 * shape.latent_dim, channels[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(),
        ]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(channels[-1], 1, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        code = torch.cat([noise, self.embed(labels)], dim=1)
        return self.net(code[:, :, None, None])


class ConditionalDiscriminator(nn.Module):
    """(image, label) → real/fake logit; the label enters as a learned full-size channel."""

    def __init__(self, shape: GanShape) -> None:
        super().__init__()
        self.shape = shape
        self.label_map = nn.Embedding(NUM_CLASSES, shape.image_size**2)
        layers: list[nn.Module] = [nn.Conv2d(2, shape.width, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = shape.width
        for _ in range(shape.stages - 1):
            layers += [nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.GroupNorm(8, 2 * width), nn.LeakyReLU(0.2)]
            width *= 2
        layers += [nn.Conv2d(width, 1, 4, 1, 0)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        size = self.shape.image_size
        channel = self.label_map(labels).view(-1, 1, size, size)
        return self.net(torch.cat([images, channel], dim=1)).reshape(-1)


@torch.no_grad()
def generate(generator: ConditionalGenerator, labels: np.ndarray, seed: int, batch: int = 256) -> np.ndarray:
    """Images (N×1×H×W, uint8 — as they would be saved) for the given labels, seeded."""
    generator.eval()
    rng = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch):
        y = torch.as_tensor(labels[start : start + batch], dtype=torch.long)
        noise = torch.randn(len(y), generator.shape.latent_dim, generator=rng)
        images = (generator(noise, y) + 1) / 2
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, generator.shape.image_size, generator.shape.image_size), np.uint8)


def balanced_labels(per_class: int) -> np.ndarray:
    """`per_class` benign then `per_class` malignant labels."""
    return np.repeat(np.arange(NUM_CLASSES), per_class)


def save_generator(generator: ConditionalGenerator, path: Path, facts: dict) -> None:
    """The generator's weights and shape, plus facts (hospital, ε, …) for whoever samples it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"shape": asdict(generator.shape), "state_dict": generator.state_dict(), "facts": facts}, path)


def load_generator(path: Path) -> tuple[ConditionalGenerator, dict]:
    if not Path(path).is_file():
        raise FedprivError(f"{path} does not exist; pass a run's synthetic/generator_hospital_<k>.pt")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        generator = ConditionalGenerator(GanShape(**saved["shape"]))
        generator.load_state_dict(saved["state_dict"])
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as error:
        raise FedprivError(
            f"{path} is not a fedpriv generator ({type(error).__name__}); pass a run's synthetic/generator_hospital_<k>.pt"
        ) from None
    return generator, saved.get("facts", {})
