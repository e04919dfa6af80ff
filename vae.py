"""CaloDREAM conditional 3-D convolutional VAE (arXiv:2405.09629, Sec. 3.3 and Table 4; SPEC 2.4).

Compresses the per-layer voxel fractions of a shower, (1, 45, A, R) in [0, 1], into a 2-channel latent
grid on which latent_vit.py learns a flow. Conditioned on [c_E, u's] like the shape networks.

    python vae.py                                   # DS2, data/dataset_2_1.hdf5, 200 epochs (one GPU)
    python vae.py --ds 3                            # DS3, data/dataset_3_{1,2}.hdf5
    python vae.py --resume runs/vae-ds2-<time>      # continue an interrupted run, same final weights
    OMP_NUM_THREADS=1 python vae.py --toy --channels 8 --max-showers 4000 --epochs 2 --batch-size 64  # CPU
    python vae.py --reconstruct --ckpt runs/vae-ds2-<time> --like data/dataset_2_2.hdf5 --output out/vae_recon_ds2.hdf5
    python evaluate.py -i out/vae_recon_ds2.hdf5 -r data/dataset_2_2.hdf5 --ds 2

What to expect: the paper's reconstruction of real DS2 showers reaches a low-level classifier AUC of
0.512 (200 epochs). One H100 trains about 1,850 showers/s (DS2, float32). The CPU toy run takes about
10 minutes on 2 shared cores and only learns the average shower (validation BCE 0.0299 against 0.0300 for
the mean map): it checks the plumbing, not the physics. README.md (VAE and latent ViT) has the numbers.

Layout (both trainable-parameter counts exact at --channels 64: DS2 901,093, DS3 1,103,845):
    cond (46) -> Linear(46, 100), ReLU, Linear(100, 100) = c, shared by all blocks
    every conv except mu/logvar sees 2 extra coordinate channels (linspace(0, 1) along layer and r)
    DownBlock(1 -> 64, k, s, p), DownBlock(64 -> 64, 1, 1, 0), each:
        conv 3^3 pad 1 (bias) + Linear(100, 64)(c), BN, SiLU; conv 3^3 pad 1 (bias), BN, SiLU;
        conv (kernel k, stride s, padding p, bias), no norm, no activation
    bottleneck conv 1^3 (64 -> 2, bias); mu = conv 1^3 (2 -> 2), logvar = conv 1^3 (2 -> 2)
    UpBlock(2 -> 64, 1, 1, 0), UpBlock(64 -> 64, k, s, p), each:
        ConvTranspose (kernel k, stride s, padding p, bias); conv 3^3 pad 1 (no bias)
        + Linear(100, 64)(c), BN, SiLU; conv 3^3 pad 1 (no bias), BN, SiLU
    output conv 1^3 (64 -> 1, bias), sigmoid
The condition bias enters once per block (after its first 3^3 conv); with it on every conv, or with
biases on the up-path 3^3 convs, the counts miss (+256 for the biases in both datasets).
Loss: mean BCE over voxels + beta * KL (mean over latent elements), beta = 1e-5; AdamW (weight decay
1e-4), one-cycle to max LR 1e-3 (20 % warm-up), batch 128, 200 epochs.
Init (not fixed by the paper): output bias logit(1 / (A R)) (the mean fraction of a voxel in a layer)
and logvar bias -6. Adam moves a bias by about the LR per step, so from a zero init the sigmoid would
spend thousands of steps sliding from 0.5 to the typical fraction (measured: 1,260 steps on the toy
showers did not reach the BCE of the mean shower), and the decoder would learn to ignore a z drowned
in unit noise.
Precision: the VAE runs in float32 (TF32 convolutions on CUDA), not under bf16 autocast: bf16 logits
would quantise every small voxel fraction by about 3 %.
Sampling side: the decoder output is renormalised per layer, fractions below --cut are zeroed (the
paper's "normalised cut", a sigmoid never outputs exact zeros; a layer's largest voxel always stays),
renormalised again and scaled by the layer energies. The default cut is calibrated at the end of
training so that the reconstructed validation showers have the data's fraction of empty voxels
(stored as ckpt["cut"]).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

PRESETS = {  # down/up-sampling conv of block 1 and the resulting latent grid (SPEC 2.4)
    2: dict(kernel=(3, 2, 1), stride=(3, 2, 1), padding=(0, 1, 0), latent=(2, 15, 9, 9)),
    3: dict(kernel=(5, 2, 3), stride=(5, 2, 1), padding=(0, 1, 0), latent=(2, 9, 26, 16)),
}
LOGVAR_INIT = -6.0  # initial bias of the logvar conv: a narrow posterior from the first step
DEFAULT_CUT = 1e-4  # normalised cut when a checkpoint carries no calibrated one
RUNTIME_FLAGS = ("device", "no_progress", "compile", "stop_after", "resume")  # taken as given on --resume


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ds", type=int, default=2, choices=[2, 3], help="CaloChallenge dataset")
    p.add_argument("--data-dir", default="data", help="folder of the CaloChallenge files")
    p.add_argument("--toy", action="store_true", help="use the synthetic showers data/toy_ds{N}_*.hdf5")
    p.add_argument("--files", nargs="+", help="training files (override the dataset default)")
    p.add_argument("--max-showers", type=int, help="read at most this many training showers")
    p.add_argument("--out", default="runs", help="root of the run folders")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="maximum of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--beta", type=float, default=1e-5, help="weight of the KL term")
    p.add_argument("--channels", type=int, default=64, help="conv width (64 = paper; smaller for CPU)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-every", type=int, default=1, help="epochs between validation losses")
    p.add_argument("--ckpt-every", type=int, default=1, help="epochs between checkpoints")
    p.add_argument("--stop-after", type=int, help="stop after N epochs (the schedule still spans --epochs)")
    p.add_argument("--resume", nargs="?", const="latest", help="continue RUN_DIR or CKPT (default: newest)")
    p.add_argument("--compile", action="store_true", help="torch.compile (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    # reconstruction
    p.add_argument("--reconstruct", action="store_true", help="encode+decode --like into --output")
    p.add_argument("--ckpt", help="VAE run folder or checkpoint (default: newest vae run of --ds)")
    p.add_argument("--like", help="showers to reconstruct (default: the dataset's reference file)")
    p.add_argument("--n", type=int, help="reconstruct only the first N showers")
    p.add_argument("--output", help="output file (default out/vae_recon_ds{N}.hdf5)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--cut", type=float, help="normalised cut on voxel fractions (default: calibrated)")
    p.add_argument("--stochastic", action="store_true", help="decode z ~ q(z|x) instead of the mean")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model (SPEC 2.4)
def add_coords(x):
    """Append linspace(0, 1) along the layer and the r axis as two channels (breaks the conv's
    translation symmetry along the two axes where the showers are not translation invariant)."""
    b, _, l, a, r = x.shape
    cl = torch.linspace(0, 1, l, device=x.device, dtype=x.dtype).view(1, 1, l, 1, 1)
    cr = torch.linspace(0, 1, r, device=x.device, dtype=x.dtype).view(1, 1, 1, 1, r)
    return torch.cat([x, cl.expand(b, 1, l, a, r), cr.expand(b, 1, l, a, r)], dim=1)


class BatchNorm3d(nn.BatchNorm3d):
    """nn.BatchNorm3d that, under torchrun, normalises with the statistics of the global batch on any device
    (nn.SyncBatchNorm is GPU-only): 1 and N processes then train the same network. Same state dict."""

    def forward(self, x):
        if not (self.training and torch.distributed.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable: gradients cross the ranks
        c, dims = x.shape[1], (0, 2, 3, 4)
        sums = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([x.numel() / c])]))
        n = sums[-1]
        mean = sums[:c] / n
        var = sums[c:2 * c] / n - mean ** 2
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * scale.view(1, c, 1, 1, 1) + (self.bias - mean * scale).view(1, c, 1, 1, 1)


class CoordConv(nn.Module):
    """Conv3d (or ConvTranspose3d) on the input plus its two coordinate channels."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, bias=True, transpose=False):
        super().__init__()
        conv = nn.ConvTranspose3d if transpose else nn.Conv3d
        self.conv = conv(cin + 2, cout, kernel, stride=stride, padding=padding, bias=bias)

    def forward(self, x):
        return self.conv(add_coords(x))


class DownBlock(nn.Module):
    def __init__(self, cin, cout, kernel, stride, padding, cond_dim=100):
        super().__init__()
        self.conv1, self.bn1 = CoordConv(cin, cout, 3, padding=1), BatchNorm3d(cout)
        self.conv2, self.bn2 = CoordConv(cout, cout, 3, padding=1), BatchNorm3d(cout)
        self.cond = nn.Linear(cond_dim, cout)
        self.down = CoordConv(cout, cout, kernel, stride, padding)

    def forward(self, x, c):
        h = F.silu(self.bn1(self.conv1(x) + self.cond(c)[:, :, None, None, None]))
        return self.down(F.silu(self.bn2(self.conv2(h))))


class UpBlock(nn.Module):
    def __init__(self, cin, cout, kernel, stride, padding, cond_dim=100):
        super().__init__()
        self.up = CoordConv(cin, cout, kernel, stride, padding, transpose=True)
        self.conv1, self.bn1 = CoordConv(cout, cout, 3, padding=1, bias=False), BatchNorm3d(cout)
        self.conv2, self.bn2 = CoordConv(cout, cout, 3, padding=1, bias=False), BatchNorm3d(cout)
        self.cond = nn.Linear(cond_dim, cout)

    def forward(self, x, c):
        h = self.conv1(self.up(x)) + self.cond(c)[:, :, None, None, None]
        h = F.silu(self.bn1(h))
        return F.silu(self.bn2(self.conv2(h)))


class VAE(nn.Module):
    """encode(frac, cond) -> (mu, logvar) on the latent grid; decode(z, cond) -> fractions in [0, 1]
    with the input's shape (B, 1, 45, A, R). frac may also be given as (B, 45, A, R)."""

    def __init__(self, ds, channels=64, cond_dim=46, cond_hidden=100):
        super().__init__()
        p, ch = PRESETS[ds], channels
        self.ds, self.latent_shape = ds, p["latent"]
        lat = p["latent"][0]
        self.cond_net = nn.Sequential(nn.Linear(cond_dim, cond_hidden), nn.ReLU(),
                                      nn.Linear(cond_hidden, cond_hidden))
        self.down = nn.ModuleList([DownBlock(1, ch, p["kernel"], p["stride"], p["padding"], cond_hidden),
                                   DownBlock(ch, ch, 1, 1, 0, cond_hidden)])
        self.bottleneck = CoordConv(ch, lat, 1)
        self.to_mu, self.to_logvar = nn.Conv3d(lat, lat, 1), nn.Conv3d(lat, lat, 1)
        self.up = nn.ModuleList([UpBlock(lat, ch, 1, 1, 0, cond_hidden),
                                 UpBlock(ch, ch, p["kernel"], p["stride"], p["padding"], cond_hidden)])
        self.out = CoordConv(ch, 1, 1)
        cells = math.prod(common.geometry(ds).shape[1:])
        nn.init.constant_(self.out.conv.bias, -math.log(cells - 1))  # sigmoid = 1 / cells, a layer's mean
        nn.init.constant_(self.to_logvar.bias, LOGVAR_INIT)

    def encode(self, frac, cond):
        h, c = (frac.unsqueeze(1) if frac.dim() == 4 else frac), self.cond_net(cond)
        for block in self.down:
            h = block(h, c)
        h = self.bottleneck(h)
        return self.to_mu(h), self.to_logvar(h)

    def decode_logits(self, z, cond):
        h, c = z, self.cond_net(cond)
        for block in self.up:
            h = block(h, c)
        return self.out(h)

    def decode(self, z, cond):
        return torch.sigmoid(self.decode_logits(z, cond).float())

    def forward(self, frac, cond, eps):
        """Training pass: decoder logits of z = mu + sigma * eps, and the posterior (mu, logvar)."""
        mu, logvar = self.encode(frac, cond)
        return self.decode_logits(mu + (0.5 * logvar).exp() * eps, cond), mu, logvar


def reparameterize(mu, logvar, generator=None):
    return mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator, device=mu.device)


def vae_loss(model, frac, cond, beta, generator=None, n_batch=None, share=slice(None)):
    """Mean BCE over voxels + beta * KL(q(z|x) || N(0, 1)) averaged over latent elements. Under DDP, frac
    and cond are this rank's `share` of a batch of n_batch whose noise every rank draws whole."""
    latent = getattr(model, "module", model).latent_shape
    eps = torch.randn((n_batch or len(frac), *latent), generator=generator, device=frac.device)[share]
    logits, mu, logvar = model(frac, cond, eps)
    bce = F.binary_cross_entropy_with_logits(logits, frac)
    kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).mean()
    return bce + beta * kl, bce


def decoded_to_showers(frac, layer_e, cut):
    """The normalised cut: renormalise each decoded layer, zero fractions below `cut` (but keep the
    layer's largest voxel, so that no layer loses its energy), renormalise again and scale by the layer
    energies (then the 15.15 keV threshold)."""
    f = frac.double().reshape(frac.shape[0], common.N_LAYERS, -1).clamp(min=0)
    f = f / f.sum(-1, keepdim=True).clamp(min=1e-300)
    f = torch.where((f >= cut) | (f == f.amax(-1, keepdim=True)), f, 0.0)
    return common.fractions_to_showers(f, layer_e, cut=0.0)


def build_vae(ckpt, device="cpu"):
    """The frozen VAE (eval mode) held by a vae checkpoint dict."""
    vae = VAE(ckpt["ds"], channels=ckpt["config"]["channels"])
    vae.load_state_dict(ckpt["model"])
    return vae.to(device).eval().requires_grad_(False)


def load_vae(path, ds, device="cpu"):
    """(vae, ckpt) from a run folder or checkpoint; path None -> the newest vae run of ds."""
    ckpt = common.load_checkpoint(path or common.find_latest_run("vae", ds), script="vae", ds=ds)
    return build_vae(ckpt, device), ckpt


# ----------------------------------------------------------------------------- data
def to_device(x, device):
    x = torch.as_tensor(x)
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def batch_inputs(e_inc, showers, ds, cond_stats, device):
    """Raw batch (MeV) -> fractions (B, 1, 45, A, R), condition (B, 46), layer energies (B, 45)."""
    e_inc, showers = to_device(e_inc, device), to_device(showers, device)
    frac, layer_e = common.voxel_fractions(showers, ds)
    u = common.energies_to_u(e_inc, layer_e)
    return frac.unsqueeze(1), common.shape_condition(e_inc, u, cond_stats), layer_e


def iter_showers(paths, ds, n=None, chunk=1000):
    """Stream (e_inc, showers) float32 chunks of the first n showers of CaloChallenge files (a DS3
    reference never sits in RAM whole)."""
    left = n
    for path in paths:
        if left == 0:
            return
        f, size = common.open_showers(path, ds)
        take = size if left is None else min(size, left)
        with f:
            for s in range(0, take, chunk):
                stop = min(s + chunk, take)
                yield (f["incident_energies"][s:stop].reshape(-1).astype(np.float32),
                       f["showers"][s:stop].reshape(stop - s, -1).astype(np.float32))
        left = None if left is None else left - take


def count_showers(paths, ds, n=None):
    sizes = []
    for path in paths:
        f, size = common.open_showers(path, ds)
        f.close()
        sizes.append(size)
    return sum(sizes) if n is None else min(sum(sizes), n)


@torch.no_grad()
def calibrate_cut(vae, e_inc, showers, ds, cond_stats, device, batch_size=256):
    """The cut in logspace(1e-7, 1e-2) whose reconstructions have the data's share of empty voxels."""
    grid = np.logspace(-7, -2, 51)
    zeros, data_zeros = np.zeros(len(grid)), 0.0
    for s in range(0, len(e_inc), batch_size):
        frac, cond, layer_e = batch_inputs(e_inc[s:s + batch_size], showers[s:s + batch_size], ds,
                                           cond_stats, device)
        data_zeros += (showers[s:s + batch_size] < common.MIN_ENERGY).sum()
        rec = vae.decode(vae.encode(frac, cond)[0], cond)
        for i, cut in enumerate(grid):
            zeros[i] += (decoded_to_showers(rec, layer_e, cut) == 0).sum().item()
    best = int(np.argmin(np.abs(zeros - data_zeros)))
    return float(grid[best]), data_zeros / showers.size, zeros[best] / showers.size


# ----------------------------------------------------------------------------- training
def train(args):
    ckpt = None
    if args.resume:
        path = common.find_latest_run("vae", args.ds, args.out) if args.resume == "latest" else Path(args.resume)
        ckpt = common.load_checkpoint(path, script="vae")
        args = argparse.Namespace(**{**ckpt["config"], **{k: getattr(args, k) for k in RUNTIME_FLAGS}})
        run_dir = path if path.is_dir() else path.parent
    rank, world, device = common.init_distributed(args.device)  # torchrun: DDP, one global batch shared by ranks
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest 3-D convolutions
    files = args.files or [str(p) for p in common.data_files(args.ds, args.data_dir, args.toy, "train")]
    e_inc, showers = common.load_showers(files, args.ds, args.max_showers, progress=not args.no_progress and rank == 0)
    train_idx, val_idx = common.split_indices(len(e_inc), args.val_fraction, args.seed)
    if len(train_idx) < args.batch_size:
        raise ValueError(f"{len(train_idx)} training showers are fewer than one batch ({args.batch_size})")
    u = common.energies_to_u(torch.from_numpy(e_inc), common.layer_energies(torch.from_numpy(showers), args.ds))
    stats = {"cond": common.fit_standardizer(common.u_features(u[train_idx]))}

    common.seed_everything(args.seed)
    vae = VAE(args.ds, channels=args.channels).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_idx) // args.batch_size  # drop the last partial batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.2)
    history, start, step, nonfinite = {"train_loss": [], "val_loss": []}, 0, 0, 0
    if ckpt is not None:
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        history, start, step, nonfinite = ckpt["history"], ckpt["epoch"], ckpt["step"], ckpt["nonfinite"]
        stats = ckpt["stats"]
    else:
        run_dir = common.make_run_dir("vae", args.ds, args.out)  # under torchrun: rank 0's, broadcast
    log = common.Log(run_dir)  # silent on ranks > 0
    net = vae if world == 1 else torch.nn.parallel.DistributedDataParallel(  # statistics synced by BatchNorm3d
        vae, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if args.compile:
        if device.type == "cuda":
            net = torch.compile(net)
        else:
            print("--compile is ignored on CPU")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["files"] = [str(f) for f in files]
    log(f"vae ds{args.ds} | run {run_dir} | device {device} | trainable parameters "
        f"{common.count_parameters(vae):,} | {len(train_idx)} train / {len(val_idx)} val showers")
    log("config " + " ".join(f"{k}={v}" for k, v in config.items()))
    cut_info = ckpt.get("cut_info") if ckpt else None

    def save(epoch, cut=None):
        common.save_checkpoint(run_dir / "ckpt.pt", script="vae", ds=args.ds, config=config,
                               model=vae.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                               epoch=epoch, step=step, stats=stats, history=history, nonfinite=nonfinite,
                               cut=cut, cut_info=cut_info)

    def val_loss():
        vae.eval()
        gen, total = torch.Generator(device).manual_seed(args.seed), 0.0
        with torch.no_grad():
            for s in range(0, len(val_idx), args.batch_size):
                idx = val_idx[s:s + args.batch_size]
                frac, cond, _ = batch_inputs(e_inc[idx], showers[idx], args.ds, stats["cond"], device)
                total += vae_loss(vae, frac, cond, args.beta, gen)[0].item() * len(idx)
        vae.train()
        return total / max(len(val_idx), 1)

    stop = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    epoch, in_a_row = start, 0
    for epoch in range(start + 1, stop + 1):
        vae.train()
        perm_gen = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        noise_gen = torch.Generator(device).manual_seed(args.seed * 100003 + epoch)
        perm = train_idx[torch.randperm(len(train_idx), generator=perm_gen).numpy()]
        t0, losses = time.time(), []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", disable=args.no_progress or rank > 0,
                   leave=False)
        for b in bar:
            idx = np.sort(perm[b * args.batch_size:(b + 1) * args.batch_size])
            share, weight = common.rank_share(len(idx), rank, world)  # (all of it, 1) in a plain run
            frac, cond, _ = batch_inputs(e_inc[idx[share]], showers[idx[share]], args.ds, stats["cond"], device)
            loss = weight * vae_loss(net, frac, cond, args.beta, noise_gen, len(idx), share)[0]
            if common.all_mean(float(torch.isfinite(loss)), device) < 1:  # all ranks skip together
                nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
                sched.step()
                if in_a_row >= 20:
                    log(f"stopping: 20 non-finite losses in a row (epoch {epoch}); last good checkpoint kept")
                    return run_dir
                continue
            in_a_row = 0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.5f}")
        history["train_loss"].append(common.all_mean(float(np.mean(losses)) if losses else float("nan"), device))
        vl = val_loss() if rank == 0 and (epoch % args.val_every == 0 or epoch == stop) and len(val_idx) else None
        history["val_loss"].append(vl)
        log(f"epoch {epoch} | train loss {history['train_loss'][-1]:.6f} | val loss "
            f"{'-' if vl is None else f'{vl:.6f}'} | lr {sched.get_last_lr()[0]:.2e} | "
            f"{steps_per_epoch * args.batch_size / (time.time() - t0):.0f} samples/s")
        if rank == 0 and epoch % args.ckpt_every == 0 and epoch != stop:
            save(epoch)
    if rank > 0:
        return run_dir
    # the normalised cut that restores the data's sparsity, on (at most 2000) validation showers
    vae.eval()
    cal = val_idx[:2000] if len(val_idx) else train_idx[:2000]
    cut, data_sparsity, rec_sparsity = calibrate_cut(vae, e_inc[cal], showers[cal], args.ds, stats["cond"], device)
    cut_info = {"data_sparsity": float(data_sparsity), "recon_sparsity": float(rec_sparsity), "n": len(cal)}
    log(f"normalised cut {cut:.2e}: empty voxels {rec_sparsity:.4f} reconstructed vs {data_sparsity:.4f} data")
    save(epoch, cut)
    log(f"checkpoint {run_dir / 'ckpt.pt'} (epoch {epoch})")
    return run_dir


# ----------------------------------------------------------------------------- reconstruction
@torch.no_grad()
def reconstruct(args):
    device = common.pick_device(args.device)
    vae, ckpt = load_vae(args.ckpt, args.ds, device)
    like = [args.like] if args.like else [str(p) for p in common.data_files(args.ds, args.data_dir, args.toy, "ref")]
    n = count_showers(like, args.ds, args.n)
    cut = args.cut if args.cut is not None else (ckpt.get("cut") or DEFAULT_CUT)
    output = Path(args.output or f"out/vae_recon_ds{args.ds}.hdf5")
    gen = torch.Generator(device).manual_seed(args.seed)
    print(f"reconstructing {n} showers of {' '.join(like)} with the VAE of {ckpt['epoch']} epochs "
          f"({sum(p.numel() for p in vae.parameters()):,} parameters), normalised cut {cut:.2e}, on {device}")
    t0 = time.time()
    with common.ShowerWriter(output, n, args.ds, overwrite=args.overwrite) as w:
        for e, x in tqdm(iter_showers(like, args.ds, n, args.batch_size), total=-(-n // args.batch_size),
                         disable=args.no_progress, desc="reconstructing"):
            frac, cond, layer_e = batch_inputs(e, x, args.ds, ckpt["stats"]["cond"], device)
            mu, logvar = vae.encode(frac, cond)
            rec = vae.decode(reparameterize(mu, logvar, gen) if args.stochastic else mu, cond)
            w.write(e, decoded_to_showers(rec, layer_e, cut))
    print(f"wrote {output} ({n} showers, {time.time() - t0:.1f} s)")
    return output


def main(argv=None):
    args = parse_args(argv)
    run_dir = reconstruct(args) if args.reconstruct else train(args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
