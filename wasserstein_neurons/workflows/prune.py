"""The ``eval`` and ``prune`` workflows: perplexity of a model, before and after one-shot pruning.

``prune`` follows the SparseGPT / Wanda protocol: ``nsamples`` random calibration windows
(seeded), sequential layer-wise calibration, every MLP linear (or every linear) pruned to the
same unstructured or n:m sparsity, perplexity = exp(mean NLL) over non-overlapping evaluation
windows before and after. Outputs in ``out``: ``prune.csv`` (one row), ``layers.csv`` (one row per
pruned matrix), ``config.json``; with ``save`` the pruned model is written as a HF folder.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ..evaluate import perplexity
from ..offload import save_offloaded
from ..pruning import check_method, sequential_prune
from ..runs import check_save_folder, save_table
from .common import (
    CalibrationSettings,
    EvalSettings,
    SparsitySettings,
    eval_windows_for,
    plan_for,
)


def run_eval(settings: EvalSettings, model=None, progress: bool = True) -> dict:
    """Perplexity of ``settings.model`` on its evaluation windows (nothing written)."""
    settings.validate_eval()
    model = settings.load(model)
    windows = eval_windows_for(model, settings)
    res = perplexity(model, windows, batch_size=settings.batch_size, progress=progress)
    return {
        "model": model.name,
        "dataset": settings.dataset,
        "seqlen": settings.seqlen,
        "eval_tokens": res.n_tokens,
        "perplexity": res.perplexity,
        "nll": res.nll_mean,
        "seconds": res.seconds,
    }


@dataclass
class PruneConfig(SparsitySettings, CalibrationSettings, EvalSettings):
    """Knobs of a ``prune`` run (CLI flags of the same names)."""

    out: str = "runs/prune"
    method: str = "sparsegpt"
    targets: str = "mlp"
    save: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        self.method = check_method(self.method)
        self.spec()  # sparsity range, n:m shape, wbits
        if self.wbits < 16 and self.method != "sparsegpt":
            raise ValueError("--wbits quantization is only supported with --method sparsegpt")
        self.validate_calibration()
        if self.targets not in ("mlp", "all"):
            raise ValueError(f"unknown targets {self.targets!r}; valid: mlp, all")
        self.validate_eval()


def run_prune(cfg: PruneConfig, model=None, progress: bool = True) -> dict:
    """Prune, evaluate before and after, write the run folder; returns the result row."""
    cfg.validate()
    plan = plan_for(cfg, "prune")
    check_save_folder(cfg.save)
    model = cfg.load(model)
    eval_windows = eval_windows_for(model, cfg)
    cal_windows = cfg.calibration_windows(model)
    with plan.start() as run:
        before = perplexity(model, eval_windows, batch_size=cfg.batch_size, progress=progress)
        t0 = time.perf_counter()
        layers = sequential_prune(
            model,
            cal_windows,
            cfg.method,
            cfg.spec(),
            targets=cfg.targets,
            batch_size=cfg.batch_size,
            progress=progress,
        )
        prune_seconds = time.perf_counter() - t0
        after = perplexity(model, eval_windows, batch_size=cfg.batch_size, progress=progress)
        row = _result_row(cfg, before, after, layers, prune_seconds)
        save_table(pd.DataFrame([row]), run.path, "prune")
        layers.to_csv(run.path / "layers.csv", index=False)
        if cfg.save:
            save_pruned(model, cfg.save)
        run.finish({"command": "prune", "config": asdict(cfg), "model": model.name, "result": row})
    return row


def _result_row(cfg: PruneConfig, before, after, layers: pd.DataFrame, seconds: float) -> dict:
    """The one row of ``prune.csv``: settings, perplexity before / after, achieved sparsity."""
    return {
        "method": cfg.method,
        "sparsity": cfg.target_sparsity,
        "prunen": cfg.prunen,
        "prunem": cfg.prunem,
        "wbits": cfg.wbits,
        "targets": cfg.targets,
        "nsamples": cfg.nsamples,
        "seqlen": cfg.seqlen,
        "perplexity_before": before.perplexity,
        "perplexity_after": after.perplexity,
        "achieved_sparsity": float(
            (layers["sparsity"] * layers["n_rows"] * layers["d_in"]).sum()
            / (layers["n_rows"] * layers["d_in"]).sum()
        ),
        "eval_tokens": after.n_tokens,
        "prune_seconds": seconds,
    }


def save_pruned(model, path: str | Path) -> Path:
    """Write the (pruned) weights as a Hugging Face folder loadable by ``load_model(path)``."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if getattr(model, "offload", None) is not None:  # one layer in memory at a time
        save_offloaded(model.hf_model, model.offload, path)
        model.tokenizer.save_pretrained(path)
        return path
    clean = AutoModelForCausalLM.from_config(model.hf_model.config)
    state = {
        k.replace("._original_component", ""): v for k, v in model.hf_model.state_dict().items()
    }
    missing, _ = clean.load_state_dict(state, strict=False)
    if [k for k in missing if not k.endswith("lm_head.weight")]:
        raise RuntimeError(f"could not map the pruned weights back to HF names: {missing[:5]}")
    clean.tie_weights()
    clean.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path
