"""Training on the pooled synthetic images (the pretraining of synthetic=pretrain) and how
good the images are: train-on-synthetic-test-on-real AUROC, and the Fréchet distance between
real and synthetic images in the feature space of the run's own final classifier (no
downloaded Inception weights), next to the distance between two real sets for scale."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy import linalg
from torch import nn
from torch.utils.data import DataLoader

from fedpriv.data.records import ImageRecords, SplitData
from fedpriv.metrics import auroc
from fedpriv.devices import backend_device
from fedpriv.models import build_model, freeze_backbone
from fedpriv.settings import RunSettings
from fedpriv.synthetic.pool import SyntheticPool
from fedpriv.training import RecordDataset, make_optimizer, predict, train_epochs


def train_on_synthetic(settings: RunSettings, weights: dict, pool: SyntheticPool) -> dict[str, torch.Tensor]:
    """The model trained without DP on the synthetic pool (post-processing of DP releases:
    it costs no privacy), from `weights`, for synthetic.train_epochs at synthetic.train_lr.
    Under training.freeze=backbone the head alone, as in the DP rounds that follow: the
    prior's features are kept, not overwritten by what the generator draws."""
    g = settings.synthetic
    torch.manual_seed(settings.seed)
    model = build_model(settings.model, settings.data.image_size)
    model.load_state_dict(weights)
    if settings.training.freeze == "backbone":
        freeze_backbone(model, settings.model.name)
    model.to(backend_device(settings.backend))  # the server's device
    training = dataclasses.replace(settings.training, lr=g.train_lr)
    loader = DataLoader(
        RecordDataset(pool.records(), settings.data.augment),
        batch_size=settings.training.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    train_epochs(model, make_optimizer(model, training), loader, g.train_epochs, False)
    return {k: v.cpu() for k, v in model.state_dict().items()}


@torch.no_grad()
def features(model: nn.Module, records: ImageRecords, batch_size: int) -> np.ndarray:
    """The classifier's pre-logit features (timm's forward_features → forward_head(pre_logits))."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(RecordDataset(records, augment=False), batch_size=batch_size)
    out = [model.forward_head(model.forward_features(x.to(device)), pre_logits=True).cpu() for x, _ in loader]
    return torch.cat(out).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) between Gaussians fitted to two feature sets."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # near-singular product: regularise, as pytorch-fid does
        eps = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def synthetic_quality(
    settings: RunSettings, pool: SyntheticPool, splits: SplitData, final: nn.Module, trained_on_synthetic: nn.Module
) -> dict:
    batch = settings.training.eval_batch_size
    test = splits.test
    synthetic = pool.records()
    real_test, real_val = features(final, test, batch), features(final, splits.val, batch)
    fake = features(final, synthetic, batch)
    return {
        "tstr_auroc": auroc(test.labels, predict(trained_on_synthetic, test, batch)),
        "frechet_distance": frechet_distance(real_test, fake),
        "frechet_distance_real_val_vs_test": frechet_distance(real_val, real_test),
        "feature_model": "final global classifier (pre-logit features)",
    }
