"""Independent trials on an engine: one after another in this process, or as Ray Tune trials.

A *trial* is a call ``target(**params)`` of a module-level function named by ``target``
(``"package.module:function"``) with JSON-able ``params``, returning a JSON-able dict. Because a
trial is named rather than pickled, any Ray worker that can import this package runs it, on this
machine or on a cluster that shares its file system (the model cache, the corpus, ``--out``).

* ``engine="local"`` runs the trials in order in this process (no Ray import).
* ``engine="ray"`` runs them as one Ray Tune experiment (``tune.Tuner`` over
  ``tune.grid_search`` of the trials, ``tune.with_resources`` of ``trial_cpus`` / ``trial_gpus``
  each), on the cluster at ``ray_address`` or on a Ray started here with this machine's cores.
  Tune's own files go to ``storage`` (the run folder's ``.ray``).

Either way ``on_result(params, result)`` is called in this process as each trial finishes, so
the caller writes its tables as results arrive, and a resumed sweep runs only the trials its
tables lack, whichever engine ran the others.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENGINES = ("local", "ray")
EXTRA_HINT = "pip install 'wasserstein_neurons[distributed]'"
_CONNECT_TIMEOUT_S = 5.0
_RAY_START_TRIES = 2


@dataclass
class EngineSettings:
    """Where trials run (``--engine --ray-address --trial-cpus --trial-gpus``)."""

    engine: str = "local"
    ray_address: str | None = None
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0

    def validate_engine(self) -> None:
        """``ValueError`` / ``ImportError`` for an unknown engine, bad resources, a missing
        extra or an unreachable ``ray_address`` (checked in seconds, before any work)."""
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if not self.trial_cpus > 0 or not self.trial_gpus >= 0:
            raise ValueError(
                f"--trial-cpus must be > 0 and --trial-gpus >= 0, got {self.trial_cpus} / "
                f"{self.trial_gpus}"
            )
        if self.engine == "local":
            if self.ray_address:
                raise ValueError("--ray-address needs --engine ray")
            return
        require_ray()
        if self.ray_address:
            check_ray_address(self.ray_address)


def require_ray():
    """The ``ray.tune`` module, or an ``ImportError`` that names the extra to install."""
    try:
        from ray import tune
    except ImportError:
        raise ImportError(f"--engine ray needs the 'distributed' extra: {EXTRA_HINT}") from None
    return tune


def check_ray_address(address: str) -> None:
    """``ValueError`` unless ``host:port`` (optionally ``ray://``) accepts a TCP connection
    within a few seconds; ``"auto"`` and ``"local"`` are left to Ray."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address must be host:port (or ray://host:port), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {err}") from None


def resolve_target(target: str) -> Callable[..., dict]:
    """The function named ``"package.module:function"``."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run_trials(
    target: str,
    trials: Sequence[dict[str, Any]],
    on_result: Callable[[dict, dict], None],
    settings: EngineSettings,
    storage: str | Path,
    name: str = "trials",
) -> None:
    """Run ``target(**params)`` for every ``params`` in ``trials`` on ``settings.engine``,
    calling ``on_result(params, result)`` here as each finishes (module docstring).

    Raises ``RuntimeError`` naming the failed trials when any failed (the others' results
    have been delivered)."""
    if not trials:
        return
    if settings.engine == "local":
        fn = resolve_target(target)
        for params in trials:
            on_result(params, fn(**params))
        return
    _run_on_ray(target, list(trials), on_result, settings, Path(storage), name)


def _ray_trial(config: dict) -> None:
    """One Ray Tune trial: run the named target, report its JSON-encoded result."""
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(config["threads"])))
    result = resolve_target(config["target"])(**config["params"])
    tune.report({"result_json": json.dumps(result, default=str)})


def _run_on_ray(target, trials, on_result, settings: EngineSettings, storage: Path, name):
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no progress tables
    tune = require_ray()
    _init_ray(settings.ray_address)

    class _Deliver(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            on_result(trial.config["params"], json.loads(result["result_json"]))

    resources = {"cpu": settings.trial_cpus, "gpu": settings.trial_gpus}
    tuner = tune.Tuner(
        tune.with_resources(_ray_trial, resources),
        param_space={
            "target": target,
            "threads": settings.trial_cpus,
            "params": tune.grid_search(trials),
        },
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            verbose=0,
            callbacks=[_Deliver()],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(
            f"{len(grid.errors)} of {len(trials)} trials failed; first error: "
            f"{str(grid.errors[0]).strip().splitlines()[-1]}"
        )


def _init_ray(address: str | None) -> None:
    """Connect to ``address``, or start a local Ray with this machine's cores (retried once:
    on a loaded machine its agents can miss their start-up deadline)."""
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        ignore_reinit_error=True,
    )
    if address:
        ray.init(address=address, **kwargs)
        return
    for attempt in range(_RAY_START_TRIES):
        try:
            ray.init(num_cpus=os.cpu_count(), **kwargs)
            return
        except Exception:
            ray.shutdown()
            if attempt == _RAY_START_TRIES - 1:
                raise
