"""Run folders: refuse to clobber finished runs, save tables with the config that made them.

A run folder is *finished* when its ``config.json`` carries ``"finished": true``; that file is
written last, so an interrupted run is never mistaken for a finished one.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import time
from pathlib import Path

import pandas as pd

CONFIG_FILE = "config.json"
_VERSIONED = (
    "wasserstein_neurons",
    "torch",
    "transformer-lens",
    "transformers",
    "numpy",
    "scipy",
    "pandas",
    "pot",
)


class RunExistsError(FileExistsError):
    """The output folder already holds a finished run."""


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (``None`` when absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def prepare_run_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Create ``out``; refuse (:class:`RunExistsError`) if it holds a finished run.

    With ``overwrite`` the old ``config.json`` is removed first, so the folder reads as unfinished
    until the new run completes. Nothing else is deleted up front.
    """
    out = Path(out)
    config = out / CONFIG_FILE
    if config.is_file():
        try:
            finished = json.loads(config.read_text()).get("finished", False)
        except json.JSONDecodeError:
            finished = False
        if finished and not overwrite:
            raise RunExistsError(
                f"{out} already holds a finished run; choose another --out or pass --overwrite"
            )
        config.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_run_config(out: str | Path, config: dict, finished: bool = True) -> Path:
    """Write ``config.json`` (config + versions + timestamp) atomically; returns its path."""
    out = Path(out)
    payload = dict(config)
    payload.setdefault("versions", package_versions())
    payload["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    payload["finished"] = finished
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(out / CONFIG_FILE)
    return out / CONFIG_FILE


def read_run_config(out: str | Path) -> dict:
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out} holds no {CONFIG_FILE}: not a run folder")
    return json.loads(path.read_text())


def save_table(df: pd.DataFrame, out: str | Path, name: str) -> list[Path]:
    """Save ``df`` as ``name.csv`` and, when pyarrow is installed, ``name.parquet``."""
    out = Path(out)
    paths = [out / f"{name}.csv"]
    df.to_csv(paths[0], index=False)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return paths
    paths.append(out / f"{name}.parquet")
    df.to_parquet(paths[1], index=False)
    return paths
