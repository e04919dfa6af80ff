"""Shape network of CaloDREAM (arXiv:2405.09629, paper Sec. 3.2, Table 2; SPEC 2.3): a 3-D vision
transformer (DiT blocks with adaLN-Zero) trained with Conditional Flow Matching on the voxels given
the condition [c_E, 45 u's], and the full sampling chain E_inc -> u (energy network) -> showers.

Train (one GPU; the paper presets: DS2 26,042,688 / DS3 5,868,870 trainable parameters):
    python shape_vit.py --ds 2                      # 800 epochs, batch 64, cosine LR 1e-3
    python shape_vit.py --ds 3 --grad-checkpoint --compile   # 600 epochs, 1350 tokens per shower
    python shape_vit.py --resume runs/shape_vit-ds2-<time>   # continue a run exactly where it stopped
CPU quick run on the synthetic showers (`python data/prepare.py toy --ds 2` first; about 30 min on 2 shared cores,
high-level classifier AUC about 0.72 with the true u's; on a busy CPU one thread is much faster than two):
    OMP_NUM_THREADS=1 python shape_vit.py --toy --preset small
Sample (E_inc log-uniform, or copied from a reference file; u's from the energy network):
    python shape_vit.py --sample --ckpt runs/shape_vit-ds2-<time> --energy-ckpt runs/energy-ds2-<time> \
        --like data/dataset_2_2.hdf5 --output gen_ds2.hdf5
    python shape_vit.py --sample --energy-ckpt truth --like data/toy_ds2_ref.hdf5   # u's of the reference
The output is a CaloChallenge file (float64, gzip, 'incident_energies' (N,1), 'showers' (N, n_vox)),
streamed in batches, with a sidecar GEN.hdf5.json (solver, steps, NFE, time per shower, checkpoints).
Score it with `python evaluate.py -i gen_ds2.hdf5 -r data/dataset_2_2.hdf5 --ds 2`.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

import common

SCRIPT = "shape_vit"
# Paper Table 2 ('paper') and a reduced setting that trains on 2 CPU cores in about 30 minutes ('small').
PRESETS = {
    (2, "paper"): dict(patch=(3, 16, 1), dim=480, heads=6, mlp=1920, depth=6, epochs=800, batch_size=64, lr=1e-3),
    (3, "paper"): dict(patch=(3, 5, 2), dim=240, heads=6, mlp=720, depth=6, epochs=600, batch_size=64, lr=1e-3),
    (2, "small"): dict(patch=(3, 8, 3), dim=96, heads=4, mlp=384, depth=3, epochs=6, batch_size=64, lr=1e-3),
    (3, "small"): dict(patch=(3, 10, 3), dim=96, heads=4, mlp=384, depth=3, epochs=6, batch_size=64, lr=1e-3),
}
# On --resume these flags apply as given; everything else comes from the checkpoint's config.
RUNTIME_FLAGS = ("device", "no_progress", "compile", "stop_after", "resume")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=int, default=2, choices=(2, 3), help="CaloChallenge dataset")
    p.add_argument("--data-dir", default="data", help="folder of the dataset files")
    p.add_argument("--toy", action="store_true", help="train on data/toy_ds{ds}_train.hdf5 (synthetic)")
    p.add_argument("--files", nargs="+", help="training files (overrides the defaults)")
    p.add_argument("--max-showers", type=int, help="use only the first N showers")
    p.add_argument("--out", default="runs", help="root of the run folders")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    # model and optimisation (None = the preset's value)
    p.add_argument("--preset", default="paper", choices=("paper", "small"), help="sizes of PRESETS")
    p.add_argument("--patch", type=int, nargs=3, help="patch size (layers, alpha, r)")
    p.add_argument("--dim", type=int, help="embedding dimension D (divisible by 6 and by --heads)")
    p.add_argument("--depth", type=int, help="number of DiT blocks")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--mlp", type=int, help="hidden size of the block MLPs")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="training batch (preset) / sampling batch (1000)")
    p.add_argument("--lr", type=float, help="peak LR of the per-step cosine decay")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute blocks in backward (DS3 memory)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-every", type=int, default=1, help="validation loss every N epochs")
    p.add_argument("--ckpt-every", type=int, default=1, help="write ckpt.pt every N epochs")
    p.add_argument("--stop-after", type=int, help="stop after N epochs (the schedule still spans --epochs)")
    p.add_argument("--resume", nargs="?", const="latest", help="continue RUN_DIR or CKPT (default: newest)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    add_sampling_args(p, SCRIPT, "the shape network alone")
    return p.parse_args(argv)


def add_sampling_args(p, script, alone):
    """The --sample flags of shape_vit.py and latent_vit.py (`alone`: what --energy-ckpt truth evaluates)."""
    p.add_argument("--sample", action="store_true", help="generate showers instead of training")
    p.add_argument("--ckpt", help=f"{script} run folder or checkpoint (default: newest run of --ds)")
    p.add_argument("--energy-ckpt", help="energy run folder or checkpoint (default: newest); 'truth' takes "
                                         f"the u's of the --like file (evaluates {alone})")
    p.add_argument("--n", "--showers", type=int, help="number of showers (default: as many as --like); under "
                   "torchrun write --showers (torchrun takes --n for its own --nnodes / --nproc-per-node)")
    p.add_argument("--like", help="reference file whose E_inc are copied (same law and count)")
    p.add_argument("--solver", default="rk4", choices=sorted(common.NFE_PER_STEP) + ["bespoke"],
                   help="'bespoke': the trained solver of --bespoke-ckpt (its own step count)")
    p.add_argument("--bespoke-ckpt", help="bespoke.py run folder or checkpoint for --solver bespoke")
    p.add_argument("--energy-solver", default="rk4", choices=sorted(common.NFE_PER_STEP), help="for the u's")
    p.add_argument("--energy-steps", type=int, default=50,
                   help="energy ODE steps per layer (paper: RK4 50; README: the fast setting)")
    p.add_argument("--steps", type=int, default=20, help="ODE steps (paper: RK4, 20)")
    p.add_argument("--output", help="generated file (default: <run>/gen_ds{ds}_<n>.hdf5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def resolve(args):
    """Fill the flags left at None from the preset of (ds, preset)."""
    for key, value in PRESETS[(args.ds, args.preset)].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    return args


def vit_config(args):
    g = common.geometry(args.ds)
    return common.ViTConfig(in_shape=(1, *g.shape), patch=tuple(args.patch), dim=args.dim, heads=args.heads,
                            mlp=args.mlp, depth=args.depth, cond_dim=1 + common.N_LAYERS)


def to_device(tree, device):
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    return tree.to(device)


def velocity_fn(model, cond):
    """The ODE right-hand side (x, t) -> v(x, t, cond) for common.solve (bespoke.py reuses it)."""
    device = cond.device

    def velocity(x, t):
        with common.autocast(device):
            return model(x, torch.as_tensor(t, dtype=torch.float32, device=device), cond).float()
    return velocity


# ----------------------------------------------------------------------------- training
def batch_loss(model, showers, e_inc, stats, ds, generator, share=slice(None)):
    """CFM loss of one batch of physical showers: fresh dequantisation noise, t and x0. With `share` (DDP) the
    noise, x0 and t are drawn for the whole global batch (as common.cfm_loss does) and only the share is used."""
    x1 = common.showers_to_net(showers, ds, stats, generator=generator)
    u = common.energies_to_u(e_inc, common.layer_energies(showers, ds))
    cond = common.shape_condition(e_inc, u, stats["cond"])
    with common.autocast(showers.device):
        return common.cfm_loss(model, x1, cond, generator=generator, share=share)


def fetch(showers, e_inc, idx, device):
    """Rows idx of the raw float32 arrays in RAM -> device tensors (pinned, asynchronous on CUDA)."""
    x, e = torch.from_numpy(showers[idx]), torch.from_numpy(e_inc[idx])
    if device.type == "cuda":
        x, e = x.pin_memory(), e.pin_memory()
    return x.to(device, non_blocking=True), e.to(device, non_blocking=True)


@torch.no_grad()
def validation_loss(model, showers, e_inc, idx, stats, args, device):
    model.eval()
    gen = torch.Generator(device).manual_seed(args.seed + 999_983)  # same draws every epoch: comparable
    total = 0.0
    for s in range(0, len(idx), 4 * args.batch_size):
        x, e = fetch(showers, e_inc, idx[s:s + 4 * args.batch_size], device)
        total += batch_loss(model, x, e, stats, args.ds, gen).item() * len(x)
    model.train()
    return total / max(1, len(idx))


def train(args):
    rank, world, device = common.init_distributed(args.device)  # torchrun: DDP, one global batch shared by ranks
    ckpt = None
    if args.resume:
        path = common.find_latest_run(SCRIPT, args.ds, args.out) if args.resume == "latest" else Path(args.resume)
        ckpt = common.load_checkpoint(path, script=SCRIPT)
        given = {k: getattr(args, k) for k in RUNTIME_FLAGS}
        args = argparse.Namespace(**{**ckpt["config"], **given})
        run_dir = path if path.is_dir() else path.parent
    else:
        run_dir = common.make_run_dir(SCRIPT, args.ds, args.out)  # under torchrun: rank 0's, broadcast
    log = common.Log(run_dir)  # silent on ranks > 0
    common.seed_everything(args.seed)
    config = json.loads(json.dumps(vars(args), default=str))  # paths as str, tuples as lists
    vit = json.loads(json.dumps(vars(vit_config(args))))
    model = common.ViT(vit_config(args)).to(device)
    model.grad_checkpoint = args.grad_checkpoint
    log(f"{'resuming' if ckpt else 'run'} {run_dir}; config: {json.dumps(config)}")
    log(f"device {device}; trainable parameters {common.count_parameters(model):,}")
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    if args.compile and device.type == "cuda":
        net = torch.compile(net)
    elif args.compile:
        print("--compile is ignored on CPU")

    files = args.files or common.data_files(args.ds, args.data_dir, toy=args.toy)
    try:
        e_inc, showers = common.load_showers(files, args.ds, args.max_showers,
                                             progress=not args.no_progress and rank == 0)
    except (common.DataError, ValueError):
        if ckpt is None and rank == 0:  # a bad file leaves no run folder behind
            __import__("shutil").rmtree(run_dir, ignore_errors=True)
        raise
    train_idx, val_idx = common.split_indices(len(showers), args.val_fraction, args.seed)
    if ckpt is None:  # statistics of the training split only (read row by row: no copy of it)
        stats = common.fit_shape_stats(e_inc, showers, args.ds, train_idx, seed=args.seed)
    else:
        stats = ckpt["stats"]
    stats_dev = to_device(stats, device)
    steps_per_epoch = max(1, len(train_idx) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    history, nonfinite, start_epoch, step = {"train_loss": [], "val_loss": []}, 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        history, nonfinite, start_epoch, step = ckpt["history"], ckpt["nonfinite"], ckpt["epoch"], ckpt["step"]
    log(f"{len(train_idx)} training / {len(val_idx)} validation showers; {steps_per_epoch} steps per epoch; "
        f"starting at epoch {start_epoch + 1} of {args.epochs}")

    def save(epoch):
        common.save_checkpoint(run_dir / "ckpt.pt", script=SCRIPT, ds=args.ds, config=config, vit=vit,
                               model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                               epoch=epoch, step=step, stats=stats, history=history, nonfinite=nonfinite)

    last = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    in_a_row = 0
    for epoch in range(start_epoch, last):
        gen = torch.Generator(device).manual_seed(args.seed * 100003 + epoch)
        perm = torch.randperm(len(train_idx), generator=gen, device=device).cpu().numpy()
        model.train()
        t0, losses = time.time(), []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress or rank > 0, leave=False)
        for i in bar:
            x, e = fetch(showers, e_inc, train_idx[perm[i * args.batch_size:(i + 1) * args.batch_size]], device)
            # every rank draws the whole batch's random numbers and computes its share of the mean
            share, weight = common.rank_share(len(x), rank, world)  # (all of it, 1.0) in a plain run
            loss = weight * batch_loss(net, x, e, stats_dev, args.ds, gen, share)
            opt.zero_grad(set_to_none=True)
            if common.all_mean(float(torch.isfinite(loss)), device) == 1:  # all ranks skip together
                loss.backward()
                if args.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                opt.step()
                losses.append(loss.item())
                in_a_row = 0
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            else:  # skip the update, keep the schedule on the step count
                nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
                if in_a_row >= 20:
                    raise SystemExit(f"error: 20 non-finite losses in a row (epoch {epoch + 1}, step {step}); "
                                     f"the last good checkpoint is {run_dir / 'ckpt.pt'}; "
                                     f"try a lower --lr or --clip-grad 1")
            sched.step()
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = steps_per_epoch * args.batch_size / (time.time() - t0)
        history["train_loss"].append(common.all_mean(float(np.mean(losses)) if losses else float("nan"), device))
        val = None
        if rank == 0 and len(val_idx) and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs):
            val = validation_loss(net if world == 1 else model, showers, e_inc, val_idx, stats_dev, args, device)
        history["val_loss"].append(val)
        log(f"epoch {epoch + 1} train_loss {history['train_loss'][-1]:.5f} val_loss "
            f"{'-' if val is None else f'{val:.5f}'} lr {sched.get_last_lr()[0]:.3e} samples/s {rate:.1f} "
            f"nonfinite {nonfinite} time {time.time() - t0:.1f}s"
            + (f" max_mem {torch.cuda.max_memory_allocated() / 2**30:.1f}GiB" if device.type == "cuda" else ""))
        if rank == 0 and ((epoch + 1) % args.ckpt_every == 0 or epoch + 1 == last):
            save(epoch + 1)
    log(f"done: {run_dir / 'ckpt.pt'} (epoch {last} of {args.epochs})")
    return run_dir


# ----------------------------------------------------------------------------- sampling
def load_shape(path, ds, device):
    """A trained shape network (eval mode, on device) and its checkpoint (config, stats, history)."""
    ckpt = common.load_checkpoint(path or common.find_latest_run(SCRIPT, ds), script=SCRIPT, ds=ds)
    cfg = common.ViTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["vit"].items()})
    model = common.ViT(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


@torch.no_grad()
def generate_showers(model, stats, e_inc, u, ds, solver="rk4", steps=20, batch_size=1000, generator=None,
                     solve_fn=None):
    """Showers (N, n_vox) float64 MeV on the CPU for E_inc (N,) MeV and physical u's (N, 45).

    x0 ~ N(0, 1) from `generator` (on the model's device), dx/dt = v from t = 0 to 1 with
    common.solve(solver, steps) or solve_fn(velocity, x0) -> (x1, nfe), then the exact inverse:
    fractions, the 5e-6 cut, per-layer renormalisation to the layer energies, the 15.15 keV cut."""
    device = next(model.parameters()).device
    if solve_fn is None:
        def solve_fn(velocity, x0):
            return common.solve(velocity, x0, steps, solver)
    out = []
    for s in range(0, len(e_inc), batch_size):
        e, uu = e_inc[s:s + batch_size].to(device), u[s:s + batch_size].to(device)
        cond = common.shape_condition(e, uu, stats["cond"])
        x0 = torch.randn((len(e), *model.cfg.in_shape), generator=generator, device=device)
        x1, _ = solve_fn(velocity_fn(model, cond), x0)
        out.append(common.net_to_showers(x1, common.u_to_energies(e, uu), stats).cpu())
    return torch.cat(out)


def reference_condition(path, ds, n, with_u):
    """E_inc (float64) of the first n showers of a reference file and, if with_u, their true u's
    (common.load_u: read chunk by chunk, a DS3 reference never sits in memory whole)."""
    f, n_ref = common.open_showers(path, ds)
    with f:
        n = n_ref if n is None else n
        if n > n_ref:
            raise ValueError(f"--n {n} exceeds the {n_ref} showers of {path}")
        if not with_u:
            return torch.from_numpy(f["incident_energies"][:n].reshape(-1).astype(np.float64)), None
    return common.load_u(path, ds, n, progress=False)


def shard_writer(output, n, ds, rank=0, world=1, overwrite=False):
    """Sampling under torchrun: (this rank's slice of the n showers, a ShowerWriter for it). A plain run
    writes `output` itself; rank r of N writes the hidden part .<output>.part<r>of<N> (see merge_shards)."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    if n < world:
        raise ValueError(f"{n} showers cannot be shared by {world} ranks")
    share = common.rank_share(n, rank, world)[0]
    part = output if world == 1 else output.with_name(f".{output.name}.part{rank}of{world}")
    return share, common.ShowerWriter(part, share.stop - share.start, ds, overwrite=True)


def merge_shards(output, n, ds, overwrite=False, chunk=1000):
    """After every rank wrote its part, rank 0 joins them in rank order into one CaloChallenge file (no
    shower lost or repeated) and deletes them. Nothing to do in a plain run."""
    if not common.is_distributed():
        return
    output, rank, world = Path(output), torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.distributed.barrier()
    if rank == 0:
        parts = [output.with_name(f".{output.name}.part{r}of{world}") for r in range(world)]
        with common.ShowerWriter(output, n, ds, overwrite=overwrite) as w:
            for part in parts:
                with h5py.File(part, "r") as f:
                    for s in range(0, len(f["showers"]), chunk):
                        w.write(f["incident_energies"][s:s + chunk], f["showers"][s:s + chunk])
        for part in parts:
            part.unlink()
    torch.distributed.barrier()


def sampling_setup(args, run_dir, rank=0, world=1):
    """What shape_vit.py and latent_vit.py --sample share: E_inc (the first --n of --like, or log-uniform),
    the bespoke solver hook, and this rank's share of the output (all of it in a plain run).
    Returns a namespace: e_inc, u (true u's of --like with --energy-ckpt truth, else None) of the share,
    n_all, n, output, writer, seed (per rank), solve_fn, nfe."""
    truth = args.energy_ckpt == "truth"
    if args.like:
        e_inc, u = reference_condition(args.like, args.ds, args.n, with_u=truth)
    elif truth:
        raise ValueError("--energy-ckpt truth takes the u's of the reference: pass --like REF.hdf5")
    elif args.n is None:
        raise ValueError("pass --n N (showers with log-uniform E_inc) or --like REF.hdf5")
    else:
        e_inc, u = common.sample_e_inc(args.n, generator=torch.Generator().manual_seed(args.seed)), None
    solve_fn, nfe = None, args.steps * common.NFE_PER_STEP.get(args.solver, 0)
    if args.solver == "bespoke":
        if not args.bespoke_ckpt:
            raise ValueError("--solver bespoke needs --bespoke-ckpt RUN_OR_CKPT (a bespoke.py run)")
        import bespoke  # lazily: bespoke.py imports this script
        solver = bespoke.load_bespoke(args.bespoke_ckpt, args.ds)
        solve_fn, args.steps, nfe = bespoke.bespoke_solve_fn(solver), solver.n, solver.n
    output = Path(args.output) if args.output else run_dir / f"gen_ds{args.ds}_{len(e_inc)}.hdf5"
    share, writer = shard_writer(output, len(e_inc), args.ds, rank, world, args.overwrite)  # refuses now
    return argparse.Namespace(e_inc=e_inc[share], u=None if u is None else u[share], n_all=len(e_inc),
                              n=share.stop - share.start, output=output, writer=writer, solve_fn=solve_fn, nfe=nfe,
                              seed=args.seed + 7919 * rank)  # rank 0 (and a plain run): the given seed


def sampling_u(args, setup, device, rank=0):
    """The u's of the share: the reference's (--energy-ckpt truth) or the energy network's. -> (u, description)"""
    if args.energy_ckpt == "truth":
        return setup.u, f"truth (u's of {args.like})"
    from energy import chain_u  # lazily: the shape network alone needs no energy network
    return chain_u(args.energy_ckpt, args.ds, setup.e_inc, device, args.energy_solver, args.energy_steps,
                   setup.seed + 1, progress=not args.no_progress and rank == 0)


def sample(args):
    """Generate showers for E_inc from --like (or log-uniform), u's from the energy network (or the truth).
    Under torchrun every rank generates its share (its own seeds) and rank 0 joins the parts in order."""
    rank, world, device = common.init_distributed(args.device)
    shape_path = Path(args.ckpt) if args.ckpt else common.find_latest_run(SCRIPT, args.ds, args.out)
    model, ckpt = load_shape(shape_path, args.ds, device)
    stats = to_device(ckpt["stats"], device)
    run_dir = shape_path if shape_path.is_dir() else shape_path.parent
    setup = sampling_setup(args, run_dir, rank, world)
    e_inc, n, batch_size, output = setup.e_inc, setup.n, args.batch_size or 1000, setup.output
    print(f"device {device}; {n} showers; shape network {shape_path} "
          f"({common.count_parameters(model):,} parameters, epoch {ckpt['epoch']}); "
          f"{args.solver} {args.steps} steps")

    common.seed_everything(setup.seed)
    t0 = time.time()
    u, energy_desc = sampling_u(args, setup, device, rank)
    t_energy = time.time() - t0
    gen = torch.Generator(device).manual_seed(setup.seed)
    t_shape = 0.0
    with setup.writer, tqdm(total=n, desc="sampling", unit="shower", disable=args.no_progress or rank > 0) as bar:
        for s in range(0, n, batch_size):
            t1 = time.time()
            x = generate_showers(model, stats, e_inc[s:s + batch_size], u[s:s + batch_size], args.ds,
                                 args.solver, args.steps, batch_size, generator=gen, solve_fn=setup.solve_fn)
            t_shape += time.time() - t1  # .cpu() inside synchronises
            setup.writer.write(e_inc[s:s + batch_size], x)
            bar.update(len(x))
    merge_shards(output, setup.n_all, args.ds, args.overwrite)
    total = time.time() - t0
    if rank > 0:
        return output
    nfe = setup.nfe
    info = {"file": str(output), "ds": args.ds, "n": setup.n_all, "ranks": world, "solver": args.solver,
            "steps": args.steps, "nfe": nfe, "batch_size": batch_size, "seed": args.seed, "device": str(device),
            "bespoke_ckpt": args.bespoke_ckpt, "shape_ckpt": str(shape_path), "shape_epoch": ckpt["epoch"],
            "energy": energy_desc,
            "like": args.like, "seconds_energy": t_energy, "seconds_shape": t_shape, "seconds_total": total,
            "ms_per_shower_shape": 1e3 * t_shape / n, "showers_per_second": n / total}
    Path(f"{output}.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {output}: {n / total:.1f} showers/s overall ({t_energy:.1f}s energy network, "
          f"{1e3 * t_shape / n:.2f} ms/shower shape network at {nfe} NFE, {total:.1f}s in all)")
    return output


def main(argv=None):
    args = parse_args(argv)
    run_dir = sample(args) if args.sample else train(resolve(args))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
