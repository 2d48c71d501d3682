"""The ``report`` workflow: a static neuron dashboard from a ``rank`` run (and optionally an
``expand`` and a ``disentangle`` run).

:func:`build_report` reads the run folders and the rank run's activation store (never the
model; only its tokenizer, for token strings) and writes a self-contained site to ``cfg.out``
that opens from the file system (no server, no network, no CDN):

``index.html``                      the run (model, corpus, tokens, settings), the per-layer WD
                                    profile, the sortable / filterable table of Wasserstein
                                    neurons and a "layer:neuron" search box
``neurons/<layer>_<neuron>.html``   one page per Wasserstein neuron, per ``--neurons`` entry
                                    and per neuron whose outputs the disentangle run kept:
                                    statistics and rank, z-scored histogram vs N(0, 1) on a
                                    linear and a log count axis, Q–Q plot, top-k contexts at
                                    both tails and quantile-binned contexts with every token
                                    shaded by the neuron's output, and the expand / disentangle
                                    sections
``neurons/<layer>_<neuron>.json``   the neuron record (:mod:`wasserstein_neurons.dashboard.records`)
``neuron_record.schema.json``       the records' JSON Schema
``static/report.css``, ``.js``      the stylesheet and the index page's small script
``config.json``                     this config, page count, timings; written last

With several hooks per layer (``hook_pre,hook_pre_linear``) page names are
``<layer>_<kind>_<neuron>``. Pages are written as they are made, with a progress bar.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..capture import hook_layer
from ..dashboard import DisentangleRun, ExpandRun, RankRun, neuron_page, neuron_record
from ..dashboard.index import index_page
from ..dashboard.pages import static_text
from ..dashboard.records import SCHEMA
from ..runs import RunFolderError, RunPlan, check_out_path, folder_state, plan_run

__all__ = ["ReportConfig", "ReportResult", "build_report", "parse_neurons"]


def parse_neurons(text: str | Sequence) -> list[tuple[int, int]]:
    """``"5:123,29:1397"`` (or pairs) -> ``[(5, 123), (29, 1397)]``; ``ValueError`` if malformed."""
    if not isinstance(text, str):
        return [(int(a), int(b)) for a, b in text]
    pairs = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(
                f"--neurons takes layer:neuron pairs such as 5:123,29:1397; got {item!r}"
            )
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


@dataclass
class ReportConfig:
    """Knobs of a ``report`` (CLI flags of the same names).

    Attributes
    ----------
    run : str
        The ``rank`` run folder (with its ``activations/`` store).
    out : str
        Site folder; one that exists and is not empty is refused unless ``overwrite``.
    expand, disentangle : str or None
        Optional ``expand`` / ``disentangle`` run folders whose results join the pages.
    neurons : str or sequence of (layer, neuron)
        Extra pages besides the Wasserstein neurons (``"5:123,29:1397"``).
    top_k, per_quantile : int
        Contexts per tail; random contexts per quantile bin.
    context_before, context_after : int
        Tokens shown before / after the chosen token (within its window).
    tokenizer : str or None
        Tokenizer folder or name (default: the run's model's).
    seed : int
        Seeds the quantile-bin and random draws.
    """

    run: str = "runs/rank"
    out: str = "runs/site"
    expand: str | None = None
    disentangle: str | None = None
    neurons: str | Sequence = ""
    top_k: int = 8
    per_quantile: int = 2
    context_before: int = 12
    context_after: int = 4
    tokenizer: str | None = None
    seed: int = 0
    overwrite: bool = False

    def validate(self) -> None:
        for name in ("top_k", "per_quantile"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("context_before", "context_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        parse_neurons(self.neurons)

    def neuron_kwargs(self) -> dict:
        return dict(
            k=self.top_k,
            per_quantile=self.per_quantile,
            before=self.context_before,
            after=self.context_after,
            seed=self.seed,
        )


@dataclass
class ReportResult:
    out: Path
    pages: int
    seconds: dict
    bytes: int


def _plan_site(cfg: ReportConfig) -> RunPlan:
    """What the report may do with ``cfg.out`` (:func:`~wasserstein_neurons.runs.plan_run`:
    a run folder is refused unless ``overwrite``, a folder of other files always), decided
    before anything is written. A run folder of another command is refused even with
    ``overwrite``: ``--out`` pointing at the rank run must not replace the run it reads."""
    state = folder_state(check_out_path(cfg.out))
    if state.command not in (None, "report"):
        raise RunFolderError(
            f"{state.path} holds a {state.command!r} run; choose another --out for the site"
        )
    return plan_run(cfg.out, "report", asdict(cfg), overwrite=cfg.overwrite)


def _write_static(out: Path) -> None:
    """The stylesheet, the index page's script and the records' JSON Schema."""
    (out / "neurons").mkdir(exist_ok=True)
    (out / "static").mkdir(exist_ok=True)
    for name in ("report.css", "report.js"):
        (out / "static" / name).write_text(static_text(name), encoding="utf-8")
    (out / "neuron_record.schema.json").write_text(json.dumps(SCHEMA, indent=2))


def _page_list(run: RankRun, cfg: ReportConfig, dis: DisentangleRun | None):
    """``{hook: [neurons]}`` of every page and the extra (non-Wasserstein) pages in order."""
    table = run.table
    pages: dict[str, list[int]] = {}
    for hook, group in table[table["is_top"].astype(bool)].groupby("hook", sort=False):
        pages[hook] = sorted(int(n) for n in group["neuron"])
    extra = [(run.hook_for(layer), neuron) for layer, neuron in parse_neurons(cfg.neurons)]
    if dis is not None and dis.hook in run.store.hook_names:
        extra += [(dis.hook, n) for n in dis.plotted]
    for hook, neuron in extra:
        run.stats(hook, neuron)  # validates the neuron index
        if neuron not in pages.setdefault(hook, []):
            pages[hook].append(neuron)
    order = {h: i for i, h in enumerate(run.store.hook_names)}
    return dict(sorted(pages.items(), key=lambda kv: order[kv[0]])), list(dict.fromkeys(extra))


def _page_ids(run: RankRun, pages: dict[str, list[int]]) -> dict[tuple[str, int], str]:
    per_layer = {}
    for hook in run.store.hook_names:
        per_layer.setdefault(hook_layer(hook), []).append(hook)
    multi = any(len(v) > 1 for v in per_layer.values())
    ids = {}
    for hook, neurons in pages.items():
        kind = hook.rsplit(".", 1)[-1]
        for n in neurons:
            ids[(hook, n)] = (
                f"{hook_layer(hook)}_{kind}_{n}" if multi else f"{hook_layer(hook)}_{n}"
            )
    return ids


def _run_summary(run: RankRun) -> dict:
    c = run.config
    return {
        "path": str(run.path),
        "model": c.get("model"),
        "corpus": c.get("corpus"),
        "n_tokens": c.get("n_tokens"),
        "n_tokens_kept": c.get("n_tokens_kept"),
    }


def _write_pages(run, pages, ids, cfg, overlays, out: Path, progress: bool) -> None:
    """Every neuron page and record, one hook's columns read at a time."""
    total = sum(len(v) for v in pages.values())
    summary = _run_summary(run)
    bar = tqdm(total=total, desc="neuron pages", unit="page", disable=not progress)
    for hook, neurons in pages.items():
        order = np.sort(np.asarray(neurons, dtype=np.int64))
        block = np.asarray(run.store.array(hook)[:, order], dtype=np.float32)
        for col, neuron in enumerate(order.tolist()):
            data = run.neuron(hook, neuron, column=block[:, col], **cfg.neuron_kwargs())
            data.stats["page_id"] = ids[(hook, neuron)]
            for name, section in overlays.items():
                data.overlays[name] = section(hook, neuron)
            (out / "neurons" / f"{data.page_id}.html").write_text(
                neuron_page(data), encoding="utf-8"
            )
            record = neuron_record(data, run=summary)
            (out / "neurons" / f"{data.page_id}.json").write_text(json.dumps(record))
            bar.update()
    bar.close()


def build_report(cfg: ReportConfig, tokenizer=None, progress: bool = True) -> ReportResult:
    """Write the static neuron dashboard of ``cfg.run`` to ``cfg.out`` (see the module docstring).

    ``tokenizer`` (an object) overrides ``cfg.tokenizer``. Raises ``FileNotFoundError`` for a
    missing run or activation store, ``ValueError`` for bad settings or run folders
    (:class:`~wasserstein_neurons.runs.RunFolderError` for an ``out`` holding other files or
    another command's run), and :class:`~wasserstein_neurons.runs.RunExistsError` for an
    ``out`` holding a site without ``overwrite`` — all before anything is written. With
    ``overwrite`` the old site is moved aside and deleted only once the new one is finished
    (put back if building fails).
    """
    cfg.validate()
    t0 = time.perf_counter()
    run = RankRun(cfg.run, tokenizer=tokenizer if tokenizer is not None else cfg.tokenizer)
    expand = ExpandRun(cfg.expand) if cfg.expand else None
    dis = DisentangleRun(cfg.disentangle) if cfg.disentangle else None
    pages, extra = _page_list(run, cfg, dis)
    src = _Sources(run, expand, dis, pages, _page_ids(run, pages), extra)
    run.decode  # noqa: B018 - load the tokenizer (and fail) before the site folder is made
    plan = _plan_site(cfg)
    with plan.start() as folder:
        return _build_site(cfg, src, folder, t0, progress)


@dataclass
class _Sources:
    """What the site is made of: the runs, the pages per hook, their ids, the extra pages."""

    run: RankRun
    expand: ExpandRun | None
    dis: DisentangleRun | None
    pages: dict[str, list[int]]
    ids: dict[tuple[str, int], str]
    extra: list[tuple[str, int]]


def _build_site(cfg: ReportConfig, src: _Sources, folder, t0: float, progress) -> ReportResult:
    """Write the pages, the index and (last) the finished ``config.json`` into ``folder``."""
    run, expand, dis, ids = src.run, src.expand, src.dis, src.ids
    out = folder.path
    _write_static(out)
    overlays = {}
    if dis is not None:
        overlays["disentangle"] = dis.section
    if expand is not None:
        overlays["expand"] = lambda hook, neuron: expand.section(hook_layer(hook))
    seconds = {"open": time.perf_counter() - t0}
    t0 = time.perf_counter()
    _write_pages(run, src.pages, ids, cfg, overlays, out, progress)
    seconds["pages"] = time.perf_counter() - t0
    links = {key: f"neurons/{pid}.html" for key, pid in ids.items()}
    search: dict[str, str] = {}
    for (hook, neuron), href in links.items():
        search.setdefault(f"{hook_layer(hook)}_{neuron}", href)
    sections = [expand.index_section()] if expand is not None else []
    if dis is not None:
        sections.append(dis.index_section(links))
    html = index_page(run.config, run.table, links, search, extra=src.extra, sections=sections)
    (out / "index.html").write_text(html, encoding="utf-8")
    n_pages = len(links)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    seconds["total"] = seconds["open"] + seconds["pages"]
    record = {
        "command": "report",
        "config": asdict(cfg),
        "pages": n_pages,
        "bytes": size,
        "rank_run": _run_summary(run),
        "seconds": seconds,
    }
    folder.finish(record)
    return ReportResult(out=out, pages=n_pages, seconds=seconds, bytes=size)
