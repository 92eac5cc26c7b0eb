"""DP-SGD step time over non-private step time for the default model (same batch, one
process, same threads): the cost of Opacus' per-sample gradients, clipping and noise.

    python benchmarks/dp_step_ratio.py [--batch 64] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.models import build_model
from fedpriv.privacy.engine import make_private
from fedpriv.settings import settings_from_config
from fedpriv.training import make_optimizer, train_epochs

CONFIGS = str((__import__("pathlib").Path(__file__).resolve().parents[1] / "configs"))


def time_steps(model, optimizer, loader, steps: int, sum_loss: bool) -> float:
    train_epochs(model, optimizer, loader, 1, sum_loss)  # warm-up epoch (one step)
    started = time.perf_counter()
    for _ in range(steps):
        train_epochs(model, optimizer, loader, 1, sum_loss)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        settings = settings_from_config(compose("simulate"))
    size = settings.data.image_size
    data = TensorDataset(torch.randn(args.batch, 1, size, size), torch.randint(0, 2, (args.batch,)).float())

    torch.manual_seed(0)
    model = build_model(settings.model, size)
    plain = time_steps(model, make_optimizer(model, settings.training), DataLoader(data, batch_size=args.batch), args.steps, False)

    torch.manual_seed(0)
    model = build_model(settings.model, size)
    # one batch per epoch with sample rate 1.0: every step sees the whole (same) batch
    session = make_private(
        model, make_optimizer(model, settings.training), DataLoader(data, batch_size=args.batch),
        noise_multiplier=1.0, max_grad_norm=1.0, history=[], noise_generator=torch.Generator().manual_seed(0),
    )
    private = time_steps(session.model, session.optimizer, session.loader, args.steps, True)
    print(f"model {settings.model.name}, batch {args.batch}, {args.threads} thread(s)")
    print(f"non-private step {plain * 1e3:.1f} ms | DP-SGD step {private * 1e3:.1f} ms | ratio {private / plain:.2f}×")


if __name__ == "__main__":
    main()
