"""tools/demo.py: the report writer (stage table, total time, scores, plots) and clear errors; the whole chain runs in
README's measured demo (too long for the suite)."""
import json
import subprocess
import sys
from pathlib import Path

import common
import demo

ROOT = Path(__file__).resolve().parents[1]


def test_report_from_a_finished_chain(tmp_path):
    out = tmp_path / "demo"
    chain = demo.Chain(demo.parse_args(["--out", str(out)]))
    stages = {"data": (10, None), "energy": (300, "energy"), "shape_vit": (200, "energy"), "sample": (100, None)}
    chain.state["stages"] = {k: {"cmd": f"python {k}.py", "seconds": s, "cpu_seconds": s, "group": g or k,
                                 "product": "x"} for k, (s, g) in stages.items()}
    run = out / "runs" / "energy-ds2-1"
    run.mkdir(parents=True)
    common.save_checkpoint(run / "ckpt.pt", script="energy", ds=2,
                           history={"train_loss": [1.0, 0.8], "val_loss": [[2, 0.9]]})
    ev = out / "eval" / "gen_vit"
    ev.mkdir(parents=True)
    (ev / "summary.json").write_text(json.dumps({"cls_low": {"auc": 0.9}, "cls_high": {"auc": 0.8, "jsd": 0.2},
                                                 "fpd_kpd": {"fpd": 12.5, "kpd": 0.5},
                                                 "separation_power_mean": {"e_layer": 0.01},
                                                 "config": {"cls_epochs": 10, "cls_width": 256, "n_gen": 30,
                                                            "n_ref": 40}}))
    (ev / "e_layer.png").write_bytes(b"png")
    text = demo.write_report(chain, {"ViT": ev / "summary.json"}).read_text()
    assert "| energy | 300 | 300 | `python energy.py` |" in text
    assert "Wall time of the chain 6.8 min" in text  # 10 + max(300, 200) + 100 s: side-by-side stages once
    assert "| ViT | 0.900 | 0.800 | 0.200 | 12.50 | 0.500 |" in text and "| e_layer | 0.0100 |" in text
    assert "Classifiers: width 256, 10 epochs, 30 generated vs 40 reference showers" in text
    assert "![e_layer](eval/gen_vit/e_layer.png)" in text and (out / "training_curves.png").stat().st_size > 0


def test_real_data_missing_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "tools/demo.py", "--real", "--data-dir", str(tmp_path), "--out", str(tmp_path / "d")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "data/prepare.py download" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and not (tmp_path / "d").exists()  # no demo folder left


def test_finished_stages_are_skipped(tmp_path, capsys):
    chain = demo.Chain(demo.parse_args(["--out", str(tmp_path)]))
    product = tmp_path / "done.txt"
    product.write_text("x")
    chain.state["stages"]["data"] = {"cmd": "python data.py", "seconds": 1, "product": str(product)}
    assert chain.run("data", ["data.py", "--never-run"], product) == product
    assert "data: done before" in capsys.readouterr().out
