"""What a careless or unlucky user meets: kill -9 and --resume, bad input files, bad sampler inputs, non-finite
losses and weights. Subprocesses, as a user runs the scripts."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import common
from conftest import ENV, QUIET, ROOT, TINY_VIT, assert_one_error_line, cli

ENERGY = ["--preset", "tiny", "--max-showers", "200", "--batch-size", "32", "--val-every", "1", "--ckpt-every", "1",
          *QUIET, "--seed", "5"]
SHAPE = [*TINY_VIT, "--max-showers", "128", "--val-every", "1", "--ckpt-every", "1", *QUIET, "--seed", "5"]
EPOCHS = {"energy": 30, "shape_vit": 8}


def train_cmd(script, toy_ds2, out, epochs):
    flags = ENERGY if script == "energy" else SHAPE
    return [f"{script}.py", "--files", toy_ds2 / "toy_ds2_train.hdf5", "--out", out, "--epochs", epochs, *flags]


def only_run(out, script):
    runs = list(Path(out).glob(f"{script}-ds2-*"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.parametrize("script", ["energy", "shape_vit"])
def test_sigkill_then_resume_gives_the_same_weights(script, toy_ds2, tmp_path):
    straight = cli(*train_cmd(script, toy_ds2, tmp_path / "straight", EPOCHS[script]))
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "killed"
    cmd = [sys.executable, *map(str, train_cmd(script, toy_ds2, out, EPOCHS[script]))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob(f"{script}-ds2-*/ckpt.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(out, script)
    killed_at = common.load_checkpoint(run)["epoch"]
    if killed_at >= EPOCHS[script]:
        pytest.skip("the run finished before it could be killed")
    res = cli(f"{script}.py", "--resume", run, *QUIET)
    assert res.returncode == 0, res.stderr
    a, b = common.load_checkpoint(only_run(tmp_path / "straight", script)), common.load_checkpoint(run)
    assert b["epoch"] == EPOCHS[script] and b["step"] == a["step"] and 1 <= killed_at
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def bad_files(folder, toy_ds2):
    """name -> path of a broken input file."""
    (folder / "corrupt.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(500))
    e, x = common.load_showers(toy_ds2 / "toy_ds2_train.hdf5", 2, 64, progress=False)
    x = x.astype(np.float64)
    x[3, 10] = np.nan
    with h5py.File(folder / "nan.hdf5", "w") as f:  # the writers refuse NaN, so write it by hand
        f["incident_energies"], f["showers"] = e.reshape(-1, 1).astype(np.float64), x
    with h5py.File(folder / "vox100.hdf5", "w") as f:
        f["incident_energies"], f["showers"] = np.full((4, 1), 1e4), np.ones((4, 100))
    return {"missing": folder / "missing.hdf5", "corrupt": folder / "corrupt.hdf5", "nan": folder / "nan.hdf5",
            "wrong_ds": toy_ds2 / "toy_ds2_train.hdf5", "vox100": folder / "vox100.hdf5"}


@pytest.mark.parametrize("script, case, words", [
    ("energy", "missing", ["not found"]), ("energy", "corrupt", ["corrupt.hdf5"]), ("energy", "wrong_ds", []),
    ("energy", "nan", ["nan.hdf5"]), ("shape_vit", "corrupt", ["corrupt.hdf5"]), ("shape_vit", "wrong_ds", []),
    ("shape_vit", "nan", ["nan.hdf5"]), ("vae", "vox100", ["100 voxels"])])
def test_bad_training_data(script, case, words, toy_ds2, tmp_path):
    flags = {"energy": ENERGY, "shape_vit": [f for f in SHAPE if f not in ("--preset", "small")],
             "vae": ["--channels", "2", *QUIET]}[script]
    ds = ["--ds", "3"] if case == "wrong_ds" else []
    out = tmp_path / "runs"
    res = cli(f"{script}.py", "--files", bad_files(tmp_path, toy_ds2)[case], "--out", out, "--epochs", "1", *ds, *flags)
    assert_one_error_line(res, *words)
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))  # no run folder left


def test_bad_sampler_inputs(chain, toy_ds2, tmp_path):
    files = bad_files(tmp_path, toy_ds2)
    common.write_conditions(tmp_path / "cond_ds3.hdf5", torch.ones(3) * 1e4, torch.rand(3, 45), 3)
    (tmp_path / "exists.hdf5").write_bytes(b"keep me")
    shape, cond = ["--ckpt", chain["shape_vit"]], ["--cond", chain["cond"]]
    cases = {  # name -> (flags, words in the error)
        "ckpt_of_another_script": (["--ckpt", chain["energy"], *cond], ["written by 'energy'"]),
        "ckpt_of_another_ds": (["--ds", "3", *shape, *cond], ["dataset-2"]),
        "cond_of_another_ds": ([*shape, "--cond", tmp_path / "cond_ds3.hdf5"], ["dataset-3 conditions"]),
        "cond_wrong_voxels": ([*shape, "--cond", files["vox100"]], ["vox100.hdf5"]),
        "cond_missing": ([*shape, "--cond", files["missing"]], ["not found"]),
        "cond_nan": ([*shape, "--cond", files["nan"]], ["NaN"]),
        "too_many": ([*shape, *cond, "--n", "41"], ["fewer than the 41"]),
        "bespoke_without_ckpt": ([*shape, *cond, "--solver", "bespoke"], ["--bespoke-ckpt"]),
        "bespoke_ckpt_is_shape": ([*shape, *cond, "--solver", "bespoke", "--bespoke-ckpt", chain["shape_vit"]],
                                  ["written by 'shape_vit'"]),
        "steps_zero": ([*shape, *cond, "--steps", "0"], ["--steps must be >= 1"]),
    }
    for name, (flags, words) in cases.items():
        out = tmp_path / f"gen_{name}.hdf5"
        res = cli("shape_vit.py", "--sample", "--steps", "2", *flags, "--output", out, *QUIET)
        assert_one_error_line(res, *words)
        assert not list(tmp_path.glob(f"*gen_{name}*")), name  # neither the file nor a temporary
    exists = tmp_path / "exists.hdf5"  # an existing output is refused unless --overwrite, and left as it was
    args = ["shape_vit.py", "--sample", *shape, *cond, "--n", "3", "--steps", "2", *QUIET, "--output", exists]
    assert_one_error_line(cli(*args), "exists", "--overwrite")
    assert exists.read_bytes() == b"keep me"
    assert cli(*args, "--overwrite").returncode == 0 and common.load_showers(exists, 2)[1].shape == (3, 6480)


def nan_after(real, good_calls, every=None):
    """Wrap a loss: training calls after the first `good_calls` (or every `every`-th) return NaN."""
    calls = [0]

    def loss(*a, **kw):
        out = real(*a, **kw)
        if not torch.is_grad_enabled():  # validation
            return out
        calls[0] += 1
        bad = calls[0] % every == 0 if every else calls[0] > good_calls
        return out * float("nan") if bad else out
    return loss


@pytest.mark.parametrize("script", ["energy", "shape_vit"])
def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(script, toy_ds2, tmp_path, monkeypatch):
    import energy
    import shape_vit
    mod, name = (energy, "cfm_loss") if script == "energy" else (shape_vit, "batch_loss")
    base = ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), *map(str, ENERGY if script == "energy" else SHAPE)]
    real = getattr(mod, name)
    monkeypatch.setattr(mod, name, nan_after(real, 0, every=3))  # isolated NaNs: skipped and counted
    ckpt = common.load_checkpoint(mod.main(base + ["--out", str(tmp_path / "sparse"), "--epochs", "2"]))
    assert ckpt["epoch"] == 2 and ckpt["nonfinite"] >= 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())

    monkeypatch.setattr(mod, name, nan_after(real, 3))  # three good steps, then NaN for ever
    with pytest.raises(common.TrainingError, match="20 non-finite losses or gradients in a row") as err:
        mod.main(base + ["--out", str(tmp_path / "dead"), "--epochs", "30"])
    run = only_run(tmp_path / "dead", script)
    assert str(run / "ckpt.pt") in str(err.value)
    ckpt = common.load_checkpoint(run)
    assert 1 <= ckpt["epoch"] < 30 and 0 < ckpt["nonfinite"] <= 20  # epochs without an update still end
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_huge_learning_rate_never_writes_broken_weights(toy_ds2, tmp_path):
    res = cli(*train_cmd("shape_vit", toy_ds2, tmp_path, 10), "--lr", "1e8")
    assert_one_error_line(res, "non-finite")
    named = res.stderr.split("the last good checkpoint is ")[-1].split(" (")[0] if "last good" in res.stderr else None
    for ckpt in tmp_path.rglob("ckpt.pt"):  # whatever is on disk is finite, and is the one the message names
        assert all(torch.isfinite(v).all() for v in common.load_checkpoint(ckpt)["model"].values()
                   if v.is_floating_point())
        assert named == str(ckpt)
    assert named is None or Path(named).is_file()
