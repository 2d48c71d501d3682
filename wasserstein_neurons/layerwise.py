r"""The one layer loop: walk a decoder one layer at a time with sequential calibration inputs.

One-shot pruning (SparseGPT, Wanda), Sparse Expansion and the disentanglement analysis all
calibrate *sequentially*: layer :math:`l` is calibrated on the inputs it receives from the
already modified (pruned / expanded) layers :math:`0, \dots, l-1`, so errors of earlier layers
are seen, and partly compensated, by later ones.  :func:`sequential_layerwise` is that walk:

1. **Catch layer 0.**  Run the model on each calibration batch up to decoder layer 0 (a
   forward pre-hook raises once it has the inputs) and keep the hidden states
   ``[n_windows, seqlen, d_model]`` plus the extra arguments the model passes to its layers
   (attention mask, position ids, rotary embeddings ...), stored once per distinct batch size.
2. **Process.**  For ``l = 0 .. L_last`` hand a :class:`LayerContext` to the callback.  It may
   run the layer with hooks (:meth:`LayerContext.run`), collect a module's inputs or outputs
   over all calibration tokens (:meth:`LayerContext.collect_inputs` /
   :meth:`LayerContext.collect_outputs`, ``[tokens, d]``), edit weights in place, or swap a
   linear (:meth:`LayerContext.replace_linear`).
3. **Propagate.**  Replace the stored hidden states by the layer's outputs, computed with
   whatever modules the callback left in place; they are the next layer's inputs.

Memory: one buffer with the current layer's inputs for all windows (``n_windows * seqlen *
d_model`` values of the model dtype, on the model's device or, with ``offload=True``, on the
CPU) plus the activations of one batch inside the layer.

Targets
-------
A *target* is one linear module of a decoder layer, named

* by its MLP role (``"gate"``, ``"up"``, ``"down"``; see
  :class:`~wasserstein_neurons.models.ArchitectureAdapter`), or
* for other linears (attention), by its module path inside the layer with the TransformerLens
  wrapper levels removed, e.g. ``"self_attn.q_proj"`` (Llama), ``"attention.q"`` (GPT-NeoX),
  ``"attn.q"`` (GPT-2).  :func:`layer_linears` lists them.

TransformerLens bridges wrap every linear in a ``LinearBridge``; targets are always the
*unwrapped* modules (``nn.Linear`` or GPT-2's ``Conv1D``), each counted once.  The bridges of
GPT-NeoX and GPT-2 split the fused QKV projection into separate ``q``/``k``/``v`` linears
and run those (the fused module is then never called).  On GPT-2 the split weights are views
of the fused ``c_attn`` weight, so pruning them prunes ``c_attn``; on GPT-NeoX they are copies,
and the HF ``query_key_value`` parameter keeps its dense values (the bridged forward, which
is what every hook and the HF ``forward`` of a bridged model run, uses the pruned copies).

Example
-------
A custom per-layer procedure (what the Sparse Expansion builder does)::

    def process(ctx):                       # ctx: LayerContext of layer ctx.index
        x = ctx.collect_inputs(ctx.targets(["gate"]))["gate"]   # [tokens, d_model]
        ...                                 # fit a router on x, build experts, swap modules
        x_down = ctx.collect_inputs(ctx.targets(["down"]))["down"]  # through the new modules
        ...

    sequential_layerwise(model, windows, process)

See ``ARCHITECTURE.md`` for how the pruning driver and the expansion builder sit on this loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .bridge import clean_module_path, compute_device, is_linear, linear_weight, replace_linear
from .offload import layer_resident

__all__ = [
    "LayerContext",
    "layer_linears",
    "resolve_layers",
    "resolve_targets",
    "sequential_layerwise",
    "target_weight",
]


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def layer_linears(model, layer: int) -> dict[str, nn.Module]:
    """Every linear module of one decoder layer, unwrapped and counted once.

    Parameters
    ----------
    model : LoadedModel
        From :func:`~wasserstein_neurons.models.load_model`.
    layer : int
        Decoder layer index.

    Returns
    -------
    dict[str, nn.Module]
        Name -> ``nn.Linear`` / ``Conv1D`` in module-registration order.  MLP linears are keyed
        by their role (``gate``/``up``/``down``); the others by their path inside the layer
        without TransformerLens wrapper levels (``self_attn.q_proj``, ``attn.q`` ...).  An MLP
        role whose module was replaced by a non-linear module (e.g. an expert-routed layer)
        still appears, mapped to that module.  Some listed modules may never be called by the
        forward pass (the fused QKV linear of bridged GPT-NeoX / GPT-2 models).
    """
    adapter, hf = model.adapter, model.hf_model
    role_of = {id(adapter.linear(hf, layer, r)): r for r in adapter.roles}
    out: dict[str, nn.Module] = {}
    for path, module in adapter.decoder_layers(hf)[layer].named_modules():
        if is_linear(module):
            out.setdefault(role_of.get(id(module)) or clean_module_path(path), module)
    for r in adapter.roles:
        out.setdefault(r, adapter.linear(hf, layer, r))
    return out


def resolve_targets(
    model, layer: int, targets: str | Sequence[str] = "mlp"
) -> dict[str, nn.Module]:
    """The target modules of ``layer``.

    Parameters
    ----------
    model : LoadedModel
    layer : int
    targets : {"mlp", "all"} or str or sequence of str
        ``"mlp"``: every MLP linear (``adapter.roles``); ``"all"``: every linear of the layer
        (:func:`layer_linears`); otherwise one name or a sequence of names (roles such as
        ``("gate", "up")`` or attention names from :func:`layer_linears`).

    Returns
    -------
    dict[str, nn.Module]

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones).
    """
    if targets == "mlp":
        adapter = model.adapter
        return {r: adapter.linear(model.hf_model, layer, r) for r in adapter.roles}
    available = layer_linears(model, layer)
    if targets == "all":
        return available
    names = [targets] if isinstance(targets, str) else list(targets)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(
            f"unknown target(s) {unknown} in layer {layer}; valid: 'mlp', 'all' or names "
            f"among {', '.join(available)}"
        )
    return {n: available[n] for n in dict.fromkeys(names)}


def target_weight(model, layer: int, role: str) -> Tensor:
    """``[out, in]`` view of a target's weight (writes go through to the parameter)."""
    return linear_weight(resolve_targets(model, layer, [role])[role])


# --------------------------------------------------------------------------------------------
# Catching the inputs of layer 0
# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook once it has what it needs (layer 0's inputs, a module's input)."""


def _catch_layer0(hf: nn.Module, layer0: nn.Module, ids: Tensor) -> tuple[Tensor, tuple, dict]:
    caught: dict[str, Any] = {}

    def hook(module, args, kwargs):
        caught["args"], caught["kwargs"] = args, dict(kwargs)
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        hf(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not caught:
        raise RuntimeError("the model's forward pass never reached decoder layer 0")
    args, kwargs = caught["args"], caught["kwargs"]
    if args:
        return args[0], tuple(args[1:]), kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def _same(a: Any, b: Any) -> bool:
    """Whether two caught layer arguments are interchangeable (tensors compared by value)."""
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, bool | int | float | str) and type(a) is type(b):
        return a == b
    return False


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    for key in ("input", "x", "hidden_states"):
        if key in kwargs:
            return kwargs[key]
    return next(v for v in kwargs.values() if isinstance(v, Tensor))


def _first_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple | list) else out


# --------------------------------------------------------------------------------------------
# Traversal
# --------------------------------------------------------------------------------------------


class LayerContext:
    """What :func:`sequential_layerwise` hands to its callback for one decoder layer.

    The layer's inputs (for every calibration window) are those produced by the already
    processed layers ``0 .. index-1``.  Tokens are ordered window by window: token ``t`` of a
    collected ``[tokens, d]`` tensor is position ``t % seqlen`` of window ``t // seqlen``.

    Attributes
    ----------
    index : int
        Decoder layer index.
    layer : nn.Module
        The decoder layer module (a TransformerLens ``BlockBridge`` on a bridged model).
        Calling it runs whatever modules are currently in place.
    model : LoadedModel
        The model being processed.
    device : torch.device
        Where the layer runs.
    """

    def __init__(
        self,
        model,
        index: int,
        layer: nn.Module,
        hidden: Tensor,
        extras: list[tuple[tuple, dict]],
        slices: list[slice],
        device: torch.device,
    ) -> None:
        self.model = model
        self.index = index
        self.layer = layer
        self.device = device
        self._hidden = hidden  # [n_windows, seqlen, d_model], storage device
        self._extras = extras  # per batch: (extra positional args, kwargs)
        self._slices = slices

    # ------------------------------------------------------------------ sizes
    @property
    def n_windows(self) -> int:
        return self._hidden.shape[0]

    @property
    def seqlen(self) -> int:
        return self._hidden.shape[1]

    @property
    def n_tokens(self) -> int:
        """Calibration tokens seen by this layer (``n_windows * seqlen``)."""
        return self.n_windows * self.seqlen

    @property
    def n_batches(self) -> int:
        return len(self._slices)

    # ------------------------------------------------------------------ inputs
    def hidden_states(self) -> Tensor:
        """The layer's inputs ``[n_windows, seqlen, d_model]``.

        A view of the driver's buffer, which is overwritten by the layer's outputs after the
        callback returns: ``clone()`` it to keep it.
        """
        return self._hidden

    @property
    def bridge_block(self) -> nn.Module | None:
        """``model.bridge.blocks[index]`` (TransformerLens names), or None without a bridge."""
        bridge = getattr(self.model, "bridge", None)
        return None if bridge is None else bridge.blocks[self.index]

    def replace_linear(self, role: str, module: nn.Module) -> nn.Module:
        """Put ``module`` in place of the MLP linear ``role``; returns the module it replaces.

        On a bridged model this calls ``LinearBridge.set_original_component`` so that the
        TransformerLens hooks (``hook_pre`` ...) report the new module's outputs; assigning
        to the HF attribute instead would leave the hooks reporting the old module's values.
        Later passes of the traversal (including the propagation to the next layer) run the
        new module.  ``module`` takes ``[..., in]`` and returns ``[..., out]``.
        """
        return replace_linear(self.model, self.index, role, module)

    def linears(self) -> dict[str, nn.Module]:
        """:func:`layer_linears` of this layer."""
        return layer_linears(self.model, self.index)

    def targets(self, targets: str | Sequence[str] = "mlp") -> dict[str, nn.Module]:
        """:func:`resolve_targets` of this layer."""
        return resolve_targets(self.model, self.index, targets)

    # ------------------------------------------------------------------ running
    def forward_batch(self, i: int) -> Tensor:
        """Run the layer on calibration batch ``i``; returns its output ``[b, seqlen, d_model]``."""
        x = self._hidden[self._slices[i]].to(self.device, non_blocking=True)
        args, kwargs = self._extras[i]
        with torch.no_grad():
            return _first_output(self.layer(x, *args, **kwargs))

    def run(
        self,
        input_hooks: Mapping[nn.Module, Callable[[Tensor], None]] | None = None,
        output_hooks: Mapping[nn.Module, Callable[[Tensor], None]] | None = None,
        batches: Iterable[int] | None = None,
        stop: bool = False,
    ) -> None:
        """Run the layer over the calibration batches, feeding hooks; outputs are discarded.

        Parameters
        ----------
        input_hooks : mapping nn.Module -> callable, optional
            ``fn(x)`` is called with the input ``x: [batch, seqlen, in]`` of the module every
            time it is called (a forward pre-hook; works on unwrapped modules and on bridge
            wrappers alike).
        output_hooks : mapping nn.Module -> callable, optional
            ``fn(y)`` is called with the module's output (the first element of a tuple).
        batches : iterable of int, optional
            Batch indices to run (default all).
        stop : bool
            A hook may end a batch's forward early by raising ``_StopForward``.
        """
        handles = []
        try:
            for module, fn in (input_hooks or {}).items():
                handles.append(
                    module.register_forward_pre_hook(
                        lambda m, a, k, fn=fn: fn(_first_tensor(a, k)), with_kwargs=True
                    )
                )
            for module, fn in (output_hooks or {}).items():
                handles.append(
                    module.register_forward_hook(lambda m, a, o, fn=fn: fn(_first_output(o)))
                )
            for i in range(self.n_batches) if batches is None else batches:
                try:
                    self.forward_batch(i)
                except _StopForward:
                    if not stop:
                        raise
        finally:
            for h in handles:
                h.remove()

    def collect_inputs(
        self,
        modules: Mapping[str, nn.Module],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stop_after: str | None = None,
    ) -> dict[str, Tensor]:
        """Inputs of chosen modules over all calibration tokens, in one pass of the layer.

        Each input is written into one preallocated buffer (no concatenation copy); batch
        ``i`` fills rows ``token_bounds[i] : token_bounds[i + 1]``.

        Parameters
        ----------
        modules : mapping name -> nn.Module
            E.g. ``ctx.targets(["gate"])``.
        device, dtype : optional
            Where / how to store the result (default: the activations' device and dtype).
        stop_after : str, optional
            Interrupt each batch's forward right after this module's input is caught (saves
            the rest of the layer).  Only safe on a model without bridge wrappers (inside
            :func:`~wasserstein_neurons.bridge.native_modules`), whose hook bookkeeping would
            be left half-done.

        Returns
        -------
        dict[str, Tensor]
            Name -> ``[n_tokens, in]`` (window-major token order).
        """
        return self._collect(modules, device, dtype, outputs=False, stop_after=stop_after)

    def collect_outputs(
        self,
        modules: Mapping[str, nn.Module],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, Tensor]:
        """Outputs ``[n_tokens, out]`` of chosen modules (see :meth:`collect_inputs`)."""
        return self._collect(modules, device, dtype, outputs=True)

    @property
    def token_bounds(self) -> list[int]:
        """Token offsets of the calibration batches in a collected tensor:
        ``[0, b_1, ..., n_tokens]``."""
        bounds = [0]
        for sl in self._slices:
            bounds.append(bounds[-1] + (sl.stop - sl.start) * self.seqlen)
        return bounds

    def _collect(self, modules, device, dtype, outputs: bool, stop_after=None):
        bufs: dict[str, Tensor] = {}
        filled = dict.fromkeys(modules, 0)

        def keep(name: str) -> Callable[[Tensor], None]:
            def fn(x: Tensor) -> None:
                x = x.detach().reshape(-1, x.shape[-1])
                if name not in bufs:
                    bufs[name] = torch.empty(
                        self.n_tokens, x.shape[1], dtype=dtype or x.dtype, device=device or x.device
                    )
                a = filled[name]
                bufs[name][a : a + x.shape[0]] = x
                filled[name] = a + x.shape[0]
                if name == stop_after:
                    raise _StopForward

            return fn

        hooks = {m: keep(n) for n, m in modules.items()}
        self.run(
            **{"output_hooks" if outputs else "input_hooks": hooks}, stop=stop_after is not None
        )
        short = [n for n in modules if filled[n] != self.n_tokens]
        if short:
            raise RuntimeError(
                f"layer {self.index}: module(s) {short} received {[filled[n] for n in short]} of "
                f"{self.n_tokens} calibration tokens (never called by the layer's forward? "
                "replaced outside the bridge? see LinearBridge.set_original_component)"
            )
        return bufs

    def call_groups(self, modules: Mapping[str, nn.Module]) -> list[list[str]]:
        """Order in which the layer calls ``modules``, grouped by shared input.

        Runs the layer on the first calibration batch.  Consecutive modules that receive the
        very same input tensor (e.g. Llama's ``gate`` and ``up``, or ``q``/``k``/``v``) form one
        group: modifying one of them cannot change the inputs of the others.  Modules that
        are never called are left out.

        Returns
        -------
        list of list of str
            E.g. ``[["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ["self_attn.o_proj"], ["gate", "up"], ["down"]]``.
        """
        calls: list[tuple[str, Tensor]] = []
        seen: set[str] = set()

        def record(name: str) -> Callable[[Tensor], None]:
            def fn(x: Tensor) -> None:
                if name not in seen:
                    seen.add(name)
                    calls.append((name, x))  # keeps x alive: data_ptr comparisons are safe

            return fn

        self.run(input_hooks={m: record(n) for n, m in modules.items()}, batches=[0])
        groups: list[list[str]] = []
        prev: Tensor | None = None
        for name, x in calls:
            same = (
                prev is not None
                and x.data_ptr() == prev.data_ptr()
                and x.shape == prev.shape
                and x.stride() == prev.stride()
                and x.dtype == prev.dtype
            )
            if same:
                groups[-1].append(name)
            else:
                groups.append([name])
                prev = x
        return groups

    def _propagate(self) -> None:
        """Replace the stored inputs by the layer's outputs (the next layer's inputs)."""
        for i, sl in enumerate(self._slices):
            out = self.forward_batch(i)
            self._hidden[sl] = out.to(self._hidden.device, self._hidden.dtype)

    def __repr__(self) -> str:
        return (
            f"LayerContext(index={self.index}, n_windows={self.n_windows}, "
            f"seqlen={self.seqlen}, n_batches={self.n_batches}, device={str(self.device)!r})"
        )


def _check_windows(windows: Tensor) -> Tensor:
    windows = torch.as_tensor(windows)
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
        raise ValueError(
            f"windows must be token ids [n_windows, seqlen], got {tuple(windows.shape)}"
        )
    if windows.is_floating_point():
        raise ValueError("windows must hold integer token ids")
    return windows.long()


def resolve_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """Sorted unique layer indices (all ``n_layers`` for ``None``); ValueError out of range."""
    if layers is None:
        return list(range(n_layers))
    chosen = sorted({int(layer) for layer in layers})
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range [0, {n_layers})")
    return chosen


def sequential_layerwise(
    model,
    windows: Tensor,
    process_layer: Callable[[LayerContext], None],
    *,
    layers: Iterable[int] | None = None,
    batch_size: int = 8,
    offload: bool = False,
    progress: bool = True,
    desc: str = "layers",
) -> None:
    r"""Call ``process_layer`` on every decoder layer, in order, with sequential inputs.

    Algorithm::

        H_0 = inputs of decoder layer 0 for every window       # one truncated forward/batch
        for l in 0 .. L_last:
            if l in layers: process_layer(ctx_l)              # ctx_l sees H_l
            if l < L_last: H_{l+1} = layer_l(H_l)             # with the modules now in place

    so the inputs of layer :math:`l` come from the already processed layers.  The extra
    layer arguments (attention mask, position ids / rotary embeddings) are caught from the
    model's own forward, so the layer is called exactly as the full model calls it.

    Parameters
    ----------
    model : LoadedModel
        From :func:`~wasserstein_neurons.models.load_model` (bridged or not).  Put in eval
        mode for the duration of the call.
    windows : LongTensor, shape ``[n_windows, seqlen]``
        Calibration token ids (e.g. :func:`~wasserstein_neurons.data.calibration_windows`).
    process_layer : callable ``(LayerContext) -> None``
        Called once per processed layer.  It may run the layer with hooks
        (:meth:`LayerContext.run`, :meth:`LayerContext.collect_inputs`), change weights in
        place, or swap modules (:meth:`LayerContext.replace_linear`, which goes through
        ``LinearBridge.set_original_component`` so hooks see the new outputs).
    layers : iterable of int, optional
        Layers to hand to ``process_layer`` (default all).  The traversal stops after the
        last of them; earlier layers are only propagated through.
    batch_size : int
        Windows per forward call.
    offload : bool
        Keep the ``[n_windows, seqlen, d_model]`` buffer on the CPU instead of the model's
        device (batches are moved to the device as they are run).
    progress : bool
        Show a tqdm progress bar over layers.
    desc : str
        Progress bar label.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = _check_windows(windows)
    hf = model.hf_model
    adapter = model.adapter
    decoder = adapter.decoder_layers(hf)
    chosen = resolve_layers(layers, len(decoder))
    if not chosen:
        return
    device = compute_device(hf)
    storage = torch.device("cpu") if offload else device
    n, seqlen = windows.shape
    slices = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    was_training = hf.training
    hf.eval()
    try:
        hidden, extras = _catch_inputs(hf, decoder[0], windows, slices, device, storage)
        wanted = set(chosen)
        bar = tqdm(range(chosen[-1] + 1), desc=desc, disable=not progress, leave=False)
        weights = getattr(model, "offload", None)  # offloaded layers: pin the current one
        for index in bar:
            with layer_resident(weights, index):
                ctx = LayerContext(model, index, decoder[index], hidden, extras, slices, device)
                if index in wanted:
                    process_layer(ctx)
                if index < chosen[-1]:
                    ctx._propagate()
        bar.close()
    finally:
        hf.train(was_training)


@torch.no_grad()
def _catch_inputs(
    hf: nn.Module,
    layer0: nn.Module,
    windows: Tensor,
    slices: list[slice],
    device: torch.device,
    storage: torch.device,
) -> tuple[Tensor, list[tuple[tuple, dict]]]:
    """Step 1: layer 0's hidden states ``[n_windows, seqlen, d_model]`` on ``storage`` and, per
    batch, the extra layer arguments ``(args, kwargs)``.

    The extras depend on the batch shape only, so equal ones are shared between batches (one
    copy of the rotary embeddings per distinct batch size, not one per batch).
    """
    n, seqlen = windows.shape
    hidden: Tensor | None = None
    extras: list[tuple[tuple, dict]] = []
    by_size: dict[int, list[tuple[tuple, dict]]] = {}
    for sl in slices:
        h, args, kwargs = _catch_layer0(hf, layer0, windows[sl].to(device))
        if hidden is None:
            hidden = torch.empty((n, seqlen, h.shape[-1]), dtype=h.dtype, device=storage)
        hidden[sl] = h.to(storage)
        candidates = by_size.setdefault(sl.stop - sl.start, [])
        shared = next((c for c in candidates if _same(c[0], args) and _same(c[1], kwargs)), None)
        if shared is None:
            shared = (args, kwargs)
            candidates.append(shared)
        extras.append(shared)
    return hidden, extras
