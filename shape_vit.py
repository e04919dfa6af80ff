"""Shape network of CaloDREAM (arXiv:2405.09629, paper Sec. 3.2, Table 2; SPEC 2.3): a 3-D vision transformer
(DiT blocks with adaLN-Zero, common.ViT) trained with Conditional Flow Matching on the voxels given the condition
[c_E, 45 u's], and its sampler: a condition file of E_inc and u's -> a CaloChallenge file of showers.

Train (the paper presets: DS2 26,042,688 / DS3 5,868,870 trainable parameters):
    python shape_vit.py --ds 2                                 # one GPU: 800 epochs, batch 64, cosine LR 1e-3
    python shape_vit.py --ds 3 --grad-checkpoint --compile     # 600 epochs, 1350 tokens per shower
    torchrun --nproc_per_node=4 shape_vit.py --ds 2            # several GPUs (each rank 64 / 4 of every batch)
    python shape_vit.py --resume                               # continue the newest run exactly where it stopped
    OMP_NUM_THREADS=1 python shape_vit.py --toy --preset small --epochs 10   # CPU quick run, synthetic showers
Sample (conditions from `energy.py --sample`, or the true u's of a CaloChallenge file):
    python shape_vit.py --sample --cond runs/energy-ds2-<time>/cond_ds2_100000.hdf5   # -> <run>/gen_ds2_100000.hdf5
    python shape_vit.py --sample --cond data/toy_ds2_ref.hdf5 --steps 8    # the shape network alone (true u's)
    python shape_vit.py --sample --solver bespoke --bespoke-ckpt runs/bespoke-ds2-<time>   # a trained solver
    python evaluate.py -i runs/shape_vit-ds2-<time>/gen_ds2_100000.hdf5 -r data/dataset_2_2.hdf5 --ds 2
The output is a CaloChallenge file (float64, gzip, 'incident_energies' (N,1), 'showers' (N, n_vox)), streamed in
batches, with a sidecar GEN.hdf5.json (solver, steps, NFE, time per shower, checkpoints, condition file).
Paper (real DS2): classifier AUC low / high level 0.54 / 0.52. Toy numbers and times: docs/RESULTS.md.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common

SCRIPT = "shape_vit"
# Paper Table 2 ('paper') and a reduced setting that trains on 2 CPU cores ('small').
PRESETS = {
    (2, "paper"): dict(patch=(3, 16, 1), dim=480, heads=6, mlp=1920, depth=6, epochs=800, batch_size=64, lr=1e-3,
                        clip_grad=100.0),
    (3, "paper"): dict(patch=(3, 5, 2), dim=240, heads=6, mlp=720, depth=6, epochs=600, batch_size=64, lr=1e-3,
                        clip_grad=50.0),
    (2, "small"): dict(patch=(3, 8, 3), dim=96, heads=4, mlp=384, depth=3, epochs=6, batch_size=64, lr=1e-3,
                        clip_grad=100.0),
    (3, "small"): dict(patch=(3, 10, 3), dim=96, heads=4, mlp=384, depth=3, epochs=6, batch_size=64, lr=1e-3,
                        clip_grad=50.0),
}


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
    p.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay (the submission: 1e-5)")
    p.add_argument("--clip-grad", type=float, help="max gradient norm (preset: DS2 100, DS3 50; 0: no clipping)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute blocks in backward (DS3 memory)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="held-out share of the training file "
                   "(at least 300 showers or a tenth)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="fp32 (the authors'; TF32 on "
                   "CUDA) or bf16 autocast, for training and sampling")
    p.add_argument("--val-every", type=int, default=1, help="validation loss every N epochs")
    p.add_argument("--ckpt-every", type=int, default=1, help="write ckpt.pt every N epochs")
    p.add_argument("--stop-after", type=int, help="stop after N epochs (the schedule still spans --epochs)")
    p.add_argument("--resume", nargs="?", const="latest", help="continue RUN_DIR or CKPT (bare: the newest run)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    s = p.add_argument_group("sampling")
    s.add_argument("--sample", action="store_true", help="generate showers instead of training")
    s.add_argument("--ckpt", help="run folder or checkpoint (default: newest shape_vit run of --ds)")
    s.add_argument("--cond", help="condition file of energy.py --sample, or a CaloChallenge file (its true u's); "
                                  "default: the newest condition file of --ds under --out")
    s.add_argument("--n", type=int, help="use the first N conditions (default: all)")
    s.add_argument("--solver", default="rk4", choices=sorted(common.NFE_PER_STEP) + ["bespoke"],
                   help="'bespoke': the trained solver of --bespoke-ckpt (its own step count)")
    s.add_argument("--bespoke-ckpt", help="bespoke.py run folder or checkpoint for --solver bespoke")
    s.add_argument("--steps", type=int, default=20, help="ODE steps (paper: RK4, 20)")
    s.add_argument("--output", help="generated file (default: <run>/gen_ds{ds}_<n>.hdf5)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return common.check_args(p.parse_args(argv))


def resolve(args):
    """Fill the flags left at None from the preset of (ds, preset)."""
    for key, value in PRESETS[(args.ds, args.preset)].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    return args


# ----------------------------------------------------------------------------- data
def fetch(showers, e_inc, rows, device):
    """Rows of the raw float32 arrays in RAM -> device tensors (pinned, asynchronous on CUDA)."""
    return common.to_device(torch.from_numpy(showers[rows]), device), common.to_device(torch.from_numpy(e_inc[rows]),
                                                                                       device)


def batch_loss(model, showers, e_inc, stats, ds, generator, precision="fp32", weight=None):
    """CFM loss of one batch of physical showers: preprocessing on the device, then fresh t and x0."""
    x1 = common.showers_to_net(showers, ds, stats)
    u = common.energies_to_u(e_inc, common.layer_energies(showers, ds))
    cond = common.shape_condition(e_inc, u, stats["cond"])
    with common.autocast(showers.device, precision):
        return common.cfm_loss(model, x1, cond, generator, weight)


@torch.no_grad()
def validation_loss(model, showers, e_inc, idx, stats, args, device):
    model.eval()
    gen, total = torch.Generator(device).manual_seed(args.seed + 999_983), 0.0  # the same draws every time
    seen = common.seen_voxels(stats)  # voxels never hit in training are left out (common.seen_voxels)
    for s in range(0, len(idx), 4 * args.batch_size):
        x, e = fetch(showers, e_inc, idx[s:s + 4 * args.batch_size], device)
        total += batch_loss(model, x, e, stats, args.ds, gen, args.precision, seen).item() * len(x)
    model.train()
    return total / max(1, len(idx))


# ----------------------------------------------------------------------------- training
def train(args):
    """Train (or resume) a run; returns its folder. Under torchrun every rank trains on its share of each batch."""
    rank, world, device = common.init_distributed(args.device)
    args, ckpt, run_dir = common.resume(args, SCRIPT)
    files = args.files or common.data_files(args.ds, args.data_dir, toy=args.toy)
    e_inc, showers = common.load_showers(files, args.ds, args.max_showers, progress=not args.no_progress and rank == 0)
    train_idx, val_idx = common.split_indices(len(showers), args.val_fraction, args.seed)
    if len(train_idx) < args.batch_size or args.batch_size % world:
        raise ValueError(f"{len(train_idx)} training showers and {world} ranks need a --batch-size of at most "
                         f"{len(train_idx)} that {world} divides (got {args.batch_size})")
    if ckpt is None:  # statistics of the training split only (read chunk by chunk: no copy of it)
        stats = common.fit_shape_stats(e_inc, showers, args.ds, train_idx)
    else:
        stats = ckpt["stats"]
    stats_dev = common.to_device(stats, device)

    common.seed_everything(args.seed)
    g = common.geometry(args.ds)
    model_args = ckpt["model_args"] if ckpt else dataclasses.asdict(common.ViTConfig(
        in_shape=(1, *g.shape), patch=args.patch, dim=args.dim, heads=args.heads, mlp=args.mlp, depth=args.depth))
    model = common.ViT(common.ViTConfig(**model_args)).to(device)
    run_dir = run_dir or common.make_run_dir(SCRIPT, args.ds, args.out)  # once the network is built
    log = common.Log(run_dir)  # silent on ranks > 0
    model.grad_checkpoint = args.grad_checkpoint
    steps_per_epoch = len(train_idx) // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    history, start, step, nonfinite = common.restore(ckpt, model, opt, sched) if ckpt else \
        ({"train_loss": [], "val_loss": []}, 0, 0, 0)
    net, counts = common.wrap_model(model, device, world, args.compile), {"nonfinite": nonfinite}
    config = common.json_config(args)
    log(f"{'resuming' if ckpt else 'run'} {run_dir} at epoch {start}; config {json.dumps(config)}")
    log(f"device {device} x {world}; {len(train_idx)} train / {len(val_idx)} val showers; "
        f"{common.count_parameters(model):,} trainable parameters; {steps_per_epoch} steps per epoch")

    last = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start, last):
        order, gen = common.epoch_generators(args.seed, epoch, rank, device)
        perm = train_idx[torch.randperm(len(train_idx), generator=order).numpy()]
        model.train()
        losses, tic = [], time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress or rank > 0, leave=False)
        for i in bar:
            x, e = fetch(showers, e_inc, common.batch_rows(perm, i, args.batch_size, rank, world), device)
            loss = batch_loss(net, x, e, stats_dev, args.ds, gen, args.precision)
            if common.optimizer_step(model, loss, opt, counts, run_dir, args.clip_grad):
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            sched.step()
            step += 1
        history["train_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        msg = ""
        if rank == 0 and len(val_idx) and ((epoch + 1) % args.val_every == 0 or epoch + 1 == last):
            history["val_loss"].append([epoch + 1, validation_loss(model, showers, e_inc, val_idx, stats_dev, args,
                                                                   device)])
            msg = f" val {history['val_loss'][-1][1]:.5f}"
        mem = f" max_mem {torch.cuda.max_memory_allocated() / 2**30:.1f}GiB" if device.type == "cuda" else ""
        log(f"epoch {epoch + 1}/{args.epochs} train {history['train_loss'][-1]:.5f}{msg} lr "
            f"{sched.get_last_lr()[0]:.2e} {steps_per_epoch * args.batch_size / (time.time() - tic):.1f} samples/s "
            f"skipped {counts['nonfinite']}{mem}")
        if rank == 0 and ((epoch + 1) % args.ckpt_every == 0 or epoch + 1 == last):
            common.save_checkpoint(run_dir / "ckpt.pt", script=SCRIPT, ds=args.ds, config=config,
                                   model_args=model_args, model=model.state_dict(), optimizer=opt.state_dict(),
                                   scheduler=sched.state_dict(), epoch=epoch + 1, step=step, stats=stats,
                                   history=history, nonfinite=counts["nonfinite"])
    common.finish_run(log, run_dir, history, last, args.epochs)
    return run_dir


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate(model, stats, e_inc, u, ds, solve, generator=None, precision="fp32"):
    """Showers (N, n_vox) float64 MeV on the CPU for E_inc (N,) MeV and physical u's (N, 45): x0 ~ N(0, 1) from
    `generator` (on the model's device), dx/dt = v from t = 0 to 1 with solve(velocity, x0) (common.make_solver),
    then the exact inverse (common.net_to_showers): fractions, cut, per-layer renormalisation, 15.15 keV cut."""
    device = next(model.parameters()).device
    e, u = e_inc.to(device), u.to(device)
    x0 = torch.randn((len(e), *model.cfg.in_shape), generator=generator, device=device)
    x1 = solve(model.velocity(common.shape_condition(e, u, stats["cond"]), precision), x0)
    return common.net_to_showers(x1, common.u_to_energies(e, u), stats).cpu()


def sample(args):
    """Showers for every row of a condition file (or the true u's of a CaloChallenge file)."""
    device = common.pick_device(args.device)
    path = Path(args.ckpt) if args.ckpt else common.find_latest_run(SCRIPT, args.ds, args.out)
    ckpt = common.load_checkpoint(path, script=SCRIPT, ds=args.ds)
    model, stats = common.build_vit(ckpt, device), common.to_device(ckpt["stats"], device)
    run_dir = path if path.is_dir() else path.parent
    cond = args.cond or common.find_newest(f"energy-ds{args.ds}-*/cond_ds{args.ds}_*.hdf5", args.out,
                                           "condition file", ": write one with `python energy.py --sample`")
    e_inc, u, cond_info = common.read_conditions(cond, args.ds, args.n, progress=not args.no_progress)
    solve, steps, nfe = common.make_solver(args.solver, args.steps, args.bespoke_ckpt, args.ds)
    output = Path(args.output) if args.output else run_dir / f"gen_ds{args.ds}_{len(e_inc)}.hdf5"
    batch_size, n = args.batch_size or 1000, len(e_inc)
    print(f"device {device}; {n} showers; shape network {path} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters, epoch {ckpt['epoch']}); conditions {cond_info['source']}; {args.solver} {steps} steps")
    common.seed_everything(args.seed)
    gen, t0 = torch.Generator(device).manual_seed(args.seed), time.time()
    with common.ShowerWriter(output, n, args.ds, args.overwrite) as w, \
            tqdm(total=n, desc="sampling", unit="shower", disable=args.no_progress) as bar:
        for s in range(0, n, batch_size):
            w.write(e_inc[s:s + batch_size], generate(model, stats, e_inc[s:s + batch_size], u[s:s + batch_size],
                                                      args.ds, solve, gen, args.precision))
            bar.update(min(batch_size, n - s))
    seconds = time.time() - t0
    info = {"file": str(output), "ds": args.ds, "n": n, "solver": args.solver, "steps": steps, "nfe": nfe,
            "batch_size": batch_size, "seed": args.seed, "device": str(device), "shape_ckpt": str(path),
            "shape_epoch": ckpt["epoch"], "bespoke_ckpt": args.bespoke_ckpt, "cond": str(cond),
            "cond_info": {k: v for k, v in cond_info.items() if isinstance(v, (str, int, float))},
            "seconds_shape": seconds, "ms_per_shower_shape": 1e3 * seconds / n}
    common.atomic_write(f"{output}.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1) + "\n"))
    print(f"wrote {output}: {1e3 * seconds / n:.2f} ms per shower at {nfe} NFE ({seconds:.1f} s)")
    return output


def main(argv=None):
    args = parse_args(argv)
    try:
        return sample(args) if args.sample else train(resolve(args))
    finally:
        common.destroy_distributed()


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, common.TrainingError, OSError, ValueError) as err:
        sys.exit(f"error: {err}")
