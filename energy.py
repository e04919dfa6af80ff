"""Energy network of CaloDREAM (arXiv:2405.09629, paper Sec. 3.1 and Table 1; SPEC 2.2):
an autoregressive transfusion network p(u | E_inc) over the 45 u's, trained with Conditional Flow Matching.

An encoder-decoder transformer (torch.nn.Transformer layout: post-LN, ReLU, dropout 0) reads the
condition token [c_E, 1, 0..] and the 45 teacher-forced tokens [u_{i-1}, one-hot(i), 0..] under a causal
mask; its output z_i conditions a dense CFM head, shared by all layers, that gives the velocity of u_i.
Sampling goes layer by layer: z_i from the prefix (key/value cache), then a 1-D ODE for u_i.

    python energy.py --ds 2                          # one GPU: paper preset, 500 epochs of batch 4096
    python energy.py --ds 3 --preset challenge       # the CaloChallenge-submission size (2,384,705)
    python energy.py --resume runs/energy-ds2-<time> # continue a killed run exactly
    python energy.py --sample --n 100000             # newest run -> runs/<run>/u_samples.hdf5
    python energy.py --sample --like data/dataset_2_2.hdf5 --solver rk4 --steps 50
    # 2 CPU cores, synthetic showers (`python data/prepare.py toy --ds 2`): 17 min, val loss 0.60, u-classifier AUC 0.51
    python energy.py --toy --epochs 12 --batch-size 128 --lr 1e-3 --val-every 2 --ckpt-every 1
    python energy.py --sample --like data/toy_ds2_ref.hdf5 --n 3000 --score            # AUC of sampled vs true u's
    python energy.py --sample --like data/toy_ds2_ref.hdf5 --n 3000 --solver rk4 euler --nfe 20 40   # steps study

Fast setting: RK4 with 5 steps per layer scored as well as RK4 50 on the toy showers (README).
Other scripts use `load_energy_sampler` / `chain_u`.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from common import (N_LAYERS, NFE_PER_STEP, DataError, Log, all_mean, atomic_write, autocast, count_parameters,
                    data_files, energy_condition, find_latest_run, fit_standardizer, init_distributed, inverse_logit,
                    load_checkpoint, load_u, logit, make_run_dir, pick_device, rank_share, sample_e_inc,
                    save_checkpoint, seed_everything, solve, split_indices, standardize, unstandardize)

PRESETS = {  # transformer feed-forward width, head width I, layers per stack, hidden head layers
    "paper": dict(ff=1024, inner=256, layers=4, head_layers=6),  # Table 1: 1,695,297 parameters
    "challenge": dict(ff=512, inner=512, layers=4, head_layers=6),  # CaloChallenge submission: 2,384,705
    "tiny": dict(ff=64, inner=32, layers=1, head_layers=1),  # tests and smoke runs only
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=int, default=2, choices=[2, 3], help="CaloChallenge dataset")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="network size")
    p.add_argument("--data-dir", default="data", help="folder of the HDF5 files")
    p.add_argument("--toy", action="store_true", help="use the synthetic showers data/toy_ds{ds}_train.hdf5")
    p.add_argument("--files", nargs="+", help="training files (override the defaults)")
    p.add_argument("--max-showers", type=int, help="read at most this many showers")
    p.add_argument("--out", default="runs", help="root of the run folders")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--batch-size", type=int, help="training batch (4096) or sampling batch (10000)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak of the one-cycle schedule")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the training file")
    p.add_argument("--val-every", type=int, default=5, help="validation loss every this many epochs")
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint every this many epochs")
    p.add_argument("--resume", help="run folder or checkpoint to continue")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    # sampling
    p.add_argument("--sample", action="store_true", help="sample u's from a trained run")
    p.add_argument("--ckpt", help="run folder or checkpoint (default: newest energy run of --ds)")
    p.add_argument("--n", type=int, default=100000, help="number of events (with --like: at most)")
    p.add_argument("--like", help="copy E_inc from this reference file instead of the log-uniform law")
    p.add_argument("--solver", nargs="+", default=["rk4"], choices=["euler", "midpoint", "rk4"])
    p.add_argument("--steps", type=int, nargs="+", default=[50], help="ODE steps per layer")
    p.add_argument("--nfe", type=int, nargs="+", help="instead of --steps: network evaluations per layer")
    p.add_argument("--score", action="store_true", help="with --like: classifier AUC of sampled vs true u's; "
                   "several --solver/--steps/--nfe values make a quality-vs-steps table")
    p.add_argument("--cls-epochs", type=int, default=30, help="--score classifier epochs")
    p.add_argument("--cls-width", type=int, default=512, help="--score classifier width")
    p.add_argument("--cls-repeats", type=int, default=1, help="--score: mean AUC of this many classifier seeds")
    p.add_argument("--no-cache", action="store_true", help="re-run the transformer over the prefix per layer")
    p.add_argument("--output", help="HDF5 file of u's (default: <run>/u_samples.hdf5)")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data (SPEC 2.1)
# E_inc and the 45 u's of every shower come from common.load_u (voxels summed chunk by chunk, never kept).


def u_to_net(u, stats):
    """Physical u's -> network space: clamped logit (all 45, u_0 included), per-feature standardisation."""
    return standardize(logit(u.double()), stats).float()


def net_to_u(z, stats):
    """Exact inverse of u_to_net; the clamp edges go back to the point masses 0 and 1 (float64)."""
    return inverse_logit(unstandardize(z.double(), {k: v.double() for k, v in stats.items()}))


# ----------------------------------------------------------------------------- model (SPEC 2.2)
class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameters, batch first, on SDPA. `cache` (a dict)
    keeps keys and values between calls: self-attention appends the new tokens', cross-attention computes
    those of `source` once."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, source=None, causal=False, cache=None):
        d = x.shape[-1]
        split = lambda y: rearrange(y, "b n (h e) -> b h n e", h=self.heads)  # noqa: E731
        q = split(F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d]))
        if cache and source is not None:
            k, v = cache["k"], cache["v"]
        else:
            kv = F.linear(x if source is None else source, self.in_proj_weight[d:], self.in_proj_bias[d:])
            k, v = map(split, kv.chunk(2, -1))
            if cache is not None:
                if cache:  # self-attention: the prefix's keys and values come first
                    k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                cache.update(k=k, v=v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(rearrange(y, "b h n e -> b n (h e)"))


class EncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer (post-LN, ReLU, no dropout), same parameter names."""

    def __init__(self, dim, heads, ff):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.linear1, self.linear2 = nn.Linear(dim, ff), nn.Linear(ff, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def feed_forward(self, x):
        return self.linear2(F.relu(self.linear1(x)))

    def forward(self, x):
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.feed_forward(x))


class DecoderLayer(EncoderLayer):
    """nn.TransformerDecoderLayer: causal self-attention, cross-attention to the memory, feed-forward."""

    def __init__(self, dim, heads, ff):
        super().__init__(dim, heads, ff)
        self.multihead_attn, self.norm3 = Attention(dim, heads), nn.LayerNorm(dim)

    def forward(self, x, memory, cache=None):
        x = self.norm1(x + self.self_attn(x, causal=cache is None, cache=None if cache is None else cache["self"]))
        x = self.norm2(x + self.multihead_attn(x, memory, cache=None if cache is None else cache["cross"]))
        return self.norm3(x + self.feed_forward(x))


class EnergyNet(nn.Module):
    """Velocity v(x_t, t | u_<i, E_inc) for all 45 u's at once (training) or one layer at a time (sampling)."""

    def __init__(self, ff=1024, inner=256, layers=4, head_layers=6, dim=64, heads=4, n_freq=32):
        super().__init__()
        self.dim = dim
        stack = lambda cls: nn.ModuleDict(dict(  # noqa: E731
            layers=nn.ModuleList(cls(dim, heads, ff) for _ in range(layers)), norm=nn.LayerNorm(dim)))
        self.transformer = nn.ModuleDict(dict(encoder=stack(EncoderLayer), decoder=stack(DecoderLayer)))
        for p in self.transformer.parameters():  # as nn.Transformer._reset_parameters
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.register_buffer("freqs", 30.0 * torch.randn(n_freq))  # frozen Gaussian Fourier frequencies
        self.t_embed = nn.Linear(2 * n_freq, dim)
        self.head_in = nn.Linear(1 + dim + dim, inner)  # acts on [x_t, t-emb, z_i]
        hidden = [m for _ in range(head_layers) for m in (nn.Linear(inner, inner), nn.LayerNorm(inner), nn.SiLU())]
        self.head = nn.Sequential(nn.SiLU(), *hidden, nn.Linear(inner, 1))
        positions = torch.zeros(N_LAYERS, dim)
        positions[torch.arange(N_LAYERS), 1 + torch.arange(N_LAYERS)] = 1  # one-hot(i) of length 46
        self.register_buffer("positions", positions, persistent=False)

    def encode(self, c_e):
        """The single condition token [c_E, 1, 0, ...] through the encoder: memory (B, 1, dim)."""
        x = F.pad(torch.stack([c_e, torch.ones_like(c_e)], -1), (0, self.dim - 2)).unsqueeze(1)
        enc = self.transformer["encoder"]
        for layer in enc["layers"]:
            x = layer(x)
        return enc["norm"](x)

    def decode(self, values, memory, start=0, caches=None):
        """Decoder tokens [value, one-hot(position)] for positions start.. -> z (B, n, dim). Without caches the
        sequence is the whole prefix under a causal mask; with caches, new tokens attend to the cached ones."""
        x = F.pad(values.unsqueeze(-1), (0, self.dim - 1)) + self.positions[start:start + values.shape[1]]
        dec = self.transformer["decoder"]
        for i, layer in enumerate(dec["layers"]):
            x = layer(x, memory, None if caches is None else caches[i])
        return dec["norm"](x)

    def context(self, z, c_e):
        """Teacher forcing: z_i sees [0, z_0, ..., z_{i-1}] (shifted right) and c_E. (B, n) -> (B, n, dim)."""
        return self.decode(F.pad(z[:, :-1], (1, 0)), self.encode(c_e))

    def time_features(self, t):
        arg = 2 * math.pi * t.unsqueeze(-1) * self.freqs
        return torch.cat([arg.sin(), arg.cos()], -1)

    def forward(self, z, c_e, x_t, t):
        """Velocities (B, 45) at x_t, t (B, 45) for data z (B, 45) and c_E (B,)."""
        emb = self.t_embed(self.time_features(t))
        return self.head(self.head_in(torch.cat([x_t.unsqueeze(-1), emb, self.context(z, c_e)], -1))).squeeze(-1)


def build_model(config):
    preset = PRESETS[config["preset"]]
    return EnergyNet(**preset)


def cfm_loss(model, z1, c_e, x0, t):
    """CFM with t and x0 per (event, layer): x_t = (1-t) x0 + t z1, target velocity z1 - x0."""
    x_t = (1 - t) * x0 + t * z1
    return F.mse_loss(model(z1, c_e, x_t, t).float(), z1 - x0)


# ----------------------------------------------------------------------------- sampling
def cuda_graphed(fn, *args):
    """Capture fn(*args) once in a CUDA graph and return a replay with the same signature: one layer's
    ODE is 200 small head evaluations, launch-bound on a GPU when run eagerly."""
    static_in = [a.clone() for a in args]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static_in)  # warm-up, and fills any lazily computed constants
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_in)

    def replay(*new):
        for s, x in zip(static_in, new):
            s.copy_(x)
        graph.replay()
        return static_out.clone()
    replay.fn = fn  # keeps what the graph reads (the time terms) alive
    return replay


@torch.no_grad()
def sample_z(model, c_e, x0, solver="rk4", steps=50, cache=True, graphs=None):
    """Network-space u's (N, 45) layer by layer: z_i from the prefix, then the 1-D ODE for u_i from x0[:, i].

    Only the head runs inside the ODE. Its first Linear acts on [x_t, t-emb, z_i]; the z_i part is computed
    once per layer, the t part (plus bias) once per distinct t, so a step is one addcmul plus the hidden
    layers. cache=False re-runs the whole transformer over the prefix for every layer (the authors' way).
    On CUDA, passing a dict as `graphs` replays each layer's ODE from a CUDA graph kept there."""
    n, dim = len(c_e), model.dim
    w_x, w_t, w_z = model.head_in.weight.split([1, dim, dim], 1)
    time_terms = {}

    def time_term(t):  # W_t t_embed(t) + b, computed in the first layer and reused in the other 44
        if t not in time_terms:
            t_ = torch.tensor([t], device=c_e.device)
            time_terms[t] = model.t_embed(model.time_features(t_)) @ w_t.T + model.head_in.bias
        return time_terms[t]

    def solve_layer(a, x0_i):
        return solve(lambda x, t: model.head(torch.addcmul(a + time_term(t), x, w_x.T)), x0_i, steps, solver)[0]

    if graphs is not None and c_e.is_cuda:
        key = (n, solver, steps)
        if key not in graphs:
            graphs[key] = cuda_graphed(solve_layer, x0.new_zeros(n, w_z.shape[0]), x0[:, :1])
        solve_layer = graphs[key]
    z = torch.zeros(n, N_LAYERS, device=c_e.device)
    memory = model.encode(c_e)
    caches = [dict(self={}, cross={}) for _ in model.transformer["decoder"]["layers"]] if cache else None
    for i in range(N_LAYERS):
        if cache:
            prev = z[:, i - 1:i] if i else z.new_zeros(n, 1)
            h = model.decode(prev, memory, start=i, caches=caches)[:, -1]
        else:
            h = model.context(z[:, :i + 1], c_e)[:, -1]
        z[:, i:i + 1] = solve_layer(h @ w_z.T, x0[:, i:i + 1])
    return z


def load_energy_sampler(path, ds, device, solver="rk4", steps=50, batch_size=10000, cache=True, progress=True):
    """Chain API: a callable u = sampler(e_inc, generator=None), e_inc float64 (N,) MeV -> physical u's
    float64 (N, 45). path None -> the newest energy run of dataset ds."""
    ckpt = load_checkpoint(path or find_latest_run("energy", ds), script="energy", ds=ds)
    model = build_model(ckpt["config"]).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    stats, graphs = ckpt["stats"], {}

    def sampler(e_inc, generator=None, solver=solver, steps=steps):
        e_inc = torch.as_tensor(e_inc, dtype=torch.float64).reshape(-1)
        x0 = torch.randn(len(e_inc), N_LAYERS, generator=generator)  # on the CPU: same numbers on any device
        out = []
        for s in tqdm(range(0, len(e_inc), batch_size), desc="sampling u", disable=not progress, leave=False):
            c_e = energy_condition(e_inc[s:s + batch_size]).float().to(device)
            z = sample_z(model, c_e, x0[s:s + batch_size].to(device), solver, steps, cache, graphs)
            out.append(net_to_u(z, stats).cpu())
        return torch.cat(out) if out else torch.zeros(0, N_LAYERS, dtype=torch.float64)

    sampler.model, sampler.ckpt = model, ckpt
    return sampler


def chain_u(ckpt, ds, e_inc, device, solver="rk4", steps=50, seed=1, progress=True):
    """The u's that shape_vit.py / latent_vit.py --sample condition on: (float64 (N, 45), description)."""
    sampler = load_energy_sampler(ckpt, ds, device, solver, steps, progress=progress)
    u = sampler(e_inc, generator=torch.Generator().manual_seed(seed)).double().cpu()
    return u, f"{ckpt or 'newest energy run'} ({solver}, {steps} steps per layer)"


def write_u(path, e_inc, u, overwrite=False):
    """HDF5 with incident_energies (N, 1) and physical u (N, 45), written to a temporary name and renamed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("incident_energies", data=e_inc.double().numpy().reshape(-1, 1), compression="gzip")
            f.create_dataset("u", data=u.double().numpy(), compression="gzip")
    atomic_write(path, write)


def u_classifier(e_gen, u_gen, e_ref, u_ref, seed=0, epochs=30, width=512, progress=True):
    """evaluate.py's classifier between sampled and true u's on [ln E_inc, logit u], standardised by the truth."""
    import evaluate  # only for --score
    feats = [torch.cat([e.log()[:, None], logit(u)], 1) for e, u in ((e_gen, u_gen), (e_ref, u_ref))]
    mu, sd = feats[1].mean(0), feats[1].std(0).clamp_min(1e-6)
    x_gen, x_ref = (((f - mu) / sd).float().numpy() for f in feats)
    return evaluate.classify(x_gen, x_ref, seed=seed, epochs=epochs, width=width, progress=progress, name="u classifier")


def sample(args):
    """Sample u's for E_inc from --like (or the log-uniform law) and write them; with --score, also the AUC
    against the true u's of --like. Several solvers / step counts: a quality-vs-steps table (no HDF5)."""
    device = pick_device(args.device)
    ckpt_path = Path(args.ckpt) if args.ckpt else find_latest_run("energy", args.ds, args.out)
    run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
    if args.nfe:  # equal cost across solvers: steps = NFE / (evaluations per step)
        bad = [(m, k) for m in args.solver for k in args.nfe if k % NFE_PER_STEP[m]]
        if bad:
            raise ValueError(f"--nfe {bad[0][1]} is not a multiple of {bad[0][0]}'s {NFE_PER_STEP[bad[0][0]]} per step")
    grid = [(m, k // NFE_PER_STEP[m]) for m in args.solver for k in args.nfe] if args.nfe else \
        [(m, k) for m in args.solver for k in args.steps]
    study = len(grid) > 1
    if (args.score or study) and not args.like:
        raise ValueError("--score and several solvers / steps need --like REF.hdf5 (the true u's)")
    default = run_dir / ("u_steps_study.json" if study else "u_samples.hdf5")
    output = Path(args.output or default)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    sampler = load_energy_sampler(ckpt_path, args.ds, device, batch_size=args.batch_size or 10000,
                                  cache=not args.no_cache, progress=not args.no_progress)
    print(f"energy run {run_dir}")
    if args.like:
        e_inc, u_ref = load_u([args.like], args.ds, args.n, progress=not args.no_progress)
    else:
        e_inc = sample_e_inc(args.n, torch.Generator().manual_seed(args.seed))
    rows = []
    for solver, steps in grid:
        gen = torch.Generator().manual_seed(args.seed)  # the same x0 for every solver: only the ODE error differs
        print(f"sampling {len(e_inc)} events on {device}: {solver}, {steps} steps "
              f"({steps * NFE_PER_STEP[solver]} NFE per layer), {'no ' if args.no_cache else ''}KV cache")
        start = time.time()
        u = sampler(e_inc, gen, solver=solver, steps=steps)
        row = dict(solver=solver, steps=steps, nfe=steps * NFE_PER_STEP[solver], events=len(u),
                   seconds=time.time() - start)
        print(f"  {row['seconds']:.1f} s ({len(u) / max(row['seconds'], 1e-9):.0f} events/s)")
        if args.score or study:  # K classifiers (other splits and inits): the mean beats their training noise
            res = [u_classifier(e_inc, u, e_inc, u_ref, args.seed + k, args.cls_epochs, args.cls_width,
                                not args.no_progress) for k in range(args.cls_repeats)]
            aucs = [r["auc"] for r in res]
            row.update(auc=float(np.mean(aucs)), auc_std=float(np.std(aucs)), aucs=aucs,
                       jsd=float(np.mean([r["jsd"] for r in res])))
            print(f"  u classifier vs {Path(args.like).name}: AUC {row['auc']:.4f} +- {row['auc_std']:.4f} "
                  f"({len(aucs)} classifiers), JSD {row['jsd']:.4f}")
        rows.append(row)
    if not study:
        write_u(output, e_inc, u, args.overwrite)
        print(f"wrote {output}")
        if args.score:
            score = json.dumps(rows[0], indent=1)
            atomic_write(output.with_suffix(".json"), lambda tmp: tmp.write_text(score))
        return output
    ref = max(rows, key=lambda r: (r["solver"] == "rk4", r["nfe"]))  # the most accurate solve: RK4, most NFE
    print(f"{'solver':>9} {'steps':>5} {'NFE':>4} {'seconds':>8} {'AUC':>7} {'- ref':>7}   (ref: {ref['solver']} "
          f"{ref['steps']} steps)")
    for r in rows:
        r["auc_minus_ref"] = r["auc"] - ref["auc"]
        print(f"{r['solver']:>9} {r['steps']:>5} {r['nfe']:>4} {r['seconds']:8.1f} {r['auc']:7.4f} "
              f"{r['auc_minus_ref']:+7.4f}")
    table = dict(energy_run=str(run_dir), like=str(args.like), rows=rows)
    atomic_write(output, lambda tmp: tmp.write_text(json.dumps(table, indent=1)))
    print(f"wrote {output}")
    return output


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def validation_loss(model, z, c_e, batch_size, seed):
    gen, total = torch.Generator().manual_seed(seed), 0.0  # the same x0 and t every time: comparable numbers
    for s in range(0, len(z), batch_size):
        zb = z[s:s + batch_size]
        x0, t = (f(zb.shape, generator=gen).to(z.device) for f in (torch.randn, torch.rand))
        with autocast(z.device):
            total += cfm_loss(model, zb, c_e[s:s + batch_size], x0, t).item() * len(zb)
    return total / max(len(z), 1)


def train(args, stop_after=None):
    """Train (or resume) a run; stop_after=k ends after k epochs as if killed (for tests). Returns the run folder."""
    rank, world, device = init_distributed(args.device)  # torchrun: DDP, one global batch shared by the ranks
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, script="energy")
        run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        keep = dict(resume=args.resume, device=args.device, no_progress=args.no_progress)
        args = argparse.Namespace(**{**ckpt["config"], **keep})
    args.batch_size = args.batch_size or 4096
    files = args.files or [str(p) for p in data_files(args.ds, args.data_dir, args.toy)]
    e_inc, u = load_u(files, args.ds, args.max_showers, progress=not args.no_progress)
    train_idx, val_idx = map(torch.from_numpy, split_indices(len(u), args.val_fraction, args.seed))
    stats = ckpt["stats"] if ckpt else fit_standardizer(logit(u[train_idx]))
    z, c_e = u_to_net(u, stats).to(device), energy_condition(e_inc).float().to(device)
    if not ckpt:
        run_dir = make_run_dir("energy", args.ds, args.out)  # under torchrun: rank 0's, broadcast
    log = Log(run_dir)  # silent on ranks > 0

    seed_everything(args.seed)
    model = build_model(vars(args)).to(device)
    steps_per_epoch = math.ceil(len(train_idx) / args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    history, start, step, nonfinite = {"train_loss": [], "val_loss": []}, 0, 0, 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        history, start, step, nonfinite = ckpt["history"], ckpt["epoch"], ckpt["step"], ckpt["nonfinite"]
    step_model = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    if args.compile:
        if device.type == "cuda":
            step_model = torch.compile(step_model)
        else:
            print("--compile is ignored on the CPU")
    log(f"{'resuming' if ckpt else 'run'} {run_dir} at epoch {start}: config {vars(args)}")
    log(f"device {device}, {len(train_idx)} train / {len(val_idx)} val events, "
        f"{count_parameters(model):,} trainable parameters (preset {args.preset})")

    def checkpoint(epoch):
        save_checkpoint(run_dir / "ckpt.pt", script="energy", ds=args.ds, config=vars(args), model=model.state_dict(),
                        optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch, step=step,
                        stats=stats, history=history, nonfinite=nonfinite)

    train_dev, in_a_row = train_idx.to(device), 0
    for epoch in range(start, args.epochs):
        if stop_after is not None and epoch >= stop_after:
            break
        gen = torch.Generator().manual_seed(args.seed * 100003 + epoch)  # all randomness of this epoch
        perm = torch.randperm(len(train_idx), generator=gen).to(device)
        model.train()
        losses, tic = [], time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress or rank > 0, leave=False)
        for b in bar:
            idx = train_dev[perm[b * args.batch_size:(b + 1) * args.batch_size]]
            x0, t = (f((len(idx), N_LAYERS), generator=gen).to(device, non_blocking=True)
                     for f in (torch.randn, torch.rand))  # drawn for the whole global batch on every rank
            share, weight = rank_share(len(idx), rank, world)  # (slice(None), 1.0) in a plain run
            with autocast(device):
                loss = weight * cfm_loss(step_model, z[idx[share]], c_e[idx[share]], x0[share], t[share])
            if all_mean(float(torch.isfinite(loss)), device) < 1:  # all ranks skip together
                nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
                if in_a_row >= 20:
                    raise SystemExit(f"error: 20 non-finite losses in a row at epoch {epoch + 1}; "
                                     f"the last good checkpoint is {run_dir / 'ckpt.pt'}")
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step, in_a_row = step + 1, 0
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        history["train_loss"].append(all_mean(float(np.mean(losses)) if losses else float("nan"), device))
        msg = ""
        if rank == 0 and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs):
            model.eval()
            val = validation_loss(model, z[val_idx.to(device)], c_e[val_idx.to(device)], args.batch_size, args.seed + 1)
            history["val_loss"].append([epoch + 1, val])
            msg = f" val {val:.4f}"
        log(f"epoch {epoch + 1}/{args.epochs} train {history['train_loss'][-1]:.4f}{msg} "
            f"lr {sched.get_last_lr()[0]:.2e} {len(train_idx) / (time.time() - tic):.0f} samples/s")
        if rank == 0 and ((epoch + 1) % args.ckpt_every == 0 or epoch + 1 == args.epochs):
            checkpoint(epoch + 1)
    return run_dir


def main(argv=None):
    args = parse_args(argv)
    if args.sample:
        return sample(args)
    run_dir = train(args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except (DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
