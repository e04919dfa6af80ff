"""The shared contract: geometry, file I/O and its errors, preprocessing round trips, ViT, solvers."""
import h5py
import numpy as np
import pytest
import torch

import common as C


# ----------------------------------------------------------------------------- geometry
def test_geometry_shapes_and_edges():
    g2, g3 = C.geometry(2), C.geometry(3)
    assert g2.shape == (45, 16, 9) and g2.n_vox == 6480
    assert g3.shape == (45, 50, 18) and g3.n_vox == 40500
    assert g2.r_edges[1] == 4.65 and g2.r_edges[-1] == 41.85 and len(g2.r_edges) == 10
    assert g3.r_edges[1] == 2.325 and g3.r_edges[3] == 6.975 and g3.r_edges[-1] == 41.85
    x, y, r = g2.voxel_xyr()
    assert x.shape == (16 * 9,) and np.allclose(np.hypot(x, y), r)
    assert r[0] == 4.65 / 2 and r[9] == r[0]  # flat index alpha * n_r + r
    assert abs(C.MIN_ENERGY - 0.01515151) < 1e-7
    with pytest.raises(ValueError):
        C.geometry(1)


def test_ds3_alpha_centre_sign_convention():
    # SPEC 1: alpha = +-pi/2 are bin centres in DS3, so x = r cos(alpha) is +-1e-16, not 0
    x, _, _ = C.geometry(3).voxel_xyr()
    tiny = x[np.abs(x) < 1e-12]
    assert len(tiny) == 2 * 18 and (tiny != 0).all()


# ----------------------------------------------------------------------------- I/O
def _showers(n, ds=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.exponential(1.0, (n, C.geometry(ds).n_vox)) * (rng.random((n, C.geometry(ds).n_vox)) < 0.3)
    return 10 ** rng.uniform(3, 6, n), x


def test_write_and_load_round_trip(tmp_path):
    e, x = _showers(50)
    path = tmp_path / "a.hdf5"
    C.write_showers(path, e, x, ds=2)
    with h5py.File(path) as f:
        assert f["showers"].dtype == np.float64 and f["incident_energies"].shape == (50, 1)
        assert f["showers"].compression == "gzip"
    e2, x2 = C.load_showers([path, path], ds=2, max_showers=70, chunk=16, progress=False)
    assert e2.dtype == np.float32 and x2.shape == (70, 6480)
    assert np.allclose(x2[:50], x, rtol=1e-6) and np.allclose(x2[50:], x[:20], rtol=1e-6)
    with pytest.raises(FileExistsError):
        C.write_showers(path, e, x, ds=2)


def test_writer_leaves_nothing_on_failure(tmp_path):
    e, x = _showers(10)
    path = tmp_path / "b.hdf5"
    with pytest.raises(RuntimeError):
        with C.ShowerWriter(path, 10, ds=2) as w:
            w.write(e[:5], x[:5])
            raise RuntimeError("killed")
    with pytest.raises(ValueError, match="only 5 of 10"):
        with C.ShowerWriter(path, 10, ds=2) as w:
            w.write(e[:5], x[:5])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("problem, match", [
    ("missing", "not found.*data/prepare.py download"), ("nokey", "no 'showers'"), ("ds", "use --ds 3"),
    ("nan", "NaN"), ("negative", "negative"), ("count", "incident energies"), ("corrupt", "not a readable")])
def test_loader_errors(tmp_path, problem, match):
    path = tmp_path / "dataset_2_1.hdf5"
    e, x = _showers(20)
    if problem == "ds":
        e, x = _showers(5, ds=3)
    if problem == "nan":
        x[3, 7] = np.nan
    if problem == "negative":
        x[2, 1] = -1.0
    if problem == "corrupt":
        path.write_bytes(b"not hdf5 at all")
    elif problem != "missing":
        with h5py.File(path, "w") as f:
            f["incident_energies"] = e.reshape(-1, 1)[: 19 if problem == "count" else None]
            if problem != "nokey":
                f["showers"] = x
    with pytest.raises(C.DataError, match=match):
        C.load_showers(path, ds=2, progress=False)


# ----------------------------------------------------------------------------- preprocessing
def test_u_round_trip_with_point_masses():
    _, x = _showers(64)
    x = torch.as_tensor(x)
    x[:5, 30 * 144:] = 0  # empty late layers: u = 0, and the last non-empty layer has u = 1
    e_inc = torch.as_tensor(10 ** np.random.default_rng(1).uniform(3, 6, 64))
    le = C.layer_energies(x, 2)
    u = C.energies_to_u(e_inc, le)
    assert (u[:5, 31:] == 0).all() and torch.allclose(u[:5, 30], torch.ones(5, dtype=u.dtype))
    assert torch.allclose(C.u_to_energies(e_inc, u), le, rtol=1e-8, atol=1e-8)
    # through the energy-network space: logit, standardise and back
    stats = C.fit_standardizer(C.logit(u))
    u_back = C.inverse_logit(C.unstandardize(C.standardize(C.logit(u).float(), stats), stats))
    assert (u_back[:5, 31:] == 0).all() and (u_back[:5, 30] == 1).all()
    assert torch.allclose(C.u_to_energies(e_inc, u_back), le, rtol=1e-5, atol=1e-4)


def test_shape_round_trip_reproduces_voxels():
    e_inc, x = _showers(40)
    x = torch.as_tensor(np.where(x > C.MIN_ENERGY * 10, x, 0.0) * 50)  # well above the threshold
    stats = C.fit_shape_stats(e_inc, x.float().numpy(), ds=2)
    z = C.showers_to_net(x, 2, stats, noise=False)
    assert z.shape == (40, 1, 45, 16, 9)
    le = C.layer_energies(x, 2)
    back = C.net_to_showers(z, le, stats)
    assert torch.allclose(back, x, rtol=1e-4, atol=1e-4)
    assert torch.allclose(C.layer_energies(back, 2), le, rtol=1e-5)
    # with dequantisation noise the inverse still restores exact zeros
    back_noisy = C.net_to_showers(C.showers_to_net(x, 2, stats), le, stats)
    assert ((back_noisy == 0) == (x == 0)).float().mean() > 0.999


def test_shape_condition():
    e_inc = torch.tensor([1e3, 1e6], dtype=torch.float64)
    u = torch.rand(2, 45, dtype=torch.float64)
    stats = C.fit_standardizer(C.u_features(torch.rand(100, 45, dtype=torch.float64)))
    c = C.shape_condition(e_inc, u, stats)
    assert c.shape == (2, 46) and c[0, 0] == 0 and abs(c[1, 0] - 1) < 1e-6


# ----------------------------------------------------------------------------- ViT
@pytest.mark.parametrize("cfg, count, tokens", [
    (C.ViTConfig(), 26_042_688, 135),
    (C.ViTConfig((1, 45, 50, 18), (3, 5, 2), 240, 6, 720, 6), 5_868_870, 1350),
    (C.ViTConfig((2, 15, 9, 9), (3, 1, 1), 240, 6, 960, 10), 10_711_566, 405),
    (C.ViTConfig((2, 9, 26, 16), (3, 2, 2), 240, 6, 960, 10), 10_720_224, 312)])
def test_vit_parameter_counts(cfg, count, tokens):
    model = C.ViT(cfg)
    assert C.count_parameters(model) == count and len(model.coords) == tokens


def test_vit_zero_at_init_and_learns():
    torch.manual_seed(0)
    cfg = C.ViTConfig((1, 6, 4, 3), (3, 2, 1), 24, 2, 48, 2)
    model = C.ViT(cfg)
    x, c = torch.randn(16, *cfg.in_shape), torch.randn(16, 46)
    assert model(x, torch.rand(16), c).abs().max() == 0
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    losses = []
    for _ in range(60):
        loss = C.cfm_loss(model, x, c)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])


# ----------------------------------------------------------------------------- solvers
@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_solver_order(method, order):
    # dx/dt = -2 x + t: errors fall like h^order
    exact = lambda x0: (x0 + 0.25) * np.exp(-2.0) + 0.5 - 0.25
    f = lambda x, t: -2 * x + t
    x0 = torch.tensor([1.0], dtype=torch.float64)
    errs = [abs(C.solve(f, x0, n, method)[0].item() - exact(1.0)) for n in (8, 16)]
    assert abs(np.log2(errs[0] / errs[1]) - order) < 0.3
    assert C.solve(f, x0, 8, method)[1] == 8 * C.NFE_PER_STEP[method]


# ----------------------------------------------------------------------------- plumbing
def test_checkpoint_and_runs(tmp_path):
    run = C.make_run_dir("energy", 2, tmp_path)
    C.save_checkpoint(run / "ckpt.pt", script="energy", ds=2, model={"w": torch.ones(2)}, config={"a": 1})
    assert C.load_checkpoint(run, script="energy", ds=2)["config"] == {"a": 1}
    with pytest.raises(C.DataError, match="written by 'energy'"):
        C.load_checkpoint(run, script="shape_vit")
    with pytest.raises(C.DataError, match="dataset-2"):
        C.load_checkpoint(run, ds=3)
    assert C.find_latest_run("energy", 2, tmp_path) == run / "ckpt.pt"
    with pytest.raises(C.DataError, match="no energy run for dataset 3"):
        C.find_latest_run("energy", 3, tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(C.DataError, match="not a readable checkpoint"):
        C.load_checkpoint(tmp_path / "bad.pt")


def test_rank_share_partitions_and_weights():
    for n, world in [(64, 2), (63, 2), (10, 3)]:
        parts = [C.rank_share(n, r, world) for r in range(world)]
        idx = [i for s, _ in parts for i in range(n)[s]]
        assert idx == list(range(n))
        # DDP averages per-rank means weighted like this -> exactly the global mean
        x = np.arange(n, dtype=float) ** 2
        assert np.isclose(np.mean([x[s].mean() * w for s, w in parts]), x.mean())
    assert C.init_distributed("cpu") == (0, 1, torch.device("cpu"))
