"""Run folders: a folder is absent, a finished run, or an unfinished run marked as such.

A run writes ``config.json`` twice: first with ``"finished": false`` (and the command and
settings) when it starts, and again with ``"finished": true`` as its very last step, so an
interrupted run is never mistaken for a finished one. :func:`plan_run` decides, before anything
is touched, what a new run may do with its ``--out`` folder; :meth:`RunPlan.start` then does it:

========================  ==============  ===========================================
folder                    flags           what happens
========================  ==============  ===========================================
absent or empty           —               created; removed again if the run fails
                                          before writing anything but its marker
finished / unfinished     (none)          refused (:class:`RunExistsError`), naming
                                          ``--overwrite`` (and ``--resume``)
finished / unfinished     ``overwrite``   the old run is moved aside to a hidden
                                          sibling and deleted only when the new run
                                          finishes; a failed or interrupted new run
                                          puts it back
same command              ``resume``      continued in place, after checking that the
                                          settings that define its results match
files but no run          any             refused: nothing that is not a run is deleted
========================  ==============  ===========================================

A run killed outright (``SIGKILL``, power loss) while replacing an old run leaves the old one
in its hidden sibling; the next run on the same folder puts it back
(:class:`RunRestoredWarning`) before deciding.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .siblings import sibling_path, stale_siblings

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
#: Settings that never change a run's numbers (beyond float rounding): a resume may change
#: them freely, and may finish under another engine what one engine started.
NON_DEFINING = frozenset(
    {"out", "overwrite", "resume", "batch_size", "save", "offload"}
    | {"engine", "ray_address", "trial_cpus", "trial_gpus"}
)
_REPLACED = "replaced"


class RunExistsError(FileExistsError):
    """The output folder already holds a run (finished or not) and may not be replaced."""


class RunFolderError(ValueError):
    """The output folder cannot hold a run (a file, not writable, not a run, another command,
    or settings that differ from the run being resumed)."""


class RunRestoredWarning(UserWarning):
    """A finished run that an interrupted ``--overwrite`` had moved aside was put back."""


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (``None`` when absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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
    """The ``config.json`` of the run folder ``out``; ``FileNotFoundError`` when there is
    none and :class:`RunFolderError` when it is not readable JSON."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out} holds no {CONFIG_FILE}: not a run folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path} is not valid JSON ({err}): a damaged run folder") from None
    if not isinstance(config, dict):
        raise RunFolderError(f"{path} does not hold a run record (a JSON object)")
    return config


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` to ``path`` atomically (a temporary sibling, then a rename), so a run
    killed while writing leaves the previous version, never a truncated table that a
    ``--resume`` would fail to read."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def save_table(df: pd.DataFrame, out: str | Path, name: str) -> list[Path]:
    """Save ``df`` as ``name.csv`` (atomically, :func:`write_csv`) and, when pyarrow is
    installed, ``name.parquet``."""
    out = Path(out)
    paths = [write_csv(df, out / f"{name}.csv")]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return paths
    paths.append(out / f"{name}.parquet")
    tmp = out / f".{name}.parquet.tmp"
    df.to_parquet(tmp, index=False)
    tmp.replace(paths[1])
    return paths


# --------------------------------------------------------------------------------------------
# What a folder holds
# --------------------------------------------------------------------------------------------


@dataclass
class FolderState:
    """What ``path`` holds: ``kind`` is ``absent``, ``empty``, ``finished``, ``unfinished`` or
    ``foreign`` (files but no readable run record); ``record`` is its ``config.json``."""

    path: Path
    kind: str
    record: dict = field(default_factory=dict)

    @property
    def command(self) -> str | None:
        return self.record.get("command")


def folder_state(path: str | Path) -> FolderState:
    """Classify ``path`` (see :class:`FolderState`); a file is a :class:`RunFolderError`."""
    path = Path(path)
    if not path.exists():
        return FolderState(path, "absent")
    if not path.is_dir():
        raise RunFolderError(f"--out {path} is a file, not a folder")
    if not any(path.iterdir()):
        return FolderState(path, "empty")
    try:
        record = read_run_config(path)
    except (FileNotFoundError, RunFolderError):
        return FolderState(path, "foreign")
    if "command" not in record:
        return FolderState(path, "foreign")
    return FolderState(path, "finished" if record.get("finished") else "unfinished", record)


def check_out_path(out: str | Path | None, flag: str = "--out") -> Path:
    """``out`` as a path that a run may create: not empty, not a file, and its nearest
    existing parent a writable folder (:class:`RunFolderError` otherwise)."""
    if out is None or not str(out).strip():
        raise RunFolderError(f"{flag} must name a folder (got an empty path)")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{flag} {path} is a file, not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunFolderError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(f"{flag} {path}: {parent} is not writable")
    return path


def check_save_folder(save: str | Path | None) -> None:
    """``--save``: a new or empty folder that can be created (:class:`RunFolderError` for a
    file, a non-empty folder or an unwritable place); ``None`` saves nothing."""
    if save is None:
        return
    path = Path(save).expanduser()
    if path.is_dir() and any(path.iterdir()):
        raise RunExistsError(f"--save folder {path} is not empty")
    check_out_path(path, "--save")


# --------------------------------------------------------------------------------------------
# Resume checks
# --------------------------------------------------------------------------------------------


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def settings_diff(recorded: dict, current: dict, ignore=()) -> list[str]:
    """``"key: recorded -> current"`` for every setting that differs between a run's recorded
    ``config`` and this one's (nested configs as dotted keys), leaving out
    :data:`NON_DEFINING` and ``ignore``; keys the old record lacks are not compared."""
    skip = NON_DEFINING | set(ignore)
    old, new = _flatten(recorded), _flatten(json.loads(json.dumps(current, default=str)))
    return [
        f"{key}: {old[key]!r} -> {value!r}"
        for key, value in new.items()
        if key.split(".")[-1] not in skip and key in old and old[key] != value
    ]


# --------------------------------------------------------------------------------------------
# Planning and running
# --------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """What a run will do with its folder (:func:`plan_run`); nothing is touched until
    :meth:`start`."""

    path: Path
    command: str
    config: dict
    action: str  # "create", "resume" or "replace"

    def start(self) -> RunFolder:
        """Touch the folder: create it, or move the old run aside, and write the unfinished
        marker. Use the result as a context manager around the run."""
        previous = None
        created = not self.path.exists()
        if self.action == "replace":
            previous = sibling_path(self.path, _REPLACED)
            os.replace(self.path, previous)
            created = True
        self.path.mkdir(parents=True, exist_ok=True)
        marker = {"command": self.command, "config": self.config}
        write_run_config(self.path, marker, finished=False)
        return RunFolder(self.path, previous=previous, created=created)


@dataclass
class RunFolder:
    """A started run: write into ``path``, end with :meth:`finish`. As a context manager it
    undoes an unfinished run that fails or is interrupted: an old run it was replacing is
    put back, and a folder it created that holds only its marker is removed; otherwise the
    folder stays, marked unfinished."""

    path: Path
    previous: Path | None = None
    created: bool = False
    finished: bool = False

    def finish(self, record: dict) -> Path:
        """Write the finished ``config.json``; only then is a replaced old run deleted."""
        write_run_config(self.path, record, finished=True)
        self.finished = True
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = None
        return self.path

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or self.finished:
            return False
        if self.previous is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            os.replace(self.previous, self.path)
        elif self.created and [p.name for p in self.path.iterdir()] == [CONFIG_FILE]:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


def _restore_replaced(path: Path) -> None:
    """Put back an old run that a killed ``--overwrite`` left in a hidden sibling, unless the
    new run in ``path`` finished (then only the sibling is removed)."""
    for sibling in stale_siblings(path, _REPLACED):
        if folder_state(path).kind == "finished":
            shutil.rmtree(sibling, ignore_errors=True)
            continue
        shutil.rmtree(path, ignore_errors=True)
        os.replace(sibling, path)
        warnings.warn(
            f"{path}: an interrupted --overwrite had moved this finished run aside; "
            "it has been put back",
            RunRestoredWarning,
            stacklevel=3,
        )


def plan_run(
    out: str | Path | None,
    command: str,
    config: dict,
    *,
    overwrite: bool = False,
    resume: bool = False,
    resumable: bool = False,
    cells: tuple[str, ...] = (),
) -> RunPlan:
    """Decide what a ``command`` run with ``config`` (its settings, as a dict) may do with
    ``out``, raising before anything is touched (module docstring's table).

    ``resume`` (only commands that can continue a run pass it) continues a run of the same
    ``command`` whose recorded settings equal ``config`` except :data:`NON_DEFINING` and
    ``cells`` (settings that only add cells, e.g. a grid's sparsities and expert counts);
    ``resumable`` says so in the message that refuses an unfinished run.
    """
    if overwrite and resume:
        raise RunFolderError("--overwrite and --resume exclude each other: pass one")
    path = check_out_path(out)
    _restore_replaced(path)
    state = folder_state(path)
    if state.kind in ("absent", "empty"):
        return RunPlan(path, command, config, "create")
    if state.kind == "foreign":
        raise RunFolderError(
            f"{path} holds files but no run record ({CONFIG_FILE}); refusing to write into "
            "or delete it: choose another --out"
        )
    if resume:
        _check_resume(state, command, config, cells)
        return RunPlan(path, command, config, "resume")
    if overwrite:
        return RunPlan(path, command, config, "replace")
    if state.kind == "finished":
        raise RunExistsError(
            f"{path} already holds a finished run; choose another --out or pass --overwrite"
        )
    how = "--resume to continue it or " if resumable else ""
    raise RunExistsError(
        f"{path} holds an unfinished {state.command} run (interrupted?); pass {how}"
        "--overwrite to replace it, or choose another --out"
    )


def _check_resume(state: FolderState, command: str, config: dict, cells) -> None:
    if state.command != command:
        raise RunFolderError(
            f"--resume: {state.path} holds a {state.command} run, not a {command} run; "
            "choose another --out"
        )
    diff = settings_diff(state.record.get("config", {}), config, ignore=cells)
    if diff:
        raise RunFolderError(
            f"--resume: {state.path} was made with other settings ({'; '.join(diff)}); "
            "rerun with its settings, or choose another --out"
        )
