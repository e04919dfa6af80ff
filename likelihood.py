"""Likelihoods from the trained chain (energy.py + shape_vit.py): log p(shower | E_inc) of every shower of a
CaloChallenge file, the maximum-likelihood energy calibration, and anomaly scores. A CFM network is a continuous
normalising flow, so its density follows from the divergence of the velocity along the ODE from the data (t = 1)
back to the noise (t = 0): log p_1(z_1) = log N(z_0) - int_0^1 div v(z(t), t) dt (instantaneous change of
variables). Used as in CaloFlow (arXiv:2312.11618: the shower likelihood as an anomaly score for multi-particle
showers) and arXiv:2404.18992 (maximum likelihood of a conditional generative model as an energy calibration).

    python likelihood.py -i data/toy_ds2_ref.hdf5 --n 1000          # -> data/toy_ds2_ref.lik.hdf5 (+ .json)
    python likelihood.py -i calib.hdf5 --calibrate                    # + E_hat = argmax_E log p(shower | E)
    python likelihood.py -i calib.hdf5 --calibrate --calibrate-on energy  # argmax_E log p(E_0..E_44 | E): no ViT
    python likelihood.py -i singles.hdf5 --anomalous overlays.hdf5    # + ROC AUC of -log p, singles vs overlays
    python likelihood.py -i FILE --energy-ckpt RUN --shape-ckpt RUN --probes 4 --steps 8 --zeros dequantised
Defaults: the newest energy and shape_vit runs of --ds under --out (it says which it took); RK4 (3/8 rule) with
--steps 8 for the shape ViT and --energy-steps 8 for the 45 1-D flows, one Rademacher probe per shower.
Outputs, each written under a hidden name and renamed when complete: per-shower columns in OUTPUT (default
INPUT.lik.hdf5 beside the input; with --anomalous also ANOMALOUS.lik.hdf5), a summary OUTPUT.json, plots
OUTPUT_calibration.png / OUTPUT_roc.png. Cost on the CPU and the toy results: README and docs/RESULTS.md.

The change of variables. A shower x (voxel energies, MeV) given E_inc; per layer l the layer energy E_l and the
fractions f_lj = x_lj / E_l of its n_l non-zero voxels. With the zeros fixed (below), the n_l non-zero x_lj are
(E_l, n_l - 1 free fractions), |d(x) / d(E_l, f)| = E_l^(n_l - 1), so
    log p(x | E) = log p(E_0..E_44 | E_inc) + log p(f | E_inc, u) - sum_l (n_l - 1) log E_l.
Layer energies -> u's (common.energies_to_u): u_0 = f E_tot / E_inc, u_{l+1} = E_l / R_l with R_l = sum_{k>=l} E_k,
a triangular (stick-breaking) map, |dE / du| = (E_inc / f) prod_l R_l over the continuous u_{l+1}. Each u_i goes
through the rescaled logit and the standardisation, z_i = (logit(u_i) - mu_i) / s_i,
dz/du = (1 - 2 alpha) / (s_i y (1 - y)) with y = (1 - 2 alpha) u + alpha, and the energy network factorises,
log p(u | E_inc) = sum_i log p(z_i | z_<i, E_inc) + log dz_i/du_i: one 1-D flow per layer, conditioned on its z_i
from the transformer (teacher forcing on the data), so d v / d x there is the exact divergence (one VJP for all 45).
Fractions -> network space: z_j = (logit(f_j) - mu_j) / s_j per voxel (the 1e-7 cut first), density from the ViT
with the Hutchinson estimator (Rademacher probes, one VJP per probe and ODE stage; --divergence exact for small
models). The ViT's density lives on all V fractions of a layer, the data on the simplex sum_j f_j = 1; the sampler
renormalises each layer, i.e. projects along rays g -> g / sum g. For a density concentrated near the simplex the
projected density is p_f(f) = p_z(z(f)) prod_j dz_j/df_j * w ||nabla_z sum_j f_j(z_j)||, with w the (unknown)
thickness of the learned density normal to the simplex in network space, taken as 1 (a constant per non-empty layer:
it cancels in the calibration); the norm is sqrt(sum_j (df_j/dz_j)^2), which makes a one-voxel layer (f = 1)
contribute its network density alone.

Exact zeros are point masses, not densities, and the toy showers have many (about 9 empty layers and 80 % empty
voxels per shower). --zeros mass (default): in the energy part an empty layer is the atom u_{l+1} = 0 and the last
non-empty layer before 44 the atom u = 1; the sampler clips u to [0, 1], so their masses are P(z <= z(0)) =
Phi(z_0) and P(z >= z(1)) = Phi(-z_0) exactly (a 1-D flow map is increasing; z_0 is the noise its backward ODE
reaches), and the u's after the last non-empty layer change nothing in the shower (its energy is spent) and are
marginalised (they drop out). In the shape part a zero voxel is the cut bin f in [0, 1e-7]: its probability is the
network density at the zero times the bin width in network space, (logit(1e-7) - logit(0)) / s_j. --zeros density:
every atom is a point of the continuous network-space density (no masses, no widths). --zeros dequantised: energy
atoms as for mass, zero voxels moved uniformly into their cut bin (a one-sample bound on the bin probability). The
calibration and the anomaly AUC are compared between these in the README: the zero pattern is a large part of the
likelihood, and the per-zero constant (the bin width) never depends on E_inc.
laViT: no. Its sampler decodes a latent z deterministically (vae.py --decode); the decoded showers fill at most a
2430-dimensional set of the 6480-dimensional space, so a data shower has no density under it, and p(x) = int p(x|z)
p(z) dz would need an observation model the sampler does not use. Not implemented.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common

CONT, ATOM0, ATOM1, SPENT = 0, 1, 2, 3  # kinds of u_i: continuous, atom at 0 / at 1, after the energy is spent
LOG_2PI = math.log(2 * math.pi)
CUT_WIDTH = float(common.logit(torch.tensor(common.FRACTION_CUT, dtype=torch.float64))
                  - common.logit(torch.tensor(0.0, dtype=torch.float64)))  # the cut bin [0, 1e-7] in logit space


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="CaloChallenge file of showers to score")
    p.add_argument("--ds", type=int, default=2, choices=(2, 3), help="CaloChallenge dataset")
    p.add_argument("--n", type=int, help="score only the first N showers (of each file)")
    p.add_argument("--energy-ckpt", help="energy.py run or checkpoint (default: the newest under --out)")
    p.add_argument("--shape-ckpt", help="shape_vit.py run or checkpoint (default: the newest under --out)")
    p.add_argument("--out", default="runs", help="root of the run folders (for the default checkpoints)")
    p.add_argument("--output", help="per-shower scores (default: INPUT.lik.hdf5 beside the input)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--solver", default="rk4", choices=sorted(common.NFE_PER_STEP), help="ODE solver (SPEC 2.6)")
    p.add_argument("--steps", type=int, default=8, help="ODE steps of the shape ViT's likelihood")
    p.add_argument("--energy-steps", type=int, default=8, help="ODE steps of each 1-D energy flow")
    p.add_argument("--divergence", default="hutchinson", choices=("hutchinson", "exact"),
                   help="shape ViT divergence: Hutchinson, or exact (one VJP per voxel: small models only)")
    p.add_argument("--probes", type=int, default=1, help="Rademacher probes per shower (Hutchinson)")
    p.add_argument("--zeros", default="mass", choices=("mass", "density", "dequantised"),
                   help="treatment of the exact zeros (see the docstring)")
    p.add_argument("--calibrate", action="store_true", help="E_hat = argmax over E_inc of log p(shower | E_inc)")
    p.add_argument("--calibrate-on", default="shower", choices=("shower", "energy"),
                   help="calibration: maximise log p(shower | E_inc), or only its energy part log p(E_0..E_44 | E_inc) "
                   "(the shape terms then never run: much cheaper)")
    p.add_argument("--grid", type=int, default=9, help="calibration: grid points in ln E over [1 GeV, 1 TeV]")
    p.add_argument("--iters", type=int, default=14, help="calibration: golden-section steps after the grid")
    p.add_argument("--response-file", help="calibration baseline E_tot / <E_tot/E_inc>: the mean response of this "
                   "file (default: the energy run's training files when present, else the input)")
    p.add_argument("--anomalous", help="a second CaloChallenge file (e.g. overlays): ROC AUC of -log p against it")
    p.add_argument("--batch-size", type=int, default=64, help="rows (shower, E_inc) per network batch")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probes and the dequantisation")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = common.check_args(p.parse_args(argv))
    for k in ("energy_steps", "probes", "grid"):
        if getattr(args, k) < (2 if k == "grid" else 1):
            raise ValueError(f"--{k.replace('_', '-')} must be >= {2 if k == 'grid' else 1}, got {getattr(args, k)}")
    return args


# ----------------------------------------------------------------------------- the ODE likelihood
def ode_log_density(velocity, divergence, x1, n_div, steps, solver="rk4"):
    """Integrate dx/dt = v from t = 1 (data x1) to t = 0 with the divergence alongside (float64 state).

    velocity(x, t) -> v (x float32, requires grad); divergence(v, x) -> (B, n_div) estimates of div v.
    Returns (x0, -int_0^1 div dt per column (B, n_div)): log p_1(x1) = log N(x0) + the column."""
    shape, d = x1.shape, x1[0].numel()

    def rhs(state, t):
        with torch.enable_grad():
            x = state[:, :d].reshape(shape).float().requires_grad_(True)
            v = velocity(x, t)
            div = divergence(v, x)
        return torch.cat([v.detach().reshape(len(x), d).double(), div.detach().double()], 1)

    state = torch.cat([x1.reshape(len(x1), d).double(), x1.new_zeros(len(x1), n_div, dtype=torch.float64)], 1)
    end = common.solve(rhs, state, steps, solver, t0=1.0, t1=0.0)[0]
    return end[:, :d].reshape(shape), end[:, d:]


def gaussian_log_density(x0):
    """log N(x0; 0, 1) summed over all but the first axis."""
    return -0.5 * (x0.double().reshape(len(x0), -1) ** 2 + LOG_2PI).sum(1)


def hutchinson(probes):
    """div v ~ eps^T (dv/dx) eps for each Rademacher probe eps (K, B, ...): one VJP per probe -> (B, K)."""
    def divergence(v, x):
        out = []
        for k, eps in enumerate(probes):
            g, = torch.autograd.grad(v, x, eps, retain_graph=k < len(probes) - 1)
            out.append((g * eps).reshape(len(x), -1).sum(1))
        return torch.stack(out, 1)
    return divergence


def exact_divergence(v, x, chunk=64):
    """div v = sum_j d v_j / d x_j, one VJP per coordinate (batched `chunk` at a time) -> (B, 1)."""
    b, d = len(x), x[0].numel()
    total = x.new_zeros(b, dtype=torch.float64)
    for s in range(0, d, chunk):
        j = torch.arange(s, min(s + chunk, d), device=x.device)
        basis = torch.zeros(len(j), b, d, device=x.device, dtype=v.dtype)
        basis[torch.arange(len(j)), :, j] = 1
        g, = torch.autograd.grad(v, x, basis.reshape(len(j), *x.shape), retain_graph=True, is_grads_batched=True)
        total += g.reshape(len(j), b, d)[torch.arange(len(j)), :, j].double().sum(0)
    return total.unsqueeze(1)


def rademacher(shape, generators):
    """+-1 of `shape` (K, B, ...), row b drawn from generators[b] (the same numbers in any batch)."""
    k, b, *tail = shape
    return torch.stack([torch.randint(0, 2, (k, *tail), generator=g) for g in generators], 1).float() * 2 - 1


# ----------------------------------------------------------------------------- the energy part
def u_kinds(e_inc, layer_e):
    """Kind of each u_i (B, 45) and log |dE/du| over the continuous ones (B,) for layer energies (B, 45) MeV."""
    e = layer_e.double()
    r = e.flip(-1).cumsum(-1).flip(-1)  # R_l = sum_{k>=l} E_k, exactly 0 once the energy is spent
    rest = torch.where(r[:, :-1] == 0, SPENT, torch.where(e[:, :-1] == 0, ATOM0,
                                                          torch.where(r[:, 1:] == 0, ATOM1, CONT)))
    kind = torch.cat([torch.full_like(rest[:, :1], CONT), rest], 1)
    log_jac = torch.log(e_inc.double() / common.U0_SCALE) + torch.where(rest == CONT, r[:, :-1], 1.0).log().sum(1)
    return kind, log_jac


def log_dz_dx(x, std):
    """log d z / d x of z = (logit(x) - mean) / std (the rescaled logit, float64)."""
    a = common.LOGIT_ALPHA
    y = (1 - 2 * a) * x + a
    return math.log1p(-2 * a) - torch.log(std) - torch.log(y) - torch.log1p(-y)


def energy_flow(model, e_inc, z, steps, solver="rk4"):
    """The 45 1-D flows at network-space u's z (B, 45) given E_inc (B,) MeV, teacher-forced: (z0 (B, 45) the noise
    each backward ODE reaches, log p(z_i | z_<i, E_inc) (B, 45) in network space), float64."""
    dim = model.dim
    w_x, w_t, w_z = model.head_in.weight.split([1, dim, dim], 1)
    with torch.no_grad():
        ctx = model.context(z.float(), common.energy_condition(e_inc.double()).float()) @ w_z.T + model.head_in.bias
    times = {}

    def velocity(x, t):  # the shared CFM head at all 45 positions, its first Linear split as in energy.sample_z
        if t not in times:
            times[t] = model.t_embed(model.time_features(torch.tensor([t], device=x.device))) @ w_t.T
        return model.head(ctx + times[t] + x.unsqueeze(-1) * w_x.T).squeeze(-1)

    def divergence(v, x):  # v_i depends on x_i alone: one VJP gives every d v_i / d x_i exactly
        return torch.autograd.grad(v.sum(), x)[0]

    z0, minus_div = ode_log_density(velocity, divergence, z, common.N_LAYERS, steps, solver)
    return z0, -0.5 * (z0 ** 2 + LOG_2PI) + minus_div


def energy_terms(model, stats, e_inc, layer_e, steps, solver):
    """log p(E_0..E_44 | E_inc) per row (B,) with the atoms as masses ('energy_mass') and as network densities
    ('energy_density'), and the number of atoms."""
    kind, log_jac = u_kinds(e_inc, layer_e)
    u = common.energies_to_u(e_inc, layer_e)
    outside = u[:, 0] >= 1  # u_0 = f E_tot / E_inc > 1: impossible for the sampler (it clips u_0 to [0, 1])
    u = torch.where(kind == ATOM1, 1.0, torch.where(kind == ATOM0, 0.0, u))
    u[:, 0] = torch.where(outside, 0.5, u[:, 0])  # a stand-in for the impossible rows, set to -inf below
    std = stats["std"].double().to(u.device)
    z = common.standardize(common.logit(u), {"mean": stats["mean"].double(), "std": std})
    z0, log_density = energy_flow(model, e_inc, z, steps, solver)
    continuous = torch.where(kind == CONT, log_density + log_dz_dx(u, std), 0.0).sum(1)
    mass = torch.where(kind == ATOM0, torch.special.log_ndtr(z0), torch.where(kind == ATOM1,
                                                                              torch.special.log_ndtr(-z0), 0.0))
    atoms = (kind == ATOM0) | (kind == ATOM1)
    out = {"energy_mass": continuous + mass.sum(1) - log_jac,
           "energy_density": continuous + torch.where(atoms, log_density, 0.0).sum(1) - log_jac}
    out = {k: torch.where(outside, -math.inf, v) for k, v in out.items()}
    return {**out, "n_atoms": atoms.sum(1).double()}


# ----------------------------------------------------------------------------- the shape part
def fraction_terms(showers, stats, ds):
    """The data-only terms of the shape part (float64, (B,) each): log dz/df over the non-zero fractions, the
    simplex term sum_l log ||df/dz||, the zero-bin widths sum log((logit(1e-7) - logit(0)) / s_j), the voxel
    Jacobian -sum_l (n_l - 1) log E_l, and the counts; plus the fractions (B, 45, V) and the zero mask."""
    x = showers.double().reshape(len(showers), common.N_LAYERS, -1)
    e = x.sum(-1)
    frac = x / (e.unsqueeze(-1) + 1e-10)
    zero = frac <= common.FRACTION_CUT
    std = stats["vox"]["std"].double().to(x.device).reshape(common.N_LAYERS, -1)
    log_d = log_dz_dx(frac, std)
    n = (~zero).sum(-1)
    simplex = 0.5 * torch.logsumexp(torch.where(zero, -math.inf, -2 * log_d), -1)
    return {"log_dz_df": torch.where(zero, 0.0, log_d).sum((1, 2)),
            "simplex": torch.where(n > 0, simplex, 0.0).sum(1),
            "zero_width": torch.where(zero, math.log(CUT_WIDTH) - torch.log(std), 0.0).sum((1, 2)),
            "voxel_jacobian": -torch.where(n > 0, (n - 1) * torch.log(e.clamp(min=1e-300)), 0.0).sum(1),
            "n_zero": zero.sum((1, 2)).double(), "frac": frac, "zero": zero}


def shape_terms(vit, stats, e_inc, u, terms, noise, steps, solver, divergence, zeros):
    """log p_z(z | E_inc, u) of the ViT in network space per row: (mean over probes, its standard error)."""
    frac, zero = terms["frac"], terms["zero"]
    lz = common.logit(torch.where(zero, 0.0, frac))
    if zeros == "dequantised":
        lz = torch.where(zero, lz + noise["dequantise"].reshape(lz.shape).to(lz) * CUT_WIDTH, lz)
    vox = {k: v.double().to(lz.device) for k, v in stats["vox"].items()}
    z = common.standardize(lz.reshape(len(lz), *vox["mean"].shape), vox).float().unsqueeze(1)
    cond = common.shape_condition(e_inc, u.clamp(max=1), stats["cond"])
    if divergence == "exact":
        div, n_div = exact_divergence, 1
    else:
        div, n_div = hutchinson(noise["probes"].to(z.device)), noise["probes"].shape[0]
    z0, minus_div = ode_log_density(lambda x, t: vit(x, torch.as_tensor(t, dtype=torch.float32, device=x.device),
                                                     cond), div, z, n_div, steps, solver)
    err = minus_div.std(1) / math.sqrt(n_div) if n_div > 1 else torch.zeros_like(minus_div[:, 0])
    return gaussian_log_density(z0) + minus_div.mean(1), err


# ----------------------------------------------------------------------------- log p(shower | E_inc)
def log_likelihood(models, e_inc, showers, noise, cfg):
    """Every term of log p(shower | E_inc) for rows of showers (B, n_vox) MeV and E_inc (B,) (float64, (B,) each).

    log_p = energy + shape (network density + log dz/df + simplex [+ zero widths for --zeros mass/dequantised])
    + voxel_jacobian; energy uses the atom masses unless --zeros density."""
    energy_net, energy_stats, vit, shape_stats = models
    layer_e = common.layer_energies(showers.double(), cfg.ds)
    energy = energy_terms(energy_net, energy_stats, e_inc, layer_e, cfg.energy_steps, cfg.solver)
    terms = fraction_terms(showers, shape_stats, cfg.ds)
    u = common.energies_to_u(e_inc, layer_e)
    with torch.no_grad():
        vit_density, vit_err = shape_terms(vit, shape_stats, e_inc, u, terms, noise, cfg.steps, cfg.solver,
                                           cfg.divergence, cfg.zeros)
    widths = terms["zero_width"] if cfg.zeros != "density" else 0.0
    shape = vit_density + terms["log_dz_df"] + terms["simplex"] + widths
    e_part = energy["energy_density" if cfg.zeros == "density" else "energy_mass"]
    out = {"log_p": e_part + shape + terms["voxel_jacobian"], "log_p_energy": e_part, "log_p_shape": shape,
           "vit_density": vit_density, "vit_stderr": vit_err}
    out.update({k: v for k, v in energy.items()}, **{k: terms[k] for k in ("log_dz_df", "simplex", "zero_width",
                                                                           "voxel_jacobian", "n_zero")})
    return out


def draw_noise(index, n_vox, cfg):
    """Probes (K, B, 1, 45, A, R) and dequantisation uniforms (B, n_vox) of the showers with these file indices:
    shower i always gets the same numbers (generator seeded by seed and i), in any batch and for every E_inc."""
    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(i)) for i in index]
    probes = rademacher((cfg.probes, len(index), 1, *common.geometry(cfg.ds).shape), gens)
    return {"probes": probes, "dequantise": torch.stack([torch.rand(n_vox, generator=g) for g in gens])}


# ----------------------------------------------------------------------------- calibration: argmax_E log p
def golden_section(evaluate, n, grid=9, iters=14, lo=common.E_MIN, hi=common.E_MAX):
    """argmax over ln E in [ln lo, ln hi] per shower: a grid, then golden-section steps in the bracket around the
    grid's best point. evaluate(ln_e (n, k)) -> log p (n, k). Returns (ln E_hat (n,), log p there (n,))."""
    x = torch.linspace(math.log(lo), math.log(hi), grid, dtype=torch.float64)
    values = evaluate(x.expand(n, grid))
    best = values.argmax(1)
    a, b = x[(best - 1).clamp(min=0)], x[(best + 1).clamp(max=grid - 1)]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = evaluate(torch.stack([c, d], 1)).unbind(1)
    for _ in range(iters):
        left = fc > fd  # the maximum lies in [a, d]
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        new = torch.where(left, b - g * (b - a), a + g * (b - a))
        f_new = evaluate(new[:, None])[:, 0]
        c, d, fc, fd = (torch.where(left, new, d), torch.where(left, c, new), torch.where(left, f_new, fd),
                        torch.where(left, fc, f_new))
    cand_x, cand_f = torch.stack([x[best], c, d], 1), torch.stack([values.max(1).values, fc, fd], 1)
    pick = cand_f.argmax(1, keepdim=True)
    return cand_x.gather(1, pick)[:, 0], cand_f.gather(1, pick)[:, 0]


def rows_evaluator(models, showers, index, cfg, device, counter):
    """evaluate(e_inc (n, k)) -> log p (n, k) for the n showers at k energies each, in --batch-size rows."""
    noise = draw_noise(index, showers.shape[1], cfg)

    def evaluate(e_inc):
        n, k = e_inc.shape
        e_rows, out = e_inc.reshape(-1), []
        for s in range(0, n * k, cfg.batch_size):
            rows = torch.arange(s, min(s + cfg.batch_size, n * k)) // k  # shower of each row
            batch_noise = {"probes": noise["probes"][:, rows], "dequantise": noise["dequantise"][rows]}
            res = log_likelihood(models, e_rows[s:s + cfg.batch_size].to(device), showers[rows].to(device),
                                 batch_noise, cfg)
            out.append({key: v.cpu() for key, v in res.items()})
            counter["rows"] += len(rows)
        return {key: torch.cat([o[key] for o in out]).reshape(n, k) for key in out[0]}
    return evaluate


def energy_evaluator(models, showers, cfg, device, counter):
    """evaluate(e_inc (n, k)) -> {"log_p": log p(E_0..E_44 | E_inc) (n, k)}: the energy part alone (the shape terms
    are skipped, so the calibration sees only the layer energies)."""
    layer_e = common.layer_energies(showers.double(), cfg.ds)
    key = "energy_density" if cfg.zeros == "density" else "energy_mass"

    def evaluate(e_inc):
        n, k = e_inc.shape
        e_rows, out = e_inc.reshape(-1), []
        for s in range(0, n * k, cfg.batch_size):
            rows = torch.arange(s, min(s + cfg.batch_size, n * k)) // k
            res = energy_terms(models[0], models[1], e_rows[s:s + cfg.batch_size].to(device), layer_e[rows].to(device),
                               cfg.energy_steps, cfg.solver)
            out.append(res[key].cpu())
            counter["energy_rows"] = counter.get("energy_rows", 0) + len(rows)
        return {"log_p": torch.cat(out).reshape(n, k)}
    return evaluate


def score_file(models, path, cfg, device, calibrate=False, progress=True):
    """Every per-shower column of a file: the terms of log p(shower | E_inc) at its own E_inc, E_tot, and with
    calibrate E_hat and log p(shower | E_hat). Returns (dict of numpy columns, seconds, rows evaluated)."""
    cols, counter, index, start = [], {"rows": 0}, 0, time.time()
    bar = tqdm(total=common.count_showers(path, cfg.ds, cfg.n), desc=f"log p {Path(path).name}", unit="shower",
               disable=not progress)
    for e, x in common.iter_showers(path, cfg.ds, cfg.n, chunk=cfg.batch_size, progress=False):
        e, x = torch.from_numpy(e), torch.from_numpy(x)
        evaluate = rows_evaluator(models, x, torch.arange(index, index + len(e)), cfg, device, counter)
        res = {k: v[:, 0] for k, v in evaluate(e[:, None]).items()}
        res["e_tot"] = x.sum(1)
        if calibrate:
            if cfg.calibrate_on == "energy":
                evaluate = energy_evaluator(models, x, cfg, device, counter)
            ln_e, best = golden_section(lambda ln_e: evaluate(ln_e.exp())["log_p"], len(e), cfg.grid, cfg.iters)
            res["e_hat"], res["log_p_max"] = ln_e.exp(), best
        res["incident_energies"] = e
        cols.append(res)
        index += len(e)
        bar.update(len(e))
    bar.close()
    return {k: torch.cat([c[k] for c in cols]).numpy() for k in cols[0]}, time.time() - start, counter["rows"]


# ----------------------------------------------------------------------------- summaries: calibration, ROC
def roc_auc(y, score):
    """P(score of a y=1 row > score of a y=0 row) + P(tie)/2, from average ranks."""
    y, s = np.asarray(y).astype(bool), np.asarray(score, np.float64)
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]
    n1, n0 = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_curve(y, score):
    """False- and true-positive rates for every threshold (descending score)."""
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")
    y = np.asarray(y, bool)[order]
    return np.concatenate([[0], np.cumsum(~y) / max((~y).sum(), 1)]), np.concatenate([[0], np.cumsum(y) / max(y.sum(), 1)])


def spread(ratio):
    """Bias and resolution of a ratio E_est / E_true: mean - 1, std, median - 1, (q84 - q16) / 2 / median."""
    q16, q50, q84 = np.percentile(ratio, [16, 50, 84])
    return {"bias": float(ratio.mean() - 1), "resolution": float(ratio.std()), "median_bias": float(q50 - 1),
            "resolution_68": float((q84 - q16) / 2 / q50)}


def calibration_table(e_true, e_hat, e_tot, response):
    """Per energy (distinct E_true, or 8 bins in ln E when there are more than 30): ML and baseline
    (E_tot / response) bias and resolution, and the spread of E_tot / E_true itself (the toy's resolution)."""
    values = np.unique(e_true)
    if len(values) <= 30:
        groups = [(float(v), e_true == v) for v in values]
    else:
        edges = np.quantile(np.log(e_true), np.linspace(0, 1, 9))
        groups = [(float(np.exp(np.log(e_true[m]).mean())), m) for lo, hi in zip(edges[:-1], edges[1:])
                  if (m := (np.log(e_true) >= lo) & (np.log(e_true) <= hi)).sum() > 1]
    table = []
    for e, m in groups:
        r_tot = e_tot[m] / e_true[m]
        table.append({"e_true_gev": e / 1e3, "n": int(m.sum()), "ml": spread(e_hat[m] / e_true[m]),
                      "baseline": spread(r_tot / response),
                      "e_tot_resolution": float(r_tot.std() / r_tot.mean())})
    return table


def mean_response(paths, ds, n=None):
    """<E_tot / E_inc> over CaloChallenge files (the plain calibration's constant)."""
    r = [x.sum(1) / e for e, x in common.iter_showers(paths, ds, n, progress=False)]
    return float(np.concatenate(r).mean())


def anomaly_scores(a, b):
    """ROC AUCs (file b = anomalous = 1) of -log p and of its parts and variants (the zero treatments)."""
    scores = {"-log_p": lambda c: -c["log_p"], "-log_p_energy": lambda c: -c["log_p_energy"],
              "-log_p_shape": lambda c: -c["log_p_shape"],
              "-log_p (zeros: no widths)": lambda c: -(c["log_p"] - c["zero_width"]),
              "-log_p (energy atoms as densities)": lambda c: -(c["log_p"] - c["log_p_energy"] + c["energy_density"]),
              "-log_p (no voxel Jacobian)": lambda c: -(c["log_p"] - c["voxel_jacobian"]),
              "-n_zero (baseline)": lambda c: -c["n_zero"]}
    y = np.r_[np.zeros(len(a["log_p"])), np.ones(len(b["log_p"]))]
    return {name: roc_auc(y, np.r_[f(a), f(b)]) for name, f in scores.items()}, y, scores


# ----------------------------------------------------------------------------- plots (lazy matplotlib)
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    common.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    _pyplot().close(fig)


def plot_calibration(path, table, label="max. likelihood"):
    plt = _pyplot()
    e = [row["e_true_gev"] for row in table]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for key, label, style in (("ml", label, "o-"), ("baseline", "E_tot / <response>", "s--")):
        ax1.plot(e, [row[key]["median_bias"] for row in table], style, label=label)
        ax2.plot(e, [row[key]["resolution_68"] for row in table], style, label=label)
    ax2.plot(e, [row["e_tot_resolution"] for row in table], "k^:", label="data: std(E_tot) / <E_tot>")
    ax1.axhline(0, color="0.5", lw=0.6)
    ax1.set_ylabel("median E_hat / E_true - 1")
    ax2.set_ylabel("resolution (q84 - q16) / 2 / median")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("E_true [GeV]")
        ax.legend(fontsize=7)
    ax2.set_yscale("log")
    fig.tight_layout()
    save_figure(fig, path)


def plot_roc(path, a, b, aucs, scores):
    plt = _pyplot()
    y = np.r_[np.zeros(len(a["log_p"])), np.ones(len(b["log_p"]))]
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=80)
    for name in ("-log_p", "-log_p_energy", "-log_p_shape", "-n_zero (baseline)"):
        fpr, tpr = roc_curve(y, np.r_[scores[name](a), scores[name](b)])
        ax.plot(fpr, tpr, label=f"{name}: AUC {aucs[name]:.3f}")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.6)
    ax.set_xlabel("false-positive rate (input)")
    ax.set_ylabel("true-positive rate (anomalous)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main
def load_models(args, device):
    """(energy net, its stats, ViT, its stats) and the two checkpoint paths."""
    paths = [Path(p) if p else common.find_latest_run(s, args.ds, args.out).parent
             for p, s in ((args.energy_ckpt, "energy"), (args.shape_ckpt, "shape_vit"))]
    energy_ckpt = common.load_checkpoint(paths[0], script="energy", ds=args.ds)
    shape_ckpt = common.load_checkpoint(paths[1], script="shape_vit", ds=args.ds)
    energy_net = common.EnergyNet(**energy_ckpt["model_args"])
    energy_net.load_state_dict(energy_ckpt["model"])
    energy_net = energy_net.to(device).eval().requires_grad_(False)
    models = (energy_net, common.to_device(energy_ckpt["stats"], device), common.build_vit(shape_ckpt, device),
              common.to_device(shape_ckpt["stats"], device))
    return models, paths, energy_ckpt


def output_paths(args):
    """The per-shower files (input, anomalous), the summary and the plots; existing ones need --overwrite."""
    out = Path(args.output) if args.output else Path(args.input).with_suffix(".lik.hdf5")
    files = [out]
    if args.anomalous:
        files.append((out.parent if args.output else Path(args.anomalous).parent)
                     / Path(args.anomalous).with_suffix(".lik.hdf5").name)
        if files[1] == out:
            raise ValueError(f"the scores of --input and --anomalous would both go to {out}: pass --output")
    extra = [Path(f"{out}.json")] + [out.with_name(f"{out.stem}_{k}.png") for k, on in
                                      (("calibration", args.calibrate), ("roc", args.anomalous)) if on and not args.no_plots]
    for p in files + extra:  # before the work: existing outputs, a live writer, a folder that takes no file
        common.claim_output(p, args.overwrite)
    return files, extra


def write_scores(path, cols, attrs, overwrite):
    names = [k for k in cols if k != "incident_energies"]
    with common.H5Writer(path, len(cols["log_p"]), {"incident_energies": (1,), **{k: () for k in names}}, attrs,
                         overwrite) as w:
        w.write(cols["incident_energies"], *[cols[k] for k in names])


def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device)
    files, extra = output_paths(args)
    common.count_showers([args.input] + ([args.anomalous] if args.anomalous else []), args.ds)  # checks both
    models, ckpts, energy_ckpt = load_models(args, device)
    common.seed_everything(args.seed)
    print(f"device {device}; energy network {ckpts[0]} (epoch {energy_ckpt['epoch']}), shape ViT {ckpts[1]}; "
          f"{args.solver} {args.energy_steps} / {args.steps} steps, divergence {args.divergence} "
          f"({args.probes} probes), zeros {args.zeros}")
    summary = {"config": common.json_config(args), "energy_ckpt": str(ckpts[0]), "shape_ckpt": str(ckpts[1]),
               "device": str(device), "files": {}}
    results = []
    for path, out, calibrate in [(args.input, files[0], args.calibrate)] + \
            ([(args.anomalous, files[1], False)] if args.anomalous else []):
        cols, seconds, rows = score_file(models, path, args, device, calibrate, not args.no_progress)
        n = len(cols["log_p"])
        info = {"scores": str(out), "n": n, "seconds": seconds, "ms_per_shower": 1e3 * seconds / n,
                "ms_per_evaluation": 1e3 * seconds / rows, "evaluations_per_shower": rows / n,
                **{f"mean_{k}": float(np.mean(cols[k])) for k in ("log_p", "log_p_energy", "log_p_shape",
                                                                   "vit_stderr", "n_zero", "n_atoms")}}
        error = f"Hutchinson error {info['mean_vit_stderr']:.2f}" if args.probes > 1 and args.divergence != "exact" \
            else "no error estimate" if args.divergence != "exact" else "exact divergence"
        print(f"{path}: {n} showers, mean log p {info['mean_log_p']:.1f} (energy {info['mean_log_p_energy']:.1f}, "
              f"shape {info['mean_log_p_shape']:.1f}; {error}); {info['ms_per_shower']:.0f} ms per shower "
              f"({info['evaluations_per_shower']:.0f} evaluations)")
        if calibrate:
            default = [str(f) for f in energy_ckpt["config"].get("files") or [] if Path(f).is_file()]
            source = [args.response_file] if args.response_file else default or [args.input]
            response = mean_response(source, args.ds)
            table = calibration_table(cols["incident_energies"], cols["e_hat"], cols["e_tot"], response)
            info["calibration"] = {"on": args.calibrate_on, "response": response, "response_files": source, "table": table}
            for row in table:
                print(f"  E {row['e_true_gev']:8.2f} GeV: ML bias {row['ml']['median_bias']:+.4f} resolution "
                      f"{row['ml']['resolution_68']:.4f} | E_tot/<R> bias {row['baseline']['median_bias']:+.4f} "
                      f"resolution {row['baseline']['resolution_68']:.4f} | toy E_tot {row['e_tot_resolution']:.4f}")
        summary["files"][str(path)] = info
        results.append(cols)
    if args.anomalous:
        aucs, _, scores = anomaly_scores(*results)
        summary["anomaly_auc"] = aucs
        print("anomaly ROC AUC (anomalous = positive): " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()))
    attrs = {"format": "calodream-likelihood", "ds": args.ds, "energy_ckpt": str(ckpts[0]),
             "shape_ckpt": str(ckpts[1]), "zeros": args.zeros, "divergence": args.divergence, "probes": args.probes,
             **({"calibrate_on": args.calibrate_on} if args.calibrate else {})}
    for out, (path, cols) in zip(files, zip([args.input, args.anomalous], results)):
        write_scores(out, cols, {**attrs, "source": str(path)}, args.overwrite)
    if not args.no_plots and args.calibrate:
        plot_calibration(extra[1], summary["files"][str(args.input)]["calibration"]["table"],
                         f"max. likelihood ({args.calibrate_on})")
    if not args.no_plots and args.anomalous:
        plot_roc(extra[-1], *results, aucs, scores)
    common.atomic_write(extra[0], lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1) + "\n"))
    print(f"wrote {', '.join(map(str, files + extra))}")
    return files[0]


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
