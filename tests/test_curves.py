"""tools/curves.py: flag merging, the learning-curve points (train, sample, score; resumable) and their table and plot.
The stages run in-process here (the tool starts them as subprocesses)."""
import importlib
import json
from pathlib import Path

import pytest

import curves

TINY = "--dim 12 --heads 2 --mlp 24 --depth 1 --epochs 1 --batch-size 32 --max-showers 96"


def test_merge_flags_replaces_same_named_flags_and_appends_new_ones():
    base = ["--preset", "small", "--epochs", "10", "--patch", "3", "8", "3"]
    assert curves.merge_flags(base, "--patch 3 16 1 --lr 2e-3") == \
        ["--preset", "small", "--epochs", "10", "--patch", "3", "16", "1", "--lr", "2e-3"]
    assert curves.merge_flags(base, "") == base and curves.merge_flags(["--x"], ["--y", 1]) == ["--x", "--y", "1"]


def test_train_flags_scale_the_epochs_of_the_one_x_recipe():
    args = curves.parse_args(["--out", "x", "--shape-flags", "--epochs 3 --lr 2e-3"])
    flags = curves.train_flags(args, "shape", 4)
    assert curves.flag_value(flags, "--epochs") == "12" and curves.flag_value(flags, "--lr") == "2e-3"
    assert curves.flag_value(flags, "--preset") == "small"  # the demo's own setting stays


@pytest.fixture
def in_process(monkeypatch):
    calls = []

    def run(script, *args, log=None, threads=1):
        calls.append(Path(script).stem)
        importlib.import_module(Path(script).stem).main([str(a) for a in args])
        return 1.0, 2.0
    monkeypatch.setattr(curves, "run", run)
    return calls


def test_curve_points_table_plot_and_skip(toy_ds2, tmp_path, in_process):
    argv = ["--data-dir", str(toy_ds2), "--out", str(tmp_path / "c"), "--mult", "1", "2", "--floor",
            "--shape-flags", TINY, "--energy-flags",
            "--preset tiny --epochs 1 --batch-size 32 --max-showers 96", "--sample-flags", "--steps 1 --n 24",
            "--energy-sample-flags", "--steps 1 --n 24", "--modes", "hist", "cls-high", "--cls-epochs", "1",
            "--cls-width", "8", "--device", "cpu"]
    out = curves.main(argv)
    points = {(p["net"], p["mult"]): p for p in json.loads((out / "curves.json").read_text())["points"]}
    assert set(points) == {("shape", 1), ("shape", 2), ("energy", 1), ("energy", 2), ("floor", 0)}
    assert points[("shape", 1)]["steps"] == 2 and points[("shape", 2)]["steps"] == 4  # 87 // 32 steps per epoch
    assert points[("energy", 2)]["epochs"] == 2 and "--preset tiny" in points[("energy", 1)]["stages"]["train"]["cmd"]
    for key in ("shape", 1), ("floor", 0):
        sep = points[key]["scores"]["separation_power"]
        assert set(curves.FEATURES) <= set(sep) and 0 <= points[key]["scores"]["cls_high"] <= 1
    assert 0 <= points[("energy", 1)]["scores"]["cls_u"] <= 1 and 0 <= points[("floor", 0)]["scores"]["cls_u"] <= 1
    assert points[("shape", 1)]["stages"]["train"] == {"cpu_s": 1.0, "wall_s": 2.0, "cmd": points[("shape", 1)][
        "stages"]["train"]["cmd"]}
    text = (out / "curves.md").read_text()
    assert "| shape | 2 | 4 | 1 |" in text and "| floor | - | - | - |" in text and (out / "curves.png").stat().st_size
    n_calls = len(in_process)
    curves.main(argv + ["--compare", str(out)])  # everything done: nothing runs again
    assert len(in_process) == n_calls
