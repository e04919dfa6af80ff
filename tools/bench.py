"""Speed and memory of the CaloDREAM networks and sampling chain (paper App. A.3, Table 6; SPEC 2.2-2.5, 4).

Every network is built with random weights by its own script's builder and preset; nothing is trained.
    python tools/bench.py                                   # everything, on cuda if present (one H100: minutes)
    python tools/bench.py --quick --device cpu              # 2 CPU cores: ~10 min (batch 10, small shape presets)
    python tools/bench.py --sections energy --kv-steps 50   # KV cache vs re-running the prefix; sampler vs heads
    python tools/bench.py --sections memory --memory-n 20000   # peak RSS of loading a synthetic DS3 file
Sections (--sections, default all) print a table each and rewrite --out (bench.json, a list of rows each):
  forward   one forward pass per network at --forward-batch (100): energy head (and whole energy net),
            ViT and laViT DS2/DS3, VAE (encoder + decoder, and decoder alone) DS2/DS3
  flops     achieved FLOP/s of the ViT/laViT forwards against this device's dense-matmul peak, measured now
  energy    energy sampler at --kv-batch (1000): KV cache vs none (time, max |u difference|); the sampler
            vs its head evaluations alone (target: within 1.2x)
  sampling  CaloChallenge ms per shower of the whole chain (energy network, then ViT or laViT + VAE
            decoder) for each solver and batch size (CUDA 1, 100, 10000; out of memory is recorded)
  training  samples/s of an optimizer step of each script's model, from a raw batch (fetch, preprocessing)
  memory    peak RSS of common.load_showers on a synthetic DS3 file, in a clean subprocess
Timings: median of up to --repeats calls after a warm-up (at most --budget seconds each); CUDA synchronised,
bf16 autocast where the scripts use it. Peak memory: torch.cuda.max_memory_allocated per row on CUDA, the
process's peak RSS (it only grows) on CPU. Measured numbers and how to read them: README.md, section "Speed and memory".
"""
import argparse
import contextlib
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bespoke  # noqa: E402
import common
import energy
import latent_vit
import shape_vit
import vae as vae_lib

HERE = Path(__file__).resolve().parents[1]
SECTIONS = ("forward", "flops", "energy", "sampling", "training", "memory")
PAPER_MS = {"energy_head": 0.37, "vit_ds2": 17, "vit_ds3": 84, "lavit_ds2": 31, "lavit_ds3": 63}  # H100, batch 100
QUICK_TRAIN_BATCH = {"energy": 512, "shape_vit": 4, "vae": 4, "latent_vit": 4, "bespoke": 2}  # CPU --quick
L = common.N_LAYERS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="smaller sizes (CPU: minutes instead of hours)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--out", default="bench.json", help="JSON output (rewritten after every section)")
    p.add_argument("--ds", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    p.add_argument("--budget", type=float, help="seconds after which repeating stops (10; --quick 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forward-batch", type=int, help="batch of forward and flops (100; CPU --quick 10)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="chain batches "
                   "(CUDA 1 100 10000; CUDA --quick or CPU 1 100; CPU --quick 1 10)")
    p.add_argument("--solvers", nargs="+", default=["euler", "midpoint", "rk4", "bespoke"],
                   choices=["euler", "midpoint", "rk4", "bespoke"], help="bespoke: ViT only, energy network rk4")
    p.add_argument("--chains", nargs="+", default=["vit", "lavit"], choices=["vit", "lavit"])
    p.add_argument("--shape-steps", type=int, default=20, help="shape ODE steps in the chain (paper: 20)")
    p.add_argument("--energy-steps", type=int, default=50, help="energy ODE steps per layer in the chain (50)")
    p.add_argument("--bespoke-steps", type=int, default=8, help="steps (= NFE) of the bespoke solver")
    p.add_argument("--train-batch", type=int, help="one batch for all training scripts (default: presets)")
    p.add_argument("--kv-batch", type=int, default=1000, help="batch of the energy section")
    p.add_argument("--kv-solver", default="rk4", choices=sorted(common.NFE_PER_STEP))
    p.add_argument("--kv-steps", type=int, help="ODE steps of the energy section (50; CPU --quick 3)")
    p.add_argument("--memory-n", type=int, default=20000, help="synthetic DS3 showers of the memory section")
    return p.parse_args(argv)


def resolve(args, device):
    cpu = device.type == "cpu"
    small = args.quick and cpu
    defaults = dict(budget=3.0 if args.quick else 10.0, forward_batch=10 if small else 100, kv_steps=3 if small else 50,
                    batch_sizes=[1, 10] if small else [1, 100] if cpu or args.quick else [1, 100, 10000])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset = "small" if small else "paper"  # shape networks of the chain; training batches
    return args


# ----------------------------------------------------------------------------- timing and memory
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device):
    """CUDA: max allocated since the last reset; CPU: the process's peak RSS (ru_maxrss is KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, device, args, warm=True):
    """(median ms of fn(), peak MiB), or None when the device runs out of memory ('where memory allows').
    warm: True = one untimed call first, a callable = that instead (cheaper, same one-time costs), False =
    none. Calls under 50 ms are looped so that timer and launch overheads average out."""
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if warm:
            (warm if callable(warm) else fn)()
        times, inner, spent = [], 1, 0.0
        while not times or (len(times) < args.repeats and spent < args.budget):
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            dt = time.perf_counter() - start
            spent += dt
            if not times and inner == 1 and dt < 0.05:  # too short to time alone: loop it, start again
                inner = math.ceil(0.05 / max(dt, 1e-7))
                continue
            times.append(dt / inner)
        return 1e3 * statistics.median(times), peak_mb(device)
    except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(err, (torch.OutOfMemoryError, MemoryError)) and "not enough memory" not in str(err):
            raise
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None


def in_context(fn, device, amp):
    """fn under no_grad, and under the scripts' bf16 autocast (CUDA only) when amp."""
    def call():
        with torch.no_grad(), (common.autocast(device) if amp else contextlib.nullcontext()):
            return fn()
    return call


# ----------------------------------------------------------------------------- networks with random weights
def jitter(model, std=0.02):
    """Noise in the zero-initialised (adaLN-Zero, output) weights, so no matmul multiplies zeros."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, std)
    return model


def vit_config(kind, ds, preset="paper"):
    """The ViT of shape_vit.py ('vit', on the voxels) or of latent_vit.py ('lavit', on the VAE latent grid)."""
    if kind == "vit":
        p, shape = shape_vit.PRESETS[(ds, preset)], (1, *common.geometry(ds).shape)
    else:
        p, shape = latent_vit.PRESETS[(ds, preset)], vae_lib.PRESETS[ds]["latent"]
    return common.ViTConfig(in_shape=tuple(shape), patch=tuple(p["patch"]), dim=p["dim"], heads=p["heads"],
                            mlp=p["mlp"], depth=p["depth"], cond_dim=1 + L)


def build_vit(kind, ds, device, preset="paper"):
    return jitter(common.ViT(vit_config(kind, ds, preset))).to(device).eval()


def build_vae(ds, device):
    return jitter(vae_lib.VAE(**vae_lib.model_args_for(ds, 64))).to(device).eval()  # float32 as vae.py runs it: no autocast


def vit_inputs(model, batch, device):
    return (torch.randn(batch, *model.cfg.in_shape, device=device), torch.rand(batch, device=device),
            torch.randn(batch, model.cfg.cond_dim, device=device))


def unit(shape, device):
    """Identity standardisation statistics."""
    return {"mean": torch.zeros(shape, device=device), "std": torch.ones(shape, device=device)}


def shape_stats(ds, device):
    """Identity preprocessing statistics for every shape-side network of dataset ds."""
    return dict(vox=unit(common.geometry(ds).shape, device), cond=unit(L, device),
                latent=unit(vae_lib.PRESETS[ds]["latent"], device))


def energy_checkpoint(folder, ds):
    """A random-weight energy checkpoint (paper preset), as energy.load_model reads it."""
    path = Path(folder) / f"energy-ds{ds}.pt"
    common.save_checkpoint(path, script="energy", ds=ds, config={"preset": "paper"}, stats=unit(L, "cpu"),
                           model_args=energy.PRESETS["paper"], model=paper_energy_net().state_dict())
    return path


def paper_energy_net():
    return common.EnergyNet(**energy.PRESETS["paper"])


def energy_sampler(ckpt, ds, device, solver, steps, cache=True):
    """u = sampler(e_inc): energy.py's sampler at fixed settings."""
    model, c = energy.load_model(ckpt, ds, device)
    return lambda e_inc: energy.sample_u(model, c["stats"], e_inc, device, solver, steps, 10 ** 9, cache, progress=False)


def raw_batch(ds, n, seed=0):
    """Synthetic raw showers as the scripts hold them in RAM: float32 numpy, MeV, 70 % empty voxels."""
    rng, n_vox = np.random.default_rng(seed), common.geometry(ds).n_vox
    showers = (rng.random((n, n_vox)) * (rng.random((n, n_vox)) < 0.3)).astype(np.float32)
    return common.sample_e_inc(n, torch.Generator().manual_seed(seed)).float().numpy(), showers


# ----------------------------------------------------------------------------- FLOPs
def vit_flops(cfg, batch):
    """FLOPs of one ViT forward: 2 x the MACs of every Linear, plus 4 B heads N^2 d_head for QK^T and AV."""
    c, *grid = cfg.in_shape
    n, patch_dim, d = math.prod(g // p for g, p in zip(grid, cfg.patch)), c * math.prod(cfg.patch), cfg.dim
    per_token = patch_dim * d + cfg.depth * (4 * d * d + 2 * d * cfg.mlp) + d * patch_dim  # embed, blocks, final
    per_sample = 256 * d + cfg.cond_dim * d + 2 * d * d + cfg.depth * 6 * d * d + 2 * d * d  # t/c embed, adaLN
    return 2 * batch * (n * per_token + per_sample) + 4 * batch * cfg.depth * n * n * d


def counted_flops(model, batch=1):
    """The same, counted by torch's FlopCounterMode; attention on the math backend so that its two matmuls
    are counted on every device (the fused CPU attention kernel is not registered with the counter)."""
    inputs = vit_inputs(model, batch, next(model.parameters()).device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- sections
def n_params(*modules):
    return sum(map(common.count_parameters, modules))


def vit_call(m, batch, device):
    return in_context(functools.partial(m, *vit_inputs(m, batch, device)), device, amp=True)


def bench_forward(args, device, res):
    rand, bs, rows = functools.partial(torch.randn, device=device), args.forward_batch, []
    net = paper_energy_net().to(device).eval()
    head = lambda x: net.head(net.head_in(x))  # noqa: E731  the CFM head on [x_t, t-emb, z_i] (129)
    unif = functools.partial(torch.rand, device=device)
    items = {"energy_head": (n_params(net.head_in, net.head), False, lambda b: (head, rand(b, 129))),
             "energy_net": (n_params(net), True, lambda b: (net, rand(b, L), unif(b), rand(b, L), unif(b, L)))}
    for ds in args.ds:
        for kind in ("vit", "lavit"):
            m = build_vit(kind, ds, device)
            items[f"{kind}_ds{ds}"] = (n_params(m), True, lambda b, m=m: (m, *vit_inputs(m, b, device)))
        v, grid = build_vae(ds, device), common.geometry(ds).shape
        items[f"vae_ds{ds}"] = (n_params(v), False, lambda b, v=v, grid=grid: (
            v, unif(b, 1, *grid), rand(b, 1 + L), rand(b, *v.latent_shape)))
        items[f"vae_decoder_ds{ds}"] = (n_params(v.cond_net, v.up, v.out), False,
                                        lambda b, v=v: (v.decode, rand(b, *v.latent_shape), rand(b, 1 + L)))
    for name, (params, amp, make) in items.items():
        call = lambda b: in_context(functools.partial(*make(b)), device, amp)  # noqa: E731
        ms, mem = timed(call(bs), device, args, call(1) if device.type == "cpu" else True) or (None, None)
        precision = "bf16" if amp and device.type == "cuda" else "fp32"
        rows.append(dict(name=name, batch=bs, params=params, precision=precision, ms=ms, ms_per_sample=ms and ms / bs,
                         paper_ms_h100=PAPER_MS.get(name), peak_mem_mb=mem))
    return rows


def bench_flops(args, device, res):
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = timed(lambda: a @ b, device, args)[0]
    peak, bs = 2 * n ** 3 / ms * 1e3, args.forward_batch
    rows = [dict(name=f"matmul {n}^3 {str(dtype)[6:]}", gflop=2 * n ** 3 / 1e9, ms=ms, tflops=peak / 1e12,
                 fraction_of_peak=1.0)]
    forward = {r["name"]: r for r in res.get("forward", []) if r["batch"] == bs and r["ms"]}
    for name, m in ((f"{kind}_ds{ds}", build_vit(kind, ds, device)) for ds in args.ds for kind in ("vit", "lavit")):
        if name in forward:  # the forward section's time of the same call
            ms = forward[name]["ms"]
        else:
            warm = vit_call(m, 1, device) if device.type == "cpu" else True
            ms = timed(vit_call(m, bs, device), device, args, warm)[0]
        flops = vit_flops(m.cfg, bs)
        rows.append(dict(name=name, batch=bs, gflop=flops / 1e9, gflop_counted=counted_flops(m) * bs / 1e9, ms=ms,
                         tflops=flops / ms * 1e3 / 1e12, fraction_of_peak=flops / ms * 1e3 / peak))
    return rows


def bench_energy(args, device, res):
    """load_energy_sampler with and without its KV cache (without: the decoder re-runs over the whole prefix
    for every layer, as the authors did); the decoder alone both ways; the 45 x steps x NFE evaluations of
    the full CFM head alone (no transformer, no solver), at the same batch."""
    bs, solver, steps, tmp = args.kv_batch, args.kv_solver, args.kv_steps, tempfile.TemporaryDirectory()
    ckpt = energy_checkpoint(tmp.name, 2)  # the energy network is the same for both datasets
    samplers = [energy_sampler(ckpt, 2, device, solver, steps, cache=cache) for cache in (True, False)]
    net, nfe = energy.load_model(ckpt, 2, device)[0], steps * common.NFE_PER_STEP[solver]
    e_inc = common.sample_e_inc(bs, torch.Generator().manual_seed(args.seed))
    c_e = common.energy_condition(e_inc).float().to(device)
    u = {}  # the last output of each sampler

    def sample(cache):
        u[cache] = samplers[1 - cache](e_inc)

    @torch.no_grad()
    def decoder(cache):  # sample_z without the ODEs: z_i of the 45 layers, each from its prefix
        z, memory = torch.zeros(bs, L, device=device), net.transformer.encoder(net.condition_token(c_e))
        caches = [dict(self={}, cross={}) for _ in net.transformer.decoder.layers]
        for i in range(L):
            if cache:
                energy.decode_step(net, net.tokens(z[:, i - 1:i] if i else z[:, :1], start=i), memory, caches)
            else:
                net.context(z[:, :i + 1], c_e)

    @torch.no_grad()
    def heads_layer(x):  # one layer's head evaluations (a CUDA graph on CUDA, as the sampler's ODE)
        for _ in range(nfe):
            y = net.head(net.head_in(x))
        return y
    inp = torch.randn(bs, 129, device=device)
    layer = energy.cuda_graphed(heads_layer, inp) if device.type == "cuda" else heads_layer
    rows = []
    for name, fn, k in (("sampler, KV cache", lambda: sample(True), nfe),
                        ("sampler, no cache", lambda: sample(False), nfe),
                        ("decoder only, KV cache", lambda: decoder(True), 0),
                        ("decoder only, no cache", lambda: decoder(False), 0),
                        ("head evaluations only", lambda: [layer(inp) for _ in range(L)], nfe)):
        ms, mem = timed(fn, device, args, warm=device.type == "cuda" or not args.quick)
        rows.append(dict(name=name, batch=bs, solver=solver, steps=steps if k else 0, head_evals=L * k, ms=ms,
                         ms_per_event=ms / bs, peak_mem_mb=mem))
    rows[1].update(speedup=rows[1]["ms"] / rows[0]["ms"], max_abs_diff=(u[True] - u[False]).abs().max().item())
    rows[3]["speedup"] = rows[3]["ms"] / rows[2]["ms"]
    # target: <= 1.2 (no overhead beyond the network). The decoder is a fixed cost that 50 steps amortise; the
    # ODE part alone (sampler minus decoder) against the head evaluations shows the per-step overhead.
    rows[4].update(sampler_over_heads=rows[0]["ms"] / rows[4]["ms"],
                   ode_over_heads=(rows[0]["ms"] - rows[2]["ms"]) / rows[4]["ms"])
    tmp.cleanup()
    return rows


def bench_sampling(args, device, res):
    rows, tmp = [], tempfile.TemporaryDirectory()
    for ds in args.ds:
        vit, lavit = build_vit("vit", ds, device, args.preset), build_vit("lavit", ds, device, args.preset)
        decoder = build_vae(ds, device)
        stats, ckpt = shape_stats(ds, device), energy_checkpoint(tmp.name, ds)
        def lavit_chain(e, u, solve, gen):  # latent ODE, then the VAE decoder (vae.py --decode)
            z = latent_vit.generate(lavit, stats, e, u, solve, gen).to(device)
            frac = decoder.decode(z, common.shape_condition(e.to(device), u.to(device), stats["cond"]))
            return vae_lib.decoded_to_showers(frac, common.u_to_energies(e.to(device), u.to(device)), 1e-4).cpu()
        shape = {"vit": lambda e, u, solve, gen: shape_vit.generate(vit, stats, e, u, ds, solve, gen),
                 "lavit": lavit_chain}
        for solver in args.solvers:
            e_solver = "rk4" if solver == "bespoke" else solver
            sampler = energy_sampler(ckpt, ds, device, e_solver, args.energy_steps)
            bns = solver == "bespoke"  # an untrained n-step BNS solver (= Euler), applied as the samplers do
            if bns:
                common.save_checkpoint(Path(tmp.name) / "bns.pt", script="bespoke", ds=ds, n=args.bespoke_steps,
                                       solver=common.BespokeSolver(args.bespoke_steps).state_dict())
            for bs in args.batch_sizes:
                e_inc, got = common.sample_e_inc(bs, torch.Generator().manual_seed(args.seed)), {}
                base = dict(ds=ds, preset=args.preset, solver=solver, batch=bs,
                            nfe_energy=L * args.energy_steps * common.NFE_PER_STEP[e_solver],
                            nfe_shape=args.bespoke_steps if bns else args.shape_steps * common.NFE_PER_STEP[solver])
                # the energy stage once per (solver, batch size); both shape networks take its u's
                energy_time = timed(lambda: got.update(u=sampler(e_inc)), device, args, warm=device.type == "cuda")
                for chain in [c for c in args.chains if not (bns and c == "lavit")]:
                    gen = torch.Generator(device).manual_seed(args.seed)
                    run = lambda k, c=chain: shape[c](e_inc, got["u"], common.make_solver(  # noqa: E731
                        solver if bns else e_solver, k, Path(tmp.name) / "bns.pt", ds)[0], gen)
                    shape_time = energy_time and timed(lambda: run(args.shape_steps), device, args, lambda: run(1))
                    if not shape_time:
                        rows.append(dict(base, chain=chain, status="out of memory"))
                        continue
                    (ms_e, mem_e), (ms_s, mem_s) = energy_time, shape_time
                    rows.append(dict(base, chain=chain, status="ok", ms_per_shower_energy=ms_e / bs,
                                     ms_per_shower_shape=ms_s / bs, ms_per_shower=(ms_e + ms_s) / bs,
                                     peak_mem_mb=max(mem_e, mem_s)))
    tmp.cleanup()
    return rows


def bench_training(args, device, res):
    """One optimizer step of each script's model on a raw synthetic batch: the script's own fetch,
    preprocessing (fresh noise) and loss, backward, AdamW (bespoke: Adam) step."""
    gen = torch.Generator(device).manual_seed(args.seed)

    def step_of(params, loss, opt=torch.optim.AdamW):
        params = [p for p in params if p.requires_grad]
        opt = opt(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()
        return step, sum(p.numel() for p in params)

    def energy_step(b, ds):
        net = paper_energy_net().to(device)
        z, c_e = torch.randn(b, L, device=device), torch.rand(b, device=device)

        def loss():
            with common.autocast(device):
                return energy.cfm_loss(net, z, c_e, torch.randn_like(z), torch.rand_like(z))
        return step_of(net.parameters(), loss)

    def shape_step(b, ds, latent=False):  # shape_vit.py, or latent_vit.py on a latent file's rows
        m = jitter(common.ViT(vit_config("lavit" if latent else "vit", ds))).to(device)
        stats, (e_inc, showers), idx = shape_stats(ds, device), raw_batch(ds, b), np.arange(b)
        lat = vae_lib.PRESETS[ds]["latent"]
        data = dict(mu=np.random.default_rng(0).standard_normal((b, *lat), np.float32),
                    logvar=np.full((b, *lat), -6, np.float32), incident_energies=e_inc.astype(np.float64),
                    u=np.full((b, L), 0.3))

        def loss():
            if latent:
                return latent_vit.batch_loss(m, *latent_vit.fetch(data, idx, device), stats, gen)
            return shape_vit.batch_loss(m, *shape_vit.fetch(showers, e_inc, idx, device), stats, ds, gen)
        return step_of(m.parameters(), loss)

    def vae_step(b, ds):
        v, (e_inc, showers), cond_stats = build_vae(ds, device).train(), raw_batch(ds, b), unit(L, device)
        return step_of(v.parameters(), lambda: vae_lib.vae_loss(
            v, *vae_lib.batch_inputs(e_inc, showers, ds, cond_stats, device)[:2], 1e-5, gen)[0])

    def bespoke_step(b, ds):  # local loss of a BNS solver on a frozen ViT, random reference trajectories
        m = build_vit("vit", ds, device).requires_grad_(False)
        solver = common.BespokeSolver(args.bespoke_steps).to(device)
        x0, _, cond = vit_inputs(m, b, device)
        traj = torch.randn(b, bespoke.parse_args([]).ref_steps + 1, *m.cfg.in_shape, device=device)
        field = lambda x, t, c: m.velocity(c)(x, t)  # noqa: E731
        return step_of(solver.parameters(), lambda: bespoke.local_loss(solver, field, x0, cond, traj), torch.optim.Adam)

    jobs = [("energy", energy_step, 4096, args.ds[0])]  # energy.py's batch; the others from their presets
    for ds in args.ds:
        jobs += [(f"shape_vit_ds{ds}", shape_step, shape_vit.PRESETS[(ds, "paper")]["batch_size"], ds),
                 (f"vae_ds{ds}", vae_step, vae_lib.parse_args([]).batch_size, ds),
                 (f"latent_vit_ds{ds}", functools.partial(shape_step, latent=True),
                  latent_vit.PRESETS[(ds, "paper")]["batch_size"], ds),
                 (f"bespoke_ds{ds}", bespoke_step, bespoke.PRESETS["paper"]["batch_size"], ds)]
    rows = []
    for name, make, preset_batch, ds in jobs:
        b = args.train_batch or (QUICK_TRAIN_BATCH[name.split("_ds")[0]] if args.preset == "small" else preset_batch)
        step, params = make(b, ds)
        ms, mem = timed(step, device, args, warm=not (args.quick and device.type == "cpu")) or (None, None)
        rows.append(dict(name=name, batch=b, params=params, ms_per_step=ms, samples_per_s=ms and b / ms * 1e3,
                         peak_mem_mb=mem, status="ok" if ms else "out of memory"))
        del step  # frees the model, its gradients and optimizer state before the next one
    return rows


MEMORY_PROBE = r"""
import json, resource, sys
import common


def peak_rss():  # VmHWM: this process's own peak (ru_maxrss also keeps the RSS of the parent it was forked from)
    try:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


base = peak_rss()
e_inc, showers = common.load_showers([sys.argv[1]], 3, progress=False)
if sys.argv[2] == "shape_vit":  # what shape_vit.train does next: statistics of the training split
    idx, _ = common.split_indices(len(showers), 0.1, 0)
    common.fit_shape_stats(e_inc, showers, 3, idx)
print(json.dumps(dict(baseline=base, peak=peak_rss(), nbytes=showers.nbytes + e_inc.nbytes)))
"""


def bench_memory(args, device, res):
    """Peak RSS (VmHWM) of a fresh process that loads a synthetic DS3 training file with common.load_showers
    (and of one that then fits shape_vit's statistics as its train() does), against the float32 size of the
    data. baseline: the interpreter with torch imported; overhead: peak - baseline - data, the transients."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        subprocess.run([sys.executable, str(HERE / "data" / "prepare.py"), "toy", "--ds", "3", "--n", str(args.memory_n),
                        "--n-ref", "1", "--out", tmp, "--no-progress"], check=True, cwd=HERE, stdout=subprocess.DEVNULL)
        print(f"wrote {args.memory_n} synthetic DS3 showers in {time.time() - start:.0f} s")
        for mode in ("load_showers", "shape_vit"):
            start = time.time()
            out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(Path(tmp) / "toy_ds3_train.hdf5"), mode],
                                 check=True, cwd=HERE, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(dict(name=mode, n=args.memory_n, float32_gb=r["nbytes"] / 1e9, baseline_gb=r["baseline"] / 1e9,
                             peak_gb=r["peak"] / 1e9, peak_over_float32=r["peak"] / r["nbytes"],
                             excess_over_float32=(r["peak"] - r["baseline"]) / r["nbytes"],
                             overhead_gb=(r["peak"] - r["baseline"] - r["nbytes"]) / 1e9, seconds=time.time() - start))
    return rows


BENCH = dict(forward=bench_forward, flops=bench_flops, energy=bench_energy, sampling=bench_sampling,
             training=bench_training, memory=bench_memory)
COLUMNS = dict(
    forward=["name", "batch", "params", "precision", "ms", "ms_per_sample", "paper_ms_h100", "peak_mem_mb"],
    flops=["name", "batch", "gflop", "gflop_counted", "ms", "tflops", "fraction_of_peak"],
    energy=["name", "batch", "solver", "steps", "head_evals", "ms", "ms_per_event", "speedup", "max_abs_diff",
            "sampler_over_heads", "ode_over_heads"],
    sampling=["ds", "chain", "preset", "solver", "nfe_energy", "nfe_shape", "batch", "ms_per_shower_energy",
              "ms_per_shower_shape", "ms_per_shower", "peak_mem_mb", "status"],
    training=["name", "batch", "params", "ms_per_step", "samples_per_s", "peak_mem_mb", "status"],
    memory=["name", "n", "float32_gb", "baseline_gb", "peak_gb", "peak_over_float32", "excess_over_float32",
            "overhead_gb", "seconds"])


def table(title, rows, cols):
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    print(f"\n== {title}")
    for line in cells:
        print("  ".join(s.rjust(w) for s, w in zip(line, widths)))


def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device)
    args = resolve(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # as vae.py: fixed shapes, let cuDNN pick its 3-D convolutions
    common.seed_everything(args.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    res = {"meta": dict(device=str(device), device_name=name, torch=torch.__version__, threads=torch.get_num_threads(),
                        cpus=os.cpu_count(), load_average=os.getloadavg(), quick=args.quick, config=vars(args),
                        started=time.strftime("%Y-%m-%d %H:%M:%S"), seconds={})}
    print(f"bench on {device} ({name}), {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"sections: {' '.join(args.sections)}")
    for section in [s for s in SECTIONS if s in args.sections]:
        start = time.time()
        res[section] = BENCH[section](args, device, res)
        res["meta"]["seconds"][section] = time.time() - start
        table(f"{section} ({time.time() - start:.0f} s)", res[section], COLUMNS[section])
        Path(args.out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
