"""evaluate.py: features on hand-made showers, separation power, AUC, isotonic calibration, Frechet
distance / FPD / KPD, the DNN classifier, an end-to-end evaluate() and the CLI errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import common
import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]
SMALL_FPD = dict(n_min=1000, n_max=4000, n_points=4, n_draws=3, kpd_batches=4, kpd_batch=500)


def fake_showers(n, seed, ds=2, depth=0.0):
    """Random but shower-like: log-uniform E_inc, a Gaussian longitudinal profile, falling radial profile."""
    rng = np.random.default_rng(seed)
    n_layers, n_alpha, n_r = common.geometry(ds).shape
    e_inc = np.exp(rng.uniform(math.log(1e3), math.log(1e6), n))
    t_max = 1.2 * np.log(e_inc / 8.0)[:, None] + depth
    profile = np.exp(-(np.arange(n_layers) + 0.5 - t_max) ** 2 / 30.0)
    profile /= profile.sum(1, keepdims=True)
    lateral = np.exp(-np.arange(n_r) / 1.5) * rng.gamma(2.0, 1.0, (n, n_layers, n_alpha, n_r))
    lateral /= lateral.sum((2, 3), keepdims=True)
    x = 1.8 * e_inc[:, None, None, None] * profile[:, :, None, None] * lateral
    x = (x * (rng.random(x.shape) < 0.5)).reshape(n, -1)
    return e_inc, np.where(x < common.MIN_ENERGY, 0.0, x)


# ----------------------------------------------------------------------------- features
def test_single_voxel_and_empty_layers():
    g = common.geometry(2)
    pos_x, pos_y, pos_r = g.voxel_xyr()
    per_layer = g.n_alpha * g.n_r
    x = np.zeros((2, g.n_vox))
    v = 5 * g.n_r + 3  # alpha bin 5, r bin 3
    x[0, v] = 10.0  # layer 0: one hit voxel
    x[0, per_layer + v] = 0.5 * common.MIN_ENERGY  # layer 1: only a voxel below 15.15 keV -> empty
    a, b = 2 * g.n_r + 1, 10 * g.n_r + 6  # layer 2 of shower 1: two voxels, 3 and 1 MeV
    x[1, 2 * per_layer + a], x[1, 2 * per_layer + b] = 3.0, 1.0
    f = ev.high_level_features(np.array([100.0, 50.0]), x, 2)
    assert f["e_tot"][0] == 10.0 and f["e_layer"][0, 0] == 10.0 and f["e_layer"][0, 1] == 0.0
    assert f["ec_x"][0, 0] == pytest.approx(pos_x[v], abs=1e-12)
    assert f["ec_y"][0, 0] == pytest.approx(pos_y[v], abs=1e-12)
    assert f["ec_r"][0, 0] == pytest.approx(pos_r[v], abs=1e-12)
    for k in ("width_x", "width_y", "width_r"):
        assert f[k][0, 0] < 1e-6  # sqrt of a difference that is 0 up to rounding
    assert f["sparsity"][0, 0] == pytest.approx(1 - 1 / per_layer) and f["sparsity"][0, 1] == 1.0
    for k in ("ec_x", "ec_y", "width_x", "width_y", "ec_r", "width_r"):  # empty layers: 0 / (0 + 1e-16)
        assert f[k][0, 1] == 0.0 and f[k][1, 0] == 0.0
    for k, pos in (("x", pos_x), ("y", pos_y), ("r", pos_r)):  # two voxels: weighted mean, sqrt(w1 w2)|p1-p2|
        assert f[f"ec_{k}"][1, 2] == pytest.approx(0.75 * pos[a] + 0.25 * pos[b], abs=1e-9)
        assert f[f"width_{k}"][1, 2] == pytest.approx(math.sqrt(0.75 * 0.25) * abs(pos[a] - pos[b]), abs=1e-6)
    m = ev.feature_matrix(f)
    assert m.shape == (2, 362)
    assert m[0, 0] == 2.0 and m[0, 1] == pytest.approx(1.0) and m[0, 2] == -8.0  # log10 E_inc, log10(E_layer+1e-8)
    assert m[0, 46] == pytest.approx(pos_x[v] / 100) and m[0, 226] == pytest.approx(1.0)  # EC_x/100, log10 E_tot


# ----------------------------------------------------------------------------- separation power
def test_separation_power():
    h = np.array([3, 0, 5, 2])
    assert ev.separation_power(h, h) == 0.0
    assert ev.separation_power(h, 7 * h) == pytest.approx(0.0, abs=1e-15)  # counts are normalised
    assert ev.separation_power([1, 2, 0, 0], [0, 0, 4, 1]) == pytest.approx(1.0)
    assert ev.separation_power([1, 1], [1, 0]) == pytest.approx(1 / 3)
    assert math.isnan(ev.separation_power([0, 0], [1, 0]))


def test_histograms_identical_samples_are_zero():
    e, x = fake_showers(200, 0)
    f = ev.high_level_features(e, x, 2)
    hists = ev.histograms(f, f)
    assert set(hists) == {"etot_einc", *ev.LAYER_KEYS}
    assert all(s == 0.0 or math.isnan(s) for v in hists.values() for *_, s in v)
    assert len(hists["e_layer"]) == 45 and len(hists["etot_einc"]) == 1


# ----------------------------------------------------------------------------- AUC, isotonic calibration
def test_roc_auc():
    y = np.r_[np.zeros(50), np.ones(50)]
    assert ev.roc_auc(y, np.r_[np.zeros(50), np.ones(50)]) == 1.0
    assert ev.roc_auc(y, np.r_[np.ones(50), np.zeros(50)]) == 0.0
    assert ev.roc_auc(y, np.full(100, 0.3)) == 0.5
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 2, 400), rng.integers(0, 10, 400).astype(float)  # many ties
    s1, s0 = s[y == 1][:, None], s[y == 0][None, :]
    assert ev.roc_auc(y, s) == pytest.approx(np.mean(s1 > s0) + 0.5 * np.mean(s1 == s0), abs=1e-12)


def test_isotonic_fit():
    xs, ys = ev.isotonic_fit([1, 2, 3, 4], [1, 0, 1, 1])
    assert np.allclose(ys, [0.5, 0.5, 1 - 1e-6, 1 - 1e-6])
    xs, ys = ev.isotonic_fit([1, 1, 2], [0, 1, 0])  # equal x pooled first (weight 2), then violators
    assert np.allclose(xs, [1, 2]) and np.allclose(ys, [1 / 3, 1 / 3])
    rng = np.random.default_rng(0)
    x = rng.random(2000)
    knots = ev.isotonic_fit(x, (rng.random(2000) < x ** 2).astype(float))
    pred = np.interp(np.linspace(-0.5, 1.5, 3000), *knots)
    assert np.all(np.diff(pred) >= 0) and pred.min() >= 1e-6 and pred.max() <= 1 - 1e-6


# ----------------------------------------------------------------------------- Frechet distance, FPD, KPD
def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    mu1, mu2, v1, v2 = rng.normal(size=6), rng.normal(size=6), rng.random(6) + 0.1, rng.random(6) + 0.1
    expect = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert ev.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expect, rel=1e-10)
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[1.0, -0.3], [-0.3, 0.5]])  # not commuting
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))  # 2x2 identity
    assert ev.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(4.5 - 2 * tr_sqrt, rel=1e-10)
    a, b = ev._fit_intercept(1 / np.array([1e4, 2e4, 5e4]), 2 + 3e4 / np.array([1e4, 2e4, 5e4]))
    assert a == pytest.approx(2.0) and b < 1e-6


def test_unbiased_mmd_against_brute_force():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(301, 5)), rng.normal(size=(257, 5)) + 0.3
    k = lambda p, q: (p @ q.T / 5 + 1) ** 4
    kxx, kyy = k(a, a), k(b, b)
    expect = ((kxx.sum() - np.trace(kxx)) / (301 * 300) + (kyy.sum() - np.trace(kyy)) / (257 * 256)
              - 2 * k(a, b).mean())
    for block in (7, 64, 1000):
        assert ev._mmd_poly(torch.tensor(a), torch.tensor(b), block=block) == pytest.approx(expect, rel=1e-12)


def test_fpd_kpd_gaussians():
    rng = np.random.default_rng(0)
    ref, gen = rng.normal(size=(4000, 5)), rng.normal(size=(4000, 5)) * 1.5 + [1.0, 0, 0, 0, 0]
    scale = np.abs(ref).max(0)  # FPD works on features / max |reference|
    expect = ev.frechet_distance(gen.mean(0) / scale, np.cov(gen / scale, rowvar=False),
                                 ref.mean(0) / scale, np.cov(ref / scale, rowvar=False))
    r = ev.fpd_kpd(gen, ref, seed=0, device="cpu", **SMALL_FPD)
    assert r["fpd"] / 1e3 == pytest.approx(expect, rel=0.1) and r["kpd"] > 0
    same = ev.fpd_kpd(ref, ref, seed=0, device="cpu", **SMALL_FPD)
    assert abs(same["fpd"]) < 0.02 * r["fpd"] + 3 * same["fpd_err"]
    assert abs(same["kpd"]) < 0.02 * r["kpd"] + 3 * same["kpd_err"]


# ----------------------------------------------------------------------------- classifier
def test_classify_separable_and_identical():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 4)).astype(np.float32)
    r = ev.classify(a + 3.0, rng.normal(size=(600, 4)), seed=0, epochs=4, width=32, batch_size=100,
                    lr=1e-3, device="cpu", progress=False)
    assert r["auc"] > 0.97 and r["jsd"] > 0.5 and (r["n_train"], r["n_test"], r["n_val"]) == (720, 240, 240)
    assert len(r["weights_gen"]) == len(r["weights_ref"]) == 120 and np.all(np.isfinite(r["weights_gen"]))
    assert np.median(r["weights_ref"]) > 1 > np.median(r["weights_gen"])  # w = p/(1-p), reference = 1
    kw = dict(seed=3, epochs=2, width=16, batch_size=100, device="cpu", progress=False)
    same = ev.classify(a, rng.normal(size=(600, 4)), **kw)
    assert abs(same["auc"] - 0.5) < 0.12 and same["jsd"] < 0.1
    b = np.random.default_rng(5).normal(size=(600, 4))
    assert ev.classify(a, b, **kw)["auc"] == ev.classify(a, b, **kw)["auc"]  # seeded: reproducible


def test_split_sizes():
    assert ev.split_sizes(100_000) == (60_000, 20_000) and ev.split_sizes(200_000) == (60_000, 20_000)
    assert ev.split_sizes(1000) == (600, 200)


# ----------------------------------------------------------------------------- end to end, CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    for name, seed, depth in (("gen", 1, 1.5), ("ref", 2, 0.0)):
        common.write_showers(folder / f"{name}.hdf5", *fake_showers(300, seed, depth=depth), 2)
    with h5py.File(folder / "gen.hdf5", "a") as f:
        f.attrs["sampling_time_s"] = 12.5
    return folder


def test_evaluate_end_to_end(files):
    out = files / "out"
    s = ev.evaluate(files / "gen.hdf5", [files / "ref.hdf5"], 2, modes=("all",), out_dir=out, seed=0, cls_epochs=3,
                    cls_width=32, cls_batch_size=60, plots=False, progress=False, ram_gb=0.0, fpd_kw=SMALL_FPD)
    saved = json.loads((out / "summary.json").read_text())
    assert {"config", "times_s", "separation_power", "separation_power_mean", "cls_low", "cls_high", "fpd_kpd",
            "timing"} <= set(saved)
    assert set(saved["separation_power"]) == {"etot_einc", "voxel", *ev.LAYER_KEYS}
    assert len(saved["separation_power"]["ec_x"]) == 45 and saved["separation_power"]["etot_einc"] > 0.01
    for kind in ("cls_low", "cls_high"):
        assert 0 <= saved[kind]["auc"] <= 1 and {"jsd", "best_epoch", "n_val"} <= set(saved[kind])
        assert (out / f"{kind}_weights.npz").is_file()
    assert saved["cls_low"]["n_train"] == 360 and saved["separation_power_mean"]["e_layer"] > 0.05  # shifted depth
    assert {"fpd", "fpd_err", "kpd", "kpd_err"} <= set(saved["fpd_kpd"]) and saved["timing"]["sampling_time_s"] == 12.5
    assert not list(out.glob(".cls_low_*.npy"))  # disk-backed low-level inputs (ram_gb=0) are removed
    lines = (out / "separation_powers.txt").read_text().splitlines()
    assert len(lines) == 1 + 1 + 8 * 45 + 1
    assert s["cls_low"]["auc"] == saved["cls_low"]["auc"]


def test_scan_several_files_and_max_showers(files):
    ref = files / "ref.hdf5"
    one = ev.scan([ref], 2, progress=False)
    two = ev.scan([ref, ref], 2, max_showers=450, progress=False)  # the limit falls inside the second file
    assert (one["n"], two["n"]) == (300, 450) and common.count_showers([ref, ref], 2) == 600
    assert np.array_equal(two["features"]["e_layer"][300:], one["features"]["e_layer"][:150])
    e, x = fake_showers(300, 2)  # the same showers as ref.hdf5, straight from memory
    assert np.array_equal(one["features"]["ec_x"], ev.high_level_features(e, x, 2)["ec_x"])


def test_plot_family(tmp_path):
    edges = np.linspace(0, 1, 11)
    panels = [("a", edges, np.arange(10), np.arange(10)[::-1]), ("b", None, None, None)]
    ev.plot_family(tmp_path / "p.png", "test", panels, logx=False)
    assert (tmp_path / "p.png").stat().st_size > 1000


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def test_cli_errors(files, tmp_path):
    for args, words in ((("-i", tmp_path / "missing.hdf5", "-r", files / "ref.hdf5"), "not found"),
                        (("-i", files / "gen.hdf5", "-r", files / "ref.hdf5", "--ds", "4"), "--ds must be 2 or 3"),
                        (("-i", files / "gen.hdf5", "-r", files / "ref.hdf5", "--ds", "3"), "use --ds 2"),
                        (("-i", files / "gen.hdf5", "-r", files / "ref.hdf5", "--out", files), "exists; pass --overwrite")):
        r = run_cli(*args, *([] if "--out" in args else ["--out", tmp_path / "o"]))
        assert r.returncode == 1 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
