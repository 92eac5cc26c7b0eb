"""`python -m fedpriv.synthetic.sample GENERATOR --num N --out DIR`: labelled synthetic images
from a run's saved generator, written as 8-bit PNGs in the image-folder layout
(DIR/<split>/{benign,malignant}/), which `data=image_folder data.root=DIR` reads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fedpriv.errors import FedprivError
from fedpriv.synthetic.gan import generate, load_generator
from fedpriv.synthetic.pool import CLASS_NAMES


def write_samples(generator_file: Path, num: int, out: Path, seed: int, malignant_fraction: float, split: str) -> list[Path]:
    """Generate `num` images (round(num × malignant_fraction) malignant) into out/split/<class>/."""
    if num < 1:
        raise FedprivError(f"--num={num} must be at least 1")
    if not 0 <= malignant_fraction <= 1:
        raise FedprivError(f"--malignant-fraction={malignant_fraction} must be in [0, 1]")
    generator, facts = load_generator(generator_file)
    malignant = round(num * malignant_fraction)
    labels = np.array([0] * (num - malignant) + [1] * malignant)
    images = generate(generator, labels, seed)
    tag = f"h{facts['hospital']}" if "hospital" in facts else "gen"
    written = []
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = out / split / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"syn{seed}s{i:05d}_{tag}.png"  # patient id: the name up to "_"
        Image.fromarray(image[0]).save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generator", type=Path, help="RUN/synthetic/generator_hospital_<k>.pt")
    parser.add_argument("--num", type=int, required=True, help="images to write")
    parser.add_argument("--out", type=Path, required=True, help="output folder (image-folder layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malignant-fraction", type=float, default=0.5)
    parser.add_argument("--split", default="train", help="split folder to write into (default: train)")
    args = parser.parse_args(argv)
    try:
        written = write_samples(args.generator, args.num, args.out, args.seed, args.malignant_fraction, args.split)
    except FedprivError as error:
        print(f"fedpriv: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} images under {args.out / args.split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
