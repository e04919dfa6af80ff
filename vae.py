"""CaloDREAM conditional 3-D convolutional VAE (arXiv:2405.09629, Sec. 3.3 and Table 4; SPEC 2.4): compresses the
per-layer voxel fractions of a shower, (1, 45, A, R) in [0, 1], into a 2-channel latent grid on which
latent_vit.py learns a flow. Conditioned on [c_E, u's] like the shape networks.

    python vae.py --ds 2                            # one GPU: data/dataset_2_1.hdf5, 200 epochs, batch 128
    torchrun --nproc_per_node=4 vae.py --ds 2       # several GPUs (SyncBatchNorm; each rank 128 / 4 per batch)
    python vae.py --resume                          # continue the newest run exactly where it stopped
    python vae.py --encode                          # the training showers -> <run>/latents.hdf5 (for latent_vit.py)
    python vae.py --decode runs/latent_vit-ds2-<time>/latents_ds2_100000.hdf5    # -> .../gen_ds2_100000.hdf5
    python vae.py --reconstruct --like data/dataset_2_2.hdf5    # encode + decode: the VAE's own quality
    OMP_NUM_THREADS=1 python vae.py --toy --channels 16 --epochs 6    # CPU quick run on the synthetic showers

Paper (real DS2): the reconstruction reaches a low-level classifier AUC of 0.512 (200 epochs). Toy numbers:
docs/RESULTS.md.

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
The condition bias enters once per block (after its first 3^3 conv); with it on every conv, or with biases on
the up-path 3^3 convs, the counts miss (+256 for the biases in both datasets).
Loss: mean BCE over voxels + beta * KL (mean over latent elements), beta = 1e-5; AdamW (weight decay 1e-4),
one-cycle to max LR 1e-3 (20 % warm-up), batch 128, 200 epochs.
Init (not fixed by the paper): output bias logit(1 / (A R)) (the mean fraction of a voxel in a layer) and logvar
bias -6: from a zero init the sigmoid spends thousands of steps sliding from 0.5 to the typical fraction, and the
decoder learns to ignore a z drowned in unit noise (a decoder started at the mean shower: docs/RESULTS.md).
Precision: float32 (TF32 convolutions on CUDA), not bf16 autocast: bf16 logits would quantise every small voxel
fraction by about 3 %.
Decoding: the output is renormalised per layer, fractions below the cut are zeroed (the paper's "normalised cut";
a sigmoid never outputs exact zeros; a layer's largest voxel always stays), renormalised again and scaled by the
layer energies of the u's. The cut of layer l is c_l (E_l / 1 GeV)^-g: c_l is calibrated at the end of training
so that the reconstructed validation showers have the data's fraction of empty voxels in every layer (ckpt["cut"],
45 values; a scalar in older runs), g = 0.25 (ckpt["cut_exponent"]; 0 in older runs). One global cut cannot do it:
the data's empty share falls from ~0.96 in the first layers to ~0.6 at the maximum. A cut on fractions alone (g = 0)
leaves a layer's empty share blind to its energy, while the data's falls with it (the readout threshold is in MeV;
correlation with log E_inc -0.9 at the shower maximum on the toy); an energy threshold (g = 1) follows the
decoder's imprecise small fractions. g = 0.25 had the lowest sparsity + voxel-spectrum separation on the toy's
validation split (`python vae.py --calibrate --cut-exponent G` re-fits a trained VAE's cut; docs/RESULTS.md).
"""
import argparse
import json
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

SCRIPT = "vae"
PRESETS = {  # down/up-sampling conv of block 1 and the resulting latent grid (SPEC 2.4)
    2: dict(kernel=(3, 2, 1), stride=(3, 2, 1), padding=(0, 1, 0), latent=(2, 15, 9, 9)),
    3: dict(kernel=(5, 2, 3), stride=(5, 2, 1), padding=(0, 1, 0), latent=(2, 9, 26, 16)),
}
LOGVAR_INIT = -6.0  # initial bias of the logvar conv: a narrow posterior from the first step
DEFAULT_CUT = 1e-4  # normalised cut when a checkpoint carries no calibrated one
CUT_EXPONENT = 0.25  # g of the cut c_l (E_l / 1 GeV)^-g


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=int, default=2, choices=(2, 3), help="CaloChallenge dataset")
    p.add_argument("--data-dir", default="data", help="folder of the CaloChallenge files")
    p.add_argument("--toy", action="store_true", help="use the synthetic showers data/toy_ds{N}_*.hdf5")
    p.add_argument("--files", nargs="+", help="training files (override the dataset default)")
    p.add_argument("--max-showers", type=int, help="read at most this many training showers")
    p.add_argument("--out", default="runs", help="root of the run folders")
    p.add_argument("--device", help="cpu | cuda (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="maximum of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--beta", type=float, default=1e-5, help="weight of the KL term")
    p.add_argument("--channels", type=int, default=64, help="conv width (64 = paper; smaller for CPU)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="held-out share of the training file "
                   "(at least 300 showers or a tenth)")
    p.add_argument("--val-every", type=int, default=1, help="epochs between validation losses")
    p.add_argument("--ckpt-every", type=int, default=1, help="epochs between checkpoints")
    p.add_argument("--stop-after", type=int, help="stop after N epochs (the schedule still spans --epochs)")
    p.add_argument("--resume", nargs="?", const="latest", help="continue RUN_DIR or CKPT (bare: the newest run)")
    p.add_argument("--compile", action="store_true", help="torch.compile (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    s = p.add_argument_group("encode / decode")
    s.add_argument("--encode", action="store_true", help="--like (default: the training files) -> latent file")
    s.add_argument("--decode", metavar="LATENTS", help="latent file (z, or mu) -> CaloChallenge file")
    s.add_argument("--reconstruct", action="store_true", help="encode + decode --like into a CaloChallenge file")
    s.add_argument("--ckpt", help="VAE run folder or checkpoint (default: newest vae run, or the latents' VAE)")
    s.add_argument("--like", help="CaloChallenge file to encode or reconstruct")
    s.add_argument("--n", type=int, help="only the first N showers")
    s.add_argument("--output", help="output file (default: next to the checkpoint or the latent file)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--cut", type=float, help="one normalised cut on voxel fractions (default: the calibrated per-layer ones)")
    s.add_argument("--cut-exponent", type=float, help=f"g of the cut c_l (E_l / 1 GeV)^-g (training and --calibrate: "
                   f"default {CUT_EXPONENT}; decoding: the checkpoint's)")
    s.add_argument("--calibrate", action="store_true", help="re-fit the cut of the VAE --ckpt on its validation "
                   "showers (e.g. with another --cut-exponent) and rewrite its checkpoint")
    return common.check_args(p.parse_args(argv))


# ----------------------------------------------------------------------------- model (SPEC 2.4)
def add_coords(x):
    """Append linspace(0, 1) along the layer and the r axis as two channels (breaks the conv's
    translation symmetry along the two axes where the showers are not translation invariant)."""
    b, _, l, a, r = x.shape
    cl = torch.linspace(0, 1, l, device=x.device, dtype=x.dtype).view(1, 1, l, 1, 1)
    cr = torch.linspace(0, 1, r, device=x.device, dtype=x.dtype).view(1, 1, 1, 1, r)
    return torch.cat([x, cl.expand(b, 1, l, a, r), cr.expand(b, 1, l, a, r)], dim=1)


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
        self.conv1, self.bn1 = CoordConv(cin, cout, 3, padding=1), nn.BatchNorm3d(cout)
        self.conv2, self.bn2 = CoordConv(cout, cout, 3, padding=1), nn.BatchNorm3d(cout)
        self.cond = nn.Linear(cond_dim, cout)
        self.down = CoordConv(cout, cout, kernel, stride, padding)

    def forward(self, x, c):
        h = F.silu(self.bn1(self.conv1(x) + self.cond(c)[:, :, None, None, None]))
        return self.down(F.silu(self.bn2(self.conv2(h))))


class UpBlock(nn.Module):
    def __init__(self, cin, cout, kernel, stride, padding, cond_dim=100):
        super().__init__()
        self.up = CoordConv(cin, cout, kernel, stride, padding, transpose=True)
        self.conv1, self.bn1 = CoordConv(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout)
        self.conv2, self.bn2 = CoordConv(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout)
        self.cond = nn.Linear(cond_dim, cout)

    def forward(self, x, c):
        h = F.silu(self.bn1(self.conv1(self.up(x)) + self.cond(c)[:, :, None, None, None]))
        return F.silu(self.bn2(self.conv2(h)))


class VAE(nn.Module):
    """encode(frac, cond) -> (mu, logvar) on the latent grid; decode(z, cond) -> fractions in [0, 1] of shape
    (B, 1, 45, A, R). frac may also be given as (B, 45, A, R). `cells` = A * R sets the output bias."""

    def __init__(self, kernel, stride, padding, latent, cells, channels=64, cond_dim=46, cond_hidden=100):
        super().__init__()
        self.latent_shape, ch, lat = tuple(latent), channels, latent[0]
        self.cond_net = nn.Sequential(nn.Linear(cond_dim, cond_hidden), nn.ReLU(), nn.Linear(cond_hidden, cond_hidden))
        self.down = nn.ModuleList([DownBlock(1, ch, kernel, stride, padding, cond_hidden),
                                   DownBlock(ch, ch, 1, 1, 0, cond_hidden)])
        self.bottleneck = CoordConv(ch, lat, 1)
        self.to_mu, self.to_logvar = nn.Conv3d(lat, lat, 1), nn.Conv3d(lat, lat, 1)
        self.up = nn.ModuleList([UpBlock(lat, ch, 1, 1, 0, cond_hidden),
                                 UpBlock(ch, ch, kernel, stride, padding, cond_hidden)])
        self.out = CoordConv(ch, 1, 1)
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


def model_args_for(ds, channels):
    g = common.geometry(ds)
    return dict(PRESETS[ds], cells=g.n_alpha * g.n_r, channels=channels)


def vae_loss(model, frac, cond, beta, generator=None):
    """Mean BCE over voxels + beta * KL(q(z|x) || N(0, 1)) averaged over latent elements; returns (loss, BCE)."""
    latent = getattr(model, "module", model).latent_shape
    eps = torch.randn((len(frac), *latent), generator=generator, device=frac.device)
    logits, mu, logvar = model(frac, cond, eps)
    bce = F.binary_cross_entropy_with_logits(logits, frac)
    return bce + beta * (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).mean()), bce


def decoded_to_showers(frac, layer_e, cut, exponent=0.0):
    """The normalised cut: renormalise each decoded layer, zero fractions below cut * (E_l / 1 GeV)^-exponent (cut: a
    number, or one per layer) but keep the layer's largest voxel, so that no layer loses its energy; renormalise,
    scale by the layer energies (B, 45) in MeV."""
    f = frac.double().reshape(frac.shape[0], common.N_LAYERS, -1).clamp(min=0)
    f = f / f.sum(-1, keepdim=True).clamp(min=1e-300)
    cut = torch.as_tensor(cut, dtype=f.dtype, device=f.device).reshape(1, -1, 1)  # (1, 1, 1) or (1, 45, 1)
    if exponent:
        cut = cut * (layer_e.to(f).clamp(min=1e-3) / 1e3).pow(-exponent)[..., None]
    f = torch.where((f >= cut) | (f == f.amax(-1, keepdim=True)), f, 0.0)
    return common.fractions_to_showers(f, layer_e, cut=0.0)


def load_vae(path, ds, device):
    """(frozen VAE in eval mode, checkpoint); path None -> the newest vae run of ds."""
    ckpt = common.load_checkpoint(path or common.find_latest_run(SCRIPT, ds), script=SCRIPT, ds=ds)
    vae = VAE(**ckpt["model_args"])
    vae.load_state_dict(ckpt["model"])
    return vae.to(device).eval().requires_grad_(False), ckpt


# ----------------------------------------------------------------------------- data
def batch_inputs(e_inc, showers, ds, cond_stats, device):
    """Raw batch (MeV) -> fractions (B, 1, 45, A, R), condition (B, 46), layer energies (B, 45), u's (B, 45)."""
    e_inc, showers = common.to_device(torch.as_tensor(e_inc), device), common.to_device(torch.as_tensor(showers), device)
    frac, layer_e = common.voxel_fractions(showers, ds)
    u = common.energies_to_u(e_inc, common.layer_energies(showers, ds))  # in the input's precision
    return frac.unsqueeze(1), common.shape_condition(e_inc, u, cond_stats), layer_e, u


CUT_GRID = np.logspace(-7, 0, 71)  # candidate normalised cuts, a tenth of a decade apart


def _layer_zeros(x):
    """Empty voxels per layer, (45,), of showers (N, n_vox) in MeV."""
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    return (x.reshape(len(x), common.N_LAYERS, -1) < common.MIN_ENERGY).sum((0, 2)).double().cpu().numpy()


def _zero_counts(rec, layer_e, exponent, grid=CUT_GRID):
    """(len(grid), 45): empty voxels per layer of the showers decoded with every cut of the grid."""
    return np.stack([_layer_zeros(decoded_to_showers(rec, layer_e, cut, exponent)) for cut in grid])


def _best_cut(zeros, data_zeros, size, n, grid=CUT_GRID):
    """Per layer the grid cut whose empty count is nearest the data's; returns (45 cuts, info)."""
    best = np.abs(zeros - data_zeros).argmin(0)
    rec_zeros = zeros[best, np.arange(zeros.shape[1])].sum()
    return [float(c) for c in grid[best]], {"data_sparsity": float(data_zeros.sum() / size),
                                            "recon_sparsity": float(rec_zeros / size), "n": n}


def calibrate_decoded(rec, layer_e, showers, exponent=CUT_EXPONENT):
    """The per-layer cuts in CUT_GRID whose showers decoded from `rec` (fractions) and `layer_e` have the empty
    voxels of every layer of `showers` (raw MeV, same rows); returns (cuts, info). Also for a decoder that ignores
    its latent (the mean shower)."""
    return _best_cut(_zero_counts(rec, layer_e, exponent), _layer_zeros(showers), np.asarray(showers).size, len(rec))


@torch.no_grad()
def calibrate_cut(vae, e_inc, showers, ds, cond_stats, device, exponent=CUT_EXPONENT, batch_size=256):
    """The per-layer cuts in CUT_GRID (1e-7 ... 1) whose reconstructions have the data's empty voxels per layer."""
    zeros, data_zeros = 0.0, 0.0
    for s in range(0, len(e_inc), batch_size):
        frac, cond, layer_e, _ = batch_inputs(e_inc[s:s + batch_size], showers[s:s + batch_size], ds, cond_stats, device)
        data_zeros = data_zeros + _layer_zeros(showers[s:s + batch_size])
        zeros = zeros + _zero_counts(vae.decode(vae.encode(frac, cond)[0], cond), layer_e, exponent)
    return _best_cut(zeros, data_zeros, showers.size, len(e_inc))


def fit_cut(vae, e_inc, showers, train_idx, val_idx, ds, stats, device, exponent, log=print):
    """The normalised cut of a trained VAE, calibrated on (at most 2,000 of) its validation showers."""
    cal = val_idx[:2000] if len(val_idx) else train_idx[:2000]
    cut, info = calibrate_cut(vae.eval(), e_inc[cal], showers[cal], ds, stats["cond"], device, exponent)
    log(f"normalised cut {describe_cut(cut, exponent)}: empty voxels {info['recon_sparsity']:.4f} "
        f"reconstructed vs {info['data_sparsity']:.4f} data")
    return cut, {**info, "exponent": exponent}


def cut_of(ckpt, cut=None, exponent=None):
    """(cut, exponent) a decoder applies: the given ones, else the checkpoint's; a checkpoint from before the
    energy-dependent cut has exponent 0, one without a calibrated cut DEFAULT_CUT."""
    ckpt = ckpt or {}
    return ((ckpt.get("cut") or DEFAULT_CUT) if cut is None else cut,
            ckpt.get("cut_exponent", 0.0) if exponent is None else exponent)


def describe_cut(cut, exponent=0.0):
    c = np.atleast_1d(np.asarray(cut, dtype=float))
    text = f"{c[0]:.2e}" if len(c) == 1 else f"{c.min():.1e} ... {c.max():.1e} (per layer)"
    return text + (f" x (E_l / 1 GeV)^-{exponent:g}" if exponent else "")


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def validation_loss(vae, e_inc, showers, idx, stats, args, device):
    vae.eval()
    gen, total = torch.Generator(device).manual_seed(args.seed + 999_983), 0.0
    for s in range(0, len(idx), args.batch_size):
        frac, cond, _, _ = batch_inputs(e_inc[idx[s:s + args.batch_size]], showers[idx[s:s + args.batch_size]],
                                        args.ds, stats["cond"], device)
        total += vae_loss(vae, frac, cond, args.beta, gen)[0].item() * len(frac)
    vae.train()
    return total / max(len(idx), 1)


def train(args):
    """Train (or resume) a run; returns its folder. Under torchrun every rank trains on its share of each batch."""
    rank, world, device = common.init_distributed(args.device)
    args, ckpt, run_dir = common.resume(args, SCRIPT)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest 3-D convolutions
    files = args.files or [str(p) for p in common.data_files(args.ds, args.data_dir, args.toy, "train")]
    e_inc, showers = common.load_showers(files, args.ds, args.max_showers, progress=not args.no_progress and rank == 0)
    train_idx, val_idx = common.split_indices(len(e_inc), args.val_fraction, args.seed)
    if len(train_idx) < args.batch_size or args.batch_size % world:
        raise ValueError(f"{len(train_idx)} training showers and {world} ranks need a --batch-size of at most "
                         f"{len(train_idx)} that {world} divides (got {args.batch_size})")
    u = common.energies_to_u(torch.from_numpy(e_inc[train_idx]),
                             common.layer_energies(torch.from_numpy(showers), args.ds)[train_idx])
    stats = ckpt["stats"] if ckpt else {"cond": common.fit_standardizer(common.u_features(u))}
    run_dir = run_dir or common.make_run_dir(SCRIPT, args.ds, args.out)
    log = common.Log(run_dir)  # silent on ranks > 0

    common.seed_everything(args.seed)
    model_args = ckpt["model_args"] if ckpt else model_args_for(args.ds, args.channels)
    vae = VAE(**model_args).to(device)
    if world > 1 and device.type == "cuda":
        vae = nn.SyncBatchNorm.convert_sync_batchnorm(vae)  # batch statistics of the global batch
    steps_per_epoch = len(train_idx) // args.batch_size
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.2)
    history, start, step, nonfinite = common.restore(ckpt, vae, opt, sched) if ckpt else \
        ({"train_loss": [], "val_loss": []}, 0, 0, 0)
    net, counts = common.wrap_model(vae, device, world, args.compile), {"nonfinite": nonfinite}
    config, cut, cut_info = common.json_config(args), (ckpt or {}).get("cut"), (ckpt or {}).get("cut_info")
    exponent, cut_exponent = CUT_EXPONENT if args.cut_exponent is None else args.cut_exponent, cut_of(ckpt)[1]
    log(f"{'resuming' if ckpt else 'run'} {run_dir} at epoch {start}; config {json.dumps(config)}")
    log(f"device {device} x {world}; {len(train_idx)} train / {len(val_idx)} val showers; "
        f"{common.count_parameters(vae):,} trainable parameters; {steps_per_epoch} steps per epoch")

    last = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start, last):
        order, gen = common.epoch_generators(args.seed, epoch, rank, device)
        perm = train_idx[torch.randperm(len(train_idx), generator=order).numpy()]
        vae.train()
        losses, tic = [], time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress or rank > 0, leave=False)
        for i in bar:
            rows = common.batch_rows(perm, i, args.batch_size, rank, world)
            frac, cond, _, _ = batch_inputs(e_inc[rows], showers[rows], args.ds, stats["cond"], device)
            loss = vae_loss(net, frac, cond, args.beta, gen)[0]
            if common.optimizer_step(vae, loss, opt, counts, run_dir, args.clip_grad):
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.5f}")
            sched.step()
            step += 1
        history["train_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        msg = ""
        if rank == 0 and len(val_idx) and ((epoch + 1) % args.val_every == 0 or epoch + 1 == last):
            history["val_loss"].append([epoch + 1, validation_loss(vae, e_inc, showers, val_idx, stats, args, device)])
            msg = f" val {history['val_loss'][-1][1]:.6f}"
        log(f"epoch {epoch + 1}/{args.epochs} train {history['train_loss'][-1]:.6f}{msg} lr "
            f"{sched.get_last_lr()[0]:.2e} {steps_per_epoch * args.batch_size / (time.time() - tic):.0f} samples/s "
            f"skipped {counts['nonfinite']}")
        if rank == 0 and epoch + 1 == last:  # the normalised cut that restores the data's sparsity
            cut, cut_info = fit_cut(vae, e_inc, showers, train_idx, val_idx, args.ds, stats, device, exponent, log)
            cut_exponent = exponent
        if rank == 0 and ((epoch + 1) % args.ckpt_every == 0 or epoch + 1 == last):
            common.save_checkpoint(run_dir / "ckpt.pt", script=SCRIPT, ds=args.ds, config=config,
                                   model_args=model_args, model=vae.state_dict(), optimizer=opt.state_dict(),
                                   scheduler=sched.state_dict(), epoch=epoch + 1, step=step, stats=stats,
                                   history=history, nonfinite=counts["nonfinite"], cut=cut, cut_info=cut_info,
                                   cut_exponent=cut_exponent)
    common.finish_run(log, run_dir, history, last, args.epochs)
    return run_dir


# ----------------------------------------------------------------------------- encode / decode
def _vae_and_io(args, default_ckpt=None):
    device = common.pick_device(args.device)
    path = Path(args.ckpt or default_ckpt or common.find_latest_run(SCRIPT, args.ds, args.out))
    vae, ckpt = load_vae(path, args.ds, device)
    return device, path, vae, ckpt, (path if path.is_dir() else path.parent)


def training_files(ckpt):
    cfg = ckpt["config"]
    return cfg["files"] or [str(p) for p in common.data_files(ckpt["ds"], cfg["data_dir"], cfg["toy"], "train")]


@torch.no_grad()
def encode(args):
    """Showers (--like, default the training files) -> latent file of mu, logvar, E_inc and u's (latent_vit.py)."""
    device, path, vae, ckpt, run_dir = _vae_and_io(args)
    files = [args.like] if args.like else training_files(ckpt)
    n = common.count_showers(files, args.ds, args.n)
    output = Path(args.output or run_dir / ("latents.hdf5" if not args.like else f"latents_{Path(args.like).stem}.hdf5"))
    lat = vae.latent_shape
    columns = {"incident_energies": (1,), "u": (common.N_LAYERS,), "mu": lat, "logvar": lat}
    attrs = dict(format="calodream-latents", ds=args.ds, vae_ckpt=str(path), vae_step=ckpt["step"], source=" ".join(files))
    t0 = time.time()
    with common.H5Writer(output, n, columns, attrs, args.overwrite, {"mu": "float32", "logvar": "float32"}) as w:
        for e, x in common.iter_showers(files, args.ds, n, 1000, not args.no_progress):
            frac, cond, _, u = batch_inputs(e, x, args.ds, ckpt["stats"]["cond"], device)
            mu, logvar = vae.encode(frac, cond)
            w.write(e, u, mu, logvar)
    print(f"wrote {output}: latents of {n} showers, {lat} each ({time.time() - t0:.1f} s)")
    return output


@torch.no_grad()
def decode(args):
    """Latent file (z from latent_vit.py --sample, else mu) -> CaloChallenge file, with the normalised cut."""
    data, attrs = common.read_latents(args.decode, args.ds, args.n)
    latent_key = "z" if "z" in data else "mu"
    device, path, vae, ckpt, _ = _vae_and_io(args, attrs.get("vae_ckpt"))
    if attrs.get("vae_step") is not None and attrs["vae_step"] != ckpt["step"]:
        raise common.DataError(f"{args.decode} was made with the VAE {attrs.get('vae_ckpt')} at step "
                               f"{attrs['vae_step']}, but {path} is at step {ckpt['step']}")
    if data[latent_key].shape[1:] != vae.latent_shape:
        raise common.DataError(f"{args.decode} holds latents of shape {data[latent_key].shape[1:]}, but the VAE "
                               f"{path} decodes {vae.latent_shape}")
    cut, exponent = cut_of(ckpt, args.cut, args.cut_exponent)
    latents = Path(args.decode)
    output = Path(args.output or latents.with_name(latents.name.replace("latents", "gen") if "latents" in latents.name
                                                   else f"gen_{latents.name}"))
    e_all, u_all, n, t0 = torch.from_numpy(data["incident_energies"]), torch.from_numpy(data["u"]), len(data["u"]), time.time()
    with common.ShowerWriter(output, n, args.ds, args.overwrite) as w:
        for s in tqdm(range(0, n, 1000), desc="decoding", disable=args.no_progress):
            e, u = e_all[s:s + 1000].to(device), u_all[s:s + 1000].to(device)
            cond = common.shape_condition(e, u, common.to_device(ckpt["stats"]["cond"], device))
            frac = vae.decode(torch.from_numpy(data[latent_key][s:s + 1000]).to(device), cond)
            w.write(e, decoded_to_showers(frac, common.u_to_energies(e, u), cut, exponent))
    seconds = time.time() - t0
    info = {k: v for k, v in attrs.items() if isinstance(v, (str, int, float))}
    info.update(file=str(output), n=n, latents=str(latents), vae_ckpt=str(path), cut=cut, cut_exponent=exponent,
                seconds_decode=seconds,
                ms_per_shower_decode=1e3 * seconds / n)
    common.atomic_write(f"{output}.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1) + "\n"))
    print(f"wrote {output}: {n} showers decoded with {path} (cut {describe_cut(cut, exponent)}), {1e3 * seconds / n:.2f} ms per shower")
    return output


@torch.no_grad()
def reconstruct(args):
    """Encode and decode --like (default: the dataset's reference file) with the posterior mean."""
    device, path, vae, ckpt, run_dir = _vae_and_io(args)
    like = [args.like] if args.like else [str(p) for p in common.data_files(args.ds, args.data_dir, args.toy, "ref")]
    n = common.count_showers(like, args.ds, args.n)
    cut, exponent = cut_of(ckpt, args.cut, args.cut_exponent)
    output = Path(args.output or run_dir / f"recon_{Path(like[0]).stem}.hdf5")
    print(f"reconstructing {n} showers of {' '.join(like)} with {path} (epoch {ckpt['epoch']}), cut {describe_cut(cut, exponent)}")
    with common.ShowerWriter(output, n, args.ds, args.overwrite) as w:
        for e, x in common.iter_showers(like, args.ds, n, 1000, not args.no_progress):
            frac, cond, layer_e, _ = batch_inputs(e, x, args.ds, ckpt["stats"]["cond"], device)
            w.write(e, decoded_to_showers(vae.decode(vae.encode(frac, cond)[0], cond), layer_e, cut, exponent))
    print(f"wrote {output}")
    return output


def calibrate(args):
    """Re-fit the normalised cut of a trained VAE on its validation showers, as training does at its end."""
    device, path, vae, ckpt, run_dir = _vae_and_io(args)
    common.lock_folder(run_dir, "training or calibration")  # no trainer writes this checkpoint meanwhile
    cfg, exponent = ckpt["config"], CUT_EXPONENT if args.cut_exponent is None else args.cut_exponent
    e_inc, showers = common.load_showers(training_files(ckpt), ckpt["ds"], cfg["max_showers"],
                                         progress=not args.no_progress)
    train_idx, val_idx = common.split_indices(len(e_inc), cfg["val_fraction"], cfg["seed"])
    cut, info = fit_cut(vae, e_inc, showers, train_idx, val_idx, ckpt["ds"], ckpt["stats"], device, exponent)
    target = path if path.is_file() else path / "ckpt.pt"
    common.save_checkpoint(target, **{**ckpt, "cut": cut, "cut_info": info, "cut_exponent": exponent})
    print(f"rewrote {target} with the new cut")
    return target


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.calibrate:
            return calibrate(args)
        if args.encode:
            return encode(args)
        if args.decode:
            return decode(args)
        return reconstruct(args) if args.reconstruct else train(args)
    finally:
        common.destroy_distributed()


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, common.TrainingError, OSError, ValueError) as err:
        sys.exit(f"error: {err}")
