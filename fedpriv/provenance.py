"""What produced a run, for summary.json → `provenance` and the tracker's tags: fedpriv's
version and git commit, the versions of the libraries that shape results, Python, the
platform (no host name), the command and a digest of the settings that shape the results."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import fedpriv
from fedpriv.outputs import json_safe
from fedpriv.settings import RunSettings, run_settings_dict

#: The distributions whose versions are recorded (training, DP, federation, metrics).
PACKAGES = ("torch", "flwr", "opacus", "timm", "ray", "numpy", "scikit-learn")


def provenance(settings: RunSettings, overrides: list[str] | None = None) -> dict:
    """`overrides`: the Hydra overrides of this run (None when run_experiment is called from
    Python); `command` is the process's command line, the interpreter by its name only."""
    return {
        "fedpriv_version": fedpriv.__version__,
        **git_state(Path(fedpriv.__file__).resolve().parent.parent),
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": redacted([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]),
        "overrides": None if overrides is None else list(overrides),
        "config_digest": config_digest(settings),
    }


SECRET_FLAGS = ("--token", "--password", "--secret", "--api-key")


def redacted(argv: list[str]) -> list[str]:
    """The command line with the value of every secret-bearing flag (`--token X`,
    `--token=X`; Flower's simulation process is started with a session token) replaced by
    `<redacted>`, so summary.json and trackers never hold a credential."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in SECRET_FLAGS:
            out.append("<redacted>")
        elif arg.split("=", 1)[0] in SECRET_FLAGS and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=<redacted>")
        else:
            out.append(arg)
    return out


def config_digest(settings: RunSettings) -> str:
    """SHA-256 of the settings that shape the results (settings.run_settings_dict) as
    canonical JSON: equal for a resumed run and its uninterrupted twin, whatever tracker or
    console verbosity either used."""
    canonical = json.dumps(json_safe(run_settings_dict(settings)), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def git_state(source: Path) -> dict:
    """`git_commit` and `git_dirty` (tracked files changed) of `source` when it is the top of
    a git checkout, else both None (an installed wheel, or no git)."""
    try:
        top = _git(source, "rev-parse", "--show-toplevel")
        if Path(top).resolve() != source:  # fedpriv installed inside some other repository
            return {"git_commit": None, "git_dirty": None}
        return {
            "git_commit": _git(source, "rev-parse", "HEAD"),
            "git_dirty": bool(_git(source, "status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None
