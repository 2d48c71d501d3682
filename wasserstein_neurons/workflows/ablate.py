"""The ``ablate`` workflow: rank (or reuse a ranking), calibrate once, sweep, save, plot.

Outputs in ``out``: ``ablation.csv`` (``strategy, seed, top_percent, neuron_sparsity, method,
perplexity, neurons_per_layer, include_down``; the first row is the dense model),
``ablation_summary.csv`` (mean / min / max over seeds), ``ablation.png`` and ``config.json``.
Without ``ranking`` a ranking is made first in ``out/ranking``, with this run's token-position
settings (``exclude_positions``, ``exclude_special``, ``bos``): the strategies that read output
statistics (``wd-top``, ``wd-bottom``, ``mean``, ``variance``) then select on statistics without
those tokens. A reused ``ranking`` must have been made with the same settings.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from .. import plotting
from ..ablation import AblationConfig, collect_calibration, run_ablation, summarize
from ..runs import read_run_config, save_table
from .common import (
    CalibrationSettings,
    EvalSettings,
    PositionSettings,
    config_from,
    eval_windows_for,
    plan_for,
)
from .rank import RankConfig, run_rank


@dataclass
class AblateConfig(PositionSettings, CalibrationSettings, EvalSettings):
    """Knobs of an ``ablate`` run: the study (:class:`~wasserstein_neurons.ablation.AblationConfig`)
    plus where its ranking, calibration and evaluation come from."""

    out: str = "runs/ablate"
    study: AblationConfig = field(default_factory=AblationConfig)
    ranking: str | None = None
    rank_tokens: int = 32768
    nsamples: int = 64
    overwrite: bool = False

    def validate(self) -> None:
        self.study.validate()
        self.validate_eval()
        self.validate_calibration()
        self.validate_positions(self.seqlen)


_PROTOCOL = {"exclude_positions": 0, "exclude_special": False, "bos": False}


def check_ranking_protocol(config: dict, settings, folder) -> None:
    """``ValueError`` unless the rank run's ``config.json`` (``config``) used the same token
    positions settings (``exclude_positions``, ``exclude_special``, ``bos``) as ``settings``;
    runs older than these settings used the defaults."""
    made = config.get("config", {})
    diff = [
        f"{name}={made.get(name, default)!r} (this run: {getattr(settings, name)!r})"
        for name, default in _PROTOCOL.items()
        if made.get(name, default) != getattr(settings, name)
    ]
    if diff:
        raise ValueError(
            f"the ranking in {folder} was made with {', '.join(diff)}; pass the same "
            "--exclude-positions / --exclude-special / --bos as its rank run, or drop --ranking"
        )


def load_ranking(folder: str | Path, model_name: str, settings=None) -> pd.DataFrame:
    """The ``neurons.csv`` of a finished ``rank`` run made with ``model_name`` (and, when
    ``settings`` is given, the same token-position settings, :func:`check_ranking_protocol`)."""
    config = read_run_config(folder)
    if not config.get("finished") or config.get("command") != "rank":
        raise ValueError(f"{folder} is not a finished rank run")
    made_with = config.get("model", {}).get("name")
    if made_with != model_name:
        raise ValueError(
            f"the ranking in {folder} was made with model {made_with!r}, not {model_name!r}"
        )
    if settings is not None:
        check_ranking_protocol(config, settings, folder)
    return pd.read_csv(Path(folder) / "neurons.csv")


def _ranking(
    cfg: AblateConfig, model, out: Path, progress: bool, reused
) -> tuple[pd.DataFrame, str]:
    """The neuron table to select from: ``reused`` (``cfg.ranking``'s, already loaded), or a
    new ``rank`` run in ``out/ranking`` with the same model, corpus, seqlen and seed."""
    if reused is not None:
        return reused, cfg.ranking
    ranking_dir = str(out / "ranking")
    rank_cfg = config_from(
        RankConfig,
        cfg,
        out=ranking_dir,
        tokens=cfg.rank_tokens,
        keep_activations=False,
        overwrite=True,
    )
    return run_rank(rank_cfg, model=model, progress=progress).table, ranking_dir


def run_ablate(cfg: AblateConfig, model=None, progress: bool = True) -> pd.DataFrame:
    """Rank (or reuse a ranking), calibrate once, run the study, write the run folder.

    Returns the ``ablation.csv`` table (first row: the dense model).
    """
    cfg.validate()
    plan = plan_for(cfg, "ablate")
    model = cfg.load(model)
    reused = load_ranking(cfg.ranking, model.name, cfg) if cfg.ranking else None
    cal_windows = cfg.calibration_windows(model)
    eval_windows = eval_windows_for(model, cfg)
    with plan.start() as run:
        out = run.path
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        table, ranking_dir = _ranking(cfg, model, out, progress, reused)
        seconds["ranking"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        cache = collect_calibration(
            model, cal_windows, cfg.study.method, batch_size=cfg.batch_size, progress=progress
        )
        seconds["calibration"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        results = run_ablation(
            model,
            table,
            cfg.study,
            eval_windows,
            cache,
            batch_size=cfg.batch_size,
            progress=progress,
        )
        seconds["sweep"] = time.perf_counter() - t0
        save_table(results, out, "ablation")
        summarize(results).to_csv(out / "ablation_summary.csv", index=False)
        title = (
            f"{model.name}: top {cfg.study.top_percent:g}% neurons per layer, {cfg.study.method}"
        )
        plotting.save_figure(plotting.plot_ablation(results, title), out / "ablation.png")
        run.finish(
            {
                "command": "ablate",
                "config": asdict(cfg),
                "model": model.name,
                "ranking": ranking_dir,
                "seconds": seconds,
            }
        )
    return results
