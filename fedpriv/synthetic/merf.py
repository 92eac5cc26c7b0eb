"""A DP-MERF-style generator (Harder et al. 2021) in the public prior's feature space
(`synthetic.generator=merf`).

Each hospital releases, once, each class's sum of an embedding of its images (and the class
count) with Gaussian noise: every record adds a vector of norm ≤ 1 to one class, so the
release is the Gaussian mechanism with sensitivity 1 (σ calibrated like one DP-SGD step with
q = 1). The server adds the hospitals' sums — the release is federated by construction — and
trains the conditional generator, touching no record, so that each class's mean embedding of
its images matches the noisy class mean. The embedding reads the run's starting model (its
public prior): φ(x) = [cos(uW + b)/√D, u]/√2 with u the unit-norm pre-logit features, W and b
drawn from a public seed, W's scale the median distance between features of public
random-process images. The linear part u carries the class-mean difference a linear probe
uses; the random Fourier part the rest of the distribution.
"""

from __future__ import annotations

import math
import numpy as np
import torch
from torch import nn

from fedpriv.data.records import ImageRecords
from fedpriv.models import build_model
from fedpriv.priors.random_process import random_process_images
from fedpriv.priors.start import starting_weights
from fedpriv.settings import RunSettings, SyntheticSettings
from fedpriv.synthetic.gan import NUM_CLASSES, ConditionalGenerator, GanShape

#: Mixed into the seed of the embedding's random features (the same at every hospital and the server).
MERF_STREAM = 0x4D455246
#: Public random-process images that set the random features' scale.
SCALE_IMAGES = 256


class FeatureEmbedding(nn.Module):
    """φ(images) with ‖φ‖ ≤ 1 per image; `backbone`: the run's starting model (frozen)."""

    def __init__(self, backbone: nn.Module, dims: int, seed: int, image_size: int) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        rng = np.random.default_rng([seed, MERF_STREAM])
        public = torch.from_numpy(random_process_images(rng, SCALE_IMAGES, image_size))
        with torch.no_grad():
            u = self.unit_features((public - 0.5) / 0.5)
        scale = float(torch.cdist(u, u).median().clamp(min=1e-3))
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        self.register_buffer("weight", torch.randn(u.shape[1], dims, generator=generator) / scale)
        self.register_buffer("phase", torch.rand(dims, generator=generator) * 2 * math.pi)

    def unit_features(self, images: torch.Tensor) -> torch.Tensor:
        h = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True).flatten(1)
        return h / h.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        u = self.unit_features(images)
        fourier = torch.cos(u @ self.weight + self.phase) / math.sqrt(self.weight.shape[1])
        return torch.cat([fourier, u], dim=1) / math.sqrt(2)


@torch.no_grad()
def class_sums(embedding: FeatureEmbedding, records: ImageRecords, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: the sum of the records' embeddings and the count, both scaled by 1/√2, so
    that one record changes the pair by a vector of norm ≤ 1 (sensitivity 1)."""
    images = (torch.from_numpy(records.images) - 0.5) / 0.5
    labels = torch.from_numpy(records.labels.astype(np.int64))
    sums = torch.cat([embedding(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    per_class = torch.stack([sums[labels == c].sum(0) for c in range(NUM_CLASSES)]) / math.sqrt(2)
    counts = torch.stack([(labels == c).sum() for c in range(NUM_CLASSES)]).double() / math.sqrt(2)
    return per_class.double(), counts


def noised(sums: torch.Tensor, counts: torch.Tensor, noise_multiplier: float, seed: int) -> dict[str, torch.Tensor]:
    """The Gaussian mechanism on (sums, counts): what a hospital releases."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "sums": sums + noise_multiplier * torch.randn(sums.shape, generator=generator, dtype=torch.float64),
        "counts": counts + noise_multiplier * torch.randn(counts.shape, generator=generator, dtype=torch.float64),
    }


def train_generator(embedding: FeatureEmbedding, sums: torch.Tensor, counts: torch.Tensor, settings: SyntheticSettings,
                    image_size: int, seed: int) -> ConditionalGenerator:
    """The conditional generator whose images' class-mean embedding matches the released
    class means (post-processing of the noisy release: no record is touched)."""
    torch.manual_seed(seed)
    target = (sums / counts.clamp(min=1.0)[:, None]).float()
    generator = ConditionalGenerator(GanShape(image_size, settings.latent_dim, settings.width))
    optimizer = torch.optim.Adam(generator.parameters(), lr=settings.lr, betas=(0.5, 0.999))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(settings.batch_size // NUM_CLASSES)
    for _ in range(settings.generator_steps):
        embedded = embedding(generator(torch.randn(len(labels), settings.latent_dim), labels))
        loss = sum(((embedded[labels == c].mean(0) - target[c]) ** 2).sum() for c in range(NUM_CLASSES))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return generator.eval()


def run_embedding(settings: RunSettings) -> FeatureEmbedding:
    """The run's embedding, on its starting model (its public prior, or its initialization):
    every hospital and the server build the same one."""
    backbone = build_model(settings.model, settings.data.image_size)
    backbone.load_state_dict(starting_weights(settings.model, settings.prior, settings.data.image_size, settings.seed)[0])
    return FeatureEmbedding(backbone, settings.synthetic.embedding_dims, settings.seed, settings.data.image_size)

