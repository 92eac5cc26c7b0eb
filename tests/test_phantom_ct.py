"""Phantom CT volumes are deterministic and well formed; the 3D CNN learns them (but does not solve
them) and trains under Opacus with exact per-layer per-sample gradients."""

import dataclasses

import numpy as np
import pytest
import timm
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

import fedpriv.models  # noqa: F401  (registers the fedpriv_* models in timm)
from fedpriv.data.phantom_ct import PhantomCTSpec, generate_phantom_ct
from fedpriv.data.records import MALIGNANT

SPEC = PhantomCTSpec(
    num_patients=60, volume_size=16, num_sites=3, malignant_fraction=0.45, class_separation=3.0,
    noise_level=1.0,
)


def _spec(**changes) -> PhantomCTSpec:
    return dataclasses.replace(SPEC, **changes)


def _cnn3d() -> torch.nn.Module:
    return timm.create_model("fedpriv_cnn3d_small", num_classes=1, in_chans=1)


def test_same_seed_same_volumes_other_seed_other_volumes():
    a, b, c = generate_phantom_ct(SPEC, 3), generate_phantom_ct(SPEC, 3), generate_phantom_ct(SPEC, 4)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    for name in a.metadata:
        assert np.array_equal(a.metadata[name], b.metadata[name])
    assert not np.array_equal(a.images, c.images)


def test_volumes_labels_and_metadata_are_well_formed():
    r = generate_phantom_ct(SPEC, 0)
    assert r.images.shape == (60, 1, 16, 16, 16) and r.images.dtype == np.float32
    assert r.images.flags.c_contiguous
    assert 0.0 <= r.images.min() and r.images.max() <= 1.0 and r.images.std() > 0.1
    assert r.labels.dtype == np.int64 and set(np.unique(r.labels)) <= {0, 1}
    assert list(r.patient_ids[:2]) == ["CT00000", "CT00001"] and len(r.patients) == 60  # one volume each
    assert set(r.metadata) == {"site", "age", "sex"}
    assert all(len(column) == 60 for column in r.metadata.values())
    assert set(r.metadata["site"]) == {"site_0", "site_1", "site_2"}
    assert r.metadata["age"].dtype == np.int64
    assert 30 <= r.metadata["age"].min() <= r.metadata["age"].max() <= 90
    assert set(r.metadata["sex"]) == {"F", "M"}


def test_label_balance_follows_malignant_fraction_and_malignant_patients_are_older():
    r = generate_phantom_ct(_spec(num_patients=800, volume_size=8), 1)
    assert abs(r.malignant_fraction - 0.45) < 0.05
    malignant = r.labels == MALIGNANT
    assert r.metadata["age"][malignant].mean() > r.metadata["age"][~malignant].mean() + 5


def test_every_volume_size_keeps_the_anatomy_in_range():
    for size in (8, 24, 40):
        r = generate_phantom_ct(_spec(num_patients=5, volume_size=size), 2)
        assert r.images.shape == (5, 1, size, size, size)
        assert np.isfinite(r.images).all() and 0.0 <= r.images.min() and r.images.max() <= 1.0


def test_noise_level_and_sites_change_the_volumes():
    """Same seed, same anatomy: only the scanner noise scales; sites differ in gain, blur and noise."""
    quiet, noisy = (generate_phantom_ct(_spec(num_patients=120, noise_level=level), 6) for level in (0.0, 2.0))
    assert np.array_equal(quiet.labels, noisy.labels)

    def roughness(records):
        return np.abs(np.diff(records.images, axis=-1)).mean()

    assert roughness(noisy) > 1.3 * roughness(quiet)
    sites = noisy.metadata["site"]
    site_means = [noisy.images[sites == s].mean() for s in np.unique(sites)]
    assert max(site_means) / min(site_means) > 1.03


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_3d_cnn_learns_the_phantom_but_does_not_solve_it(one_thread):
    """A few non-private epochs find the lesion cues; the classes overlap, so AUROC stays below 1."""
    r = generate_phantom_ct(_spec(num_patients=400, volume_size=32), 3)
    x = (torch.from_numpy(r.images) - 0.5) / 0.5  # the scaling fedpriv's training uses
    y = torch.from_numpy(r.labels).float()
    torch.manual_seed(0)
    model = _cnn3d()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    order = torch.Generator().manual_seed(0)
    for _ in range(6):
        model.train()
        for batch in torch.randperm(300, generator=order).split(8):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[batch]).reshape(-1), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model(x[300:]).reshape(-1).numpy()
    auroc = roc_auc_score(r.labels[300:], scores)
    assert 0.75 < auroc < 0.995, auroc


def test_3d_cnn_is_small_and_opacus_compatible():
    model = _cnn3d()
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 150_000
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert model(torch.rand(2, 1, 32, 32, 32)).shape == (2, 1)


def test_3d_cnn_per_sample_gradients_are_exact_and_need_no_functorch():
    torch.manual_seed(0)
    model = _cnn3d()
    gsm = GradSampleModule(model, loss_reduction="sum")
    layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    assert not [type(m).__name__ for m in layers if type(m) not in GradSampleModule.GRAD_SAMPLERS]
    x = torch.rand(4, 1, 16, 16, 16)
    gsm(x).sum().backward()
    per_sample = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    assert all(g.shape == (4, *p.shape) for g, p in zip(per_sample.values(), model.parameters()))
    for i in (0, 3):
        model.zero_grad()
        model(x[i : i + 1]).sum().backward()
        for name, p in model.named_parameters():
            assert torch.allclose(per_sample[name][i], p.grad, atol=1e-5, rtol=1e-4), name


def test_one_private_step_on_volumes():
    torch.manual_seed(0)
    r = generate_phantom_ct(SPEC, 5)
    data = TensorDataset(torch.from_numpy(r.images[:32]), torch.from_numpy(r.labels[:32]).float())
    model = _cnn3d()
    before = [p.detach().clone() for p in model.parameters()]
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    steps = 0
    for images, labels in loader:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images).reshape(-1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        break
    assert steps == 1
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert 0 < engine.get_epsilon(delta=1e-5) < float("inf")
