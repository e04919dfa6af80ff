"""Precision study: bf16 autocast against float32 for training and for sampling, at equal steps and seeds, on one
pair of CaloChallenge files (the toy showers on a CPU), over several seeds so that the spread is known.

    python data/prepare.py toy --ds 2 --n 6000 --n-ref 3000 --out /tmp/prec/data
    python tools/precision_study.py --train /tmp/prec/data/toy_ds2_train.hdf5 --ref /tmp/prec/data/toy_ds2_ref.hdf5 \
        --parts shape energy --seeds 0 1 2 --out /tmp/prec/study          # hours on 2 CPU cores
    python tools/precision_study.py ... --parts bespoke    # BNS --loss local vs local-mse on the fp32 shape runs

On 2 shared CPU cores the study was run smaller (about an hour in all): --n 300, --shape-flags "--preset small
--epochs 3 --max-showers 1500", --shape-eval-flags "-m hist cls-high --cls-width 256 --cls-epochs 10
--max-showers 300" (fpd: about 150 s per score on a CPU, and meaningless on a few hundred showers), --energy-flags
"--epochs 3 --max-showers 1000", --energy-eval-flags "-m cls-u --cls-width 512 --cls-epochs 30 --max-showers 300",
and for the bespoke part --seeds 0 --bespoke-flags "--preset small --pool 48 --n-val 16 --iters 20" (and 60).

Parts (each one a 2x2 grid: train {fp32, bf16} x sample {fp32, bf16}, per seed):
  shape    shape_vit.py trained with --shape-flags (the demo's small ViT, 10 epochs), then --sample with the true
           E_inc and u's of --ref at both precisions from the same x0, scored by evaluate.py (--shape-eval-flags)
  energy   energy.py trained with --energy-flags (the demo's), then --sample --like --ref at both precisions from
           the same x0, scored with evaluate.py -m cls-u (--energy-eval-flags)
  bespoke  bespoke.py --loss local local-mse at --bespoke-steps on the fp32 shape run of every seed, conditions
           from --ref: the end-point MSEs against the midpoint-100 reference that bespoke.py logs
Every trained network also gets its validation loss (the training script's own function, same split and draws)
evaluated in fp32 and in bf16. Every step runs as a subprocess and records its CPU seconds (user + sys) in a
JSON file next to its output; a finished step is skipped when the study is run again, so a killed study
continues. Writes study.json and study.md into --out: mean +- standard deviation over the seeds for each cell,
and each cell minus fp32/fp32 paired by seed.
"""
import argparse
import json
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import energy  # noqa: E402
import shape_vit  # noqa: E402

PRECISIONS = ("fp32", "bf16")
SCRIPTS = {"shape": "shape_vit", "energy": "energy"}
FAMILIES = ("etot_einc", "e_layer", "ec_x", "ec_y", "ec_r", "width_x", "width_y", "width_r", "sparsity", "voxel")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="training CaloChallenge file")
    p.add_argument("--ref", required=True, help="reference CaloChallenge file (conditions and scoring)")
    p.add_argument("--ds", type=int, default=2)
    p.add_argument("--parts", nargs="+", default=["shape", "energy"], choices=("shape", "energy", "bespoke"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training, sampling and scoring seeds")
    p.add_argument("--n", type=int, help="conditions sampled per cell (default: all of --ref)")
    p.add_argument("--shape-flags", default="--preset small --epochs 10 --val-every 2 --ckpt-every 5")
    p.add_argument("--energy-flags", default="--epochs 10 --batch-size 64 --lr 1e-3 --val-every 2 --ckpt-every 5")
    p.add_argument("--shape-sample-flags", default="--solver rk4 --steps 8")
    p.add_argument("--energy-sample-flags", default="--solver rk4 --steps 5")
    p.add_argument("--shape-eval-flags", default="-m hist cls-low cls-high fpd --cls-width 256 --cls-epochs 10 "
                   "--cls-repeats 3", help="evaluate.py flags for the showers")
    p.add_argument("--energy-eval-flags", default="-m cls-u --cls-width 512 --cls-epochs 30 --cls-repeats 5",
                   help="evaluate.py flags for the u's (official size: --cls-width 2048 --cls-epochs 50)")
    p.add_argument("--eval-tag", default="", help="suffix of the scoring folders: score the same samples again "
                   "with other --*-eval-flags (finished training and sampling steps are reused)")
    p.add_argument("--bespoke-steps", type=int, nargs="+", default=[8, 16])
    p.add_argument("--bespoke-flags", default="--preset small", help="extra bespoke.py flags")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/precision_study")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    return args


def run(*args):
    res = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"error: {Path(str(args[0])).name} failed: {(res.stderr.strip().splitlines() or [''])[-1]}")
    return res.stdout


def cpu_seconds():
    """User + sys seconds of this process and its finished children (subprocesses or in-process stages)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                          resource.RUSAGE_CHILDREN)))


def step(record, script, *args, clean=None):
    """Run `script args` unless `record` (a JSON file) exists; `clean` (a folder) is removed first, so a step killed
    half-way starts again from nothing. Returns the record: command, CPU and wall seconds."""
    record = Path(record)
    if record.exists():
        return json.loads(record.read_text())
    if clean is not None and Path(clean).exists():
        shutil.rmtree(clean)
    cpu, wall = cpu_seconds(), time.time()
    run(ROOT / script, *args)
    rec = dict(cmd=" ".join(["python", script, *map(str, args)]), cpu_s=cpu_seconds() - cpu, wall_s=time.time() - wall)
    record.parent.mkdir(parents=True, exist_ok=True)
    common.atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(rec, indent=1) + "\n"))
    print(f"{record.parent.name}/{record.stem}: {rec['cpu_s']:.0f} CPU s ({rec['wall_s']:.0f} s wall)", flush=True)
    return rec


def run_dir(folder, part, ds):
    runs = sorted(Path(folder).glob(f"{SCRIPTS[part]}-ds{ds}-*"))
    if len(runs) != 1:
        raise ValueError(f"{folder}: expected one {SCRIPTS[part]} run folder, found {len(runs)}")
    return runs[0]


# ----------------------------------------------------------------------------- validation loss in both precisions
@torch.no_grad()
def validation_losses(part, run, train_file, ds, seed, device):
    """{fp32, bf16}: the run's validation loss (the script's own function, its split and draws) in each precision;
    shape runs also fit_fp32, fit_bf16: the same on the first 300 training showers. (A voxel that is 0 in every
    training shower has its std clamped at 1e-6, so one held-out shower with energy there dominates the shape
    validation loss; training showers stay within the statistics.)"""
    ckpt = common.load_checkpoint(run, script=SCRIPTS[part], ds=ds)
    cfg, dev = ckpt["config"], torch.device(device)
    if part == "shape":
        model, stats = common.build_vit(ckpt, dev), common.to_device(ckpt["stats"], dev)
        e_inc, showers = common.load_showers([train_file], ds, cfg.get("max_showers"), progress=False)
        train, val = common.split_indices(len(showers), cfg["val_fraction"], seed)
        loss = lambda idx, p: shape_vit.validation_loss(model, showers, e_inc, idx, stats, argparse.Namespace(  # noqa
            seed=seed, batch_size=cfg["batch_size"], ds=ds, precision=p), dev)
        return {**{p: loss(val, p) for p in PRECISIONS}, **{f"fit_{p}": loss(train[:300], p) for p in PRECISIONS}}
    model = energy.load_model(run, ds, dev)[0]
    e_inc, u = common.load_u([train_file], ds, cfg.get("max_showers"), progress=False)
    val = torch.from_numpy(common.split_indices(len(u), cfg["val_fraction"], seed)[1])
    z, c_e = common.u_to_net(u, ckpt["stats"])[val].to(dev), common.energy_condition(e_inc[val]).float().to(dev)
    return {p: energy.validation_loss(model, z, c_e, cfg["batch_size"], seed + 1, p) for p in PRECISIONS}


def paired_change(part, a, b):
    """How far the bf16 sample b moves from the fp32 sample a of the same x0: RMS of the paired difference over
    the RMS spread of a (shape: voxel energies; energy: the u's)."""
    key = "showers" if part == "shape" else "u"
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        x, y = fa[key][:], fb[key][:]
    return float(np.sqrt(np.mean((y - x) ** 2)) / np.std(x))


# ----------------------------------------------------------------------------- the 2x2 grid of one part and seed
def train_run(args, part, seed, precision):
    """Train one run (or find the finished one): (its run folder, the step record)."""
    folder = Path(args.out) / part / f"seed{seed}" / f"train-{precision}"
    rec = step(folder / "train.json", f"{SCRIPTS[part]}.py", "--files", args.train, "--ds", args.ds, "--out", folder,
               "--seed", seed, "--precision", precision, "--no-progress", "--device", args.device,
               *shlex.split(getattr(args, f"{part}_flags")), clean=folder)
    return run_dir(folder, part, args.ds), rec


def grid(args, part, seed):
    """Train at both precisions, sample each run at both precisions from the same x0, score: one row per cell."""
    rows, dev, n = [], ["--device", args.device], ["--n", args.n] if args.n else []
    for tp in PRECISIONS:
        run, train = train_run(args, part, seed, tp)
        folder, losses = run.parent, run.parent / "losses.json"
        if not losses.exists():
            values = validation_losses(part, run, args.train, args.ds, seed, args.device)
            common.atomic_write(losses, lambda tmp: Path(tmp).write_text(json.dumps(values) + "\n"))
        losses, files = json.loads(losses.read_text()), {}
        for sp in PRECISIONS:
            files[sp] = folder / (f"gen_{sp}.hdf5" if part == "shape" else f"cond_{sp}.hdf5")
            sample = ["shape_vit.py", "--sample", "--cond", args.ref] if part == "shape" else \
                ["energy.py", "--sample", "--like", args.ref]
            smp = step(folder / f"sample_{sp}.json", *sample, "--ckpt", run, "--ds", args.ds, "--output", files[sp],
                       "--overwrite", "--seed", seed, "--precision", sp, "--no-progress", *n, *dev,
                       *shlex.split(getattr(args, f"{part}_sample_flags")))
            name = f"eval_{sp}{args.eval_tag}"
            ev = step(folder / f"{name}.json", "evaluate.py", "-i", files[sp], "-r", args.ref, "--ds", args.ds,
                      "--out", folder / name, "--overwrite", "--seed", seed, "--no-plots", "--no-progress",
                      *dev, *shlex.split(getattr(args, f"{part}_eval_flags")))
            summary = json.loads((folder / name / "summary.json").read_text())
            rows.append(dict(part=part, seed=seed, train=tp, sample=sp, train_cpu_s=train["cpu_s"],
                             sample_cpu_s=smp["cpu_s"], eval_cpu_s=ev["cpu_s"], val_loss=losses[sp],
                             fit_loss=losses.get(f"fit_{sp}"),
                             **scores(part, summary)))
        change = paired_change(part, files["fp32"], files["bf16"])
        rows[-2]["paired_change"], rows[-1]["paired_change"] = 0.0, change
    return rows


def bespoke_rows(args, seed):
    """BNS solvers of every --bespoke-steps x {local, local-mse} on the fp32 shape run of this seed: one row each."""
    run = train_run(args, "shape", seed, "fp32")[0]
    folder = Path(args.out) / "bespoke" / f"seed{seed}"
    rec = step(folder / "bespoke.json", "bespoke.py", "--ckpt", run, "--cond", args.ref, "--ds", args.ds, "--out",
               folder / "runs", "--steps", *args.bespoke_steps, "--loss", "local", "local-mse", "--seed", seed,
               "--device", args.device, "--no-progress", *shlex.split(args.bespoke_flags), clean=folder)
    rows = []
    for path in sorted((folder / "runs").glob(f"bespoke-ds{args.ds}-*")):
        c = common.load_checkpoint(path, script="bespoke", ds=args.ds)
        mse = c["end_point_mse"]
        rows.append(dict(part="bespoke", seed=seed, n=c["n"], loss=c["loss"], iters=c["history"]["iter"][-1],
                         best_iter=c["history"]["iter"][int(np.argmin(c["history"]["val_loss"]))],
                         bns=mse["bespoke"], euler=mse["euler"], midpoint=mse.get("midpoint"), rk4=mse.get("rk4"),
                         study_cpu_s=rec["cpu_s"]))
    return rows


def scores(part, summary):
    """The numbers of one evaluate.py summary that the tables show."""
    if part == "energy":
        return dict(auc_u=summary["cls_u"]["auc"])
    out = {f"auc_{k}": summary[f"cls_{k}"]["auc"] for k in ("low", "high") if f"cls_{k}" in summary}
    if "fpd_kpd" in summary:
        out.update(fpd=summary["fpd_kpd"]["fpd"], kpd=summary["fpd_kpd"]["kpd"])
    sep = summary.get("separation_power_mean", {})
    out.update({f"sep_{k}": sep[k] for k in FAMILIES if sep.get(k) is not None})
    if sep:
        out["sep_mean"] = float(np.mean([sep[k] for k in FAMILIES if sep.get(k) is not None]))
    return out


# ----------------------------------------------------------------------------- tables
METRICS = {"shape": ["auc_low", "auc_high", "fpd", "kpd", "sep_mean", *[f"sep_{k}" for k in FAMILIES], "fit_loss",
                     "val_loss", "paired_change", "train_cpu_s", "sample_cpu_s"],
           "energy": ["auc_u", "val_loss", "paired_change", "train_cpu_s", "sample_cpu_s"]}
NOTES = {"val_loss": "validation loss of the trained network evaluated at the sampling precision (shape: "
                     "dominated by held-out voxels outside the training statistics)",
         "fit_loss": "the same loss on 300 training showers",
         "paired_change": "RMS(bf16 sample - fp32 sample of the same x0) / std of the fp32 sample",
         "train_cpu_s": "CPU seconds (user + sys) of the training run",
         "sample_cpu_s": "CPU seconds of the sampling run"}


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4g} +- {s:.2g}"


def grid_table(rows, part):
    """Markdown: per metric, mean +- std over seeds in each cell, then each cell minus fp32/fp32 (paired by seed)."""
    cells = [(t, s) for t in PRECISIONS for s in PRECISIONS]
    by = {(r["train"], r["sample"], r["seed"]): r for r in rows if r["part"] == part}
    seeds = sorted({k[2] for k in by})
    head = " | ".join(f"train {t} / sample {s}" for t, s in cells)
    lines = [f"### {part}: {len(seeds)} seeds {seeds} (mean +- standard deviation over seeds)", "",
             f"| metric | {head} |", "|---" * (len(cells) + 1) + "|"]
    for m in METRICS[part]:
        if any(r.get(m) is not None for r in by.values()):
            lines.append(f"| {m} | " + " | ".join(mean_std([by[c + (s,)].get(m) for s in seeds if c + (s,) in by])
                                                   for c in cells) + " |")
    lines += ["", f"Paired by seed, cell minus train fp32 / sample fp32:", "",
              "| metric | " + " | ".join(f"train {t} / sample {s}" for t, s in cells[1:]) + " |",
              "|---" * len(cells) + "|"]
    for m in METRICS[part]:
        if m.endswith("cpu_s") or m == "paired_change" or not any(r.get(m) is not None for r in by.values()):
            continue
        diffs = [[by[c + (s,)][m] - by[("fp32", "fp32", s)][m] for s in seeds
                  if c + (s,) in by and ("fp32", "fp32", s) in by and by[c + (s,)].get(m) is not None]
                 for c in cells[1:]]
        lines.append(f"| {m} | " + " | ".join(mean_std(d) for d in diffs) + " |")
    return lines + [""] + [f"- {k}: {v}" for k, v in NOTES.items()] + [""]


def bespoke_table(rows):
    rows = [r for r in rows if r["part"] == "bespoke"]
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"### bespoke: end-point MSE against the midpoint-100 reference, {len(seeds)} seeds {seeds} "
             "(mean +- standard deviation)", "",
             "| steps = NFE | Euler | midpoint | RK4 | BNS local | BNS local-mse | RK4 / BNS local "
             "| RK4 / BNS local-mse | iterations local / local-mse |", "|---" * 9 + "|"]
    for n in sorted({r["n"] for r in rows}):
        sel = {loss: [r for r in rows if r["n"] == n and r["loss"] == loss] for loss in ("local", "local-mse")}
        base = sel["local"] or sel["local-mse"]
        cols = [mean_std([r[k] for r in base]) for k in ("euler", "midpoint", "rk4")]
        cols += [mean_std([r["bns"] for r in sel[loss]]) for loss in sel]
        cols += [mean_std([r["rk4"] / r["bns"] for r in sel[loss] if r["rk4"]]) for loss in sel]
        cols.append(" / ".join(mean_std([r["iters"] for r in sel[loss]]) for loss in sel))
        lines.append(f"| {n} | " + " | ".join(cols) + " |")
    return lines + [""]


def main(argv=None):
    args = parse_args(argv)
    out, tables = Path(args.out), {}
    out.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        rows = [r for seed in args.seeds for r in (bespoke_rows(args, seed) if part == "bespoke" else
                                                   grid(args, part, seed))]
        lines = bespoke_table(rows) if part == "bespoke" else grid_table(rows, part)
        name = part + ("" if part == "bespoke" else args.eval_tag)
        (out / f"{name}.json").write_text(json.dumps(dict(vars(args), rows=rows), indent=1) + "\n")
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")
        tables[part] = out / f"{name}.md"
        print("\n".join(lines), flush=True)
    return tables


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
