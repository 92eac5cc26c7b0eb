"""DP-SGD step time over non-private step time for the default model, or the model of the
Hydra overrides given (same batch, one process, same threads), with Opacus' per-sample hooks
and with ghost clipping. Under training.freeze=backbone both train the head alone, as a run does.

    python benchmarks/dp_step_ratio.py [--batch 64] [--steps 10] [--repeats 5] [--threads 1] [OVERRIDE ...]
    python benchmarks/dp_step_ratio.py --batch 74 +experiment=recipe_cbis data.root=/path/to/cbis-ddsm-masses

The three modes are timed in turns (`repeats` rounds of `steps` steps each) and the median
round is reported, so load from other processes hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.models import build_model, freeze_backbone
from fedpriv.privacy.engine import make_private
from fedpriv.config import settings_from_config
from fedpriv.training import make_optimizer, train_epochs

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedpriv.simulate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        settings = settings_from_config(compose("simulate", overrides=args.overrides))
    size = settings.data.image_size
    data = TensorDataset(torch.randn(args.batch, 1, size, size), torch.randint(0, 2, (args.batch,)).float())

    def one_batch_loader() -> DataLoader:  # one batch per epoch; under DP sample rate 1.0: the same batch
        return DataLoader(data, batch_size=args.batch)

    def model_to_train():
        model = build_model(settings.model, size)
        if settings.training.freeze == "backbone":
            freeze_backbone(model, settings.model.name)
        return model

    runs = {}
    torch.manual_seed(0)
    model = model_to_train()
    plain_optimizer = make_optimizer(model, settings.training)
    runs["non-private"] = lambda: train_epochs(model, plain_optimizer, one_batch_loader(), 1, False)
    for mode in ("hooks", "ghost"):
        torch.manual_seed(0)
        private = model_to_train()
        session = make_private(
            private, make_optimizer(private, settings.training), one_batch_loader(), noise_multiplier=1.0,
            max_grad_norm=1.0, history=[], noise_generator=torch.Generator().manual_seed(0), grad_sample_mode=mode,
        )
        runs[f"DP-{mode}"] = (
            lambda s=session: train_epochs(s.model, s.optimizer, s.loader, 1, True, ghost_loss=s.ghost_loss)
        )

    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[name].append((time.perf_counter() - started) / args.steps)
    step = {name: statistics.median(values) for name, values in times.items()}
    plain = step["non-private"]
    print(f"model {settings.model.name}, {size}×{size}, batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.repeats} × {args.steps} steps")
    for name, seconds in step.items():
        print(f"{name:<12} {seconds * 1e3:7.1f} ms/step   ratio to non-private {seconds / plain:.2f}×")


if __name__ == "__main__":
    main()
