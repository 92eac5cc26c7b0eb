"""Priors that cost no privacy: cached only for identical settings, drawn from their own
seed stream, recorded as public steps; starting weights from a file or timm; freezing."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.client import backbone_frozen
from fedpriv.data.sources import load_splits
from fedpriv.data.phantom import PhantomSpec, generate_phantom_mammo
from fedpriv.errors import FedprivError
from fedpriv.models import build_model, freeze_backbone
from fedpriv.priors.build import PRIOR_STREAM, prior_weights
from fedpriv.priors.random_process import augment, nt_xent, random_process_images
from fedpriv.priors.start import starting_weights
from fedpriv.privacy.engine import make_private
from fedpriv.server import initial_weights, starting_point
from fedpriv.settings import ModelSettings, PriorSettings
from fedpriv.training import train_epochs

from conftest import TINY, make_settings
from in_process import run_in_process

CNN = ModelSettings("fedpriv_cnn_small", (("widths", (8, 16, 16)),))
NO_PRIOR = PriorSettings(name="none")


def tiny_prior(name: str, folder, **changes) -> PriorSettings:
    base = dict(name=name, cache_dir=str(folder), steps=3, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=0.0)
    extra = {"phantom": dict(num_patients=12, class_separation=3.0), "random_process": dict(temperature=0.2)}[name]
    return PriorSettings(**{**base, **extra, **changes})


def test_a_cached_prior_is_reused_only_for_identical_settings(tmp_path):
    prior = tiny_prior("phantom", tmp_path)
    weights, step = prior_weights(prior, CNN, 32)
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 1 and step["epsilon"] == 0.0 and step["mechanism"] == "public-prior"
    stamp = files[0].stat().st_mtime_ns
    again, step_again = prior_weights(prior, CNN, 32)
    assert step_again["cache_key"] == step["cache_key"] and files[0].stat().st_mtime_ns == stamp
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    # Anything that shapes the weights gives a new key and a new file, never the stale prior.
    other_folder = dataclasses.replace(prior, cache_dir=str(tmp_path))  # the folder does not shape it
    changed = [
        (dataclasses.replace(prior, steps=4), CNN, 32, 0),
        (dataclasses.replace(prior, num_patients=14), CNN, 32, 0),
        (tiny_prior("random_process", tmp_path), CNN, 32, 0),
        (prior, ModelSettings("fedpriv_cnn_small", (("widths", (8, 16, 32)),)), 32, 0),
        (prior, CNN, 48, 0),
        (prior, CNN, 32, 1),
    ]
    keys = {step["cache_key"]}
    for settings, model, size, seed in changed:
        keys.add(prior_weights(dataclasses.replace(settings, seed=seed), model, size)[1]["cache_key"])
    assert len(keys) == 1 + len(changed) and len(list(tmp_path.glob("*.pt"))) == 1 + len(changed)
    assert prior_weights(other_folder, CNN, 32)[1]["cache_key"] == step["cache_key"]


def test_the_phantom_prior_draws_its_own_images_not_the_runs_records():
    """Same run seed, same phantom spec: the prior's phantom seed is a stream of its own."""
    rng = np.random.default_rng([0, PRIOR_STREAM])
    rng.integers(2**31), rng.integers(2**31)  # torch seed, augmentation generator
    prior_seed = int(rng.integers(2**31))
    spec = PhantomSpec(20, 1, 32, 2, 0.45, 3.0, 1.0)
    assert prior_seed != 0
    assert not np.allclose(generate_phantom_mammo(spec, prior_seed).images, generate_phantom_mammo(spec, 0).images)


def test_random_process_images_and_views():
    images = random_process_images(np.random.default_rng(0), 6, 32)
    assert images.shape == (6, 1, 32, 32) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
    assert np.array_equal(images, random_process_images(np.random.default_rng(0), 6, 32))
    views = augment(torch.from_numpy(images), torch.Generator().manual_seed(0))
    assert views.shape == images.shape and not torch.allclose(views, torch.from_numpy(images))


def test_nt_xent_rewards_matching_views():
    z = torch.randn(16, 8)
    assert nt_xent(z, z + 0.01 * torch.randn(16, 8), 0.2) < nt_xent(z, torch.randn(16, 8), 0.2) - 1


def test_the_prior_is_a_public_step_of_the_ledger_and_summary(tmp_path):
    overrides = [*TINY, "rounds=2", "prior=phantom", "prior.steps=3", "prior.num_patients=12",
                 f"prior.cache_dir={tmp_path / 'cache'}", "training.freeze=backbone", "training.freeze_rounds=1"]
    summary = run_in_process(make_settings(overrides), tmp_path / "run")
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    step = ledger["public_steps"][0]
    assert step["mechanism"] == "public-prior" and step["epsilon"] == 0.0 and step["source"] == "prior=phantom"
    assert summary["privacy"]["public_steps"] == ledger["public_steps"]
    assert all(e["mechanism"] == "dp-sgd" for e in ledger["entries"])  # the prior spent nothing
    assert summary["rounds_completed"] == 2 and 0 < summary["privacy"]["max_epsilon"] <= 8.0 + 1e-6


def test_model_init_loads_a_state_dict_and_names_every_mismatch(tmp_path):
    torch.manual_seed(1)
    source = build_model(CNN, 32)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    weights, steps = starting_weights(dataclasses.replace(CNN, init=str(tmp_path / "w.pt")), NO_PRIOR, 32, 0)
    assert all(torch.equal(weights[k], v) for k, v in source.state_dict().items())
    assert steps == [{"mechanism": "public-weights", "epsilon": 0.0, "source": str(tmp_path / "w.pt")}]
    wider = build_model(ModelSettings("fedpriv_cnn_small", (("widths", (8, 16, 32)),)), 32).state_dict()
    torch.save(wider, tmp_path / "wider.pt")
    with pytest.raises(FedprivError, match=r"model.init=.*wider.pt does not fit the model: features\.7\.0\.weight: file \(32, 16, 3, 3\) vs model \(16, 16, 3, 3\)"):
        starting_weights(dataclasses.replace(CNN, init=str(tmp_path / "wider.pt")), NO_PRIOR, 32, 0)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(FedprivError, match="junk.pt is not a readable weights file"):
        starting_weights(dataclasses.replace(CNN, init=str(tmp_path / "junk.pt")), NO_PRIOR, 32, 0)


def _batchnorm_weights(tmp_path):
    """A timm ResNet with BatchNorm whose affine weights are not 1/0, saved as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    model = timm.create_model("resnet10t", num_classes=1, in_chans=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    path = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.state_dict(), path


def test_batchnorm_affine_weights_survive_the_switch_to_groupnorm(tmp_path):
    """Opacus swaps BatchNorm for GroupNorm; the learned scale and shift must come along —
    both from model.init and from timm's pretrained loading (here from a local file)."""
    original, path = _batchnorm_weights(tmp_path)
    from_file, _ = starting_weights(ModelSettings("resnet10t", init=str(path)), NO_PRIOR, 32, 0)
    from_timm, steps = starting_weights(
        ModelSettings("resnet10t", (("pretrained_cfg_overlay", (("file", str(path)),)),), pretrained=True),
        NO_PRIOR, 32, 0,
    )
    assert steps[0]["mechanism"] == "public-pretrained"
    affine = [k for k in original if k.endswith((".weight", ".bias")) and k.replace(".weight", ".running_mean").replace(".bias", ".running_mean") in original]
    assert len(affine) > 10
    for weights in (from_file, from_timm):
        assert all(torch.equal(weights[k], original[k]) for k in affine)
        assert not any(k.endswith("running_mean") for k in weights)  # GroupNorm now


def test_model_pretrained_without_a_local_copy_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(FedprivError, match="model.pretrained=true: no local copy of timm's weights for model.name=resnet10t"):
        starting_weights(ModelSettings("resnet10t", pretrained=True), NO_PRIOR, 32, 0)


def test_freeze_schedule_and_a_dp_step_that_moves_only_the_head():
    training = make_settings([*TINY, "rounds=4", "training.freeze=backbone", "training.freeze_rounds=2"]).training
    assert [backbone_frozen(training, r) for r in (1, 2, 3, 4)] == [True, True, False, False]
    always = dataclasses.replace(training, freeze_rounds=None)
    assert all(backbone_frozen(always, r) for r in (1, 4))
    assert not backbone_frozen(dataclasses.replace(training, freeze="none", freeze_rounds=None), 1)

    torch.manual_seed(0)
    model = build_model(CNN, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_backbone(model, CNN.name)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    data = TensorDataset(torch.randn(32, 1, 32, 32), torch.randint(0, 2, (32,)).float())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    session = make_private(model, optimizer, DataLoader(data, batch_size=8), 1.0, 1.0, [], torch.Generator().manual_seed(0))
    train_epochs(session.model, session.optimizer, session.loader, 1, True)
    after = session.unwrapped_state()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"head.weight", "head.bias"}


def test_bad_prior_settings_are_refused_naming_the_key(tmp_path):
    for overrides, key in [
        (["prior=phantom", "prior.steps=0"], "prior.steps=0"),
        (["prior=random_process", "prior.optimizer=adam"], "prior.optimizer='adam'"),
        (["prior=random_process", "prior.temperature=0"], "prior.temperature"),
        (["training.freeze=head"], "training.freeze='head'"),
        (["training.freeze=backbone", "training.freeze_rounds=9"], "training.freeze_rounds=9"),
        (["training.freeze_rounds=1"], "training.freeze_rounds needs training.freeze=backbone"),
        ([f"model.init={tmp_path / 'missing.pt'}"], "model.init=.*missing.pt: no such file"),
        (["prior=phantom", f"model.init={__file__}"], "prior=phantom and model.init"),
    ]:
        with pytest.raises(FedprivError, match=key):
            make_settings([*TINY, *overrides])


def test_a_standardized_model_starts_from_the_validation_splits_statistics_and_says_so(tmp_path):
    """model=cnn_scatter: its features are standardized on the server's validation split before
    round 1 — a step of the ledger and summary that touches no hospital record (ε = 0) — and
    every hospital trains from those statistics (they travel in the global weights)."""
    overrides = [*TINY, "model=cnn_scatter", "+model.kwargs.widths=[8,8,16]", "model.kwargs.scattering_angles=4",
                 "training.freeze=backbone", "training.lr=0.1"]
    settings = make_settings(overrides)
    splits = load_splits(settings.data, settings.seed)
    weights, steps = starting_point(settings, splits.val)
    assert steps == [{"mechanism": "validation-standardization", "epsilon": 0.0, "source": "the server's validation split", "records": len(splits.val)}]
    model = build_model(settings.model, settings.data.image_size).eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        features = model.joint_features((torch.from_numpy(splits.val.images) - 0.5) / 0.5)
    assert torch.allclose(weights["feature_mean"], features.mean(0), atol=1e-5)
    with pytest.raises(FedprivError, match="model.name=fedpriv_cnn_scatter standardizes its features on the validation split"):
        initial_weights(settings)
    summary = run_in_process(settings, tmp_path / "run")
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert ledger["public_steps"] == steps == summary["privacy"]["public_steps"]
    assert summary["rounds_completed"] == 2 and 0 < summary["privacy"]["max_epsilon"] <= 8.0 + 1e-6
    final = torch.load(tmp_path / "run" / "model.pt")
    assert torch.equal(final["feature_mean"], weights["feature_mean"])  # no round moved the statistics
    assert not torch.equal(final["head.weight"], weights["head.weight"])
