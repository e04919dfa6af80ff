"""DDP (torchrun) equivalence: a tiny training on 2 CPU processes (gloo) ends with the same weights and
train loss as the plain single-process run with the same global batch (issue 9, "Scale")."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common

ROOT = Path(__file__).resolve().parents[1]


def run_both(script, args, tmp_path):
    """Train once as a plain process and once under torchrun with 2 gloo ranks; return both checkpoints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpts = []
    for name, launcher in (("plain", []), ("ddp", ["-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node=2"])):
        out = tmp_path / name
        cmd = [sys.executable, *launcher, str(ROOT / script), *args, "--out", str(out), "--device", "cpu",
               "--no-progress"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        runs = sorted(out.iterdir())
        assert len(runs) == 1, runs  # rank 0 alone made the run folder
        ckpts.append(common.load_checkpoint(runs[0], script=Path(script).stem))
    return ckpts


def assert_same(plain, ddp, rtol=1e-5, skip=()):
    """Same weights to rtol (of max(|largest entry|, 0.1)) and the same train losses. Attention over a single
    key (the energy net's encoder self-attention and cross-attention) gives its query/key projections an exact
    zero gradient, which Adam turns rounding noise of either run into lr-sized steps: for in_proj_* only the
    value third is compared (the function itself is compared by the callers)."""
    assert plain["epoch"] == ddp["epoch"] and plain["step"] == ddp["step"]
    assert plain["model"].keys() == ddp["model"].keys()
    for k, a in plain["model"].items():
        b = ddp["model"][k]
        if any(k.endswith(s) for s in skip):
            continue
        if "in_proj_" in k:
            a, b = a[2 * len(a) // 3:], b[2 * len(b) // 3:]
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * max(a.abs().max().item(), 0.1), msg=k)
    assert ddp["history"]["train_loss"] == pytest.approx(plain["history"]["train_loss"], rel=1e-5)


def test_energy_ddp_matches_single_process(toy_ds2, tmp_path):
    # 351 training events, batch 100: 4 steps per epoch, the last one of 51 (25 + 26 per rank)
    args = ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--max-showers", "390", "--preset", "tiny",
            "--epochs", "2", "--batch-size", "100", "--lr", "1e-3", "--val-every", "1"]
    plain, ddp = run_both("energy.py", args, tmp_path)
    assert_same(plain, ddp)
    import energy
    nets = []
    for ckpt in (plain, ddp):
        nets.append(energy.build_model(ckpt["config"]))
        nets[-1].load_state_dict(ckpt["model"])
    g = torch.Generator().manual_seed(0)
    z, c_e, x_t, t = torch.randn(64, 45, generator=g), torch.rand(64, generator=g), torch.randn(64, 45, generator=g), \
        torch.rand(64, 45, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(nets[1](z, c_e, x_t, t), nets[0](z, c_e, x_t, t), rtol=1e-4, atol=1e-4)


def test_shape_vit_ddp_matches_single_process(toy_ds2, tmp_path):
    # 351 training showers, batch 51: 6 steps per epoch of 25 + 26 showers per rank
    args = ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--max-showers", "390", "--dim", "12", "--heads", "2",
            "--mlp", "24", "--depth", "1", "--patch", "3", "16", "9", "--epochs", "2", "--batch-size", "51"]
    plain, ddp = run_both("shape_vit.py", args, tmp_path)
    assert_same(plain, ddp)
    assert ddp["history"]["val_loss"] == pytest.approx(plain["history"]["val_loss"], rel=1e-5)


def test_latent_vit_ddp_matches_single_process(toy_ds2, tmp_path):
    import vae
    run = vae.main(["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--out", str(tmp_path / "vae"), "--channels", "2",
                    "--batch-size", "8", "--max-showers", "24", "--epochs", "1", "--no-progress", "--device", "cpu"])
    # 54 training showers, batch 13: 4 steps per epoch of 6 + 7 showers per rank
    args = ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--vae", str(run), "--preset", "small", "--dim", "12",
            "--depth", "1", "--heads", "2", "--mlp", "24", "--batch-size", "13", "--max-showers", "60", "--epochs", "2"]
    plain, ddp = run_both("latent_vit.py", args, tmp_path)
    assert_same(plain, ddp)
    assert ddp["history"]["val_loss"] == pytest.approx(plain["history"]["val_loss"], rel=1e-5)


def test_vae_ddp_matches_single_process(toy_ds2, tmp_path):
    """BatchNorm under DDP uses the global batch's statistics (vae.BatchNorm3d; nn.SyncBatchNorm is GPU-only),
    so the BatchNorm buffers and the calibrated cut match too."""
    # 54 training showers, batch 13: 4 steps per epoch of 6 + 7 showers per rank
    args = ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--max-showers", "60", "--channels", "2",
            "--batch-size", "13", "--epochs", "2", "--val-every", "1"]
    plain, ddp = run_both("vae.py", args, tmp_path)
    # Biases right before a BatchNorm (conv1's, the condition Linear's, and cond_net.2's, which shifts c for every
    # shower alike) add a per-channel constant that the BatchNorm removes: an exact zero gradient that Adam turns
    # into noise-driven steps (as above). bn1's running means follow them; the training-mode function does not.
    assert_same(plain, ddp, skip=("cond_net.2.bias", "cond.bias", "conv1.conv.bias", "bn1.running_mean"))
    assert ddp["history"]["val_loss"] == pytest.approx(plain["history"]["val_loss"], rel=1e-3)  # running means
    assert ddp["cut"] == pytest.approx(plain["cut"], rel=1e-4)
    import vae
    nets = [vae.build_vae(ckpt).train() for ckpt in (plain, ddp)]  # batch statistics
    g = torch.Generator().manual_seed(0)
    frac, cond = torch.rand(4, 1, 45, 16, 9, generator=g), torch.randn(4, 46, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(nets[1].encode(frac, cond)[0], nets[0].encode(frac, cond)[0], rtol=1e-4, atol=1e-5)


def test_sampling_under_torchrun_writes_one_file(toy_ds2, tmp_path):
    """2 gloo ranks share 25 showers (12 + 13) and rank 0 joins the parts: one valid file, in the reference's
    order, nothing lost or repeated (with the true u's every shower's layer sums are fixed by its row, less the
    voxels below the 15.15 keV threshold)."""
    import numpy as np
    import shape_vit
    ref = str(toy_ds2 / "toy_ds2_ref.hdf5")
    run = shape_vit.main(["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--max-showers", "40", "--dim", "12",
                          "--heads", "2", "--mlp", "24", "--depth", "1", "--patch", "3", "16", "9", "--epochs", "1",
                          "--batch-size", "16", "--out", str(tmp_path / "runs"), "--no-progress", "--device", "cpu"])
    out = tmp_path / "gen.hdf5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "shape_vit.py"),
           "--sample", "--ckpt", str(run), "--energy-ckpt", "truth", "--like", ref, "--showers", "25", "--steps", "2",
           "--output", str(out), "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    e_inc, showers = common.load_showers([out], 2, progress=False)
    e_ref, u_ref = shape_vit.reference_condition(ref, 2, 25, with_u=True)
    assert np.array_equal(e_inc, e_ref.numpy().astype(np.float32))
    lost = common.u_to_energies(e_ref, u_ref) - common.layer_energies(torch.from_numpy(showers).double(), 2)
    expected = common.u_to_energies(e_ref, u_ref)
    assert (lost >= -1e-6 * expected).all()  # float32 file read
    assert (lost < 16 * 9 * common.MIN_ENERGY).all()  # at most the layer's 144 voxels below the threshold
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.hdf5", "gen.hdf5.json", "runs"]  # no parts left
    assert json.loads(Path(f"{out}.json").read_text())["ranks"] == 2
