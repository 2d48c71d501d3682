"""No result is ever lost (issue 14, items 1-4, 10, 11): interrupted runs are marked
unfinished and refused without ``--resume`` / ``--overwrite``; ``--overwrite`` keeps the old
run until the new one finishes, even when the new one is killed. The interruptions kill a
real ``wasserstein-neurons`` process."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from wasserstein_neurons import capture
from wasserstein_neurons.cli import main
from wasserstein_neurons.runs import RunRestoredWarning, folder_state

SMALL = ["--seqlen", "32", "--no-progress"]
#: Tokens of a run the tests interrupt: several seconds of capture after its folder appears.
SIGNALLED_TOKENS = 32768
GRID = ["--grid", "--nsamples", "4", "--eval-tokens", "2048", "--grid-experts", "1,2"]


def _base(tiny_dir, corpus) -> list[str]:
    return ["--model", str(tiny_dir), "--dataset", str(corpus), *SMALL]


def _start(argv: list[str]) -> subprocess.Popen:
    """The CLI in a child process, with SIGINT at its default disposition as in a user's
    shell: an ignored SIGINT is inherited across exec, and something earlier in the suite
    leaves it ignored in the pytest process (the child then never sees Ctrl-C)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    code = "import sys; from wasserstein_neurons.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended before the test could stop it: {proc.stderr.read()}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def _rows(path: Path) -> int:
    try:
        return len(pd.read_csv(path))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.filterwarnings("ignore::wasserstein_neurons.expansion.SmallClusterWarning")
def test_killed_grid_is_refused_then_resumed(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["expand", *_base(tiny_dir, corpus), *GRID, "--grid-sparsities", "0.5,0.9"]
    proc = _start([*argv, "--out", str(out)])
    _wait_for(lambda: _rows(out / "results.csv") >= 3, proc)  # dense, magnitude, wanda
    proc.kill()
    proc.wait()
    assert folder_state(out).kind == "unfinished"
    kept = pd.read_csv(out / "results.csv", dtype={"pattern": str})
    before = _files(out)
    # the same command again: refused, naming both ways forward, nothing touched
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unfinished" in err and "--resume" in err and "--overwrite" in err
    assert _files(out) == before
    # --resume keeps the finished cells and runs the rest
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    done = pd.read_csv(out / "results.csv", dtype={"pattern": str})
    assert len(done) == 1 + 2 * 4 and folder_state(out).kind == "finished"
    pd.testing.assert_frame_equal(done.iloc[: len(kept)], kept)
    # a finished grid may be resumed with more cells (more k) but not other windows
    assert main([*argv, "--out", str(out), "--resume", "--grid-experts", "1,2,3"]) == 0
    assert len(pd.read_csv(out / "results.csv")) == 1 + 2 * 5


def test_ctrl_c_is_one_line_and_marks_the_run(tiny_dir, corpus, tmp_path):
    out = tmp_path / "rank"
    # enough tokens that the run outlasts the poll: the capture stops at the last hooked
    # block (no LM head), so a small run can finish before the signal lands
    proc = _start(
        ["rank", *_base(tiny_dir, corpus), "--tokens", str(SIGNALLED_TOKENS), "--out", str(out)]
    )
    _wait_for(lambda: (out / "activations").is_dir(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: interrupted") and "marked unfinished" in lines[0]
    assert folder_state(out).kind == "unfinished"


def _overwrite_under_way(tiny_dir, corpus, tmp_path):
    """A finished rank run, and a ``--overwrite`` of it that has started capturing."""
    out = tmp_path / "rank"
    rank = ["rank", *_base(tiny_dir, corpus), "--tokens", "512", "--out", str(out)]
    assert main(rank) == 0
    old = _files(out)
    proc = _start([*rank, "--tokens", str(SIGNALLED_TOKENS), "--overwrite"])
    _wait_for(lambda: (out / "activations").is_dir() and not (out / "neurons.csv").exists(), proc)
    return out, rank, old, proc


def test_killed_overwrite_puts_the_old_run_back(tiny_dir, corpus, tmp_path, capsys):
    out, rank, old, proc = _overwrite_under_way(tiny_dir, corpus, tmp_path)
    proc.kill()
    proc.wait()
    assert folder_state(out).kind == "unfinished"  # the new run, killed
    with pytest.warns(RunRestoredWarning):
        assert main(rank) == 2  # the old run is back, and finished runs are refused
    assert "already holds a finished run" in capsys.readouterr().err
    assert _files(out) == old
    assert [p.name for p in tmp_path.iterdir()] == ["rank"]  # no hidden sibling left


def test_ctrl_c_during_overwrite_keeps_the_old_run(tiny_dir, corpus, tmp_path):
    out, _, old, proc = _overwrite_under_way(tiny_dir, corpus, tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "still holds its finished run" in err, err
    assert _files(out) == old and [p.name for p in tmp_path.iterdir()] == ["rank"]


def test_overwrite_replaces_only_when_finished(tiny_dir, corpus, tmp_path):
    out = tmp_path / "rank"
    rank = ["rank", *_base(tiny_dir, corpus), "--tokens", "512", "--out", str(out)]
    assert main(rank) == 0
    assert main([*rank, "--overwrite", "--seed", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["rank"]


def test_disk_full_during_capture(tiny_dir, corpus, tmp_path, capsys, monkeypatch):
    """ENOSPC while the store is written: one line, the folder stays, marked unfinished."""
    real_write = capture._NpyStreamWriter.write
    calls = []

    def full_after_three(self, chunk):
        calls.append(self.path)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        real_write(self, chunk)

    monkeypatch.setattr(capture._NpyStreamWriter, "write", full_after_three)
    out = tmp_path / "rank"
    assert main(["rank", *_base(tiny_dir, corpus), "--tokens", "512", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device: "), lines
    assert folder_state(out).kind == "unfinished"
