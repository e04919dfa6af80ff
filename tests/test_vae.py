"""vae.py: exact parameter counts, shapes, tiny training, exact resume, reconstruction file, normalised cut."""
import numpy as np
import pytest
import torch

import common as C
import vae as V

TINY = ["--channels", "2", "--batch-size", "8", "--max-showers", "24", "--val-fraction", "0.25", "--no-progress"]


def _tiny_args(toy_ds2, out, *extra):
    return ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--out", str(out), *TINY, *extra]


@pytest.fixture(scope="module")
def vae_run(toy_ds2, tmp_path_factory):
    return V.main(_tiny_args(toy_ds2, tmp_path_factory.mktemp("vae_runs"), "--epochs", "1"))


def test_parameter_counts_match_spec():
    assert C.count_parameters(V.VAE(2)) == 901_093
    assert C.count_parameters(V.VAE(3)) == 1_103_845


@pytest.mark.parametrize("ds", [2, 3])
def test_latent_and_decoder_shapes(ds):
    torch.manual_seed(0)
    model = V.VAE(ds, channels=4).eval()
    frac = torch.rand(2, 1, *C.geometry(ds).shape)
    cond = torch.randn(2, 46)
    mu, logvar = model.encode(frac, cond)
    assert mu.shape == logvar.shape == (2, *V.PRESETS[ds]["latent"])
    out = model.decode(mu, cond)
    assert out.shape == frac.shape  # the decoder returns exactly the input grid
    assert ((out > 0) & (out < 1)).all()
    assert model.encode(frac[:, 0], cond)[0].shape == mu.shape  # (B, 45, A, R) is accepted too


def test_tiny_training_lowers_the_loss(toy_ds2):
    e_inc, showers = C.load_showers(toy_ds2 / "toy_ds2_train.hdf5", 2, max_showers=8, progress=False)
    u = C.energies_to_u(torch.from_numpy(e_inc), C.layer_energies(torch.from_numpy(showers), 2))
    frac, cond, _ = V.batch_inputs(e_inc, showers, 2, C.fit_standardizer(C.u_features(u)), "cpu")
    torch.manual_seed(0)
    model = V.VAE(2, channels=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(10):
        loss, bce = V.vae_loss(model, frac, cond, beta=1e-5, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.95 * losses[0]


def test_resume_gives_identical_weights(toy_ds2, tmp_path):
    full = V.main(_tiny_args(toy_ds2, tmp_path / "a", "--epochs", "2"))
    part = V.main(_tiny_args(toy_ds2, tmp_path / "b", "--epochs", "2", "--stop-after", "1"))
    assert C.load_checkpoint(part, "vae", 2)["epoch"] == 1
    V.main(["--resume", str(part), "--no-progress"])
    a, b = C.load_checkpoint(full, "vae", 2), C.load_checkpoint(part, "vae", 2)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"]["train_loss"] == b["history"]["train_loss"]


def test_reconstruct_writes_a_valid_file(vae_run, toy_ds2, tmp_path):
    ref = toy_ds2 / "toy_ds2_ref.hdf5"
    out = V.main(["--reconstruct", "--ckpt", str(vae_run), "--like", str(ref), "--n", "20", "--batch-size", "8",
                  "--cut", "1e-5", "--output", str(tmp_path / "rec.hdf5"), "--no-progress"])
    e_rec, x_rec = C.load_showers(out, 2, progress=False)
    e_ref, x_ref = C.load_showers(ref, 2, max_showers=20, progress=False)
    assert x_rec.shape == (20, 6480) and np.array_equal(e_rec, e_ref)
    assert (x_rec >= 0).all() and ((x_rec == 0) | (x_rec >= C.MIN_ENERGY)).all()
    # per-layer renormalisation: every layer keeps its energy (up to what the 15.15 keV cut removes)
    l_rec, l_ref = x_rec.reshape(20, 45, -1).sum(-1), x_ref.reshape(20, 45, -1).sum(-1)
    assert (l_rec <= l_ref * (1 + 1e-5) + 1e-6).all()
    assert np.allclose(l_rec.sum(1), l_ref.sum(1), rtol=0.05)
    vae, ckpt = V.load_vae(vae_run, 2)
    assert not vae.training and ckpt["cut"] is not None  # calibrated at the end of training
    with pytest.raises(FileExistsError):
        V.main(["--reconstruct", "--ckpt", str(vae_run), "--like", str(ref), "--n", "4", "--output", str(out)])


def test_normalised_cut_restores_exact_zeros():
    torch.manual_seed(0)
    frac = torch.full((3, 45, 16, 9), 1e-3)  # a sigmoid decoder's floor: never exactly zero
    frac[:, :, :4, :3] = torch.rand(3, 45, 4, 3) + 0.5
    layer_e = torch.full((3, 45), 1000.0)
    x = V.decoded_to_showers(frac, layer_e, cut=1e-3).reshape(3, 45, 16, 9)
    norm = frac / frac.sum((-2, -1), keepdim=True)
    assert (x[norm < 1e-3] == 0).all() and (x[norm >= 1e-3] > 0).all()
    assert torch.allclose(x.sum((-2, -1)), layer_e.double())  # renormalised after the cut
    x_none = V.decoded_to_showers(frac, layer_e, cut=0.0)
    assert (x_none > 0).all()  # without the cut no voxel is empty
    x_all = V.decoded_to_showers(frac, layer_e, cut=0.9).reshape(3, 45, -1)  # above every fraction:
    assert ((x_all > 0).sum(-1) == 1).all() and torch.allclose(x_all.sum(-1), layer_e.double())  # max stays
