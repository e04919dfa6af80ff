"""likelihood.py: the ODE likelihood against known densities, the 1-D energy flows (normalised with their atoms,
inverse of the sampler), Hutchinson against the exact divergence on a tiny ViT, the change of variables brute-forced,
the golden-section search, ROC AUC, and the CLI on the tiny trained chain."""
import argparse
import json
import math

import h5py
import numpy as np
import pytest
import torch

import common
import likelihood as L
from conftest import QUIET, assert_one_error_line, cli


def test_affine_flows_give_their_analytic_log_density():
    """x_t = a(t) x0 + t mu with a = 1 + t (s - 1) carries N(0, 1) to N(mu, s^2); v = A x + b with constant A
    carries it to N(c, e^A e^A^T). Exact divergence to the ODE error; Hutchinson with zero variance (diagonal
    Jacobian) and within its error (full A)."""
    mu, s = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, 2.0, 1.0])
    x1 = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)) * s + mu
    ref = torch.distributions.Normal(mu.double(), s.double()).log_prob(x1.double()).sum(1)
    velocity = lambda x, t: (s - 1) / (1 + t * (s - 1)) * (x - t * mu) + mu  # noqa: E731
    probes = L.rademacher((3, 6, 3), [torch.Generator().manual_seed(i) for i in range(6)])
    for div, k in ((L.exact_divergence, 1), (L.hutchinson(probes), 3)):
        x0, minus_div = L.ode_log_density(velocity, div, x1, k, steps=32)
        assert torch.allclose(L.gaussian_log_density(x0) + minus_div.mean(1), ref, atol=1e-5)
        assert minus_div.std(1).max() < 1e-5 if k > 1 else True

    a = torch.tensor([[0.2, -0.7, 0.1], [0.5, -0.3, 0.4], [0.0, 0.6, 0.1]])
    b = torch.tensor([0.3, -0.2, 0.5])
    m = torch.linalg.matrix_exp(a.double())
    c = torch.linalg.solve(a.double(), (m - torch.eye(3, dtype=torch.float64)) @ b.double())
    ref = torch.distributions.MultivariateNormal(c, m @ m.T).log_prob(x1.double())
    probes = L.rademacher((100, 6, 3), [torch.Generator().manual_seed(i) for i in range(6)])
    x0, minus_div = L.ode_log_density(lambda x, t: x @ a.T + b, L.hutchinson(probes), x1, 100, steps=8)
    est, err = L.gaussian_log_density(x0) + minus_div.mean(1), minus_div.std(1) / 10
    assert (err > 1e-3).all() and ((est - ref).abs() < 4 * err + 1e-4).all()
    x0, minus_div = L.ode_log_density(lambda x, t: x @ a.T + b, L.exact_divergence, x1, 1, steps=8)
    assert torch.allclose(minus_div[:, 0], torch.full((6,), -a.trace().item(), dtype=torch.float64), atol=1e-6)


def tiny_energy_net(seed=0):
    torch.manual_seed(seed)
    return common.EnergyNet(ff=32, inner=16, layers=1, head_layers=1).eval().requires_grad_(False)


def test_energy_flow_density_and_atoms_integrate_to_one():
    """For one layer given its prefix: the continuous density between the atoms (z(0), z(1)) plus the two atom
    masses Phi(z0(z(0))) and Phi(-z0(z(1))) sum to 1, and the density integrates to 1 over the real line."""
    model, i = tiny_energy_net(), 7
    grid = torch.linspace(-9, 9, 601, dtype=torch.float64)
    z = torch.randn(1, 45, generator=torch.Generator().manual_seed(1), dtype=torch.float64).repeat(len(grid), 1)
    z[:, i] = grid
    z0, log_density = L.energy_flow(model, torch.full((len(grid),), 2e4, dtype=torch.float64), z, steps=24)
    density = log_density[:, i].exp()
    assert abs(torch.trapezoid(density, grid).item() - 1) < 2e-3
    lo, hi = 250, 400  # grid[lo] = -1.5 and grid[hi] = 3 stand for z(0) and z(1)
    inside = torch.trapezoid(density[lo:hi + 1], grid[lo:hi + 1]).item()
    mass0, mass1 = torch.special.ndtr(z0[lo, i]).item(), torch.special.ndtr(-z0[hi, i]).item()
    assert mass0 > 0.01 and mass1 > 0.001 and abs(inside + mass0 + mass1 - 1) < 2e-3
    assert (z0[1:, i] > z0[:-1, i]).all()  # the 1-D flow map is increasing (the atom masses rest on it)
    other = log_density[:, :i]  # earlier layers do not see layer i (causal mask)
    assert torch.allclose(other, other[:1].expand_as(other), atol=1e-5)


def test_backward_odes_invert_the_samplers():
    """The likelihood ODE from a sample back to t = 0 returns the sampler's noise: the energy flow against
    energy.sample_z (its key/value cache and split head), the ViT against common.solve with ViT.velocity."""
    import energy
    model, e_inc = tiny_energy_net(), torch.tensor([3e3, 4e5], dtype=torch.float64)
    x0 = torch.randn(2, 45, generator=torch.Generator().manual_seed(2))
    z = energy.sample_z(model, common.energy_condition(e_inc).float(), x0, "rk4", 30)
    back, _ = L.energy_flow(model, e_inc, z.double(), steps=30)
    assert torch.allclose(back.float(), x0, atol=1e-4)
    vit, cond = tiny_vit(), torch.randn(2, 46)
    x0 = torch.randn(2, 1, 3, 4, 3, generator=torch.Generator().manual_seed(3))
    x1 = common.solve(vit.velocity(cond), x0, 30, "rk4")[0]
    back, _ = L.ode_log_density(lambda x, t: vit(x, torch.tensor(t), cond), L.exact_divergence, x1, 1, 30)
    assert torch.allclose(back.float(), x0, atol=1e-4)


def tiny_vit():
    vit = common.ViT(common.ViTConfig(in_shape=(1, 3, 4, 3), patch=(1, 2, 3), dim=12, heads=2, mlp=16, depth=1))
    torch.manual_seed(4)
    for p in vit.parameters():  # adaLN-Zero starts at v = 0: give every weight a value
        torch.nn.init.normal_(p, std=0.3)
    return vit.eval().requires_grad_(False)


def test_hutchinson_agrees_with_the_exact_divergence_on_a_tiny_vit():
    vit, cond = tiny_vit(), torch.randn(3, 46, generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, 1, 3, 4, 3, generator=torch.Generator().manual_seed(6), requires_grad=True)
    with torch.enable_grad():
        v = vit(x, torch.tensor(0.4), cond)
        exact = L.exact_divergence(v, x, chunk=10)[:, 0]
    brute = [torch.autograd.functional.jacobian(lambda y: vit(y[None], torch.tensor(0.4), cond[b:b + 1])[0],
                                                x[b].detach()).reshape(36, 36).trace() for b in range(3)]
    assert torch.allclose(exact.float(), torch.stack(brute), atol=1e-4)
    velocity = lambda y, t: vit(y, torch.tensor(t), cond)  # noqa: E731
    x0, ex = L.ode_log_density(velocity, L.exact_divergence, x.detach(), 1, steps=6)
    probes = L.rademacher((64, 3, 1, 3, 4, 3), [torch.Generator().manual_seed(7 + b) for b in range(3)])
    x0_h, hu = L.ode_log_density(velocity, L.hutchinson(probes), x.detach(), 64, steps=6)
    err = hu.std(1) / 8
    assert torch.equal(x0, x0_h) and (err > 0.01).all()
    assert ((hu.mean(1) - ex[:, 0]).abs() < 4 * err).all(), (hu.mean(1), ex[:, 0], err)


def tiny_shower():
    """A DS2 shower with 8 non-zero voxels: layer 0 (3 voxels), layer 1 empty, layer 2 (one voxel: f = 1),
    layer 3 (4 voxels), nothing after (u_4 = 1, u_5.. spent)."""
    x = torch.zeros(45, 144, dtype=torch.float64)
    x[0, [3, 10, 50]] = torch.tensor([120.0, 30.5, 2.25], dtype=torch.float64)
    x[2, 7] = 40.0
    x[3, [0, 9, 18, 100]] = torch.tensor([300.0, 12.0, 0.7, 5.5], dtype=torch.float64)
    return x.reshape(1, -1)


def test_change_of_variables_brute_forced_on_a_tiny_shower():
    """The Jacobians of likelihood.py (stick-breaking, logit, standardisation, voxels -> (E_l, fractions), the
    simplex term) against autograd through common's own preprocessing: the map from the 8 non-zero voxel energies
    to (the continuous u's in network space, the free fractions), and each layer's area element in network space."""
    x, e_inc = tiny_shower(), torch.tensor([2e3], dtype=torch.float64)
    nz = x[0] > 0
    kind, log_jac = L.u_kinds(e_inc, common.layer_energies(x, 2))
    assert kind[0, :6].tolist() == [L.CONT, L.CONT, L.ATOM0, L.CONT, L.ATOM1, L.SPENT]
    u_stats = {"mean": torch.linspace(-3, 1, 45, dtype=torch.float64), "std": torch.linspace(0.5, 3, 45,
                                                                                         dtype=torch.float64)}
    vox_std = torch.linspace(0.8, 2.5, 6480).reshape(45, 16, 9).double()
    stats = {"vox": {"mean": torch.linspace(-14, -2, 6480).reshape(45, 16, 9), "std": vox_std.float()}}
    cont = (kind[0] == L.CONT).nonzero()[:, 0]
    layers = [(0, [3, 10]), (3, [0, 9, 18])]  # free fractions: all but the last non-zero voxel of a layer

    def psi(values):  # non-zero voxel energies -> (network-space continuous u's, free fractions)
        full = torch.zeros(6480, dtype=torch.float64).masked_scatter(nz, values).reshape(1, -1)
        u = common.energies_to_u(e_inc, common.layer_energies(full, 2))
        frac = full.reshape(45, 144) / full.reshape(45, 144).sum(-1, keepdim=True).clamp(min=1e-300)
        return torch.cat([common.standardize(common.logit(u), u_stats)[0, cont]] + [frac[l, j] for l, j in layers])

    brute = torch.linalg.slogdet(torch.autograd.functional.jacobian(psi, x[0, nz]))[1]
    for l, free in layers:  # area element of f_free -> z (all non-zero voxels of the layer), as in the docstring
        others = torch.nonzero(x.reshape(45, 144)[l] > 0)[:, 0]

        def z_of(f_free, l=l, free=free, others=others):
            f = torch.zeros(144, dtype=torch.float64)
            f[free] = f_free
            f[others[-1]] = 1 - f_free.sum()
            y = common.logit(f[others])
            return (y - stats["vox"]["mean"].double().reshape(45, 144)[l, others]) / vox_std.reshape(45, 144)[l, others]
        f0 = x.reshape(45, 144)[l, free] / x.reshape(45, 144)[l].sum()
        jac = torch.autograd.functional.jacobian(z_of, f0)
        brute = brute + 0.5 * torch.logdet(jac.T @ jac)
    u = common.energies_to_u(e_inc, common.layer_energies(x, 2))
    terms = L.fraction_terms(x, stats, 2)
    analytic = (L.log_dz_dx(u, u_stats["std"])[0, cont].sum() - log_jac + terms["log_dz_df"] + terms["simplex"]
                + terms["voxel_jacobian"])
    assert torch.allclose(analytic, brute.reshape(1), rtol=0, atol=1e-6), (analytic, brute)
    assert terms["n_zero"].item() == 6480 - 8


def test_golden_section_finds_the_maximum():
    peak = torch.tensor([math.log(2.5e3), math.log(7e4), math.log(9.9e5)], dtype=torch.float64)
    calls = []

    def f(ln_e):  # asymmetric, one maximum per row
        calls.append(ln_e.shape[1])
        d = ln_e - peak[:, None]
        return -(d ** 2) - 0.3 * d ** 3 * (d > 0) - 2 * (d.abs() > 3)
    x, best = L.golden_section(f, 3, grid=9, iters=25)
    assert torch.allclose(x, peak, atol=1e-4) and best.max() <= 0
    assert calls == [9, 2] + [1] * 25


def test_roc_auc_known_answers():
    y = np.array([0, 0, 1, 1])
    assert L.roc_auc(y, [0.1, 0.2, 0.3, 0.4]) == 1.0 and L.roc_auc(y, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert L.roc_auc(y, [1, 1, 1, 1]) == 0.5 and L.roc_auc(y, [0.1, 0.35, 0.3, 0.4]) == 0.75
    fpr, tpr = L.roc_curve(y, [0.1, 0.35, 0.3, 0.4])
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]


def test_cli_scores_calibrates_and_compares_on_the_chain(chain, toy_ds2, tmp_path):
    ref, train = toy_ds2 / "toy_ds2_ref.hdf5", toy_ds2 / "toy_ds2_train.hdf5"
    out = tmp_path / "ref.lik.hdf5"
    base = ["likelihood.py", "-i", ref, "--n", "3", "--energy-ckpt", chain["energy"], "--shape-ckpt",
            chain["shape_vit"], "--steps", "1", "--energy-steps", "1", "--output", out, *QUIET]
    res = cli(*base, "--calibrate", "--grid", "2", "--iters", "1", "--anomalous", train, "--probes", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "anomaly ROC AUC" in res.stdout and "ML bias" in res.stdout
    with h5py.File(out) as f, h5py.File(tmp_path / "toy_ds2_train.lik.hdf5") as g:
        assert f["log_p"].shape == (3,) and f["e_hat"].shape == (3,) and g["log_p"].shape == (3,)
        assert f.attrs["format"] == "calodream-likelihood" and "e_hat" not in g
        parts = f["log_p_energy"][:] + f["log_p_shape"][:] + f["voxel_jacobian"][:]
        assert np.allclose(parts, f["log_p"][:]) and (f["e_hat"][:] >= 1e3).all() and (f["e_hat"][:] <= 1e6).all()
        assert (f["vit_stderr"][:] > 0).all()
    summary = json.loads((tmp_path / "ref.lik.hdf5.json").read_text())
    assert 0 <= summary["anomaly_auc"]["-log_p"] <= 1 and len(summary["files"]) == 2
    assert summary["files"][str(ref)]["calibration"]["table"][0]["n"] >= 1
    assert (tmp_path / "ref.lik_calibration.png").stat().st_size > 0 and (tmp_path / "ref.lik_roc.png").is_file()
    assert_one_error_line(cli(*base), "exists", "--overwrite")
    L.main([str(a) for a in base[1:]] + ["--overwrite", "--calibrate", "--calibrate-on", "energy", "--no-plots"])
    info = json.loads((tmp_path / "ref.lik.hdf5.json").read_text())["files"][str(ref)]
    assert info["calibration"]["on"] == "energy" and info["evaluations_per_shower"] == 1  # the ViT ran once each
    with h5py.File(out) as f:
        assert f.attrs["calibrate_on"] == "energy" and ((f["e_hat"][:] >= 1e3) & (f["e_hat"][:] <= 1e6)).all()
    with pytest.raises(common.DataError, match="missing.hdf5 not found"):
        L.main([str(a) for a in base[1:]] + ["--overwrite", "-i", str(tmp_path / "missing.hdf5")])
    with pytest.raises(ValueError, match="--probes must be >= 1"):
        L.main([str(a) for a in base[1:]] + ["--probes", "0"])


def test_log_likelihood_in_process_is_seeded_and_treatments_differ_only_where_they_should(chain, toy_ds2):
    args = argparse.Namespace(energy_ckpt=chain["energy"], shape_ckpt=chain["shape_vit"], ds=2, out="runs")
    models, _, _ = L.load_models(args, torch.device("cpu"))
    e, x = common.load_showers(toy_ds2 / "toy_ds2_ref.hdf5", 2, 4, progress=False)
    e, x = torch.from_numpy(e).double(), torch.from_numpy(x).double()
    cfg = argparse.Namespace(ds=2, energy_steps=2, steps=2, solver="rk4", divergence="hutchinson", probes=2,
                             seed=0, zeros="mass")
    runs = {}
    for zeros in ("mass", "density", "dequantised"):
        cfg.zeros = zeros
        runs[zeros] = L.log_likelihood(models, e, x, L.draw_noise(range(4), 6480, cfg), cfg)
    again = L.log_likelihood(models, e, x, L.draw_noise(range(4), 6480, cfg), cfg)
    assert torch.equal(again["log_p"], runs["dequantised"]["log_p"])
    m, d, q = runs["mass"], runs["density"], runs["dequantised"]
    assert torch.allclose(d["log_p"], m["log_p"] - m["zero_width"] - m["energy_mass"] + m["energy_density"])
    assert torch.equal(q["log_p_energy"], m["log_p_energy"]) and not torch.equal(q["vit_density"], m["vit_density"])
    assert (m["n_zero"] > 1000).all() and torch.isfinite(m["log_p"]).all()
    assert (m["energy_mass"] != m["energy_density"]).any()
