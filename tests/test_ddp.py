"""Training under torchrun (2 gloo processes on the CPU): every trainer runs, its loss falls, and the two ranks end
with identical weights (DDP averages the gradients). BatchNorm running statistics are each rank's own between
forwards (DDP copies rank 0's at the start of each); the checkpoint holds rank 0's."""
import shlex

import torch

import common
from conftest import ROOT, TINY_VIT, cli


def test_four_trainers_under_torchrun(toy_ds2, chain, tmp_path):
    train = str(toy_ds2 / "toy_ds2_train.hdf5")
    common_flags = f"--out {tmp_path} --device cpu --no-progress --val-every 1"
    jobs = {"energy": f"--files {train} --preset tiny --max-showers 300 --epochs 3 --batch-size 32 --lr 2e-3",
            "shape_vit": f"--files {train} --max-showers 200 --epochs 3 {shlex.join(TINY_VIT)}",
            "vae": f"--files {train} --max-showers 96 --channels 2 --batch-size 16 --epochs 3",
            "latent_vit": f"--latents {chain['latents']} --epochs 3 {shlex.join(TINY_VIT[:-2])} --batch-size 16 --lr 1e-2"}
    res = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / "tests" / "ddp_worker.py",
              tmp_path, *(f"{k} {v} {common_flags}" for k, v in jobs.items()), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    for script in jobs:
        runs = list(tmp_path.glob(f"{script}-ds2-*"))
        assert len(runs) == 1, runs  # rank 0 alone made the run folder
        ckpt = common.load_checkpoint(runs[0], script=script)
        losses = ckpt["history"]["train_loss"]
        assert ckpt["epoch"] == 3 and losses[-1] < losses[0], (script, losses)
        ranks = [torch.load(tmp_path / f"{script}_rank{r}.pt") for r in (0, 1)]
        for k in ranks[0]:
            assert "running_" in k or torch.equal(ranks[0][k], ranks[1][k]), (script, k)
            assert torch.equal(ranks[0][k].cpu(), ckpt["model"][k]), (script, k)
