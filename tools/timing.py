"""Timing of the CaloDREAM chain in the CaloChallenge protocol, and training throughput (paper App. A.3; SPEC 4).

    python tools/timing.py                                   # cuda if present: DS2 + DS3, ViT + laViT, every setting
    python tools/timing.py --ds 2 --chains vit --settings paper bespoke8 --batch-sizes 100
    python tools/timing.py --sections training --compile     # training throughput with torch.compile (CUDA)
    nice -n 10 OMP_NUM_THREADS=1 python tools/timing.py --device cpu --ds 2 --settings fast --sections chain
Each run writes --out/timing-<time>.json (every row, the machine and its load, the command) and timing-<time>.md
(the tables for docs/RESULTS.md), both rewritten after every row, so a killed run keeps what it measured.

chain: ms per shower of E_inc -> u -> showers in a CaloChallenge file, for N = max(batch, --min-showers) showers
  in batches of `batch`, the way `energy.py --sample` and then `shape_vit.py --sample` (or `latent_vit.py --sample`
  and `vae.py --decode`) run them: energy.sample_u on all N energies (its own batching; on CUDA one graph capture
  per layer ODE and call, as in the script), then the shape network batch by batch (the VAE decodes in chunks of
  1000, as vae.py --decode), the showers streamed into a CaloChallenge file with common.ShowerWriter.
  - The stages run in this process (imported, through their public functions): a subprocess per measurement would
    add the interpreter, the imports, CUDA start-up and checkpoint loading, which swamp a batch-1 figure. The
    hand-over files between the stages (condition file, latent file) are not written.
  - ms_per_shower (generation, to set beside the CaloChallenge tables' ms per shower): from E_inc in memory to the
    showers as float64 MeV on the host, i.e. energy + shape network (+ VAE decoder), host transfers and the inverse
    preprocessing included. Not included, reported apart: model loading (load_s, once per dataset and chain) and
    writing the file (ms_per_shower_write: float64, gzip, as the official files); ms_per_shower_with_write adds it.
  - Settings (--settings): a name of SETTINGS or ENERGY/SHAPE as SOLVER-STEPS (rk4-5/euler-8, rk4-50/bespoke-8);
    the energy network always runs with its key/value cache. NFE: network evaluations per shower. --precision
    applies to the shape networks; the energy network and the VAE sample in float32, as their scripts do.
  - Warm-up: one untimed call at the same batch with 1-step solvers (allocations, lazy initialisation, kernels);
    then up to --repeats timed calls (fewer once --budget seconds are spent), the median's parts are reported.
  - Networks: random weights (adaLN-Zero and output weights jittered) in checkpoints of the stages' own formats,
    written to a temporary folder (or --ckpt-dir) and read back with the stages' loaders. The time does not depend on
    the weights (dense networks, fixed step counts); an untrained bespoke solver (Euler with n uniform steps) costs
    what a trained one costs.
training: the body of each stage's training loop (fetch, preprocessing, loss, backward, clipping, AdamW step,
  loss.item()) with that stage's defaults (batch, learning rate, weight decay, clipping; --precision, --compile as
  the stages take them), on random showers in RAM; --train-warmup untimed steps, then --train-steps timed ones.
  FLOPs of forward + backward are counted with torch's FlopCounterMode (attention on the math backend) at batch 2
  and scaled to the batch (linear in the batch); fraction_of_peak divides the achieved FLOP/s by the dense matmul
  peak measured on this device in the same run (fp32: TF32 on CUDA, as the stages' fp32; bf16). projected_hours:
  the preset's epochs over 99,000 training showers (DS2 and DS3 files hold 100k, 1 % validation), steps only.
Peak memory (peak_mem_mb): on CUDA torch.cuda.max_memory_allocated of the row; on the CPU the process's peak RSS
(VmHWM, reset per row through /proc/self/clear_refs), which includes the interpreter and the loaded networks.
"""
import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import energy
import latent_vit
import shape_vit
import vae

L = common.N_LAYERS
# name: (energy solver, steps per layer, shape solver, steps); the shape 'bespoke' solver has its own n steps
SETTINGS = {"submission": ("rk4", 50, "rk4", 50),  # the CaloChallenge submission (shape step 0.02)
            "paper": ("rk4", 50, "rk4", 20),  # paper Sec. 3.2
            "fast": ("rk4", 5, "rk4", 20),  # RK4 5 per layer scores as RK4 50 (docs/RESULTS.md)
            "bespoke8": ("rk4", 5, "bespoke", 8), "bespoke16": ("rk4", 5, "bespoke", 16)}
# network sizes: the energy preset, the shape presets of shape_vit.py / latent_vit.py (+ overrides), VAE width
SIZES = {"paper": dict(energy="paper", shape="paper", vae_channels=64),
         "small": dict(energy="paper", shape="small", vae_channels=16),
         "tiny": dict(energy="tiny", shape="small", vae_channels=2, vit=dict(dim=12, heads=2, mlp=24, depth=1))}
KINDS = ("energy", "vit", "vae", "lavit")  # training jobs: the four paper presets
ESTIMATE_FROM = 100  # --max-row-seconds: estimates from batches this large (smaller ones are launch-bound on CUDA)
TRAIN_SHOWERS = 99_000  # of the 100k showers of the DS2 / DS3 training files, 1 % validation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    p.add_argument("--sections", nargs="+", default=["chain", "training"], choices=("chain", "training"))
    p.add_argument("--ds", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    p.add_argument("--size", default="paper", choices=sorted(SIZES), help="network sizes (tiny: tests only)")
    p.add_argument("--chains", nargs="+", default=["vit", "lavit"], choices=("vit", "lavit"))
    p.add_argument("--settings", nargs="+", help="sampler settings (CUDA: all of SETTINGS; CPU: fast)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="chain batches (CUDA 1 100 10000; CPU 1 100)")
    p.add_argument("--min-showers", type=int, help="showers per measurement at least (CUDA 10, CPU 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row at most (median)")
    p.add_argument("--budget", type=float, default=30.0, help="no further repeat once a row spent this many s")
    p.add_argument("--max-row-seconds", type=float, help="skip a row whose estimate (time per shower of the "
                   "same chain and setting at a batch >= 100, times the showers) exceeds this")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "bf16"),
                   help="shape networks (sampling) and training; several: one row each")
    p.add_argument("--train", nargs="+", default=list(KINDS), choices=KINDS, help="training jobs")
    p.add_argument("--train-batch", type=int, help="one batch for every training job (default: the stages')")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps per job")
    p.add_argument("--train-warmup", type=int, default=3, help="untimed steps first (--compile: compilation)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained network (CUDA), as --compile")
    p.add_argument("--grad-checkpoint", action="store_true", help="ViT / laViT training as --grad-checkpoint")
    p.add_argument("--peak-n", type=int, help="size of the square matmul of the peak (CUDA 8192, CPU 2048)")
    p.add_argument("--ckpt-dir", help="write the random-weight run folders here and keep them (default: temporary)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/timing", help="folder of timing-<time>.json and .md")
    args = p.parse_args(argv)
    for k in ("repeats", "train_steps", "min_showers", "peak_n", "train_batch", "threads"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if min(args.batch_sizes or [1]) < 1 or args.train_warmup < 0:
        raise ValueError("--batch-sizes must be >= 1 and --train-warmup >= 0")
    for s in args.settings or []:
        parse_setting(s)
    return args


def resolve(args, device):
    cuda = device.type == "cuda"
    for key, value in dict(settings=list(SETTINGS) if cuda else ["fast"], peak_n=8192 if cuda else 2048,
                           batch_sizes=[1, 100, 10000] if cuda else [1, 100], min_showers=10 if cuda else 1).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    e_solver: str
    e_steps: int
    s_solver: str
    s_steps: int

    energy = property(lambda self: f"{self.e_solver}-{self.e_steps}")
    shape = property(lambda self: f"{self.s_solver}-{self.s_steps}")
    nfe_energy = property(lambda self: L * self.e_steps * common.NFE_PER_STEP[self.e_solver])  # head evaluations
    nfe_shape = property(lambda self: self.s_steps * common.NFE_PER_STEP.get(self.s_solver, 1))


def parse_setting(text):
    """A name of SETTINGS, or 'ENERGY/SHAPE' with each part SOLVER-STEPS (the energy solver not bespoke)."""
    if text in SETTINGS:
        return Setting(text, *SETTINGS[text])
    try:
        (es, en), (ss, sn) = (part.rsplit("-", 1) for part in text.split("/"))
        setting = Setting(text, es, int(en), ss, int(sn))
    except ValueError:
        raise ValueError(f"--settings {text!r}: a name ({', '.join(SETTINGS)}) or ENERGY/SHAPE as SOLVER-STEPS, "
                         f"e.g. rk4-5/euler-8") from None
    if es not in common.NFE_PER_STEP or ss not in (*common.NFE_PER_STEP, "bespoke") or min(int(en), int(sn)) < 1:
        raise ValueError(f"--settings {text!r}: solvers {sorted(common.NFE_PER_STEP)} (shape also bespoke), "
                         f"steps >= 1")
    if ss == "bespoke" and int(sn) < 2:
        raise ValueError(f"--settings {text!r}: a bespoke solver needs at least 2 steps")
    return setting


# ----------------------------------------------------------------------------- random-weight checkpoints
def unit(shape):
    """Identity standardisation statistics."""
    return {"mean": torch.zeros(shape), "std": torch.ones(shape)}


def jitter(model, std=0.02, seed=0):
    """Noise in the zero-initialised (adaLN-Zero, output) weights, so that no layer multiplies zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def stage_args(kind, ds, size="paper"):
    """The training flags a stage resolves for this size: its own parser and presets (a Namespace)."""
    s = SIZES[size]
    if kind == "energy":
        a = energy.parse_args(["--ds", str(ds), "--preset", s["energy"]])
        a.batch_size = a.batch_size or 4096  # energy.train's default
    elif kind == "vae":
        a = vae.parse_args(["--ds", str(ds), "--channels", str(s["vae_channels"])])
    else:
        stage = shape_vit if kind == "vit" else latent_vit
        a = stage.resolve(stage.parse_args(["--ds", str(ds), "--preset", s["shape"]]))
        for k, v in s.get("vit", {}).items():
            setattr(a, k, v)
    return a


def vit_model_args(kind, ds, size="paper"):
    """model_args of a shape_vit ('vit') or latent_vit ('lavit') network, as their train() builds them."""
    a = stage_args(kind, ds, size)
    grid = (1, *common.geometry(ds).shape) if kind == "vit" else vae.PRESETS[ds]["latent"]
    return dataclasses.asdict(common.ViTConfig(in_shape=grid, patch=a.patch, dim=a.dim, heads=a.heads, mlp=a.mlp,
                                               depth=a.depth))


def make_checkpoints(folder, ds, size="paper", bespoke_steps=(), kinds=KINDS):
    """Random-weight runs of the stages of dataset ds, in the formats the stages write (a run folder holding
    ckpt.pt, so the stages' --ckpt takes them too): {"energy", "vit", "vae", "lavit", ("bespoke", n): folder}
    for the `kinds` (the laViT needs the VAE, a bespoke solver the ViT)."""
    folder, s, lat = Path(folder), SIZES[size], vae.PRESETS[ds]["latent"]
    kinds = set(kinds) | ({"vae"} if "lavit" in kinds else set()) | ({"vit"} if bespoke_steps else set())
    torch.manual_seed(ds)
    runs = {}

    def save(key, script, **state):
        runs[key] = folder / (f"{script}-ds{ds}" + ("" if isinstance(key, str) else f"-n{key[1]}"))
        runs[key].mkdir(parents=True, exist_ok=True)
        common.save_checkpoint(runs[key] / "ckpt.pt", script=script, ds=ds, config={"size": size}, epoch=0, step=0,
                               history={"train_loss": [], "val_loss": []}, nonfinite=0, **state)
    e_args, v_args = energy.PRESETS[s["energy"]], vae.model_args_for(ds, s["vae_channels"])
    if "energy" in kinds:
        save("energy", "energy", model_args=e_args, model=jitter(common.EnergyNet(**e_args)).state_dict(),
             stats=unit(L))
    if "vae" in kinds:
        save("vae", "vae", model_args=v_args, model=jitter(vae.VAE(**v_args)).state_dict(), stats={"cond": unit(L)},
             cut=None, cut_info=None)
    for kind, script in [k for k in (("vit", "shape_vit"), ("lavit", "latent_vit")) if k[0] in kinds]:
        args = vit_model_args(kind, ds, size)
        stats = {"cond": unit(L), **({"vox": unit(common.geometry(ds).shape)} if kind == "vit" else
                                     {"latent": unit(lat)})}
        extra = {} if kind == "vit" else dict(vae_ckpt=str(runs["vae"]), vae_step=0)
        save(kind, script, model_args=args, model=jitter(common.ViT(common.ViTConfig(**args))).state_dict(),
             stats=stats, **extra)
    for n in sorted(set(bespoke_steps)):
        save(("bespoke", n), "bespoke", n=n, loss="local", solver=common.BespokeSolver(n).state_dict(),
             shape_ckpt=str(runs["vit"]))
    return runs


# ----------------------------------------------------------------------------- clocks and memory
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device):
    """lap() -> wall seconds since the previous lap (the device synchronised); lap.cpu: this process's CPU seconds
    of the same interval (all threads; on a shared machine less inflated by other jobs than the wall time)."""
    last = [time.perf_counter(), time.process_time()]

    def lap():
        sync(device)
        now = [time.perf_counter(), time.process_time()]
        (dt, lap.cpu), last[:] = (b - a for a, b in zip(last, now)), now
        return dt
    return lap


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets VmHWM, the process's peak resident set
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb(device):
    """CUDA: max allocated since reset_peak; CPU: the process's peak RSS since reset_peak (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def out_of_memory(err):
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "not enough memory" in str(err)


def out_of_memory_row(err, row, device):
    """The row of a measurement that ran out of memory (the device's cache emptied); any other error is raised."""
    if not out_of_memory(err):
        raise err
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(row, status="out of memory")


def matmul_peak(device, precision, n):
    """Dense matmul FLOP/s of an n x n x n product on this device: fp32 (TF32 on CUDA, as the stages' fp32
    precision sets it) or bf16; the best of 3 timings of k products, k doubled until one timing takes 0.1 s."""
    common.autocast(device, "fp32")  # allows TF32 on CUDA
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    lap, k = clock(device), 1
    a @ b
    lap()
    while True:  # k products per measurement, k doubled until one measurement takes 0.1 s
        for _ in range(k):
            a @ b
        dt = lap()
        if dt >= 0.1:
            break
        k *= 2
    for _ in range(2):
        for _ in range(k):
            a @ b
        dt = min(dt, lap())
    return 2 * n ** 3 * k / dt


# ----------------------------------------------------------------------------- the chain
def load_chain(runs, ds, chain, device):
    """The networks of one chain as the stages' samplers load them: ({energy, shape[, vae]}, seconds)."""
    lap = clock(device)
    nets = {"energy": energy.load_model(runs["energy"], ds, device)}
    ckpt = common.load_checkpoint(runs[chain], script="shape_vit" if chain == "vit" else "latent_vit", ds=ds)
    nets["shape"] = common.build_vit(ckpt, device), common.to_device(ckpt["stats"], device)
    if chain == "lavit":
        nets["vae"] = vae.load_vae(runs["vae"], ds, device)
    return nets, lap()


@torch.no_grad()
def vae_decode(nets, z, e_inc, u, device, chunk=1000):
    """vae.py --decode on latents in memory (chunks of 1000 as there): decoder, the normalised cut, showers (CPU)."""
    model, ckpt = nets["vae"]
    cond_stats, (cut, exponent), out = common.to_device(ckpt["stats"]["cond"], device), vae.cut_of(ckpt), []
    for s in range(0, len(z), chunk):
        e, uu = e_inc[s:s + chunk].to(device), u[s:s + chunk].to(device)
        frac = model.decode(z[s:s + chunk].to(device), common.shape_condition(e, uu, cond_stats))
        out.append(vae.decoded_to_showers(frac, common.u_to_energies(e, uu), cut, exponent).cpu())
    return torch.cat(out)


def run_chain(nets, chain, ds, e_inc, setting, solve, batch, path, device, precision="fp32", seed=0):
    """E_inc (N,) -> u -> showers in batches of `batch` -> the CaloChallenge file `path`; seconds of each part."""
    (e_model, e_ckpt), (model, stats) = nets["energy"], nets["shape"]
    secs, lap = dict(energy=0.0, shape=0.0, decode=0.0, write=0.0, cpu=0.0), clock(device)
    u = energy.sample_u(e_model, e_ckpt["stats"], e_inc, device, setting.e_solver, setting.e_steps, batch,
                        seed=seed, progress=False)
    secs["energy"], secs["cpu"] = lap(), lap.cpu
    gen = torch.Generator(device).manual_seed(seed)
    with common.ShowerWriter(path, len(e_inc), ds, overwrite=True) as w:
        for s in range(0, len(e_inc), batch):
            e, uu = e_inc[s:s + batch], u[s:s + batch]
            if chain == "vit":
                showers = shape_vit.generate(model, stats, e, uu, ds, solve, gen, precision)
                secs["shape"] += lap()
            else:
                z = latent_vit.generate(model, stats, e, uu, solve, gen, precision)
                secs["shape"] += lap()
                secs["cpu"] += lap.cpu
                showers = vae_decode(nets, z, e, uu, device)
                secs["decode"] += lap()
            secs["cpu"] += lap.cpu
            w.write(e, showers)
            secs["write"] += lap()
    secs["write"] += lap()  # closing the file: the rename
    return secs


def chain_row(nets, chain, ds, setting, batch, precision, runs, args, device, path):
    """One row: warm-up, then up to --repeats timed runs of the chain on N = max(batch, --min-showers) showers."""
    n = max(batch, args.min_showers)
    e_inc = common.sample_e_inc(n, torch.Generator().manual_seed(args.seed))
    bespoke = runs.get(("bespoke", setting.s_steps)) if setting.s_solver == "bespoke" else None
    solve = common.make_solver(setting.s_solver, setting.s_steps, bespoke, ds)[0]
    warm = dataclasses.replace(setting, e_steps=1)
    row = dict(ds=ds, chain=chain, setting=setting.name, energy=setting.energy, shape=setting.shape,
               nfe_energy=setting.nfe_energy, nfe_shape=setting.nfe_shape, precision=precision, batch=batch,
               showers=n)
    reset_peak(device)
    try:
        run_chain(nets, chain, ds, e_inc[:batch], warm, common.make_solver("euler", 1)[0], batch, path, device,
                  precision, args.seed)
        runs_, spent = [], 0.0
        while len(runs_) < args.repeats and (not runs_ or spent < args.budget):
            runs_.append(run_chain(nets, chain, ds, e_inc, setting, solve, batch, path, device, precision, args.seed))
            spent += sum(v for k, v in runs_[-1].items() if k != "cpu")
    except (RuntimeError, MemoryError) as err:
        return out_of_memory_row(err, row, device)
    finally:
        path.unlink(missing_ok=True)
    gen_s = [r["energy"] + r["shape"] + r["decode"] for r in runs_]
    med = runs_[sorted(range(len(runs_)), key=gen_s.__getitem__)[(len(runs_) - 1) // 2]]  # the median run
    ms = {k: 1e3 * v / n for k, v in med.items() if k != "cpu"}
    row.update(repeats=len(runs_), ms_per_shower_energy=ms["energy"], ms_per_shower_shape=ms["shape"],
               ms_per_shower_decode=ms["decode"] if chain == "lavit" else None,
               ms_per_shower=ms["energy"] + ms["shape"] + ms["decode"], ms_per_shower_write=ms["write"],
               ms_per_shower_with_write=sum(ms.values()), ms_per_shower_min=1e3 * min(gen_s) / n,
               ms_per_shower_max=1e3 * max(gen_s) / n, cpu_ms_per_shower=1e3 * med["cpu"] / n,
               peak_mem_mb=peak_mb(device), status="ok")
    return row


def chain_section(args, device, runs, res, save):
    """Every (ds, chain, precision, setting, batch) row; a row estimated over --max-row-seconds is skipped."""
    rows = res.setdefault("chain", [])
    settings = [parse_setting(s) for s in args.settings]
    for ds in args.ds:
        for chain in args.chains:
            nets, load_s = load_chain(runs[ds], ds, chain, device)
            for precision in args.precision:
                for setting in settings:
                    prev = None  # the last measured row of this setting (its time per shower: the estimate)
                    for batch in sorted(args.batch_sizes):
                        n = max(batch, args.min_showers)
                        base = dict(ds=ds, chain=chain, setting=setting.name, energy=setting.energy,
                                    shape=setting.shape, precision=precision, batch=batch, showers=n)
                        estimate = prev and prev["batch"] >= ESTIMATE_FROM and prev.get(
                            "ms_per_shower_with_write", 0) * n / 1e3
                        if prev and prev["status"] != "ok":
                            row = dict(base, status="skipped: out of memory at a smaller batch")
                        elif estimate and args.max_row_seconds and estimate > args.max_row_seconds:
                            row = dict(base, status=f"skipped: estimated {estimate:.0f} s")
                        else:
                            row = chain_row(nets, chain, ds, setting, batch, precision, runs[ds], args, device,
                                            Path(res["tmp"]) / f"gen_ds{ds}.hdf5")
                            row["load_s"], prev = load_s, row
                        rows.append(row)
                        print(row_line(row), flush=True)
                        save()
            del nets
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def row_line(row):
    keys = ("name", "ds", "chain", "setting", "precision", "batch", "ms_per_shower", "ms_per_shower_with_write",
            "showers_per_s", "fraction_of_peak", "peak_mem_mb", "status")
    return "  ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row[k]}" for k in keys
                     if row.get(k) is not None)


# ----------------------------------------------------------------------------- training throughput
def raw_showers(rng, n, ds):
    """Random raw showers as the stages hold them in RAM: float32 MeV, about 70 % empty voxels."""
    n_vox = common.geometry(ds).n_vox
    return (rng.random((n, n_vox), dtype=np.float32) * (rng.random((n, n_vox)) < 0.3)).astype(np.float32)


def training_job(kind, ds, runs, device, args, precision):
    """(model, loss(net, rows), rows, the stage's flags): one stage's training-loop body on random data in RAM."""
    a, rng = stage_args(kind, ds, args.size), np.random.default_rng(args.seed)
    b = args.train_batch or a.batch_size
    ckpt = common.load_checkpoint(runs[kind])
    gen = torch.Generator(device).manual_seed(args.seed)
    e_inc = common.sample_e_inc(b, torch.Generator().manual_seed(args.seed)).numpy()
    stats = common.to_device(ckpt["stats"], device)
    rows = np.arange(b)
    if kind == "energy":  # energy.train: the u's in network space and c_E on the device, rows a device tensor
        model, rows = common.EnergyNet(**ckpt["model_args"]), torch.arange(b, device=device)
        z, c_e = torch.randn(b, L, device=device), common.energy_condition(torch.from_numpy(e_inc)).float().to(device)

        def loss(net, r):
            x0, t = (f((len(r), L), generator=gen, device=device) for f in (torch.randn, torch.rand))
            with common.autocast(device, precision):
                return energy.cfm_loss(net, z[r], c_e[r], x0, t)
    elif kind == "vae":
        model, showers = vae.VAE(**ckpt["model_args"]), raw_showers(rng, b, ds)

        def loss(net, r):
            frac, cond, _, _ = vae.batch_inputs(e_inc.astype(np.float32)[r], showers[r], ds, stats["cond"], device)
            return vae.vae_loss(net, frac, cond, a.beta, gen)[0]
    elif kind == "vit":
        model, showers = common.ViT(common.ViTConfig(**ckpt["model_args"])), raw_showers(rng, b, ds)

        def loss(net, r):
            x, e = shape_vit.fetch(showers, e_inc.astype(np.float32), r, device)
            return shape_vit.batch_loss(net, x, e, stats, ds, gen, precision)
    else:  # latent_vit.train: the posteriors of a latent file (float32), E_inc and u's (float64)
        model = common.ViT(common.ViTConfig(**ckpt["model_args"]))
        lat = model.cfg.in_shape
        data = dict(mu=rng.standard_normal((b, *lat), dtype=np.float32), logvar=np.full((b, *lat), -6, np.float32),
                    incident_energies=e_inc, u=rng.uniform(0.05, 0.95, (b, L)))

        def loss(net, r):
            return latent_vit.batch_loss(net, *latent_vit.fetch(data, r, device), stats, gen, precision)
    model.load_state_dict(ckpt["model"])
    return model.to(device).train(), loss, rows, a


def count_flops(model, loss, rows):
    """FLOPs of forward + backward of loss on `rows` (attention on the math backend, so that it is counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss(model, rows).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def train_row(kind, ds, runs, device, args, precision, peak, tmp):
    """Throughput of one training job: warm-up steps, then --train-steps timed steps (synchronised at the end)."""
    model, loss, rows, a = training_job(kind, ds, runs, device, args, precision)
    b = len(rows)
    row = dict(name=kind, ds=ds, batch=b, params=common.count_parameters(model), precision=precision,
               compile=args.compile, epochs=a.epochs)
    b0 = min(b, 2)
    flops = count_flops(model, loss, rows[:b0]) * b / b0
    model.grad_checkpoint = args.grad_checkpoint and kind in ("vit", "lavit")
    net = common.wrap_model(model, device, 1, args.compile)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    counts = {"nonfinite": 0}

    def step():  # the loop body of the stages' train()
        value = loss(net, rows)
        if common.optimizer_step(model, value, opt, counts, tmp, a.clip_grad):
            value.item()
    reset_peak(device)
    try:
        for _ in range(args.train_warmup):
            step()
        lap = clock(device)
        for _ in range(args.train_steps):
            step()
        seconds = lap() / args.train_steps
    except (RuntimeError, MemoryError) as err:
        return out_of_memory_row(err, row, device)
    rate = b / seconds
    return dict(row, ms_per_step=1e3 * seconds, showers_per_s=rate, gflop_per_step=flops / 1e9,
                tflops=flops / seconds / 1e12, fraction_of_peak=flops / seconds / peak,
                projected_hours=a.epochs * TRAIN_SHOWERS / rate / 3600, peak_mem_mb=peak_mb(device),
                nonfinite=counts["nonfinite"], status="ok")


def training_section(args, device, runs, res, save):
    """The matmul peaks, then every (job, ds, precision) row (the energy network once: it is the same for both)."""
    needed = sorted(set(args.precision) | ({"fp32"} if "vae" in args.train else set()))
    res["peak"] = [dict(precision=p, n=args.peak_n, tflops=matmul_peak(device, p, args.peak_n) / 1e12) for p in needed]
    peaks = {r["precision"]: r["tflops"] * 1e12 for r in res["peak"]}
    rows = res.setdefault("training", [])
    for kind in args.train:
        for ds in args.ds[:1] if kind == "energy" else args.ds:
            for precision in ["fp32"] if kind == "vae" else args.precision:  # vae.py runs in float32 only
                benchmark = torch.backends.cudnn.benchmark
                torch.backends.cudnn.benchmark = benchmark or kind == "vae"  # as vae.py's train()
                try:
                    rows.append(train_row(kind, ds, runs[ds], device, args, precision, peaks[precision], res["tmp"]))
                finally:
                    torch.backends.cudnn.benchmark = benchmark
                print(row_line(rows[-1]), flush=True)
                save()
    return rows


# ----------------------------------------------------------------------------- output
def fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v)


def markdown(res):
    """The tables for docs/RESULTS.md, headed by the device, the date, the commit, the load and the command."""
    m = res["meta"]
    lines = [f"Measured {m['started']} on {m['device_name']} ({m['device']}; torch {m['torch']}, {m['threads']} "
             f"threads, {m['cpus']} CPUs, load average {m['load_average'][0]:.2f} at the start), commit "
             f"{m['commit']}; random weights, {m['size']} network sizes:", "", f"`{m['command']}`", ""]
    if res.get("chain"):
        lines += ["ms per shower (generation: energy + shape network (+ VAE decoder), E_inc in memory to float64 "
                  "showers on the host; 'with write' adds the CaloChallenge file; loading excluded; CPU ms: the "
                  "process's CPU time of the generation):", "",
                  "| DS | chain | energy | shape | NFE energy / shape | precision | batch | showers | energy | shape "
                  "| VAE decoder | generation | with write | CPU ms | peak MiB | status |", "|" + "---|" * 16]
        for r in res["chain"]:
            lines.append("| " + " | ".join(fmt(r.get(k)) for k in (
                "ds", "chain", "energy", "shape")) + f" | {fmt(r.get('nfe_energy'))} / {fmt(r.get('nfe_shape'))} | "
                + " | ".join(fmt(r.get(k)) for k in ("precision", "batch", "showers", "ms_per_shower_energy",
                                                     "ms_per_shower_shape", "ms_per_shower_decode", "ms_per_shower",
                                                     "ms_per_shower_with_write", "cpu_ms_per_shower", "peak_mem_mb",
                                                     "status")) + " |")
        lines.append("")
    if res.get("training"):
        peaks = ", ".join(f"{p['precision']} {p['tflops']:.3g} TFLOP/s (n = {p['n']})" for p in res["peak"])
        lines += [f"Training throughput (one stage's loop body; dense matmul peak measured in this run: {peaks}; "
                  f"projection: the preset's epochs over {TRAIN_SHOWERS:,} showers):", "",
                  "| network | DS | batch | parameters | precision | compile | ms per step | showers/s | TFLOP/s "
                  "| of peak | epochs | projected h | peak MiB | status |", "|" + "---|" * 14]
        for r in res["training"]:
            frac = r.get("fraction_of_peak")
            lines.append("| " + " | ".join(fmt(r.get(k)) for k in (
                "name", "ds", "batch", "params", "precision", "compile", "ms_per_step", "showers_per_s", "tflops"))
                + f" | {'' if frac is None else f'{100 * frac:.1f} %'} | "
                + " | ".join(fmt(r.get(k)) for k in ("epochs", "projected_hours", "peak_mem_mb", "status")) + " |")
        lines.append("")
    return "\n".join(lines)


def machine(args, device, argv):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(device=str(device), device_name=name, torch=torch.__version__, cuda=torch.version.cuda,
                threads=torch.get_num_threads(), cpus=os.cpu_count(), load_average=os.getloadavg(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"), commit=commit, size=args.size,
                command=" ".join(["python tools/timing.py", *(sys.argv[1:] if argv is None else map(str, argv))]),
                started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), config=vars(args), seconds={})


def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device)
    args = resolve(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"timing-{time.strftime('%Y%m%d-%H%M%S')}"
    res = {"meta": machine(args, device, argv)}
    print(f"timing on {device} ({res['meta']['device_name']}), {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}; sections {' '.join(args.sections)}; writing {stem}.json / .md", flush=True)

    def save():
        clean = {k: v for k, v in res.items() if k != "tmp"}
        common.atomic_write(f"{stem}.json", lambda t: Path(t).write_text(json.dumps(clean, indent=1, default=str)))
        common.atomic_write(f"{stem}.md", lambda t: Path(t).write_text(markdown(res) + "\n"))
    with tempfile.TemporaryDirectory() as tmp:
        res["tmp"] = tmp
        bespoke_n = [s.s_steps for s in map(parse_setting, args.settings) if s.s_solver == "bespoke"]
        folder = Path(args.ckpt_dir or tmp)
        runs = {ds: make_checkpoints(folder, ds, args.size, bespoke_n) for ds in args.ds}
        for name, section in (("chain", chain_section), ("training", training_section)):
            if name in args.sections:
                start = time.time()
                section(args, device, runs, res, save)
                res["meta"]["seconds"][name] = time.time() - start
        res.pop("tmp")
        save()
    print(markdown(res))
    print(f"wrote {stem}.json and {stem}.md")
    return res, Path(f"{stem}.json")


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
