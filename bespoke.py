"""Bespoke non-stationary (BNS) ODE solvers for a frozen shape network (CaloDREAM, arXiv:2405.09629, paper Sec. 3.4
and 4.4, Table 5, Fig. 9; SPEC 2.5; the solver family of Shaul et al., arXiv:2403.01329).

An n-step solver x_{i+1} = a_i x_0 + sum_{j<=i} b_ij v(x_j, t_j, c) with learnable times and coefficients
((n^2 + 5n - 2)/2 numbers, 51 for n = 8; common.BespokeSolver) is fitted to a reference solve (midpoint, 100 steps)
of one trained ViT or laViT; the samplers then use it with n network evaluations instead of 80:
    python bespoke.py --ds 2 --ckpt runs/shape_vit-ds2-<time> --cond runs/energy-ds2-<time>/cond_ds2_100000.hdf5 \
        --steps 8 --loss local                     # one GPU -> runs/bespoke-ds2-<time>/ckpt.pt (a few kB)
    python bespoke.py --steps 4 8 16 --loss local global   # six solvers from one reference pool
    python shape_vit.py --sample --solver bespoke --bespoke-ckpt runs/bespoke-ds2-<time>   # (or latent_vit.py)
    # CPU quick run: the small toy ViT, the true u's of the toy training file
    python bespoke.py --preset small --cond data/toy_ds2_train.hdf5 --steps 8 --loss local
Conditions (paper: E_inc log-uniform, u's from the energy network): the first --pool rows of a condition file of
`energy.py --sample` (default: the newest of --ds), or of a CaloChallenge file (its true u's). The sweep of Fig. 9
(AUC against NFE for every solver) is tools/fig9_sweep.py. Paper: local BNS keeps AUC < 0.6 at 8 NFE, beats Euler,
midpoint and RK4 at equal NFE, and is close to RK4 at 80 NFE from 16 NFE on (the toy results: docs/RESULTS.md).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common

SCRIPT = "bespoke"
# 'paper': Sec. 4.4 / SPEC 2.5. 'small': bounded for a 2-core CPU and the reduced toy ViT.
PRESETS = {"paper": dict(pool=2000, n_val=200, iters=5000, patience=200, batch_size=100, lr=1e-3),
           "small": dict(pool=160, n_val=40, iters=100, patience=40, batch_size=16, lr=5e-3)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=int, default=2, choices=(2, 3), help="CaloChallenge dataset")
    p.add_argument("--out", default="runs", help="root of the run folders")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="defaults of PRESETS")
    p.add_argument("--ckpt", help="frozen shape_vit or latent_vit run or checkpoint (default: newest shape_vit)")
    p.add_argument("--cond", help="condition file, or a CaloChallenge file (its true u's); default: the newest "
                                  "condition file of --ds under --out")
    p.add_argument("--steps", type=int, nargs="+", default=[8], help="solver steps n (= NFE); several allowed")
    p.add_argument("--loss", nargs="+", default=["local"], choices=sorted(LOSSES),
                   help="global: end-point MSE; local: the sum of per-step RMSEs on the reference trajectory (the "
                        "authors'); local-mse: the per-step MSE")
    p.add_argument("--ref-steps", type=int, default=100, help="midpoint steps of the reference solve")
    p.add_argument("--pool", type=int, help="conditions with a precomputed reference (training + validation)")
    p.add_argument("--n-val", type=int, help="of which held out for early stopping")
    p.add_argument("--iters", type=int, help="maximum Adam iterations")
    p.add_argument("--patience", type=int, help="stop after this many iterations without improvement")
    p.add_argument("--val-every", type=int, default=10, help="validation loss every N iterations")
    p.add_argument("--batch-size", type=int, help="conditions per iteration (the reference solve: 10x)")
    p.add_argument("--micro-batch", type=int, help="split each batch for memory (gradients are accumulated)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.n_val >= args.pool:
        raise ValueError(f"--n-val {args.n_val} must be smaller than --pool {args.pool}")
    if min(args.steps) < 2:
        raise ValueError(f"--steps must be >= 2 (a 1-step solver has no times to learn), got {args.steps}")
    return common.check_args(args)


# ----------------------------------------------------------------------------- reference and losses (SPEC 2.5)
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


def local_errors(solver, field, x0, cond, traj):
    """Per-step truncation errors (n, B): step i taken from the reference points x_ref(t_j), j <= i (velocities on
    the reference trajectory, all n in one batched call), against x_ref(t_{i+1}); mean square over each shower."""
    n, t, b = solver.n, solver.times(), solver.coefficients()
    x_ref = interpolate(traj, t)  # (n + 1, B, ...), x_ref[0] = x0
    bsz = len(x0)
    u = field(x_ref[:-1].flatten(0, 1), t[:-1].repeat_interleave(bsz), cond.repeat(n, 1)).reshape(x_ref[:-1].shape)
    pred = solver.a.reshape(n, *[1] * x0.dim()) * x0 + torch.einsum("ij,j...->i...", b, u)
    return (pred - x_ref[1:]).square().flatten(2).mean(-1)


def local_loss(solver, field, x0, cond, traj):
    """The local loss as the authors compute it (SPEC 2.5): per shower the sum over steps of the per-step RMSE,
    averaged over the batch."""
    return local_errors(solver, field, x0, cond, traj).sqrt().sum(0).mean()


def local_mse_loss(solver, field, x0, cond, traj):
    """The per-step MSE averaged over steps and showers (this project's earlier form, kept for comparison)."""
    return local_errors(solver, field, x0, cond, traj).mean()


LOSSES = {"global": global_loss, "local": local_loss, "local-mse": local_mse_loss}


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def make_pool(args, model, stats, field, device, log):
    """x0, conditions and reference trajectories (midpoint, --ref-steps) for the first --pool conditions."""
    t0 = time.time()
    cond_path = args.cond or common.find_newest(f"energy-ds{args.ds}-*/cond_ds{args.ds}_*.hdf5", args.out,
                                                "condition file", ": write one with `python energy.py --sample`")
    e_inc, u, info = common.read_conditions(cond_path, args.ds, args.pool)
    cond = common.shape_condition(e_inc.to(device), u.to(device), stats["cond"])
    x0 = torch.randn((args.pool, *model.cfg.in_shape), generator=torch.Generator(device).manual_seed(args.seed),
                     device=device)
    bs = 10 * args.batch_size
    traj = torch.cat([reference_trajectory(lambda x, t: field(x, t, cond[s:s + bs]), x0[s:s + bs], args.ref_steps)
                      for s in range(0, args.pool, bs)])
    log(f"reference pool: {args.pool} conditions of {info['source']}, midpoint {args.ref_steps} steps, "
        f"{traj.numel() * 4 / 2**20:.0f} MiB, {time.time() - t0:.1f}s")
    return x0, cond, traj


@torch.no_grad()
def end_point_mse(solve, field, x0, cond, traj, bs):
    """MSE of solve(velocity, x0) -> x1 against the reference end points, over the pool in batches."""
    total = sum(F.mse_loss(solve(lambda x, t: field(x, t, cond[s:s + bs]), x0[s:s + bs]), traj[s:s + bs, -1],
                           reduction="sum").item() for s in range(0, len(x0), bs))
    return total / traj[:, -1].numel()


def train_solver(n, loss_name, field, pool, args, log):
    """Adam on the solver parameters; validation every --val-every iterations on the held-out part of
    the pool, early stop after --patience iterations without improvement; returns the best solver."""
    x0, cond, traj = pool
    n_train, device, bs = len(x0) - args.n_val, x0.device, 10 * args.batch_size
    val = slice(n_train, None)
    solver = common.BespokeSolver(n).to(device)
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


def train(args):
    """Train one solver per (--steps, --loss) from one shared reference pool; returns their run folders."""
    device = common.pick_device(args.device)
    common.check_folder(args.out)  # the run folders come after the training: check --out first
    common.seed_everything(args.seed)
    path = Path(args.ckpt) if args.ckpt else common.find_latest_run("shape_vit", args.ds, args.out)
    ckpt = common.load_checkpoint(path, script=("shape_vit", "latent_vit"), ds=args.ds)
    model, stats = common.build_vit(ckpt, device), common.to_device(ckpt["stats"], device)

    def field(x, t, cond):  # t a float or a tensor (with gradients reaching the solver's times)
        return model.velocity(cond)(x, t)
    lines, outer = [], common.Log(None)

    def log(*msg):  # every solver's run folder gets the log up to its checkpoint
        lines.append(" ".join(map(str, msg)))
        outer(*msg)
    log(f"{SCRIPT}: device {device}; {ckpt['script']} network {path} ({sum(p.numel() for p in model.parameters()):,} "
        f"frozen parameters); config {json.dumps(common.json_config(args))}")
    pool = make_pool(args, model, stats, field, device, log)
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
                                   solver=solver.state_dict(), shape_ckpt=str(path), config=common.json_config(args),
                                   times=solver.times().tolist(), history=history, best_val_loss=best,
                                   end_point_mse={**base, "bespoke": mse}, epoch=0)
            log(f"saved {run_dir / 'ckpt.pt'}")
            (run_dir / "log.txt").write_text("\n".join(lines) + "\n")
            runs.append(run_dir)
    return runs


if __name__ == "__main__":
    try:
        train(parse_args())
    except (common.DataError, common.TrainingError, OSError, ValueError) as err:
        sys.exit(f"error: {err}")
