"""Latent ViT of CaloDREAM (laViT; arXiv:2405.09629, Sec. 3.3 and Table 2; SPEC 2.3-2.4): the 3-D ViT of common.py
trained with Conditional Flow Matching on the 2-channel latent grid of a frozen VAE, and its sampler.

The VAE stays in vae.py; the two talk through latent files (common.read_latents):
    python vae.py --ds 2 && python vae.py --encode     # the VAE, then its latents of the training showers
    python latent_vit.py --ds 2                        # one GPU: newest runs/vae-ds2-*/latents.hdf5, 800 epochs
    python latent_vit.py --ds 3                        # 400 epochs
    torchrun --nproc_per_node=4 latent_vit.py --ds 2   # several GPUs (each rank 128 / 4 of every batch)
    python latent_vit.py --resume                      # continue the newest run exactly where it stopped
    python latent_vit.py --sample --cond runs/energy-ds2-<time>/cond_ds2_100000.hdf5   # -> <run>/latents_ds2_100000.hdf5
    python vae.py --decode runs/latent_vit-ds2-<time>/latents_ds2_100000.hdf5          # -> <run>/gen_ds2_100000.hdf5
    # CPU quick run on the synthetic showers (`python data/prepare.py toy --ds 2` first):
    python vae.py --toy --channels 16 --epochs 6 && python vae.py --encode && python latent_vit.py --preset small
Paper (real data): laViT AUC (low / high level) DS2 0.58 / 0.53, DS3 0.62 / 0.59. Toy numbers: docs/RESULTS.md.

Training data: the latent file holds the frozen VAE's posterior (mu, logvar) of every training shower, with E_inc
and the u's; every batch draws a fresh reparameterised latent z = mu + sigma * eps (SPEC 2.4), so the VAE never runs
during training. **Decision**: the latents are standardised per element (each of the C x L x A x R numbers) with
the mean of mu and the std of z, std^2 = Var(mu) + E[sigma^2], over the training split (stats["latent"]); the
sampler inverts it. The condition is [c_E, u's] as for the shape ViT, with this model's own u statistics. The
checkpoint names the VAE (path and training step) that made its latents; sampled latent files carry both, and
vae.py --decode refuses a VAE in another state.
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

SCRIPT = "latent_vit"
# Paper Table 2 ('paper') and a reduced setting for 2 CPU cores ('small'). The grid comes from the latent file.
PRESETS = {
    (2, "paper"): dict(patch=(3, 1, 1), dim=240, heads=6, mlp=960, depth=10, epochs=800, batch_size=128, lr=1e-3),
    (3, "paper"): dict(patch=(3, 2, 2), dim=240, heads=6, mlp=960, depth=10, epochs=400, batch_size=128, lr=1e-3),
    (2, "small"): dict(patch=(3, 3, 3), dim=96, heads=4, mlp=384, depth=3, epochs=30, batch_size=128, lr=1e-3),
    (3, "small"): dict(patch=(3, 2, 4), dim=96, heads=4, mlp=384, depth=3, epochs=30, batch_size=128, lr=1e-3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=int, default=2, choices=(2, 3), help="CaloChallenge dataset")
    p.add_argument("--latents", help="latent file of vae.py --encode (default: newest runs/vae-ds{ds}-*/latents.hdf5)")
    p.add_argument("--max-showers", type=int, help="use only the first N showers")
    p.add_argument("--out", default="runs", help="root of the run folders")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    # model and optimisation (None = the preset's value)
    p.add_argument("--preset", default="paper", choices=("paper", "small"), help="sizes of PRESETS")
    p.add_argument("--patch", type=int, nargs=3, help="patch size on the latent grid (layers, alpha, r)")
    p.add_argument("--dim", type=int, help="embedding dimension D (divisible by 6 and by --heads)")
    p.add_argument("--depth", type=int, help="number of DiT blocks")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--mlp", type=int, help="hidden size of the block MLPs")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="training batch (preset) / sampling batch (1000)")
    p.add_argument("--lr", type=float, help="peak LR of the per-step cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (the submission: 0)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: no clipping)")
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
    s.add_argument("--sample", action="store_true", help="sample latents instead of training")
    s.add_argument("--ckpt", help="run folder or checkpoint (default: newest latent_vit run of --ds)")
    s.add_argument("--cond", help="condition file of energy.py --sample, or a CaloChallenge file (its true u's); "
                                  "default: the newest condition file of --ds under --out")
    s.add_argument("--n", type=int, help="use the first N conditions (default: all)")
    s.add_argument("--solver", default="rk4", choices=sorted(common.NFE_PER_STEP) + ["bespoke"],
                   help="'bespoke': the trained solver of --bespoke-ckpt (its own step count)")
    s.add_argument("--bespoke-ckpt", help="bespoke.py run folder or checkpoint for --solver bespoke")
    s.add_argument("--steps", type=int, default=20, help="ODE steps (paper: RK4, 20)")
    s.add_argument("--output", help="latent file (default: <run>/latents_ds{ds}_<n>.hdf5)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return common.check_args(p.parse_args(argv))


def resolve(args):
    """Fill the flags left at None from the preset of (ds, preset)."""
    for key, value in PRESETS[(args.ds, args.preset)].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    return args


# ----------------------------------------------------------------------------- data
def fit_latent_stats(mu, logvar, idx, chunk=2000):
    """Per-element mean of mu and std of z = mu + sigma eps over the rows idx: std^2 = Var(mu) + E[sigma^2]."""
    s1 = s2 = sv = 0.0
    for s in range(0, len(idx), chunk):
        m, lv = torch.from_numpy(mu[idx[s:s + chunk]]).double(), torch.from_numpy(logvar[idx[s:s + chunk]]).double()
        s1, s2, sv = s1 + m.sum(0), s2 + (m * m).sum(0), sv + lv.exp().sum(0)
    mean = s1 / len(idx)
    var = (s2 / len(idx) - mean ** 2).clamp(min=0) + sv / len(idx)
    return common.check_stats({"mean": mean.float(), "std": var.sqrt().clamp(min=1e-6).float()}, len(idx))


def fetch(data, rows, device):
    """Rows of the latent file's arrays in RAM -> device tensors: mu, logvar, E_inc, u."""
    return [common.to_device(torch.from_numpy(data[k][rows]), device) for k in ("mu", "logvar", "incident_energies", "u")]


def batch_loss(model, mu, logvar, e_inc, u, stats, generator, precision="fp32"):
    """CFM loss on a fresh reparameterised, standardised latent of one batch."""
    z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator, device=mu.device)
    cond = common.shape_condition(e_inc, u, stats["cond"])
    with common.autocast(mu.device, precision):
        return common.cfm_loss(model, common.standardize(z, stats["latent"]), cond, generator)


@torch.no_grad()
def validation_loss(model, data, idx, stats, args, device):
    model.eval()
    gen, total = torch.Generator(device).manual_seed(args.seed + 999_983), 0.0  # the same draws every time
    for s in range(0, len(idx), 4 * args.batch_size):
        batch = fetch(data, idx[s:s + 4 * args.batch_size], device)
        total += batch_loss(model, *batch, stats, gen, args.precision).item() * len(batch[0])
    model.train()
    return total / max(1, len(idx))


# ----------------------------------------------------------------------------- training
def train(args):
    """Train (or resume) a run; returns its folder. Under torchrun every rank trains on its share of each batch."""
    rank, world, device = common.init_distributed(args.device)
    args, ckpt, run_dir = common.resume(args, SCRIPT)
    args.latents = args.latents or str(common.find_newest(f"vae-ds{args.ds}-*/latents.hdf5", args.out, "latent file",
                                                          ": write one with `python vae.py --encode`"))
    data, attrs = common.read_latents(args.latents, args.ds, args.max_showers)
    if "mu" not in data or "logvar" not in data:
        raise common.DataError(f"{args.latents} holds no mu/logvar: train on the output of `vae.py --encode`")
    train_idx, val_idx = common.split_indices(len(data["u"]), args.val_fraction, args.seed)
    if len(train_idx) < args.batch_size or args.batch_size % world:
        raise ValueError(f"{len(train_idx)} training showers and {world} ranks need a --batch-size of at most "
                         f"{len(train_idx)} that {world} divides (got {args.batch_size})")
    stats = ckpt["stats"] if ckpt else {
        "cond": common.fit_standardizer(common.u_features(torch.from_numpy(data["u"][train_idx]))),
        "latent": fit_latent_stats(data["mu"], data["logvar"], train_idx)}
    stats_dev = common.to_device(stats, device)

    common.seed_everything(args.seed)
    model_args = ckpt["model_args"] if ckpt else dataclasses.asdict(common.ViTConfig(
        in_shape=data["mu"].shape[1:], patch=args.patch, dim=args.dim, heads=args.heads, mlp=args.mlp,
        depth=args.depth))
    model = common.ViT(common.ViTConfig(**model_args)).to(device)
    run_dir = run_dir or common.make_run_dir(SCRIPT, args.ds, args.out)  # once the network is built
    log = common.Log(run_dir)  # silent on ranks > 0
    steps_per_epoch = len(train_idx) // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    history, start, step, nonfinite = common.restore(ckpt, model, opt, sched) if ckpt else \
        ({"train_loss": [], "val_loss": []}, 0, 0, 0)
    net, counts = common.wrap_model(model, device, world, args.compile), {"nonfinite": nonfinite}
    config, vae = common.json_config(args), {"vae_ckpt": attrs.get("vae_ckpt"), "vae_step": attrs.get("vae_step")}
    log(f"{'resuming' if ckpt else 'run'} {run_dir} at epoch {start}; config {json.dumps(config)}")
    log(f"device {device} x {world}; latents {args.latents} {data['mu'].shape[1:]} of the VAE {vae['vae_ckpt']}; "
        f"{len(train_idx)} train / {len(val_idx)} val showers; {common.count_parameters(model):,} trainable "
        f"parameters; {steps_per_epoch} steps per epoch")

    last = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start, last):
        order, gen = common.epoch_generators(args.seed, epoch, rank, device)
        perm = train_idx[torch.randperm(len(train_idx), generator=order).numpy()]
        model.train()
        losses, tic = [], time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress or rank > 0, leave=False)
        for i in bar:
            batch = fetch(data, common.batch_rows(perm, i, args.batch_size, rank, world), device)
            loss = batch_loss(net, *batch, stats_dev, gen, args.precision)
            if common.optimizer_step(model, loss, opt, counts, run_dir, args.clip_grad):
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            sched.step()
            step += 1
        history["train_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        msg = ""
        if rank == 0 and len(val_idx) and ((epoch + 1) % args.val_every == 0 or epoch + 1 == last):
            history["val_loss"].append([epoch + 1, validation_loss(model, data, val_idx, stats_dev, args, device)])
            msg = f" val {history['val_loss'][-1][1]:.5f}"
        log(f"epoch {epoch + 1}/{args.epochs} train {history['train_loss'][-1]:.5f}{msg} lr "
            f"{sched.get_last_lr()[0]:.2e} {steps_per_epoch * args.batch_size / (time.time() - tic):.1f} samples/s "
            f"skipped {counts['nonfinite']}")
        if rank == 0 and ((epoch + 1) % args.ckpt_every == 0 or epoch + 1 == last):
            common.save_checkpoint(run_dir / "ckpt.pt", script=SCRIPT, ds=args.ds, config=config,
                                   model_args=model_args, model=model.state_dict(), optimizer=opt.state_dict(),
                                   scheduler=sched.state_dict(), epoch=epoch + 1, step=step, stats=stats,
                                   history=history, nonfinite=counts["nonfinite"], **vae)
    common.finish_run(log, run_dir, history, last, args.epochs)
    return run_dir


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate(model, stats, e_inc, u, solve, generator=None, precision="fp32"):
    """Latents (N, C, L, A, R) float32 on the CPU for E_inc (N,) MeV and physical u's (N, 45): x0 ~ N(0, 1) on the
    latent grid, dx/dt = v from t = 0 to 1 with solve(velocity, x0) (common.make_solver), unstandardised."""
    device = next(model.parameters()).device
    cond = common.shape_condition(e_inc.to(device), u.to(device), stats["cond"])
    x0 = torch.randn((len(e_inc), *model.cfg.in_shape), generator=generator, device=device)
    return common.unstandardize(solve(model.velocity(cond, precision), x0).float(), stats["latent"]).cpu()


def sample(args):
    """Latents for every row of a condition file (or the true u's of a CaloChallenge file) -> a latent file."""
    device = common.pick_device(args.device)
    path = Path(args.ckpt) if args.ckpt else common.find_latest_run(SCRIPT, args.ds, args.out)
    ckpt = common.load_checkpoint(path, script=SCRIPT, ds=args.ds)
    model, stats = common.build_vit(ckpt, device), common.to_device(ckpt["stats"], device)
    run_dir = path if path.is_dir() else path.parent
    cond = args.cond or common.find_newest(f"energy-ds{args.ds}-*/cond_ds{args.ds}_*.hdf5", args.out,
                                           "condition file", ": write one with `python energy.py --sample`")
    e_inc, u, cond_info = common.read_conditions(cond, args.ds, args.n, progress=not args.no_progress)
    solve, steps, nfe = common.make_solver(args.solver, args.steps, args.bespoke_ckpt, args.ds)
    output = Path(args.output) if args.output else run_dir / f"latents_ds{args.ds}_{len(e_inc)}.hdf5"
    batch_size, n, shape = args.batch_size or 1000, len(e_inc), model.cfg.in_shape
    print(f"device {device}; {n} latents {shape}; laViT {path} (epoch {ckpt['epoch']}); conditions "
          f"{cond_info['source']}; {args.solver} {steps} steps")
    common.seed_everything(args.seed)
    gen, t0 = torch.Generator(device).manual_seed(args.seed), time.time()
    attrs = dict(format="calodream-latents", ds=args.ds, vae_ckpt=ckpt.get("vae_ckpt"), vae_step=ckpt.get("vae_step"),
                 latent_ckpt=str(path), cond=str(cond), solver=args.solver, steps=steps, nfe=nfe, seed=args.seed,
                 cond_seconds=cond_info.get("seconds"))
    with common.H5Writer(output, n, {"incident_energies": (1,), "u": (common.N_LAYERS,), "z": shape}, attrs,
                         args.overwrite, {"z": "float32"}) as w, \
            tqdm(total=n, desc="sampling", unit="shower", disable=args.no_progress) as bar:
        for s in range(0, n, batch_size):
            e, uu = e_inc[s:s + batch_size], u[s:s + batch_size]
            w.write(e, uu, generate(model, stats, e, uu, solve, gen, args.precision))
            bar.update(len(e))
        w.attrs["seconds"] = time.time() - t0
    print(f"wrote {output}: {1e3 * (time.time() - t0) / n:.2f} ms per shower at {nfe} NFE; decode it with "
          f"`python vae.py --decode {output}`")
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
