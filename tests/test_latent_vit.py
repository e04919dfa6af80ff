"""latent_vit.py: exact parameter counts, tiny end-to-end training and sampling on CPU, exact resume."""
import numpy as np
import pytest
import torch

import common as C
import latent_vit as L
import vae as V

TINY = ["--preset", "small", "--dim", "12", "--depth", "1", "--heads", "2", "--mlp", "24", "--batch-size", "8",
        "--max-showers", "24", "--val-fraction", "0.25", "--no-progress"]


@pytest.fixture(scope="module")
def vae_run(toy_ds2, tmp_path_factory):
    return V.main(["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--out", str(tmp_path_factory.mktemp("vae")),
                   "--channels", "2", "--batch-size", "8", "--max-showers", "24", "--epochs", "1", "--no-progress"])


def _train(toy_ds2, vae_run, out, *extra):
    return L.main(["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--vae", str(vae_run), "--out", str(out),
                   *TINY, *extra])


@pytest.mark.parametrize("ds, count", [(2, 10_711_566), (3, 10_720_224)])
def test_parameter_counts_match_spec(ds, count):
    args = L.resolve(L.parse_args(["--ds", str(ds)]))
    model = C.ViT(L.vit_config(args, V.PRESETS[ds]["latent"]))
    assert C.count_parameters(model) == count
    assert len(model.coords) == {2: 405, 3: 312}[ds]  # tokens of SPEC 2.3


def test_train_and_sample_end_to_end(toy_ds2, vae_run, tmp_path):
    run = _train(toy_ds2, vae_run, tmp_path, "--epochs", "2")
    ckpt = C.load_checkpoint(run, "latent_vit", 2)
    assert ckpt["epoch"] == 2 and np.isfinite(ckpt["history"]["train_loss"]).all()
    assert ckpt["vae"]["path"].startswith(str(vae_run)) and ckpt["stats"]["latent"]["std"].shape == (2, 15, 9, 9)
    ref = toy_ds2 / "toy_ds2_ref.hdf5"
    out = L.main(["--sample", "--ckpt", str(run), "--energy-ckpt", "truth", "--like", str(ref), "--n", "12",
                  "--solver", "euler", "--steps", "2", "--batch-size", "5", "--cut", "1e-5",
                  "--output", str(tmp_path / "gen.hdf5"), "--no-progress"])
    e_gen, x_gen = C.load_showers(out, 2, progress=False)
    e_ref, x_ref = C.load_showers(ref, 2, max_showers=12, progress=False)
    assert x_gen.shape == (12, 6480) and np.array_equal(e_gen, e_ref) and (x_gen >= 0).all()
    # the u's of the reference fix the layer energies; the 15.15 keV cut only removes a little
    l_gen, l_ref = x_gen.reshape(12, 45, -1).sum(-1), x_ref.reshape(12, 45, -1).sum(-1)
    assert np.allclose(l_gen.sum(1), l_ref.sum(1), rtol=0.05)
    assert (tmp_path / "gen.hdf5.json").is_file()
    with pytest.raises(ValueError, match="--like"):
        L.main(["--sample", "--ckpt", str(run), "--energy-ckpt", "truth", "--n", "3", "--no-progress"])


def test_resume_gives_identical_weights(toy_ds2, vae_run, tmp_path):
    full = _train(toy_ds2, vae_run, tmp_path / "a", "--epochs", "2")
    part = _train(toy_ds2, vae_run, tmp_path / "b", "--epochs", "2", "--stop-after", "1")
    assert C.load_checkpoint(part, "latent_vit", 2)["epoch"] == 1
    L.main(["--resume", str(part), "--no-progress"])
    a, b = C.load_checkpoint(full, "latent_vit", 2), C.load_checkpoint(part, "latent_vit", 2)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
