"""shape_vit.py: paper sizes, training lowers the loss, sampling from a condition file or true u's, exact resume."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import common
import shape_vit
from conftest import QUIET, TINY_VIT


@pytest.mark.parametrize("ds, count", [(2, 26_042_688), (3, 5_868_870)])
def test_paper_presets(ds, count):
    p = shape_vit.PRESETS[(ds, "paper")]
    cfg = common.ViTConfig((1, *common.geometry(ds).shape), p["patch"], p["dim"], p["heads"], p["mlp"], p["depth"])
    assert common.count_parameters(common.ViT(cfg)) == count


def test_training_lowers_the_loss(toy_ds2):
    e_inc, showers = common.load_showers(toy_ds2 / "toy_ds2_train.hdf5", 2, 64, progress=False)
    stats = common.fit_shape_stats(e_inc, showers, 2)
    e_inc, showers = torch.from_numpy(e_inc), torch.from_numpy(showers)
    torch.manual_seed(0)
    model = common.ViT(common.ViTConfig((1, 45, 16, 9), (3, 16, 9), 12, 2, 24, 1))
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


def layer_sums_match(showers, e_inc, u):
    """Each shower's layer energies are the ones its u's ask for, less what the 15.15 keV threshold removed."""
    want = common.u_to_energies(e_inc, u)
    lost = want - common.layer_energies(torch.as_tensor(showers, dtype=torch.float64), 2)
    return bool((lost > -1e-5 * want - 1e-6).all() and (lost < 144 * common.MIN_ENERGY + 1e-5 * want).all())


def test_sampling_from_a_condition_file(chain):
    ckpt = common.load_checkpoint(chain["shape_vit"], script="shape_vit", ds=2)
    assert ckpt["epoch"] == 3 and ckpt["model_args"]["patch"] == (3, 8, 3)
    e_cond, u_cond, _ = common.read_conditions(chain["cond"], 2)
    with h5py.File(chain["gen"]) as f:
        assert f["showers"].shape == (40, 6480) and f["showers"].dtype == np.float64
        e_gen, x_gen = f["incident_energies"][:, 0], f["showers"][:]
    np.testing.assert_array_equal(e_gen, e_cond.numpy())
    assert ((x_gen == 0) | (x_gen >= common.MIN_ENERGY)).all() and layer_sums_match(x_gen, e_cond, u_cond)
    info = json.loads(Path(f"{chain['gen']}.json").read_text())
    assert (info["solver"], info["steps"], info["nfe"], info["n"], info["batch_size"]) == ("rk4", 2, 8, 40, 1000)
    assert info["cond"] == str(chain["cond"]) and info["cond_info"]["steps"] == 2


def test_sampling_with_true_u_is_reproducible(chain, toy_ds2, tmp_path):
    ref = toy_ds2 / "toy_ds2_ref.hdf5"
    argv = ["--sample", "--ckpt", str(chain["shape_vit"]), "--cond", str(ref), "--n", "12", "--steps", "2",
            "--batch-size", "5", *QUIET]
    out = [shape_vit.main(argv + ["--output", str(tmp_path / f"g{i}.hdf5")]) for i in range(2)]
    _, x0 = common.load_showers(out[0], 2, progress=False)
    _, x1 = common.load_showers(out[1], 2, progress=False)
    np.testing.assert_array_equal(x0, x1)  # same seed, same file
    e_ref, u_ref = common.load_u(ref, 2, 12, progress=False)
    assert layer_sums_match(x0.astype(np.float64), e_ref, u_ref)
    with pytest.raises(FileExistsError):
        shape_vit.main(argv + ["--output", str(out[0])])


def test_resume_is_exact(toy_ds2, tmp_path, chain):
    base = ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--max-showers", "200", "--epochs", "3", *TINY_VIT,
            *QUIET]
    half = shape_vit.main(base + ["--out", str(tmp_path), "--stop-after", "1"])
    assert common.load_checkpoint(half)["epoch"] == 1
    resumed = shape_vit.main(["--resume", str(half), *QUIET])
    a, b = common.load_checkpoint(chain["shape_vit"]), common.load_checkpoint(resumed)
    assert resumed == half and b["epoch"] == 3 and a["history"] == b["history"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_wrong_inputs_are_one_line_errors(chain, tmp_path):
    other = tmp_path / "energy_ckpt.pt"
    common.save_checkpoint(other, script="energy", ds=2)
    with pytest.raises(common.DataError, match="written by 'energy'"):
        shape_vit.main(["--sample", "--ckpt", str(other), "--cond", str(chain["cond"])])
    with pytest.raises(common.DataError, match="dataset-2 checkpoint"):
        shape_vit.main(["--sample", "--ds", "3", "--ckpt", str(chain["shape_vit"]), "--cond", str(chain["cond"])])
    with pytest.raises(common.DataError, match="no condition file"):
        shape_vit.main(["--sample", "--ckpt", str(chain["shape_vit"]), "--out", str(tmp_path)])
