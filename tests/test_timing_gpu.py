"""tools/timing_gpu.py on the CPU: the steps and their commands, stopping and skipping at the limits, the parallel
test runner, and the DDP worker under torchrun (gloo here; NCCL on CUDA)."""
import json
import sys

from conftest import QUIET, ROOT, cli
import timing_gpu


def test_steps_and_their_commands(tmp_path):
    args = timing_gpu.parse_args(["--out", str(tmp_path)])
    steps = {name: (limit, cmd) for name, limit, cmd, _ in timing_gpu.steps(args, tmp_path, tmp_path / "scratch")}
    assert list(steps) == list(timing_gpu.STEPS) and args.budget == 600 and args.device == "cuda"
    timing = " ".join(map(str, steps["timing"][1]))
    assert "tools/timing.py --device cuda --size paper --sections chain --settings paper fast bespoke8" in timing
    assert "--batch-sizes 1 100 10000" in timing and "--max-row-seconds 20" in timing
    assert "--compile" in steps["compile"][1] and "--compile" not in steps["training"][1]
    nccl = steps["nccl"][1][-1]
    assert "torch.distributed.run --standalone" in nccl and "tools/timing_gpu.py --ddp-worker shape_vit" in nccl
    assert f"--out {tmp_path / 'scratch'}/nccl/runs" in nccl  # big files stay out of --out


def test_a_step_is_stopped_at_its_limit_or_skipped(tmp_path):
    sleep, fail = [sys.executable, "-c", "import time; time.sleep(30)"], [sys.executable, "-c", "raise SystemExit(3)"]
    import time
    rc, secs, status = timing_gpu.run_step("s", 1, sleep, ROOT, tmp_path / "s.log", time.time() + 100)
    assert status == "stopped after 1 s" and rc != 0 and secs < 10
    assert timing_gpu.run_step("f", 10, fail, ROOT, tmp_path / "f.log", time.time() + 100)[::2] == (3, "failed")
    assert timing_gpu.run_step("d", 10, fail, ROOT, tmp_path / "d.log", time.time() + 5) == (
        None, 0.0, "skipped: deadline")


def test_the_parallel_test_runner(tmp_path):
    (tmp_path / "test_good.py").write_text("def test_a():\n    assert 1\n")
    (tmp_path / "test_bad.py").write_text("def test_b():\n    assert 0\n")
    import time
    rc, _, status = timing_gpu.run_tests(tmp_path / "out", tmp_path / "scratch", 120, time.time() + 120, 2,
                                         sorted(tmp_path.glob("test_*.py")))
    assert rc == 1 and status == "test_bad failed (1)"
    assert json.loads((tmp_path / "out" / "tests" / "results.json").read_text()) == {"test_bad": "failed (1)",
                                                                                      "test_good": "ok"}


def test_ddp_worker_joins_a_process_group_of_one(toy_ds2, tmp_path):
    res = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", ROOT / "tools" / "timing_gpu.py",
              "--ddp-worker", "energy", "--files", toy_ds2 / "toy_ds2_train.hdf5", "--preset", "tiny", "--max-showers",
              "100", "--epochs", "1", "--batch-size", "32", "--out", tmp_path, *QUIET)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "process group gloo of 1" in res.stdout and "training DistributedDataParallel on cpu" in res.stdout
    assert list(tmp_path.glob("energy-ds2-*/ckpt.pt"))
