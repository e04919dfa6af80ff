"""The shape ViT's CFM validation loss split by the voxel's class in the target (empty or hit) and by the time t:
where a network on a loss plateau fails (docs/RESULTS.md, learning curves).

    python tools/loss_split.py --ckpt runs/shape_vit-ds2-<time>            # its own training file and split
    python tools/loss_split.py --ckpt RUN --files data/toy_ds2_train.hdf5 --draws 4 --json split.json

The validation showers are the run's own (common.split_indices with its seed and fraction); each is scored with
`--draws` fresh (t, x0) pairs; voxels never hit in training are left out, as in the run's validation loss.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a shape_vit run folder or its ckpt.pt")
    p.add_argument("--files", nargs="+", help="training files (default: the run's)")
    p.add_argument("--draws", type=int, default=2, help="(t, x0) draws per validation shower")
    p.add_argument("--bins", type=int, default=5, help="equal bins of t in [0, 1]")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the numbers here")
    return common.check_args(p.parse_args(argv))


@torch.no_grad()
def loss_split(ckpt, files, draws=2, bins=5, batch_size=100, seed=1):
    """{'empty'|'hit': [mean squared error per t bin], 'mean': {...}, 'share_empty': ..., 'epoch', 'step'}."""
    cfg, stats, ds = ckpt["config"], ckpt["stats"], ckpt["config"]["ds"]
    if not files:
        raise ValueError("the run names no training files (it used --toy or --data-dir): give --files")
    e_inc, showers = common.load_showers(files, ds, cfg.get("max_showers"), progress=False)
    _, val = common.split_indices(len(showers), cfg["val_fraction"], cfg["seed"])
    model = common.build_vit(ckpt)
    x, e = torch.from_numpy(showers[val]), torch.from_numpy(e_inc[val])
    z = common.showers_to_net(x, ds, stats)
    empty = (x == 0).reshape(z.shape)
    seen = common.seen_voxels(stats).reshape(1, *z.shape[1:]).bool()
    cond = common.shape_condition(e, common.energies_to_u(e, common.layer_energies(x, ds)), stats["cond"])
    gen = torch.Generator().manual_seed(seed)
    sums, counts = np.zeros((2, bins)), np.zeros((2, bins))
    for _ in range(draws):
        for s in range(0, len(z), batch_size):
            x1, c, em = z[s:s + batch_size], cond[s:s + batch_size], empty[s:s + batch_size]
            err, t = common.cfm_error(model, x1, c, gen)
            b = (t * bins).long().clamp(max=bins - 1)
            for k, mask in enumerate((em & seen, ~em & seen)):
                m = mask.reshape(len(x1), -1).double()
                np.add.at(sums[k], b.numpy(), (err.reshape(len(x1), -1).double() * m).sum(1).numpy())
                np.add.at(counts[k], b.numpy(), m.sum(1).numpy())
    per_bin = sums / np.maximum(counts, 1)
    return {"epoch": ckpt["epoch"], "step": ckpt["step"], "bins": bins,
            "empty": per_bin[0].tolist(), "hit": per_bin[1].tolist(),
            "mean": {"empty": sums[0].sum() / max(1, counts[0].sum()), "hit": sums[1].sum() / max(1, counts[1].sum())},
            "share_empty": counts[0].sum() / max(1, counts.sum())}


def main(argv=None):
    args = parse_args(argv)
    ckpt = common.load_checkpoint(args.ckpt, "shape_vit")  # a run folder or its ckpt.pt
    out = loss_split(ckpt, args.files or ckpt["config"]["files"], args.draws, args.bins, args.batch_size, args.seed)
    edges = np.linspace(0, 1, args.bins + 1)
    print(f"epoch {out['epoch']}, step {out['step']}; share of empty voxels {out['share_empty']:.3f}")
    for k in ("empty", "hit"):
        print(f"  {k:5s} " + "  ".join(f"t {edges[i]:.1f}-{edges[i + 1]:.1f}: {v:.3f}" for i, v in enumerate(out[k]))
              + f"   mean {out['mean'][k]:.4f}")
    if args.json:
        common.atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(out, indent=1)))
    return out


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
