"""The on-disk cache of priors: one file per key, the key a digest of everything that shapes
the weights, so a changed setting can never reuse a stale prior."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: Raised whenever the way a prior is computed changes, so old cache files are not reused.
PRIOR_FORMAT = 1


def prior_key(shape: dict) -> str:
    """A digest of what shapes a prior (its settings, the model, image size, seed, format)."""
    payload = json.dumps({"format": PRIOR_FORMAT, **shape}, sort_keys=True, default=repr)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cached(folder: Path, name: str, shape: dict, compute: Callable[[], dict]) -> tuple[dict, str, bool]:
    """The prior's weights, its key and whether they came from the cache; computed and
    stored (atomically: runs of a sweep may race to write the same prior) when missing."""
    key = prior_key(shape)
    folder = Path(folder).expanduser()
    path = folder / f"{name}-{key}.pt"
    if path.exists():
        log.info("prior %s: reusing %s", name, path)
        return torch.load(path, weights_only=True), key, True
    weights = compute()
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(handle)
    torch.save(weights, temporary)
    os.replace(temporary, path)
    (folder / f"{name}-{key}.json").write_text(json.dumps(shape, indent=2, sort_keys=True, default=repr))
    log.info("prior %s: computed and cached in %s", name, path)
    return weights, key, False
