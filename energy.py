"""Energy network of CaloDREAM (arXiv:2405.09629, paper Sec. 3.1 and Table 1; SPEC 2.2): an autoregressive
transfusion network p(u | E_inc) over the 45 layer-energy variables u, trained with Conditional Flow Matching.

    python energy.py --ds 2                            # one GPU: paper network, 500 epochs of batch 4096
    python energy.py --ds 3 --preset challenge         # the CaloChallenge-submission size (2,384,705)
    torchrun --nproc_per_node=4 energy.py --ds 2       # several GPUs (each rank 4096 / 4 of every batch)
    python energy.py --resume                          # continue the newest run exactly where it stopped
    python energy.py --sample --like data/dataset_2_2.hdf5          # -> <run>/cond_ds2_100000.hdf5
    python energy.py --sample --n 100000 --steps 5                   # log-uniform E_inc, the fast setting
    # CPU quick run on the synthetic showers (`python data/prepare.py toy --ds 2` first): ~17 min on 2 cores
    python energy.py --toy --epochs 12 --batch-size 128 --lr 1e-3 --val-every 2 --ckpt-every 1
    python energy.py --sample --like data/toy_ds2_ref.hdf5 --n 3000
    python evaluate.py -i runs/energy-ds2-<time>/cond_ds2_3000.hdf5 -r data/toy_ds2_ref.hdf5 -m cls-u   # AUC 0.51

The network (common.EnergyNet) is an encoder-decoder transformer that reads the condition token [c_E, 1, 0..] and
the 45 teacher-forced tokens [u_{i-1}, one-hot(i), 0..] under a causal mask; its output z_i conditions a dense CFM
head, shared by all layers, that gives the velocity of u_i. Training draws t and x0 for every (event, layer).
Sampling goes layer by layer: z_i from the prefix (a key/value cache: the prefix is never re-run), then the 1-D ODE
of u_i (RK4, 50 steps in the paper; 5 steps scored as well on the toy showers, docs/RESULTS.md). The output is a
condition file (common.write_conditions: E_inc and physical u's) that shape_vit.py and latent_vit.py read.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import common

SCRIPT = "energy"
PRESETS = {  # transformer feed-forward width, head width I, layers per stack, hidden head layers
    "paper": dict(ff=1024, inner=256, layers=4, head_layers=6),  # Table 1: 1,695,297 parameters
    "challenge": dict(ff=512, inner=512, layers=4, head_layers=6),  # CaloChallenge submission: 2,384,705
    "tiny": dict(ff=64, inner=32, layers=1, head_layers=1),  # tests and smoke runs only
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=int, default=2, choices=(2, 3), help="CaloChallenge dataset")
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
    p.add_argument("--warmup", type=float, help="one-cycle warm-up fraction (DS2 0.3, DS3 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (the submission: 0)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="held-out share of the training file "
                   "(at least 300 showers or a tenth)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="fp32 (the authors'; TF32 on "
                   "CUDA) or bf16 autocast, for training and sampling")
    p.add_argument("--val-every", type=int, default=5, help="validation loss every this many epochs")
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint every this many epochs")
    p.add_argument("--stop-after", type=int, help="stop after N epochs (the schedule still spans --epochs)")
    p.add_argument("--resume", nargs="?", const="latest", help="continue RUN_DIR or CKPT (bare: the newest run)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    s = p.add_argument_group("sampling")
    s.add_argument("--sample", action="store_true", help="write a condition file of sampled u's")
    s.add_argument("--ckpt", help="run folder or checkpoint (default: newest energy run of --ds)")
    s.add_argument("--n", type=int, help="number of events (default 100000; with --like: all of its showers)")
    s.add_argument("--like", help="copy E_inc from the first --n showers of this file instead of log-uniform")
    s.add_argument("--solver", default="rk4", choices=sorted(common.NFE_PER_STEP))
    s.add_argument("--steps", type=int, default=50, help="ODE steps per layer (paper: RK4 50; fast: 5)")
    s.add_argument("--no-cache", action="store_true", help="re-run the transformer over the prefix per layer")
    s.add_argument("--output", help="condition file (default: <run>/cond_ds{ds}_{n}.hdf5)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else 0.3 if args.ds == 2 else 0.1  # the submission's
    return common.check_args(args)


# ----------------------------------------------------------------------------- sampling
def cached_attention(attn, x, source, cache):
    """nn.MultiheadAttention (batch first) of new tokens x with a key/value cache: self-attention (source None)
    appends the new tokens' keys and values, cross-attention computes those of `source` once."""
    d, w, b = x.shape[-1], attn.in_proj_weight, attn.in_proj_bias
    split = lambda y: rearrange(y, "b n (h e) -> b h n e", h=attn.num_heads)  # noqa: E731
    if source is None or not cache:
        k, v = map(split, F.linear(x if source is None else source, w[d:], b[d:]).chunk(2, -1))
        if source is None and cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        cache.update(k=k, v=v)
    y = F.scaled_dot_product_attention(split(F.linear(x, w[:d], b[:d])), cache["k"], cache["v"])
    return attn.out_proj(rearrange(y, "b h n e -> b n (h e)"))


def decode_step(model, token, memory, caches):
    """The decoder (post-LN layers, then its final norm) on one new token, attending to the cached prefix."""
    x = token
    for layer, cache in zip(model.transformer.decoder.layers, caches):
        x = layer.norm1(x + cached_attention(layer.self_attn, x, None, cache["self"]))
        x = layer.norm2(x + cached_attention(layer.multihead_attn, x, memory, cache["cross"]))
        x = layer.norm3(x + layer.linear2(F.relu(layer.linear1(x))))
    return model.transformer.decoder.norm(x)


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
    layers. cache=False re-runs the transformer over the prefix for every layer (the authors' way).
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
        return common.solve(lambda x, t: model.head(torch.addcmul(a + time_term(t), x, w_x.T)).float(), x0_i, steps,
                            solver)[0]

    if graphs is not None and c_e.is_cuda:
        key = (n, solver, steps)
        if key not in graphs:
            graphs[key] = cuda_graphed(solve_layer, x0.new_zeros(n, w_z.shape[0]), x0[:, :1])
        solve_layer = graphs[key]
    z = torch.zeros(n, common.N_LAYERS, device=c_e.device)
    memory = model.transformer.encoder(model.condition_token(c_e))
    caches = [dict(self={}, cross={}) for _ in model.transformer.decoder.layers]
    for i in range(common.N_LAYERS):
        if cache:
            h = decode_step(model, model.tokens(z[:, i - 1:i] if i else z.new_zeros(n, 1), start=i), memory, caches)
        else:
            h = model.context(z[:, :i + 1], c_e)
        z[:, i:i + 1] = solve_layer(h[:, -1] @ w_z.T, x0[:, i:i + 1])
    return z


def load_model(path, ds, device):
    """The trained network (eval mode) and its checkpoint; path None -> the newest energy run of ds."""
    ckpt = common.load_checkpoint(path or common.find_latest_run(SCRIPT, ds), script=SCRIPT, ds=ds)
    model = common.EnergyNet(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def sample_u(model, stats, e_inc, device, solver="rk4", steps=50, batch_size=10000, cache=True, seed=0,
             progress=True):
    """Physical u's (N, 45) float64 for E_inc (N,) MeV. x0 is drawn on the CPU: the same numbers on any device."""
    x0, graphs, out = torch.randn(len(e_inc), common.N_LAYERS, generator=torch.Generator().manual_seed(seed)), {}, []
    for s in tqdm(range(0, len(e_inc), batch_size), desc="sampling u", disable=not progress, leave=False):
        c_e = common.energy_condition(e_inc[s:s + batch_size]).float().to(device)
        z = sample_z(model, c_e, x0[s:s + batch_size].to(device), solver, steps, cache, graphs)
        out.append(common.net_to_u(z, stats).cpu())
    return torch.cat(out)


def sample(args):
    """E_inc from --like (its first --n showers) or log-uniform, u's from the network -> a condition file."""
    device = common.pick_device(args.device)
    path = Path(args.ckpt) if args.ckpt else common.find_latest_run(SCRIPT, args.ds, args.out)
    model, ckpt = load_model(path, args.ds, device)
    run_dir = path if path.is_dir() else path.parent
    if args.like:
        e_inc = common.read_conditions(args.like, args.ds, args.n, with_u=False)[0]
    else:
        e_inc = common.sample_e_inc(args.n or 100000, torch.Generator().manual_seed(args.seed))
    output = Path(args.output or run_dir / f"cond_ds{args.ds}_{len(e_inc)}.hdf5")
    common.claim_output(output, args.overwrite)  # before the work: exists, a second writer, a folder that takes it
    print(f"sampling u's for {len(e_inc)} events on {device} with {path} (epoch {ckpt['epoch']}): {args.solver}, "
          f"{args.steps} steps ({args.steps * common.NFE_PER_STEP[args.solver]} NFE per layer)")
    start = time.time()
    with common.autocast(device, args.precision):
        u = sample_u(model, ckpt["stats"], e_inc, device, args.solver, args.steps, args.batch_size or 10000,
                     not args.no_cache, args.seed, not args.no_progress)
    seconds = time.time() - start
    common.write_conditions(output, e_inc, u, args.ds, args.overwrite, checkpoint=str(path), epoch=ckpt["epoch"],
                            solver=args.solver, steps=args.steps, seed=args.seed, seconds=seconds,
                            like=str(args.like or "log-uniform"))
    print(f"wrote {output}: {len(u)} events in {seconds:.1f} s ({len(u) / max(seconds, 1e-9):.0f} events/s)")
    return output


# ----------------------------------------------------------------------------- training
def cfm_loss(model, z1, c_e, x0, t):
    """CFM with t and x0 per (event, layer): x_t = (1-t) x0 + t z1, target velocity z1 - x0."""
    return F.mse_loss(model(z1, c_e, (1 - t) * x0 + t * z1, t).float(), z1 - x0)


@torch.no_grad()
def validation_loss(model, z, c_e, batch_size, seed, precision="fp32"):
    gen, total = torch.Generator(z.device).manual_seed(seed), 0.0  # the same x0 and t every time: comparable
    for s in range(0, len(z), batch_size):
        zb = z[s:s + batch_size]
        x0, t = torch.randn(zb.shape, generator=gen, device=z.device), torch.rand(zb.shape, generator=gen, device=z.device)
        with common.autocast(z.device, precision):
            total += cfm_loss(model, zb, c_e[s:s + batch_size], x0, t).item() * len(zb)
    return total / max(len(z), 1)


def train(args):
    """Train (or resume) a run; returns its folder. Under torchrun every rank trains on its share of each batch."""
    rank, world, device = common.init_distributed(args.device)
    args, ckpt, run_dir = common.resume(args, SCRIPT)
    args.batch_size = args.batch_size or 4096
    files = args.files or [str(p) for p in common.data_files(args.ds, args.data_dir, args.toy)]
    e_inc, u = common.load_u(files, args.ds, args.max_showers, progress=not args.no_progress and rank == 0)
    train_idx, val_idx = common.split_indices(len(u), args.val_fraction, args.seed)
    if len(train_idx) < args.batch_size or args.batch_size % world:
        raise ValueError(f"{len(train_idx)} training events and {world} ranks need a --batch-size of at most "
                         f"{len(train_idx)} that {world} divides (got {args.batch_size})")
    stats = ckpt["stats"] if ckpt else common.fit_standardizer(common.logit(u[train_idx]))
    z, c_e = common.u_to_net(u, stats).to(device), common.energy_condition(e_inc).float().to(device)
    run_dir = run_dir or common.make_run_dir(SCRIPT, args.ds, args.out)
    log = common.Log(run_dir)  # silent on ranks > 0

    common.seed_everything(args.seed)
    model_args = ckpt["model_args"] if ckpt else PRESETS[args.preset]
    model = common.EnergyNet(**model_args).to(device)
    steps_per_epoch = len(train_idx) // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=args.warmup)
    history, start, step, nonfinite = common.restore(ckpt, model, opt, sched) if ckpt else \
        ({"train_loss": [], "val_loss": []}, 0, 0, 0)
    net, counts = common.wrap_model(model, device, world, args.compile), {"nonfinite": nonfinite}
    config = common.json_config(args)
    log(f"{'resuming' if ckpt else 'run'} {run_dir} at epoch {start}; config {config}")
    log(f"device {device} x {world}; {len(train_idx)} train / {len(val_idx)} val events; "
        f"{common.count_parameters(model):,} trainable parameters; {steps_per_epoch} steps per epoch")

    last = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start, last):
        order, gen = common.epoch_generators(args.seed, epoch, rank, device)
        perm = torch.from_numpy(train_idx).to(device)[torch.randperm(len(train_idx), generator=order).to(device)]
        model.train()
        losses, tic = [], time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress or rank > 0, leave=False)
        for i in bar:
            rows = common.batch_rows(perm, i, args.batch_size, rank, world)
            x0 = torch.randn((len(rows), common.N_LAYERS), generator=gen, device=device)
            t = torch.rand((len(rows), common.N_LAYERS), generator=gen, device=device)
            with common.autocast(device, args.precision):
                loss = cfm_loss(net, z[rows], c_e[rows], x0, t)
            if common.optimizer_step(model, loss, opt, counts, run_dir, args.clip_grad):
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            sched.step()
            step += 1
        history["train_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        msg = ""
        if rank == 0 and len(val_idx) and ((epoch + 1) % args.val_every == 0 or epoch + 1 == last):
            model.eval()
            rows = torch.from_numpy(val_idx).to(device)
            history["val_loss"].append([epoch + 1, validation_loss(model, z[rows], c_e[rows], args.batch_size,
                                                                  args.seed + 1, args.precision)])
            msg = f" val {history['val_loss'][-1][1]:.4f}"
        log(f"epoch {epoch + 1}/{args.epochs} train {history['train_loss'][-1]:.4f}{msg} lr "
            f"{sched.get_last_lr()[0]:.2e} {len(train_idx) / (time.time() - tic):.0f} samples/s "
            f"skipped {counts['nonfinite']}")
        if rank == 0 and ((epoch + 1) % args.ckpt_every == 0 or epoch + 1 == last):
            common.save_checkpoint(run_dir / "ckpt.pt", script=SCRIPT, ds=args.ds, config=config,
                                   model_args=model_args, model=model.state_dict(), optimizer=opt.state_dict(),
                                   scheduler=sched.state_dict(), epoch=epoch + 1, step=step, stats=stats,
                                   history=history, nonfinite=counts["nonfinite"])
    common.finish_run(log, run_dir, history, last, args.epochs)
    return run_dir


def main(argv=None):
    args = parse_args(argv)
    try:
        return sample(args) if args.sample else train(args)
    finally:
        common.destroy_distributed()


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, common.TrainingError, OSError, ValueError) as err:
        sys.exit(f"error: {err}")
