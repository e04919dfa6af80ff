"""latent_vit.py: paper sizes, training on a latent file, sampled latents that vae.py decodes, exact resume."""
import numpy as np
import pytest
import torch

import common as C
import latent_vit as L
import vae as V
from conftest import QUIET, TINY_VIT


@pytest.mark.parametrize("ds, count", [(2, 10_711_566), (3, 10_720_224)])
def test_paper_presets(ds, count):
    p = L.PRESETS[(ds, "paper")]
    cfg = C.ViTConfig(V.PRESETS[ds]["latent"], p["patch"], p["dim"], p["heads"], p["mlp"], p["depth"])
    assert C.count_parameters(C.ViT(cfg)) == count


def test_latent_statistics():
    rng = np.random.default_rng(0)
    mu, logvar = rng.normal(2.0, 3.0, (4000, 2, 3)).astype(np.float32), np.full((4000, 2, 3), np.log(4.0), np.float32)
    stats = L.fit_latent_stats(mu, logvar, np.arange(4000), chunk=999)
    assert np.allclose(stats["mean"], 2.0, atol=0.2) and np.allclose(stats["std"], 13 ** 0.5, atol=0.1)  # Var(mu) + E[sigma^2] = 9 + 4


def test_train_sample_decode(chain, toy_ds2, tmp_path):
    ckpt = C.load_checkpoint(chain["latent_vit"], "latent_vit", 2)
    assert ckpt["epoch"] == 2 and all(np.isfinite(ckpt["history"]["train_loss"]))
    assert ckpt["vae_ckpt"] == str(chain["vae"]) and ckpt["model_args"]["in_shape"] == (2, 15, 9, 9)
    lat = L.main(["--sample", "--ckpt", str(chain["latent_vit"]), "--cond", str(chain["cond"]), "--n", "9",
                  "--steps", "2", "--output", str(tmp_path / "latents_x.hdf5"), *QUIET])
    data, attrs = C.read_latents(lat, 2)
    assert data["z"].shape == (9, 2, 15, 9, 9) and attrs["vae_ckpt"] == str(chain["vae"]) and attrs["nfe"] == 8
    gen = V.main(["--decode", str(lat), *QUIET])  # the VAE named in the file
    assert gen == tmp_path / "gen_x.hdf5"
    e_gen, x_gen = C.load_showers(gen, 2, progress=False)
    e_cond, u_cond, _ = C.read_conditions(chain["cond"], 2, 9)
    np.testing.assert_allclose(e_gen, e_cond.numpy(), rtol=1e-7)
    want = C.u_to_energies(e_cond, u_cond).numpy()
    assert (x_gen.reshape(9, 45, -1).sum(-1) <= want * (1 + 1e-5) + 1e-6).all()


def test_resume_gives_identical_weights(chain, tmp_path):
    argv = ["--latents", str(chain["latents"]), "--epochs", "2", *TINY_VIT[:-2], "--batch-size", "16",
            "--out", str(tmp_path), *QUIET]
    part = L.main(argv + ["--stop-after", "1"])
    L.main(["--resume", str(part), *QUIET])
    a, b = C.load_checkpoint(chain["latent_vit"]), C.load_checkpoint(part)
    assert b["epoch"] == 2 and a["history"] == b["history"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
