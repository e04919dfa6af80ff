"""evaluate.py against the official arithmetic: float32 files, the ResNet classifier, PRDC, cls-u, --cls-repeats."""
import h5py
import numpy as np
import pytest
import torch

import common
import evaluate as ev

MIN = common.MIN_ENERGY


def official_separation(ref, gen, edges):
    """The official recipe: plt.hist(density=True) (= np.histogram(density=True)) of both, times the bin widths."""
    p, q = (np.histogram(v, edges, density=True)[0] * np.diff(edges) for v in (ref, gen))
    return 0.5 * ((p - q) ** 2 / (p + q + 1e-16)).sum()


def official_e_layer0_and_voxel(path_ref, path_gen):
    """E_layer of layer 0 and voxel-energy separation powers, transcribed from the official evaluator: the arrays
    as the file stores them, the cut, slice sums, logspace edges from log10 of the reference maximum."""
    loaded = []
    for path in (path_ref, path_gen):
        with h5py.File(path, "r") as f:
            x = f["showers"][:]
        loaded.append(np.where(x < MIN, np.zeros_like(x), x))
    (ref, gen), n = loaded, common.geometry(2).n_alpha * common.geometry(2).n_r
    e_ref, e_gen = ref[:, :n].sum(-1), gen[:, :n].sum(-1)
    s_layer = official_separation(e_ref, e_gen, np.logspace(np.log10(MIN), np.log10(e_ref.max()), 40))
    s_vox = official_separation(ref.ravel(), gen.ravel(), np.logspace(np.log10(MIN), np.log10(ref.max()), 50))
    return s_layer, s_vox


def test_float32_reference_uses_the_official_float32_arithmetic(tmp_path):
    """A float32 file: the official code sums E_layer and takes log10(max) in float32, so its top edge sits ~1e-7
    below the reference maximum. A generated layer energy w between that edge and the maximum is out of range
    there, but was counted by the old float64 arithmetic (S off by ~0.1 here)."""
    cands = np.float32(60.0) + np.float32(0.37) * np.arange(200, dtype=np.float32)
    top = np.array([np.logspace(np.log10(MIN), np.log10(v), 40)[-1] for v in cands])  # float32 log10, as there
    v = cands[np.argmax((cands - top) > 1e-8 * cands)]  # a maximum whose float32 top edge lies below it
    w = (float(v) + np.logspace(np.log10(MIN), np.log10(v), 40)[-1]) / 2
    n_vox = common.geometry(2).n_vox
    ref, gen = np.zeros((12, n_vox), np.float32), np.zeros((12, n_vox))
    ref[:, 0] = np.r_[np.geomspace(0.5, 50, 11), v].astype(np.float32)  # layer 0: one voxel per shower
    gen[:, 0] = np.r_[np.geomspace(0.6, 40, 11), w]
    for name, x in (("ref", ref), ("gen", gen)):
        with h5py.File(tmp_path / f"{name}.hdf5", "w") as f:
            f["incident_energies"] = np.full((12, 1), 1e3, x.dtype)
            f["showers"] = x
    s_layer, s_vox = official_e_layer0_and_voxel(tmp_path / "ref.hdf5", tmp_path / "gen.hdf5")
    r = ev.scan([tmp_path / "ref.hdf5"], 2, progress=False)
    assert r["features"]["e_layer"].dtype == np.float32 and r["vmax"].dtype == np.float32
    edges = ev.hist_edges("voxel", r["vmax"])
    g = ev.scan([tmp_path / "gen.hdf5"], 2, vox_edges=edges, progress=False)
    hists = ev.histograms(g["features"], r["features"])
    n_ref_vox = ev.scan([tmp_path / "ref.hdf5"], 2, features=False, vox_edges=edges, progress=False)["vox_counts"]
    assert hists["e_layer"][0][3] == pytest.approx(s_layer, abs=1e-12)
    assert ev.separation_power(n_ref_vox, g["vox_counts"], edges) == pytest.approx(s_vox, abs=1e-12)
    old = ref.astype(np.float64)[:, 0]  # the old code: everything in float64, so w counts
    s_old = official_separation(old, gen[:, 0], np.logspace(np.log10(MIN), np.log10(old.max()), 40))
    assert abs(s_old - s_layer) > 0.01
    assert all(np.isnan(s) for *_, s in hists["e_layer"][1:])  # empty reference layers: no edges


def test_separation_power_with_edges_is_the_official_density_times_width():
    rng = np.random.default_rng(0)
    edges = np.logspace(-1, 2, 31)
    a, b = rng.lognormal(1, 1, 500), rng.lognormal(1.2, 1, 400)
    n_a, n_b = np.histogram(a, edges)[0], np.histogram(b, edges)[0]
    assert ev.separation_power(n_a, n_b, edges) == official_separation(a, b, edges)  # digit for digit
    assert ev.separation_power(n_a, n_b, edges) == pytest.approx(ev.separation_power(n_a, n_b), abs=1e-15)


# ----------------------------------------------------------------------------- ResNet (the "CNN" column)
def test_resnet_matches_the_official_architecture():
    for shape in (common.geometry(2).shape, common.geometry(3).shape):
        net = ev.ResNet(shape).eval()
        assert common.count_parameters(net) == 2_516_644  # official generate_model(18): independent of the shape
        assert net(torch.zeros(3, 1 + int(np.prod(shape)))).shape == (3, 1)
    kinds = [type(m).__name__ for m in ev.ResNet((45, 16, 9)).modules()]
    assert (kinds.count("Conv3d"), kinds.count("BatchNorm3d"), kinds.count("BatchNorm1d"), len(net.blocks)) == (20, 20, 1, 8)


def test_resnet_separates_obviously_different_samples():
    rng = np.random.default_rng(0)
    image, n = (12, 8, 6), 60

    def rows(front):  # [log10 E_inc, voxels]: energy in the front half of the layers, or not
        x = rng.gamma(2.0, 0.5, (n,) + image)
        x[:, :6] += 1.0 if front else 0.0
        return np.concatenate([rng.uniform(3, 6, (n, 1)), x.reshape(n, -1)], 1).astype(np.float32)
    r = ev.classify(rows(True), rows(False), seed=0, epochs=4, batch_size=8, lr=1e-3, device="cpu", progress=False,
                    image=image)
    assert r["auc"] > 0.9 and r["parameters"] == 2_516_644 and (r["n_train"], r["n_val"]) == (72, 24)


# ----------------------------------------------------------------------------- PRDC
def brute_prdc(real, fake, k):
    d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    r_real, r_fake = (np.sort(d(x, x), 1)[:, k] for x in (real, fake))
    rf = d(real, fake)
    inside = rf < r_real[:, None]
    return {"precision": inside.any(0).mean(), "recall": (rf < r_fake[None]).any(1).mean(),
            "density": inside.sum(0).mean() / k, "coverage": (rf.min(1) < r_real).mean()}


@pytest.mark.parametrize("rows, cols", [(None, 4096), (7, 5), (1, 3)])
def test_prdc_against_brute_force(rows, cols):
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(41, 6)), rng.normal(size=(37, 6)) * 1.3 + 0.4
    got, want = ev.prdc(real, fake, k=5, device="cpu", rows=rows, cols=cols), brute_prdc(real, fake, 5)
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-12)
    assert 0 < got["precision"] < 1 and 0 < got["coverage"] < 1 and (got["n_real"], got["n_fake"]) == (41, 37)
    got32 = ev.prdc(real.astype(np.float32), fake.astype(np.float32), device="cpu", rows=rows, cols=cols)
    assert {k: got32[k] for k in want} == pytest.approx(want, abs=1e-12)  # no near ties here


def test_prdc_identical_and_disjoint_sets():
    x = np.random.default_rng(2).normal(size=(50, 4))
    same = ev.prdc(x, x.copy(), device="cpu", rows=16, cols=8)
    assert (same["precision"], same["recall"], same["coverage"]) == (1.0, 1.0, 1.0)
    assert same["density"] == pytest.approx(1.0)  # each ball: the point itself and k-1 neighbours (the k-th is on it)
    far = ev.prdc(x, x + 100.0, device="cpu")
    assert (far["precision"], far["recall"], far["density"], far["coverage"]) == (0.0, 0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- cls-u, --cls-repeats
def test_classify_repeats_mean_and_spread():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(200, 3)) + 0.7, rng.normal(size=(200, 3))
    kw = dict(epochs=2, width=16, batch_size=50, device="cpu", progress=False)
    r = ev.classify_repeats(a, b, 3, seed=4, **kw)
    singles = [ev.classify(a, b, seed=s, **kw)["auc"] for s in (4, 5, 6)]
    assert r["aucs"] == singles and r["auc"] == pytest.approx(np.mean(singles)) and r["auc_std"] == pytest.approx(np.std(singles))
    assert len(r["jsds"]) == 3 and r["jsd"] == pytest.approx(np.mean(r["jsds"]))


def test_cls_u_on_a_condition_file_and_on_showers(toy_ds2, tmp_path):
    ref = toy_ds2 / "toy_ds2_ref.hdf5"
    e, u = common.load_u([toy_ds2 / "toy_ds2_train.hdf5"], 2, 300, progress=False)
    cond = tmp_path / "u.hdf5"
    common.write_conditions(cond, e, (u * 0.5).clamp(0, 1), 2)  # visibly wrong u's
    kw = dict(cls_epochs=4, cls_width=32, cls_batch_size=50, cls_lr=1e-3, plots=False, progress=False)
    s = ev.evaluate(cond, ref, 2, modes=("all",), out_dir=tmp_path / "a", cls_repeats=2, **kw)
    assert s["config"]["modes"] == ["cls-u"] and s["config"]["n_gen"] == 300 and set(s) == {"config", "times_s", "cls_u"}
    assert s["cls_u"]["auc"] > 0.8 and len(s["cls_u"]["aucs"]) == 2 and s["cls_u"]["n_train"] == 2 * 180
    x_gen, x_ref = ev.u_rows(*common.read_conditions(cond, 2)[:2], *common.load_u([ref], 2, progress=False))
    assert x_gen.shape == (300, 46) and abs(x_ref.mean(0)).max() < 1e-5 and abs(x_ref.std(0) - 1).max() < 1e-2
    with pytest.raises(ValueError, match="condition file.*only -m cls-u"):
        ev.evaluate(cond, ref, 2, modes=("hist", "cls-u"), out_dir=tmp_path / "b", **kw)
    same = ev.evaluate(ref, ref, 2, modes=("cls-u",), out_dir=tmp_path / "c", **kw)  # true u's of both
    assert abs(same["cls_u"]["auc"] - 0.5) < 0.15
