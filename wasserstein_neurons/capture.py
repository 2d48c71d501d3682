"""Stream hook activations of a model to a disk-backed store.

For every requested TransformerLens hook, :func:`capture_activations` writes the hook's output
``[batch, pos, d]``, flattened to ``[tokens, d]``, into one ``.npy`` file per hook. Chunks are
appended with plain file writes as the forward passes go, so peak RAM is one batch of
activations, independent of how many tokens are captured. The files are opened later as
read-only memory maps (:class:`ActivationStore`), so analyses never need to re-run the model.

Store layout (``store_dir``)::

    meta.json           hooks, shapes, dtype, model name, seqlen, finished flag, whether a BOS
                        was prepended (``bos``) and the tokenizer's special ids
    tokens.npy          [n_windows, seqlen] int32 token ids (token t of the store is
                        tokens.reshape(-1)[t])
    <hook name>.npy     [n_tokens, d] float16 or float32, row t = token t

Precision
---------
Whatever the model's dtype, activations go to the store through a float32 copy. A float16
store holds a bfloat16 model's activations exactly (bfloat16's 8 significant bits fit in
float16's 11) but not its range: a value beyond float16's largest (65504) would be stored as
``inf`` and make that neuron's distance NaN. Capture therefore refuses, with a
``ValueError`` naming the hook, activations that do not fit the store (``--store-dtype
float32`` keeps them) and activations that are NaN or inf already (the model overflowed, e.g.
a float16 model). Statistics are computed from the store in float32 / float64
(:mod:`wasserstein_neurons.wasserstein`).

Token positions
---------------
Row ``t`` is position ``t % seqlen`` of window ``t // seqlen``; whether it is a special token
is read from ``tokens.npy``. Nothing per token is stored besides the token ids:
:meth:`ActivationStore.positions`, :meth:`~ActivationStore.window_index`,
:meth:`~ActivationStore.special_mask` derive their ``[n_tokens]`` arrays, and
:meth:`~ActivationStore.select` gives the rows left after excluding each window's first
positions and / or special tokens (:mod:`wasserstein_neurons.positions`).

Hook names
----------
``hooks`` accepts exact TransformerLens names (``blocks.3.mlp.hook_pre``), ``fnmatch`` patterns
(``blocks.*.mlp.hook_pre_linear``), or a bare hook kind (``hook_pre`` means
``blocks.*.mlp.hook_pre``).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .positions import RowSelection, select_rows, special_token_ids

DEFAULT_HOOKS = ("blocks.*.mlp.hook_pre",)
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")
_STORE_MAX = {np.float16: float(np.finfo(np.float16).max), np.float32: float("inf")}


class StoreExistsError(FileExistsError):
    """The target folder already holds a finished activation store."""


def hook_layer(name: str) -> int:
    """Layer index of a ``blocks.{l}.…`` hook name (``-1`` for hooks outside the blocks)."""
    match = _LAYER_RE.match(name)
    return int(match.group(1)) if match else -1


def resolve_hook_names(bridge, hooks: str | Sequence[str] | None = None) -> list[str]:
    """Expand names, patterns and bare kinds to concrete hook names, ordered by layer.

    Raises
    ------
    ValueError
        If a name or pattern matches no hook point; the message lists the valid MLP hooks.
    """
    if hooks is None:
        hooks = DEFAULT_HOOKS
    if isinstance(hooks, str):
        hooks = [h.strip() for h in hooks.split(",") if h.strip()]
    if not hooks:
        raise ValueError("no hook named: pass hook names, patterns or kinds (e.g. hook_pre)")
    available = list(bridge.hook_dict)
    resolved: list[str] = []
    for pattern in hooks:
        if "." not in pattern and "*" not in pattern:
            pattern = f"blocks.*.mlp.{pattern}"
        matches = [n for n in available if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            kinds = sorted(
                {
                    n.rsplit(".", 1)[1]
                    for n in available
                    if n.startswith("blocks.0.mlp.") and n.count(".") == 3
                }
            )
            raise ValueError(
                f"unknown hook {pattern!r}; valid MLP hooks are blocks.<layer>.mlp.<kind> with "
                f"layer in 0..{bridge.cfg.n_layers - 1} and kind in {', '.join(kinds)} "
                f"(bare kinds such as 'hook_pre' mean every layer)"
            )
        resolved.extend(m for m in matches if m not in resolved)
    return sorted(resolved, key=lambda n: (hook_layer(n), n))


def _file_name(hook: str) -> str:
    return f"{hook}.npy"


@dataclass
class ActivationStore:
    """Read access to a finished capture: memory-mapped ``[tokens, d]`` arrays per hook."""

    path: Path
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> ActivationStore:
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} holds no activation store (no meta.json)")
        meta = json.loads(meta_file.read_text())
        if not meta.get("finished"):
            raise RuntimeError(f"the activation store in {path} is incomplete (interrupted run)")
        return cls(path=path, meta=meta)

    @property
    def hook_names(self) -> list[str]:
        return list(self.meta["hooks"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def array(self, hook: str) -> np.ndarray:
        """``[n_tokens, d]`` read-only memory map of one hook's activations."""
        if hook not in self.meta["hooks"]:
            raise KeyError(f"hook {hook!r} not in store; stored hooks: {self.hook_names}")
        return np.load(self.path / _file_name(hook), mmap_mode="r")

    def tokens(self) -> np.ndarray:
        """``[n_tokens]`` token ids, aligned with the rows of every :meth:`array`."""
        return self.window_tokens().reshape(-1)

    def window_tokens(self) -> np.ndarray:
        """``[n_windows, seqlen]`` int32 token ids (``tokens.npy``)."""
        return np.load(self.path / "tokens.npy")

    @property
    def seqlen(self) -> int:
        return int(self.meta["seqlen"])

    @property
    def bos(self) -> bool:
        """Whether position 0 of every window is a prepended BOS token."""
        return bool(self.meta.get("bos", False))

    @property
    def special_ids(self) -> list[int] | None:
        """The tokenizer's special token ids recorded at capture (``None`` in older stores)."""
        ids = self.meta.get("special_ids")
        return None if ids is None else [int(i) for i in ids]

    def positions(self) -> np.ndarray:
        """``[n_tokens]`` int32: each row's position in its window (``t % seqlen``)."""
        return (np.arange(self.n_tokens, dtype=np.int64) % self.seqlen).astype(np.int32)

    def window_index(self) -> np.ndarray:
        """``[n_tokens]`` int32: each row's window (``t // seqlen``)."""
        return (np.arange(self.n_tokens, dtype=np.int64) // self.seqlen).astype(np.int32)

    def special_mask(self, special_ids=None) -> np.ndarray:
        """``[n_tokens]`` bool: the row is a special token (BOS, EOS, pad, ...)."""
        ids = self._special_ids(special_ids)
        return np.isin(self.tokens(), np.asarray(ids, dtype=np.int64))

    def select(
        self, exclude_positions: int = 0, exclude_special: bool = False, special_ids=None
    ) -> RowSelection:
        """The rows statistics keep without each window's first ``exclude_positions``
        positions and (``exclude_special``) its special tokens; see
        :func:`~wasserstein_neurons.positions.select_rows`. ``special_ids`` overrides the ids
        recorded in the store."""
        ids = self._special_ids(special_ids) if exclude_special else None
        return select_rows(self.window_tokens(), exclude_positions, ids)

    def _special_ids(self, special_ids=None) -> list[int]:
        ids = self.special_ids if special_ids is None else list(special_ids)
        if ids is None:
            raise ValueError(
                f"the activation store in {self.path} records no special token ids (made by an "
                "older version); capture it again or pass special_ids"
            )
        return ids

    def __iter__(self) -> Iterable[tuple[str, np.ndarray]]:
        for hook in self.hook_names:
            yield hook, self.array(hook)


class _NpyStreamWriter:
    """Write a ``[rows, cols]`` ``.npy`` file chunk by chunk with ordinary file writes."""

    def __init__(self, path: Path, rows: int, cols: int, dtype: np.dtype):
        self.path, self.rows, self.cols, self.dtype = path, rows, cols, np.dtype(dtype)
        self.written = 0
        self.file = open(path, "wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (rows, cols),
        }
        np.lib.format.write_array_header_1_0(self.file, header)

    def write(self, chunk: np.ndarray) -> None:
        if chunk.shape[1] != self.cols:
            raise ValueError(f"{self.path.name}: chunk width {chunk.shape[1]} != {self.cols}")
        if self.written + len(chunk) > self.rows:
            raise ValueError(f"{self.path.name}: more rows than the {self.rows} announced")
        self.file.write(np.ascontiguousarray(chunk, dtype=self.dtype).tobytes())
        self.written += len(chunk)

    def close(self) -> None:
        self.file.close()
        if self.written != self.rows:
            raise RuntimeError(f"{self.path.name}: wrote {self.written} of {self.rows} rows")


def _prepare_dir(store_dir: Path, overwrite: bool) -> None:
    if (store_dir / "meta.json").exists():
        meta = json.loads((store_dir / "meta.json").read_text())
        if meta.get("finished") and not overwrite:
            raise StoreExistsError(
                f"{store_dir} already holds a finished activation store; "
                "pass overwrite=True (CLI: --overwrite) to replace it"
            )
    if store_dir.exists():
        for f in store_dir.glob("*.npy"):
            f.unlink()
        (store_dir / "meta.json").unlink(missing_ok=True)
    store_dir.mkdir(parents=True, exist_ok=True)


def _check_capture_args(windows: torch.Tensor, batch_size: int, dtype: str) -> None:
    if dtype not in STORE_DTYPES:
        raise ValueError(f"unknown store dtype {dtype!r}; valid: {', '.join(STORE_DTYPES)}")
    if windows.ndim != 2:
        raise ValueError(f"windows must be [n_windows, seqlen], got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


@torch.no_grad()
def capture_activations(
    model,
    windows: torch.Tensor,
    store_dir: str | Path,
    hooks: str | Sequence[str] | None = None,
    batch_size: int = 8,
    dtype: str = "float16",
    overwrite: bool = False,
    progress: bool = True,
    bos: bool = False,
) -> ActivationStore:
    """Run ``windows`` through ``model.bridge`` and stream the hooks' outputs to ``store_dir``.

    Parameters
    ----------
    model:
        A :class:`~wasserstein_neurons.models.LoadedModel`.
    windows:
        ``[n_windows, seqlen]`` token ids; each window is one sequence (no BOS is added).
    store_dir:
        Output folder. A folder holding a finished store is refused unless ``overwrite``.
    hooks:
        Hook names / patterns / bare kinds (see module docstring); default every layer's
        ``mlp.hook_pre``.
    batch_size:
        Windows per forward pass. Peak memory ≈ ``batch_size·seqlen·Σ d_hook`` values.
    dtype:
        ``"float16"`` (default, half the disk) or ``"float32"``.
    bos:
        Recorded in ``meta.json``: the windows start with a prepended BOS
        (:func:`~wasserstein_neurons.data.prepend_bos`); nothing is added here.

    Returns
    -------
    ActivationStore
    """
    _check_capture_args(windows, batch_size, dtype)
    names = resolve_hook_names(model.bridge, hooks)
    store_dir = Path(store_dir)
    _prepare_dir(store_dir, overwrite)

    n_windows, seqlen = windows.shape
    n_tokens = n_windows * seqlen
    np.save(store_dir / "tokens.npy", windows.to(torch.int32).numpy())
    widths: dict[str, int] = {}
    writers: dict[str, _NpyStreamWriter] = {}
    np_dtype = STORE_DTYPES[dtype]

    def hook_fn(name: str):
        def fn(activation: torch.Tensor, hook) -> None:
            flat = activation.detach().reshape(-1, activation.shape[-1])
            if name not in writers:
                widths[name] = flat.shape[1]
                writers[name] = _NpyStreamWriter(
                    store_dir / _file_name(name), n_tokens, flat.shape[1], np_dtype
                )
            chunk = flat.to(torch.float32).cpu().numpy()
            _check_range(name, chunk, np_dtype)
            writers[name].write(chunk)

        return fn

    fwd_hooks = [(name, hook_fn(name)) for name in names]
    try:
        run_hooked(
            model, windows, fwd_hooks, batch_size=batch_size, progress=progress, desc="capture"
        )
    finally:
        for writer in writers.values():
            writer.file.close()
    _finish_writers(writers, names)
    meta = _write_meta(store_dir, model, names, widths, windows.shape, dtype, bos)
    return ActivationStore(path=store_dir, meta=meta)


@torch.no_grad()
def run_hooked(
    model,
    windows: torch.Tensor,
    fwd_hooks: Sequence[tuple[str, Callable]],
    *,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "forward",
) -> None:
    """Run ``windows`` through the (dense, unmodified-order) model with TransformerLens hooks.

    The one loop for "collect something from hook points over calibration windows": the
    activation store, the ablation's calibration statistics and the disentanglement analysis's
    linear inputs all go through it.  (Inputs of *sequentially* modified layers come from the
    layer loop, :mod:`wasserstein_neurons.layerwise`, instead.)  The forward stops after the
    last block a hook needs (:func:`_stop_hooks`): nothing after it runs, in particular not
    the LM head, whose ``[batch·seqlen, vocab]`` logits would otherwise be the largest
    tensor of the pass (403 MB for 2,048 tokens of a 49k vocabulary in float32).

    Parameters
    ----------
    model : LoadedModel
        Its ``bridge`` runs the batches on ``model.device``.
    windows : LongTensor, shape ``[n_windows, seqlen]``
        Token ids; each window is one sequence (no BOS is added).
    fwd_hooks : sequence of ``(hook_name, fn(activation, hook))``
        As for ``TransformerBridge.run_with_hooks``; ``activation`` is ``[batch, seqlen, d]``.
    batch_size : int
        Windows per forward pass.
    progress : bool
        tqdm bar over batches, labelled ``desc``.
    """
    stop, extra = _stop_hooks([name for name, _ in fwd_hooks], model.adapter.n_layers)
    fwd_hooks = list(fwd_hooks) + extra
    for start in tqdm(
        range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not progress
    ):
        batch = windows[start : start + batch_size].to(model.device)
        model.bridge.run_with_hooks(
            batch, fwd_hooks=fwd_hooks, return_type=None, stop_at_layer=stop
        )


def _stop_hooks(names: Sequence[str], n_layers: int) -> tuple[int | None, list]:
    """``(stop_at_layer, extra hooks)`` ending a forward after the last block that ``names``
    hook into: blocks after it are skipped by ``stop_at_layer``; when it is the final block,
    a hook on its ``hook_out`` raises TransformerLens' ``StopAtLayerException`` (caught by
    ``run_with_hooks``) so the final norm and LM head do not run.  A hook outside the blocks
    (embeddings, final norm) keeps the whole forward."""
    layers = [hook_layer(n) for n in names]
    if not layers or min(layers) < 0:
        return None, []
    last = max(layers)
    if last < n_layers - 1:
        return last + 1, []
    return None, [(f"blocks.{last}.hook_out", _stop_forward)]


def _stop_forward(activation: torch.Tensor, hook) -> None:
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    raise StopAtLayerException(activation)


def _check_range(name: str, chunk: np.ndarray, np_dtype) -> None:
    """``ValueError`` when ``chunk`` (float32 activations of hook ``name``) holds NaN / inf
    or values beyond what the store's ``np_dtype`` can hold (see the module docstring)."""
    if chunk.size == 0:
        return
    lo, hi = float(chunk.min()), float(chunk.max())  # NaN when any value is NaN
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(
            f"{name}: the model's activations hold NaN or inf values (a float16 model "
            "overflowing? try --dtype bfloat16 or float32)"
        )
    peak = max(-lo, hi)
    if peak > _STORE_MAX[np_dtype]:
        raise ValueError(
            f"{name}: activations up to {peak:.6g} do not fit the float16 activation store "
            f"(largest {_STORE_MAX[np_dtype]:g}); use --store-dtype float32"
        )


def _finish_writers(writers: dict, names) -> None:
    """Close every writer (each checks its row count); every hook must have fired."""
    for writer in writers.values():
        writer.close()
    missing = [n for n in names if n not in writers]
    if missing:
        raise RuntimeError(f"hooks never fired: {missing}")


def _write_meta(store_dir: Path, model, names, widths, shape, dtype: str, bos: bool) -> dict:
    """Write ``meta.json`` atomically (last: its ``finished`` flag marks a complete store)."""
    n_windows, seqlen = shape
    n_tokens = n_windows * seqlen
    meta = {
        "finished": True,
        "model": getattr(model, "name", None),
        "hooks": {n: {"shape": [n_tokens, widths[n]], "layer": hook_layer(n)} for n in names},
        "n_tokens": n_tokens,
        "n_windows": n_windows,
        "seqlen": seqlen,
        "dtype": dtype,
        "bos": bool(bos),
        "special_ids": special_token_ids(getattr(model, "tokenizer", None)),
    }
    tmp = store_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(store_dir / "meta.json")
    return meta


def remove_store(store_dir: str | Path) -> None:
    """Delete an activation store folder (its ``.npy`` files can be many GB)."""
    shutil.rmtree(store_dir, ignore_errors=True)
