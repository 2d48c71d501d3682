r"""Layer-wise offloaded execution: decoder-layer weights stay off the compute device until used.

A model loaded with ``load_model(..., offload="disk" | "cpu")`` keeps its small *non-layer*
weights (final norm, position embeddings, a *tied* embedding / LM head pair) on the compute
device, and every decoder layer's parameters as ``meta`` placeholders (shape and dtype, no
storage); an untied input embedding and LM head are offloaded the same way (units after the
layers, :func:`offloadable_ends`; ``rank`` and the layer loop never call the head).  A forward
pre-hook on each unit's HF module materialises its weights on the device just before it runs,
and a forward hook releases them after, so *any* forward — the bridged one with
TransformerLens hooks (``rank``), the native HF one (perplexity), the layer loop (``prune``,
``expand``) — holds one unit at a time.  Peak memory is then

    small non-layer weights + one decoder layer + activations,

independent of depth.  Where the weights come from:

* ``"disk"`` — the model folder's safetensors shards, read with plain positioned reads
  (:class:`ShardReader`: no memory map, so pages of the shards are never counted in the
  process's RSS; the OS page cache keeps re-reads fast).  A layer whose weights were edited
  (pruning) is written to a scratch safetensors file and read from there afterwards.
* ``"cpu"`` — host memory: every layer's tensors are loaded once into CPU RAM and copied to
  the device (a GPU) when the layer runs; edits are copied back.  On a CPU device this only
  adds the bookkeeping (the tensors are used in place).

The layer loop (:func:`~wasserstein_neurons.layerwise.sequential_layerwise`) *pins* the layer
it processes (:meth:`LayerOffload.resident`) so its weights stay materialised across the many
batch forwards, the pruning step and the propagation, and are written back once at the end.
Arithmetic is unchanged: a layer's weights are the same numbers in the same dtype whether they
were resident all along or read back, so results equal the in-memory run bit for bit.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from .architectures import FusedGateUp
from .bridge import clean_module_path, module_paths, unwrap
from .siblings import make_sibling_dir, stale_siblings

__all__ = [
    "OFFLOAD_MODES",
    "LayerOffload",
    "LayerPatches",
    "OffloadError",
    "ShardReader",
    "layer_resident",
    "tensor_slots",
]

OFFLOAD_MODES = ("cpu", "disk")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class OffloadError(ValueError):
    """The model folder or the model cannot be offloaded (no shards, missing tensors ...)."""


class ShardReader:
    """Reads single tensors from a folder's safetensors shards with positioned reads.

    ``model.safetensors.index.json`` (``weight_map``: name → shard) is used when present, else
    every ``*.safetensors`` file's header.  Each header is parsed once (8-byte little-endian
    length, then JSON ``{name: {dtype, shape, data_offsets}}``).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise OffloadError(f"offload needs safetensors shards; {self.folder} has none")
        self._entries: dict[str, tuple[Path, int, str, list[int], int]] = {}
        for path in files:
            self.add_file(path)

    def add_file(self, path: Path) -> None:
        """Index ``path``'s tensors (later files win for the same name)."""
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in header.items():
            start, end = info["data_offsets"]
            self._entries[name] = (path, 8 + n + start, info["dtype"], info["shape"], end - start)

    def rename(self, rules: Sequence[tuple[str, str]]) -> None:
        """Also index each tensor under the name ``transformers`` gives it when loading
        (``rules``: regex → replacement, e.g. GPT-NeoX's ``^embed_out\\.`` → ``lm_head.``)."""
        for name in list(self._entries):
            new = name
            for pattern, repl in rules:
                new = re.sub(pattern, repl, new)
            self._entries.setdefault(new, self._entries[name])

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a new CPU tensor of its stored dtype."""
        path, offset, dtype, shape, size = self._entries[name]
        if dtype not in _DTYPES:
            raise OffloadError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        out = torch.empty(shape, dtype=_DTYPES[dtype])
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if buf is not None:
            with open(path, "rb") as f:
                f.seek(offset)
                if f.readinto(memoryview(buf)) != size:
                    raise OffloadError(f"{path.name} is truncated (tensor {name})")
        return out


def tensor_slots(root: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(owner module, parameter name, state-dict name)`` of every parameter below ``root``:
    each module once, named by its native path without wrapper levels (a fused QKV linear is
    ``attn.c_attn``, not the bridge's ``attn.qkv``)."""
    slots = []
    for path, module in module_paths(root).values():
        for name, p in module._parameters.items():
            if p is not None:
                slots.append((module, name, clean_module_path(f"{path}.{name}" if path else name)))
    return slots


def _split_parameters(layer: nn.Module) -> set[int]:
    """ids of the parameters the bridge split off fused projections (the ``q`` / ``k`` / ``v``
    linears of a fused QKV, the ``gate`` / ``up`` of Phi-3's
    :class:`~wasserstein_neurons.architectures.FusedGateUp`): re-derived from the stored
    weights whenever the layer is loaded."""
    found = set()
    for module in layer.modules():
        if hasattr(module, "split_qkv_matrix"):
            for part in ("q", "k", "v"):
                child = module._modules.get(part)
                if child is not None:
                    found.update(id(p) for p in unwrap(child).parameters())
        elif isinstance(module, FusedGateUp):
            found.update(id(p) for p in module.split_parameters())
    return found


def _glibc():
    """glibc through ctypes, or ``None`` (another C library: the allocator tuning is skipped)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def mmap_large_allocations(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes or more with their own memory maps
    and trim its heap above ``threshold`` of free space (``mallopt(M_MMAP_THRESHOLD)``,
    ``mallopt(M_TRIM_THRESHOLD)``), then return what the heap already holds free
    (:func:`return_freed_memory`).  Returns whether it was applied (False off glibc).

    glibc's default *dynamic* threshold rises to the size of the last freed mapping (up to
    32 MiB), after which layer-sized tensors come from the heap and are not returned: measured
    on a 1.1B Llama, RSS then grew by ~0.7 GB per offloaded forward.
    """
    if _LIBC is None:
        return False
    done = bool(_LIBC.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    done = bool(_LIBC.mallopt(-1, threshold)) and done  # -1: M_TRIM_THRESHOLD
    return_freed_memory()
    return done


def return_freed_memory() -> None:
    """Give the free pages inside glibc's heaps back to the OS (``malloc_trim(0)``).

    Even with :func:`mmap_large_allocations`, some layer-sized tensors are served from a heap
    (its free chunks, or a thread's arena) and the heap cannot shrink past live small
    objects, so released layers' memory stayed counted in RSS.  Measured on the 1.1B Llama
    (``experiments/bench_scale.py`` shape), 22 onload/release cycles without a forward: RSS
    +0.23 to +0.41 GB, varying from run to run; with a trim per release: +0.00 GB.  A trim
    took 0.05 ms on a heap of 25 freed 16 MB blocks between live ones, against tens of
    milliseconds for reading a layer.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _put(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module._parameters[name] = nn.Parameter(tensor, requires_grad=False)


# --------------------------------------------------------------------------------------------
# The per-layer hooks
# --------------------------------------------------------------------------------------------


class LayerOffload:
    """Materialises one decoder layer's weights on ``device`` while it runs (see module doc).

    Parameters
    ----------
    layers : sequence of nn.Module
        The decoder layers (bridge wrappers are unwrapped: hooks go on the HF layer, which both
        the bridged and the native forward call).
    prefixes : sequence of str
        Each layer's state-dict prefix (``"model.layers.3."``).
    reader : ShardReader
        Where the weights are read from.
    device, dtype :
        Compute device and model dtype (stored tensors are cast on load).
    mode : {"cpu", "disk"}
    """

    def __init__(
        self,
        layers,
        prefixes: Sequence[str],
        reader: ShardReader,
        device,
        dtype,
        mode,
        ends: Mapping[str, tuple[nn.Module, str]] | None = None,
    ):
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES} or None, got {mode!r}")
        ends = dict(ends or {})
        #: the offloaded units: the decoder layers, then the ``ends`` (untied input embedding,
        #: LM head: :func:`offloadable_ends`)
        self.units = [unwrap(m) for m in layers] + [unwrap(m) for m, _ in ends.values()]
        self.n_layers = len(layers)
        #: the HF decoder layers (units ``0 .. n_layers - 1``)
        self.layers: list[nn.Module] = self.units[: self.n_layers]
        #: unit index of each end (``"embed"``, ``"head"``); absent: it stays on the device
        self.end_index = {name: self.n_layers + i for i, name in enumerate(ends)}
        self.prefixes = list(prefixes) + [prefix for _, prefix in ends.values()]
        self.reader = reader
        self.device, self.dtype, self.mode = torch.device(device), dtype, mode
        self.host: dict[str, torch.Tensor] = {}
        self._scratch: Path | None = None
        self._resident: set[int] = set()
        self._pinned: set[int] = set()
        self._patches: dict[int, Callable[[], None]] = {}
        self._writes = 0
        mmap_large_allocations()
        for index, unit in enumerate(self.units):
            self._check_and_place(index, unit)
        self._handles = [h for i in range(len(self.units)) for h in self._hook(i)]

    @property
    def head_index(self) -> int | None:
        """Unit index of the LM head (``None``: it stays on the device, e.g. tied embeddings)."""
        return self.end_index.get("head")

    def unit_name(self, index: int) -> str:
        """``"layers-00003"`` for a decoder layer, else the end's name (``"embed"``, ``"head"``)."""
        if index < self.n_layers:
            return f"layers-{index:05d}"
        return next(name for name, i in self.end_index.items() if i == index)

    def _check_and_place(self, index: int, layer: nn.Module) -> None:
        """Sort the layer's parameters into *stored* ones (tensors of the shards) and *derived*
        ones (views the bridge split off a stored one at boot, e.g. GPT-2's q / k / v of
        ``c_attn``), then replace them all by placeholders."""
        derived = _split_parameters(layer)  # buffers: already on the device (load_skeleton)
        for module, name, key in tensor_slots(layer):
            full = self.prefixes[index] + key
            p = module._parameters[name]
            if full in self.reader:
                if self.mode == "cpu":
                    self.host[full] = self.reader.read(full).to(dtype=self.dtype)
            elif id(p) not in derived:
                raise OffloadError(
                    f"cannot offload {full}: it is neither a tensor of the model's safetensors "
                    "shards nor split from one by the bridge"
                )
            _put(module, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def _slots(self, index: int):
        """``(module, name, state-dict key)`` of layer ``index``'s stored parameters."""
        prefix = self.prefixes[index]
        for module, name, key in tensor_slots(self.units[index]):
            if prefix + key in self.host or prefix + key in self.reader:
                yield module, name, prefix + key

    def _resplit(self, index: int) -> None:
        """Re-derive the bridge's split views (fused QKV, fused gate/up) from the weights just
        loaded."""
        for module in self.units[index].modules():
            if hasattr(module, "split_qkv_matrix"):
                module.set_original_component(unwrap(module))
            elif isinstance(module, FusedGateUp):
                module.resplit()

    def _hook(self, index: int):
        def before(module, args):
            if index not in self._resident:
                self.onload(index)

        def after(module, args, output):
            if index not in self._pinned:
                self.release(index)

        layer = self.units[index]
        return layer.register_forward_pre_hook(before), layer.register_forward_hook(after)

    def onload(self, index: int) -> None:
        """Put layer ``index``'s weights on the device."""
        patch = self._patches.get(index)
        for module, name, key in self._slots(index):
            if not module._parameters[name].is_meta:
                continue
            stored = self.host[key] if key in self.host else self.reader.read(key)
            tensor = stored.to(device=self.device, dtype=self.dtype)
            if patch is not None and tensor.data_ptr() == stored.data_ptr():
                tensor = tensor.clone()  # a patch edits a copy, never the host tensor
            _put(module, name, tensor)
        self._resplit(index)
        if patch is not None:
            patch()
        self._resident.add(index)

    def release(self, index: int, write_back: bool = False) -> None:
        """Replace layer ``index``'s weights by placeholders; ``write_back`` keeps their edits.

        Parameters of modules installed since the layer was placed (Sparse Expansion's
        experts) have no stored copy yet: without ``write_back`` they stay in memory, with
        it they are stored like edited weights (host copy or scratch file) and offloaded from
        then on."""
        if write_back and index in self._patches:
            self.release(index)
            raise OffloadError(f"layer {index} is patched: its temporary edits cannot be kept")
        edited = {}
        prefix = self.prefixes[index]
        split = _split_parameters(self.units[index])
        for module, name, key in tensor_slots(self.units[index]):
            p, key = module._parameters[name], prefix + key
            stored = key in self.host or key in self.reader
            if p.is_meta or id(p) in split:  # split views: re-derived on the next load
                if not p.is_meta:
                    _put(module, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
                continue
            if not stored and not write_back:
                continue  # a module added since (experts): in memory until it is stored
            if write_back:
                edited[key] = p.data  # an added module's tensors become stored ones here
            _put(module, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        if edited:
            self._keep(edited)
        self._resident.discard(index)
        return_freed_memory()

    def _keep(self, edited: dict[str, torch.Tensor]) -> None:
        if self.mode == "cpu":
            for key, t in edited.items():
                self.host[key] = t if t.device.type == "cpu" else t.to("cpu")
            return
        from safetensors.torch import save_file

        if self._scratch is None:
            self._scratch = _new_scratch()
        path = self._scratch / f"edited-{self._writes:05d}.safetensors"
        self._writes += 1
        save_file({k: t.detach().contiguous().cpu() for k, t in edited.items()}, str(path))
        self.reader.add_file(path)

    @contextmanager
    def resident(self, index: int, keep_edits: bool = True) -> Iterator[None]:
        """Keep layer ``index`` materialised for the block; with ``keep_edits`` its weights
        are kept (written back) afterwards, as they are when the block ends normally."""
        self._pinned.add(index)
        if index not in self._resident:
            self.onload(index)
        ok = False
        try:
            yield
            ok = True
        finally:
            self._pinned.discard(index)
            self.release(index, write_back=ok and keep_edits)

    def patch(self, edits: Mapping[int, Callable[[], None]]) -> LayerPatches:
        """Temporary edits: ``edits[l]()`` runs each time layer ``l`` is materialised (after
        its weights are loaded, on the device), until the returned handle's
        :meth:`LayerPatches.restore`.  Nothing is written to the shards, the host copies or
        the scratch files, so restoring is exact and free; a patched layer cannot be released
        with ``write_back``.  The layers must not be resident when patched."""
        busy = sorted(set(edits) & (self._resident | set(self._patches)))
        if busy:
            raise OffloadError(f"layers {busy} are resident or already patched")
        self._patches.update(edits)
        return LayerPatches(self, tuple(edits))

    def unpatch(self, layers: Sequence[int]) -> None:
        """Drop the patches of ``layers``; a resident, unpinned one is released (its next load
        reads the stored weights)."""
        for index in layers:
            self._patches.pop(index, None)
            if index in self._resident and index not in self._pinned:
                self.release(index)

    def close(self) -> None:
        """Remove the hooks and the scratch folder (the model is unusable afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        if getattr(self, "_scratch", None) is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __del__(self):  # pragma: no cover - best effort
        self._remove_scratch()


#: Scratch folders are hidden siblings of this path (:mod:`~wasserstein_neurons.siblings`).
SCRATCH_ROOT = Path(tempfile.gettempdir()) / "wn-offload"


def _new_scratch() -> Path:
    """A new scratch folder ``/tmp/.wn-offload.scratch-<pid>-<random>`` for edited layers;
    those of processes that are gone (killed before they could clean up) are removed first."""
    for stale in stale_siblings(SCRATCH_ROOT, "scratch"):
        shutil.rmtree(stale, ignore_errors=True)
    return make_sibling_dir(SCRATCH_ROOT, "scratch")


class LayerPatches:
    """Handle of :meth:`LayerOffload.patch`; :meth:`restore` drops the patches (the next load
    of each layer reads its stored weights again)."""

    def __init__(self, offload: LayerOffload, layers: tuple[int, ...]):
        self.offload, self.layers = offload, layers

    def restore(self) -> None:
        self.offload.unpatch(self.layers)


def layer_resident(offload: LayerOffload | None, index: int, keep_edits: bool = True):
    """``offload.resident(index, keep_edits)``, or a no-op for a model held in memory
    (``offload`` is ``LoadedModel.offload``)."""
    return nullcontext() if offload is None else offload.resident(index, keep_edits)


# --------------------------------------------------------------------------------------------
# Loading a model without its decoder layers
# --------------------------------------------------------------------------------------------


def decoder_list_path(hf: nn.Module) -> str:
    """Path of the first ``nn.ModuleList`` of identical blocks (the decoder layers)."""
    for path, module in hf.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and path:
            if all(type(m) is type(module[0]) for m in module):
                return path
    raise OffloadError(f"{type(hf).__name__} has no list of decoder layers to offload")


def _renamings(hf: nn.Module) -> list[tuple[str, str]]:
    """The checkpoint → module key renamings ``transformers`` applies when loading ``hf``."""
    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
    except ImportError:  # pragma: no cover - transformers < 5 renames nothing for these models
        return []
    rules = []
    for rule in get_model_conversion_mapping(hf):
        if isinstance(rule, WeightRenaming):
            targets = rule.target_patterns
            for i, source in enumerate(rule.source_patterns):
                rules.append((source, targets[min(i, len(targets) - 1)]))
    return rules


def load_skeleton(folder: str | Path, dtype: torch.dtype, device: torch.device):
    """The HF model of ``folder`` with only its non-layer weights loaded (on ``device``).

    Returns ``(hf_model, reader, layers_path, ends)``; every decoder-layer parameter (and those
    of the ``ends`` :func:`offloadable_ends` finds) is a storage-free placeholder until
    :class:`LayerOffload` takes it over (buffers are real: they are built by the modules'
    constructors).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = ShardReader(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.tie_weights()  # a tied embedding / head pair shares one parameter from here on
    reader.rename(_renamings(hf))
    layers_path = decoder_list_path(hf)
    ends = offloadable_ends(hf, reader)
    later = (layers_path + ".",) + tuple(prefix for _, prefix in ends.values())
    missing = []
    for module, name, key in tensor_slots(hf):
        if key.startswith(later):
            # readable but storage-free until LayerOffload takes over: the bridge may split
            # fused projections at boot (views of a stride-0 zero)
            shape = module._parameters[name].shape
            _put(module, name, torch.zeros((), dtype=dtype, device=device).expand(shape))
            continue
        if key in reader:
            _put(module, name, reader.read(key).to(device=device, dtype=dtype))
        else:
            missing.append(key)
    hf.tie_weights()
    still = [k for k in missing if hf.get_parameter(k).is_meta]
    if still:
        raise OffloadError(f"{folder}: the shards lack {', '.join(still[:3])}")
    for module in hf.modules():
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)
    return hf.eval(), reader, layers_path, ends


def offloadable_ends(hf: nn.Module, reader: ShardReader) -> dict[str, tuple[nn.Module, str]]:
    """``{"embed": (module, prefix), "head": (module, prefix)}``: the input embedding and the
    LM head, offloaded like layers when they are *untied* (no shared parameter) and their own
    weights are in the shards; ``{}`` otherwise (a tied pair stays on the device).

    The embedding runs once per forward, at its start (a [vocab, d_model] read for a
    [batch, seqlen] lookup: 262 MB at 7B in bfloat16); the head is never called by ``rank``
    or the layer loop, which stop before it, and perplexity loads it per chunk of positions
    it scores.  Neither is then resident while a decoder layer runs."""
    embed, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    if embed is None or head is None:
        return {}
    if {id(p) for p in embed.parameters()} & {id(p) for p in head.parameters()}:
        return {}
    paths = module_paths(hf)
    ends = {}
    for name, module in (("embed", embed), ("head", head)):
        path = paths.get(id(module), (None,))[0]
        slots = tensor_slots(module)
        if path and slots and all(f"{path}.{key}" in reader for _, _, key in slots):
            ends[name] = (module, f"{path}.")
    return ends


def save_offloaded(hf: nn.Module, weights: LayerOffload, folder: str | Path) -> Path:
    """Write an offloaded model (with its edits) as a sharded safetensors folder, one decoder
    layer in memory at a time: ``layers-NNNNN.safetensors`` per layer, ``rest.safetensors``
    for the non-layer weights, and ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}

    def write(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()},
                  str(folder / name), metadata={"format": "pt"})  # fmt: skip
        weight_map.update(dict.fromkeys(tensors, name))

    for index in range(len(weights.units)):
        with weights.resident(index, keep_edits=False):
            write(f"{weights.unit_name(index)}.safetensors", {
                key: module._parameters[name] for module, name, key in weights._slots(index)
            })  # fmt: skip
    tied = {id(p) for p in hf.get_input_embeddings().parameters()}
    rest = {}
    for module, name, key in tensor_slots(hf):
        p = module._parameters[name]
        if (
            not p.is_meta
            and key not in weight_map
            and not (key.startswith("lm_head") and id(p) in tied)
        ):
            rest[key] = p
    write("rest.safetensors", rest)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    hf.config.save_pretrained(folder)
    return folder
