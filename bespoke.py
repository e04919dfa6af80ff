"""Bespoke non-stationary (BNS) ODE solvers for a frozen shape network (CaloDREAM, arXiv:2405.09629,
paper Sec. 3.4 and 4.4, Table 5, Fig. 9; SPEC 2.5; the solver family of Shaul et al., arXiv:2403.01329).

An n-step solver x_{i+1} = a_i x_0 + sum_{j<=i} b_ij v(x_j, t_j, c) with learnable times and coefficients
((n^2 + 5n - 2)/2 numbers, 51 for n = 8) is fitted to a reference solve (midpoint, 100 steps) of one
trained ViT / laViT; it then samples with n network evaluations instead of 80.

Train (one GPU; u's from the energy network, E_inc log-uniform; paper: Adam, batch 100, <= 5000 iterations):
    python bespoke.py --ds 2 --shape-ckpt runs/shape_vit-ds2-<time> --energy-ckpt runs/energy-ds2-<time> \
        --steps 8 --loss local                   # -> runs/bespoke-ds2-<time>/ckpt.pt (a few kB)
    python bespoke.py --ds 2 --steps 4 8 16 --loss local global   # six solvers from one reference pool
Sample with it: python shape_vit.py --sample --solver bespoke --bespoke-ckpt runs/bespoke-ds2-<time> (or
latent_vit.py; in code: shape_vit.generate_showers(..., solve_fn=bespoke_solve_fn(load_bespoke(PATH, ds)))).
Fig. 9 (AUC vs NFE for Euler, midpoint, RK4, global and local BNS; trains the BNS solvers unless --bespoke):
    python bespoke.py --sweep --ds 2 --like data/dataset_2_2.hdf5 --steps 4 8 16 32 --loss local global
CPU quick run on the synthetic showers (`python data/prepare.py toy --ds 2`, `python shape_vit.py --toy --preset
small`; u's of the real showers; on 2 shared cores the 160-condition reference pool takes 4 min, 100
iterations of a local n = 8 solver 4.5 min, a sweep of 11 points on 600 showers 21 min):
    python bespoke.py --preset small --energy-ckpt truth --steps 8 --loss local global
    python bespoke.py --sweep --preset small --energy-ckpt truth --like data/toy_ds2_ref.hdf5 --nfe 8 16 \
        --bespoke runs/bespoke-ds2-<time1> runs/bespoke-ds2-<time2> --vs-reference
Output of a sweep: runs/bespoke_sweep-ds2-<time>/ with sweep.md, sweep.json, sweep.png and per point
evaluate.py's folder. Paper: local BNS keeps AUC < 0.6 at 8 NFE, beats Euler, midpoint and RK4 at equal
NFE, and is close to RK4 at 80 NFE from 16 NFE on. Shown here only as end-point errors (BNS 2.3-3.7x below
RK4 at 8 and 16 NFE on the toy ViT): the CPU-trainable toy network is so far from its data that a trained
classifier gives AUC ~0.998 for every solver (README).
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import shape_vit

SCRIPT = "bespoke"
# 'paper': Sec. 4.4 / SPEC 2.5. 'small': bounded for a shared 2-core CPU and the reduced toy ViT.
PRESETS = {
    "paper": dict(pool=2000, n_val=200, iters=5000, patience=200, batch_size=100, lr=1e-3, n=None,
                  cls_epochs=50, cls_width=2048),
    "small": dict(pool=160, n_val=40, iters=100, patience=40, batch_size=16, lr=5e-3, n=600,
                  cls_epochs=50, cls_width=256),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=int, default=2, choices=(2, 3), help="CaloChallenge dataset")
    p.add_argument("--out", default="runs", help="root of the run folders")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="defaults of PRESETS")
    p.add_argument("--shape-ckpt", help="frozen shape_vit (or latent_vit) run or checkpoint "
                                        "(default: newest shape_vit run)")
    p.add_argument("--energy-ckpt", help="energy run (default: newest); 'truth': E_inc and u's of real "
                                         "showers (training file when training, --like when sweeping)")
    # solver training
    p.add_argument("--steps", type=int, nargs="+", default=[8], help="solver steps n (= NFE); several allowed")
    p.add_argument("--loss", nargs="+", default=["local"], choices=("local", "global"),
                   help="global: end-point MSE; local: per-step truncation MSE on the reference trajectory")
    p.add_argument("--ref-steps", type=int, default=100, help="midpoint steps of the reference solve")
    p.add_argument("--pool", type=int, help="conditions with a precomputed reference (training + validation)")
    p.add_argument("--n-val", type=int, help="of which held out for early stopping")
    p.add_argument("--iters", type=int, help="maximum Adam iterations")
    p.add_argument("--patience", type=int, help="stop after this many iterations without improvement")
    p.add_argument("--val-every", type=int, default=10, help="validation loss every N iterations")
    p.add_argument("--batch-size", type=int, help="conditions per iteration; also the sampling batch x10")
    p.add_argument("--micro-batch", type=int, help="split each batch for memory (gradients are accumulated)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    # sweep (Fig. 9)
    p.add_argument("--sweep", action="store_true", help="AUC vs NFE of all solvers (paper Fig. 9)")
    p.add_argument("--like", help="reference file: E_inc (and with truth the u's) and classifier reference")
    p.add_argument("--n", type=int, help="showers per sweep point (default: the preset's; "
                                              "paper: the whole --like file, small: 600)")
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="NFE of the fixed solvers")
    p.add_argument("--rk4-reference", type=int, default=80, help="extra RK4 point (paper: 20 steps = 80 NFE)")
    p.add_argument("--bespoke", nargs="+", help="trained bespoke runs to sweep instead of training new ones")
    p.add_argument("--cls-epochs", type=int, help="classifier epochs of evaluate.py")
    p.add_argument("--cls-width", type=int, help="classifier width of evaluate.py")
    p.add_argument("--cls-repeats", type=int, default=1, help="mean AUC of this many classifier seeds per point")
    p.add_argument("--vs-reference", action="store_true", help="also score each point against the showers "
                   "of RK4 at --rk4-reference from the same x0 (the solver's error alone)")
    p.add_argument("--keep-showers", action="store_true", help="keep the generated files of the sweep")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.n_val >= args.pool:
        raise ValueError(f"--n-val {args.n_val} must be smaller than --pool {args.pool}")
    return args


# ----------------------------------------------------------------------------- the solver (SPEC 2.5)
class BespokeSolver(nn.Module):
    """n-step non-stationary solver: x_{i+1} = a_i x_0 + sum_{j<=i} b_ij u_j, u_j = v(x_j, t_j), cached.

    Learnable, (n^2 + 5n - 2)/2 in all: theta (n - 1), a (n), b (n(n+1)/2, the lower triangle row by
    row). Times t_i = sum_{k<=i} |theta_k| / sum_{k<=n} |theta_k| with theta_n = 1 held fixed: at init
    (theta = 1) this is the SPEC's (1/n) sum_{k<=i} |theta_k|, t_n = 1 holds exactly at all times, and
    fixing theta_n removes the overall scale that the normalisation makes redundant. a = 1, b = 1/n is
    Euler with n uniform steps."""

    def __init__(self, n):
        super().__init__()
        self.n = n
        self.theta = nn.Parameter(torch.ones(n - 1))
        self.a = nn.Parameter(torch.ones(n))
        self.b = nn.Parameter(torch.full((n * (n + 1) // 2,), 1.0 / n))
        self.register_buffer("tril", torch.tril_indices(n, n), persistent=False)

    def times(self):
        """t_0 = 0, ..., t_n = 1 (n + 1 values, differentiable in theta)."""
        dt = torch.cat([self.theta.abs(), self.theta.new_ones(1)])
        t = torch.cumsum(dt, 0) / dt.sum()
        return torch.cat([t.new_zeros(1), t[:-1], t.new_ones(1)])

    def coefficients(self):
        """b as an (n, n) lower-triangular matrix."""
        return torch.zeros(self.n, self.n, device=self.b.device).index_put((self.tril[0], self.tril[1]), self.b)

    def forward(self, velocity, x0):
        """velocity(x, t) with t a 0-dim tensor (gradients reach the times through it) -> x(1)."""
        t, b = self.times(), self.coefficients()
        u = []
        x = x0
        for i in range(self.n):
            u.append(velocity(x, t[i]))
            x = self.a[i] * x0 + torch.tensordot(b[i, :i + 1], torch.stack(u), dims=1)  # one kernel, not i + 1
        return x


def load_bespoke(path, ds):
    """A trained solver (CPU, eval mode; .loss says how it was trained) from a bespoke run or checkpoint."""
    ckpt = common.load_checkpoint(path, script=SCRIPT, ds=ds)
    solver = BespokeSolver(ckpt["n"])
    solver.load_state_dict(ckpt["solver"])
    solver.loss = ckpt["loss"]
    return solver.eval()


def bespoke_solve_fn(solver):
    """solve_fn(velocity, x0) -> (x1, nfe) for shape_vit.generate_showers(..., solve_fn=...), like common.solve.

    `steps`, if given, must equal the solver's n (its step count is fixed by training)."""
    @torch.no_grad()
    def solve(velocity, x0, steps=None, method=None):
        if steps is not None and steps != solver.n:
            raise ValueError(f"this bespoke solver takes exactly {solver.n} steps, not {steps}")
        return solver.to(x0.device)(lambda x, t: velocity(x, float(t)), x0), solver.n
    return solve


# ----------------------------------------------------------------------------- reference and losses
@torch.no_grad()
def reference_trajectory(velocity, x0, steps=100):
    """Midpoint solve (common.solve, one step at a time) keeping every grid point: (B, steps + 1, ...)."""
    xs = [x0]
    for k in range(steps):
        xs.append(common.solve(velocity, xs[-1], 1, "midpoint", t0=k / steps, t1=(k + 1) / steps)[0])
    return torch.stack(xs, 1)


def interpolate(traj, t):
    """Reference trajectory (B, K + 1, ...) on the uniform grid at times t (m,) -> (m, B, ...), linear in
    t between grid points (error O(1/K^2), far below the few-step errors; differentiable in t)."""
    s = t * (traj.shape[1] - 1)
    k = s.detach().floor().long().clamp(0, traj.shape[1] - 2)
    w = (s - k).reshape(-1, 1, *[1] * (traj.dim() - 2))
    lo, hi = traj[:, k].movedim(1, 0), traj[:, k + 1].movedim(1, 0)
    return lo + w * (hi - lo)


def global_loss(solver, field, x0, cond, traj):
    """MSE between the bespoke end point and the reference end point from the same x0 and condition."""
    return F.mse_loss(solver(lambda x, t: field(x, t, cond), x0), traj[:, -1])


def local_loss(solver, field, x0, cond, traj):
    """Per-step truncation MSE: step i taken from the reference points x_ref(t_j), j <= i (velocities on
    the reference trajectory, all n in one batched call), compared with x_ref(t_{i+1}); mean over i."""
    n, t, b = solver.n, solver.times(), solver.coefficients()
    x_ref = interpolate(traj, t)  # (n + 1, B, ...), x_ref[0] = x0
    bsz = len(x0)
    u = field(x_ref[:-1].flatten(0, 1), t[:-1].repeat_interleave(bsz), cond.repeat(n, 1)).reshape(x_ref[:-1].shape)
    pred = solver.a.reshape(n, *[1] * x0.dim()) * x0 + torch.einsum("ij,j...->i...", b, u)
    return F.mse_loss(pred, x_ref[1:])


LOSSES = {"global": global_loss, "local": local_loss}


# ----------------------------------------------------------------------------- training
def load_network(path, ds, device):
    """A frozen shape network (a shape_vit or latent_vit run), its checkpoint, the velocity field
    field(x, t, cond) (shape_vit's wrapper; t may be a tensor with gradients) and
    generate(e_inc, u, solver, steps, batch_size, generator, solve_fn) -> showers (the run's sampler)."""
    script = common.load_checkpoint(path, ds=ds)["script"]
    if script == "shape_vit":
        model, ckpt = shape_vit.load_shape(path, ds, device)
        stats = shape_vit.to_device(ckpt["stats"], device)

        def generate(e_inc, u, solver, steps, batch_size, generator, solve_fn):
            return shape_vit.generate_showers(model, stats, e_inc, u, ds, solver, steps, batch_size, generator,
                                              solve_fn=solve_fn)
    elif script == "latent_vit":
        import latent_vit
        import vae
        model, decoder, ckpt = latent_vit.load_latent(path, ds, device)
        stats, vae_stats = shape_vit.to_device(ckpt["stats"], device), shape_vit.to_device(ckpt["vae"]["stats"], device)
        cut = ckpt["vae"].get("cut") or vae.DEFAULT_CUT

        def generate(e_inc, u, solver, steps, batch_size, generator, solve_fn):
            hook = {} if solve_fn is None else {"solve_fn": solve_fn}  # needs latent_vit's solve_fn hook
            return latent_vit.generate_showers(model, decoder, stats, vae_stats, e_inc, u, ds, cut, solver, steps,
                                               batch_size, generator, **hook)
    else:
        raise common.DataError(f"{path} is a {script!r} checkpoint, not a shape_vit or latent_vit one")
    model.requires_grad_(False)
    return model, ckpt, (lambda x, t, cond: shape_vit.velocity_fn(model, cond)(x, t)), generate


def training_conditions(args, ckpt, n, device):
    """E_inc (float64, MeV) and physical u's for n training conditions: log-uniform E_inc and the
    energy network, or (truth) the first n showers of the shape network's training file."""
    if args.energy_ckpt == "truth":
        cfg = ckpt["config"]
        files = cfg.get("files") or common.data_files(args.ds, cfg.get("data_dir", "data"), toy=cfg.get("toy"))
        e_inc, showers = common.load_showers(files, args.ds, n, progress=False)
        if len(e_inc) < n:
            raise ValueError(f"--pool {n} exceeds the {len(e_inc)} showers of {files}")
        e_inc, showers = torch.from_numpy(e_inc).double(), torch.from_numpy(showers)
        return e_inc, common.energies_to_u(e_inc, common.layer_energies(showers, args.ds))
    from energy import load_energy_sampler  # lazily: --energy-ckpt truth needs no energy network
    e_inc = common.sample_e_inc(n, generator=torch.Generator().manual_seed(args.seed))
    return e_inc, load_energy_sampler(args.energy_ckpt, args.ds, device)(e_inc).double().cpu()


@torch.no_grad()
def make_pool(args, model, ckpt, field, device, log):
    """x0, conditions and reference trajectories (midpoint, --ref-steps) for --pool conditions."""
    t0 = time.time()
    e_inc, u = training_conditions(args, ckpt, args.pool, device)
    cond = common.shape_condition(e_inc.to(device), u.to(device), shape_vit.to_device(ckpt["stats"]["cond"], device))
    gen = torch.Generator(device).manual_seed(args.seed)
    x0 = torch.randn((args.pool, *model.cfg.in_shape), generator=gen, device=device)
    bs = 10 * args.batch_size
    traj = torch.cat([reference_trajectory(lambda x, t: field(x, t, cond[s:s + bs]), x0[s:s + bs], args.ref_steps)
                      for s in range(0, args.pool, bs)])
    log(f"reference pool: {args.pool} conditions, midpoint {args.ref_steps} steps, {traj.numel() * 4 / 2**20:.0f} "
        f"MiB, {time.time() - t0:.1f}s")
    return x0, cond, traj


@torch.no_grad()
def end_point_mse(solve_fn, field, x0, cond, traj, bs):
    """MSE of solve_fn(velocity, x0) -> x1 against the reference end points, over the pool in batches."""
    total = sum(F.mse_loss(solve_fn(lambda x, t: field(x, t, cond[s:s + bs]), x0[s:s + bs]), traj[s:s + bs, -1],
                           reduction="sum").item() for s in range(0, len(x0), bs))
    return total / traj[:, -1].numel()


def train_solver(n, loss_name, field, pool, args, log):
    """Adam on the solver parameters; validation every --val-every iterations on the held-out part of
    the pool, early stop after --patience iterations without improvement; returns the best solver."""
    x0, cond, traj = pool
    n_train, device, bs = len(x0) - args.n_val, x0.device, 10 * args.batch_size
    val = slice(n_train, None)
    solver = BespokeSolver(n).to(device)
    opt = torch.optim.Adam(solver.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed * 100003 + n)
    micro = args.micro_batch or args.batch_size

    @torch.no_grad()
    def val_loss():
        return sum(LOSSES[loss_name](solver, field, x0[val][s:s + bs], cond[val][s:s + bs], traj[val][s:s + bs]).item()
                   * len(x0[val][s:s + bs]) for s in range(0, args.n_val, bs)) / args.n_val

    best, best_at, best_state = val_loss(), 0, {k: v.clone() for k, v in solver.state_dict().items()}
    history = {"iter": [0], "val_loss": [best], "train_loss": []}
    log(f"BNS n={n} loss={loss_name}: {common.count_parameters(solver)} parameters, val loss at init (Euler) "
        f"{best:.4e}")
    t0, it = time.time(), 0
    for it in range(1, args.iters + 1):
        idx = torch.randint(n_train, (args.batch_size,), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for chunk in idx.split(micro):
            part = LOSSES[loss_name](solver, field, x0[chunk], cond[chunk], traj[chunk]) * len(chunk) / len(idx)
            part.backward()
            loss += part.item()
        if not math.isfinite(loss):
            log(f"iteration {it}: non-finite loss, update skipped")
            continue
        opt.step()
        history["train_loss"].append(loss)
        if it % args.val_every == 0 or it == args.iters:
            v = val_loss()
            history["iter"].append(it)
            history["val_loss"].append(v)
            if v < best:
                best, best_at, best_state = v, it, {k: t.clone() for k, t in solver.state_dict().items()}
            if it % (20 * args.val_every) == 0:
                log(f"  iter {it} train {loss:.4e} val {v:.4e} best {best:.4e} @ {best_at} "
                    f"({(time.time() - t0) / it:.2f}s/iter)")
            if it - best_at >= args.patience:
                break
    solver.load_state_dict(best_state)
    log(f"BNS n={n} loss={loss_name}: stopped after {it} iterations ({time.time() - t0:.0f}s), best val loss "
        f"{best:.4e} at iteration {best_at}; times {[round(x, 4) for x in solver.times().tolist()]}")
    return solver.eval(), history, best


def train(args, log=None):
    """Train one solver per (--steps, --loss) from one shared reference pool; returns the run folders."""
    device = common.pick_device(args.device)
    common.seed_everything(args.seed)
    shape_path = Path(args.shape_ckpt) if args.shape_ckpt else common.find_latest_run("shape_vit", args.ds, args.out)
    model, ckpt, field, _ = load_network(shape_path, args.ds, device)
    lines, outer = [], log or common.Log(None)

    def log(*msg):  # every solver's run folder gets the session's log up to its checkpoint
        lines.append(" ".join(map(str, msg)))
        outer(*msg)
    log(f"{SCRIPT}: device {device}; shape network {shape_path} ({sum(p.numel() for p in model.parameters()):,} "
        f"frozen parameters); config {json.dumps(vars(args))}")
    pool = make_pool(args, model, ckpt, field, device, log)
    x0v, cv, trv = (p[len(p) - args.n_val:] for p in pool)
    runs, bs = [], 10 * args.batch_size
    for n in args.steps:
        base = {m: end_point_mse(lambda v, x: common.solve(v, x, n // k, m)[0], field, x0v, cv, trv, bs)
                for m, k in common.NFE_PER_STEP.items() if n % k == 0}
        log(f"end-point MSE vs reference at {n} NFE: " + ", ".join(f"{m} {e:.4e}" for m, e in base.items()))
        for loss_name in args.loss:
            solver, history, best = train_solver(n, loss_name, field, pool, args, log)
            mse = end_point_mse(lambda v, x: solver(v, x), field, x0v, cv, trv, bs)
            log(f"BNS n={n} loss={loss_name}: end-point MSE {mse:.4e}")
            run_dir = common.make_run_dir(SCRIPT, args.ds, args.out)
            common.save_checkpoint(run_dir / "ckpt.pt", script=SCRIPT, ds=args.ds, n=n, loss=loss_name,
                                   solver=solver.state_dict(), shape_ckpt=str(shape_path), config=vars(args),
                                   times=solver.times().tolist(), history=history, best_val_loss=best,
                                   end_point_mse={**base, "bespoke": mse})
            log(f"saved {run_dir / 'ckpt.pt'}")
            (run_dir / "log.txt").write_text("\n".join(lines) + "\n")
            runs.append(run_dir)
    return runs


# ----------------------------------------------------------------------------- sweep (paper Fig. 9)
def sweep_points(args, bespoke_runs):
    """(label, solver, nfe, solve_fn or None, steps) of every point: RK4 at --rk4-reference first, the
    bespoke solvers (each at its own n), then Euler, midpoint and RK4 at each --nfe their stages divide."""
    points = [("rk4", "rk4", args.rk4_reference, None, args.rk4_reference // 4)] if args.rk4_reference else []
    for solver in (load_bespoke(run, args.ds) for run in bespoke_runs):
        points.append((f"bns-{solver.loss}", "bespoke", solver.n, bespoke_solve_fn(solver), solver.n))
    return points + [(m, m, nfe, None, nfe // k) for nfe in sorted(args.nfe) for m, k in common.NFE_PER_STEP.items()
                     if nfe % k == 0 and (m, nfe) != ("rk4", args.rk4_reference)]


def sweep(args):
    import evaluate
    if not args.like:
        raise ValueError("--sweep needs --like REF.hdf5 (E_inc of the generated showers, classifier reference)")
    if args.vs_reference and not args.rk4_reference:
        raise ValueError("--vs-reference scores against the RK4 showers of --rk4-reference, which is 0")
    device = common.pick_device(args.device)
    run_dir = common.make_run_dir(f"{SCRIPT}_sweep", args.ds, args.out)
    log = common.Log(run_dir)
    shape_path = Path(args.shape_ckpt) if args.shape_ckpt else common.find_latest_run("shape_vit", args.ds, args.out)
    args.shape_ckpt = str(shape_path)
    bespoke_runs = args.bespoke or train(args, log)
    _, _, _, generate = load_network(shape_path, args.ds, device)
    truth = args.energy_ckpt == "truth"
    e_inc, u = shape_vit.reference_condition(args.like, args.ds, args.n, with_u=truth)
    if not truth:
        from energy import load_energy_sampler
        u = load_energy_sampler(args.energy_ckpt, args.ds, device)(e_inc).double().cpu()

    def score(gen_path, ref_path, name):  # {high, low}: mean AUC of --cls-repeats classifiers (splits, inits)
        runs = [evaluate.evaluate(gen_path, ref_path, args.ds, modes=("cls-high", "cls-low"), seed=args.seed + k,
                                  out_dir=run_dir / (name + (f"_seed{k}" if k else "")), cls_epochs=args.cls_epochs,
                                  cls_width=args.cls_width, max_showers=len(e_inc), device=args.device, plots=False,
                                  progress=not args.no_progress) for k in range(args.cls_repeats)]
        return {lvl: [s[f"cls_{lvl}"]["auc"] for s in runs] for lvl in ("high", "low")}

    bs, rows, rk4_path = 10 * args.batch_size, [], run_dir / f"gen_rk4_{args.rk4_reference}.hdf5"
    for label, solver, nfe, solve_fn, steps in sweep_points(args, bespoke_runs):
        gen_path = run_dir / f"gen_{label}_{nfe}.hdf5"
        gen = torch.Generator(device).manual_seed(args.seed)  # the same x0 for every solver: paired comparison
        seconds = 0.0
        with common.ShowerWriter(gen_path, len(e_inc), args.ds) as writer:
            for s in range(0, len(e_inc), bs):
                t0 = time.time()
                x = generate(e_inc[s:s + bs], u[s:s + bs], solver, steps, bs, gen, solve_fn)
                seconds += time.time() - t0  # .cpu() inside synchronises
                writer.write(e_inc[s:s + bs], x)
        t0 = time.time()
        row = {"solver": label, "nfe": nfe, "steps": steps, "ms_per_shower": 1e3 * seconds / len(e_inc)}
        refs = [("", args.like)] + [("_vs_rk4", rk4_path)] * (args.vs_reference and gen_path != rk4_path)
        for suffix, ref_path in refs:
            for lvl, aucs in score(gen_path, ref_path, f"eval_{label}_{nfe}{suffix}").items():
                row[f"auc_{lvl}{suffix}"] = statistics.fmean(aucs)
                if len(aucs) > 1:
                    row[f"auc_{lvl}{suffix}_std"] = statistics.pstdev(aucs)
        rows.append({**row, "seconds_eval": time.time() - t0})
        log(json.dumps(rows[-1]))
        if not args.keep_showers and not (args.vs_reference and gen_path == rk4_path):
            gen_path.unlink()
    if not args.keep_showers:
        rk4_path.unlink(missing_ok=True)
    write_table(rows, run_dir, args, device, log)
    return run_dir


def write_table(rows, run_dir, args, device, log):
    """sweep.json, sweep.md (a table) and sweep.png (AUC vs NFE, log-x, one panel per classifier)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    meta = {"ds": args.ds, "shape_ckpt": args.shape_ckpt, "like": args.like, "n": args.n, "device": str(device),
            "energy": args.energy_ckpt or "newest energy run", "cls_epochs": args.cls_epochs,
            "cls_width": args.cls_width, "cls_repeats": args.cls_repeats, "seed": args.seed}
    (run_dir / "sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    keys = [k for k in ("auc_high", "auc_low", "auc_high_vs_rk4", "auc_low_vs_rk4") if any(k in r for r in rows)]
    lines = ["| solver | NFE | steps | " + " | ".join(keys) + " | ms / shower |", "|---" * (len(keys) + 4) + "|"]

    def cell(r, k):  # "mean +- std" over the classifier seeds, or the single AUC
        if k not in r:
            return "-"
        return f"{r[k]:.4f}" + (f" +- {r[k + '_std']:.4f}" if k + "_std" in r else "")

    lines += [f"| {r['solver']} | {r['nfe']} | {r['steps']} | " + " | ".join(cell(r, k) for k in keys)
              + f" | {r['ms_per_shower']:.2f} |" for r in sorted(rows, key=lambda r: (r["solver"], r["nfe"]))]
    (run_dir / "sweep.md").write_text(f"{json.dumps(meta)}\n\n" + "\n".join(lines) + "\n")
    fig, axes = plt.subplots((len(keys) + 1) // 2, 2, figsize=(10, 4 * ((len(keys) + 1) // 2)), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label in dict.fromkeys(r["solver"] for r in rows):
            pts = sorted((r["nfe"], r[key]) for r in rows if r["solver"] == label and key in r)
            ax.plot(*zip(*pts), "o-", label=label)
        ax.set(xscale="log", xlabel="NFE", ylabel="AUC", title=key.replace("auc_", "AUC ").replace("_", " "))
        ax.set_xticks(sorted({r["nfe"] for r in rows}), [str(n) for n in sorted({r["nfe"] for r in rows})])
        ax.minorticks_off()
        ax.axhline(0.5, color="grey", lw=0.5)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "sweep.png", dpi=120)
    log("\n".join(lines))
    log(f"wrote {run_dir / 'sweep.md'}, sweep.json, sweep.png")


def main(argv=None):
    args = parse_args(argv)
    if args.sweep:
        return sweep(args)
    return train(args)


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
