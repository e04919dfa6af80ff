"""Quality against ODE steps of the energy network's sampler: for every (solver, steps) energy.py --sample writes a
condition file from the same x0 (same seed), and evaluate.py -m cls-u scores its u's against the true u's of the
reference file (mean AUC of --cls-repeats classifiers). Writes a table (steps.json, steps.md) into --out.

    python tools/energy_steps.py --ckpt runs/energy-ds2-<time> --like data/toy_ds2_ref.hdf5 --n 3000 \
        --solver rk4 midpoint euler --nfe 20 40 80 200 --cls-repeats 5
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="energy run folder or checkpoint")
    p.add_argument("--like", required=True, help="reference CaloChallenge file (its E_inc and true u's)")
    p.add_argument("--ds", type=int, default=2)
    p.add_argument("--n", type=int, default=3000, help="events per point")
    p.add_argument("--solver", nargs="+", default=["rk4"], choices=sorted(NFE_PER_STEP))
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50], help="ODE steps per layer")
    p.add_argument("--nfe", type=int, nargs="+", help="instead of --steps: evaluations per layer (equal cost)")
    p.add_argument("--cls-epochs", type=int, default=30)
    p.add_argument("--cls-width", type=int, default=512)
    p.add_argument("--cls-repeats", type=int, default=1, help="mean AUC of this many classifier seeds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="passed to both scripts")
    p.add_argument("--out", default="runs/energy_steps", help="folder of the table and the condition files")
    return p.parse_args(argv)


def run(*args):
    res = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"error: {' '.join(map(str, args[:2]))} failed: {res.stderr.strip().splitlines()[-1:]}")
    return res.stdout


def main(argv=None):
    args = parse_args(argv)
    grid = [(m, k // NFE_PER_STEP[m]) for m in args.solver for k in args.nfe if k % NFE_PER_STEP[m] == 0] \
        if args.nfe else [(m, k) for m in args.solver for k in args.steps]
    out, dev = Path(args.out), ["--device", args.device] if args.device else []
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for solver, steps in grid:
        cond = out / f"cond_{solver}_{steps}.hdf5"
        run(ROOT / "energy.py", "--sample", "--ckpt", args.ckpt, "--like", args.like, "--n", args.n, "--ds", args.ds,
            "--solver", solver, "--steps", steps, "--seed", args.seed, "--output", cond, "--overwrite",
            "--no-progress", *dev)
        folder = out / f"eval_{solver}_{steps}"
        run(ROOT / "evaluate.py", "-i", cond, "-r", args.like, "--ds", args.ds, "-m", "cls-u", "--out", folder,
            "--overwrite", "--cls-epochs", args.cls_epochs, "--cls-width", args.cls_width, "--cls-repeats",
            args.cls_repeats, "--seed", args.seed, "--no-progress", *dev)
        cls, info = json.loads((folder / "summary.json").read_text())["cls_u"], cond_seconds(cond)
        rows.append(dict(solver=solver, steps=steps, nfe=steps * NFE_PER_STEP[solver], auc=cls["auc"],
                         auc_std=cls.get("auc_std", 0.0), seconds=info))
        print(json.dumps(rows[-1]), flush=True)
    ref = max(rows, key=lambda r: (r["solver"] == "rk4", r["nfe"]))  # the most accurate solve
    lines = [f"reference: {ref['solver']} {ref['steps']} steps; {args.n} events of {args.like}; "
             f"{args.cls_repeats} classifiers per point", "",
             "| solver | steps | NFE per layer | seconds | AUC | AUC - ref |", "|---|---|---|---|---|---|"]
    for r in rows:
        r["auc_minus_ref"] = r["auc"] - ref["auc"]
        lines.append(f"| {r['solver']} | {r['steps']} | {r['nfe']} | {r['seconds']:.1f} | {r['auc']:.4f} +- "
                     f"{r['auc_std']:.4f} | {r['auc_minus_ref']:+.4f} |")
    (out / "steps.json").write_text(json.dumps(dict(vars(args), rows=rows), indent=1))
    (out / "steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def cond_seconds(path):
    import h5py
    with h5py.File(path, "r") as f:
        return float(f.attrs["seconds"])


if __name__ == "__main__":
    main()
