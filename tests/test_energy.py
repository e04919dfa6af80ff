"""Tests of energy.py: parameter counts, layout, preprocessing, training, exact resume, KV-cache sampler, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

import common
import energy

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--max-showers", "200", "--batch-size", "32", "--val-every", "1", "--ckpt-every", "1",
        "--no-progress", "--device", "cpu"]


def tiny_args(toy_ds2, out, *extra):
    return energy.parse_args(["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def tiny_run(toy_ds2, tmp_path_factory):
    """A tiny model trained for 4 epochs on 180 toy showers."""
    return energy.train(tiny_args(toy_ds2, tmp_path_factory.mktemp("runs"), "--epochs", "4"))


def test_parameter_counts():
    paper, challenge = (energy.build_model({"preset": p}) for p in ("paper", "challenge"))
    assert common.count_parameters(paper) == 1_695_297  # paper Table 1
    assert common.count_parameters(challenge) == 2_384_705  # CaloChallenge submission
    assert paper.freqs.shape == (32,) and not paper.freqs.requires_grad  # frozen, not counted
    assert "freqs" in paper.state_dict()  # but saved: the sampler needs the same frequencies


def test_transformer_is_the_torch_layout():
    """Our layers take nn.Transformer's state dict as is and compute the same thing (post-LN, final norms)."""
    model = energy.build_model({"preset": "paper"})
    ref = torch.nn.Transformer(64, 4, 4, 4, 1024, dropout=0.0, batch_first=True).eval()
    model.transformer.load_state_dict(ref.state_dict(), strict=True)
    c_e, values = torch.rand(5), torch.randn(5, 45)
    tgt = torch.nn.functional.pad(values.unsqueeze(-1), (0, 63)) + model.positions
    src = torch.nn.functional.pad(torch.stack([c_e, torch.ones(5)], -1), (0, 62)).unsqueeze(1)
    expected = ref(src, tgt, tgt_mask=ref.generate_square_subsequent_mask(45), tgt_is_causal=True)
    with torch.no_grad():
        got = model.decode(values, model.encode(c_e))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_shapes_and_tokens():
    model = energy.build_model({"preset": "tiny"})
    z, c_e, x_t, t = torch.randn(3, 45), torch.rand(3), torch.randn(3, 45), torch.rand(3, 45)
    assert model(z, c_e, x_t, t).shape == (3, 45)
    assert model.context(z, c_e).shape == (3, 45, 64)
    assert model.positions.sum(0)[1:46].tolist() == [1.0] * 45  # one-hot(i) in columns 1..45 of 46
    # causality: z_i depends on u_0..u_{i-1} only
    z2 = z.clone()
    z2[:, 10] += 1.0
    with torch.no_grad():
        diff = (model.context(z2, c_e) - model.context(z, c_e)).abs().amax((0, 2))
    assert (diff[:11] == 0).all() and (diff[11:] > 0).all()


def test_load_u_and_preprocessing_round_trip(toy_ds2):
    e_inc, u = common.load_u([toy_ds2 / "toy_ds2_train.hdf5"], 2, max_showers=300, progress=False)
    assert e_inc.shape == (300,) and u.shape == (300, 45) and u.dtype == torch.float64
    stats = common.fit_standardizer(common.logit(u))
    back = energy.net_to_u(energy.u_to_net(u, stats), stats)
    torch.testing.assert_close(back, u, atol=1e-5, rtol=1e-4)
    assert torch.equal(back[u == 0], u[u == 0]) and torch.equal(back[u == 1], u[u == 1])  # point masses exact


def test_tiny_run_lowers_loss(tiny_run):
    ckpt = common.load_checkpoint(tiny_run, script="energy", ds=2)
    losses = ckpt["history"]["train_loss"]
    assert ckpt["epoch"] == 4 and len(losses) == 4 and ckpt["step"] == 4 * 6  # 180 events / 32
    assert losses[-1] < losses[0] - 0.05
    assert [e for e, _ in ckpt["history"]["val_loss"]] == [1, 2, 3, 4]
    assert (tiny_run / "log.txt").read_text().count("samples/s") == 4


def test_resume_is_exact(toy_ds2, tmp_path, tiny_run):
    """2 epochs, 'killed', resumed for 2 more == the uninterrupted 4-epoch run, bit for bit."""
    run = energy.train(tiny_args(toy_ds2, tmp_path, "--epochs", "4"), stop_after=2)
    assert common.load_checkpoint(run)["epoch"] == 2
    energy.train(energy.parse_args(["--resume", str(run), "--no-progress", "--device", "cpu"]))
    a, b = common.load_checkpoint(tiny_run), common.load_checkpoint(run)
    assert b["epoch"] == 4 and b["step"] == a["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_sampler_equals_training_model(tiny_run):
    """One Euler step from t=0: the sampler's split head (z_i and t parts precomputed, KV cache) gives
    exactly the velocity of the training forward pass on the sampled prefix."""
    sampler = energy.load_energy_sampler(tiny_run, 2, "cpu", progress=False)
    model, c_e, x0 = sampler.model, torch.rand(7), torch.randn(7, 45)
    z = energy.sample_z(model, c_e, x0, solver="euler", steps=1)
    with torch.no_grad():
        v = model(z, c_e, x0, torch.zeros(7, 45))
    torch.testing.assert_close(z - x0, v, atol=1e-5, rtol=1e-5)


def test_cached_and_uncached_samplers_agree(tiny_run):
    model = energy.load_energy_sampler(tiny_run, 2, "cpu", progress=False).model
    c_e, x0 = torch.rand(50), torch.randn(50, 45)
    cached = energy.sample_z(model, c_e, x0, solver="rk4", steps=4, cache=True)
    uncached = energy.sample_z(model, c_e, x0, solver="rk4", steps=4, cache=False)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


def test_sampler_output_is_physical(tiny_run):
    sampler = energy.load_energy_sampler(tiny_run, 2, "cpu", solver="midpoint", steps=3, batch_size=40,
                                         progress=False)
    e_inc = common.sample_e_inc(100, torch.Generator().manual_seed(0))
    u = sampler(e_inc, torch.Generator().manual_seed(1))
    assert u.shape == (100, 45) and u.dtype == torch.float64 and torch.isfinite(u).all()
    assert (u[:, 1:] >= 0).all() and (u[:, 1:] <= 1).all()
    e_layer = common.u_to_energies(e_inc, u)
    assert (e_layer >= 0).all() and (e_layer.sum(1) / e_inc > 0).all()
    assert torch.equal(u, sampler(e_inc, torch.Generator().manual_seed(1)))  # seeded: reproducible
    with pytest.raises(common.DataError):
        energy.load_energy_sampler(tiny_run, 3, "cpu")


def test_sample_cli(toy_ds2, tiny_run, tmp_path):
    out = tmp_path / "u.hdf5"
    argv = ["--sample", "--ckpt", str(tiny_run), "--like", str(toy_ds2 / "toy_ds2_ref.hdf5"), "--n", "20",
            "--steps", "2", "--output", str(out), "--no-progress"]
    energy.main(argv)
    with h5py.File(out, "r") as f, h5py.File(toy_ds2 / "toy_ds2_ref.hdf5", "r") as ref:
        assert f["u"].shape == (20, 45) and f["incident_energies"].shape == (20, 1)
        assert (f["incident_energies"][:] == ref["incident_energies"][:20]).all()
    with pytest.raises(FileExistsError):
        energy.main(argv)


def test_score_and_steps_study(toy_ds2, tiny_run, tmp_path):
    """--score: classifier AUC of sampled vs true u's; several solvers at equal NFE make a table (same x0)."""
    like = ["--sample", "--ckpt", str(tiny_run), "--like", str(toy_ds2 / "toy_ds2_ref.hdf5"), "--n", "100",
            "--cls-epochs", "2", "--cls-width", "16", "--cls-repeats", "2", "--no-progress"]
    out = energy.main([*like, "--solver", "rk4", "euler", "--nfe", "4", "8", "--output", str(tmp_path / "s.json")])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["solver"], r["steps"], r["nfe"]) for r in rows] == [("rk4", 1, 4), ("rk4", 2, 8), ("euler", 4, 4),
                                                                   ("euler", 8, 8)]
    assert all(0 <= r["auc"] <= 1 and len(r["aucs"]) == 2 for r in rows)
    assert rows[1]["auc_minus_ref"] == 0  # the reference: RK4 at the most NFE
    single = energy.main([*like, "--steps", "2", "--score", "--output", str(tmp_path / "u.hdf5")])
    assert json.loads(single.with_suffix(".json").read_text())["auc"] == rows[1]["auc"]  # same x0, same classifier
    with pytest.raises(ValueError, match="not a multiple"):
        energy.main([*like, "--solver", "rk4", "--nfe", "6", "--output", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="--like"):
        energy.main(["--sample", "--ckpt", str(tiny_run), "--score", "--n", "10", "--output", str(tmp_path / "y")])


def test_cli_missing_file_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "energy.py", "--files", str(tmp_path / "nope.hdf5"), "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0 and "nope.hdf5" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_sampler_agrees(tiny_run):
    model = energy.load_energy_sampler(tiny_run, 2, "cuda", progress=False).model
    c_e, x0 = torch.rand(64, device="cuda"), torch.randn(64, 45, device="cuda")
    eager, graphs = energy.sample_z(model, c_e, x0, steps=4), {}
    for _ in range(2):  # capture, then replay
        got = energy.sample_z(model, c_e, x0, steps=4, graphs=graphs)
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
