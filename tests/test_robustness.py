"""Robustness of the chain (issue 8): kill -9 + --resume is exact, bad inputs give one `error:` line and leave
no output, non-finite losses are skipped and counted, bespoke sampling from the CLI is reproducible.

Already covered elsewhere (not repeated here): in-process exact resume (test_energy/test_shape_vit/test_vae/
test_latent_vit), same seed same file for shape_vit (test_shape_vit.test_train_and_sample_end_to_end),
a missing energy training file (test_energy), evaluate.py's CLI errors (test_evaluate)."""
import json
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

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
ENERGY = ["--preset", "tiny", "--max-showers", "200", "--batch-size", "32", "--val-every", "1", "--ckpt-every", "1",
          "--no-progress", "--device", "cpu", "--seed", "5"]
SHAPE = ["--dim", "12", "--heads", "2", "--mlp", "24", "--depth", "1", "--patch", "3", "16", "9", "--max-showers",
         "128", "--batch-size", "32", "--val-every", "1", "--ckpt-every", "1", "--no-progress", "--device", "cpu",
         "--seed", "5"]
EPOCHS = {"energy": 30, "shape_vit": 8}


def cli(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True)


def train_cmd(script, toy_ds2, out, epochs):
    flags = ENERGY if script == "energy" else SHAPE
    return [f"{script}.py", "--files", toy_ds2 / "toy_ds2_train.hdf5", "--out", out, "--epochs", epochs, *flags]


def only_run(out, script):
    runs = list(Path(out).glob(f"{script}-ds2-*"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def straight(toy_ds2, tmp_path_factory):
    """Uninterrupted tiny runs of energy.py and shape_vit.py (also the checkpoints the sampler tests use)."""
    out = tmp_path_factory.mktemp("straight")
    runs = {}
    for script, epochs in EPOCHS.items():
        res = cli(*train_cmd(script, toy_ds2, out, epochs))
        assert res.returncode == 0, res.stderr
        runs[script] = only_run(out, script)
    return runs


# ----------------------------------------------------------------------------- kill -9 and --resume
@pytest.mark.parametrize("script", ["energy", "shape_vit"])
def test_sigkill_then_resume_gives_the_same_weights(script, toy_ds2, straight, tmp_path):
    cmd = [sys.executable, *map(str, train_cmd(script, toy_ds2, tmp_path, EPOCHS[script]))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(f"{script}-ds2-*/ckpt.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(tmp_path, script)
    killed_at = common.load_checkpoint(run)["epoch"]
    if killed_at >= EPOCHS[script]:
        pytest.skip("the run finished before it could be killed")
    res = cli(f"{script}.py", "--resume", run, "--no-progress", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    a, b = common.load_checkpoint(straight[script]), common.load_checkpoint(run)
    assert b["epoch"] == EPOCHS[script] and b["step"] == a["step"] and 1 <= killed_at
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# ----------------------------------------------------------------------------- bad inputs
def bad_files(folder, toy_ds2):
    """name -> path of a broken input file."""
    (folder / "corrupt.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(500))
    e, x = common.load_showers(toy_ds2 / "toy_ds2_train.hdf5", 2, 64, progress=False)
    x = x.astype(np.float64)
    x[3, 10] = np.nan
    with h5py.File(folder / "nan.hdf5", "w") as f:  # ShowerWriter refuses NaN, so write it by hand
        f["incident_energies"], f["showers"] = e.reshape(-1, 1).astype(np.float64), x
    with h5py.File(folder / "vox100.hdf5", "w") as f:
        f["incident_energies"], f["showers"] = np.full((4, 1), 1e4), np.ones((4, 100))
    return folder


def assert_one_error_line(res, *words):
    assert res.returncode != 0, res.stdout
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("script, case, words", [
    ("energy", "missing", ["not found"]), ("energy", "corrupt", ["corrupt.hdf5"]), ("energy", "wrong_ds", []),
    ("energy", "nan", ["nan.hdf5"]), ("shape_vit", "corrupt", ["corrupt.hdf5"]), ("shape_vit", "wrong_ds", []),
    ("shape_vit", "nan", ["nan.hdf5"])])
def test_bad_training_data(script, case, words, toy_ds2, tmp_path):
    files = bad_files(tmp_path, toy_ds2)
    path = {"missing": files / "missing.hdf5", "corrupt": files / "corrupt.hdf5", "nan": files / "nan.hdf5",
            "wrong_ds": toy_ds2 / "toy_ds2_train.hdf5"}[case]
    flags = ENERGY if script == "energy" else SHAPE
    if case == "wrong_ds" and script == "shape_vit":
        flags = [f for i, f in enumerate(SHAPE) if i not in range(SHAPE.index("--patch"), SHAPE.index("--patch") + 4)]
    ds = ["--ds", "3"] if case == "wrong_ds" else []
    out = tmp_path / "runs"
    res = cli(f"{script}.py", "--files", path, "--out", out, "--epochs", "1", *ds, *flags)
    assert_one_error_line(res, *words)
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))  # no run folder left


def sampler_cases(straight, folder, toy_ds2):
    ref = toy_ds2 / "toy_ds2_ref.hdf5"
    common.save_checkpoint(folder / "energy_ds3.pt", script="energy", ds=3)
    (folder / "exists.hdf5").write_bytes(b"keep me")
    return {  # name -> (flags, words in the error)
        "ckpt_of_another_script": (["--ckpt", straight["energy"], "--like", ref], ["written by 'energy'"]),
        "ckpt_of_another_ds": (["--ds", "3", "--ckpt", straight["shape_vit"], "--n", "4"], ["dataset-2"]),
        "energy_ds_differs": (["--ckpt", straight["shape_vit"], "--energy-ckpt", folder / "energy_ds3.pt",
                               "--n", "4"], ["dataset-3"]),
        "like_wrong_voxels": (["--ckpt", straight["shape_vit"], "--like", folder / "vox100.hdf5"], ["vox100.hdf5"]),
        "like_missing": (["--ckpt", straight["shape_vit"], "--like", folder / "missing.hdf5"], ["not found"]),
        "bespoke_without_ckpt": (["--ckpt", straight["shape_vit"], "--n", "4", "--solver", "bespoke"],
                                 ["--bespoke-ckpt"]),
        "bespoke_ckpt_is_shape": (["--ckpt", straight["shape_vit"], "--n", "4", "--solver", "bespoke",
                                   "--bespoke-ckpt", straight["shape_vit"]], ["written by 'shape_vit'"]),
    }


def test_bad_sampler_inputs(straight, toy_ds2, tmp_path):
    files = bad_files(tmp_path, toy_ds2)
    for name, (flags, words) in sampler_cases(straight, files, toy_ds2).items():
        out = tmp_path / f"gen_{name}.hdf5"
        energy = [] if "--energy-ckpt" in flags else ["--energy-ckpt", straight["energy"]]
        res = cli("shape_vit.py", "--sample", *flags, *energy, "--output", out, "--steps", "2", "--no-progress",
                  "--device", "cpu")
        assert_one_error_line(res, *words)
        assert not list(tmp_path.glob(f"*gen_{name}*")), name  # neither the file nor a temporary
    # an existing output is refused unless --overwrite, and left as it was
    exists = files / "exists.hdf5"
    args = ["shape_vit.py", "--sample", "--ckpt", straight["shape_vit"], "--energy-ckpt", straight["energy"], "--n",
            "3", "--steps", "2", "--no-progress", "--device", "cpu", "--output", exists]
    assert_one_error_line(cli(*args), "exists", "--overwrite")
    assert exists.read_bytes() == b"keep me"
    assert cli(*args, "--overwrite").returncode == 0 and common.load_showers(exists, 2)[1].shape == (3, 6480)


def test_bespoke_solver_from_the_cli_is_reproducible(straight, tmp_path):
    import bespoke
    solver = bespoke.BespokeSolver(3)
    common.save_checkpoint(tmp_path / "bns.pt", script="bespoke", ds=2, n=3, solver=solver.state_dict(),
                           loss="local")
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"gen{i}.hdf5")
        res = cli("shape_vit.py", "--sample", "--ckpt", straight["shape_vit"], "--energy-ckpt", straight["energy"],
                  "--n", "5", "--solver", "bespoke", "--bespoke-ckpt", tmp_path / "bns.pt", "--no-progress",
                  "--device", "cpu", "--output", outs[-1])
        assert res.returncode == 0, res.stderr
    info = json.loads(Path(f"{outs[0]}.json").read_text())
    assert (info["solver"], info["steps"], info["nfe"]) == ("bespoke", 3, 3)
    with h5py.File(outs[0]) as f, h5py.File(outs[1]) as g:
        np.testing.assert_array_equal(f["showers"][:], g["showers"][:])


# ----------------------------------------------------------------------------- non-finite losses
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
    flags = ENERGY if script == "energy" else SHAPE
    base = ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), *map(str, flags)]
    real = getattr(mod, name)

    def train(out, epochs):
        argv = base + ["--out", str(out), "--epochs", str(epochs)]
        return mod.train(mod.parse_args(argv)) if script == "energy" else mod.main(argv)

    monkeypatch.setattr(mod, name, nan_after(real, 0, every=3))  # isolated NaNs: skipped and counted
    run = train(tmp_path / "sparse", 2)
    ckpt = common.load_checkpoint(run)
    assert ckpt["epoch"] == 2 and ckpt["nonfinite"] >= 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())

    monkeypatch.setattr(mod, name, nan_after(real, 3))  # three good steps, then NaN for ever
    with pytest.raises(SystemExit, match="20 non-finite losses in a row") as err:
        train(tmp_path / "dead", 30)
    run = only_run(tmp_path / "dead", script)
    assert str(run / "ckpt.pt") in str(err.value)
    ckpt = common.load_checkpoint(run)
    assert 1 <= ckpt["epoch"] < 30 and 0 < ckpt["nonfinite"] <= 20  # epochs without an update still end
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
