"""The default model trains under Opacus with per-layer per-sample gradients that are exact."""

import dataclasses

import pytest
import torch
from opacus import GradSampleModule

from fedpriv.errors import FedprivError
from fedpriv.models import build_model, dihedral_views, freeze_backbone
from fedpriv.settings import ModelSettings

DEFAULT = ModelSettings("fedpriv_vit_hybrid_tiny", (("depth", 2), ("embed_dim", 48), ("num_heads", 2)))


@pytest.mark.parametrize("settings", [DEFAULT, ModelSettings("fedpriv_cnn_small")])
def test_every_trainable_layer_has_an_opacus_grad_sampler(settings):
    """No functorch fallback: Opacus would otherwise treat the whole ViT as one layer."""
    model = GradSampleModule(build_model(settings, image_size=32))
    layers = [m for m in model._module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    missing = [type(m).__name__ for m in layers if type(m) not in GradSampleModule.GRAD_SAMPLERS]
    assert not missing


def test_per_sample_gradients_equal_single_example_gradients():
    torch.manual_seed(0)
    model = build_model(DEFAULT, image_size=32)
    x = torch.randn(3, 1, 32, 32)
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm(x).sum().backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(3):
        model.zero_grad()
        model(x[i : i + 1]).sum().backward()
        for name, p in model.named_parameters():
            assert torch.allclose(per_sample[name][i], p.grad, atol=1e-5, rtol=1e-4), name
    assert "patch_embed.pos.weight" in per_sample


def test_unknown_model_is_a_clear_error():
    with pytest.raises(FedprivError, match="model.name='vit_does_not_exist'"):
        build_model(ModelSettings("vit_does_not_exist"), 64)


def test_a_stem_stride_of_two_halves_the_resolution_the_blocks_see():
    model = build_model(ModelSettings("fedpriv_cnn_small", (("stem_stride", 2),)), 64)
    assert model.forward_features(torch.zeros(1, 1, 64, 64)).shape[-1] == 64 // 2 // 8
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 1)


def test_a_misspelt_model_setting_is_a_clear_error_not_ignored():
    with pytest.raises(FedprivError, match="model.kwargs do not fit.*stem_strid"):
        build_model(ModelSettings("fedpriv_cnn_small", (("stem_strid", 2),)), 64)


@pytest.mark.slow  # an 8.8M-parameter net: ~15-40 s on 2 cores
def test_timm_normalization_free_nets_get_exact_per_sample_gradients():
    """timm's NF nets (weight-standardized convs, no normalization layers) train under Opacus
    through its per-layer functorch samplers: `model.name=nf_regnet_b0` needs nothing else."""
    torch.manual_seed(0)
    model = build_model(ModelSettings("nf_regnet_b0"), image_size=32)
    x = torch.randn(2, 1, 32, 32)
    GradSampleModule(model, loss_reduction="sum")(x).sum().backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x[1:]).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(per_sample[name][1], p.grad, atol=1e-5, rtol=1e-4), name


SCATTER = ModelSettings("fedpriv_cnn_scatter", (("widths", (8, 8, 16)), ("scattering_angles", 4)))


def test_scattering_model_sees_a_patch_the_same_whichever_way_it_is_turned():
    """The CNN's features are averaged over the 8 views exactly; the scattering coefficients of
    the 8 views come from one transform through the orientation permutations, which match the
    8 transforms' average to within a few percent (for 4 and 8 orientations)."""
    torch.manual_seed(0)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    for angles in (4, 8):
        model = build_model(ModelSettings(SCATTER.name, (("widths", (8, 8, 16)), ("scattering_angles", angles))), image_size=32).eval()
        with torch.no_grad():
            features = [model.joint_features(view) for view in dihedral_views(x)]
            eight = sum(_pooled_scattering(model, view) for view in dihedral_views(x)) / 8
        cnn = [f[:, :16] for f in features]
        assert all(torch.allclose(f, cnn[0], atol=1e-5) for f in cnn)
        coefficients = [torch.exp(f[:, 16:]) - 1e-3 for f in features]
        assert all(_relative(c, coefficients[0]) < 0.05 for c in coefficients)
        assert _relative(coefficients[0], eight) < 0.05
        assert _relative(coefficients[0], _pooled_scattering(model, x)) > 2 * _relative(coefficients[0], eight)  # it is not one view's


def _pooled_scattering(model, x: torch.Tensor) -> torch.Tensor:
    maps = model.scattering(((x + 1) / 2).contiguous())
    return torch.nn.functional.adaptive_avg_pool2d(maps.flatten(0, 1), model.scattering_grid).flatten(1).view(len(x), -1)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


def test_scattering_model_standardizes_its_features_and_keeps_the_statistics_in_its_weights():
    torch.manual_seed(0)
    model = build_model(SCATTER, image_size=32).eval()
    images = torch.rand(40, 1, 32, 32) * 2 - 1
    model.fit_standardization(images)
    with torch.no_grad():
        standardized = (model.joint_features(images) - model.feature_mean) / model.feature_scale
    assert torch.allclose(standardized.mean(0), torch.zeros(standardized.shape[1]), atol=1e-4)
    assert torch.allclose(standardized.std(0), torch.ones(standardized.shape[1]), atol=1e-3)
    assert model.head.in_features == 16 + (1 + 2 * 4 + 4 * 4) * 16  # CNN + scattering channels on a 4×4 grid
    rebuilt = build_model(SCATTER, image_size=32)
    rebuilt.load_state_dict(model.state_dict())  # the filters are rebuilt, the statistics travel
    assert torch.equal(rebuilt.feature_mean, model.feature_mean)
    assert not any(name.startswith("scattering.") for name in model.state_dict())


def test_scattering_model_with_components_reads_whitened_principal_components_of_the_fit_images():
    torch.manual_seed(0)
    settings = dataclasses.replace(SCATTER, kwargs=(*SCATTER.kwargs, ("components", 8)))
    model = build_model(settings, image_size=32).eval()
    images = torch.rand(40, 1, 32, 32) * 2 - 1
    model.fit_standardization(images)
    with torch.no_grad():
        projected = ((model.joint_features(images) - model.feature_mean) / model.feature_scale) @ model.projection
    assert model.head.in_features == 8 and projected.shape == (40, 8)
    assert torch.allclose(projected.T @ projected / 39, torch.eye(8), atol=1e-3)  # uncorrelated, unit variance
    rebuilt = build_model(settings, image_size=32)
    rebuilt.load_state_dict(model.state_dict())  # the projection travels with the weights
    assert torch.equal(rebuilt.projection, model.projection)
    with pytest.raises(FedprivError, match="model.kwargs.components=8 needs more than that many validation images"):
        model.fit_standardization(images[:8])


def test_scattering_model_trains_its_head_alone_under_opacus():
    model = build_model(SCATTER, image_size=32)
    freeze_backbone(model, SCATTER.name)
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm(torch.rand(3, 1, 32, 32) * 2 - 1).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"head.weight", "head.bias"} and model.head.weight.grad_sample.shape == (3, 1, model.head.in_features)


def test_scattering_orientations_that_a_quarter_turn_cannot_permute_are_refused_by_name():
    with pytest.raises(FedprivError, match="scattering_angles=6 must be a multiple of 4"):
        build_model(ModelSettings(SCATTER.name, (("scattering_angles", 6),)), image_size=32)
