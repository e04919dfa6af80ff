"""The whole CaloDREAM chain in one command, ending in a report (README: "Two commands for a new user").

    python tools/demo.py                       # CPU, synthetic DS2 showers: data -> energy -> shape ViT -> sample
                                         #   -> evaluate -> demo/ds2-toy/report.md (about 14 min on 2 cores)
    python tools/demo.py --latent --bespoke    # also VAE -> laViT and a bespoke 8-step solver
    python tools/demo.py --real --ds 2         # the paper's configuration on data/dataset_2_{1,2}.hdf5 (GPU; days)
    python tools/demo.py --smoke --latent --bespoke --out /tmp/smoke   # tiny settings: checks every stage's wiring

Every stage is the stage's own script, run as a subprocess with the flags printed in the report, so the
report says exactly how to redo any step by hand. A stage whose output exists is skipped: after a kill,
run the same command again and it goes on where it stopped (a killed training resumes from its last
checkpoint; `--fresh` starts over). On a CPU the energy and shape networks train side by side with
OMP_NUM_THREADS=1 (one core each); every other stage runs alone with all cores.
"""
import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the stage scripts
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

# Reduced settings for the synthetic showers on a CPU; --real uses each script's paper defaults instead.
TOY = {
    "data": ["--n", "6000", "--n-ref", "3000"],
    "energy": ["--epochs", "10", "--batch-size", "64", "--lr", "1e-3", "--val-every", "2", "--ckpt-every", "1"],
    "shape": ["--preset", "small", "--epochs", "10", "--val-every", "2", "--ckpt-every", "1"],
    "vae": ["--channels", "16", "--epochs", "8", "--stop-after", "4", "--val-every", "4", "--ckpt-every", "4"],  # --latent: ~31 CPU min
    "latent": ["--preset", "small", "--epochs", "8", "--val-every", "2", "--ckpt-every", "2"],
    "bespoke": ["--preset", "small", "--steps", "8", "--loss", "local", "--iters", "300"],
    "energy_sample": ["--steps", "5"],  # the fast setting (docs/RESULTS.md: as good as RK4 50 on the toy showers)
    "sample": ["--solver", "rk4", "--steps", "4"],  # as good as RK4 8 and 20 on the toy (docs/RESULTS.md)
    "evaluate": ["--cls-epochs", "10", "--cls-width", "256"],
}
TINY_VIT = ["--dim", "12", "--heads", "2", "--mlp", "24", "--depth", "1", "--epochs", "1", "--batch-size", "32"]
SMOKE = {  # --smoke: checks the wiring of every stage in a few minutes; the scores mean nothing
    "data": ["--n", "600", "--n-ref", "300"],
    "energy": ["--preset", "tiny", "--epochs", "2", "--batch-size", "64"],
    "shape": ["--preset", "small"] + TINY_VIT,
    "vae": ["--channels", "4", "--epochs", "1", "--batch-size", "32"],
    "latent": ["--preset", "small"] + TINY_VIT,
    "bespoke": ["--preset", "small", "--steps", "4", "--loss", "local", "--iters", "4", "--pool", "24", "--n-val", "8",
                "--batch-size", "8", "--ref-steps", "8", "--val-every", "2"],
    "energy_sample": ["--steps", "2"],
    "sample": ["--solver", "rk4", "--steps", "2"],
    "evaluate": ["--cls-epochs", "1", "--cls-width", "16"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ds", type=int, default=2, choices=[2, 3], help="CaloChallenge dataset")
    p.add_argument("--real", action="store_true", help="real files in --data-dir and the paper's settings")
    p.add_argument("--data-dir", help="real files (default data/); synthetic ones go to <demo folder>/data")
    p.add_argument("--out", help="demo folder (default demo/ds<N>-toy, -smoke or -real)")
    p.add_argument("--latent", action="store_true", help="also train the VAE and the latent ViT")
    p.add_argument("--bespoke", action="store_true", help="also train a bespoke 8-step solver")
    p.add_argument("--device", help="passed to every stage (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="forget finished stages and start over")
    p.add_argument("--smoke", action="store_true", help="tiny settings that only check the wiring (minutes)")
    return p.parse_args(argv)


def _cuda():
    import torch
    return torch.cuda.is_available()


class Chain:
    """Runs the stages, remembers which finished (state.json) and how long each took."""

    def __init__(self, args):
        self.args, self.ds = args, args.ds
        self.dir = Path(args.out or f"demo/ds{args.ds}-{'real' if args.real else 'smoke' if args.smoke else 'toy'}")
        self.dir.mkdir(parents=True, exist_ok=True)
        common.lock_folder(self.dir, "demo.py")  # one demo per folder
        self.state_path = self.dir / "state.json"
        fresh = args.fresh or not self.state_path.exists()
        # Stages side by side on a CPU get one OpenMP thread each (two threads per stage on 2 cores ran 5-10x slower)
        self.env, self.cpu = dict(os.environ), not (args.device or "").startswith("cuda") and not _cuda()
        self.state = {"stages": {}} if fresh else json.loads(self.state_path.read_text())

    def flags(self, name):
        return [] if self.args.real else (SMOKE if self.args.smoke else TOY)[name]

    def common(self):
        extra = ["--device", self.args.device] if self.args.device else []
        return ["--ds", str(self.ds), "--seed", str(self.args.seed), "--no-progress"] + extra

    def run(self, name, cmd, product, resume=None):
        """Run `python <cmd>` unless stage `name` already finished; returns its product path."""
        return self.run_many([(name, cmd, product, resume)])[0]

    def run_many(self, stages):
        """Run independent stages side by side (one CPU core each); a training stage killed earlier
        (`resume` = its script name) continues from its last checkpoint with --resume."""
        procs, products = [], {}
        env = {**self.env, "OMP_NUM_THREADS": self.env.get("OMP_NUM_THREADS", "1")} if self.cpu and len(stages) > 1 \
            else self.env
        for name, cmd, product, resume in stages:
            done = self.state["stages"].get(name)
            if done and Path(done["product"]).exists():
                print(f"[demo] {name}: done before ({done['product']}), skipped")
                products[name] = Path(done["product"])
                continue
            if resume:
                self.refuse_live(resume)
            old = sorted((self.dir / "runs").glob(f"{resume}-ds{self.ds}-*/ckpt.pt")) if resume else []
            if old:
                stop = cmd[cmd.index("--stop-after"):][:2] if "--stop-after" in cmd else []  # a runtime flag
                cmd = [resume + ".py", "--resume", old[-1].parent, "--no-progress", *stop] + (
                    ["--device", self.args.device] if self.args.device else [])
            cmd = [sys.executable, str(ROOT / cmd[0])] + [str(c) for c in cmd[1:]]
            print(f"[demo] {name}: {' '.join(cmd[1:])}", flush=True)
            procs.append((name, cmd, product, time.time(),
                          subprocess.Popen(cmd, env=env, preexec_fn=die_with(os.getpid()))))
        group = stages[0][0]  # stages run side by side count once (the longest) in the total
        for name, cmd, product, start, proc in procs:
            _, status, use = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                for *_, other in procs:
                    other.poll() is None and other.kill()
                sys.exit(f"error: stage {name} failed (command above); fix it and run demo.py again to resume")
            products[name] = product() if callable(product) else Path(product)
            self.state["stages"][name] = {"cmd": " ".join(["python", os.path.relpath(cmd[1], ROOT)] + cmd[2:]), "seconds": time.time() - start,
                                          "group": group,
                                          "cpu_seconds": use.ru_utime + use.ru_stime, "product": str(products[name])}
            self.state_path.write_text(json.dumps(self.state, indent=1))
        return [products[name] for name, *_ in stages]

    def refuse_live(self, script):
        """No second trainer: a run folder of `script` still held by a live training (one that outlived a killed
        demo.py where stages cannot die with it) stops the demo."""
        for run in (self.dir / "runs").glob(f"{script}-ds{self.ds}-*"):
            try:
                common.lock_folder(run)  # free: taken and given back at once
            except common.OutputError as err:
                sys.exit(f"error: {err}, then run demo.py again")
            common.unlock_folder(run)

    def newest_run(self, script):
        runs = sorted((self.dir / "runs").glob(f"{script}-ds{self.ds}-*/ckpt.pt"), key=lambda p: p.stat().st_mtime)
        if not runs:
            sys.exit(f"error: the {script} stage left no checkpoint under {self.dir / 'runs'}")
        return runs[-1].parent


def die_with(parent):
    """preexec_fn of a stage: it gets SIGKILL when demo.py dies, also by kill -9 (Linux), so that no stage outlives
    the demo and a rerun never finds a second trainer at work."""
    def child():
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # demo.py died before that
            os._exit(1)
    return child


def main(argv=None):
    args = parse_args(argv)
    ds = args.ds
    if args.real:  # before anything is created
        ref = common.data_files(ds, args.data_dir or "data", split="ref")
        for f in ref:
            if not f.exists():
                sys.exit(f"error: {f} not found: get the real files with `python data/prepare.py download --ds {ds}`")
    chain = Chain(args)
    runs, out = chain.dir / "runs", chain.dir
    args.data_dir = args.data_dir or ("data" if args.real else str(chain.dir / "data"))
    data_flags = ["--data-dir", args.data_dir] + ([] if args.real else ["--toy"])
    if not args.real:
        ref = [Path(args.data_dir) / f"toy_ds{ds}_ref.hdf5"]
        chain.run("data", ["data/prepare.py", "toy", "--ds", ds, "--out", args.data_dir, "--seed", args.seed,
                           "--overwrite"] + chain.flags("data"), ref[0])
    train, opts = chain.common() + data_flags + ["--out", runs], chain.common() + ["--overwrite"]
    energy, shape = chain.run_many([  # independent: side by side
        ("energy", ["energy.py"] + train + chain.flags("energy"), lambda: chain.newest_run("energy"), "energy"),
        ("shape_vit", ["shape_vit.py"] + train + chain.flags("shape"), lambda: chain.newest_run("shape_vit"),
         "shape_vit")])
    cond = chain.run("energy_sample", ["energy.py", "--sample", "--ckpt", energy, "--like", ref[0], "--output",
                                       out / "cond.hdf5"] + opts + chain.flags("energy_sample"), out / "cond.hdf5")
    sample = ["--cond", cond] + opts + chain.flags("sample")
    samples = {"ViT": chain.run("sample", ["shape_vit.py", "--sample", "--ckpt", shape, "--output",
                                           out / "gen_vit.hdf5"] + sample, out / "gen_vit.hdf5")}
    if args.latent:
        vae = chain.run("vae", ["vae.py"] + train + chain.flags("vae"), lambda: chain.newest_run("vae"), "vae")
        latents = chain.run("vae_encode", ["vae.py", "--encode", "--ckpt", vae] + opts, vae / "latents.hdf5")
        samples["VAE reconstruction"] = chain.run(
            "vae_reconstruct", ["vae.py", "--reconstruct", "--ckpt", vae, "--like", ref[0], "--output",
                                out / "recon_vae.hdf5"] + opts, out / "recon_vae.hdf5")
        lavit = chain.run("latent_vit", ["latent_vit.py", "--latents", latents, "--out", runs] + chain.common()
                          + chain.flags("latent"), lambda: chain.newest_run("latent_vit"), "latent_vit")
        z = chain.run("latent_sample", ["latent_vit.py", "--sample", "--ckpt", lavit, "--output",
                                        out / "latents_lavit.hdf5"] + sample, out / "latents_lavit.hdf5")
        samples["laViT"] = chain.run("vae_decode", ["vae.py", "--decode", z, "--output", out / "gen_lavit.hdf5"]
                                     + opts, out / "gen_lavit.hdf5")
    if args.bespoke:
        solver = chain.run("bespoke", ["bespoke.py", "--ckpt", shape, "--cond", cond, "--out", runs]
                           + chain.common() + chain.flags("bespoke"), lambda: chain.newest_run("bespoke"))
        samples["ViT, bespoke 8 steps"] = chain.run(
            "bespoke_sample", ["shape_vit.py", "--sample", "--ckpt", shape, "--output", out / "gen_bespoke.hdf5"]
            + sample + ["--solver", "bespoke", "--bespoke-ckpt", solver], out / "gen_bespoke.hdf5")
    evals = {}
    for label, gen in samples.items():
        folder = out / "eval" / Path(gen).stem
        evals[label] = chain.run(f"evaluate {label}", ["evaluate.py", "-i", gen, "-r", *ref, "--ds", ds, "-m", "all",
                                                       "--out", folder, "--overwrite", "--seed", args.seed, "--no-progress"]
                                 + (["--device", args.device] if args.device else []) + chain.flags("evaluate"),
                                 folder / "summary.json")
    report = write_report(chain, evals)
    print(f"[demo] report: {report}")


# ----------------------------------------------------------------------------- report
def training_curves(chain, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    runs = [r for r in sorted((chain.dir / "runs").glob(f"*-ds{chain.ds}-*/ckpt.pt")) if "bespoke" not in str(r)]
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(4 * max(1, len(runs)), 3.2), squeeze=False)
    for ax, ckpt_path in zip(axes[0], runs):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        hist = ckpt.get("history", {})
        train = hist.get("train_loss", [])
        ax.plot(range(1, len(train) + 1), train, label="train")
        val = hist.get("val_loss", [])
        if val and isinstance(val[0], (list, tuple)):  # [[epoch, loss], ...]
            ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label="validation")
        elif val:
            every = max(1, len(train) // len(val))
            ax.plot([every * (i + 1) for i in range(len(val))], val, "o-", label="validation")
        ax.set(title=ckpt.get("script", ckpt_path.parent.name), xlabel="epoch", ylabel="loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def write_report(chain, evals):
    out = chain.dir / "report.md"
    training_curves(chain, chain.dir / "training_curves.png")
    lines = [f"# CaloDREAM demo: dataset {chain.ds} ({'real' if chain.args.real else 'synthetic'} showers)", "",
             "Judge the run from the pictures: reference (Geant4 or synthetic) filled, generated as lines. "
             "A classifier AUC of 0.5 means the generated showers cannot be told from the reference.", "",
             "## Stages (commands to redo each by hand; wall and CPU seconds)", "",
             "| stage | wall s | CPU s | command |", "|---|---|---|---|"]
    for name, s in chain.state["stages"].items():
        lines.append(f"| {name} | {s['seconds']:.0f} | {s.get('cpu_seconds', 0):.0f} | `{s['cmd']}` |")
    groups = {}
    for name, s in chain.state["stages"].items():
        groups[s.get("group", name)] = max(groups.get(s.get("group", name), 0), s["seconds"])
    lines += ["", f"Wall time of the chain {sum(groups.values()) / 60:.1f} min (energy and shape train side by side "
              "and count once; CPU seconds show the cost on an idle machine)."]
    lines += ["", "## Training curves", "", "![training curves](training_curves.png)", "",
              "## Scores", "", "| sample | AUC low-level | AUC high-level | JSD high | FPD x1e3 | KPD x1e3 |",
              "|---|---|---|---|---|---|"]
    summaries = {k: json.loads(Path(v).read_text()) for k, v in evals.items()}
    for label, s in summaries.items():
        low, high, fk = s.get("cls_low", {}), s.get("cls_high", {}), s.get("fpd_kpd", {})
        lines.append(f"| {label} | {_fmt(low.get('auc'))} | {_fmt(high.get('auc'))} | {_fmt(high.get('jsd'))} "
                     f"| {_fmt(fk.get('fpd'), 2)} | {_fmt(fk.get('kpd'), 3)} |")
    cfg = next(iter(summaries.values()), {}).get("config", {})
    if cfg.get("cls_epochs") is not None:
        lines += ["", f"Classifiers: width {cfg['cls_width']}, {cfg['cls_epochs']} epochs, {cfg.get('n_gen')} "
                  f"generated vs {cfg.get('n_ref')} reference showers (official: width 2048, 50 epochs, all showers). A shorter "
                  "classifier separates less, so its AUC is lower than the official evaluation's (README, bespoke.py "
                  "section: a 50-epoch classifier gives ~0.99 for a CPU-trained toy network)."]
    lines += ["", "## Separation powers (mean over layers; 0 = identical, 1 = disjoint)", "",
              "| feature | " + " | ".join(summaries) + " |", "|---|" + "---|" * len(summaries)]
    keys = sorted({k for s in summaries.values() for k in s.get("separation_power_mean", {})})
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(s.get("separation_power_mean", {}).get(k), 4)
                                              for s in summaries.values()) + " |")
    for label, path in evals.items():
        folder = Path(path).parent
        lines += ["", f"## Histograms: {label}", ""]
        for png in sorted(folder.glob("*.png")):
            lines.append(f"![{png.stem}]({os.path.relpath(png, chain.dir)})")
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    try:
        main()
    except common.DataError as err:  # e.g. the demo folder in use by another demo.py
        sys.exit(f"error: {err}")
