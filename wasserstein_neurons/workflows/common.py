"""What every workflow shares: model and evaluation settings, calibration windows, sparsity flags.

A workflow config (``PruneConfig``, ``AblateConfig``, ``ExpandConfig`` ...) is a dataclass that
inherits the settings groups it needs from here, so each flag is defined, defaulted and
validated in one place:

* :class:`ModelSettings` — which model and corpus (``--model --dataset --seqlen --batch-size
  --device --dtype``) and whether every window starts with a BOS (``--bos``);
  :class:`EvalSettings` adds the evaluation windows (``--eval-tokens``);
* :class:`CalibrationSettings` — the calibration windows (``--nsamples --seed``; the SparseGPT
  protocol: ``nsamples`` random windows of ``seqlen`` tokens, seeded);
* :class:`SparsitySettings` — the target (``--sparsity --prunen --prunem --wbits``), turned
  into a :class:`~wasserstein_neurons.pruning.PruneSpec` by
  :meth:`~wasserstein_neurons.pruning.PruneSpec.from_settings` (n:m overrides sparsity);
* :class:`PositionSettings` — which tokens the output statistics leave out
  (``--exclude-positions --exclude-special``, :mod:`wasserstein_neurons.positions`).

``--bos`` puts the tokenizer's BOS in front of every window (calibration, evaluation and
captured windows alike) and keeps each window ``seqlen`` tokens long: one BOS and
``seqlen - 1`` text tokens (:func:`~wasserstein_neurons.data.prepend_bos`). So the model's
context length, the number of windows and every token count stay what was asked for: the
``eval_tokens // seqlen`` evaluation windows still score ``seqlen - 1`` predictions each,
``nsamples`` calibration windows still hold ``nsamples · seqlen`` tokens.

Run folders (``config.json``, tables) are handled by :mod:`wasserstein_neurons.runs`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import bos_token_id, calibration_windows, evaluation_windows, load_tokens, prepend_bos
from ..models import (
    DEFAULT_MODEL,
    LoadedModel,
    check_context,
    check_offload,
    load_model,
    resolve_device,
    resolve_dtype,
)
from ..positions import RowSelection, check_exclude_positions, select_rows, special_token_ids
from ..pruning import PruneSpec
from ..runs import RunPlan, plan_run

__all__ = [
    "CalibrationSettings",
    "config_from",
    "EvalSettings",
    "ModelSettings",
    "PositionSettings",
    "SparsitySettings",
    "check_seed",
    "eval_windows_for",
    "plan_for",
]


def check_seed(seed) -> None:
    """Seeds are integers in ``[0, 2**32)`` (what numpy's generators accept)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {seed}")


def plan_for(cfg, command: str, **kwargs) -> RunPlan:
    """:func:`~wasserstein_neurons.runs.plan_run` for a workflow config (its ``out``,
    ``overwrite`` and every setting, recorded as the run's ``config``)."""
    return plan_run(cfg.out, command, dataclasses.asdict(cfg), overwrite=cfg.overwrite, **kwargs)


@dataclass
class ModelSettings:
    """Which model, on which device, reading which corpus in windows of ``seqlen`` tokens."""

    model: str = DEFAULT_MODEL
    dataset: str = "embedded"
    seqlen: int = 512
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    offload: str | None = None
    bos: bool = False

    def validate_model(self) -> None:
        """``ValueError`` for a window length or batch size below 1, or a device or dtype
        that does not exist (before anything is loaded)."""
        for name in ("seqlen", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
        resolve_device(self.device)
        resolve_dtype(self.dtype)
        check_offload(self.offload)

    def load(self, model: LoadedModel | None = None) -> LoadedModel:
        """``model`` if given, else :func:`~wasserstein_neurons.models.load_model` of the
        settings' model, device and dtype; either way ``seqlen`` must fit the model's
        context (:func:`~wasserstein_neurons.models.check_context`)."""
        model = model or load_model(
            self.model, device=self.device, dtype=self.dtype, offload=self.offload
        )
        check_context(model, self.seqlen)
        return model

    def with_bos(self, model, windows: torch.Tensor) -> torch.Tensor:
        """``windows`` ``[n, seqlen]``, with the tokenizer's BOS in front when ``bos`` (same
        shape: the last text token of each window makes room for it)."""
        if not self.bos:
            return windows
        return prepend_bos(windows, bos_token_id(model.tokenizer))


@dataclass
class PositionSettings:
    """Tokens the output statistics leave out: each window's first ``exclude_positions``
    positions and, with ``exclude_special``, the tokenizer's special tokens (BOS, EOS, pad).
    The defaults leave out nothing (the paper's protocol)."""

    exclude_positions: int = 0
    exclude_special: bool = False

    def validate_positions(self, seqlen: int) -> None:
        check_exclude_positions(self.exclude_positions, seqlen)

    def selection(self, model, windows) -> RowSelection:
        """The kept rows of the flattened ``[n_windows, seqlen]`` ``windows``."""
        ids = special_token_ids(model.tokenizer) if self.exclude_special else None
        return select_rows(np.asarray(windows), self.exclude_positions, ids)


@dataclass
class EvalSettings(ModelSettings):
    """Model settings plus the evaluation windows (every workflow that measures perplexity)."""

    eval_tokens: int = 32768

    def validate_eval(self) -> None:
        self.validate_model()
        if self.eval_tokens < self.seqlen:
            raise ValueError(
                f"--eval-tokens ({self.eval_tokens}) must be at least one window "
                f"of --seqlen ({self.seqlen})"
            )


def eval_windows_for(model, settings: EvalSettings, tokens=None) -> torch.Tensor:
    """Non-overlapping evaluation windows ``[eval_tokens // seqlen, seqlen]`` (from
    ``tokens``, the already tokenised evaluation split, when the caller has it)."""
    if tokens is None:
        tokens = load_tokens(model.tokenizer, settings.dataset, "evaluation")
    windows = evaluation_windows(tokens, settings.seqlen, max_tokens=settings.eval_tokens)
    return settings.with_bos(model, windows)


@dataclass
class CalibrationSettings:
    """``nsamples`` random calibration windows of ``seqlen`` tokens, drawn with ``seed``."""

    nsamples: int = 128
    seed: int = 0

    def validate_calibration(self) -> None:
        if self.nsamples < 1:
            raise ValueError(f"--nsamples must be at least 1, got {self.nsamples}")
        check_seed(self.seed)

    def calibration_windows(self, model, tokens=None) -> torch.Tensor:
        """LongTensor ``[nsamples, seqlen]`` from the calibration split of ``self.dataset``
        (with a BOS in front of each when ``bos``); ``tokens``: that split, already tokenised."""
        if tokens is None:
            tokens = load_tokens(model.tokenizer, self.dataset, "calibration")
        windows = calibration_windows(tokens, self.nsamples, self.seqlen, seed=self.seed)
        return self.with_bos(model, windows)


@dataclass
class SparsitySettings:
    """The sparsity target flags; :meth:`spec` is the one place they become a spec."""

    sparsity: float = 0.5
    prunen: int = 0
    prunem: int = 0
    wbits: int = 16
    #: ``--per-row``: an exact count in every row instead of each method's reference rule.
    per_row: bool = False

    def spec(self, **kwargs) -> PruneSpec:
        """The pruning spec (n:m, when given, overrides ``sparsity``); validates the flags."""
        per_row = True if self.per_row else None
        return PruneSpec.from_settings(
            self.sparsity, self.prunen, self.prunem, wbits=self.wbits, per_row=per_row, **kwargs
        )

    @property
    def target_sparsity(self) -> float:
        """``prunen / prunem`` with n:m, else ``sparsity``."""
        return self.spec().target_sparsity


def config_from(cls: type, source: Any, **overrides: Any):
    """A ``cls`` dataclass whose fields are copied from the same-named attributes of
    ``source`` (another config, or parsed CLI flags), then set from ``overrides``.

    Attributes that ``source`` lacks or holds as ``None`` keep ``cls``'s default, so one
    config hands its shared settings (model, dataset, seqlen, seed ...) to another without
    listing them, and a flag left unset keeps the config's default.
    """
    values = {
        f.name: getattr(source, f.name)
        for f in dataclasses.fields(cls)
        if getattr(source, f.name, None) is not None
    }
    return cls(**{**values, **overrides})
