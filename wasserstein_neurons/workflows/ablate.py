"""The ``ablate`` workflow: rank (or reuse a ranking), calibrate once, sweep, save, plot.

Outputs in ``out``: ``ablation.csv`` (``strategy, seed, mode, neuron_sparsity,
activation_sparsity, scope, rule, sign, method, include_down, perplexity, top_percent, hook,
neurons_per_layer``; the first row is the dense model; a column that does not apply to a row's
mode is empty), ``ablation_summary.csv`` (mean / min / max over seeds), ``ablation.png`` (one
panel per mode) and ``config.json``.

Calibration: the ``nsamples`` calibration windows feed the pruning statistics of mode
``weights`` (:func:`~wasserstein_neurons.ablation.collect_calibration`) and the activation
statistics of ``mean`` / ``resample`` / ``threshold``
(:func:`~wasserstein_neurons.interventions.collect_activation_stats`, a pool of at most
``study.stats_tokens`` rows drawn with ``seed``); each pass runs only when a mode needs it.
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
from ..ablation import (
    AblationConfig,
    ablation_settings,
    collect_calibration,
    run_ablation,
    summarize,
)
from ..interventions import check_hook, collect_activation_stats
from ..runs import read_run_config, save_table
from ..trials import EngineSettings, run_trials
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
class AblateConfig(EngineSettings, PositionSettings, CalibrationSettings, EvalSettings):
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
        self.validate_engine()
        self.validate_eval()
        self.validate_calibration()
        self.validate_positions(self.seqlen)

    @classmethod
    def from_dict(cls, config: dict, **overrides) -> AblateConfig:
        """Inverse of ``dataclasses.asdict`` (the study rebuilt as an ``AblationConfig``);
        ``overrides`` replace fields."""
        return cls(**{**config, "study": AblationConfig(**config["study"]), **overrides})


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
        hooks=f"blocks.*.mlp.{cfg.study.hook}",
        keep_activations=False,
        overwrite=True,
    )
    return run_rank(rank_cfg, model=model, progress=progress).table, ranking_dir


def _calibrate(cfg: AblateConfig, model, windows, progress: bool):
    """The pruning statistics (mode ``weights``) and the activation statistics (``mean``,
    ``resample``, ``threshold``) of the calibration ``windows``; ``None`` for what no mode
    needs."""
    study = cfg.study
    cache = stats = None
    if "weights" in study.modes:
        cache = collect_calibration(
            model, windows, study.method, batch_size=cfg.batch_size, progress=progress
        )
    if study.needs_stats:
        stats = collect_activation_stats(
            model,
            windows,
            study.hook,
            max_rows=study.stats_tokens,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            progress=progress,
        )
    return cache, stats


def run_ablate(cfg: AblateConfig, model=None, progress: bool = True) -> pd.DataFrame:
    """Rank (or reuse a ranking), calibrate once, run the study, write the run folder.

    With ``cfg.engine == "ray"`` each strategy (with its seeds, sparsities and modes) is one
    Ray Tune trial (:func:`ablate_trial`) that calibrates on the same windows and reads the
    same ranking; the rows are put in the local engine's order. Returns the ``ablation.csv``
    table (first row: the dense model).
    """
    cfg.validate()
    plan = plan_for(cfg, "ablate")
    model = cfg.load(model)
    check_hook(model, cfg.study.hook)
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
        if cfg.engine == "local":
            cache, stats = _calibrate(cfg, model, cal_windows, progress)
            seconds["calibration"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            results = run_ablation(
                model, table, cfg.study, eval_windows, cache,
                batch_size=cfg.batch_size, progress=progress, stats=stats,
            )  # fmt: skip
        else:
            results = _sweep_as_trials(cfg, ranking_dir, out)
        seconds["sweep"] = time.perf_counter() - t0
        _save(results, cfg, model.name, out)
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


def _save(results: pd.DataFrame, cfg: AblateConfig, name: str, out: Path) -> None:
    save_table(results, out, "ablation")
    summarize(results).to_csv(out / "ablation_summary.csv", index=False)
    title = f"{name}: top {cfg.study.top_percent:g}% neurons per layer"
    if "weights" in cfg.study.modes:
        title += f", {cfg.study.method}"
    plotting.save_figure(plotting.plot_ablation(results, title), out / "ablation.png")


def _sweep_as_trials(cfg: AblateConfig, ranking_dir: str, out: Path) -> pd.DataFrame:
    """The study as one trial per strategy (each with every mode, seed and sparsity of that
    strategy); the dense row once, then every setting's row in the local engine's order."""
    config = asdict(config_from(AblateConfig, cfg, ranking=str(ranking_dir)))
    settings = ablation_settings(cfg.study)
    groups: dict[str, list[int]] = {}
    for i, setting in enumerate(settings):
        groups.setdefault(setting.strategy, []).append(i)
    rows: dict[int, dict] = {}

    def add(params: dict, result: dict) -> None:
        rows.setdefault(-1, result["rows"][0])  # the dense row (the same in every trial)
        rows.update(zip(params["only"], result["rows"][1:], strict=True))

    trials = [{"config": config, "only": only} for only in groups.values()]
    run_trials(f"{__name__}:ablate_trial", trials, add, cfg, storage=out / ".ray")
    return pd.DataFrame([rows[i] for i in range(-1, len(settings))])


def ablate_trial(config: dict, only: list[int]) -> dict:
    """The settings ``only`` (indices of :func:`~wasserstein_neurons.ablation.ablation_settings`)
    of an ablation study as a trial (:mod:`wasserstein_neurons.trials`): the run's ``config``
    (``asdict(AblateConfig)``, with ``ranking`` set) in, the dense row and those settings' rows
    out. It calibrates on the same seeded windows and selects from the same ranking."""
    cfg = AblateConfig.from_dict(config, engine="local", ray_address=None)
    model = cfg.load()
    table = load_ranking(cfg.ranking, model.name, cfg)
    cache, stats = _calibrate(cfg, model, cfg.calibration_windows(model), False)
    results = run_ablation(
        model, table, cfg.study, eval_windows_for(model, cfg), cache,
        batch_size=cfg.batch_size, progress=False, stats=stats, only=only,
    )  # fmt: skip
    return {"rows": results.to_dict(orient="records")}
