"""evaluate.py's output folder (hidden work folder, renamed at the end; --overwrite; stale folders of dead runs) and
its one-line errors for bad arguments and too few showers."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import common
import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(cls_epochs=1, cls_width=8, plots=False, progress=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evalcli")
    rng = np.random.default_rng(0)
    for name in ("gen", "ref"):
        x = rng.gamma(0.5, 1.0, (40, common.geometry(2).n_vox)) * (rng.random((40, common.geometry(2).n_vox)) < 0.3)
        common.write_showers(folder / f"{name}.hdf5", np.full(40, 1e4), x, 2)
    return folder


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("key, flag", [("cls_epochs", "--cls-epochs"), ("cls_width", "--cls-width"),
                                       ("cls_batch_size", "--cls-batch-size"), ("cls_repeats", "--cls-repeats"),
                                       ("max_showers", "--max-showers")])
def test_argument_checks(pair, tmp_path, key, flag):
    with pytest.raises(ValueError, match=f"{flag} must be >= 1, got 0"):
        ev.evaluate(pair / "gen.hdf5", pair / "ref.hdf5", 2, out_dir=tmp_path / "o", **{**FAST, key: 0})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode, n, least", [("cls-low", 4, 5), ("cls-high", 4, 5), ("cls-resnet", 4, 5), ("cls-u", 4, 5),
                                            ("fpd", 1, 2), ("prdc", 5, 6)])
def test_too_few_showers(pair, tmp_path, mode, n, least):
    with pytest.raises(ValueError, match=f"{n} showers per sample are too few for .*at least {least}"):
        ev.evaluate(pair / "gen.hdf5", pair / "ref.hdf5", 2, modes=(mode,), out_dir=tmp_path / "o", max_showers=n, **FAST)
    assert list(tmp_path.iterdir()) == []
    ev.evaluate(pair / "gen.hdf5", pair / "ref.hdf5", 2, modes=(mode,), out_dir=tmp_path / "o", max_showers=least,
                fpd_kw=dict(n_min=10, n_max=20, n_points=2, n_draws=1, kpd_batches=2, kpd_batch=5), **FAST)
    assert (tmp_path / "o" / "summary.json").is_file() and hidden(tmp_path) == []


def test_existing_out_is_refused_then_replaced_with_overwrite(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="exists; pass --overwrite to replace it"):
        ev.evaluate(pair / "gen.hdf5", pair / "ref.hdf5", 2, modes=("timing",), out_dir=out, **FAST)
    assert sorted(os.listdir(out)) == ["old.txt"] and hidden(tmp_path) == []
    ev.evaluate(pair / "gen.hdf5", pair / "ref.hdf5", 2, modes=("hist",), out_dir=out, overwrite=True, **FAST)
    assert sorted(os.listdir(out)) == ["separation_powers.txt", "summary.json"] and hidden(tmp_path) == []


def test_stale_work_folders_of_dead_runs_are_removed(pair, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    for name in (f".o.{dead.pid}.tmp", f".o.{dead.pid}.old", f".o.{live}.tmp", ".o.hdf5.77.tmp"):
        (tmp_path / name).mkdir()
    ev.evaluate(pair / "gen.hdf5", pair / "ref.hdf5", 2, modes=("timing",), out_dir=tmp_path / "o", **FAST)
    assert hidden(tmp_path) == sorted([f".o.{live}.tmp", ".o.hdf5.77.tmp"]) and (tmp_path / "o" / "summary.json").is_file()


def test_killed_run_leaves_no_output_and_is_cleaned_up_next_time(pair, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), "-i", pair / "gen.hdf5", "-r", pair / "ref.hdf5",
                             "-m", "cls-high", "--cls-epochs", "100000", "--cls-width", "8", "--out", out, "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / f".out.{proc.pid}.tmp"
    for _ in range(1200):  # the work folder appears once the checks have passed
        if work.is_dir() or proc.poll() is not None:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert work.is_dir() and not out.exists()
    ev.evaluate(pair / "gen.hdf5", pair / "ref.hdf5", 2, modes=("timing",), out_dir=out, **FAST)
    assert hidden(tmp_path) == [] and sorted(os.listdir(out)) == ["summary.json"]


def test_error_during_the_run_leaves_nothing(pair, tmp_path):
    bad = tmp_path / "bad.hdf5"
    with h5py.File(pair / "gen.hdf5", "r") as f, h5py.File(bad, "w") as g:
        g["incident_energies"], g["showers"] = f["incident_energies"][:], f["showers"][:]
        g["showers"][5, 3] = np.nan
    with pytest.raises(common.DataError, match="NaN"):  # found while reading, after the work folder was made
        ev.evaluate(bad, pair / "ref.hdf5", 2, modes=("hist",), out_dir=tmp_path / "o", **FAST)
    assert sorted(os.listdir(tmp_path)) == ["bad.hdf5"]
