"""privacy.grad_sample_mode=ghost: Opacus ghost clipping is the same mechanism as per-sample
hooks (same clipped gradient, same σ, q, steps and ε) and trains."""

import pytest
import torch
from torch.nn.functional import binary_cross_entropy_with_logits
from torch.utils.data import DataLoader, TensorDataset

from conftest import TINY, make_settings
from fedpriv.client import HospitalTrainer
from fedpriv.errors import FedprivError
from fedpriv.models import build_model
from fedpriv.privacy.engine import make_private
from fedpriv.server import initial_weights
from fedpriv.training import make_optimizer, train_epochs

PRIVACY_KEYS = ("noise_multiplier", "sample_rate", "steps", "epsilon", "history_sigma", "history_rate", "history_steps")


def _one_step(mode: str, noise_multiplier: float) -> tuple[dict, dict]:
    """Weights before and after one DP-SGD step of the default model on a fixed batch."""
    settings = make_settings([*TINY, "training.optimizer=sgd", "training.lr=0.5"])
    torch.manual_seed(0)
    images, labels = torch.randn(16, 1, 32, 32), torch.randint(0, 2, (16,)).float()
    model = build_model(settings.model, settings.data.image_size)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    session = make_private(
        model, make_optimizer(model, settings.training), loader, noise_multiplier, 0.1, [], torch.Generator().manual_seed(1), mode
    )
    session.optimizer.zero_grad()
    logits = session.model(images).reshape(-1)
    if session.ghost_loss is not None:
        session.ghost_loss(logits, labels).backward()
    else:
        binary_cross_entropy_with_logits(logits, labels, reduction="sum").backward()
    session.optimizer.step()
    return before, {k: v.detach().clone() for k, v in session.unwrapped_state().items()}


def test_ghost_clipping_takes_the_same_clipped_step_as_per_sample_hooks():
    start, hooks = _one_step("hooks", 0.0)  # σ = 0: the step is the sum of clipped gradients alone
    _, ghost = _one_step("ghost", 0.0)
    assert sum(float((hooks[k] - start[k]).abs().sum()) for k in hooks) > 1e-3  # the step moved the model
    for name in hooks:
        torch.testing.assert_close(ghost[name], hooks[name], rtol=1e-4, atol=1e-6)


def test_ghost_and_hooks_spend_exactly_the_same_privacy(tmp_path):
    start = initial_weights(make_settings(TINY))
    reports = {}
    for mode in ("hooks", "ghost"):
        settings = make_settings([*TINY, f"privacy.grad_sample_mode={mode}"])
        trainer = HospitalTrainer(settings, str(tmp_path / mode))
        weights, first = trainer(0, start, {"server-round": 1})
        _, second = trainer(0, weights, {"server-round": 2})
        reports[mode] = second
        assert 0 < first["epsilon"] < second["epsilon"]
    assert {k: reports["ghost"][k] for k in PRIVACY_KEYS} == {k: reports["hooks"][k] for k in PRIVACY_KEYS}


def _easy_task(n: int = 48, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Malignant: a bright top-left quadrant; benign: bottom-right (plus noise)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = 0.1 * torch.randn(n, 1, size, size, generator=generator)
    images[labels == 1, :, : size // 2, : size // 2] += 1.0
    images[labels == 0, :, size // 2 :, size // 2 :] += 1.0
    return images, labels.float()


def test_ghost_clipped_dp_sgd_trains_its_loss_falls():
    settings = make_settings([*TINY, "training.lr=0.005"])
    images, labels = _easy_task()
    torch.manual_seed(0)
    model = build_model(settings.model, settings.data.image_size)

    def loss() -> float:
        with torch.no_grad():
            return float(binary_cross_entropy_with_logits(model.eval()(images).reshape(-1), labels))

    before = loss()
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)  # Poisson, q = 1/3
    session = make_private(
        model.train(), make_optimizer(model, settings.training), loader, 0.5, 1.0, [], torch.Generator().manual_seed(1), "ghost"
    )
    train_epochs(session.model, session.optimizer, session.loader, 8, True, ghost_loss=session.ghost_loss)
    assert loss() < 0.5 * before  # σ = 0.5: real noise, and still it learns
    assert session.history == [(0.5, 1 / 3, 24)]


def test_an_empty_poisson_batch_under_ghost_clipping_is_a_noise_only_step():
    settings = make_settings(TINY)
    model = build_model(settings.model, settings.data.image_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.zeros(4, 1, 32, 32), torch.zeros(4))
    session = make_private(
        model, make_optimizer(model, settings.training), DataLoader(data, batch_size=4), 1.0, 1.0, [],
        torch.Generator().manual_seed(0), "ghost",
    )
    empty = [(torch.zeros(0, 1, 32, 32), torch.zeros(0))]
    train_epochs(session.model, session.optimizer, empty, 1, True, ghost_loss=session.ghost_loss)
    after = session.unwrapped_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the noise moved the weights
    assert session.history == [(1.0, 1.0, 1)]  # and the step was accounted


def test_an_unknown_grad_sample_mode_is_refused_naming_the_key():
    with pytest.raises(FedprivError, match="privacy.grad_sample_mode='functorch'"):
        make_settings([*TINY, "privacy.grad_sample_mode=functorch"])
