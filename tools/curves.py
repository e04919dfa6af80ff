"""Learning curves on the toy showers: the shape ViT alone (sampled with the true u's of the reference) and the
energy network, each trained for 1x, 4x, 16x ... the demo's steps (the demo's data, settings and seed; every length
its own full schedule), sampled with the demo's solver settings and scored by evaluate.py with the official
classifier size (width 2048, 50 epochs). The stages run as subprocesses (one OpenMP thread each, --jobs side by
side); a finished stage is skipped and an unfinished training resumes, so a killed run goes on where it stopped.

    python data/prepare.py toy --ds 2 --n 6000 --n-ref 3000 --out /tmp/curves/data          # the demo's data
    python tools/curves.py --data-dir /tmp/curves/data --out /tmp/curves/demo --mult 1 4 16 --floor --jobs 2
    python tools/curves.py --data-dir /tmp/curves/data --out /tmp/curves/p1 --mult 1 4 --nets shape \
        --shape-flags "--patch 3 16 1 --lr 2e-3"               # a variant: these flags replace the demo's
    python tools/curves.py --plot-only --out /tmp/curves/p1 --compare /tmp/curves/demo   # one plot, several curves

Per point <out>/<net>_x<m>/: runs/ (the training run), gen.hdf5 or cond.hdf5, eval/ (evaluate.py's folder),
point.json (steps, CPU and wall seconds per stage, the commands, the scores). --floor scores an independent toy
sample of the reference's size the same way: the best any generator can do at this sample size.
Output: <out>/curves.json, curves.md (the table with the commands), curves.png (scores against training steps).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import common  # noqa: E402
import demo  # noqa: E402

FEATURES = ("etot_einc", "e_layer", "ec_x", "ec_y", "ec_r", "width_x", "width_y", "width_r", "sparsity")
SCRIPTS = {"shape": "shape_vit.py", "energy": "energy.py"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="toy_ds<N>_train.hdf5 + toy_ds<N>_ref.hdf5 (made with the demo's sizes if absent)")
    p.add_argument("--out", required=True, help="folder of the points, the table and the plot")
    p.add_argument("--ds", type=int, default=2, choices=(2, 3))
    p.add_argument("--mult", type=int, nargs="+", default=[1, 4, 16], help="training lengths in demo lengths")
    p.add_argument("--nets", nargs="+", default=["shape", "energy"], choices=sorted(SCRIPTS))
    p.add_argument("--shape-flags", default="", help="shape_vit.py flags that replace or extend the demo's")
    p.add_argument("--energy-flags", default="", help="energy.py flags that replace or extend the demo's")
    p.add_argument("--sample-flags", default="", help="shape sampler flags (demo's: its 'sample' settings)")
    p.add_argument("--energy-sample-flags", default="", help="energy sampler flags (demo's: 'energy_sample')")
    p.add_argument("--modes", nargs="+", default=["hist", "cls-low", "cls-high", "fpd"], help="evaluate.py modes "
                   "of the shape points (the energy points: cls-u)")
    p.add_argument("--cls-epochs", type=int, default=50)
    p.add_argument("--cls-width", type=int, default=2048)
    p.add_argument("--cls-repeats", type=int, default=1)
    p.add_argument("--floor", action="store_true", help="also score an independent toy sample of the reference size")
    p.add_argument("--floor-seed", type=int, default=7, help="seed of that sample (the reference's differs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="points side by side (one thread each)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every stage")
    p.add_argument("--device", help="passed to every stage")
    p.add_argument("--label", help="legend label of this folder (default: its name)")
    p.add_argument("--compare", nargs="*", default=[], help="finished curve folders drawn in the same plot")
    p.add_argument("--plot-only", action="store_true", help="only (re)write the table and the plot")
    return common.check_args(p.parse_args(argv))


# ----------------------------------------------------------------------------- flags and subprocesses
def merge_flags(base, extra):
    """Command-line flags `base` (a list) with those of `extra` (a string or list) replacing same-named ones:
    merge_flags(['--epochs', '10', '--lr', '1e-3'], '--lr 2e-3 --dim 48') -> [--epochs 10 --lr 2e-3 --dim 48]."""
    def groups(tokens):
        out = []
        for tok in map(str, tokens):
            if tok.startswith("--") or not out:
                out.append([tok])
            else:
                out[-1].append(tok)
        return out
    extra = groups(shlex.split(extra) if isinstance(extra, str) else extra)
    names = {g[0] for g in extra}
    return [t for g in groups(base) if g[0] not in names for t in g] + [t for g in extra for t in g]


def flag_value(flags, name):
    return flags[flags.index(name) + 1] if name in flags else None


def run(script, *args, log=None, threads=1):
    """python ROOT/script ARGS with OMP_NUM_THREADS=threads, output appended to `log`; returns (CPU s, wall s)."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log or os.devnull, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        t0, proc = time.time(), subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, use = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"error: {script} failed (see {log}): {' '.join(cmd[1:])}")
    return use.ru_utime + use.ru_stime, time.time() - t0


def command(script, args):
    return " ".join(["python", script, *map(str, args)])


# ----------------------------------------------------------------------------- one point of a curve
def train_flags(args, net, mult):
    """The demo's training flags of `net` with --shape-flags / --energy-flags merged in: the 1x recipe; then its
    --epochs times mult."""
    flags = merge_flags(demo.TOY[net], args.shape_flags if net == "shape" else args.energy_flags)
    return merge_flags(flags, ["--epochs", int(flag_value(flags, "--epochs")) * mult])


def finished_run(root):
    """(run folder, checkpoint) of the newest run under root, or (None, None)."""
    runs = sorted(Path(root).glob("*-ds*-*/ckpt.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return None, None
    return runs[-1].parent, common.load_checkpoint(runs[-1])


def stage(point, name, script, argv, log, threads, skip):
    """Run one stage unless `skip` (its product exists); its CPU/wall seconds and command go into point."""
    if skip and name in point["stages"]:
        return
    cpu, wall = run(script, *argv, log=log, threads=threads)
    before = point["stages"].get(name, {}) if name == "train" else {}  # a resumed training adds to its first part
    point["stages"][name] = {"cpu_s": cpu + before.get("cpu_s", 0), "wall_s": wall + before.get("wall_s", 0),
                             "cmd": before.get("cmd", command(script, argv))}


def run_point(args, net, mult, ref, train_file):
    """Train, sample and score one (net, length) point; returns its point.json dict."""
    folder = Path(args.out) / f"{net}_x{mult}"
    folder.mkdir(parents=True, exist_ok=True)
    path, log = folder / "point.json", folder / "log.txt"
    point = json.loads(path.read_text()) if path.exists() else {"net": net, "mult": mult, "stages": {}}
    if "scores" in point:
        return point
    save = lambda: common.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(point, indent=1)))  # noqa: E731
    common_flags = ["--ds", args.ds, "--seed", args.seed, "--no-progress"] + (["--device", args.device]
                                                                              if args.device else [])
    flags = train_flags(args, net, mult)
    run_dir, ckpt = finished_run(folder / "runs")
    if ckpt is None or ckpt["epoch"] < int(flag_value(flags, "--epochs")):
        argv = (["--resume", run_dir, "--no-progress"] if ckpt else
                common_flags + ["--files", train_file, "--out", folder / "runs"] + flags)
        stage(point, "train", SCRIPTS[net], argv, log, args.threads, skip=False)
        run_dir, ckpt = finished_run(folder / "runs")
        save()
    if net == "shape":
        gen = folder / "gen.hdf5"
        argv = ["--sample", "--ckpt", run_dir, "--cond", ref, "--output", gen, "--overwrite"] + common_flags + \
            merge_flags(demo.TOY["sample"], args.sample_flags)
        modes = args.modes
    else:
        gen = folder / "cond.hdf5"
        argv = ["--sample", "--ckpt", run_dir, "--like", ref, "--output", gen, "--overwrite"] + common_flags + \
            merge_flags(demo.TOY["energy_sample"], args.energy_sample_flags)
        modes = ["cls-u"]
    stage(point, "sample", SCRIPTS[net], argv, log, args.threads, skip=gen.exists())
    save()
    score(args, point, gen, ref, folder, modes, log)
    hist = ckpt.get("history", {})
    point.update(epochs=ckpt["epoch"], steps=ckpt["step"], train_flags=flags, run=str(run_dir),
                 train_loss=hist.get("train_loss", []), val_loss=hist.get("val_loss", []))
    save()
    return point


def score(args, point, gen, ref, folder, modes, log):
    """evaluate.py on gen vs ref; the numbers of its summary go into point['scores']."""
    ev = folder / "eval"
    argv = ["-i", gen, "-r", ref, "--ds", args.ds, "-m", *modes, "--out", ev, "--overwrite", "--seed", args.seed,
            "--cls-epochs", args.cls_epochs, "--cls-width", args.cls_width, "--cls-repeats", args.cls_repeats,
            "--no-progress", "--no-plots"] + (["--device", args.device] if args.device else [])
    stage(point, "evaluate", "evaluate.py", argv, log, args.threads, skip=(ev / "summary.json").exists())
    s = json.loads((ev / "summary.json").read_text())
    point["scores"] = {"separation_power": s.get("separation_power_mean", {}),
                       **{k: s[k]["auc"] for k in ("cls_low", "cls_high", "cls_u") if k in s},
                       **{f"{k}_std": s[k].get("auc_std") for k in ("cls_low", "cls_high", "cls_u") if k in s},
                       **({"fpd": s["fpd_kpd"]["fpd"], "kpd": s["fpd_kpd"]["kpd"]} if "fpd_kpd" in s else {})}


def run_floor(args, ref):
    """The independent toy sample (seed --floor-seed, the reference's size), scored like the generated ones."""
    from data import prepare
    folder = Path(args.out) / "floor"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "point.json"
    if path.exists():
        return json.loads(path.read_text())
    sample = folder / f"toy_ds{args.ds}_seed{args.floor_seed}.hdf5"
    if not sample.exists():
        prepare.write_toy(args.ds, common.count_showers(ref, args.ds), sample, seed=args.floor_seed)
    point = {"net": "floor", "mult": 0, "stages": {}, "sample": str(sample)}
    modes = sorted(set(args.modes) | ({"cls-u"} if "energy" in args.nets else set()))
    score(args, point, sample, ref, folder, modes, folder / "log.txt")
    common.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(point, indent=1)))
    return point


# ----------------------------------------------------------------------------- table and plot
def table(points):
    """Markdown rows: one per point (floor last), the separation powers and AUCs."""
    head = ["net", "x demo", "steps", "train CPU s", "AUC low", "AUC high", "AUC u", "FPD x1e3", *FEATURES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in sorted(points, key=lambda p: (p["net"] == "floor", p["net"], p["mult"])):
        s, sep = p.get("scores", {}), p.get("scores", {}).get("separation_power", {})
        cpu = p["stages"].get("train", {}).get("cpu_s")
        cells = [p["net"], p["mult"] or "-", p.get("steps", "-"), "-" if cpu is None else f"{cpu:.0f}",
                 *[_auc(s, k) for k in ("cls_low", "cls_high", "cls_u")],
                 "-" if s.get("fpd") is None else f"{s['fpd']:.1f}",
                 *["-" if sep.get(k) is None else f"{sep[k]:.4f}" for k in FEATURES]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def _auc(s, key):
    if s.get(key) is None:
        return "-"
    return f"{s[key]:.4f}" + (f" +- {s[key + '_std']:.4f}" if s.get(key + "_std") else "")


def load_points(folder):
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*/point.json"))
            if "scores" in json.loads(p.read_text())]


def plot(path, curves, cls=""):
    """curves: [(label, points)]; cls: the classifier size in the AUC title. Panels: shape separation powers, AUCs, FPD, training loss, against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    styles = ["-", "--", ":", "-."]
    for c, (label, points) in enumerate(curves):
        ls, pts = styles[c % len(styles)], sorted(points, key=lambda p: p.get("steps", 0))
        shape = [p for p in pts if p["net"] == "shape"]
        floor = next((p for p in pts if p["net"] == "floor"), None)
        for i, k in enumerate(FEATURES):
            color = f"C{i}"
            axes[0].plot([p["steps"] for p in shape], [p["scores"]["separation_power"].get(k) for p in shape], ls,
                         marker="o", color=color, label=k if c == 0 else None)
            if floor and c == 0:
                axes[0].axhline(floor["scores"]["separation_power"].get(k, 0), color=color, lw=0.6, ls=":",
                                gid="level")
        for i, (net, key, name) in enumerate((("shape", "cls_low", "low"), ("shape", "cls_high", "high"),
                                              ("energy", "cls_u", "u"))):
            sel = [p for p in pts if p["net"] == net and p["scores"].get(key) is not None]
            axes[1].plot([p["steps"] for p in sel], [p["scores"][key] for p in sel], ls, marker="o", color=f"C{i}",
                         label=f"{label}: {name}")
        sel = [p for p in shape if p["scores"].get("fpd") is not None]
        axes[2].plot([p["steps"] for p in sel], [p["scores"]["fpd"] for p in sel], ls, marker="o", color="C0",
                     label=label)
        for i, p in enumerate(pts):
            if p["net"] != "floor" and p.get("train_loss"):
                per_epoch = p["steps"] / max(1, len(p["train_loss"]))
                axes[3].plot([per_epoch * (e + 1) for e in range(len(p["train_loss"]))], p["train_loss"], ls,
                             color=f"C{i}", label=f"{label}: {p['net']} x{p['mult']}")
    axes[0].axhline(0.05, color="k", lw=0.8, gid="level")  # the demo's goal
    axes[0].set(title="shape ViT: separation power (mean over layers)", ylabel="separation power", yscale="log")
    axes[1].set(title=f"classifier AUC {cls}".strip(), ylabel="AUC")
    axes[2].set(title="shape ViT: FPD x1e3", ylabel="FPD x1e3", yscale="log")
    axes[3].set(title="training loss per epoch", ylabel="CFM loss", yscale="log")
    for ax in axes:
        ax.set_xlabel("training steps")
        if any(len(line.get_xdata()) for line in ax.lines if line.get_gid() != "level"):  # log axes need data
            ax.set_xscale("log")
            ax.legend(fontsize=7)
        elif ax.get_yscale() == "log":
            ax.set_yscale("linear")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(args, points):
    out = Path(args.out)
    lines = [f"Learning curves, DS{args.ds} toy: {args.out}", ""] + table(points) + ["", "Commands:", ""]
    for p in sorted(points, key=lambda p: (p["net"], p["mult"])):
        lines += [f"- {p['net']} x{p['mult']} {name} ({s['cpu_s']:.0f} CPU s, {s['wall_s']:.0f} s wall): "
                  f"`{s['cmd']}`" for name, s in p["stages"].items()]
    (out / "curves.md").write_text("\n".join(lines) + "\n")
    (out / "curves.json").write_text(json.dumps({"label": args.label or out.name, "points": points}, indent=1))
    curves = [(args.label or out.name, points)] + [
        (json.loads((Path(c) / "curves.json").read_text()).get("label", Path(c).name), load_points(c))
        for c in args.compare]
    plot(out / "curves.png", curves, f"(width {args.cls_width}, {args.cls_epochs} epochs)")
    print("\n".join(table(points)) + f"\nwrote {out / 'curves.md'}, curves.json, curves.png")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        data = Path(args.data_dir or out / "data")
        train_file, ref = data / f"toy_ds{args.ds}_train.hdf5", data / f"toy_ds{args.ds}_ref.hdf5"
        if not (train_file.exists() and ref.exists()):
            run("data/prepare.py", "toy", "--ds", args.ds, "--out", data, "--seed", args.seed, "--overwrite",
                *demo.TOY["data"], log=out / "log.txt")
        todo = sorted([(n, m) for n in args.nets for m in args.mult], key=lambda nm: -nm[1])  # longest first
        with ThreadPoolExecutor(args.jobs) as pool:
            jobs = [pool.submit(run_point, args, n, m, str(ref), str(train_file)) for n, m in todo]
            if args.floor:
                jobs.append(pool.submit(run_floor, args, str(ref)))
            for j in jobs:
                j.result()
    write_outputs(args, load_points(out))
    return out


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
