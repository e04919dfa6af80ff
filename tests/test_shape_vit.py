"""shape_vit.py: parameter counts, adaLN-Zero, a tiny train + sample end to end, exact resume, errors."""
import json
import subprocess
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import common
import shape_vit

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "12", "--heads", "2", "--mlp", "24", "--depth", "1", "--patch", "3", "16", "9",
        "--batch-size", "32", "--no-progress"]


def fake_showers(n, seed):
    """Sparse showers with a longitudinal and radial profile (DS2 geometry)."""
    rng = np.random.default_rng(seed)
    g = common.geometry(2)
    e_inc = np.exp(rng.uniform(np.log(1e3), np.log(1e6), n))
    profile = np.exp(-((np.arange(45) - 12) / 8.0) ** 2)[:, None, None] * np.exp(-np.arange(g.n_r) / 2.0)
    x = rng.exponential(1.0, (n, *g.shape)) * profile * (rng.random((n, *g.shape)) > 0.6)
    x = x / x.sum((1, 2, 3), keepdims=True) * (0.3 * e_inc)[:, None, None, None]
    x[x < common.MIN_ENERGY] = 0
    return e_inc, x.reshape(n, -1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shape_vit")
    common.write_showers(folder / "train.hdf5", *fake_showers(96, 1), ds=2)
    common.write_showers(folder / "ref.hdf5", *fake_showers(24, 2), ds=2)
    return folder


@pytest.fixture(scope="module")
def run(data):
    """A tiny trained run (3 epochs)."""
    return shape_vit.main(["--files", str(data / "train.hdf5"), "--out", str(data / "runs"), "--epochs", "3",
                           *TINY])


def tiny_model():
    args = shape_vit.resolve(shape_vit.parse_args(TINY))
    return common.ViT(shape_vit.vit_config(args))


@pytest.mark.parametrize("ds, count", [(2, 26_042_688), (3, 5_868_870)])
def test_paper_parameter_counts(ds, count):
    args = shape_vit.resolve(shape_vit.parse_args(["--ds", str(ds)]))
    assert common.count_parameters(common.ViT(shape_vit.vit_config(args))) == count


def test_output_is_zero_at_init():
    model = tiny_model()
    x, cond = torch.randn(4, 1, 45, 16, 9), torch.randn(4, 46)
    out = model(x, torch.rand(4), cond)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def test_training_lowers_the_loss():
    e_inc, showers = (torch.as_tensor(a, dtype=torch.float32) for a in fake_showers(64, 3))
    stats = common.fit_shape_stats(e_inc.numpy(), showers.numpy(), 2)
    torch.manual_seed(0)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(80):
        gen = torch.Generator().manual_seed(step % 4)  # a few fixed draws: the loss must fall
        loss = shape_vit.batch_loss(model, showers, e_inc, stats, 2, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.03  # from ~2.0 (zero output) downwards


def test_train_and_sample_end_to_end(data, run):
    ckpt = common.load_checkpoint(run, script="shape_vit", ds=2)
    assert ckpt["epoch"] == 3 and len(ckpt["history"]["train_loss"]) == 3
    assert all(np.isfinite(ckpt["history"]["train_loss"])) and ckpt["history"]["val_loss"][-1] is not None
    ref = data / "ref.hdf5"
    args = ["--sample", "--ckpt", str(run), "--energy-ckpt", "truth", "--like", str(ref), "--steps", "3",
            "--batch-size", "10", "--no-progress"]
    out = shape_vit.main(args + ["--output", str(data / "gen.hdf5")])
    with h5py.File(out) as f:
        assert set(f) == {"incident_energies", "showers"}
        assert f["showers"].shape == (24, 6480) and f["incident_energies"].shape == (24, 1)
        assert f["showers"].dtype == np.float64 and f["incident_energies"].dtype == np.float64
    e_gen, x_gen = common.load_showers(out, 2, progress=False)
    e_ref, x_ref = common.load_showers(ref, 2, progress=False)
    np.testing.assert_array_equal(e_gen, e_ref)
    assert ((x_gen == 0) | (x_gen >= common.MIN_ENERGY)).all()
    # per-layer energies are the requested ones, less what the 15.15 keV threshold removed
    lay_gen, lay_ref = (common.layer_energies(torch.as_tensor(x, dtype=torch.float64), 2) for x in (x_gen, x_ref))
    lost = lay_ref - lay_gen
    assert (lost > -1e-3 * lay_ref - 1e-6).all() and (lost < 144 * common.MIN_ENERGY + 1e-3 * lay_ref).all()
    info = json.loads(Path(f"{out}.json").read_text())
    assert (info["solver"], info["steps"], info["nfe"], info["n"]) == ("rk4", 3, 12, 24)
    # same seed, same file
    again = shape_vit.main(args + ["--output", str(data / "gen2.hdf5")])
    with h5py.File(out) as f, h5py.File(again) as g:
        np.testing.assert_array_equal(f["showers"][:], g["showers"][:])
    with pytest.raises(FileExistsError):
        shape_vit.main(args + ["--output", str(out)])


def test_sampling_through_the_energy_network(data, run, monkeypatch):
    calls = []

    def chain_u(path, ds, e_inc, device, solver, steps, seed, progress=True):
        calls.append((path, len(e_inc), solver, steps))
        u = torch.rand(len(e_inc), 45, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        u[:, 0] = 0.3
        return u, "fake"

    monkeypatch.setitem(sys.modules, "energy", types.SimpleNamespace(chain_u=chain_u))
    out = shape_vit.main(["--sample", "--ckpt", str(run), "--energy-ckpt", "fake", "--n", "7", "--solver", "euler",
                          "--steps", "2", "--energy-solver", "midpoint", "--energy-steps", "3", "--no-progress",
                          "--output", str(data / "gen_energy.hdf5")])
    e_inc, showers = common.load_showers(out, 2, progress=False)
    assert calls == [("fake", 7, "midpoint", 3)] and showers.shape == (7, 6480)
    assert json.loads(Path(f"{out}.json").read_text())["batch_size"] == 1000  # not the training batch
    assert ((e_inc >= common.E_MIN) & (e_inc <= common.E_MAX)).all()
    lost = 0.3 / common.U0_SCALE * e_inc - showers.sum(1)  # E_tot from u_0, less the threshold cut
    assert (lost > -1e-6 * e_inc).all() and (lost < 45 * 144 * common.MIN_ENERGY).all()


def test_resume_is_exact(data):
    base = ["--files", str(data / "train.hdf5"), "--epochs", "2", "--seed", "3", *TINY]
    straight = shape_vit.main(base + ["--out", str(data / "straight")])
    half = shape_vit.main(base + ["--out", str(data / "halves"), "--stop-after", "1"])
    assert common.load_checkpoint(half)["epoch"] == 1
    resumed = shape_vit.main(["--resume", str(half), "--no-progress"])
    a, b = common.load_checkpoint(straight), common.load_checkpoint(resumed)
    assert resumed == half and b["epoch"] == 2 and a["history"] == b["history"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_wrong_checkpoints_give_one_line_errors(data, run):
    other = data / "energy_ckpt.pt"
    common.save_checkpoint(other, script="energy", ds=2)
    with pytest.raises(common.DataError, match="written by 'energy'"):
        shape_vit.main(["--sample", "--ckpt", str(other), "--n", "2"])
    with pytest.raises(common.DataError, match="dataset-2 checkpoint"):
        shape_vit.main(["--sample", "--ds", "3", "--ckpt", str(run), "--n", "2"])
    with pytest.raises(ValueError, match="--like"):
        shape_vit.main(["--sample", "--ckpt", str(run), "--energy-ckpt", "truth", "--n", "2"])
    res = subprocess.run([sys.executable, "shape_vit.py", "--sample", "--ckpt", str(data / "missing")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("error: checkpoint") and "not found" in res.stderr
