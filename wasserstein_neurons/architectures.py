r"""Which linears of a decoder layer are its MLP, read from a booted TransformerLens bridge.

TransformerLens 4.x maps well over a hundred ``transformers`` architectures onto one component
tree: ``bridge.blocks[l].mlp`` is an ``MLPBridge`` (``in`` → activation → ``out``), a
``GatedMLPBridge`` (``act(gate(x)) * in(x)`` → ``out``) or a ``JointGateUpMLPBridge`` (the same
with a fused ``gate_up_proj``), and its ``gate`` / ``in`` / ``out`` children are
``LinearBridge`` wrappers around the real ``nn.Linear`` / ``Conv1D`` modules.  This module
derives an :class:`ArchitectureAdapter` from that tree (:func:`adapter_from_bridge`), so an
architecture TransformerLens learns to map works here without a code change:

* **role** ``gate`` / ``up`` / ``down`` ← bridge child ``gate`` / ``in`` / ``out``;
* **neuron hook** ← the MLP bridge's ``hook_aliases`` (``hook_pre`` is ``gate.hook_out`` on
  gated MLPs and ``in.hook_out`` on plain ones; ``hook_post`` is ``out.hook_in``);
* **where the linear lives** ← its module path inside the decoder layer (``mlp.gate_proj``,
  OPT's ``fc1`` on the layer itself, GPT-2's ``mlp.c_fc``), found by identity in the HF tree;
* **sizes** ← the weights (``[out, in]`` view: ``d_mlp`` rows for ``gate``/``up``).

Neurons are only defined here for dense MLPs.  Mixture-of-experts blocks (Mixtral, Qwen2-MoE,
OLMoE: ``MoEBridge``), blocks without an MLP (Mamba and other state-space mixers) and models
whose layers differ in MLP shape raise :class:`UnsupportedArchitecture` saying why.

Fused gate/up projections (Phi-3's ``gate_up_proj: [2·d_mlp, d_model]``) are split by the
bridge into two ``Linear`` modules whose weights are *views* of the fused parameter, so a pruned
row edits the real parameter.  :func:`install_fused_gate_up` makes the HF forward run those same
two modules (:class:`FusedGateUp`), so a linear replaced through its ``LinearBridge`` (Sparse
Expansion) is used by the native HF forward as well as by the bridge, and both agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .bridge import WRAPPER_ATTRS, clean_module_path, is_linear, module_paths, unwrap

__all__ = [
    "ArchitectureAdapter",
    "FusedGateUp",
    "MLPLinearSpec",
    "TESTED_MODEL_TYPES",
    "UnsupportedArchitecture",
    "adapter_from_bridge",
    "install_fused_gate_up",
]

#: Model types the test matrix builds as tiny random models and runs through every workflow
#: (``tests/test_architectures.py``); others the bridge maps are checked when loaded.
TESTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo",
    "olmo2", "stablelm", "granite", "gpt_neox", "gpt2", "opt", "gptj", "falcon",
)  # fmt: skip

#: Bridge child name → our role name.
ROLE_OF_CHILD = {"gate": "gate", "in": "up", "out": "down"}


class UnsupportedArchitecture(ValueError):
    """The bridge maps this model, but its MLP neurons are not defined here (MoE, SSM ...)."""


@dataclass(frozen=True)
class MLPLinearSpec:
    """One linear module of a decoder layer's MLP.

    Attributes
    ----------
    role:
        ``"gate"``, ``"up"`` (first projection) or ``"down"`` (second projection).
    path:
        Module path from the decoder layer to the linear, without TransformerLens wrapper
        levels (``mlp.gate_proj``, ``mlp.dense_h_to_4h``, OPT's ``fc1``, Phi-3's
        ``mlp.gate_up_proj.gate``).
    bridge_attr:
        Attribute name on ``bridge.blocks[l].mlp`` (``gate``, ``in``, ``out``).
    neuron_hook:
        Hook alias on ``blocks.{l}.mlp`` that carries this linear's *output* for ``gate``/``up``
        (``hook_pre``, ``hook_pre_linear``) or its *input* for ``down`` (``hook_post``).
    transposed:
        True for GPT-2's ``Conv1D``, whose weight is stored ``[in, out]``.
    """

    role: str
    path: str
    bridge_attr: str
    neuron_hook: str
    transposed: bool = False


def _child(module: nn.Module, name: str) -> nn.Module:
    """``module``'s child ``name``, looking through wrapper levels that do not hold it."""
    while True:
        child = module._modules.get(name)
        if child is not None:
            return child
        inner = next((module._modules[a] for a in WRAPPER_ATTRS if a in module._modules), None)
        if inner is None:
            raise AttributeError(f"{type(module).__name__} has no submodule {name!r}")
        module = inner


def resolve_path(module: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` below ``module`` (wrapped or with the wrappers detached)."""
    for part in path.split(".") if path else ():
        module = _child(module, part)
    return module


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Names the MLP linears of one architecture and gives uniform access to them.

    Every weight is exposed as ``[out_features, in_features]`` (rows = neurons), whatever the
    storage layout, so pruning code never needs to know about GPT-2's transposed ``Conv1D``.
    ``family`` is the config's ``model_type`` (``llama``, ``qwen2``, ``gpt2`` ...).
    """

    family: str
    layers_path: str
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
        """The projection the paper studies: ``gate`` of a gated MLP, else ``up``."""
        return self.neuron_roles[0]

    def spec(self, role: str) -> MLPLinearSpec:
        for s in self.linears:
            if s.role == role:
                return s
        raise ValueError(f"{self.family} MLPs have no {role!r} linear; roles are {self.roles}")

    def decoder_layers(self, hf_model: nn.Module) -> nn.ModuleList:
        return resolve_path(hf_model, self.layers_path)

    def holder(self, hf_model: nn.Module, layer: int, role: str) -> nn.Module:
        """What sits at ``role``'s place: its ``LinearBridge`` on a bridged model."""
        return resolve_path(self.decoder_layers(hf_model)[layer], self.spec(role).path)

    def set_holder(self, hf_model: nn.Module, layer: int, role: str, module: nn.Module) -> None:
        """Put ``module`` at ``role``'s place (for a model without bridge wrappers)."""
        parent, _, name = self.spec(role).path.rpartition(".")
        resolve_path(self.decoder_layers(hf_model)[layer], parent)._modules[name] = module

    def linear(self, hf_model: nn.Module, layer: int, role: str) -> nn.Module:
        """The torch module (``nn.Linear`` or ``Conv1D``) behind ``role`` in ``layer``.

        TransformerLens bridges replace HF linears by ``LinearBridge`` wrappers; this returns the
        wrapped original so its ``weight`` is the real parameter.
        """
        return unwrap(self.holder(hf_model, layer, role))

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


# --------------------------------------------------------------------------------------------
# Deriving the adapter from a bridge
# --------------------------------------------------------------------------------------------


def _refuse(model_type: str, why: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(
        f"architecture {model_type!r} is mapped by TransformerLens but has no dense MLP "
        f"neurons here: {why}. Supported: decoders whose every block has a dense MLP "
        "(run `wasserstein-neurons models` for the list)"
    )


#: Config fields that count the experts of a mixture-of-experts MLP (Mixtral, Qwen2 / Qwen3-MoE,
#: OLMoE, DeepSeek, ...); a dense model has none of them, or a count of at most 1.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def refuse_from_config(config) -> None:
    """Raise :class:`UnsupportedArchitecture` when the config alone shows a mixture-of-experts
    MLP (an expert count above 1), so a large MoE checkpoint is refused before any weight is
    read.  The bridge-based check of :func:`adapter_from_bridge` stays the definitive one."""
    model_type = getattr(config, "model_type", None) or "?"
    for name in EXPERT_COUNT_FIELDS:
        count = getattr(config, name, None)
        if isinstance(count, int) and not isinstance(count, bool) and count > 1:
            raise _refuse(
                model_type,
                f"its MLP is a mixture of experts ({name} = {count} in its config; a neuron "
                "belongs to one expert and sees only the tokens routed to it)",
            )


def _mlp_bridge(block: nn.Module, model_type: str) -> nn.Module:
    from transformer_lens.model_bridge.generalized_components.moe import MoEBridge

    try:
        mlp = resolve_path(block, "mlp")
    except AttributeError:
        mlp = None
    if mlp is None:
        raise _refuse(
            model_type,
            f"its blocks ({type(block).__name__}) have no MLP (a "
            "state-space or other non-MLP mixer)",
        )
    if isinstance(mlp, MoEBridge) or "experts" in mlp._modules:
        raise _refuse(
            model_type,
            "its MLP is a mixture of experts (a neuron belongs to one "
            "expert and sees only the tokens routed to it)",
        )
    return mlp


def _hook_for(mlp: nn.Module, child: str) -> str | None:
    """The alias on ``mlp`` that names ``child``'s neurons (output for gate/in, input for out)."""
    target = f"{child}.hook_in" if child == "out" else f"{child}.hook_out"
    aliases = getattr(mlp, "hook_aliases", None) or {}
    return next((a for a, t in aliases.items() if t == target), None)


def _layer_specs(mlp: nn.Module, layer_path: str, paths: dict[int, str], model_type: str):
    """``(spec, weight shape)`` for every linear child of one block's MLP bridge."""
    found = []
    for child, role in ROLE_OF_CHILD.items():
        holder = mlp._modules.get(child)
        if holder is None:
            continue
        inner, hook, path = unwrap(holder), _hook_for(mlp, child), paths.get(id(holder))
        if not is_linear(inner) or hook is None or path is None:
            raise _refuse(
                model_type,
                f"its MLP's {child!r} is a {type(inner).__name__}, not a linear with a neuron hook",
            )
        rel = clean_module_path(path)[len(clean_module_path(layer_path)) + 1 :]
        transposed = isinstance(inner, Conv1D)
        w = inner.weight.T if transposed else inner.weight
        found.append((MLPLinearSpec(role, rel, child, hook, transposed), tuple(w.shape)))
    if {s.role for s, _ in found} & {"up", "down"} != {"up", "down"}:
        raise _refuse(model_type, f"its MLP bridge ({type(mlp).__name__}) has no in/out linears")
    return tuple(found)


def adapter_from_bridge(bridge, hf_model: nn.Module) -> ArchitectureAdapter:
    """Derive the :class:`ArchitectureAdapter` of ``hf_model`` from the bridge booted on it.

    Raises
    ------
    UnsupportedArchitecture
        For MoE MLPs, blocks without an MLP, non-linear MLP children, or layers that differ.
    """
    model_type = str(getattr(hf_model.config, "model_type", type(hf_model).__name__))
    blocks = getattr(bridge, "blocks", None)
    if not blocks:
        raise _refuse(model_type, "the bridge has no decoder blocks")
    paths = {i: path for i, (path, _) in module_paths(hf_model).items()}
    layer_paths = [paths.get(id(b)) for b in blocks]
    if layer_paths[0] is None or not layer_paths[0].endswith(".0"):
        raise _refuse(model_type, "its decoder blocks are not a module list of the HF model")
    layers_path = layer_paths[0][: -len(".0")]
    per_layer = [
        _layer_specs(_mlp_bridge(b, model_type), p, paths, model_type)
        for b, p in zip(blocks, layer_paths, strict=True)
    ]
    if any(s != per_layer[0] for s in per_layer[1:]):
        raise _refuse(model_type, "its layers do not all have the same MLP")
    specs = per_layer[0]
    shape = dict((s.role, w) for s, w in specs)
    return ArchitectureAdapter(
        family=model_type,
        layers_path=clean_module_path(layers_path),
        linears=tuple(s for s, _ in specs),
        n_layers=len(blocks),
        d_model=shape["up"][1],
        d_mlp=shape["up"][0],
    )


# --------------------------------------------------------------------------------------------
# Fused gate/up projections
# --------------------------------------------------------------------------------------------


class FusedGateUp(nn.Module):
    r"""Stands in for a fused ``gate_up_proj``: ``y = [gate(x), up(x)]`` along the last axis.

    ``gate`` and ``up`` are the bridge's ``LinearBridge`` wrappers (registered as children, so
    :func:`~wasserstein_neurons.bridge.native_modules` detaches them like any other wrapper);
    their weights are views of ``weight``, the original fused ``[2·d_mlp, d_model]`` parameter,
    which stays registered here so state dicts keep the HF key ``...gate_up_proj.weight``.
    """

    def __init__(self, fused: nn.Module, gate: nn.Module, up: nn.Module, bridge_mlp=None):
        super().__init__()
        self.weight = fused.weight
        self.bias = getattr(fused, "bias", None)
        self.gate, self.up = gate, up
        self.in_features = fused.weight.shape[1]
        self.out_features = fused.weight.shape[0]
        # the bridge's splitter, split_gate_up_matrix(hf_mlp) -> (gate, up), and the name it
        # reads the fused linear under (kept as plain attributes: no module cycle)
        self._splitter = getattr(bridge_mlp, "split_gate_up_matrix", None)
        self._attr = getattr(bridge_mlp, "fused_attr", None)
        self._views: dict | None = None  # (part, name) -> (shape, stride, offset) in the fused

    def _split_parts(self) -> list[str]:
        """The parts still run by the bridge's split ``nn.Linear`` (not replaced by experts)."""
        return [part for part in ("gate", "up") if type(unwrap(getattr(self, part))) is nn.Linear]

    def split_parameters(self) -> list[nn.Parameter]:
        """The split linears' parameters (views of ``weight`` / ``bias``)."""
        return [p for part in self._split_parts() for p in unwrap(getattr(self, part)).parameters()]

    def resplit(self) -> None:
        """Make the split linears views of the current fused parameters again (offload replaces
        them on every load): where the bridge's own splitter puts each view, found once on
        real weights (the offloaded skeleton the bridge booted on had none)."""
        if self._views is None:
            self._views = self._view_geometry()
        split = self._split_parts()
        for (part, name), (shape, stride, offset) in self._views.items():
            if part not in split:
                continue
            source = self.weight if name == "weight" else self.bias
            view = source.data.as_strided(shape, stride, source.storage_offset() + offset)
            unwrap(getattr(self, part))._parameters[name] = nn.Parameter(view, requires_grad=False)

    def _view_geometry(self) -> dict:
        """``(part, name) -> (shape, stride, offset)`` of each split view inside the fused
        tensor, read off one call of the bridge's splitter on the loaded weights; raises
        ``UnsupportedArchitecture`` if that splitter copies instead of viewing."""
        if self._splitter is None:
            raise UnsupportedArchitecture("this fused gate/up projection has no splitter")
        split = self._splitter(SimpleNamespace(**{self._attr: self}))
        geometry = {}
        for part, linear in zip(("gate", "up"), split, strict=True):
            for name, t in linear._parameters.items():
                if t is None:
                    continue
                source = self.weight if name == "weight" else self.bias
                if t.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
                    raise UnsupportedArchitecture("the bridge copies the fused gate/up weights")
                offset = t.storage_offset() - source.storage_offset()
                geometry[part, name] = (tuple(t.shape), t.stride(), offset)
        return geometry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.gate(x), self.up(x)], dim=-1)


def install_fused_gate_up(bridge) -> int:
    """Route every fused gate/up projection through the bridge's split linears; returns how many.

    Raises ``UnsupportedArchitecture`` when the split weights are copies rather than views of
    the fused parameter (pruning them would then not change the real model).
    """
    count = 0
    for block in getattr(bridge, "blocks", ()):
        mlp = block._modules.get("mlp")
        attr = getattr(mlp, "fused_attr", None)
        if not attr:
            continue
        original = unwrap(mlp)
        fused = original._modules[attr]
        if isinstance(fused, FusedGateUp):
            continue
        gate, up = mlp._modules["gate"], mlp._modules["in"]
        base = fused.weight.untyped_storage().data_ptr()
        for part in (gate, up):
            if unwrap(part).weight.untyped_storage().data_ptr() != base:
                raise UnsupportedArchitecture(
                    f"the bridge copies the fused {attr} of {type(original).__name__}; pruning "
                    "its split linears would not change the model"
                )
        original._modules[attr] = FusedGateUp(fused, gate, up, mlp)
        count += 1
    return count


# --------------------------------------------------------------------------------------------
# What is supported
# --------------------------------------------------------------------------------------------


def _source_status(adapter_class) -> str:
    """What an adapter's source says about its MLP (MoE or state-space components)."""
    import inspect
    import sys

    try:
        text = inspect.getsource(sys.modules[adapter_class.__module__])
    except (OSError, TypeError, KeyError):
        return "untested: checked when loaded"
    if "MoEBridge" in text or "MoERouter" in text:
        return "likely refused: its bridge adapter uses mixture-of-experts components"
    if "SSM" in text or "Mamba" in text:
        return "likely refused where a block has no MLP: its adapter uses state-space blocks"
    return "untested: checked when loaded"


def architecture_table() -> list[dict[str, str]]:
    """One row per causal-LM architecture the installed TransformerLens maps.

    ``status`` is ``tested`` for the model types of :data:`TESTED_MODEL_TYPES` (the test
    matrix), else what the bridge adapter's components suggest; every model is checked by
    :func:`adapter_from_bridge` when it is loaded, whatever this table says.
    """
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    types_of: dict[str, list[str]] = {}
    for model_type, cls in causal.items():
        for name in cls if isinstance(cls, tuple | list) else (cls,):
            types_of.setdefault(name, []).append(model_type)
    rows = []
    for arch, adapter_class in sorted(SUPPORTED_ARCHITECTURES.items()):
        types = sorted(types_of.get(arch, ()), key=lambda t: (t not in TESTED_MODEL_TYPES, t))
        if not types:
            continue  # not a causal LM: load_model cannot load it
        status = "tested" if types[0] in TESTED_MODEL_TYPES else _source_status(adapter_class)
        rows.append({"architecture": arch, "model_type": ", ".join(types), "status": status})
    return rows
