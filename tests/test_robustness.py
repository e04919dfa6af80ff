"""What a careless or unlucky user meets (README, Robustness): bad numbers on the command line, missing, damaged or
degenerate files, a training that diverges, a full disk or an output folder that takes no file, kill -9, and a
second process on the same output or run folder. Most cases call a stage's main() in-process: it raises what the
command line turns into one `error:` line and exit 1 (test_command_lines checks that wrapper as a user meets it,
side by side); kill -9 and second processes are real processes."""
import importlib
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
from conftest import ENV, QUIET, ROOT, TINY_VIT, assert_one_error_line

ERRORS = (common.DataError, common.TrainingError, OSError, ValueError)  # what every stage's command line catches
ENERGY = ["--preset", "tiny", "--max-showers", "200", "--batch-size", "32", "--val-every", "1", "--ckpt-every", "1",
          *QUIET, "--seed", "5"]
SHAPE = [*TINY_VIT, "--max-showers", "128", "--val-every", "1", "--ckpt-every", "1", *QUIET, "--seed", "5"]
EPOCHS = {"energy": 12, "shape_vit": 8}


def expect_error(call, *words):
    """call() fails with one of ERRORS and a one-line message naming `words`; returns the message."""
    with pytest.raises(ERRORS) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def files_under(folder):
    """Every file under folder, hidden ones included (relative names)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def start(argv, **kw):
    """A script as a user starts it (one OpenMP thread), stdout and stderr captured."""
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def all_finite(ckpt):
    return not common._nonfinite({k: ckpt.get(k) for k in ("model", "optimizer", "stats")})


# ----------------------------------------------------------------------------- kill -9 and --resume
KILLED_TRAINERS = """import json, os, signal, sys, torch
import common, energy, shape_vit
torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # torch's lazy imports once, before the fork
mod, name = (energy, "cfm_loss") if os.fork() else (shape_vit, "batch_loss")  # one process for each script
real_save, real_loss, calls = common.save_checkpoint, getattr(mod, name), []
def save(*a, **k):
    real_save(*a, **k)
    calls.append("saved")
def loss(*a, **k):
    if calls and torch.is_grad_enabled():
        calls.append("step")
        if len(calls) == 3:  # kill -9 in the second step after the first checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
    return real_loss(*a, **k)
common.save_checkpoint = save
setattr(mod, name, loss)
mod.main(json.loads(sys.argv[1])[mod.__name__])
"""


def test_sigkill_then_resume_gives_the_same_weights(toy_ds2, tmp_path):
    """Both training scripts, killed by SIGKILL in the middle of an epoch after their first checkpoint and resumed,
    end bit for bit where the uninterrupted runs (in-process meanwhile) end."""
    import energy
    import shape_vit
    train, mods = toy_ds2 / "toy_ds2_train.hdf5", {"energy": energy, "shape_vit": shape_vit}
    argv = {s: list(map(str, ["--files", train, "--epochs", "3", *(ENERGY if s == "energy" else SHAPE)])) for s in mods}
    killed = {s: [*argv[s], "--out", str(tmp_path / "killed")] for s in mods}
    proc = start(["-c", KILLED_TRAINERS, json.dumps(killed)])  # forks: one process for each script
    straight = {s: mod.main([*argv[s], "--out", str(tmp_path / "straight")]) for s, mod in mods.items()}
    err = proc.communicate(timeout=300)[1]  # both ends of the pipes closed: both processes died
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    for s in mods:
        run = next((tmp_path / "killed").glob(f"{s}-ds2-*"))
        assert common.load_checkpoint(run)["epoch"] == 1
        assert mods[s].main(["--resume", str(run), *QUIET]) == run
        a, b = common.load_checkpoint(straight[s]), common.load_checkpoint(run)
        assert b["epoch"] == 3 and b["step"] == a["step"], s
        assert a["history"]["train_loss"] == b["history"]["train_loss"], s
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (s, k)
        for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert all(torch.equal(x[k], y[k]) for k in x), s


# ----------------------------------------------------------------------------- the command line's numbers
ARGUMENTS = [  # (script, argv, words): zero and negative counts, fractions, rates, seeds, unknown devices
    ("energy", ["--epochs", "0"], "--epochs must be >= 1"), ("energy", ["--batch-size", "0"], "--batch-size"),
    ("energy", ["--sample", "--batch-size", "-5"], "--batch-size"), ("energy", ["--sample", "--n", "-3"], "--n must"),
    ("energy", ["--val-fraction", "-0.5"], "--val-fraction"), ("energy", ["--val-every", "0"], "--val-every"),
    ("energy", ["--max-showers", "0"], "--max-showers"), ("energy", ["--device", "gpu"], "not a device"),
    ("energy", ["--warmup", "1.5"], "--warmup"), ("energy", ["--seed", "-1"], "--seed"),
    ("energy", ["--sample", "--steps", "0"], "--steps must be >= 1"),
    ("shape_vit", ["--sample", "--steps", "-2"], "--steps must be >= 1"), ("shape_vit", ["--lr", "0"], "--lr"),
    ("shape_vit", ["--patch", "3", "0", "1"], "--patch"), ("shape_vit", ["--device", "meta"], "only cpu and cuda"),
    ("vae", ["--channels", "0"], "--channels"), ("vae", ["--beta", "-1"], "--beta"),
    ("vae", ["--decode", "x.hdf5", "--cut", "0"], "--cut"), ("latent_vit", ["--sample", "--n", "0"], "--n must"),
    ("bespoke", ["--steps", "1"], "--steps must be >= 2"), ("bespoke", ["--pool", "8", "--n-val", "8"], "--n-val"),
    ("bespoke", ["--iters", "0"], "--iters"), ("evaluate", ["-i", "x.hdf5", "--cls-epochs", "0"], "--cls-epochs"),
    ("evaluate", ["-i", "x.hdf5", "--cls-width", "0"], "--cls-width"),
    ("evaluate", ["-i", "x.hdf5", "--cls-lr", "0"], "--cls-lr"),
    ("evaluate", ["-i", "x.hdf5", "--max-showers", "0"], "--max-showers")]


@pytest.mark.parametrize("script, argv, words", ARGUMENTS)
def test_bad_arguments(script, argv, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mod = importlib.import_module(script)
    expect_error(lambda: (mod.parse_args if script == "bespoke" else mod.main)(argv), words)
    assert files_under(tmp_path) == []


# ----------------------------------------------------------------------------- bad input files
def _h5(path, **sets):
    """A file written by hand (the writers refuse what these tests need)."""
    with h5py.File(path, "w") as f:
        for k, v in sets.items():
            f.create_group(k) if v is None else f.create_dataset(k, data=v)
    return path


@pytest.fixture(scope="module")
def bad(toy_ds2, chain, tmp_path_factory):
    """name -> a broken input: CaloChallenge files, condition files, latent files, checkpoints."""
    d = tmp_path_factory.mktemp("bad")
    e, x = common.load_showers(toy_ds2 / "toy_ds2_ref.hdf5", 2, 64, progress=False)
    e, x = e.astype(np.float64).reshape(-1, 1), x.astype(np.float64)

    def shower_file(name, e=e, x=x, at=None, value=None):
        e, x = e.copy(), x.copy()
        if at:
            (e if at[0] == "e" else x)[at[1:]] = value
        return _h5(d / f"{name}.hdf5", incident_energies=e, showers=x)
    files = {"missing": d / "missing.hdf5", "vox100": _h5(d / "vox100.hdf5", incident_energies=e[:4],
                                                         showers=np.ones((4, 100))),
             "group": _h5(d / "group.hdf5", incident_energies=e, showers=None),
             "e_n2": _h5(d / "e_n2.hdf5", incident_energies=np.hstack([e, e]), showers=x),
             "gev": shower_file("gev", e=e / 1000), "one": shower_file("one", e=e[:1], x=x[:1]),
             "alike": shower_file("alike", e=np.repeat(e[:1], 64, 0), x=np.repeat(x[:1], 64, 0))}
    for name, where, value in (("nan", ("x", 3, 10), np.nan), ("big", ("x", 3, 10), 1e300), ("neg", ("x", 3, 10), -1.0),
                               ("e_nan", ("e", 5, 0), np.nan), ("e_zero", ("e", 5, 0), 0.0),
                               ("e_neg", ("e", 5, 0), -5.0), ("e_big", ("e", 5, 0), 1e300)):
        files[name] = shower_file(name, at=where, value=value)
    (d / "corrupt.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(500))
    files["corrupt"] = d / "corrupt.hdf5"
    common.write_showers(d / "damaged.hdf5", e, x, 2)  # a valid file with one chunk overwritten inside
    with h5py.File(d / "damaged.hdf5") as f:
        offset = f["showers"].id.get_chunk_info(0).byte_offset
    with open(d / "damaged.hdf5", "r+b") as f:
        f.seek(offset + 100)
        f.write(b"\x00garbage" * 50)
    files["damaged"] = d / "damaged.hdf5"
    u = common.load_u(toy_ds2 / "toy_ds2_ref.hdf5", 2, 64, progress=False)[1].numpy()
    cond = dict(incident_energies=e)
    for name, uu, attrs in (("c_nan", np.where(np.arange(u.size).reshape(u.shape) == 7, np.nan, u), {}),
                            ("c_above1", u + 1.5, {}), ("c_ds3", u, {"ds": 3})):
        with h5py.File(_h5(d / f"{name}.hdf5", **cond, u=uu), "a") as f:
            f.attrs.update({"format": "calodream-conditions", "ds": 2, **attrs})
        files[name] = d / f"{name}.hdf5"
    files["c_e_n2"] = _h5(d / "c_e_n2.hdf5", incident_energies=np.hstack([e, e]), u=u)
    lat, attrs = common.read_latents(chain["latents"], 2)
    for name, change in (("l_nan", {"mu": np.where(np.arange(lat["mu"].size).reshape(lat["mu"].shape) == 5, np.nan,
                                                   lat["mu"])}),
                         ("l_rows", {"u": lat["u"][:-3]}), ("l_grid", {"mu": lat["mu"][:, :, :5], "logvar": None})):
        cols = {**lat, **change}
        with h5py.File(_h5(d / f"{name}.hdf5", **{k: v for k, v in cols.items() if v is not None}), "a") as f:
            f.attrs.update(attrs)
        files[name] = d / f"{name}.hdf5"
    files.update(l_format=toy_ds2 / "toy_ds2_ref.hdf5", text_ckpt=d / "text.pt", half_ckpt=d / "half.pt")
    (d / "text.pt").write_text("hello\n")
    ckpt = (chain["energy"] / "ckpt.pt").read_bytes()
    (d / "half.pt").write_bytes(ckpt[:len(ckpt) // 2])
    return files


SHOWER_FAULTS = {  # fault -> words of the error
    "missing": "not found", "corrupt": "not a readable HDF5 file", "nan": "NaN/inf showers",
    "big": "NaN/inf showers (or values beyond float32)", "e_nan": "NaN/inf incident_energies",
    "e_zero": "incident energies <= 0", "e_neg": "incident energies <= 0", "e_big": "NaN/inf incident_energies",
    "gev": "are the energies in MeV", "e_n2": "incident energies of shape (64, 2)", "group": "not a CaloChallenge",
    "damaged": "cannot be read", "vox100": "100 voxels", "neg": "negative voxel energies"}
COND_FAULTS = {"c_nan": "NaN/inf u", "c_above1": "u's outside [0, 1]", "c_ds3": "dataset-3 conditions",
               "c_e_n2": "incident_energies (N, 1) and u (N, 45)"}
LATENT_FAULTS = {"l_nan": "NaN/inf mu", "l_rows": "a latent file holds", "l_format": "not a dataset-2 latent file"}
READS = (  # (reader, the faults it meets): every reader meets the one data check
    [("energy", f) for f in [*SHOWER_FAULTS, "one", "alike"]] + [("shape_vit --cond", f) for f in SHOWER_FAULTS]
    + [("shape_vit", f) for f in ("nan", "gev", "damaged", "one", "alike")]
    + [("vae", f) for f in ("big", "e_zero", "vox100", "alike")]
    + [("vae --reconstruct", f) for f in ("e_nan", "e_zero", "e_neg", "gev", "damaged")]
    + [("vae --encode", f) for f in ("nan", "e_n2")]
    + [("energy --like", f) for f in ("missing", "e_nan", "e_zero", "e_big", "e_n2", "group", "vox100")]
    + [("evaluate -i", f) for f in ("nan", "big", "e_zero", "damaged", "group", "e_n2")]
    + [("evaluate -r", f) for f in ("nan", "corrupt")] + [("evaluate -m fpd", "one")]
    + [(r, f) for r in ("shape_vit --cond", "latent_vit --cond", "bespoke --cond") for f in COND_FAULTS]
    + [("vae --decode", f) for f in [*LATENT_FAULTS, "l_grid"]] + [("latent_vit", f) for f in LATENT_FAULTS]
    + [(r, f) for r in ("shape_vit --ckpt", "energy --ckpt") for f in ("text_ckpt", "half_ckpt")])
WORDS = {**SHOWER_FAULTS, **COND_FAULTS, **LATENT_FAULTS, "one": "1 showers are too few to train on",
         "alike": "all alike", "l_grid": "decodes (2, 15, 9, 9)", "text_ckpt": "not a readable checkpoint",
         "half_ckpt": "not a readable checkpoint",
         ("evaluate -m fpd", "one"): "1 showers per sample are too few for FPD"}


def reader_call(reader, path, chain, toy_ds2, out):
    """(main, argv) of a stage that reads `path` the way `reader` names."""
    import bespoke
    import energy
    import evaluate
    import latent_vit
    import shape_vit
    import vae
    train, ref = ["--out", str(out), "--epochs", "1", *QUIET], str(toy_ds2 / "toy_ds2_ref.hdf5")
    sample = ["--steps", "1", *QUIET]
    path = str(path)
    return {
        "energy": (energy.main, ["--files", path, "--preset", "tiny", "--batch-size", "8", *train]),
        "shape_vit": (shape_vit.main, ["--files", path, *TINY_VIT[:-2], "--batch-size", "8", *train]),
        "vae": (vae.main, ["--files", path, "--channels", "2", "--batch-size", "8", *train]),
        "latent_vit": (latent_vit.main, ["--latents", path, *TINY_VIT[:-2], "--batch-size", "8", *train]),
        "shape_vit --cond": (shape_vit.main, ["--sample", "--ckpt", str(chain["shape_vit"]), "--cond", path,
                                              "--output", str(out / "gen.hdf5"), *sample]),
        "latent_vit --cond": (latent_vit.main, ["--sample", "--ckpt", str(chain["latent_vit"]), "--cond", path,
                                                "--output", str(out / "z.hdf5"), *sample]),
        "energy --like": (energy.main, ["--sample", "--ckpt", str(chain["energy"]), "--like", path,
                                        "--output", str(out / "cond.hdf5"), *sample]),
        "vae --reconstruct": (vae.main, ["--reconstruct", "--ckpt", str(chain["vae"]), "--like", path,
                                         "--output", str(out / "rec.hdf5"), *QUIET]),
        "vae --encode": (vae.main, ["--encode", "--ckpt", str(chain["vae"]), "--like", path,
                                    "--output", str(out / "lat.hdf5"), *QUIET]),
        "vae --decode": (vae.main, ["--decode", path, "--ckpt", str(chain["vae"]), "--output", str(out / "g.hdf5"),
                                    *QUIET]),
        "evaluate -i": (evaluate.main, ["-i", path, "-r", ref, "-m", "hist", "--no-plots", "--out", str(out / "ev"),
                                        "--no-progress"]),
        "evaluate -m fpd": (evaluate.main, ["-i", path, "-r", ref, "-m", "fpd", "--out", str(out / "ev"),
                                            "--no-progress"]),
        "evaluate -r": (evaluate.main, ["-i", ref, "-r", path, "-m", "hist", "--no-plots", "--out", str(out / "ev"),
                                        "--no-progress"]),
        "bespoke --cond": (lambda a: bespoke.train(bespoke.parse_args(a)), [
            "--ckpt", str(chain["shape_vit"]), "--cond", path, "--preset", "small", "--steps", "2", "--iters", "1",
            "--pool", "8", "--n-val", "4", "--batch-size", "4", "--ref-steps", "2", "--out", str(out), *QUIET]),
        "shape_vit --ckpt": (shape_vit.main, ["--sample", "--ckpt", path, "--cond", str(chain["cond"]),
                                              "--output", str(out / "gen.hdf5"), *sample]),
        "energy --ckpt": (energy.main, ["--sample", "--ckpt", path, "--n", "4", "--output", str(out / "c.hdf5"),
                                        *sample]),
    }[reader]


@pytest.mark.parametrize("reader, fault", READS)
def test_bad_input_files(reader, fault, bad, chain, toy_ds2, tmp_path):
    main, argv = reader_call(reader, bad[fault], chain, toy_ds2, tmp_path / "out")
    expect_error(lambda: main(argv), WORDS.get((reader, fault), WORDS[fault]),
                 Path(bad[fault]).name if fault not in ("one", "alike") else "")
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []  # no run folder, no temporary


def test_incident_energies_outside_the_range_only_warn(toy_ds2, tmp_path, capsys):
    import energy
    e, x = common.load_showers(toy_ds2 / "toy_ds2_ref.hdf5", 2, 40, progress=False)
    common.write_showers(tmp_path / "tev.hdf5", e * 3, x, 2)  # up to 3 TeV
    run = energy.main(["--files", str(tmp_path / "tev.hdf5"), "--preset", "tiny", "--batch-size", "8", "--epochs",
                       "1", "--out", str(tmp_path), *QUIET])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "outside [1 GeV, 1 TeV]" in warnings[0] and (run / "ckpt.pt").is_file()


# ----------------------------------------------------------------------------- trainings that cannot go on
TRAININGS = [  # (script, flags, words): diverging runs, and network shapes that cannot be built
    ("shape_vit", ["--max-showers", "200", "--epochs", "10", "--lr", "1e8"], "20 non-finite losses"),
    ("shape_vit", ["--max-showers", "200", "--epochs", "3", "--lr", "1e8"], "epoch 3 made no update"),
    ("vae", ["--max-showers", "64", "--epochs", "3", "--lr", "1e8"], "non-finite"),
    ("energy", ["--max-showers", "200", "--epochs", "5", "--lr", "1e6"], "20 non-finite losses"),
    ("shape_vit", ["--max-showers", "64", "--epochs", "1", "--heads", "5"], "divisible by --heads 5"),
    ("shape_vit", ["--max-showers", "64", "--epochs", "1", "--patch", "3", "7", "9"], "does not tile"),
    ("latent_vit", ["--epochs", "1", "--heads", "5"], "divisible by --heads 5")]


@pytest.mark.parametrize("script, flags, words", TRAININGS)
def test_training_that_cannot_go_on(script, flags, words, chain, toy_ds2, tmp_path):
    """One error line; every checkpoint on disk is finite (weights, optimizer state, statistics) and the one the
    message names exists; a network that cannot be built leaves no run folder."""
    mod = importlib.import_module(script)
    data = ["--latents", str(chain["latents"])] if script == "latent_vit" else [
        "--files", str(toy_ds2 / "toy_ds2_train.hdf5")]
    size = {"energy": ["--preset", "tiny", "--batch-size", "32"], "vae": ["--channels", "2", "--batch-size", "16"],
            "shape_vit": [*TINY_VIT[:-2], "--patch", "3", "16", "9", "--batch-size", "32"],
            "latent_vit": [*TINY_VIT[:-2], "--batch-size", "16"]}[script]
    argv = [*data, *size, *flags]
    msg = expect_error(lambda: mod.main(argv + ["--out", str(tmp_path), *QUIET]), words)
    for ckpt in tmp_path.rglob("ckpt.pt"):
        assert all_finite(common.load_checkpoint(ckpt)) and f"the last good checkpoint is {ckpt} " in msg
    if "last good" not in msg:
        assert not list(tmp_path.rglob("ckpt.pt"))
    if "divisible" in msg or "tile" in msg:
        assert files_under(tmp_path) == []


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
    assert ckpt["epoch"] == 2 and ckpt["nonfinite"] >= 2 and all_finite(ckpt)

    monkeypatch.setattr(mod, name, nan_after(real, 3))  # three good steps, then NaN for ever
    with pytest.raises(common.TrainingError, match="20 non-finite losses or gradients in a row") as err:
        mod.main(base + ["--out", str(tmp_path / "dead"), "--epochs", "30"])
    run = next((tmp_path / "dead").glob(f"{script}-ds2-*"))
    assert str(run / "ckpt.pt") in str(err.value)
    ckpt = common.load_checkpoint(run)
    assert 1 <= ckpt["epoch"] < 30 and 0 < ckpt["nonfinite"] <= 20 and all_finite(ckpt)


def test_checkpoints_refuse_nonfinite_optimizer_state_and_statistics(tmp_path):
    good = dict(script="energy", ds=2, model={"w": torch.ones(2)}, stats={"mean": torch.zeros(2), "std": torch.ones(2)})
    common.save_checkpoint(tmp_path / "ckpt.pt", epoch=1, **good)
    for change in ({"optimizer": {"state": {0: {"exp_avg": torch.tensor([np.inf])}}}},
                   {"stats": {"mean": torch.tensor([np.nan]), "std": torch.ones(1)}}):
        expect_error(lambda: common.save_checkpoint(tmp_path / "ckpt.pt", epoch=2, **{**good, **change}),
                     "non-finite", "(epoch 1)")
    assert common.load_checkpoint(tmp_path)["epoch"] == 1 and files_under(tmp_path) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- outputs
def test_an_output_folder_that_takes_no_file_fails_before_the_work(chain, toy_ds2, tmp_path, monkeypatch):
    import bespoke
    import energy
    import latent_vit
    import shape_vit
    import vae
    for mod, name in ((shape_vit, "generate"), (latent_vit, "generate"), (energy, "sample_u"),
                      (vae, "decoded_to_showers"), (bespoke, "make_pool")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("the work started"))
    (tmp_path / "file").write_text("a file, not a folder")
    folders = [tmp_path / "file" / "sub"]
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        folders.append(tmp_path / "ro")
    for folder in folders:
        sample = ["--steps", "1", *QUIET]
        for main, argv in (
                (shape_vit.main, ["--sample", "--ckpt", chain["shape_vit"], "--cond", chain["cond"], *sample]),
                (latent_vit.main, ["--sample", "--ckpt", chain["latent_vit"], "--cond", chain["cond"], *sample]),
                (energy.main, ["--sample", "--ckpt", chain["energy"], "--n", "5", *sample]),
                (vae.main, ["--decode", chain["latents"], "--ckpt", chain["vae"], *QUIET]),
                (vae.main, ["--reconstruct", "--ckpt", chain["vae"], "--like", toy_ds2 / "toy_ds2_ref.hdf5", *QUIET])):
            expect_error(lambda: main([*map(str, argv), "--output", str(folder / "x.hdf5")]), "cannot write")
        expect_error(lambda: bespoke.train(bespoke.parse_args(["--ckpt", str(chain["shape_vit"]), "--cond",
                                                                 str(chain["cond"]), "--out", str(folder), *QUIET])),
                     "cannot write")
    expect_error(lambda: shape_vit.main(["--sample", "--ckpt", str(chain["shape_vit"]), "--cond", str(chain["cond"]),
                                         "--output", str(tmp_path), "--overwrite", *QUIET]), "is a folder")
    assert files_under(tmp_path) == ["file"]


def test_temporary_files_of_dead_writers_go_and_live_writers_are_refused(chain, tmp_path):
    import shape_vit
    out, dead, live = tmp_path / "gen.hdf5", dead_pid(), os.getppid()
    argv = ["--sample", "--ckpt", str(chain["shape_vit"]), "--cond", str(chain["cond"]), "--n", "3", "--steps", "1",
            "--output", str(out), *QUIET]
    (tmp_path / f".gen.hdf5.{live}.tmp").write_bytes(b"being written")
    expect_error(lambda: shape_vit.main(argv), f"another process (pid {live}) is writing")
    (tmp_path / f".gen.hdf5.{live}.tmp").rename(tmp_path / f".gen.hdf5.{dead}.tmp")  # its writer was killed
    assert shape_vit.main(argv) == out and common.load_showers(out, 2)[1].shape == (3, 6480)
    assert files_under(tmp_path) == ["gen.hdf5", "gen.hdf5.json"]
    run = common.make_run_dir("energy", 2, tmp_path / "runs")  # a checkpoint's temporary file goes the same way
    (run / f".ckpt.pt.{dead}.tmp").write_bytes(b"half a checkpoint")
    common.save_checkpoint(run / "ckpt.pt", script="energy", ds=2, model={"w": torch.ones(1)})
    assert files_under(run) == [".lock", "ckpt.pt"]


def test_an_output_made_meanwhile_is_never_replaced(toy_ds2, tmp_path, monkeypatch):
    import evaluate
    out = tmp_path / "c.hdf5"
    w = common.H5Writer(out, 2, {"u": (45,)}).__enter__()
    w.write(np.zeros((2, 45)))
    out.write_bytes(b"the other writer's")  # another writer finished first
    with pytest.raises(common.OutputError, match="written by another process meanwhile"):
        w.__exit__(None, None, None)
    assert out.read_bytes() == b"the other writer's" and files_under(tmp_path) == ["c.hdf5"]
    ref, ev = toy_ds2 / "toy_ds2_ref.hdf5", tmp_path / "ev"
    real = evaluate.run_modes
    monkeypatch.setattr(evaluate, "run_modes", lambda *a: (real(*a), ev.mkdir(), (ev / "x").write_text("other")))
    expect_error(lambda: evaluate.main(["-i", str(ref), "-r", str(ref), "-m", "timing", "--out", str(ev)]),
                 "written by another run meanwhile")
    assert files_under(tmp_path) == ["c.hdf5", "ev/x"]


def test_a_second_trainer_on_a_live_run_folder_is_refused(toy_ds2, tmp_path):
    import energy
    argv = ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--epochs", "2", "--stop-after", "1", *ENERGY]
    run = energy.main(argv + ["--out", str(tmp_path)])
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl, os, sys, time\nf = open({str(run / '.lock')!r}, "
                               f"'w')\nfcntl.flock(f, fcntl.LOCK_EX)\nf.write(str(os.getpid()))\nf.flush()\n"
                               f"print('held', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    for resume in (["--resume", str(run)], ["--resume", "--out", str(tmp_path)]):  # the folder, or the newest run
        expect_error(lambda: energy.main([*resume, *QUIET]), f"in use by a running training (pid {holder.pid})")
    holder.kill()
    holder.wait()
    assert energy.main(["--resume", str(run), *QUIET]) == run and common.load_checkpoint(run)["epoch"] == 2


SLOW_WRITER = """import sys, time, common, shape_vit
real = common.H5Writer.write
def write(self, *a):
    real(self, *a)
    print("writing", flush=True)
    time.sleep(120)
common.H5Writer.write = write
shape_vit.main(sys.argv[1:])
"""


def test_a_killed_sampler_leaves_a_temporary_file_that_the_next_run_removes(chain, toy_ds2, tmp_path):
    """While a sampler writes, a second one with the same --output is refused; after kill -9 its temporary file
    (its pid in the name) goes at the next run, which writes the output."""
    import shape_vit
    out = tmp_path / "gen.hdf5"
    argv = list(map(str, ["--sample", "--ckpt", chain["shape_vit"], "--cond", chain["cond"], "--n", "4", "--steps",
                          "1", "--batch-size", "2", "--output", out, *QUIET]))
    proc = start(["-c", SLOW_WRITER, *argv])  # caught at work after its first batch
    while proc.stdout.readline() not in ("writing\n", ""):
        pass
    tmp = tmp_path / f".gen.hdf5.{proc.pid}.tmp"
    assert tmp.is_file(), proc.stderr.read()[-2000:]
    expect_error(lambda: shape_vit.main(argv), f"another process (pid {proc.pid})")
    proc.kill()
    proc.wait()
    assert tmp.is_file() and not out.exists()
    assert shape_vit.main(argv) == out and files_under(tmp_path) == ["gen.hdf5", "gen.hdf5.json"]


DEMO_PARENT = """import subprocess, sys, time
sys.path.insert(0, {tools!r})
import common, demo
chain = demo.Chain(demo.parse_args(["--out", {out!r}]))
common.lock_folder({run!r})
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=demo.die_with(os.getpid()))
print(child.pid, flush=True)
time.sleep(60)
"""


def test_demo_stages_die_with_it_and_a_rerun_starts_no_second_trainer(tmp_path):
    import demo
    out, run = tmp_path / "demo", tmp_path / "demo" / "runs" / "energy-ds2-1"
    run.mkdir(parents=True)
    parent = subprocess.Popen([sys.executable, "-c", "import os\n" + DEMO_PARENT.format(
        tools=str(ROOT / "tools"), out=str(out), run=str(run))], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    expect_error(lambda: demo.Chain(demo.parse_args(["--out", str(out)])), "in use by a running demo.py")
    chain = demo.Chain.__new__(demo.Chain)
    chain.dir, chain.ds = out, 2
    with pytest.raises(SystemExit, match=f"in use by a running training \\(pid {parent.pid}\\)"):
        chain.refuse_live("energy")
    parent.kill()  # kill -9: the stage goes with it
    parent.wait()
    for _ in range(100):
        if not common.pid_alive(child) or open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the stage outlived demo.py")
    chain.refuse_live("energy")  # nothing runs there now
    assert demo.Chain(demo.parse_args(["--out", str(out)])).dir == out


# ----------------------------------------------------------------------------- as a user meets it
RUNNER = """import json, os, resource, runpy, signal, sys, tempfile, traceback
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond RLIMIT_FSIZE fails with EFBIG, as on a full disk
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
results = {}
for name, (argv, limit) in json.loads(sys.argv[1]).items():
    sys.argv, rc = argv, 0
    with tempfile.TemporaryFile("w+") as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)  # the terminal's stderr: what Python and HDF5 print there
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit or hard, hard))
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:  # what the interpreter does with it at the top level
            rc = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            rc = 1
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        sys.stderr.flush()
        os.dup2(saved, 2)
        err.seek(0)
        results[name] = (rc, err.read())
print(json.dumps(results))
"""


def test_command_lines(chain, bad, toy_ds2, tmp_path):
    """Every stage's command line as a user meets it (its `__main__` block, one process for all): one `error:`
    line and exit 1 for a bad input and for a full disk (sampling, checkpoints, synthetic showers), and nothing
    left behind."""
    ref, quiet = toy_ds2 / "toy_ds2_ref.hdf5", [*QUIET, "--out", tmp_path / "runs"]
    cases = {  # name -> (argv, bytes per file or None, words)
        "energy_full_disk": (["energy.py", "--files", toy_ds2 / "toy_ds2_train.hdf5", "--epochs", "1", *ENERGY,
                              "--out", tmp_path / "runs"], 100_000, ["ckpt.pt", "no checkpoint was written"]),
        "shape_vit_full_disk": (["shape_vit.py", "--sample", "--ckpt", chain["shape_vit"], "--cond", chain["cond"],
                                 "--steps", "1", "--output", tmp_path / "gen.hdf5", *QUIET], 50_000, ["gen.hdf5"]),
        "toy_full_disk": (["data/prepare.py", "toy", "--n", "200", "--n-ref", "10", "--out", tmp_path / "toy",
                           "--no-progress"], 50_000, ["toy_ds2_train.hdf5"]),
        "vae_decode": (["vae.py", "--decode", bad["l_nan"], *quiet], None, ["NaN/inf mu"]),
        "latent_vit": (["latent_vit.py", "--latents", bad["l_rows"], "--epochs", "1", *quiet], None, ["latent file"]),
        "bespoke": (["bespoke.py", "--ckpt", bad["text_ckpt"], *quiet], None, ["not a readable checkpoint"]),
        "evaluate": (["evaluate.py", "-i", bad["damaged"], "-r", ref, "-m", "hist", "--out", tmp_path / "ev",
                      "--no-progress"], None, ["cannot be read"])}
    jobs = {name: (list(map(str, argv)), limit) for name, (argv, limit, _) in cases.items()}
    proc = start(["-c", RUNNER, json.dumps(jobs)])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    for name, (rc, stderr) in json.loads(out.splitlines()[-1]).items():
        assert_one_error_line(subprocess.CompletedProcess(name, rc, "", stderr), *cases[name][2])
    left = [f for f in files_under(tmp_path) if not f.endswith(("log.txt", ".lock"))]
    assert left == [], left
