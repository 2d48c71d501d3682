"""Save / load a Sparse Expansion: the expanded MLP modules of a model, without the base model.

A saved expansion is a folder with one ``expansion-{layer:05d}.safetensors`` file per layer
(tensors keyed ``"{layer}.{role}.{name}"``) and ``expansion.json`` (format tag
:data:`EXPANSION_FORMAT`, base model name, dtype, the
:class:`~wasserstein_neurons.expansion.ExpansionConfig` and the module list, each entry naming
its file).  Writing a layer at a time keeps the memory of a save at one layer's experts, which
is what an offloaded model (a 7B model's 16 experts per linear) can afford; folders of the
first format (one ``expansion.safetensors``) still load.  :func:`apply_expansion` puts the
modules into a freshly loaded base model, :func:`load_expanded` loads that base model first.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..bridge import replace_linear
from ..offload import layer_resident
from .builder import ExpansionConfig, _layer_roles
from .expert_linear import ExpertRoutedLinear

__all__ = ["EXPANSION_FORMAT", "apply_expansion", "layer_file", "load_expanded", "save_expanded"]

#: Value of ``"format"`` in the JSON written by :func:`save_expanded` (``/2``: a file per layer).
EXPANSION_FORMAT = "wasserstein_neurons.sparse_expansion/2"
#: Formats :func:`apply_expansion` reads (``/1``: every tensor in :data:`_SINGLE_FILE`).
_READABLE_FORMATS = ("wasserstein_neurons.sparse_expansion/1", EXPANSION_FORMAT)
_JSON_FILE = "expansion.json"
_SINGLE_FILE = "expansion.safetensors"


def layer_file(layer: int) -> str:
    """Name of the tensor file of ``layer``'s modules in a saved expansion."""
    return f"expansion-{layer:05d}.safetensors"


def save_expanded(
    model,
    path: str | Path,
    cfg: ExpansionConfig | None = None,
    *,
    compact: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the expanded MLP modules of ``model`` to the folder ``path``.

    Files: ``expansion-{layer:05d}.safetensors`` for every layer with modules (tensors keyed
    ``"{layer}.{role}.{name}"``, written one layer at a time) and ``expansion.json`` (format
    tag, base model name, dtype, the :class:`ExpansionConfig`, the module list, and
    ``extra``).  Only the MLP linears are stored: :func:`apply_expansion` puts them into a
    freshly loaded base model.

    Parameters
    ----------
    model : LoadedModel
        After :func:`build_sparse_expansion` (offloaded or not: an offloaded layer is loaded
        for its write and released unchanged).
    path : str or Path
        Output folder (created; existing files of the same names are overwritten).
    cfg : ExpansionConfig, optional
        The build's config, stored in the JSON.  With it, the plain linears of its roles and
        layers (pruned in place in neuron-level mode) are stored too.
    compact : bool
        Store the experts packed (nonzero values + 1-bit masks: 0.53 B/weight at 90% sparsity,
        2.1 B at 50%, instead of 4).  The in-memory modules are not changed.
    extra : dict, optional
        More JSON-serialisable metadata.

    Returns
    -------
    Path
        The folder.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    entries, storage = [], None
    for layer, tensors, layer_entries, kind in _expansion_layers(model, cfg, compact):
        if tensors:
            save_file(tensors, str(path / layer_file(layer)))
        entries += [{**e, "file": layer_file(layer)} for e in layer_entries]
        storage = storage or kind
    if not entries:
        raise ValueError("the model holds no expanded MLP module to save")
    meta = {
        "format": EXPANSION_FORMAT,
        "base_model": model.name,
        "family": model.adapter.family,
        "dtype": str(model.dtype).replace("torch.", ""),
        "storage": storage or "dense",
        "config": None if cfg is None else cfg.to_dict(),
        "modules": entries,
        "extra": extra or {},
    }
    (path / _JSON_FILE).write_text(json.dumps(meta, indent=2))
    return path


def _expansion_layers(model, cfg: ExpansionConfig | None, compact: bool):
    """For every layer, what :func:`save_expanded` writes: ``(layer, tensors, entries,
    storage)``, one layer at a time.

    ``tensors`` are CPU copies keyed ``"{layer}.{role}.{name}"``: the state dict of every
    expanded module (packed with ``compact``; a router shared with an earlier role of the
    layer is left out) and, with ``cfg``, the ``weight``/``bias`` of the plain linears of its
    roles; ``entries`` are ``{"layer", "role", "kind": "experts", "router_from"}`` or
    ``{..., "kind": "linear"}``; ``storage`` (``"dense"``, ``"compact"``, ``None``: none) is
    that of the layer's first expanded module in memory.
    """
    adapter = model.adapter
    layers = range(adapter.n_layers)
    roles = adapter.roles
    if cfg is not None:
        roles = _layer_roles(model, cfg)
        layers = cfg.layers if cfg.layers is not None else layers
    weights = getattr(model, "offload", None)
    for layer in layers:
        tensors: dict[str, Tensor] = {}
        entries: list[dict[str, Any]] = []
        with layer_resident(weights, layer, keep_edits=False):  # offloaded: loaded, unchanged
            kind = _layer_tensors(
                model, layer, roles if cfg is not None else (), compact, tensors, entries
            )
        yield layer, tensors, entries, kind


def _layer_tensors(
    model, layer: int, plain_roles, compact: bool, tensors: dict, entries: list
) -> str | None:
    """Add ``layer``'s expanded modules (and its ``plain_roles`` linears) to ``tensors`` and
    ``entries``; returns the storage of its first expanded module (``None``: none)."""
    adapter, hf = model.adapter, model.hf_model
    router_owner: dict[int, str] = {}
    storage = None
    for role in adapter.roles:
        module = adapter.linear(hf, layer, role)
        prefix = f"{layer}.{role}."
        if isinstance(module, ExpertRoutedLinear):
            storage = storage or ("compact" if module.is_compact else "dense")
            shared_from = router_owner.get(id(module.router))
            router_owner.setdefault(id(module.router), role)
            tensors.update(_expert_tensors(module, prefix, compact, shared_from is None))
            entry = {"layer": layer, "role": role, "kind": "experts", "router_from": shared_from}
            entries.append(entry)
        elif role in plain_roles:
            tensors[prefix + "weight"] = _cpu_copy(module.weight)
            if getattr(module, "bias", None) is not None:
                tensors[prefix + "bias"] = _cpu_copy(module.bias)
            entries.append({"layer": layer, "role": role, "kind": "linear"})
    return storage


def _expert_tensors(
    module: ExpertRoutedLinear, prefix: str, compact: bool, with_router: bool
) -> dict[str, Tensor]:
    """CPU copy of ``module``'s state dict, keys under ``prefix``.

    With ``compact`` the experts are packed (on a copy: ``module`` is unchanged); without
    ``with_router`` the ``router.*`` entries are left out.
    """
    if compact and not module.is_compact:
        module = copy.deepcopy(module).compact()
    return {
        prefix + key: _cpu_copy(t)
        for key, t in module.state_dict().items()
        if with_router or not key.startswith("router.")
    }


def _cpu_copy(t: Tensor) -> Tensor:
    """A contiguous CPU copy of ``t``, detached (owns its memory)."""
    return t.detach().cpu().contiguous().clone()


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / _JSON_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} holds no {_JSON_FILE}: not a saved Sparse Expansion")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") not in _READABLE_FORMATS:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}")
    return meta


class _SavedTensors:
    """The tensors of a saved expansion, one file in memory at a time (entries are in layer
    order, so each per-layer file is read once)."""

    def __init__(self, path: Path):
        self.path, self.name, self.tensors = path, None, {}

    def module(self, entry: dict[str, Any]) -> dict[str, Tensor]:
        """State dict of ``entry``'s module (keys without its ``"{layer}.{role}."`` prefix)."""
        from safetensors.torch import load_file

        name = entry.get("file", _SINGLE_FILE)
        if name != self.name:
            self.name, self.tensors = None, {}  # the previous file is freed first
            self.tensors, self.name = load_file(str(self.path / name)), name
        prefix = f"{entry['layer']}.{entry['role']}."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


@torch.no_grad()
def apply_expansion(
    model, path: str | Path, *, storage: str | None = None, store_routing: bool = False
) -> ExpansionConfig | None:
    """Put the modules saved by :func:`save_expanded` into ``model`` (in place).

    Parameters
    ----------
    model : LoadedModel
        The dense base model the expansion was built from (same architecture and sizes).
    path : str or Path
        Folder written by :func:`save_expanded`.
    storage : {"dense", "compact"} or None
        Storage of the loaded experts; ``None``: as they were when saved.
    store_routing : bool
        ``store_routing`` of the loaded modules.

    Returns
    -------
    ExpansionConfig or None
        The stored config.

    Raises
    ------
    ValueError
        For a different architecture family, or mismatched module sizes.
    """
    path = Path(path)
    meta = _read_meta(path)
    if meta["family"] != model.adapter.family:
        raise ValueError(
            f"{path} was built for a {meta['family']} model, not {model.adapter.family}"
        )
    storage = storage or meta.get("storage", "dense")
    if storage not in ("dense", "compact"):
        raise ValueError(f"storage must be 'dense' or 'compact', got {storage!r}")
    saved = _SavedTensors(path)
    adapter, hf = model.adapter, model.hf_model
    device, dtype = model.device, model.dtype
    loaded: dict[tuple[int, str], ExpertRoutedLinear] = {}
    for entry in meta["modules"]:
        layer, role = int(entry["layer"]), entry["role"]
        sd = saved.module(entry)
        if entry["kind"] == "linear":
            module = adapter.linear(hf, layer, role)
            w = module.weight
            if w.shape != sd["weight"].shape:
                raise ValueError(f"layer {layer} {role!r}: saved weight has shape mismatch")
            w.copy_(sd["weight"].to(w.device, w.dtype))
            if "bias" in sd:
                module.bias.copy_(sd["bias"].to(module.bias.device, module.bias.dtype))
            continue
        source = entry.get("router_from")
        if source is not None:
            owner = loaded[(layer, source)]
            sd.update({"router." + k: v for k, v in owner.router.state_dict().items()})
        module = ExpertRoutedLinear.from_state_dict(sd, store_routing=store_routing)
        if storage == "dense":
            module.densify()
        elif not module.is_compact:
            module.compact()
        module = module.to(device=device, dtype=dtype)
        if source is not None:
            module.router = loaded[(layer, source)].router
        replace_linear(model, layer, role, module)
        loaded[(layer, role)] = module
    cfg = meta.get("config")
    return None if cfg is None else ExpansionConfig.from_dict(cfg)


def load_expanded(
    path: str | Path,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    storage: str | None = None,
    store_routing: bool = False,
):
    """Load the base model named in ``path``'s JSON and apply the saved expansion.

    Parameters
    ----------
    path : str or Path
        Folder written by :func:`save_expanded`.
    device, dtype :
        Passed to :func:`~wasserstein_neurons.models.load_model` (``dtype=None``: the saved
        model's dtype).
    storage, store_routing :
        See :func:`apply_expansion`.

    Returns
    -------
    tuple[LoadedModel, ExpansionConfig or None]
    """
    from ..models import load_model

    meta = _read_meta(Path(path))
    model = load_model(meta["base_model"], device=device, dtype=dtype or meta["dtype"])
    cfg = apply_expansion(model, path, storage=storage, store_routing=store_routing)
    return model, cfg
