"""Shared workflow settings: ``--bos`` windows keep the token counts asked for."""

from __future__ import annotations

import pytest
import torch

from wasserstein_neurons import load_model
from wasserstein_neurons.workflows import AblateConfig, EvalSettings, eval_windows_for, run_eval
from wasserstein_neurons.workflows.common import PositionSettings

SEQLEN, EVAL_TOKENS, NSAMPLES = 32, 128, 5


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir))


def settings(tiny_dir, corpus, **kw) -> dict:
    return dict(model=str(tiny_dir), dataset=str(corpus), seqlen=SEQLEN, **kw)


def test_bos_evaluation_windows_score_as_many_tokens(model, tiny_dir, corpus):
    plain = EvalSettings(**settings(tiny_dir, corpus, eval_tokens=EVAL_TOKENS))
    bos = EvalSettings(**settings(tiny_dir, corpus, eval_tokens=EVAL_TOKENS, bos=True))
    w0, w1 = eval_windows_for(model, plain), eval_windows_for(model, bos)
    assert w0.shape == w1.shape == (EVAL_TOKENS // SEQLEN, SEQLEN)
    assert (w1[:, 0] == model.tokenizer.bos_token_id).all()
    assert torch.equal(w1[:, 1:], w0[:, :-1])
    r0 = run_eval(plain, model=model, progress=False)
    r1 = run_eval(bos, model=model, progress=False)
    assert r0["eval_tokens"] == r1["eval_tokens"] == (EVAL_TOKENS // SEQLEN) * (SEQLEN - 1)
    assert r0["perplexity"] != r1["perplexity"]


def test_bos_calibration_windows_hold_nsamples_windows(model, tiny_dir, corpus):
    plain = AblateConfig(**settings(tiny_dir, corpus, nsamples=NSAMPLES))
    bos = AblateConfig(**settings(tiny_dir, corpus, nsamples=NSAMPLES, bos=True))
    w0, w1 = plain.calibration_windows(model), bos.calibration_windows(model)
    assert w0.shape == w1.shape == (NSAMPLES, SEQLEN)
    assert (w1[:, 0] == model.tokenizer.bos_token_id).all()
    assert torch.equal(w1[:, 1:], w0[:, :-1])


def test_position_settings_selection(model):
    windows = torch.full((3, 8), 5)
    windows[:, 0] = model.tokenizer.bos_token_id
    sel = PositionSettings(exclude_special=True).selection(model, windows)
    assert sel.rows.tolist() == [p + 8 * w for w in range(3) for p in range(1, 8)]
    assert PositionSettings().selection(model, windows).rows is None
    assert PositionSettings(exclude_positions=2).selection(model, windows).n_kept == 18
    with pytest.raises(ValueError, match="smaller than --seqlen"):
        PositionSettings(exclude_positions=8).validate_positions(8)
