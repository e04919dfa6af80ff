"""tools/latent_curves.py: the VAE, laViT and ViT points, the baselines, the table; the stages run in-process."""
import importlib
import json
import time
from pathlib import Path

import pytest

import latent_curves

TINY = ["--dim", "12", "--heads", "2", "--mlp", "24", "--depth", "1", "--batch-size", "16"]


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    def execute(cmd):
        c0 = time.process_time()
        module = importlib.import_module(Path(cmd[0]).stem)
        (module.main if hasattr(module, "main") else None)(cmd[1:])
        return True, "", time.process_time() - c0
    monkeypatch.setattr(latent_curves, "execute", execute)


def test_curves_of_every_kind(toy_ds2, tmp_path):
    out = tmp_path / "curves"
    argv = ["--data", str(toy_ds2), "--out", str(out), "--max-showers", "64", "--vae-channels", "2", "--vae-epochs", "2",
            "--vae-at", "1", "2", "--vae-flags", "--batch-size 16", "--lavit-epochs", "1", "--lavit-flags",
            "--preset small " + " ".join(TINY), "--vit-epochs", "1", "--vit-flags", "--preset small " + " ".join(TINY),
            "--sample-flags", "--solver euler --steps 1", "--n", "40", "--baselines", "--cls-epochs", "1",
            "--cls-width", "8"]
    table = latent_curves.main(argv)
    rows = json.loads((out / "curves.json").read_text())["rows"]
    got = sorted((r["point"], r["at"]) for r in rows)
    assert got == [("lavit-c2-e2-e1", "end"), ("mean", "end"), ("truth", "end"), ("vae-c2-e2", "1"),
                   ("vae-c2-e2", "2"), ("vit-e1", "end")]
    by = {(r["point"], r["at"]): r for r in rows}
    assert by[("vae-c2-e2", "1")]["steps"] == 3 and by[("vae-c2-e2", "2")]["steps"] == 6  # 58 / 16 per epoch
    assert 0 < by[("vae-c2-e2", "1")]["train_cpu_s"] < by[("vae-c2-e2", "2")]["train_cpu_s"]
    lavit = by[("lavit-c2-e2-e1", "end")]
    assert lavit["chain_cpu_s"] > lavit["train_cpu_s"] > 0 and lavit["vae"] == "vae-c2-e2"
    assert all(0 <= r["auc_low"] <= 1 and 0 <= r["sparsity"] <= 1 for r in rows)
    bce = json.loads((out / "curves.json").read_text())["bce"]
    assert 0 < bce["floor_bce"] < bce["mean_shower_bce"]  # the targets' entropy is below any prediction's BCE
    text = table.read_text()
    assert "| vae-c2-e2 @1 | 1 | 3 |" in text and (out / "curves.png").stat().st_size > 0
    # a second run redoes nothing: every step is in the points' records
    steps = {p.name: json.loads((p / "point.json").read_text())["steps"] for p in out.iterdir() if p.is_dir()}
    latent_curves.main(argv)
    assert steps == {p.name: json.loads((p / "point.json").read_text())["steps"] for p in out.iterdir() if p.is_dir()}
