"""Micro-benchmark of the CaloDREAM networks (paper App. A.3, Table 6; SPEC 2.2-2.5, 4): forward passes, FLOPs,
the energy sampler's key/value cache, the memory of loading DS3. The whole chain in the CaloChallenge protocol
(ms per shower at batch 1 / 100 / 10000) and training throughput are tools/timing.py.

Every network has random weights, in a checkpoint of its stage's format (tools/timing.py make_checkpoints), and is
read back with the stage's loader (energy.load_model, common.build_vit, vae.load_vae); nothing is trained.
    python tools/bench.py                                   # everything, on cuda if present
    python tools/bench.py --quick --device cpu              # 2 CPU cores: a few minutes (batch 10)
    python tools/bench.py --sections energy --kv-steps 50   # KV cache vs re-running the prefix; sampler vs heads
    python tools/bench.py --sections memory --memory-n 20000   # peak RSS of loading a synthetic DS3 file
Sections (--sections, default all) print a table each and rewrite --out (bench.json, a list of rows each):
  forward   one forward pass per network at --forward-batch (100): energy head (and whole energy net),
            ViT and laViT DS2/DS3, VAE (encoder + decoder, and decoder alone) DS2/DS3
  flops     achieved FLOP/s of the ViT/laViT forwards against this device's dense-matmul peak, measured now
  energy    energy sampler at --kv-batch (1000): KV cache vs none (time, max |u difference|); the sampler
            vs its head evaluations alone (target: within 1.2x)
  memory    peak RSS of common.load_showers on a synthetic DS3 file, in a clean subprocess
Timings: median of up to --repeats calls after a warm-up (at most --budget seconds each); CUDA synchronised,
bf16 autocast where the scripts use it. Peak memory: torch.cuda.max_memory_allocated per row on CUDA, the
process's peak RSS (it only grows) on CPU. Measured numbers: docs/RESULTS.md.
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

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import energy
import timing
import vae as vae_lib

HERE = Path(__file__).resolve().parents[1]
SECTIONS = ("forward", "flops", "energy", "memory")
PAPER_MS = {"energy_head": 0.37, "vit_ds2": 17, "vit_ds3": 84, "lavit_ds2": 31, "lavit_ds3": 63}  # H100, batch 100
L = common.N_LAYERS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="shorter budget; on the CPU batch 10 and 3 energy steps")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--out", default="bench.json", help="JSON output (rewritten after every section)")
    p.add_argument("--ds", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    p.add_argument("--budget", type=float, help="seconds after which repeating stops (10; --quick 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forward-batch", type=int, help="batch of forward and flops (100; CPU --quick 10)")
    p.add_argument("--kv-batch", type=int, default=1000, help="batch of the energy section")
    p.add_argument("--kv-solver", default="rk4", choices=sorted(common.NFE_PER_STEP))
    p.add_argument("--kv-steps", type=int, help="ODE steps of the energy section (50; CPU --quick 3)")
    p.add_argument("--memory-n", type=int, default=20000, help="synthetic DS3 showers of the memory section")
    return p.parse_args(argv)


def resolve(args, device):
    small = args.quick and device.type == "cpu"
    defaults = dict(budget=3.0 if args.quick else 10.0, forward_batch=10 if small else 100, kv_steps=3 if small else 50)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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


# ----------------------------------------------------------------------------- networks from random-weight checkpoints
@functools.lru_cache(maxsize=None)
def networks(ds, device):
    """The paper-size networks of dataset ds from random-weight checkpoints in the stages' formats, read back with
    the stages' loaders: {"energy": (EnergyNet, checkpoint), "vit", "lavit": ViT, "vae": VAE}, all in eval mode."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = timing.make_checkpoints(tmp, ds, "paper")
        return {"energy": energy.load_model(runs["energy"], ds, device),
                "vit": common.build_vit(common.load_checkpoint(runs["vit"], script="shape_vit", ds=ds), device),
                "lavit": common.build_vit(common.load_checkpoint(runs["lavit"], script="latent_vit", ds=ds), device),
                "vae": vae_lib.load_vae(runs["vae"], ds, device)[0]}  # float32 as vae.py runs it: no autocast


def vit_inputs(model, batch, device):
    return (torch.randn(batch, *model.cfg.in_shape, device=device), torch.rand(batch, device=device),
            torch.randn(batch, model.cfg.cond_dim, device=device))


def used_parameters(module, fn):
    """Parameters of module that fn() (a tensor) depends on: those that receive a gradient."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(fn().float().sum(), params, allow_unused=True)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    return sum(p.numel() for p, g in zip(params, grads) if g is not None)


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
    return sum(p.numel() for m in modules for p in m.parameters())  # the loaders freeze them: count all


def vit_call(m, batch, device):
    return in_context(functools.partial(m, *vit_inputs(m, batch, device)), device, amp=True)


def bench_forward(args, device, res):
    rand, bs, rows = functools.partial(torch.randn, device=device), args.forward_batch, []
    net = networks(args.ds[0], device)["energy"][0]  # the energy network is the same for both datasets
    head = lambda x: net.head(net.head_in(x))  # noqa: E731  the CFM head on [x_t, t-emb, z_i] (129)
    unif = functools.partial(torch.rand, device=device)
    items = {"energy_head": (n_params(net.head_in, net.head), False, lambda b: (head, rand(b, 129))),
             "energy_net": (n_params(net), True, lambda b: (net, rand(b, L), unif(b), rand(b, L), unif(b, L)))}
    for ds in args.ds:
        nets = networks(ds, device)
        for kind in ("vit", "lavit"):
            m = nets[kind]
            items[f"{kind}_ds{ds}"] = (n_params(m), True, lambda b, m=m: (m, *vit_inputs(m, b, device)))
        v, grid = nets["vae"], common.geometry(ds).shape
        items[f"vae_ds{ds}"] = (n_params(v), False, lambda b, v=v, grid=grid: (
            v, unif(b, 1, *grid), rand(b, 1 + L), rand(b, *v.latent_shape)))
        decoder = (lambda b, v=v: (v.decode, rand(b, *v.latent_shape), rand(b, 1 + L)))
        items[f"vae_decoder_ds{ds}"] = (used_parameters(v, lambda d=decoder: d(1)[0](*d(1)[1:])), False, decoder)
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
    for name, m in ((f"{kind}_ds{ds}", networks(ds, device)[kind]) for ds in args.ds for kind in ("vit", "lavit")):
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
    bs, solver, steps = args.kv_batch, args.kv_solver, args.kv_steps
    net, ckpt = networks(args.ds[0], device)["energy"]  # the energy network is the same for both datasets
    nfe = steps * common.NFE_PER_STEP[solver]
    e_inc = common.sample_e_inc(bs, torch.Generator().manual_seed(args.seed))
    c_e = common.energy_condition(e_inc).float().to(device)
    u = {}  # the last output of each sampler

    def sample(cache):
        u[cache] = energy.sample_u(net, ckpt["stats"], e_inc, device, solver, steps, 10 ** 9, cache, progress=False)

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


BENCH = dict(forward=bench_forward, flops=bench_flops, energy=bench_energy, memory=bench_memory)
COLUMNS = dict(
    forward=["name", "batch", "params", "precision", "ms", "ms_per_sample", "paper_ms_h100", "peak_mem_mb"],
    flops=["name", "batch", "gflop", "gflop_counted", "ms", "tflops", "fraction_of_peak"],
    energy=["name", "batch", "solver", "steps", "head_evals", "ms", "ms_per_event", "speedup", "max_abs_diff",
            "sampler_over_heads", "ode_over_heads"],
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
