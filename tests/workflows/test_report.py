"""``build_report`` / ``wasserstein-neurons report`` on a small real rank run (tiny Llama)."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import jsonschema
import numpy as np
import pandas as pd
import pytest

from wasserstein_neurons import plotting
from wasserstein_neurons.capture import ActivationStore
from wasserstein_neurons.cli import main
from wasserstein_neurons.dashboard import SCHEMA
from wasserstein_neurons.runs import RunExistsError, RunFolderError
from wasserstein_neurons.workflows import ExpandConfig, RankConfig, run_expand, run_rank
from wasserstein_neurons.workflows.report import ReportConfig, build_report, parse_neurons

SPAN = re.compile(r"<span class=\"?([pn])(?: x\")? style=--a:([0-9.]+) data-a=([-+0-9.e]+)>")


@pytest.fixture(scope="module")
def site(report_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "site"
    cfg = ReportConfig(
        run=str(report_runs["rank"]),
        out=str(out),
        disentangle=str(report_runs["disentangle"]),
        neurons="0:5,1:7",
        top_k=4,
    )
    return cfg, build_report(cfg, progress=False)


def _top(run_dir) -> pd.DataFrame:
    table = pd.read_csv(run_dir / "neurons.csv")
    return table[table["is_top"]]


def test_pages_for_every_wasserstein_neuron_and_the_extra_ones(site, report_runs):
    cfg, result = site
    top = _top(report_runs["rank"])
    assert len(top) == 2 * 6  # 5% of 128 per layer
    want = {f"{r.layer}_{r.neuron}" for r in top.itertuples()} | {"0_5", "1_7"}
    plotted = np.load(report_runs["disentangle"] / "top_neuron_outputs.npz")["neurons"]
    want |= {f"1_{int(j)}" for j in plotted}
    html = {p.stem for p in (result.out / "neurons").glob("*.html")}
    records = {p.stem for p in (result.out / "neurons").glob("*.json")}
    assert html == records == want and result.pages == len(want)
    config = json.loads((result.out / "config.json").read_text())
    assert config["finished"] and config["command"] == "report" and config["pages"] == len(want)
    index = (result.out / "index.html").read_text()
    for r in top.itertuples():
        assert f'href="neurons/{r.layer}_{r.neuron}.html"' in index
    assert "http://" not in index.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in index


def test_records_follow_the_schema_and_hold_the_stored_activations(site, report_runs):
    _, result = site
    assert json.loads((result.out / "neuron_record.schema.json").read_text()) == SCHEMA
    store = ActivationStore.open(report_runs["rank"] / "activations")
    seqlen = store.seqlen
    for path in sorted((result.out / "neurons").glob("*.json")):
        rec = json.loads(path.read_text())
        jsonschema.validate(rec, SCHEMA)
        extra = rec["wasserstein_neurons"]
        column = np.asarray(store.array(extra["hook"])[:, extra["neuron"]], dtype=np.float64)
        for key in ("most_positive_activation_records", "most_negative_activation_records"):
            for ar, origin in zip(rec[key], extra["records"][key], strict=True):
                rows = origin["window"] * seqlen + origin["start"] + np.arange(len(ar["tokens"]))
                np.testing.assert_allclose(ar["activations"], column[rows], atol=1e-5)
                assert rows[origin["target"]] == origin["position"]
        # the top records are the largest outputs, the bottom ones the smallest
        top = [
            r["activations"][o["target"]]
            for r, o in zip(
                rec["most_positive_activation_records"],
                extra["records"]["most_positive_activation_records"],
                strict=True,
            )
        ]
        np.testing.assert_allclose(top, np.sort(column)[::-1][:4], atol=1e-5)
        assert rec["mean"] == pytest.approx(column.mean(), rel=1e-6)
        bounds = rec["quantile_boundaries"]
        for b, records in enumerate(rec["random_sample_by_quantile"]):
            origins = extra["records"]["random_sample_by_quantile"][b]
            for ar, o in zip(records, origins, strict=True):
                value = ar["activations"][o["target"]]
                assert bounds[b] - 1e-5 <= value <= bounds[b + 1] + 1e-5  # 5-decimal JSON


def test_token_shading_equals_the_stored_activations(site, report_runs):
    _, result = site
    store = ActivationStore.open(report_runs["rank"] / "activations")
    table = pd.read_csv(report_runs["rank"] / "neurons.csv")
    top = _top(report_runs["rank"]).iloc[0]
    page = (result.out / "neurons" / f"{top.layer}_{top.neuron}.html").read_text()
    column = np.asarray(store.array(top.hook)[:, top.neuron], dtype=np.float64)
    row = table[(table["hook"] == top.hook) & (table["neuron"] == top.neuron)].iloc[0]
    n_ctx = 0
    for div in re.finditer(r'<div class="ctx" data-position="(\d+)">(.*?)</div>', page):
        pos = int(div.group(1))
        spans = SPAN.findall(div.group(2))
        values = np.array([float(a) for _, _, a in spans])
        window_start = pos - pos % store.seqlen
        start = max(window_start, pos - 12)  # context_before default
        np.testing.assert_allclose(values, column[start : start + len(values)], rtol=1e-4)
        z = (values - row["mean"]) / row["std"]
        assert [s for s, _, _ in spans] == ["p" if v >= 0 else "n" for v in z]
        n_ctx += 1
    assert n_ctx == 4 + 4 + 8 * 2  # top_k per tail and 2 per quantile bin
    assert page.count("<svg") >= 3 and 'class="chart hist-log"' in page


def test_disentangle_section_shows_the_runs_numbers(site, report_runs):
    _, result = site
    dis = pd.read_csv(report_runs["disentangle"] / "neurons.csv").set_index("neuron")
    plotted = int(np.load(report_runs["disentangle"] / "top_neuron_outputs.npz")["neurons"][0])
    page = (result.out / "neurons" / f"1_{plotted}.html").read_text()
    assert "disentangle run" in page and 'class="chart overlay-dist"' in page
    assert 'class="chart by-expert"' in page and "expert 1:" in page
    assert f"{dis.loc[plotted, 'ri_k2']:.4g}" in page
    layer0 = next((result.out / "neurons").glob("0_*.html")).read_text()
    assert "disentangle run" not in layer0  # another layer


def test_expand_run_joins_index_and_pages(report_runs, tiny_dir, corpus, tmp_path):
    cfg = ExpandConfig(
        out=str(tmp_path / "expand"),
        model=str(tiny_dir),
        dataset=str(corpus),
        seqlen=32,
        eval_tokens=128,
        nsamples=6,
        experts=2,
        kmeans_restarts=1,
        min_cluster_tokens=0,
        sparsity=0.5,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run_expand(cfg, progress=False)
    rep = ReportConfig(run=str(report_runs["rank"]), out=str(tmp_path / "site"), expand=cfg.out)
    out = build_report(rep, progress=False).out
    index = (out / "index.html").read_text()
    assert "Sparse Expansion run" in index
    assert f"{results['perplexity'].iloc[0]:.4g}" in index
    layers = pd.read_csv(tmp_path / "expand" / "layers.csv")
    page = next((out / "neurons").glob("1_*.html")).read_text()
    row = layers[(layers["layer"] == 1) & (layers["method"] == "sparse_expansion")].iloc[0]
    assert "Sparse Expansion of layer 1" in page and f"{row['rel_error']:.4g}" in page


def test_refuses_an_existing_site_and_overwrites_stale_pages(site, tmp_path):
    cfg, result = site
    copy = tmp_path / "copy"
    shutil.copytree(result.out, copy)
    (copy / "neurons" / "9_9.html").write_text("stale")
    with pytest.raises(RunExistsError, match="--overwrite"):
        build_report(ReportConfig(run=cfg.run, out=str(copy)), progress=False)
    assert (copy / "neurons" / "9_9.html").exists()
    build_report(ReportConfig(run=cfg.run, out=str(copy), overwrite=True), progress=False)
    assert not (copy / "neurons" / "9_9.html").exists()
    assert not (copy / "neurons" / "0_5.html").exists()  # --neurons not asked this time


def test_never_overwrites_the_rank_run_it_reads(report_runs):
    rank = report_runs["rank"]
    before = (rank / "config.json").read_text()
    cfg = ReportConfig(run=str(rank), out=str(rank), overwrite=True)
    with pytest.raises(RunFolderError, match="holds a 'rank' run"):
        build_report(cfg, progress=False)
    assert (rank / "config.json").read_text() == before
    assert not (rank / "index.html").exists()


def test_pages_of_two_hooks_per_layer(tiny_dir, corpus, tmp_path):
    run = run_rank(
        RankConfig(
            out=str(tmp_path / "rank"),
            model=str(tiny_dir),
            dataset=str(corpus),
            tokens=256,
            seqlen=32,
            hooks="hook_pre,hook_pre_linear",
        ),
        progress=False,
    )
    out = build_report(ReportConfig(run=str(run.out), out=str(tmp_path / "site")), progress=False)
    names = {p.stem for p in (out.out / "neurons").glob("*.html")}
    top = run.top
    want = {f"{r.layer}_{r.hook.rsplit('.', 1)[1]}_{r.neuron}" for r in top.itertuples()}
    assert names == want and len(want) == 4 * 4  # 3% of 128 = 4 per hook, 2 hooks x 2 layers
    index = (out.out / "index.html").read_text()
    pages = json.loads(re.search(r'id="pages">(.*?)</script>', index).group(1))
    pre = top[top["hook"] == "blocks.0.mlp.hook_pre"].iloc[0]
    assert pages[f"0_{pre.neuron}"] == f"neurons/0_hook_pre_{pre.neuron}.html"


def test_missing_activation_store_is_a_clear_error(tiny_dir, corpus, tmp_path, capsys):
    run = run_rank(
        RankConfig(
            out=str(tmp_path / "rank"),
            model=str(tiny_dir),
            dataset=str(corpus),
            tokens=256,
            seqlen=32,
            keep_activations=False,
        ),
        progress=False,
    )
    with pytest.raises(FileNotFoundError, match="no activation store.*--no-keep-activations"):
        build_report(ReportConfig(run=str(run.out), out=str(tmp_path / "site")), progress=False)
    assert not (tmp_path / "site").exists()
    capsys.readouterr()  # the rank run's loading bars
    code = main(["report", str(run.out), "--out", str(tmp_path / "site"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "keep-activations" in err[0]


def test_cli_builds_a_site_and_rejects_bad_input(report_runs, tmp_path, capsys):
    rank = str(report_runs["rank"])
    assert main(["report", rank, "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert "neuron pages" in capsys.readouterr().out
    assert (tmp_path / "s" / "index.html").is_file()
    for bad, message in (
        (["--neurons", "5-3"], "layer:neuron"),
        (["--neurons", "7:1"], "layer 7 has no stored hook"),
        (["--neurons", "1:128"], "outside 0..127"),
        (["--top-k", "0"], "top_k"),
    ):
        code = main(["report", rank, "--out", str(tmp_path / "bad"), "--no-progress", *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (bad, err)
        assert not (tmp_path / "bad").exists()
    code = main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert code == 2 and "not a run folder" in capsys.readouterr().err


def test_parse_neurons():
    assert parse_neurons("5:123, 29:1397,") == [(5, 123), (29, 1397)]
    assert parse_neurons([(1, 2)]) == [(1, 2)]
    with pytest.raises(ValueError, match="layer:neuron"):
        parse_neurons("5:x")


def test_show_neuron_renders_the_view_inline(report_runs):
    top = _top(report_runs["rank"]).iloc[0]
    view = plotting.show_neuron(report_runs["rank"], int(top.layer), int(top.neuron), k=3)
    html = view._repr_html_()
    assert html.startswith('<div class="wn"><style>') and "<svg" in html
    assert f"Layer {top.layer} neuron {top.neuron}" in html
    assert len(SPAN.findall(html)) > 0
    with pytest.raises(ValueError, match="outside"):
        plotting.show_neuron(report_runs["rank"], 0, 999)
