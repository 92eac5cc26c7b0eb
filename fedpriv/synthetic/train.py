"""Train one hospital's conditional GAN on its own shard, the discriminator with DP-SGD.

Each discriminator step sees a Poisson batch of real images and a fixed-size batch of
generated ones in one forward pass; Opacus clips every example's gradient and adds noise,
so a real record's influence is bounded as in any DP-SGD step (the fakes depend only on the
generator, itself a function of earlier noisy discriminators). The generator's step does
not touch real data and is not accounted.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fedpriv.data.records import ImageRecords
from fedpriv.privacy.accounting import History
from fedpriv.privacy.engine import make_private
from fedpriv.settings import SyntheticSettings
from fedpriv.synthetic.gan import NUM_CLASSES, ConditionalDiscriminator, ConditionalGenerator, GanShape
from fedpriv.training import RecordDataset


def split_state(state: dict[str, torch.Tensor], network: str) -> dict[str, torch.Tensor]:
    """One network's weights out of a `generator.*` / `discriminator.*` state dict."""
    return {k.removeprefix(f"{network}."): v for k, v in state.items() if k.startswith(f"{network}.")}


@contextmanager
def frozen(discriminator: nn.Module):
    """No gradients into the discriminator (and no per-sample hooks under Opacus) while the
    generator learns through it."""
    hooks = hasattr(discriminator, "disable_hooks")
    trainable = [p for p in discriminator.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    if hooks:
        discriminator.disable_hooks()
    try:
        yield
    finally:
        for parameter in trainable:  # exactly these again: a frozen part stays frozen
            parameter.requires_grad_(True)
        if hooks:
            discriminator.enable_hooks()


def gan_state(generator: nn.Module, discriminator: nn.Module) -> dict[str, torch.Tensor]:
    """Both networks' weights in one state dict (`generator.*`, `discriminator.*`)."""
    return {
        **{f"generator.{k}": v for k, v in generator.state_dict().items()},
        **{f"discriminator.{k}": v for k, v in discriminator.state_dict().items()},
    }


@dataclass
class TrainedGan:
    generator: ConditionalGenerator
    discriminator: ConditionalDiscriminator  # as trained (without Opacus' wrapper)
    history: History  # what Opacus' accountant recorded (empty without DP)
    discriminator_loss: float  # mean over the last epoch
    generator_loss: float
    seconds: float


def train_gan(
    records: ImageRecords,
    settings: SyntheticSettings,
    augment: bool,
    noise_multiplier: float | None,
    seed: int,
    device: torch.device = torch.device("cpu"),
    start: dict[str, torch.Tensor] | None = None,
    epochs: int | None = None,
) -> TrainedGan:
    """`noise_multiplier=None` trains without DP (synthetic.dp=false); `device`: the
    hospital's (fedpriv.devices); `start`: both networks' weights to begin from
    (`generator.*`, `discriminator.*`: the GAN prior, or a federated GAN's global weights);
    `epochs`: passes over `records` (default synthetic.epochs; a federated GAN's round runs
    its share). The networks come back on the CPU."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    shape = GanShape(records.images.shape[-1], settings.latent_dim, settings.width)
    generator, discriminator = ConditionalGenerator(shape), ConditionalDiscriminator(shape)
    if start is not None:
        generator.load_state_dict(split_state(start, "generator"))
        discriminator.load_state_dict(split_state(start, "discriminator"))
    generator, discriminator = generator.to(device), discriminator.to(device)
    plain_discriminator = discriminator
    adam = dict(lr=settings.lr, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(generator.parameters(), **adam)
    opt_d = torch.optim.Adam(discriminator.parameters(), **adam)
    loader = DataLoader(
        RecordDataset(records, augment),
        batch_size=settings.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    session = None
    if noise_multiplier is not None:
        session = make_private(
            discriminator, opt_d, loader, noise_multiplier, settings.max_grad_norm, [],
            torch.Generator(device=device).manual_seed(seed + 1),
        )
        discriminator, opt_d, loader = session.model, session.optimizer, session.loader
    fakes = settings.batch_size  # a public constant, not the (private) real batch size
    for _ in range(settings.epochs if epochs is None else epochs):
        d_total = g_total = 0.0
        for real, labels in loader:
            real, labels = real.to(device), labels.to(device)
            noise = torch.randn(fakes, shape.latent_dim).to(device)  # drawn on the CPU: the same images on any device
            fake_labels = torch.randint(NUM_CLASSES, (fakes,)).to(device)
            fake = generator(noise, fake_labels)
            # Discriminator: real → 1, fake → 0, one batch, per-example clipping under DP.
            opt_d.zero_grad(set_to_none=True)
            images = torch.cat([real.reshape(-1, *fake.shape[1:]), fake.detach()])
            classes = torch.cat([labels.reshape(-1).long(), fake_labels])
            targets = torch.cat([torch.ones(len(labels), device=device), torch.zeros(fakes, device=device)])
            d_loss = F.binary_cross_entropy_with_logits(discriminator(images, classes), targets, reduction="sum")
            # Under DP: per-example gradients of the summed loss (fedpriv.privacy.engine
            # averages the noisy sum over the expected batch); without DP: the batch mean.
            (d_loss if session is not None else d_loss / len(targets)).backward()
            opt_d.step()
            # Generator: make the (now fixed) discriminator say "real" for each class.
            opt_g.zero_grad(set_to_none=True)
            with frozen(discriminator):
                g_loss = F.binary_cross_entropy_with_logits(discriminator(fake, fake_labels), torch.ones(fakes, device=device))
                g_loss.backward()
            opt_g.step()
            d_total += float(d_loss.detach()) / len(targets)
            g_total += float(g_loss.detach())
        steps = max(len(loader), 1)
    return TrainedGan(
        generator=generator.cpu().eval(),
        discriminator=plain_discriminator.cpu().eval(),
        history=session.history if session is not None else [],
        discriminator_loss=d_total / steps,
        generator_loss=g_total / steps,
        seconds=time.perf_counter() - started,
    )
