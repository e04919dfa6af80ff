"""tools/loss_split.py: the validation loss split by voxel class and t adds up to the run's masked loss."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import loss_split  # noqa: E402


def test_split_shapes_and_mean(chain, toy_ds2, tmp_path):
    out = loss_split.main(["--ckpt", str(chain["shape_vit"]), "--files", str(toy_ds2 / "toy_ds2_train.hdf5"),
                           "--bins", "4", "--json", str(tmp_path / "s.json")])
    assert len(out["empty"]) == len(out["hit"]) == 4 and (tmp_path / "s.json").exists()
    assert all(np.isfinite(out["empty"] + out["hit"])) and 0 < out["share_empty"] < 1
    # the mean of each class lies within its per-bin values
    for k in ("empty", "hit"):
        assert min(out[k]) - 1e-9 <= out["mean"][k] <= max(out[k]) + 1e-9
    again = loss_split.main(["--ckpt", str(chain["shape_vit"]), "--files", str(toy_ds2 / "toy_ds2_train.hdf5"),
                             "--bins", "4"])
    assert again["mean"] == out["mean"]  # seeded
