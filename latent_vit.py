"""Latent ViT of CaloDREAM (laViT; arXiv:2405.09629, Sec. 3.3 and Table 2; SPEC 2.3-2.4): the 3-D ViT of
common.py trained with Conditional Flow Matching on the 2-channel latent grid of a frozen VAE (vae.py),
and the sampling chain E_inc -> u (energy network) -> latent ODE -> VAE decoder -> showers.

Train (one GPU; the paper presets: DS2 10,711,566 / DS3 10,720,224 trainable parameters):
    python vae.py --ds 2                                         # first the VAE (200 epochs)
    python latent_vit.py --ds 2 --vae runs/vae-ds2-<time>         # 800 epochs, batch 128, cosine LR 1e-3
    python latent_vit.py --ds 3 --vae runs/vae-ds3-<time>         # 400 epochs
    python latent_vit.py --resume runs/latent_vit-ds2-<time>      # continue a run exactly where it stopped
CPU quick run on the synthetic showers (`python data/prepare.py toy --ds 2`, a --toy VAE first; about 8 minutes):
    OMP_NUM_THREADS=1 python latent_vit.py --toy --preset small --max-showers 4000 --epochs 6 --batch-size 64
Sample (E_inc copied from a reference file or log-uniform; u's from the energy network or the reference):
    python latent_vit.py --sample --ckpt runs/latent_vit-ds2-<time> --energy-ckpt runs/energy-ds2-<time> \
        --like data/dataset_2_2.hdf5 --output gen_lavit_ds2.hdf5
    python latent_vit.py --sample --energy-ckpt truth --like data/toy_ds2_ref.hdf5   # u's of the reference
    python evaluate.py -i gen_lavit_ds2.hdf5 -r data/dataset_2_2.hdf5 --ds 2
Paper: laViT AUC (low/high level) DS2 0.58/0.53, DS3 0.62/0.59. README.md (VAE and latent ViT) has toy numbers.

Training data: every batch is encoded by the frozen VAE (eval mode, deterministic) and a fresh
reparameterised latent z = mu + sigma * eps is drawn (SPEC 2.4). **Decision**: the latents are
standardised per element (each of the C x L x A x R numbers) with the mean of mu and the std of z,
std^2 = Var(mu) + E[sigma^2], over (at most 20000 showers of) the training split; stored as
stats["latent"]. The sampler inverts it before decoding. The condition is [c_E, u's] as for the
shape ViT, with this model's own u statistics (stats["cond"]).
The checkpoint embeds the frozen VAE (path, config, stats, weights and its calibrated normalised cut),
so sampling needs only the laViT checkpoint and always decodes with the VAE it was trained on.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
import vae as vae_lib
from shape_vit import add_sampling_args, merge_shards, sampling_setup, sampling_u, velocity_fn

SCRIPT = "latent_vit"
# Paper Table 2 ('paper') and a reduced setting for 2 CPU cores ('small'). The grid comes from the VAE.
PRESETS = {
    (2, "paper"): dict(patch=(3, 1, 1), dim=240, heads=6, mlp=960, depth=10, epochs=800, batch_size=128, lr=1e-3),
    (3, "paper"): dict(patch=(3, 2, 2), dim=240, heads=6, mlp=960, depth=10, epochs=400, batch_size=128, lr=1e-3),
    (2, "small"): dict(patch=(3, 3, 3), dim=96, heads=4, mlp=384, depth=3, epochs=30, batch_size=128, lr=1e-3),
    (3, "small"): dict(patch=(3, 2, 4), dim=96, heads=4, mlp=384, depth=3, epochs=30, batch_size=128, lr=1e-3),
}
RUNTIME_FLAGS = ("device", "no_progress", "compile", "stop_after", "resume")  # taken as given on --resume
LATENT_STATS_SHOWERS = 20000


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
    p.add_argument("--vae", help="VAE run folder or checkpoint (default: newest vae run of --ds)")
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
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-every", type=int, default=1, help="validation loss every N epochs")
    p.add_argument("--ckpt-every", type=int, default=1, help="write ckpt.pt every N epochs")
    p.add_argument("--stop-after", type=int, help="stop after N epochs (the schedule still spans --epochs)")
    p.add_argument("--resume", nargs="?", const="latest", help="continue RUN_DIR or CKPT (default: newest)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    add_sampling_args(p, SCRIPT, "laViT + VAE alone")
    p.add_argument("--cut", type=float, help="normalised cut on voxel fractions (default: the VAE's calibrated)")
    return p.parse_args(argv)


def resolve(args):
    """Fill the flags left at None from the preset of (ds, preset)."""
    for key, value in PRESETS[(args.ds, args.preset)].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    return args


def vit_config(args, latent_shape):
    return common.ViTConfig(in_shape=tuple(latent_shape), patch=tuple(args.patch), dim=args.dim, heads=args.heads,
                            mlp=args.mlp, depth=args.depth, cond_dim=1 + common.N_LAYERS)


def to_device(tree, device):
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    return tree.to(device) if torch.is_tensor(tree) else tree


# ----------------------------------------------------------------------------- latents
@torch.no_grad()
def encode_batch(vae, vae_stats, e_inc, showers, ds):
    """Physical batch -> posterior (mu, logvar) of the frozen VAE and the physical u's."""
    frac, layer_e = common.voxel_fractions(showers, ds)
    u = common.energies_to_u(e_inc, layer_e)
    mu, logvar = vae.encode(frac, common.shape_condition(e_inc, u, vae_stats["cond"]))  # float32, see vae.py
    return mu, logvar, u


@torch.no_grad()
def fit_latent_stats(vae, vae_stats, showers, e_inc, idx, ds, device, batch_size=500):
    """Per-element mean of mu and std of z = mu + sigma eps: std^2 = Var(mu) + E[sigma^2]."""
    s1 = s2 = sv = 0.0
    for s in range(0, len(idx), batch_size):
        x, e = fetch(showers, e_inc, idx[s:s + batch_size], device)
        mu, logvar, _ = encode_batch(vae, vae_stats, e, x, ds)
        s1, s2, sv = s1 + mu.double().sum(0), s2 + (mu.double() ** 2).sum(0), sv + logvar.double().exp().sum(0)
    mean = s1 / len(idx)
    var = (s2 / len(idx) - mean ** 2).clamp(min=0) + sv / len(idx)
    return {"mean": mean.float(), "std": var.sqrt().clamp(min=1e-6).float()}


def batch_loss(model, vae, vae_stats, stats, showers, e_inc, ds, generator, share=slice(None)):
    """CFM loss on a fresh reparameterised (standardised) latent of one batch of physical showers. With `share`
    (DDP) the latent noise, x0 and t are drawn for the whole global batch and only the share is used."""
    mu, logvar, u = encode_batch(vae, vae_stats, e_inc, showers, ds)
    x1 = common.standardize(vae_lib.reparameterize(mu, logvar, generator), stats["latent"])
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
def validation_loss(model, vae, vae_stats, stats, showers, e_inc, idx, args, device):
    model.eval()
    gen = torch.Generator(device).manual_seed(args.seed + 999_983)  # same draws every epoch: comparable
    total = 0.0
    for s in range(0, len(idx), 4 * args.batch_size):
        x, e = fetch(showers, e_inc, idx[s:s + 4 * args.batch_size], device)
        total += batch_loss(model, vae, vae_stats, stats, x, e, args.ds, gen).item() * len(x)
    model.train()
    return total / max(1, len(idx))


# ----------------------------------------------------------------------------- training
def train(args):
    rank, world, device = common.init_distributed(args.device)  # torchrun: DDP, one global batch shared by ranks
    ckpt = None
    if args.resume:
        path = common.find_latest_run(SCRIPT, args.ds, args.out) if args.resume == "latest" else Path(args.resume)
        ckpt = common.load_checkpoint(path, script=SCRIPT)
        args = argparse.Namespace(**{**ckpt["config"], **{k: getattr(args, k) for k in RUNTIME_FLAGS}})
        run_dir = path if path.is_dir() else path.parent
    if ckpt is None:
        vae_path = Path(args.vae) if args.vae else common.find_latest_run("vae", args.ds, args.out)
        vae, vae_ckpt = vae_lib.load_vae(vae_path, args.ds, device)
        frozen = {"path": str(vae_path), "config": vae_ckpt["config"], "stats": vae_ckpt["stats"],
                  "model": vae_ckpt["model"], "epoch": vae_ckpt["epoch"], "cut": vae_ckpt.get("cut")}
    else:
        frozen = ckpt["vae"]
        vae = vae_lib.build_vae({"ds": args.ds, **frozen}, device)
    vae_stats = to_device(frozen["stats"], device)
    common.seed_everything(args.seed)
    files = args.files or common.data_files(args.ds, args.data_dir, toy=args.toy)
    e_inc, showers = common.load_showers(files, args.ds, args.max_showers, progress=not args.no_progress and rank == 0)
    if ckpt is None:
        run_dir = common.make_run_dir(SCRIPT, args.ds, args.out)  # under torchrun: rank 0's, broadcast
    log = common.Log(run_dir)  # silent on ranks > 0
    train_idx, val_idx = common.split_indices(len(showers), args.val_fraction, args.seed)
    if ckpt is None:  # statistics of the training split only
        u = common.energies_to_u(torch.from_numpy(e_inc[train_idx]),  # layer sums first: no copy of the showers
                                 common.layer_energies(torch.from_numpy(showers), args.ds)[train_idx])
        stats = {"cond": common.fit_standardizer(common.u_features(u)),
                 "latent": fit_latent_stats(vae, vae_stats, showers, e_inc, train_idx[:LATENT_STATS_SHOWERS],
                                            args.ds, device)}
        stats = to_device(stats, "cpu")
    else:
        stats = ckpt["stats"]
    stats_dev = to_device(stats, device)

    model = common.ViT(vit_config(args, vae.latent_shape)).to(device)
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    if args.compile and device.type == "cuda":
        net = torch.compile(net)
    elif args.compile:
        print("--compile is ignored on CPU")
    steps_per_epoch = max(1, len(train_idx) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    history, nonfinite, start_epoch, step = {"train_loss": [], "val_loss": []}, 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        history, nonfinite, start_epoch, step = ckpt["history"], ckpt["nonfinite"], ckpt["epoch"], ckpt["step"]
    config = json.loads(json.dumps(vars(args), default=str))  # paths as str, tuples as lists
    vit = json.loads(json.dumps(vars(vit_config(args, vae.latent_shape))))
    log(f"{'resuming' if ckpt else 'run'} {run_dir} at epoch {start_epoch}; config: {json.dumps(config)}")
    log(f"device {device}; frozen VAE {frozen['path']} (epoch {frozen['epoch']}, latent {vae.latent_shape}); "
        f"{len(train_idx)} training / {len(val_idx)} validation showers; "
        f"trainable parameters {common.count_parameters(model):,}; {steps_per_epoch} steps per epoch")

    def save(epoch):
        common.save_checkpoint(run_dir / "ckpt.pt", script=SCRIPT, ds=args.ds, config=config, vit=vit, vae=frozen,
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
            loss = weight * batch_loss(net, vae, vae_stats, stats_dev, x, e, args.ds, gen, share)
            opt.zero_grad(set_to_none=True)
            if common.all_mean(float(torch.isfinite(loss)), device) == 1:  # all ranks skip together
                loss.backward()
                opt.step()
                losses.append(loss.item())
                in_a_row = 0
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            else:  # skip the update, keep the schedule on the step count
                nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
                if in_a_row >= 20:
                    raise SystemExit(f"error: 20 non-finite losses in a row (epoch {epoch + 1}, step {step}); "
                                     f"the last good checkpoint is {run_dir / 'ckpt.pt'}; try a lower --lr")
            sched.step()
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = steps_per_epoch * args.batch_size / (time.time() - t0)
        history["train_loss"].append(common.all_mean(float(np.mean(losses)) if losses else float("nan"), device))
        val = None
        if rank == 0 and len(val_idx) and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs):
            val = validation_loss(net if world == 1 else model, vae, vae_stats, stats_dev, showers, e_inc, val_idx,
                                  args, device)
        history["val_loss"].append(val)
        log(f"epoch {epoch + 1} train_loss {history['train_loss'][-1]:.5f} val_loss "
            f"{'-' if val is None else f'{val:.5f}'} lr {sched.get_last_lr()[0]:.3e} samples/s {rate:.1f} "
            f"nonfinite {nonfinite} time {time.time() - t0:.1f}s")
        if rank == 0 and ((epoch + 1) % args.ckpt_every == 0 or epoch + 1 == last):
            save(epoch + 1)
    log(f"done: {run_dir / 'ckpt.pt'} (epoch {last} of {args.epochs})")
    return run_dir


# ----------------------------------------------------------------------------- sampling
def load_latent(path, ds, device):
    """(laViT, frozen VAE, ckpt): both networks in eval mode on device."""
    ckpt = common.load_checkpoint(path or common.find_latest_run(SCRIPT, ds), script=SCRIPT, ds=ds)
    cfg = common.ViTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["vit"].items()})
    model = common.ViT(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), vae_lib.build_vae({"ds": ds, **ckpt["vae"]}, device), ckpt


@torch.no_grad()
def generate_showers(model, vae, stats, vae_stats, e_inc, u, ds, cut, solver="rk4", steps=20, batch_size=1000,
                     generator=None, solve_fn=None):
    """Showers (N, n_vox) float64 MeV on the CPU for E_inc (N,) MeV and physical u's (N, 45):
    x0 ~ N(0, 1) on the latent grid, dx/dt = v from t = 0 to 1 with common.solve(solver, steps) or
    solve_fn(velocity, x0) -> (x1, nfe) (bespoke.py's hook), unstandardise, decode (deterministic
    decoder), per-layer renormalisation with the normalised cut, scaled by the layer energies of the u's."""
    device = next(model.parameters()).device
    if solve_fn is None:
        def solve_fn(velocity, x0):
            return common.solve(velocity, x0, steps, solver)
    out = []
    for s in range(0, len(e_inc), batch_size):
        e, uu = e_inc[s:s + batch_size].to(device), u[s:s + batch_size].to(device)
        x0 = torch.randn((len(e), *model.cfg.in_shape), generator=generator, device=device)
        x1, _ = solve_fn(velocity_fn(model, common.shape_condition(e, uu, stats["cond"])), x0)
        z = common.unstandardize(x1.float(), stats["latent"])
        frac = vae.decode(z, common.shape_condition(e, uu, vae_stats["cond"]))
        out.append(vae_lib.decoded_to_showers(frac, common.u_to_energies(e, uu), cut).cpu())
    return torch.cat(out)


def sample(args):
    """As shape_vit.sample, with laViT + the VAE decoder (torchrun: every rank its share, one file)."""
    rank, world, device = common.init_distributed(args.device)
    path = Path(args.ckpt) if args.ckpt else common.find_latest_run(SCRIPT, args.ds, args.out)
    model, vae, ckpt = load_latent(path, args.ds, device)
    stats, vae_stats = to_device(ckpt["stats"], device), to_device(ckpt["vae"]["stats"], device)
    cut = args.cut if args.cut is not None else (ckpt["vae"].get("cut") or vae_lib.DEFAULT_CUT)
    run_dir = path if path.is_dir() else path.parent
    setup = sampling_setup(args, run_dir, rank, world)
    e_inc, n, batch_size, output, nfe = setup.e_inc, setup.n, args.batch_size or 1000, setup.output, setup.nfe
    print(f"device {device}; {n} showers; laViT {path} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters, epoch {ckpt['epoch']}); VAE {ckpt['vae']['path']} (epoch {ckpt['vae']['epoch']}); "
          f"{args.solver} {args.steps} steps; normalised cut {cut:.2e}")

    common.seed_everything(setup.seed)
    t0 = time.time()
    u, energy_desc = sampling_u(args, setup, device, rank)
    t_energy = time.time() - t0
    gen = torch.Generator(device).manual_seed(setup.seed)
    t_shape = 0.0
    with setup.writer, tqdm(total=n, desc="sampling", unit="shower", disable=args.no_progress or rank > 0) as bar:
        for s in range(0, n, batch_size):
            t1 = time.time()
            x = generate_showers(model, vae, stats, vae_stats, e_inc[s:s + batch_size], u[s:s + batch_size],
                                 args.ds, cut, args.solver, args.steps, batch_size, generator=gen,
                                 solve_fn=setup.solve_fn)
            t_shape += time.time() - t1  # .cpu() inside synchronises
            setup.writer.write(e_inc[s:s + batch_size], x)
            bar.update(len(x))
    merge_shards(output, setup.n_all, args.ds, args.overwrite)
    total = time.time() - t0
    if rank > 0:
        return output
    info = {"file": str(output), "ds": args.ds, "n": setup.n_all, "ranks": world, "solver": args.solver,
            "steps": args.steps, "nfe": nfe, "batch_size": batch_size, "seed": args.seed, "device": str(device), "cut": cut,
            "bespoke_ckpt": args.bespoke_ckpt, "latent_ckpt": str(path), "latent_epoch": ckpt["epoch"],
            "vae_ckpt": ckpt["vae"]["path"],
            "energy": energy_desc, "like": args.like, "seconds_energy": t_energy, "seconds_shape": t_shape,
            "seconds_total": total, "ms_per_shower_shape": 1e3 * t_shape / n, "showers_per_second": n / total}
    Path(f"{output}.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {output}: {n / total:.1f} showers/s overall ({t_energy:.1f}s energy network, "
          f"{1e3 * t_shape / n:.2f} ms/shower laViT + decoder at {nfe} NFE, {total:.1f}s in all)")
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
