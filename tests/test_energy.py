"""energy.py: training lowers the loss, exact resume, the key/value-cache sampler, the condition file it writes."""
import h5py
import pytest
import torch

import common
import energy
from conftest import QUIET

TINY = ["--preset", "tiny", "--max-showers", "300", "--batch-size", "32", "--val-every", "1", "--ckpt-every", "1",
        *QUIET]


def test_presets_are_the_paper_sizes():
    counts = {k: common.count_parameters(common.EnergyNet(**v)) for k, v in energy.PRESETS.items()}
    assert counts["paper"] == 1_695_297 and counts["challenge"] == 2_384_705


def test_tiny_run_lowers_loss(chain):
    ckpt = common.load_checkpoint(chain["energy"], script="energy", ds=2)
    losses = ckpt["history"]["train_loss"]
    assert ckpt["epoch"] == 3 and ckpt["step"] == 3 * (270 // 32) and ckpt["model_args"] == energy.PRESETS["tiny"]
    assert losses[-1] < losses[0] - 0.05
    assert [e for e, _ in ckpt["history"]["val_loss"]] == [1, 2, 3]
    assert (chain["energy"] / "log.txt").read_text().count("samples/s") == 3


def test_resume_is_exact(toy_ds2, tmp_path, chain):
    """1 epoch, stopped, resumed for 2 more == the uninterrupted 3-epoch run, bit for bit."""
    argv = ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--epochs", "3", "--out", str(tmp_path), *TINY]
    run = energy.main(argv + ["--stop-after", "1"])
    assert common.load_checkpoint(run)["epoch"] == 1
    assert energy.main(["--resume", "--out", str(tmp_path), *QUIET]) == run  # bare --resume: the newest run
    a, b = common.load_checkpoint(chain["energy"]), common.load_checkpoint(run)
    assert b["epoch"] == 3 and b["step"] == a["step"] and a["history"] == b["history"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_sampler_equals_training_model(chain):
    """One Euler step from t=0: the sampler's split head (z_i and t parts precomputed, KV cache) gives
    exactly the velocity of the training forward pass on the sampled prefix; cached == uncached."""
    model, _ = energy.load_model(chain["energy"], 2, "cpu")
    c_e, x0 = torch.rand(7), torch.randn(7, 45)
    z = energy.sample_z(model, c_e, x0, solver="euler", steps=1)
    with torch.no_grad():
        v = model(z, c_e, x0, torch.zeros(7, 45))
    torch.testing.assert_close(z - x0, v, atol=1e-5, rtol=1e-5)
    cached = energy.sample_z(model, c_e, x0, solver="rk4", steps=4, cache=True)
    torch.testing.assert_close(cached, energy.sample_z(model, c_e, x0, solver="rk4", steps=4, cache=False),
                               atol=1e-5, rtol=1e-5)


def test_sampled_u_are_physical_and_seeded(chain):
    model, ckpt = energy.load_model(chain["energy"], 2, "cpu")
    e_inc = common.sample_e_inc(100, torch.Generator().manual_seed(0))
    u = energy.sample_u(model, ckpt["stats"], e_inc, "cpu", "midpoint", 3, batch_size=40, seed=1, progress=False)
    assert u.shape == (100, 45) and u.dtype == torch.float64 and torch.isfinite(u).all()
    assert (u[:, 1:] >= 0).all() and (u[:, 1:] <= 1).all()
    e_layer = common.u_to_energies(e_inc, u)
    assert (e_layer >= 0).all() and (e_layer.sum(1) / e_inc > 0).all()
    again = energy.sample_u(model, ckpt["stats"], e_inc, "cpu", "midpoint", 3, batch_size=100, seed=1, progress=False)
    torch.testing.assert_close(u, again)  # the same x0 whatever the batch size
    with pytest.raises(common.DataError, match="dataset-2"):
        energy.load_model(chain["energy"], 3, "cpu")


def test_condition_file(chain, toy_ds2, tmp_path):
    with h5py.File(chain["cond"], "r") as f, h5py.File(toy_ds2 / "toy_ds2_ref.hdf5", "r") as ref:
        assert f["u"].shape == (40, 45) and f["incident_energies"].shape == (40, 1)
        assert (f["incident_energies"][:] == ref["incident_energies"][:40]).all()  # --like: its E_inc in order
        assert dict(f.attrs) | {"seconds": 0} == dict(format="calodream-conditions", ds=2, steps=2, solver="rk4",
                                                      seed=0, epoch=3, checkpoint=str(chain["energy"]), seconds=0,
                                                      like=str(toy_ds2 / "toy_ds2_ref.hdf5"))
    argv = ["--sample", "--ckpt", str(chain["energy"]), "--n", "7", "--steps", "1", "--output", str(tmp_path / "c.hdf5"),
            *QUIET]
    e_inc, _, _ = common.read_conditions(energy.main(argv), 2)
    assert len(e_inc) == 7 and ((e_inc >= common.E_MIN) & (e_inc <= common.E_MAX)).all()  # log-uniform
    with pytest.raises(FileExistsError):
        energy.main(argv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_sampler_agrees(chain):
    model, _ = energy.load_model(chain["energy"], 2, "cuda")
    c_e, x0 = torch.rand(64, device="cuda"), torch.randn(64, 45, device="cuda")
    eager, graphs = energy.sample_z(model, c_e, x0, steps=4), {}
    for _ in range(2):  # capture, then replay
        got = energy.sample_z(model, c_e, x0, steps=4, graphs=graphs)
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
