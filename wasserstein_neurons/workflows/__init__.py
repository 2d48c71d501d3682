"""Workflows: one module per command, each an ``XConfig`` dataclass and a ``run_x()`` function.

A workflow loads a model, runs the library on it and writes a run folder (tables, plots and a
``config.json`` that records the config, the model and the package versions, marked finished
last).  The CLI (:mod:`wasserstein_neurons.cli`) only turns flags into these configs.

==============  =======================================  ======================================
module          config / entry point                     writes
==============  =======================================  ======================================
``rank``        :class:`RankConfig` / :func:`run_rank`     ``neurons.csv``, contexts, plots
``prune``       :class:`PruneConfig` / :func:`run_prune`   ``prune.csv``, ``layers.csv``
                (:func:`run_eval`: perplexity only)
``ablate``      :class:`AblateConfig` / :func:`run_ablate` ``ablation.csv``, ``ablation.png``
``expand``      :class:`ExpandConfig` / :func:`run_expand`, ``results.csv``, ``grid.png``
                :func:`run_grid`
``disentangle`` :class:`DisentangleConfig` /               ``neurons.csv``, ``summary.csv``, plots
                :func:`run_disentangle`
==============  =======================================  ======================================

Shared settings (model, evaluation and calibration windows, ``--bos``, sparsity flags, the
token positions left out of output statistics) live in :mod:`.common`.
"""

from .ablate import AblateConfig, load_ranking, run_ablate
from .common import (
    CalibrationSettings,
    EvalSettings,
    ModelSettings,
    PositionSettings,
    SparsitySettings,
    config_from,
    eval_windows_for,
)
from .disentangle import DisentangleConfig, run_disentangle, save_disentangle_plots
from .expand import (
    BASELINES,
    EXPERT_GRID,
    RESULT_COLUMNS,
    SPARSITY_GRID,
    ExpandConfig,
    parse_sparsity,
    run_expand,
    run_grid,
    save_grid_figure,
)
from .prune import PruneConfig, run_eval, run_prune, save_pruned
from .rank import RankConfig, RankResult, run_rank

__all__ = [
    "BASELINES",
    "EXPERT_GRID",
    "RESULT_COLUMNS",
    "SPARSITY_GRID",
    "parse_sparsity",
    "save_grid_figure",
    "AblateConfig",
    "CalibrationSettings",
    "DisentangleConfig",
    "EvalSettings",
    "ExpandConfig",
    "ModelSettings",
    "PositionSettings",
    "PruneConfig",
    "RankConfig",
    "RankResult",
    "SparsitySettings",
    "config_from",
    "eval_windows_for",
    "load_ranking",
    "run_ablate",
    "run_eval",
    "run_expand",
    "run_grid",
    "run_prune",
    "run_disentangle",
    "run_rank",
    "save_disentangle_plots",
    "save_pruned",
]
