"""tools/timing.py: sampler settings, random-weight checkpoints the stages read, the chain's CaloChallenge file and
its timing rows, skipped and out-of-memory rows, training throughput rows, bad input. Tiny sizes throughout."""
import json

import h5py
import numpy as np
import pytest
import torch

import common
import energy
import latent_vit
import shape_vit
import timing
import vae
from conftest import QUIET, ROOT, assert_one_error_line, cli

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TINY = ["--size", "tiny", "--ds", "2", "--repeats", "1", "--min-showers", "1", "--peak-n", "32", "--threads", "1"]


def test_settings_and_their_nfe():
    paper, fast = timing.parse_setting("paper"), timing.parse_setting("fast")
    assert (paper.energy, paper.shape, paper.nfe_energy, paper.nfe_shape) == ("rk4-50", "rk4-20", 45 * 200, 80)
    assert (fast.nfe_energy, fast.nfe_shape) == (45 * 20, 80)
    assert timing.parse_setting("submission").nfe_shape == 200 and timing.parse_setting("bespoke16").nfe_shape == 16
    custom = timing.parse_setting("midpoint-3/euler-8")
    assert (custom.e_solver, custom.e_steps, custom.s_solver, custom.s_steps) == ("midpoint", 3, "euler", 8)
    assert (custom.nfe_energy, custom.nfe_shape) == (45 * 6, 8)
    for bad in ("rk4-5", "bespoke-8/rk4-20", "rk4-0/rk4-20", "rk4-5/bespoke-1", "rk4-x/rk4-2", "best"):
        with pytest.raises(ValueError, match="--settings"):
            timing.parse_setting(bad)


def test_paper_checkpoints_have_the_paper_sizes():
    assert common.count_parameters(common.ViT(common.ViTConfig(**timing.vit_model_args("vit", 2)))) == 26_042_688
    assert common.count_parameters(common.ViT(common.ViTConfig(**timing.vit_model_args("lavit", 2)))) == 10_711_566
    assert common.count_parameters(common.ViT(common.ViTConfig(**timing.vit_model_args("vit", 3)))) == 5_868_870
    assert timing.stage_args("vit", 3).clip_grad == 50 and timing.stage_args("energy", 2).batch_size == 4096
    assert timing.stage_args("vae", 2).batch_size == 128 and timing.stage_args("lavit", 3).epochs == 400


def test_random_checkpoints_run_through_the_stages(tmp_path, toy_ds2):
    runs = timing.make_checkpoints(tmp_path / "ckpts", 2, "tiny", bespoke_steps=[2])
    assert set(runs) == {"energy", "vit", "vae", "lavit", ("bespoke", 2)}
    ref, out = toy_ds2 / "toy_ds2_ref.hdf5", ["--out", str(tmp_path), *QUIET]
    cond = energy.main(["--sample", "--ckpt", str(runs["energy"]), "--like", str(ref), "--n", "3", "--steps", "1",
                        "--output", str(tmp_path / "cond.hdf5"), *out])
    gen = shape_vit.main(["--sample", "--ckpt", str(runs["vit"]), "--cond", str(cond), "--solver", "bespoke",
                          "--bespoke-ckpt", str(runs[("bespoke", 2)]), "--output", str(tmp_path / "gen.hdf5"), *out])
    lat = latent_vit.main(["--sample", "--ckpt", str(runs["lavit"]), "--cond", str(cond), "--steps", "1",
                           "--output", str(tmp_path / "lat.hdf5"), *out])
    dec = vae.main(["--decode", str(lat), "--output", str(tmp_path / "dec.hdf5"), *out])  # the laViT names its VAE
    for path in (gen, dec):
        with h5py.File(path) as f:
            assert f["showers"].shape == (3, 6480)


@pytest.mark.parametrize("chain", ["vit", "lavit"])
def test_run_chain_writes_the_calochallenge_file(tmp_path, chain):
    device = torch.device("cpu")
    runs = timing.make_checkpoints(tmp_path, 2, "tiny", kinds=("energy", chain))
    nets, load_s = timing.load_chain(runs, 2, chain, device)
    e_inc, setting = common.sample_e_inc(5, torch.Generator().manual_seed(3)), timing.parse_setting("rk4-1/euler-2")
    solve, files = common.make_solver("euler", 2)[0], []
    for k in range(2):  # batches of 2: three batches, the last one short; twice, the same file
        files.append(tmp_path / f"gen{k}.hdf5")
        secs = timing.run_chain(nets, chain, 2, e_inc, setting, solve, 2, files[-1], device, seed=1)
        assert set(secs) == {"energy", "shape", "decode", "write", "cpu"} and min(secs.values()) >= 0
        assert (secs["decode"] > 0) == (chain == "lavit") and load_s > 0
    with h5py.File(files[0]) as f, h5py.File(files[1]) as g:
        assert f["showers"].shape == (5, 6480) and f["showers"].dtype == np.float64
        np.testing.assert_array_equal(f["incident_energies"][:, 0], e_inc.numpy())
        np.testing.assert_array_equal(f["showers"][:], g["showers"][:])  # seeded: the same showers
        showers = f["showers"][:]
    assert np.isfinite(showers).all() and (showers >= 0).all() and (showers.sum(1) > 0).all()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("device", DEVICES)
def test_timing_rows_json_and_markdown(tmp_path, device):
    res, path = timing.main(["--device", device, *TINY, "--sections", "chain", "--batch-sizes", "1", "2",
                             "--settings", "rk4-1/euler-1", "rk4-1/bespoke-2", "--out", str(tmp_path)])
    rows = res["chain"]
    assert [(r["chain"], r["shape"], r["batch"]) for r in rows] == [
        (c, s, b) for c in ("vit", "lavit") for s in ("euler-1", "bespoke-2") for b in (1, 2)]
    for r in rows:
        assert r["status"] == "ok" and r["showers"] == r["batch"] and r["nfe_energy"] == 45 * 4
        parts = r["ms_per_shower_energy"] + r["ms_per_shower_shape"] + (r["ms_per_shower_decode"] or 0)
        assert r["ms_per_shower"] == pytest.approx(parts)
        assert r["ms_per_shower_with_write"] == pytest.approx(r["ms_per_shower"] + r["ms_per_shower_write"])
        assert r["ms_per_shower_min"] <= r["ms_per_shower"] <= r["ms_per_shower_max"] and r["peak_mem_mb"] > 0
        assert (r["ms_per_shower_decode"] is None) == (r["chain"] == "vit") and r["load_s"] > 0
    assert [r["nfe_shape"] for r in rows[:4]] == [1, 1, 2, 2]
    saved = json.loads(path.read_text())
    assert saved["chain"] == rows and saved["meta"]["device"] == device and "tmp" not in saved
    assert saved["meta"]["command"].startswith("python tools/timing.py --device")
    md = path.with_suffix(".md").read_text()
    assert "| 2 | lavit | rk4-1 | bespoke-2 | 180 / 2 | fp32 | 2 | 2 |" in md and md.count("| ok |") == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.with_suffix(".md").name]


def test_skipped_and_out_of_memory_rows(tmp_path, monkeypatch):
    res, _ = timing.main(["--device", "cpu", *TINY, "--sections", "chain", "--chains", "vit", "--batch-sizes", "1",
                          "100", "200", "--settings", "rk4-1/euler-1", "--max-row-seconds", "1e-9", "--out",
                          str(tmp_path)])  # estimates come from batches >= 100 only
    assert [r["status"] for r in res["chain"]][:2] == ["ok", "ok"]
    assert res["chain"][2]["status"].startswith("skipped: estimated") and "ms_per_shower" not in res["chain"][2]

    def no_memory(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory.")
    monkeypatch.setattr(timing.shape_vit, "generate", no_memory)
    res, _ = timing.main(["--device", "cpu", *TINY, "--sections", "chain", "--chains", "vit", "--batch-sizes", "1", "3",
                          "--settings", "rk4-1/euler-1", "--out", str(tmp_path)])
    assert [r["status"] for r in res["chain"]] == ["out of memory", "skipped: out of memory at a smaller batch"]
    assert not list(tmp_path.glob("*.hdf5"))


def test_training_rows(tmp_path):
    runs = timing.make_checkpoints(tmp_path, 2, "tiny")
    args = timing.resolve(timing.parse_args([*TINY, "--train-batch", "4"]), torch.device("cpu"))
    for kind in timing.KINDS:  # the FLOP count scales with the batch: counted at 2, reported at the batch
        model, loss, rows, _ = timing.training_job(kind, 2, runs, torch.device("cpu"), args, "fp32")
        four, two = (timing.count_flops(model, loss, r) for r in (rows, rows[:2]))
        assert len(rows) == 4 and four == 2 * two > 0
    res, _ = timing.main(["--device", "cpu", *TINY, "--sections", "training", "--train-batch", "4", "--train-steps", "2",
                          "--train-warmup", "1", "--out", str(tmp_path / "out")])
    rows = {r["name"]: r for r in res["training"]}
    assert set(rows) == set(timing.KINDS) and res["peak"][0]["precision"] == "fp32" and res["peak"][0]["tflops"] > 0
    for r in rows.values():
        assert r["status"] == "ok" and r["batch"] == 4 and r["nonfinite"] == 0 and r["peak_mem_mb"] > 0
        assert r["showers_per_s"] == pytest.approx(4e3 / r["ms_per_step"]) and 0 < r["fraction_of_peak"]
        assert r["projected_hours"] == pytest.approx(r["epochs"] * 99_000 / r["showers_per_s"] / 3600)
    assert rows["energy"]["epochs"] == 500 and rows["vae"]["epochs"] == 200 and rows["vae"]["params"] > 0
    assert "| vit | 2 | 4 |" in next((tmp_path / "out").glob("*.md")).read_text()


def test_bad_input_is_one_error_line(tmp_path):
    res = cli(ROOT / "tools" / "timing.py", "--settings", "rk4-5", "--out", tmp_path / "out")
    assert_one_error_line(res, "--settings", "SOLVER-STEPS")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--batch-sizes"):
        timing.parse_args(["--batch-sizes", "0"])
    with pytest.raises(ValueError, match="--repeats"):
        timing.parse_args(["--repeats", "0"])
