r"""Perplexity of a causal language model on token windows.

Definition
----------
For windows :math:`w^{(1)}, \dots, w^{(n)}` of ``seqlen`` tokens each, every window is scored
independently (no context carried over) and each of its ``seqlen - 1`` next-token
predictions counts once (the first token of a window has no prediction):

.. math::

    \mathrm{NLL} = \frac{1}{n (L-1)} \sum_{i=1}^{n} \sum_{t=1}^{L-1}
        -\log p_\theta\!\left(w^{(i)}_{t+1} \mid w^{(i)}_{1..t}\right),
    \qquad \mathrm{PPL} = \exp(\mathrm{NLL}),

with :math:`L` = ``seqlen``.  This is the SparseGPT / Wanda protocol (non-overlapping windows
of the joined test split, :func:`~wasserstein_neurons.data.evaluation_windows`) except for one
detail: the reference code multiplies each window's mean loss by ``seqlen`` and divides the
sum by ``n * seqlen``, which is the same number, :math:`\exp(\text{mean NLL})`.

Memory
------
The ``[batch, seqlen, vocab]`` logits are never materialised: the base model returns the
final hidden states ``[batch, seqlen, d_model]`` and the LM head is applied to chunks of
``nll_chunk`` token positions, each reduced at once with
``torch.nn.functional.cross_entropy(reduction="sum")`` (float32 logits) and accumulated in
float64.  Peak extra memory is ``nll_chunk * vocab`` floats (1024 x 49152 x 4 B = 200 MB).
An offloaded LM head (``load_model(..., offload=...)``, untied) is loaded once per batch,
after the decoder has run, and kept for all of that batch's chunks.

Attention backend
-----------------
A TransformerLens bridge replaces the HF modules in place by wrappers whose attention is
computed by the bridge's own eager code (to expose ``hook_attn_scores`` / ``hook_pattern``),
and it sets ``config._attn_implementation = "eager"``.  Setting the config back to
``"sdpa"`` has *no effect* on a bridged model (measured: bit-identical outputs; the wrappers
ignore it).  ``use_sdpa=True`` therefore runs the native HF modules: during the call every
bridge wrapper is temporarily replaced in its parent by the module it wraps and
``config._attn_implementation`` is set to ``"sdpa"``
(:func:`~wasserstein_neurons.bridge.native_sdpa`); both are restored in a ``finally``
block.  This is only valid if the wrappers add nothing to the computation, which fails when
hooks that edit activations are attached to the bridge, or on GPT-NeoX models whose attention
was pruned through the bridge (the bridge runs split ``q``/``k``/``v`` *copies* of the fused
``query_key_value`` weight, so the native module would use the stale dense weight).
Hence, with ``verify=True`` (default), the per-token losses of a probe (the first window, up
to 256 tokens) are computed by the bridged forward and by the native HF modules with HF's own
*eager* attention, and on a disagreement beyond ``1e-3`` nats per token a warning is issued
and the bridged (eager) path is used.  The probe compares the two eager paths, not the bridge
with sdpa: with nothing edited they agree bit for bit in every dtype (measured on tiny Llama /
GPT-NeoX and the embedded model), whereas sdpa and eager attention differ by rounding alone
by up to 0.40 nats per token (mean 0.047) on the embedded model in bfloat16, 0.10 (mean
0.005) in float16, as much as either differs from float32 -- a fixed tolerance on that
difference would either refuse sdpa for every 16-bit model or miss real disagreements.

Precision
---------
The LM head runs in the model's dtype (the logits a bfloat16 model produces), each chunk of
logits is upcast to float32 before ``cross_entropy`` (log-softmax and NLL in float32: in
bfloat16 the loss of a random tiny model was off by 0.3 % of its perplexity) and the sum
over tokens is accumulated in float64.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .bridge import (
    attn_implementation,
    compute_device,
    has_bridge_modules,
    hf_model_of,
    native_modules,
    native_sdpa,
)
from .offload import layer_resident

__all__ = [
    "PerplexityResult",
    "perplexity",
    "window_nll",
]

_PROBE_TOKENS = 256
#: Largest per-token NLL difference (nats) between the bridged and the native eager forward
#: that still counts as agreement (they are bit-identical when nothing is edited).
_PROBE_TOL = 1e-3


@dataclass(frozen=True)
class PerplexityResult:
    r"""Output of :func:`perplexity`.

    Attributes
    ----------
    perplexity : float
        :math:`\exp(\text{nll\_mean})`.
    nll_mean : float
        Mean next-token negative log-likelihood (nats).
    n_tokens : int
        Number of scored predictions, ``n_windows * (seqlen - 1)``.
    seconds : float
        Wall-clock time of the call.
    n_windows, seqlen : int
        Shape of the evaluated windows.
    backend : str
        ``"sdpa"`` (native HF modules with scaled-dot-product attention), ``"eager"`` or
        ``"bridge"`` (the bridged forward, eager attention).
    """

    perplexity: float
    nll_mean: float
    n_tokens: int
    seconds: float
    n_windows: int = 0
    seqlen: int = 0
    backend: str = ""


def _lm_parts(hf: nn.Module) -> tuple[nn.Module, nn.Module]:
    base = hf.base_model
    head = hf.get_output_embeddings()
    if base is hf or head is None:
        raise TypeError("expected a causal LM with a base model and an output embedding")
    return base, head


def finish_logits(hf: nn.Module, logits: Tensor) -> Tensor:
    r"""What the HF model does to ``lm_head(hidden)`` before returning logits.

    ``logit_scale`` (Cohere): ``z · s``; ``logits_scaling`` (Granite): ``z / s``;
    ``final_logit_softcapping`` (Gemma 2/3): ``c · tanh(z / c)``.  ``logits`` is float32 here
    (the NLL is always taken in float32).
    """
    cfg = getattr(hf, "config", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale not in (None, 1, 1.0):
        logits = logits * scale
    divide = getattr(cfg, "logits_scaling", None)
    if divide not in (None, 1, 1.0):
        logits = logits / divide
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap not in (None, 0, 0.0):
        logits = torch.tanh(logits / cap) * cap
    return logits


def window_nll(
    hf: nn.Module,
    ids: Tensor,
    nll_chunk: int = 1024,
    reduction: str = "sum",
    head_scope: Callable[[], AbstractContextManager] | None = None,
) -> Tensor:
    """Next-token NLL of a batch of windows without materialising full logits.

    Parameters
    ----------
    hf : nn.Module
        A ``transformers`` causal LM (bridged or not).
    ids : LongTensor, shape ``[batch, seqlen]``
        On the model's device.
    nll_chunk : int
        Token positions per LM-head call.
    reduction : {"sum", "none"}
        ``"sum"``: float64 scalar, the summed NLL of the ``batch * (seqlen - 1)`` predictions;
        ``"none"``: float32 ``[batch, seqlen - 1]`` per-token NLL.
    head_scope : callable, optional
        Returns a context held around all the LM-head calls of the batch (after the decoder
        has run): :func:`perplexity` passes one that keeps an offloaded head resident, so
        its weights are loaded once per batch instead of once per chunk.

    Returns
    -------
    Tensor
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    base, head = _lm_parts(hf)
    with torch.no_grad():
        out = base(input_ids=ids, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        h = hidden[:, :-1]  # [b, L-1, d]: position t predicts token t+1
        targets = ids[:, 1:]
        b, n = targets.shape
        flat_h = h.reshape(b * n, h.shape[-1])
        flat_t = targets.reshape(b * n)
        total = torch.zeros((), dtype=torch.float64, device=ids.device)
        per_token = [] if reduction == "none" else None
        with head_scope() if head_scope is not None else nullcontext():
            _chunked_nll(hf, head, flat_h, flat_t, nll_chunk, total, per_token)
    if per_token is None:
        return total
    return torch.cat(per_token).reshape(b, n)


def _chunked_nll(
    hf: nn.Module,
    head: nn.Module,
    flat_h: Tensor,
    flat_t: Tensor,
    nll_chunk: int,
    total: Tensor,
    per_token: list[Tensor] | None,
) -> None:
    """The LM head and cross-entropy on ``nll_chunk`` positions at a time (``flat_h: [P, d]``,
    ``flat_t: [P]``): adds the summed NLL to ``total`` (float64, in place), or appends the
    per-position NLL to ``per_token``."""
    for i in range(0, flat_t.shape[0], nll_chunk):
        logits = finish_logits(hf, head(flat_h[i : i + nll_chunk].unsqueeze(0)).squeeze(0).float())
        if per_token is None:
            total += F.cross_entropy(logits, flat_t[i : i + nll_chunk], reduction="sum").double()
        else:
            per_token.append(F.cross_entropy(logits, flat_t[i : i + nll_chunk], reduction="none"))
        del logits


def _sdpa_agrees(hf: nn.Module, probe: Tensor, nll_chunk: int) -> bool:
    """Whether the native sdpa path may be used: it must agree with the bridged forward on
    ``probe`` (warns and returns False when it does not)."""
    ok, diff = _probe_agrees(hf, probe, nll_chunk)
    if not ok:
        warnings.warn(
            "perplexity: the native HF modules (sdpa) disagree with the bridged model "
            f"(max per-token NLL difference {diff:.3g}); hooks that edit activations or "
            "weights held only by the bridge (GPT-NeoX split QKV)? Using the bridged "
            "eager forward instead.",
            RuntimeWarning,
            stacklevel=3,
        )
    return ok


def _probe_agrees(hf: nn.Module, probe: Tensor, nll_chunk: int) -> tuple[bool, float]:
    """Compare per-token NLLs of the bridged forward and of the native modules with eager
    attention on ``probe`` (see the module docstring for why eager, not sdpa)."""
    ref = window_nll(hf, probe, nll_chunk, reduction="none")
    with native_modules(hf), attn_implementation(hf, "eager"):
        native = window_nll(hf, probe, nll_chunk, reduction="none")
    diff = float((ref - native).abs().max())
    return diff <= _PROBE_TOL, diff


def _head_scope(model) -> Callable[[], AbstractContextManager] | None:
    """For an offloaded LM head (``LoadedModel.offload.head_index``), the context that keeps
    it resident over one batch's LM-head calls; ``None`` when the head stays on the device."""
    offload = getattr(model, "offload", None)
    index = None if offload is None else offload.head_index
    if index is None:
        return None
    return lambda: layer_resident(offload, index, keep_edits=False)


def perplexity(
    model,
    windows: Tensor,
    *,
    batch_size: int = 4,
    nll_chunk: int = 1024,
    use_sdpa: bool = True,
    verify: bool = True,
    progress: bool = True,
) -> PerplexityResult:
    r"""Perplexity :math:`\exp(\text{mean NLL})` over all next-token predictions of ``windows``.

    Parameters
    ----------
    model : LoadedModel, TransformerBridge or transformers model
        Evaluated on its own device, in eval mode (restored afterwards).
    windows : LongTensor, shape ``[n_windows, seqlen]``
        Token ids, e.g. :func:`~wasserstein_neurons.data.evaluation_windows`; each window is
        scored independently and contributes ``seqlen - 1`` predictions.
    batch_size : int
        Windows per forward pass.
    nll_chunk : int
        Token positions per LM-head call (bounds the logits memory to
        ``nll_chunk * vocab`` floats).
    use_sdpa : bool
        Use scaled-dot-product attention.  On a bridged model this runs the native HF modules
        (see the module docstring); on a plain HF model it sets
        ``config._attn_implementation = "sdpa"`` for the call.  Either way the previous state
        is restored.  Models without sdpa support use eager attention.
    verify : bool
        On a bridged model, check the native sdpa path against the bridged forward on a
        probe first, and fall back (with a warning) when they disagree.
    progress : bool
        tqdm progress bar over batches.

    Returns
    -------
    PerplexityResult
    """
    t0 = time.perf_counter()
    windows = torch.as_tensor(windows)
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise ValueError(
            f"windows must be token ids [n_windows, seqlen >= 2], got {tuple(windows.shape)}"
        )
    if batch_size < 1 or nll_chunk < 1:
        raise ValueError("batch_size and nll_chunk must be positive")
    hf = hf_model_of(model)
    device = compute_device(hf)
    windows = windows.long()
    n, seqlen = windows.shape
    bridged = has_bridge_modules(hf)
    sdpa = use_sdpa and bool(getattr(hf, "_supports_sdpa", False))

    was_training = hf.training
    hf.eval()
    try:
        backend = "bridge" if bridged else "eager"
        if sdpa and bridged and verify:
            sdpa = _sdpa_agrees(hf, windows[:1, :_PROBE_TOKENS].to(device), nll_chunk)
        total = 0.0
        with native_sdpa(hf) if sdpa else nullcontext():
            backend = "sdpa" if sdpa else backend
            for i in tqdm(
                range(0, n, batch_size),
                desc="perplexity",
                disable=not progress,
                leave=False,
            ):
                ids = windows[i : i + batch_size].to(device)
                total += float(window_nll(hf, ids, nll_chunk, "sum", _head_scope(model)))
    finally:
        hf.train(was_training)
    n_tokens = n * (seqlen - 1)
    nll = total / n_tokens
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll_mean=nll,
        n_tokens=n_tokens,
        seconds=time.perf_counter() - t0,
        n_windows=n,
        seqlen=seqlen,
        backend=backend,
    )
