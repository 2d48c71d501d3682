"""The ``sweep`` workflow: models x workflows x parameter grids, one trial per combination.

A sweep file (YAML or JSON) names what to run::

    out: runs/sweep                # optional; --out overrides
    engine: ray                    # local (default) | ray
    trial_cpus: 1                  # Ray resources per trial
    trial_gpus: 0
    ray_address: null              # a running cluster; default: start Ray here
    models: [smollm2-135m, /data/pythia-160m]
    settings: {seqlen: 256, eval_tokens: 4096}    # for every run (where the workflow has it)
    runs:
      - workflow: prune            # rank | prune | ablate | expand
        grid: {method: [magnitude, wanda], sparsity: [0.5, 0.7]}
        settings: {nsamples: 32}
      - workflow: rank
        settings: {tokens: 8192}

Every model x run x grid point is one trial (:mod:`wasserstein_neurons.trials`): it runs the
workflow into ``out/trials/<trial>`` and returns its table's rows, which land in one
``results.csv`` across models (columns ``trial, model, workflow``, the grid's parameters, then
the workflow's own columns). Trial ids are derived from what the trial runs, so ``--resume``
runs only the trials ``results.csv`` lacks, under either engine. Unknown keys anywhere in the
file are refused by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..ablation import AblationConfig
from ..runs import save_table
from ..trials import EngineSettings, run_trials
from .ablate import AblateConfig, run_ablate
from .common import plan_for
from .expand import ExpandConfig, run_expand
from .prune import PruneConfig, run_prune
from .rank import RankConfig, run_rank

WORKFLOWS = {
    "rank": RankConfig,
    "prune": PruneConfig,
    "ablate": AblateConfig,
    "expand": ExpandConfig,
}
_TOP_KEYS = {
    "out",
    "models",
    "settings",
    "runs",
    *(f.name for f in dataclasses.fields(EngineSettings)),
}
_RUN_KEYS = {"workflow", "grid", "settings"}
_NOT_SETTINGS = {"out", "overwrite", "model", "resume", "engine", "ray_address"}


@dataclass
class SweepConfig(EngineSettings):
    """A parsed sweep file (module docstring) plus the run folder flags."""

    out: str = "runs/sweep"
    models: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    overwrite: bool = False
    resume: bool = False

    def trials(self) -> list[dict[str, Any]]:
        """Every trial as ``{"trial", "workflow", "model", "params", "config"}``, each
        workflow config validated (``ValueError`` naming the run and the setting)."""
        self.validate_engine()
        if not self.models or not self.runs:
            raise ValueError("sweep file: needs at least one entry in 'models' and in 'runs'")
        out = []
        for i, run in enumerate(self.runs):
            for model, params in itertools.product(self.models, _grid_points(run, i)):
                out.append(_trial(self, i, run, model, params))
        return out


def load_sweep(path: str | Path, **overrides: Any) -> SweepConfig:
    """Parse a YAML / JSON sweep file; ``overrides`` (CLI flags that are not ``None``) win."""
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read sweep file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"sweep file {path}: expected a mapping of {', '.join(sorted(_TOP_KEYS))}")
    _check_keys(spec, _TOP_KEYS, "sweep file")
    for i, run in enumerate(spec.get("runs") or []):
        if not isinstance(run, dict):
            raise ValueError(f"sweep file: runs[{i}] must be a mapping")
        _check_keys(run, _RUN_KEYS, f"sweep file: runs[{i}]")
        if run.get("workflow") not in WORKFLOWS:
            raise ValueError(
                f"sweep file: runs[{i}].workflow must be one of {', '.join(WORKFLOWS)}, "
                f"got {run.get('workflow')!r}"
            )
    values = {**spec, **{k: v for k, v in overrides.items() if v is not None}}
    values["models"] = [str(m) for m in values.get("models") or []]
    return SweepConfig(**values)


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ValueError(
            f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(allowed))}"
        )


def _grid_points(run: dict, index: int) -> list[dict[str, Any]]:
    grid = run.get("grid") or {}
    if not isinstance(grid, dict):
        raise ValueError(f"sweep file: runs[{index}].grid must be a mapping of lists")
    lists = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
    return [dict(zip(lists, combo, strict=True)) for combo in itertools.product(*lists.values())]


def _settings_names(cls) -> set[str]:
    names = {f.name for f in dataclasses.fields(cls)} - _NOT_SETTINGS
    if cls is AblateConfig:
        names |= {f.name for f in dataclasses.fields(AblationConfig)}
    return names


def _trial(sweep: SweepConfig, index: int, run: dict, model: str, params: dict) -> dict:
    """One trial: its id, and its workflow config as a dict (validated)."""
    workflow = run["workflow"]
    cls = WORKFLOWS[workflow]
    valid = _settings_names(cls)
    specific = {**(run.get("settings") or {}), **params}
    _check_keys(specific, valid, f"sweep file: runs[{index}] ({workflow})")
    values = {k: v for k, v in sweep.settings.items() if k in valid}  # shared, where they apply
    values.update(specific)
    key = json.dumps({"model": model, "workflow": workflow, **values}, sort_keys=True)
    trial = f"{workflow}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    config = asdict(_config(cls, values, model, Path(sweep.out) / "trials" / trial))
    return {
        "trial": trial,
        "workflow": workflow,
        "model": model,
        "params": params,
        "config": config,
    }


def _config(cls, values: dict, model: str, out: Path):
    """The workflow config of a trial (validated); ablate's study settings go into ``study``."""
    values = dict(values, model=model, out=str(out), overwrite=True)
    if cls is AblateConfig:
        study_names = {f.name for f in dataclasses.fields(AblationConfig)}
        study = AblationConfig(**{k: values.pop(k) for k in list(values) if k in study_names})
        values["study"] = study
    cfg = cls(**values)
    cfg.validate(grid=False) if cls is ExpandConfig else cfg.validate()
    return cfg


def sweep_trial(trial: str, workflow: str, model: str, params: dict, config: dict) -> dict:
    """Run one trial (on any engine): its workflow into its folder; returns its rows."""
    cls = WORKFLOWS[workflow]
    cfg = AblateConfig.from_dict(config) if cls is AblateConfig else cls(**config)
    table = _RUNNERS[workflow](cfg)
    head = {"trial": trial, "model": model, "workflow": workflow, **params}
    return {"rows": [{**head, **row} for row in table.to_dict(orient="records")]}


def _rank_rows(cfg: RankConfig) -> pd.DataFrame:
    table = run_rank(cfg, progress=False).table
    per_hook = table.groupby(["layer", "hook"], sort=True)["wd"]
    return per_hook.agg(median_wd="median", max_wd="max").reset_index()


_RUNNERS = {
    "rank": _rank_rows,
    "prune": lambda cfg: pd.DataFrame([run_prune(cfg, progress=False)]),
    "ablate": lambda cfg: run_ablate(cfg, progress=False),
    "expand": lambda cfg: run_expand(cfg, progress=False),
}


def run_sweep(sweep: SweepConfig, progress: bool = True) -> pd.DataFrame:
    """Run every trial the sweep's ``results.csv`` lacks; returns (and writes) the table of
    the file's trials. A resume may add models and runs (new trials); the shared
    ``settings`` must stay as they were. Rows of trials no longer in the file are left out of
    the table (their folders stay in ``trials/``)."""
    trials = sweep.trials()
    plan = plan_for(sweep, "sweep", resume=sweep.resume, resumable=True, cells=("models", "runs"))
    order = {t["trial"]: i for i, t in enumerate(trials)}
    with plan.start() as run:
        path = run.path / "results.csv"
        old = pd.read_csv(path) if plan.action == "resume" and path.is_file() else None
        rows = [] if old is None else old[old["trial"].isin(order)].to_dict(orient="records")
        done = {r["trial"] for r in rows}
        todo = [t for t in trials if t["trial"] not in done]
        bar = tqdm(total=len(todo), desc="sweep trials", disable=not progress)

        def add(_: dict, result: dict) -> None:
            rows.extend(result["rows"])
            rows.sort(key=lambda r: order[r["trial"]])
            save_table(pd.DataFrame(rows), run.path, "results")
            bar.update()

        run_trials(f"{__name__}:sweep_trial", todo, add, sweep, storage=run.path / ".ray")
        bar.close()
        table = pd.DataFrame(rows)
        save_table(table, run.path, "results")
        record = {"command": "sweep", "config": asdict(sweep), "trials": list(order)}
        run.finish(record)
    return table
