"""The pooled synthetic images the server collects from every hospital's generator and
sends back: 8-bit images (as they would be saved), labels, and which hospital made each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpriv.data.records import ImageRecords
from fedpriv.synthetic.gan import NUM_CLASSES

CLASS_NAMES = ("benign", "malignant")
#: `hospitals` of the images the federated GAN's generator made (synthetic.federated).
FEDERATED_GAN = -1


@dataclass(frozen=True)
class SyntheticPool:
    images: np.ndarray  # N×1×H×W uint8
    labels: np.ndarray  # N int64, 1 = malignant
    hospitals: np.ndarray  # N int64: the hospital whose generator made the image (FEDERATED_GAN: the federation's)

    @classmethod
    def pooled(cls, parts: dict[int, tuple[np.ndarray, np.ndarray]]) -> SyntheticPool:
        """Each hospital's (images, labels), in hospital order."""
        order = sorted(parts)
        return cls(
            images=np.concatenate([parts[h][0] for h in order]),
            labels=np.concatenate([parts[h][1] for h in order]).astype(np.int64),
            hospitals=np.concatenate([np.full(len(parts[h][1]), h, dtype=np.int64) for h in order]),
        )

    def __len__(self) -> int:
        return len(self.labels)

    def of_hospitals(self, hospitals: list[int]) -> SyntheticPool:
        """The images these hospitals' generators made."""
        keep = np.isin(self.hospitals, hospitals)
        return SyntheticPool(self.images[keep], self.labels[keep], self.hospitals[keep])

    def records(self, index: np.ndarray | None = None) -> ImageRecords:
        """As training records (float32 in [0, 1]); each image is its own synthetic 'patient'."""
        index = np.arange(len(self)) if index is None else index
        return ImageRecords(
            images=self.images[index].astype(np.float32) / 255.0,
            labels=self.labels[index],
            patient_ids=np.array([f"synthetic-{i}" for i in index], dtype=object),
            metadata={"hospital": self.hospitals[index]},
        )

    def draw(self, count: int, seed: int) -> ImageRecords:
        """`count` images at random (without replacement while the pool lasts)."""
        rng = np.random.default_rng(seed)
        whole, rest = divmod(count, len(self))
        index = np.concatenate([rng.permutation(len(self)) for _ in range(whole)] + [rng.permutation(len(self))[:rest]])
        return self.records(index.astype(np.int64))

    def to_arrays(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(getattr(self, k)) for k in ("images", "labels", "hospitals")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor]) -> SyntheticPool:
        return cls(**{k: arrays[k].numpy() for k in ("images", "labels", "hospitals")})

    def save(self, path: Path) -> None:
        np.savez_compressed(path, images=self.images, labels=self.labels, hospitals=self.hospitals)

    @classmethod
    def load(cls, path: Path) -> SyntheticPool:
        with np.load(path) as saved:
            return cls(saved["images"], saved["labels"], saved["hospitals"])


def save_sample_grid(images: np.ndarray, labels: np.ndarray, path: Path, title: str, per_class: int = 8) -> Path:
    """A PNG with one row of `per_class` samples per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(NUM_CLASSES, per_class, figsize=(per_class * 1.1, NUM_CLASSES * 1.25), squeeze=False)
    for label in range(NUM_CLASSES):
        chosen = images[labels == label][:per_class]
        for column, ax in enumerate(axes[label]):
            ax.axis("off")
            if column < len(chosen):
                ax.imshow(chosen[column, 0], cmap="gray", vmin=0, vmax=255)
        axes[label][0].set_title(CLASS_NAMES[label], fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
