"""Learning curves of the latent chain (VAE reconstruction, VAE + laViT) next to the full-space ViT, on the same data,
against training steps and CPU seconds: the paper's efficiency claim (Sec. 3.3) measured on a CPU.

    python tools/latent_curves.py --data DATA --out OUT --vae-channels 16 --vae-epochs 8 --vae-at 1 2 4 8 \
        --lavit-epochs 8 32 --n 1000
    python tools/latent_curves.py --data DATA --out OUT --baselines --vit-epochs 10 40 --n 1000   # beside it
    python tools/latent_curves.py --data DATA --out OUT --vae-channels 64 --vae-epochs 8 --vae-at 1 --n 1000
    python tools/latent_curves.py --out OUT --table                        # only the table and the plot

Every point is one training schedule of the stage scripts (subprocesses, so that their CPU seconds are measured
exactly: user + sys of the child, the cost on an idle machine); `--vae-at` evaluates the VAE after the given epochs
of one schedule (`--stop-after` and a bit-identical `--resume`: the learning rate has not decayed at the earlier
points). Each point is scored on the reference file with the true u's (the shape networks alone):
    vae     vae.py --reconstruct (posterior mean, calibrated cut)
    lavit   vae.py --encode of the training file (once per VAE), latent_vit.py, --sample, vae.py --decode
    vit     shape_vit.py, --sample
    mean    every reference shower replaced by the training set's mean shower (normalised cut calibrated like the
            VAE's): the quality of a decoder that ignores its latent
    truth   the training file against the reference: the floor (two samples of the same law)
and evaluate.py -m hist cls-low cls-high. A finished step is never redone (its record is DIR/<point>/point.json),
so several invocations may fill one --out side by side and a killed one continues. Writes DIR/curves.md, .json, .png.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FEATURES = ("e_layer", "ec_x", "ec_r", "width_x", "width_r", "sparsity", "voxel")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder of toy_ds2_train.hdf5 / toy_ds2_ref.hdf5 (data/prepare.py toy)")
    p.add_argument("--out", required=True, help="folder of the points and the table")
    p.add_argument("--ds", type=int, default=2, choices=(2, 3))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-showers", type=int, help="train on at most this many showers (default: all)")
    p.add_argument("--n", type=int, help="score on the first N reference showers (default: all)")
    p.add_argument("--vae-channels", type=int, default=16)
    p.add_argument("--vae-epochs", type=int, help="VAE schedule (epochs)")
    p.add_argument("--vae-at", type=int, nargs="+", help="evaluate the VAE after these epochs (default: the end)")
    p.add_argument("--vae-flags", default="", help="more vae.py training flags, e.g. '--beta 1e-6'")
    p.add_argument("--lavit-epochs", type=int, nargs="*", default=[], help="laViT schedules on the final VAE")
    p.add_argument("--lavit-flags", default="--preset small", help="latent_vit.py training flags")
    p.add_argument("--vit-epochs", type=int, nargs="*", default=[], help="full-space ViT schedules")
    p.add_argument("--vit-flags", default="--preset small", help="shape_vit.py training flags")
    p.add_argument("--sample-flags", default="--solver rk4 --steps 8", help="sampler flags of both ViTs")
    p.add_argument("--baselines", action="store_true", help="also the mean shower and the truth floor")
    p.add_argument("--cls-epochs", type=int, default=50, help="classifier epochs (official: 50)")
    p.add_argument("--cls-width", type=int, default=2048, help="classifier width (official: 2048)")
    p.add_argument("--table", action="store_true", help="only write the table and the plot")
    return p.parse_args(argv)


def execute(cmd):
    """Run `python cmd` as a subprocess: (succeeded, its output, its CPU seconds: user + sys of the child)."""
    proc = subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, use = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status) == 0, log, use.ru_utime + use.ru_stime


class Point:
    """One curve point: its folder, and the record of its finished steps (command, CPU and wall seconds)."""

    def __init__(self, out, name, kind, **info):
        self.dir, self.path = Path(out) / name, Path(out) / name / "point.json"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rec = json.loads(self.path.read_text()) if self.path.exists() else {"name": name, "kind": kind, "steps": {}}
        self.rec.update(info)

    def save(self):
        tmp = self.path.with_name(".point.json.tmp")
        tmp.write_text(json.dumps(self.rec, indent=1) + "\n")
        os.replace(tmp, self.path)

    def run(self, step, script, *args):
        """`python script args` unless `step` finished before; records its CPU (user + sys of the child) and wall."""
        if step in self.rec["steps"]:
            return self.rec["steps"][step]
        cmd = [str(ROOT / script), *map(str, args)]
        print(f"[curves] {self.rec['name']} {step}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        ok, log, cpu = execute(cmd)
        (self.dir / f"{step}.log").write_text(log)
        if not ok:
            sys.exit(f"error: {step} of {self.rec['name']} failed ({self.dir / (step + '.log')}): "
                     f"{log.strip().splitlines()[-1:]}")
        self.rec["steps"][step] = {"cmd": "python " + " ".join(cmd), "cpu_s": cpu, "wall_s": time.time() - t0}
        self.save()
        return self.rec["steps"][step]

    def evaluate(self, step, gen, ref, args):
        folder = self.dir / f"eval_{step}"
        self.run(f"evaluate_{step}", "evaluate.py", "-i", gen, "-r", ref, "--ds", args.ds, "-m", "hist", "cls-low",
                 "cls-high", *limit(args.n, "--max-showers"), "--out", folder, "--overwrite", "--seed", args.seed, "--cls-epochs", args.cls_epochs,
                 "--cls-width", args.cls_width, "--no-progress", "--no-plots")
        self.rec.setdefault("evals", {})[step] = str(folder / "summary.json")
        self.save()


def limit(n, flag):
    return [flag, n] if n else []


def newest_run(folder, script):
    runs = sorted(Path(folder).glob(f"{script}-ds*-*/ckpt.pt"))
    if not runs:
        sys.exit(f"error: no {script} run under {folder}")
    return runs[-1].parent


def train_in_stages(point, script, at, base, common_flags):
    """One schedule trained to each epoch of `at` in turn (--stop-after, then --resume); returns the run folder."""
    run = None
    for i, epoch in enumerate(at):
        args = base + ["--stop-after", epoch] if run is None else ["--resume", run, "--stop-after", epoch]
        point.run(f"train_{epoch}", script, *args, *common_flags)
        run = run or newest_run(point.dir / "runs", Path(script).stem)
        point.rec.setdefault("snapshots", {})[str(epoch)] = {"run": str(run)}
        point.save()
        yield epoch, run


def vae_points(args, data, ref):
    """The VAE schedule, its reconstructions at --vae-at, and its latents of the training file; returns the run."""
    at = sorted(set(args.vae_at or [args.vae_epochs]))
    p = Point(args.out, f"vae-c{args.vae_channels}-e{args.vae_epochs}", "vae", channels=args.vae_channels)
    base = ["--ds", args.ds, "--seed", args.seed, "--data-dir", data, "--toy", "--out", p.dir / "runs", "--channels",
            args.vae_channels, "--epochs", args.vae_epochs, "--val-every", 1, "--ckpt-every", 1, *limit(args.max_showers, "--max-showers"),
            *args.vae_flags.split()]
    run = None
    for epoch, run in train_in_stages(p, "vae.py", at, base, ["--no-progress", "--device", "cpu"]):
        recon = p.dir / f"recon_{epoch}.hdf5"
        p.run(f"reconstruct_{epoch}", "vae.py", "--reconstruct", "--ckpt", run, "--like", ref, "--output", recon,
              *limit(args.n, "--n"), "--overwrite", "--no-progress", "--device", "cpu")
        p.evaluate(str(epoch), recon, ref, args)
    p.run("encode", "vae.py", "--encode", "--ckpt", run, "--output", p.dir / "latents.hdf5", "--overwrite",
          *limit(args.max_showers, "--n"), "--no-progress", "--device", "cpu")
    return p, run


def flow_point(args, kind, epochs, ref, data=None, vae=None):
    """A laViT (on the VAE point `vae`) or ViT schedule of `epochs`, sampled with the reference's true u's."""
    name = f"lavit-{vae[0].rec['name'][4:]}-e{epochs}" if kind == "lavit" else f"vit-e{epochs}"
    p = Point(args.out, name, kind, epochs=epochs, vae=vae[0].rec["name"] if vae else None)
    flags = ["--ds", args.ds, "--seed", args.seed, "--out", p.dir / "runs", "--epochs", epochs, "--val-every", 1,
             "--ckpt-every", max(1, epochs // 4), *limit(args.max_showers, "--max-showers"), "--no-progress",
             "--device", "cpu"]
    script = "latent_vit.py" if kind == "lavit" else "shape_vit.py"
    source = ["--latents", vae[0].dir / "latents.hdf5"] if kind == "lavit" else ["--data-dir", data, "--toy"]
    p.run("train", script, *source, *flags, *(args.lavit_flags if kind == "lavit" else args.vit_flags).split())
    run = newest_run(p.dir / "runs", script[:-3])
    p.rec["run"] = str(run)
    p.save()
    sample = ["--ckpt", run, "--cond", ref, "--ds", args.ds, "--seed", args.seed, "--overwrite", "--no-progress",
              "--device", "cpu", *limit(args.n, "--n"), *args.sample_flags.split()]
    gen = p.dir / "gen.hdf5"
    if kind == "lavit":
        p.run("sample", script, "--sample", *sample, "--output", p.dir / "latents_gen.hdf5")
        p.run("decode", "vae.py", "--decode", p.dir / "latents_gen.hdf5", "--output", gen, "--overwrite",
              "--no-progress", "--device", "cpu")
    else:
        p.run("sample", script, "--sample", *sample, "--output", gen)
    p.evaluate("end", gen, ref, args)


def mean_shower(train, ref, out, ds, seed=0, max_showers=None, n=None):
    """The training split's mean shower (per-layer fractions) scaled by every reference shower's layer energies,
    with the normalised cut calibrated on the validation split like the VAE's; returns (file, mean-shower BCE and
    the floor, the targets' entropy, of the validation split)."""
    import torch
    import torch.nn.functional as F
    import common
    import vae
    e, x = common.load_showers(train, ds, max_showers, progress=False)
    train_idx, val_idx = common.split_indices(len(e), 0.01, seed)
    frac, layer_e = common.voxel_fractions(torch.from_numpy(x), ds)
    mean, val = frac[train_idx].mean(0, keepdim=True), frac[val_idx]
    bce = {"mean_shower_bce": F.binary_cross_entropy(mean.expand_as(val), val).item(),
           "floor_bce": F.binary_cross_entropy(val.clamp(1e-30, 1), val).item()}  # sum x ln x + (1-x) ln(1-x)
    cut = vae.calibrate_decoded(mean.expand(len(val_idx), -1, -1, -1), layer_e[val_idx], x[val_idx])[0]
    e_ref, x_ref = common.load_showers(ref, ds, n, progress=False)
    layer_ref = common.voxel_fractions(torch.from_numpy(x_ref), ds)[1]
    common.write_showers(out, e_ref, vae.decoded_to_showers(mean.expand(len(e_ref), -1, -1, -1), layer_ref, cut,
                                                            vae.CUT_EXPONENT)
                         .numpy(), ds, overwrite=True)
    return out, {**bce, "cut": cut}


def baselines(args, train, ref):
    p = Point(args.out, "mean", "mean")
    if "bce" not in p.rec:
        p.rec["bce"] = mean_shower(train, ref, p.dir / "gen.hdf5", args.ds, args.seed, args.max_showers, args.n)[1]
        p.save()
    p.evaluate("end", p.dir / "gen.hdf5", ref, args)
    t = Point(args.out, "truth", "truth")
    n = __import__("common").count_showers([ref], args.ds, args.n)
    t.run("evaluate_end", "evaluate.py", "-i", train, "-r", ref, "--ds", args.ds, "-m", "hist", "cls-low", "cls-high",
          "--max-showers", n, "--out", t.dir / "eval_end", "--overwrite", "--seed", args.seed, "--cls-epochs",
          args.cls_epochs, "--cls-width", args.cls_width, "--no-progress", "--no-plots")
    t.rec["evals"] = {"end": str(t.dir / "eval_end" / "summary.json")}
    t.save()


# ----------------------------------------------------------------------------- table and plot
def rows(out):
    """One row per evaluated snapshot of every point under `out`, with its training steps and CPU seconds."""
    import torch
    points = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(out).glob("*/point.json"))}
    table = []
    for name, rec in points.items():
        for at, summary in rec.get("evals", {}).items():
            if not Path(summary).exists():
                continue
            s, steps = json.loads(Path(summary).read_text()), rec["steps"]
            cpu = {k: v["cpu_s"] for k, v in steps.items()}
            row = dict(point=name, kind=rec["kind"], at=at, auc_low=s["cls_low"]["auc"], auc_high=s["cls_high"]["auc"],
                       **{k: s["separation_power_mean"][k] for k in FEATURES})
            if rec["kind"] == "vae":
                ckpt = torch.load(Path(rec["snapshots"][at]["run"]) / "ckpt.pt", map_location="cpu", weights_only=False)
                epochs = int(at)
                row.update(epochs=epochs, steps=epochs * ckpt["step"] // ckpt["epoch"],
                           val_loss=dict(ckpt["history"]["val_loss"]).get(epochs),
                           train_cpu_s=sum(v for k, v in cpu.items() if k.startswith("train_") and int(k[6:]) <= epochs))
            elif rec["kind"] in ("lavit", "vit"):
                ckpt = torch.load(Path(rec["run"]) / "ckpt.pt", map_location="cpu", weights_only=False)
                row.update(epochs=ckpt["epoch"], steps=ckpt["step"], val_loss=ckpt["history"]["val_loss"][-1][1],
                           train_cpu_s=cpu["train"])
                if rec["kind"] == "lavit":
                    vae = points[rec["vae"]]
                    vae_cpu = sum(v["cpu_s"] for k, v in vae["steps"].items() if k.startswith("train_"))
                    row.update(vae=rec["vae"], chain_cpu_s=vae_cpu + vae["steps"]["encode"]["cpu_s"] + cpu["train"])
            sample_cpu = sum(v for k, v in cpu.items() if k in ("sample", "decode") or k == f"reconstruct_{at}")
            row["sample_cpu_s"] = sample_cpu or None
            table.append(row)
    return table, points


def _f(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def write_table(out):
    table, points = rows(out)
    bce = points.get("mean", {}).get("bce", {})
    head = ["point", "epochs", "steps", "train CPU s", "chain CPU s", "val loss", *FEATURES, "AUC low", "AUC high"]
    lines = [f"Mean-shower val BCE {_f(bce.get('mean_shower_bce'), 5)}, floor (targets' entropy) "
             f"{_f(bce.get('floor_bce'), 5)}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {"truth": 0, "mean": 1, "vae": 2, "lavit": 3, "vit": 4}
    for r in sorted(table, key=lambda r: (order[r["kind"]], r["point"], r.get("steps") or 0)):
        label = r["point"] + (f" @{r['at']}" if r["kind"] == "vae" else "")
        val = _f(r.get("val_loss"), 5 if r["kind"] == "vae" else 4)
        lines.append("| " + " | ".join([label, _f(r.get("epochs")), _f(r.get("steps")), _f(r.get("train_cpu_s"), 0),
                                        _f(r.get("chain_cpu_s"), 0), val, *(_f(r[k], 4) for k in FEATURES),
                                        _f(r["auc_low"]), _f(r["auc_high"])]) + " |")
    (Path(out) / "curves.md").write_text("\n".join(lines) + "\n")
    (Path(out) / "curves.json").write_text(json.dumps({"bce": bce, "rows": table}, indent=1) + "\n")
    plot(table, Path(out) / "curves.png")
    return Path(out) / "curves.md"


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    series = {"VAE reconstruction": ("vae", "train_cpu_s"), "laViT (its training only)": ("lavit", "train_cpu_s"),
              "VAE + laViT (whole chain)": ("lavit", "chain_cpu_s"), "ViT": ("vit", "train_cpu_s")}
    trained = any(r.get("train_cpu_s") for r in table)  # a log axis needs one trained point
    for label, (kind, x) in series.items():
        pts = sorted((r[x], r) for r in table if r["kind"] == kind and r.get(x))
        for ax, key in zip(axes, ("auc_low", "auc_high", "sparsity")):
            ax.plot([p[0] for p in pts], [p[1][key] for p in pts], "o-", label=label)
    for ax, key in zip(axes, ("AUC low-level", "AUC high-level", "sparsity separation power")):
        for r in table:
            if r["kind"] in ("mean", "truth"):
                value = r["auc_low" if "low" in key else "auc_high" if "high" in key else "sparsity"]
                ax.axhline(value, ls="--", color="grey" if r["kind"] == "mean" else "green", lw=1)
        ax.set(xscale="log" if trained else "linear", xlabel="training CPU seconds", title=key)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        if not args.data:
            sys.exit("error: --data is needed to train (or pass --table)")
        data = Path(args.data)
        train, ref = data / f"toy_ds{args.ds}_train.hdf5", data / f"toy_ds{args.ds}_ref.hdf5"
        for f in (train, ref):
            if not f.exists():
                sys.exit(f"error: {f} not found: make it with `python data/prepare.py toy --ds {args.ds} --out {data}`")
        if args.baselines:
            baselines(args, train, ref)
        vae = vae_points(args, data, ref) if args.vae_epochs else None
        if args.lavit_epochs and not vae:
            sys.exit("error: --lavit-epochs needs --vae-epochs (the VAE it runs on)")
        for epochs in args.lavit_epochs:
            flow_point(args, "lavit", epochs, ref, vae=vae)
        for epochs in args.vit_epochs:
            flow_point(args, "vit", epochs, ref, data=data)
    table = write_table(out)
    print(f"[curves] {table}")
    return table


if __name__ == "__main__":
    main()
