"""Paper Fig. 9: classifier AUC against the number of network evaluations (NFE) for Euler, midpoint, RK4 and the
bespoke solvers, for one frozen shape network. Every point samples the same conditions from the same x0 (same seed)
with shape_vit.py --sample (a laViT: latent_vit.py --sample, then vae.py --decode) and scores the showers with
evaluate.py -m cls-high cls-low (mean of --cls-repeats classifiers); the stages run as subprocesses.

    python tools/fig9_sweep.py --ckpt runs/shape_vit-ds2-<time> --cond runs/energy-ds2-<time>/cond_ds2_100000.hdf5 \
        --like data/dataset_2_2.hdf5 --nfe 4 8 16 32 64 --bespoke runs/bespoke-ds2-<t1> runs/bespoke-ds2-<t2>
    python tools/fig9_sweep.py --ckpt RUN --cond data/toy_ds2_ref.hdf5 --like data/toy_ds2_ref.hdf5 --n 3000 \
        --nfe 8 16 --train-bespoke 8 16 --vs-reference --cls-repeats 3     # toy: true u's, solvers trained here
Output in --out: sweep.json, sweep.md (a table), sweep.png (AUC against NFE, one panel per classifier).
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="frozen shape_vit or latent_vit run")
    p.add_argument("--cond", required=True, help="conditions: a condition file, or a CaloChallenge file (true u's)")
    p.add_argument("--like", required=True, help="reference CaloChallenge file of the classifiers")
    p.add_argument("--ds", type=int, default=2)
    p.add_argument("--n", type=int, help="showers per point (default: all conditions)")
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="NFE of the fixed solvers")
    p.add_argument("--rk4-reference", type=int, default=80, help="extra RK4 point (paper: 20 steps = 80 NFE)")
    p.add_argument("--bespoke", nargs="+", default=[], help="trained bespoke.py runs to sweep")
    p.add_argument("--train-bespoke", type=int, nargs="*", default=[], help="also train local-loss solvers of "
                   "these step counts with bespoke.py (its --preset small on a CPU)")
    p.add_argument("--bespoke-flags", default="", help="extra flags for bespoke.py, e.g. '--preset small'")
    p.add_argument("--vs-reference", action="store_true", help="also score each point against the RK4 showers "
                   "of --rk4-reference from the same x0 (the solver's error alone)")
    p.add_argument("--cls-epochs", type=int, default=50)
    p.add_argument("--cls-width", type=int, default=2048)
    p.add_argument("--cls-repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--out", default="runs/fig9_sweep")
    p.add_argument("--keep-showers", action="store_true")
    return p.parse_args(argv)


def run(*args):
    res = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"error: {Path(str(args[0])).name} failed: {(res.stderr.strip().splitlines() or [''])[-1]}")
    return res.stdout


def points(args, bespoke_runs):
    """(label, solver, steps, nfe, bespoke run or None): RK4 reference, the bespoke solvers, then the fixed ones."""
    pts = [("rk4", "rk4", args.rk4_reference // 4, args.rk4_reference, None)] if args.rk4_reference else []
    for r in bespoke_runs:
        c = common.load_checkpoint(r, script="bespoke", ds=args.ds)
        pts.append((f"bns-{c['loss']}", "bespoke", c["n"], c["n"], r))
    return pts + [(m, m, nfe // k, nfe, None) for nfe in sorted(args.nfe) for m, k in common.NFE_PER_STEP.items()
                  if nfe % k == 0 and (m, nfe) != ("rk4", args.rk4_reference)]


def main(argv=None):
    args = parse_args(argv)
    out, dev = Path(args.out), ["--device", args.device] if args.device else []
    out.mkdir(parents=True, exist_ok=True)
    script = common.load_checkpoint(args.ckpt, script=("shape_vit", "latent_vit"), ds=args.ds)["script"]
    runs = list(args.bespoke)
    if args.train_bespoke:
        before = set(out.glob("bespoke-*"))
        run(ROOT / "bespoke.py", "--ckpt", args.ckpt, "--cond", args.cond, "--ds", args.ds, "--steps",
            *args.train_bespoke, "--loss", "local", "--out", out, "--seed", args.seed, *args.bespoke_flags.split(), *dev)
        runs += sorted(set(out.glob("bespoke-*")) - before)
    n = ["--n", args.n] if args.n else []
    rows, ref_file = [], out / f"gen_rk4_{args.rk4_reference}.hdf5"
    for label, solver, steps, nfe, bns in points(args, runs):
        gen = out / f"gen_{label}_{nfe}.hdf5"
        flags = ["--ckpt", args.ckpt, "--cond", args.cond, *n, "--ds", args.ds, "--solver", solver, "--steps", steps,
                 "--seed", args.seed, "--overwrite", "--no-progress", *dev] + (["--bespoke-ckpt", bns] if bns else [])
        if script == "shape_vit":
            run(ROOT / "shape_vit.py", "--sample", *flags, "--output", gen)
            info = json.loads(Path(f"{gen}.json").read_text())
        else:
            lat = out / f"latents_{label}_{nfe}.hdf5"
            run(ROOT / "latent_vit.py", "--sample", *flags, "--output", lat)
            run(ROOT / "vae.py", "--decode", lat, "--ds", args.ds, "--output", gen, "--overwrite", "--no-progress", *dev)
            j = json.loads(Path(f"{gen}.json").read_text())  # latent ODE and decoder
            info = {"ms_per_shower_shape": 1e3 * (j["seconds"] + j["seconds_decode"]) / j["n"]}
            lat.unlink()
        row = dict(solver=label, nfe=nfe, steps=steps, ms_per_shower=info.get("ms_per_shower_shape"))
        refs = [("", args.like)] + [("_vs_rk4", ref_file)] * (args.vs_reference and gen != ref_file)
        for suffix, ref in refs:
            folder = out / f"eval_{label}_{nfe}{suffix}"
            run(ROOT / "evaluate.py", "-i", gen, "-r", ref, "--ds", args.ds, "-m", "cls-high", "cls-low", "--out",
                folder, "--overwrite", "--cls-epochs", args.cls_epochs, "--cls-width", args.cls_width,
                "--cls-repeats", args.cls_repeats, "--seed", args.seed, "--no-progress", *dev)
            summary = json.loads((folder / "summary.json").read_text())
            for lvl in ("high", "low"):
                row[f"auc_{lvl}{suffix}"] = summary[f"cls_{lvl}"]["auc"]
                row[f"auc_{lvl}{suffix}_std"] = summary[f"cls_{lvl}"].get("auc_std", 0.0)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep_showers and gen != ref_file:
            gen.unlink()
    if not args.keep_showers:
        ref_file.unlink(missing_ok=True)
    write_table(rows, out, args)
    return out


def write_table(rows, out, args):
    """sweep.json, sweep.md and sweep.png (AUC against NFE, log-x, one panel per classifier)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    (out / "sweep.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    keys = [k for k in ("auc_high", "auc_low", "auc_high_vs_rk4", "auc_low_vs_rk4") if any(k in r for r in rows)]
    cell = lambda r, k: f"{r[k]:.4f} +- {r[k + '_std']:.4f}" if k in r else "-"  # noqa: E731
    lines = ["| solver | NFE | steps | " + " | ".join(keys) + " | ms / shower |", "|---" * (len(keys) + 4) + "|"]
    lines += [f"| {r['solver']} | {r['nfe']} | {r['steps']} | " + " | ".join(cell(r, k) for k in keys)
              + f" | {r['ms_per_shower'] or 0:.2f} |" for r in sorted(rows, key=lambda r: (r["solver"], r["nfe"]))]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots((len(keys) + 1) // 2, 2, figsize=(10, 4 * ((len(keys) + 1) // 2)), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label in dict.fromkeys(r["solver"] for r in rows):
            pts = sorted((r["nfe"], r[key]) for r in rows if r["solver"] == label and key in r)
            ax.plot(*zip(*pts), "o-", label=label)
        ax.set(xscale="log", xlabel="NFE", ylabel="AUC", title=key.replace("auc_", "AUC ").replace("_", " "))
        ax.axhline(0.5, color="grey", lw=0.5)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    print("\n".join(lines))
    print(f"mean AUC over the points: {statistics.fmean(r['auc_high'] for r in rows):.4f} (high level)")


if __name__ == "__main__":
    main()
