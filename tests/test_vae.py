"""vae.py: parameter counts, shapes, training, exact resume, the latent file it writes, decoding and the cut."""
import h5py
import numpy as np
import pytest
import torch

import common as C
import vae as V
from conftest import QUIET


def test_parameter_counts_match_spec():
    assert C.count_parameters(V.VAE(**V.model_args_for(2, 64))) == 901_093
    assert C.count_parameters(V.VAE(**V.model_args_for(3, 64))) == 1_103_845


@pytest.mark.parametrize("ds", [2, 3])
def test_latent_and_decoder_shapes(ds):
    torch.manual_seed(0)
    model = V.VAE(**V.model_args_for(ds, 4)).eval()
    frac, cond = torch.rand(2, 1, *C.geometry(ds).shape), torch.randn(2, 46)
    mu, logvar = model.encode(frac, cond)
    assert mu.shape == logvar.shape == (2, *V.PRESETS[ds]["latent"])
    out = model.decode(mu, cond)
    assert out.shape == frac.shape and ((out > 0) & (out < 1)).all()  # the input grid, in (0, 1)
    assert model.encode(frac[:, 0], cond)[0].shape == mu.shape  # (B, 45, A, R) is accepted too


def test_training_lowers_the_loss(toy_ds2, chain):
    e_inc, showers = C.load_showers(toy_ds2 / "toy_ds2_train.hdf5", 2, max_showers=8, progress=False)
    u = C.energies_to_u(torch.from_numpy(e_inc), C.layer_energies(torch.from_numpy(showers), 2))
    frac, cond, _, _ = V.batch_inputs(e_inc, showers, 2, C.fit_standardizer(C.u_features(u)), "cpu")
    torch.manual_seed(0)
    model = V.VAE(**V.model_args_for(2, 4))
    opt, gen, losses = torch.optim.Adam(model.parameters(), lr=1e-2), torch.Generator().manual_seed(0), []
    for _ in range(10):
        loss, bce = V.vae_loss(model, frac, cond, beta=1e-5, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.95 * losses[0]
    ckpt = C.load_checkpoint(chain["vae"], "vae", 2)
    assert ckpt["cut"] is not None and ckpt["model_args"]["channels"] == 2  # calibrated at the end of training


def test_resume_gives_identical_weights(toy_ds2, tmp_path, chain):
    argv = ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--max-showers", "64", "--channels", "2",
            "--batch-size", "16", "--epochs", "2", "--out", str(tmp_path), *QUIET]
    part = V.main(argv + ["--stop-after", "1"])
    assert C.load_checkpoint(part, "vae", 2)["epoch"] == 1
    V.main(["--resume", str(part), *QUIET])
    a, b = C.load_checkpoint(chain["vae"], "vae", 2), C.load_checkpoint(part, "vae", 2)
    assert a["epoch"] == b["epoch"] == 2 and a["cut"] == b["cut"] and a["history"] == b["history"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_latent_file_and_decode(chain, toy_ds2, tmp_path):
    data, attrs = C.read_latents(chain["latents"], 2)
    assert data["mu"].shape == data["logvar"].shape == (800, 2, 15, 9, 9) and data["u"].shape == (800, 45)
    ckpt = C.load_checkpoint(chain["vae"])
    assert attrs["vae_ckpt"] == str(chain["vae"]) and attrs["vae_step"] == ckpt["step"]
    e_ref, u_ref = C.load_u(toy_ds2 / "toy_ds2_train.hdf5", 2, progress=False)
    np.testing.assert_allclose(data["u"], u_ref.numpy())
    # decoding the posterior means equals --reconstruct of the same showers
    out = V.main(["--decode", str(chain["latents"]), "--n", "20", "--output", str(tmp_path / "dec.hdf5"), *QUIET])
    rec = V.main(["--reconstruct", "--ckpt", str(chain["vae"]), "--like", str(toy_ds2 / "toy_ds2_train.hdf5"),
                  "--n", "20", "--output", str(tmp_path / "rec.hdf5"), *QUIET])
    (e_dec, x_dec), (e_rec, x_rec) = C.load_showers(out, 2, progress=False), C.load_showers(rec, 2, progress=False)
    np.testing.assert_array_equal(e_dec, e_rec)
    np.testing.assert_allclose(x_dec, x_rec, rtol=1e-4, atol=1e-6)
    layers = x_rec.reshape(20, 45, -1).sum(-1)  # every layer keeps its energy, less the 15.15 keV cut
    want = C.u_to_energies(e_ref[:20], u_ref[:20]).numpy()
    assert (layers <= want * (1 + 1e-5) + 1e-6).all() and np.allclose(layers.sum(1), want.sum(1), rtol=0.05)
    with pytest.raises(FileExistsError):
        V.main(["--decode", str(chain["latents"]), "--output", str(out), *QUIET])


def test_decode_refuses_a_vae_in_another_state(chain, tmp_path):
    with h5py.File(chain["latents"]) as f, h5py.File(tmp_path / "lat.hdf5", "w") as g:
        for k in ("incident_energies", "u", "mu"):
            g[k] = f[k][:4]
        g.attrs.update({**f.attrs, "vae_step": 12345})
    with pytest.raises(C.DataError, match="at step 12345"):
        V.main(["--decode", str(tmp_path / "lat.hdf5"), *QUIET])


def test_normalised_cut_restores_exact_zeros():
    torch.manual_seed(0)
    frac = torch.full((3, 45, 16, 9), 1e-3)  # a sigmoid decoder's floor: never exactly zero
    frac[:, :, :4, :3] = torch.rand(3, 45, 4, 3) + 0.5
    layer_e = torch.full((3, 45), 1000.0)
    x = V.decoded_to_showers(frac, layer_e, cut=1e-3).reshape(3, 45, 16, 9)
    norm = frac / frac.sum((-2, -1), keepdim=True)
    assert (x[norm < 1e-3] == 0).all() and (x[norm >= 1e-3] > 0).all()
    assert torch.allclose(x.sum((-2, -1)), layer_e.double())  # renormalised after the cut
    assert (V.decoded_to_showers(frac, layer_e, cut=0.0) > 0).all()  # without the cut no voxel is empty
    x_all = V.decoded_to_showers(frac, layer_e, cut=0.9).reshape(3, 45, -1)  # above every fraction:
    assert ((x_all > 0).sum(-1) == 1).all() and torch.allclose(x_all.sum(-1), layer_e.double())  # the max stays


def test_cut_calibrated_per_layer():
    torch.manual_seed(0)
    frac, layer_e = torch.rand(40, 45, 16, 9), torch.full((40, 45), 1e4)  # normalised fractions ~ U(0, 1) / 72; grid steps: 26 %
    target = torch.linspace(0.2, 0.8, 45)  # the data's empty share per layer
    showers = torch.where(torch.rand(40, 45, 144) < target[:, None], 0.0, 1.0).reshape(40, -1).numpy()
    cuts, info = V.calibrate_decoded(frac, layer_e, showers)
    assert len(cuts) == 45 and all(a <= b for a, b in zip(cuts, cuts[1:]))  # more zeros want a higher cut
    empty = (V.decoded_to_showers(frac, layer_e, cuts, V.CUT_EXPONENT).reshape(40, 45, -1) == 0).double().mean((0, 2))
    assert (empty - target.double()).abs().max() < 0.1 and abs(info["recon_sparsity"] - info["data_sparsity"]) < 0.02
    one = (V.decoded_to_showers(frac, layer_e, 0.5 / 72).reshape(40, 45, -1) == 0).double().mean((0, 2))
    assert (one - target.double()).abs().max() > 0.25  # one cut for all layers misses the ends


def test_cut_falls_with_the_layer_energy():
    torch.manual_seed(0)
    frac = torch.rand(1, 45, 16, 9).expand(2, -1, -1, -1)  # one decoded shape ...
    layer_e = torch.tensor([[10.0] * 45, [1e5] * 45])  # ... at 10 MeV and at 100 GeV in every layer
    hits = lambda x: (x.reshape(2, 45, -1) > 0).sum(-1)  # noqa: E731
    flat = hits(V.decoded_to_showers(frac, layer_e, 1e-2))
    assert torch.equal(flat[0], flat[1])  # a cut on fractions alone: the same empty voxels at every energy
    scaled = hits(V.decoded_to_showers(frac, layer_e, 1e-2, 0.25))
    assert (scaled[1] > scaled[0]).all()  # the energetic layer keeps more voxels, like a threshold in MeV
    assert torch.equal(scaled[0], hits(V.decoded_to_showers(frac, layer_e[:1], 1e-2 * 100 ** 0.25))[0])  # c (E/GeV)^-g
    assert V.cut_of({"cut": [1e-3] * 45}) == ([1e-3] * 45, 0.0)  # older checkpoints decode as they were made


def test_calibrate_rewrites_the_cut(chain, toy_ds2, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes((chain["vae"] / "ckpt.pt").read_bytes())
    before = C.load_checkpoint(run)
    assert before["cut_exponent"] == V.CUT_EXPONENT and before["cut_info"]["exponent"] == V.CUT_EXPONENT
    V.main(["--calibrate", "--ckpt", str(run), "--cut-exponent", "0", *QUIET])
    after = C.load_checkpoint(run)
    assert after["cut_exponent"] == 0 and len(after["cut"]) == 45 and after["cut"] != before["cut"]
    assert all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])  # only the cut changes
    assert after["cut_info"]["exponent"] == 0 and after["cut_info"]["n"] == before["cut_info"]["n"]  # same showers
    rec = V.main(["--reconstruct", "--ckpt", str(run), "--like", str(toy_ds2 / "toy_ds2_train.hdf5"), "--n", "4",
                  "--output", str(tmp_path / "rec.hdf5"), *QUIET])
    assert C.load_showers(rec, 2, progress=False)[1].shape == (4, 6480)
