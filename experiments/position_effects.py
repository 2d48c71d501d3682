"""How much of the Wasserstein-neuron ranking is a window-start (attention-sink) effect.

For every layer of an activation store (by default: capture the ``rank`` defaults of the
embedded model, 32,768 tokens in 512-token windows, no BOS), the per-neuron statistics are
computed with the first 0, 1 and 4 positions of each window left out
(``rank --exclude-positions N``), and the script prints per layer:

- ``overlap_1`` / ``overlap_4``: how many of the top-p% WD neurons (the Wasserstein neurons)
  with nothing excluded stay Wasserstein neurons when the first 1 / 4 positions are left out;
- ``med_wd_0`` / ``_1`` / ``_4``: the median WD of the Wasserstein neurons under each setting;
- ``artefact_0`` / ``_1`` / ``_4``: how many Wasserstein neurons have ``position_artefact``
  (``first_pos_share > 0.5``: most of their top 0.1% |z| tokens are the window's first
  counted token, position N).

Then it lists the Wasserstein neurons (nothing excluded) that are mostly a position effect:
flagged ``position_artefact``, with their WD, ``first_pos_share``, WD without the first
position and whether they are still Wasserstein neurons then.

    python experiments/position_effects.py [--store runs/rank/activations] [--layers 0,5,29]
        [--exclude 0,1,4] [--top-percent 3] [--csv out.csv]

``--store`` reuses the activation store of a ``rank`` run, so the capture is not repeated.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from wasserstein_neurons import ActivationStore
from wasserstein_neurons.capture import hook_layer
from wasserstein_neurons.ranking import statistics_table, top_neurons


def capture_default(folder: Path) -> ActivationStore:
    """The ``rank`` defaults' store of the embedded model (32,768 tokens, seqlen 512)."""
    from wasserstein_neurons import capture_activations, load_model, load_tokens, sample_windows

    model = load_model()
    tokens = load_tokens(model.tokenizer, "embedded", "calibration")
    windows = sample_windows(tokens, 32768, 512, seed=0)
    return capture_activations(model, windows, folder / "activations", progress=True)


def layer_tables(store: ActivationStore, hook: str, excludes, top_percent: float):
    """``{N: (table, top)}``: the hook's statistics without the first N positions."""
    arr = store.array(hook)
    out = {}
    for n in excludes:
        table = statistics_table(arr, hook, selection=store.select(exclude_positions=n))
        out[n] = (table, top_neurons(table, top_percent))
    return out


def layer_row(hook: str, tables: dict, excludes) -> dict:
    """One line of the per-layer summary."""
    base = set(tables[excludes[0]][1]["neuron"])
    row = {"layer": hook_layer(hook), "n_top": len(base)}
    for n in excludes[1:]:
        row[f"overlap_{n}"] = len(base & set(tables[n][1]["neuron"]))
    for n in excludes:
        row[f"med_wd_{n}"] = float(np.median(tables[n][1]["wd"]))
    for n in excludes:
        row[f"artefact_{n}"] = int(tables[n][1]["position_artefact"].sum())
    return row


def artefact_rows(tables: dict, excludes) -> list[dict]:
    """The Wasserstein neurons (first setting) flagged ``position_artefact``."""
    table0, top0 = tables[excludes[0]]
    flagged = top0[top0["position_artefact"]]
    rows = []
    for r in flagged.itertuples():
        row = {"layer": r.layer, "neuron": r.neuron, "wd": r.wd}
        row["first_pos_share"] = r.first_pos_share
        row["wd_rank"] = int((table0["wd"] > r.wd).sum())
        if len(excludes) > 1:
            table1, top1 = tables[excludes[1]]
            row[f"wd_excl{excludes[1]}"] = float(table1.set_index("neuron").loc[r.neuron, "wd"])
            row[f"still_top_excl{excludes[1]}"] = bool(r.neuron in set(top1["neuron"]))
        rows.append(row)
    return rows


def run(store: ActivationStore, layers, excludes, top_percent: float):
    hooks = [h for h in store.hook_names if layers is None or hook_layer(h) in layers]
    if not hooks:
        raise SystemExit(f"error: no hook of the store is in layers {sorted(layers)}")
    summary, artefacts = [], []
    for hook in hooks:
        tables = layer_tables(store, hook, excludes, top_percent)
        summary.append(layer_row(hook, tables, excludes))
        artefacts.extend(artefact_rows(tables, excludes))
        print(f"done {hook}", file=sys.stderr, flush=True)
    return pd.DataFrame(summary), pd.DataFrame(artefacts)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, e.g. 0,1,4; got {text!r}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=None, help="activation store folder of a rank run")
    p.add_argument("--layers", type=_ints, default=None, help="e.g. 0,5,29 (default: all)")
    p.add_argument("--exclude", type=_ints, default=[0, 1, 4], help="positions left out")
    p.add_argument("--top-percent", type=float, default=3.0)
    p.add_argument("--csv", default=None, help="also write the per-layer table here")
    args = p.parse_args()
    if len(args.exclude) < 2 or args.exclude[0] != 0:
        p.error("--exclude needs 0 first and at least one more setting, e.g. 0,1,4")
    with tempfile.TemporaryDirectory() as tmp:
        store = ActivationStore.open(args.store) if args.store else capture_default(Path(tmp))
        summary, artefacts = run(store, args.layers, args.exclude, args.top_percent)
    with pd.option_context("display.width", 160, "display.max_rows", 500):
        top = f"top {args.top_percent:g}% WD per layer"
        print(f"Wasserstein neurons ({top}), {store.n_tokens} tokens, seqlen {store.seqlen}")
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        total = summary.filter(like="overlap_").sum()
        n_top = int(summary["n_top"].sum())
        for name, value in total.items():
            print(f"{name}: {int(value)} of {n_top} Wasserstein neurons kept")
        print("\nWasserstein neurons whose tail is mostly window-start tokens")
        print("(position_artefact: first_pos_share > 0.5, nothing excluded):")
        if artefacts.empty:
            print("(none)")
        else:
            print(artefacts.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.csv:
        summary.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
