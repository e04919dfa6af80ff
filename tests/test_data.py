"""data.py: the toy generator (determinism, format, physics-shaped statistics) and the resumable download."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import data  # noqa: E402


@pytest.fixture(scope="module")
def toy2000():
    return data.generate_toy(2, 2000, seed=3)


def test_toy_deterministic_and_seeded():
    e1, x1 = data.generate_toy(2, 50, seed=7)
    e2, x2 = data.generate_toy(2, 50, seed=7)
    e3, x3 = data.generate_toy(2, 50, seed=8)
    assert np.array_equal(e1, e2) and np.array_equal(x1, x2)
    assert not np.array_equal(e1, e3)
    assert e1.dtype == np.float64 and x1.dtype == np.float32 and x1.shape == (50, 6480)


@pytest.mark.parametrize("ds,n", [(2, 30), (3, 20)])
def test_toy_file_format(tmp_path, ds, n):
    path = data.write_toy(ds, n, tmp_path / f"toy_ds{ds}_train.hdf5", seed=1)
    e_inc, showers = common.load_showers(path, ds, progress=False)
    e_ref, x_ref = data.generate_toy(ds, n, seed=1)
    assert showers.shape == (n, common.geometry(ds).n_vox)
    assert np.allclose(e_inc, e_ref, rtol=1e-6) and np.allclose(showers, x_ref)
    import h5py
    with h5py.File(path) as f:
        assert f["showers"].dtype == np.float64 and f["incident_energies"].shape == (n, 1)
        assert f["showers"].compression == "gzip"
    with pytest.raises(FileExistsError):
        data.write_toy(ds, n, path)
    assert (e_inc >= 1e3).all() and (e_inc <= 1e6).all()


def test_toy_statistics(toy2000):
    e_inc, showers = toy2000
    g = common.geometry(2)
    sparsity = (showers == 0).mean()
    assert 0.3 < sparsity < 0.99
    assert not ((showers > 0) & (showers < common.MIN_ENERGY)).any()
    response = showers.sum(1) / e_inc
    assert 0.85 < response.mean() < 1.05 and response.std() > 0.01
    layer_e = common.layer_energies(torch.as_tensor(showers, dtype=torch.float64), 2)
    u = common.energies_to_u(torch.as_tensor(e_inc), layer_e).numpy()
    assert (u[:, 1:] == 0).any()
    # the last non-empty layer holds all that remains: u = E/(E + 1e-10), 1 to 1e-9
    assert (u[:, 1:] > 1 - 1e-9).any() and (u[:, 1:] <= 1).all()
    assert 0 < u[:, 0].min() and u[:, 0].max() < 1
    l_max = layer_e.numpy().argmax(1)
    assert np.corrcoef(l_max, np.log(e_inc))[0, 1] > 0.5
    x, _, _ = g.voxel_xyr()
    per_layer = showers.reshape(-1, 45, g.n_alpha * g.n_r).astype(np.float64)
    e_layer = per_layer.sum(-1)
    ec_x = (per_layer * x).sum(-1)[e_layer > 0] / e_layer[e_layer > 0]
    assert abs(ec_x.mean()) < 1.0 and ec_x.std() > 0.1
    # sparse late layers at low energy, denser near the maximum at high energy
    low, high = e_inc < 3e3, e_inc > 3e5
    assert (showers[low] == 0).mean() > (showers[high] == 0).mean()
