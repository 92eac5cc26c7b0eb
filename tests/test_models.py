"""The default model trains under Opacus with per-layer per-sample gradients that are exact."""

import pytest
import torch
from opacus import GradSampleModule

from fedpriv.errors import FedprivError
from fedpriv.models import build_model
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
