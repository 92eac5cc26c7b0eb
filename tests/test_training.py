"""Local training pieces run in-process: determinism and FedProx's proximal pull."""

import numpy as np
import pytest
import torch

from conftest import TINY, make_settings
from fedpriv import client
from fedpriv.client import HospitalTrainer
from fedpriv.data.records import ImageRecords
from fedpriv.head_inputs import head_inputs
from fedpriv.models import build_model
from fedpriv.server import initial_weights
from fedpriv.settings import ModelSettings
from fedpriv.training import dihedral_views, predict


def _distance(a, b):
    return sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5


def test_same_seed_same_round_gives_identical_weights_and_epsilon(tmp_path):
    settings = make_settings(TINY)
    start = initial_weights(settings)
    first = HospitalTrainer(settings, str(tmp_path / "a"))(1, start, {"server-round": 1})
    second = HospitalTrainer(settings, str(tmp_path / "b"))(1, start, {"server-round": 1})
    assert all(torch.equal(first[0][k], second[0][k]) for k in start)
    assert first[1]["epsilon"] == second[1]["epsilon"] and first[1]["history_steps"] == second[1]["history_steps"]


def test_replaying_a_round_identically_costs_nothing_more_and_a_new_round_does(tmp_path):
    """A resumed run replays the interrupted round: same inputs, same seed, same release."""
    settings = make_settings([*TINY, "privacy.budget_epsilon=100"])  # a third session fits
    trainer, start = HospitalTrainer(settings, str(tmp_path)), initial_weights(settings)
    weights, first = trainer(0, start, {"server-round": 1})
    replayed, again = trainer(0, start, {"server-round": 1})
    assert all(torch.equal(weights[k], replayed[k]) for k in start)
    assert again["epsilon"] == first["epsilon"] and again["history_round"] == [1]
    _, second = trainer(0, weights, {"server-round": 2})
    assert second["epsilon"] > first["epsilon"] and second["history_round"] == [1, 2]
    _, changed = trainer(0, weights, {"server-round": 1})  # round 1 again, other inputs: new spending
    assert changed["history_round"] == [1, 2, 1] and changed["epsilon"] > second["epsilon"]


def test_proximal_pull_keeps_local_weights_near_the_global_model(tmp_path):
    settings = make_settings([*TINY, "privacy=none", "training.lr=0.01"])
    start = initial_weights(settings)
    trainer = HospitalTrainer(settings, str(tmp_path))
    free, _ = trainer(0, start, {"server-round": 1})
    pulled, _ = trainer(0, start, {"server-round": 1, "proximal-mu": 50.0})
    assert _distance(pulled, start) < 0.8 * _distance(free, start)



def test_test_time_augmentation_scores_every_rotation_and_flip_of_an_image_alike():
    """evaluation.tta: the mean logit over the 8 dihedral views, so an image and any of its
    rotations/flips get one score; without it they do not."""
    torch.manual_seed(0)
    model = build_model(ModelSettings("fedpriv_cnn_small", (("widths", (8, 16, 16)),)), 32)
    images = torch.rand(5, 1, 32, 32)

    def records(x: torch.Tensor) -> ImageRecords:
        return ImageRecords(images=x.numpy(), labels=np.zeros(len(x), np.int64), patient_ids=np.arange(len(x)).astype(str), metadata={})

    base = predict(model, records(images), batch_size=4, tta=True)
    for view in dihedral_views(images)[1:]:
        assert np.allclose(predict(model, records(view.contiguous()), batch_size=4, tta=True), base, atol=1e-5)
    turned = predict(model, records(torch.rot90(images, 1, (2, 3)).contiguous()), batch_size=4)
    assert not np.allclose(turned, predict(model, records(images), batch_size=4), atol=1e-4)


@pytest.mark.parametrize("privacy", ["local", "none"])
def test_a_frozen_backbone_trains_its_head_on_backbone_outputs_computed_once_to_the_same_weights(tmp_path, monkeypatch, privacy):
    """training.freeze=backbone without augmentation: the head trains on what the backbone
    makes of each record, computed once (fedpriv.head_inputs) — the same Poisson batches,
    clipping, noise and ε as training the whole model with its backbone frozen."""
    settings = make_settings([*TINY, "model=cnn_small", "training.freeze=backbone", "data.augment=false", f"privacy={privacy}"])
    start = initial_weights(settings)
    model = build_model(settings.model, settings.data.image_size)
    model.load_state_dict(start)
    assert head_inputs(model, client.hospital_shard(settings, 0).images, batch_size=16) is not None
    fast, fast_metrics = HospitalTrainer(settings, str(tmp_path / "fast"))(0, start, {"server-round": 1})
    monkeypatch.setattr(client, "head_inputs", lambda *args: None)  # the whole model, every step
    whole, whole_metrics = HospitalTrainer(settings, str(tmp_path / "whole"))(0, start, {"server-round": 1})
    assert set(fast) == set(start)
    assert all(torch.equal(fast[k], start[k]) for k in start if not k.startswith("head."))  # the backbone stayed frozen
    assert not torch.equal(fast["head.weight"], start["head.weight"])
    assert all(torch.allclose(fast[k], whole[k], atol=1e-5) for k in start)
    assert fast_metrics.get("epsilon") == whole_metrics.get("epsilon")


def test_head_inputs_are_reused_for_the_same_backbone_and_records_only():
    torch.manual_seed(0)
    model = build_model(ModelSettings("fedpriv_cnn_small", (("widths", (8, 16, 16)),)), 32)
    images = np.random.default_rng(0).random((6, 1, 32, 32), dtype=np.float32)
    first = head_inputs(model, images, batch_size=4)
    assert first.shape == (6, 16) and head_inputs(model, images, batch_size=4) is first
    assert head_inputs(model, images[:5], batch_size=4) is not first  # other records
    with torch.no_grad():
        model.features[0][0].weight.add_(0.1)  # another backbone
    assert not torch.allclose(head_inputs(model, images, batch_size=4), first)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the head is not part of the key: its inputs are unchanged
    assert head_inputs(model, images, batch_size=4) is head_inputs(model, images, batch_size=4)
    expected = torch.sigmoid(model(torch.from_numpy((images - 0.5) / 0.5)).reshape(-1)).detach().numpy()
    assert np.allclose(predict(model, ImageRecords(images, np.zeros(6), np.arange(6)), batch_size=4), expected, atol=1e-6)


def test_a_backbone_with_random_layers_is_run_whole():
    model = build_model(ModelSettings("fedpriv_vit_hybrid_tiny", (("drop_rate", 0.1),)), 32)
    assert head_inputs(model, np.zeros((2, 1, 32, 32), dtype=np.float32), batch_size=2) is None
