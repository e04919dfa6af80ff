"""tools/precision_study.py: the 2x2 precision grid (train {fp32, bf16} x sample {fp32, bf16}) and the bespoke
local-loss comparison on tiny runs; the stages run in-process here (the tool starts them as subprocesses)."""
import importlib
import json
from pathlib import Path

import pytest
import torch

import common
import precision_study

CELLS = [("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "fp32"), ("bf16", "bf16")]


@pytest.fixture
def calls(monkeypatch):
    names = []

    def run(script, *args):
        names.append(Path(str(script)).name)
        module, argv = importlib.import_module(Path(str(script)).stem), [str(a) for a in args]
        module.train(module.parse_args(argv)) if module.__name__ == "bespoke" else module.main(argv)
        return ""
    monkeypatch.setattr(precision_study, "run", run)
    return names


def test_grid_and_bespoke_on_tiny_runs(toy_ds2, tmp_path, calls):
    argv = ["--train", str(toy_ds2 / "toy_ds2_train.hdf5"), "--ref", str(toy_ds2 / "toy_ds2_ref.hdf5"), "--parts",
            "shape", "energy", "bespoke", "--seeds", "3", "--n", "24", "--out", str(tmp_path),
            "--shape-flags", "--preset small --dim 12 --heads 2 --mlp 24 --depth 1 --epochs 2 --batch-size 32 "
                             "--max-showers 200",
            "--energy-flags", "--preset tiny --epochs 2 --batch-size 32 --max-showers 200",
            "--shape-sample-flags", "--steps 1", "--energy-sample-flags", "--steps 1",
            "--shape-eval-flags", "-m hist cls-high --cls-width 8 --cls-epochs 1",
            "--energy-eval-flags", "-m cls-u --cls-width 8 --cls-epochs 1",
            "--bespoke-steps", "2", "--bespoke-flags", "--preset small --pool 12 --n-val 4 --iters 2 --batch-size 4"]
    tables = precision_study.main(argv)
    rows = {p: json.loads((tmp_path / f"{p}.json").read_text())["rows"] for p in ("shape", "energy", "bespoke")}
    for part, script in (("shape", "shape_vit"), ("energy", "energy")):
        assert [(r["train"], r["sample"]) for r in rows[part]] == CELLS
        runs = {p: precision_study.run_dir(tmp_path / part / "seed3" / f"train-{p}", part, 2) for p in ("fp32", "bf16")}
        ckpts = {p: common.load_checkpoint(r, script=script, ds=2) for p, r in runs.items()}
        for r in rows[part]:  # the validation loss recomputed by the tool is the training script's own number
            if r["train"] == r["sample"]:
                assert r["val_loss"] == ckpts[r["train"]]["history"]["val_loss"][-1][1]
            assert (r["fit_loss"] is None) == (part == "energy")
        assert ckpts["bf16"]["config"]["precision"] == "bf16"
        weights = [ckpts[p]["model"] for p in ("fp32", "bf16")]
        assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        # bf16 sampling really runs in bf16: the same x0 gives a different (nearby) sample
        assert [r["paired_change"] == 0 for r in rows[part]] == [True, False, True, False]
        assert all(0 < r["paired_change"] < 0.1 for r in rows[part][1::2])
        assert all(r["train_cpu_s"] > 0 and r["sample_cpu_s"] > 0 for r in rows[part])
        assert "| train bf16 / sample bf16 |" in tables[part].read_text()
    assert all(0 <= r["auc_high"] <= 1 and r["sep_mean"] > 0 for r in rows["shape"])
    assert all(0 <= r["auc_u"] <= 1 for r in rows["energy"])
    assert sorted((r["n"], r["loss"]) for r in rows["bespoke"]) == [(2, "local"), (2, "local-mse")]
    assert rows["bespoke"][0]["euler"] == rows["bespoke"][1]["euler"] > 0  # one reference pool for both losses
    assert "| 2 |" in tables["bespoke"].read_text()
    n_calls = len(calls)
    assert precision_study.main(argv) == tables and len(calls) == n_calls  # finished steps are not run again


def test_tables_mean_std_and_paired_differences():
    assert precision_study.mean_std([1.0, 2.0, 3.0]) == "2 +- 1" and precision_study.mean_std([None]) == "-"
    rows = [dict(part="energy", seed=s, train=t, sample=p, auc_u=0.5 + 0.125 * s + (0.25 if t == "bf16" else 0))
            for s in (0, 1) for t, p in CELLS]
    lines = precision_study.grid_table(rows, "energy")
    assert "| auc_u | 0.5625 +- 0.088 | 0.5625 +- 0.088 | 0.8125 +- 0.088 | 0.8125 +- 0.088 |" in lines
    assert "| auc_u | 0 +- 0 | 0.25 +- 0 | 0.25 +- 0 |" in lines  # paired by seed: the seed offset cancels
