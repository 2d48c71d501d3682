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
import torch

from .data import calibration_windows, evaluation_windows, load_tokens
from .evaluate import perplexity
from .models import DEFAULT_MODEL, load_model
from .pruning import PruneSpec, sequential_prune
from .runs import prepare_run_dir, save_table, write_run_config

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class EvalSettings:
    """Which model and evaluation windows (shared by every workflow that measures perplexity)."""

    model: str = DEFAULT_MODEL
    dataset: str = "embedded"
    seqlen: int = 512
    eval_tokens: int = 32768
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"

    def validate_eval(self) -> None:
        if self.eval_tokens < self.seqlen:
            raise ValueError(
                f"--eval-tokens ({self.eval_tokens}) must be at least one window "
                f"of --seqlen ({self.seqlen})"
            )


def eval_windows_for(model, settings: EvalSettings) -> torch.Tensor:
    """Non-overlapping evaluation windows ``[eval_tokens // seqlen, seqlen]``."""
    tokens = load_tokens(model.tokenizer, settings.dataset, "evaluation")
    return evaluation_windows(tokens, settings.seqlen, max_tokens=settings.eval_tokens)


def run_eval(settings: EvalSettings, model=None, progress: bool = True) -> dict:
    """Perplexity of ``settings.model`` on its evaluation windows (nothing written)."""
    settings.validate_eval()
    model = model or load_model(settings.model, device=settings.device, dtype=settings.dtype)
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
class PruneConfig(EvalSettings):
    out: str = "runs/prune"
    method: str = "sparsegpt"
    sparsity: float = 0.5
    prunen: int = 0
    prunem: int = 0
    wbits: int = 16
    nsamples: int = 128
    seed: int = 0
    targets: str = "mlp"
    save: str | None = None
    overwrite: bool = False

    def spec(self) -> PruneSpec:
        """The pruning spec (n:m, when given, overrides ``sparsity``)."""
        sparsity = 0.0 if self.prunem else self.sparsity
        return PruneSpec(
            sparsity=sparsity, prunen=self.prunen, prunem=self.prunem, wbits=self.wbits
        )

    @property
    def target_sparsity(self) -> float:
        return self.prunen / self.prunem if self.prunem else self.sparsity

    def validate(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise ValueError(
                f"unknown pruning method {self.method!r}; valid: {', '.join(PRUNE_METHODS)}"
            )
        if (self.prunen == 0) != (self.prunem == 0):
            raise ValueError(
                f"malformed n:m sparsity {self.prunen}:{self.prunem}: "
                "give both --prunen and --prunem"
            )
        self.spec()  # sparsity range, n:m shape, wbits
        if self.wbits < 16 and self.method != "sparsegpt":
            raise ValueError("--wbits quantization is only supported with --method sparsegpt")
        if self.nsamples < 1:
            raise ValueError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.targets not in ("mlp", "all"):
            raise ValueError(f"unknown targets {self.targets!r}; valid: mlp, all")
        self.validate_eval()


def run_prune(cfg: PruneConfig, model=None, progress: bool = True) -> dict:
    """Prune, evaluate before and after, write the run folder; returns the result row."""
    cfg.validate()
    out = prepare_run_dir(cfg.out, overwrite=cfg.overwrite)
    if cfg.save and Path(cfg.save).exists() and any(Path(cfg.save).iterdir()):
        raise FileExistsError(f"--save folder {cfg.save} is not empty")
    model = model or load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    eval_windows = eval_windows_for(model, cfg)
    cal_tokens = load_tokens(model.tokenizer, cfg.dataset, "calibration")
    cal_windows = calibration_windows(cal_tokens, cfg.nsamples, cfg.seqlen, seed=cfg.seed)

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

    row = {
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
        "prune_seconds": prune_seconds,
    }
    save_table(pd.DataFrame([row]), out, "prune")
    layers.to_csv(out / "layers.csv", index=False)
    if cfg.save:
        save_pruned(model, cfg.save)
    write_run_config(
        out, {"command": "prune", "config": asdict(cfg), "model": model.name, "result": row}
    )
    return row


def save_pruned(model, path: str | Path) -> Path:
    """Write the (pruned) weights as a Hugging Face folder loadable by ``load_model(path)``."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
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


__all__ = [
    "EvalSettings",
    "PruneConfig",
    "run_eval",
    "run_prune",
    "save_pruned",
    "eval_windows_for",
]
