"""tools/: the energy steps study and the Fig. 9 sweep run the stages and tabulate their files. The stages run
in-process here (the tools start them as subprocesses; the copy test runs every stage's command line)."""
import importlib
import json
from pathlib import Path

import pytest

import common
import energy_steps
import fig9_sweep


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    def run(script, *args):
        importlib.import_module(Path(str(script)).stem).main([str(a) for a in args])
        return ""
    for tool in (energy_steps, fig9_sweep):
        monkeypatch.setattr(tool, "run", run)


def test_energy_steps_study(chain, toy_ds2, tmp_path):
    out = energy_steps.main(["--ckpt", str(chain["energy"]), "--like", str(toy_ds2 / "toy_ds2_ref.hdf5"), "--n", "60",
                             "--solver", "rk4", "euler", "--nfe", "4", "--cls-epochs", "1", "--cls-width", "8",
                             "--device", "cpu", "--out", str(tmp_path)])
    rows = json.loads((out / "steps.json").read_text())["rows"]
    assert [(r["solver"], r["steps"], r["nfe"]) for r in rows] == [("rk4", 1, 4), ("euler", 4, 4)]
    assert all(0 <= r["auc"] <= 1 and r["seconds"] > 0 for r in rows) and rows[0]["auc_minus_ref"] == 0
    assert "| euler | 4 | 4 |" in (out / "steps.md").read_text()


def test_fig9_sweep(chain, tmp_path):
    common.save_checkpoint(tmp_path / "bns.pt", script="bespoke", ds=2, n=2, loss="local",
                           solver=common.BespokeSolver(2).state_dict())
    out = fig9_sweep.main(["--ckpt", str(chain["shape_vit"]), "--cond", str(chain["cond"]), "--like",
                           str(chain["gen"]), "--n", "30", "--nfe", "2", "--rk4-reference", "4", "--bespoke",
                           str(tmp_path / "bns.pt"), "--cls-epochs", "1", "--cls-width", "8", "--device", "cpu",
                           "--out", str(tmp_path / "sweep")])
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["solver"], r["nfe"], r["steps"]) for r in rows] == [("rk4", 4, 1), ("bns-local", 2, 2),
                                                                   ("euler", 2, 2), ("midpoint", 2, 1)]
    assert all(0 <= r["auc_high"] <= 1 and 0 <= r["auc_low"] <= 1 and r["ms_per_shower"] > 0 for r in rows)
    assert (out / "sweep.png").stat().st_size > 0 and "bns-local" in (out / "sweep.md").read_text()
    assert not list(out.glob("gen_*.hdf5"))  # generated files are removed unless --keep-showers
