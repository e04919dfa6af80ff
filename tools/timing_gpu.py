"""The GPU checks in one run within a time budget: the timing table (tools/timing.py), training throughput with
torch.compile off and on, one run under torchrun on NCCL, the test suite on the CUDA machine, extra settings.

    python tools/timing_gpu.py --out /tmp/gpu --budget 600        # one GPU machine: about 10 minutes
    python tools/timing_gpu.py --device cpu --size tiny --steps env timing nccl --out /tmp/gpu-smoke   # wiring
Steps run in that order as subprocesses, each into --out: timing/, training/, compile/, extra/ (the JSON and
markdown of tools/timing.py), tests/ (a log per test file, results.json) and a log per step (env.log, nccl.log, ...);
the toy data, the run folders and the tests' temporary files go to --scratch, so --out stays small. A step is stopped at its own limit or at the deadline (--budget seconds after the start;
what it wrote stays), and one that would start with less than 20 s left is skipped. summary.md and summary.json list
every step with its exit status, seconds and status; the table of each timing run is its timing-*.md.

nccl: torchrun with one process per visible GPU trains the paper ViT for 2 epochs on 2,000 toy showers. With one
process the stages treat the run as a plain one (common.init_distributed and wrap_model skip the process group and
DDP for a world of 1), so this tool's --ddp-worker joins the process group (NCCL on CUDA, gloo on the CPU) itself and
has the stage wrap its network in DDP: the all-reduce path then runs on NCCL even on one GPU.
tests: every test file in its own pytest process (its own --basetemp), 8 at a time.
"""
import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
STEPS = ("env", "timing", "training", "compile", "nccl", "tests", "extra")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of every step's output (logs, tables: small)")
    p.add_argument("--scratch", help="folder of data, runs and test temporaries (default: a new temporary folder)")
    p.add_argument("--budget", type=float, default=600.0, help="seconds from the start to the deadline")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to check the wiring")
    p.add_argument("--size", default="paper", choices=("paper", "small", "tiny"), help="network sizes of timing")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--parallel", type=int, default=8, help="test files at a time")
    return p.parse_args(argv)


def steps(args, out, scratch):
    """[(name, limit in s, argv, cwd)]; 'tests' is expanded later, one process per test file."""
    t = [PY, "tools/timing.py", "--device", args.device, "--size", args.size]
    small = args.size == "tiny"  # wiring checks on the CPU: the fewest rows
    chain = ["--settings", "rk4-1/bespoke-2", "--batch-sizes", "1", "--ds", "2"] if small else [
        "--settings", "paper", "fast", "bespoke8", "--batch-sizes", "1", "100", "10000", "--min-showers", "5",
        "--max-row-seconds", "20"]
    train = ["--train-batch", "2", "--train-steps", "1", "--ds", "2", "--peak-n", "64"] if small else []
    toy, runs = scratch / "nccl" / "data", scratch / "nccl" / "runs"
    vit = ["--preset", "small", "--dim", "12", "--heads", "2", "--mlp", "24", "--depth", "1"] if small else []
    return [
        ("env", 30, [PY, "-c", ENV_PROBE], ROOT),
        ("timing", 240, [*t, "--sections", "chain", *chain, "--repeats", "3", "--budget", "5", "--out", out / "timing"],
         ROOT),
        ("training", 90, [*t, "--sections", "training", "--precision", "fp32", "bf16", *train, "--out",
                          out / "training"], ROOT),
        ("compile", 150, [*t, "--sections", "training", "--compile", "--train", "vit", "lavit", "--ds", "2",
                          "--train-warmup", "3", *train[:4], "--out", out / "compile"], ROOT),
        ("nccl", 90, ["sh", "-c", f"{PY} data/prepare.py toy --ds 2 --n {200 if small else 2000} --n-ref 10 --out "
                      f"{toy} --no-progress && {PY} -m torch.distributed.run --standalone --nproc_per_node="
                      f"{nproc(args.device)} tools/timing_gpu.py --ddp-worker shape_vit --files "
                      f"{toy}/toy_ds2_train.hdf5 --epochs 2 --batch-size 64 --out {runs} --device {args.device} "
                      f"--no-progress {' '.join(vit)}"], ROOT),
        ("tests", 200, None, ROOT),
        ("extra", 120, [*t, "--sections", "chain", "--settings", "submission", "bespoke16", "--batch-sizes", "100",
                        *(["--ds", "2"] if small else []), "--repeats", "2", "--out", out / "extra"], ROOT)]


ENV_PROBE = """import os, subprocess, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count(), "cpus", os.cpu_count(), "load", os.getloadavg())
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i))
if torch.cuda.is_available():
    print("nccl", torch.cuda.nccl.version())
    try:
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
    except (OSError, subprocess.SubprocessError) as err:
        print("nvidia-smi:", err)
"""


def nproc(device):
    if device == "cpu":
        return 1
    import torch
    return max(1, torch.cuda.device_count())


def run_step(name, limit, argv, cwd, log, deadline):
    """Run argv in its own process group; stop the whole group at min(limit, deadline). (rc, seconds, status)."""
    left = deadline - time.time()
    if left < 20:
        return None, 0.0, "skipped: deadline"
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=min(limit, left))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, status = proc.wait(), f"stopped after {min(limit, left):.0f} s"
    return rc, time.time() - start, status


def run_tests(out, scratch, limit, deadline, parallel, files=None):
    """Every tests/test_*.py (or `files`) in its own pytest process, `parallel` at a time; (rc, seconds, status)."""
    files, logs = files or sorted((ROOT / "tests").glob("test_*.py")), out / "tests"
    logs.mkdir(parents=True, exist_ok=True)
    start, end = time.time(), min(deadline, time.time() + limit)
    pending, running, results = list(files), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            f = pending.pop(0)
            log = open(logs / f"{f.stem}.log", "w")
            running[f.stem] = (subprocess.Popen([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                                                 str(scratch / "tests" / f.stem), str(f)], cwd=ROOT, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True), log)
        for stem, (proc, log) in list(running.items()):
            if proc.poll() is not None or time.time() > end:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    results[stem] = "stopped"
                else:
                    results[stem] = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
                log.close()
                del running[stem]
        if time.time() > end:
            results.update({f.stem: "not started" for f in pending})
            pending = []
        time.sleep(0.5)
    (logs / "results.json").write_text(json.dumps(results, indent=1))
    bad = {k: v for k, v in results.items() if v != "ok"}
    return int(bool(bad)), time.time() - start, "ok" if not bad else "; ".join(f"{k} {v}" for k, v in bad.items())


def ddp_worker(script, argv):
    """Under torchrun: join the process group even with one process and let the stage wrap its network in DDP."""
    import torch
    sys.path.insert(0, str(ROOT))
    import common
    cuda = torch.cuda.is_available() and "cpu" not in argv
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    print(f"process group {torch.distributed.get_backend()} of {torch.distributed.get_world_size()}", flush=True)
    wrap = common.wrap_model

    def wrap_ddp(model, device, world, compile=False):  # world >= 2: the DDP branch, on the group of this run
        net = wrap(model, torch.device("cuda", local) if device.type == "cuda" else device, max(world, 2), compile)
        print(f"training {type(net).__name__} on {device}", flush=True)
        return net
    common.wrap_model = wrap_ddp
    importlib.import_module(script).main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--ddp-worker"]:
        return ddp_worker(argv[1], argv[2:])
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="timing_gpu-")).resolve()
    deadline, summary = time.time() + args.budget, []
    for name, limit, cmd, cwd in steps(args, out, scratch):
        if name not in args.steps:
            continue
        if name == "tests":
            rc, secs, status = run_tests(out, scratch, limit, deadline, args.parallel) if deadline - time.time() >= 20 else (
                None, 0.0, "skipped: deadline")
        else:
            rc, secs, status = run_step(name, limit, cmd, cwd, out / f"{name}.log", deadline)
        summary.append(dict(step=name, rc=rc, seconds=round(secs, 1), status=status))
        print(f"{name}: {status} ({secs:.0f} s)", flush=True)
        lines = ["| step | exit | seconds | status |", "|---|---|---|---|"] + [
            f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['status']} |" for s in summary]
        (out / "summary.md").write_text("\n".join(lines) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print((out / "summary.md").read_text())
    return summary


if __name__ == "__main__":
    main()
