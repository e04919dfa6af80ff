"""The product rule: every stage script imports from the project only common.py, and a stage script copied alone
with common.py into an empty folder shows its help and runs a tiny job end to end."""
import ast
import shutil
import subprocess
import sys

import h5py

from conftest import ENV, QUIET, ROOT, TINY_VIT

STAGES = ("energy", "shape_vit", "vae", "latent_vit", "bespoke", "evaluate", "likelihood")
LIBRARIES = {"torch", "numpy", "h5py", "einops", "tqdm", "matplotlib"}


def imported_modules(path):
    """Top-level names of every import in a file (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level)
    return names


def test_stages_import_only_common_and_the_libraries():
    project = {p.stem for p in ROOT.glob("*.py")} | {"data", "tools", "tests", "."}
    assert set(STAGES) | {"common"} <= project
    for stage in STAGES + ("common",):
        mods = imported_modules(ROOT / f"{stage}.py")
        ours = mods & project - {"common"}
        assert not ours, f"{stage}.py imports {sorted(ours)}"
        third = {m for m in mods - project if m not in sys.stdlib_module_names}
        assert third <= LIBRARIES, f"{stage}.py imports {sorted(third - LIBRARIES)}"
    assert "matplotlib" not in imported_modules(ROOT / "common.py")


def test_the_import_check_catches_a_stage_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import common\ndef f():\n    from shape_vit import generate\n")
    assert imported_modules(bad) == {"common", "shape_vit"}


def run_all(jobs):
    """Start every (name, folder, argv) at once (2 cores: the imports overlap), then wait; {name: result}."""
    procs = {name: subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, cwd, argv in jobs}
    return {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}


def test_each_stage_runs_alone_with_common(toy_ds2, chain, tmp_path):
    folders = {}
    for stage in STAGES:  # an empty folder with the script, common.py and the inputs it needs
        folders[stage] = tmp_path / stage
        folders[stage].mkdir()
        for name in (f"{stage}.py", "common.py"):
            shutil.copy(ROOT / name, folders[stage])
        for name in ("toy_ds2_train.hdf5", "toy_ds2_ref.hdf5"):
            shutil.copy(toy_ds2 / name, folders[stage])
    shutil.copy(chain["latents"], folders["latent_vit"] / "latents.hdf5")
    shutil.copytree(chain["shape_vit"], folders["bespoke"] / "shape_run")
    shutil.copytree(chain["shape_vit"], folders["likelihood"] / "shape_run")
    shutil.copytree(chain["energy"], folders["likelihood"] / "energy_run")
    helps = run_all([(s, folders[s], [f"{s}.py", "--help"]) for s in STAGES])
    for stage, (rc, out, err) in helps.items():
        assert rc == 0 and "usage:" in out and stage + ".py" in out, (stage, err[-2000:])

    train, ref, run = "toy_ds2_train.hdf5", "toy_ds2_ref.hdf5", ["--out", "runs", *QUIET]
    steps = {  # each stage: train a few steps, then its sampling (or scoring) mode
        "energy": [["energy.py", "--files", train, "--preset", "tiny", "--max-showers", "100", "--epochs", "1",
                    "--batch-size", "32", *run], ["energy.py", "--sample", "--like", ref, "--n", "8", "--steps", "1",
                                                  "--output", "cond.hdf5", *run]],
        "shape_vit": [["shape_vit.py", "--files", train, "--max-showers", "64", "--epochs", "1", *TINY_VIT, *run],
                      ["shape_vit.py", "--sample", "--cond", ref, "--n", "6", "--steps", "1", "--output", "gen.hdf5",
                       *run]],
        "vae": [["vae.py", "--files", train, "--max-showers", "48", "--channels", "2", "--batch-size", "16",
                 "--epochs", "1", *run], ["vae.py", "--encode", "--like", ref, "--n", "6", "--output", "lat.hdf5", *run],
                ["vae.py", "--decode", "lat.hdf5", "--output", "rec.hdf5", *run]],
        "latent_vit": [["latent_vit.py", "--latents", "latents.hdf5", "--max-showers", "64", "--epochs", "1",
                        *TINY_VIT[:-2], "--batch-size", "16", *run],
                       ["latent_vit.py", "--sample", "--cond", ref, "--n", "6", "--steps", "1", "--output", "z.hdf5",
                        *run]],
        "bespoke": [["bespoke.py", "--ckpt", "shape_run", "--cond", train, "--preset", "small", "--steps", "2",
                     "--iters", "2", "--pool", "8", "--n-val", "4", "--batch-size", "4", "--ref-steps", "4",
                     "--val-every", "1", *run]],
        "evaluate": [["evaluate.py", "-i", train, "-r", ref, "--ds", "2", "-m", "hist", "--no-plots",
                      "--max-showers", "100", "--out", "eval", "--no-progress"]],
        "likelihood": [["likelihood.py", "-i", ref, "--n", "4", "--steps", "1", "--energy-steps", "1", "--energy-ckpt",
                        "energy_run", "--shape-ckpt", "shape_run", "--output", "lik.hdf5", "--no-plots",
                        "--no-progress"]],
    }
    for k in range(max(map(len, steps.values()))):
        results = run_all([(s, folders[s], argv[k]) for s, argv in steps.items() if k < len(argv)])
        for stage, (rc, out, err) in results.items():
            assert rc == 0, (stage, k, err[-3000:])
    with h5py.File(folders["energy"] / "cond.hdf5") as f:
        assert f["u"].shape == (8, 45) and f.attrs["format"] == "calodream-conditions" and f.attrs["steps"] == 1
    for stage, name, n in (("shape_vit", "gen.hdf5", 6), ("vae", "rec.hdf5", 6)):
        with h5py.File(folders[stage] / name) as f:
            assert f["showers"].shape == (n, 6480)
    with h5py.File(folders["latent_vit"] / "z.hdf5") as f:
        assert f["z"].shape == (6, 2, 15, 9, 9) and f.attrs["format"] == "calodream-latents"
    assert list((folders["bespoke"] / "runs").glob("bespoke-ds2-*/ckpt.pt"))
    assert (folders["evaluate"] / "eval" / "summary.json").is_file()
    assert (folders["likelihood"] / "lik.hdf5").is_file()


def test_the_top_level_holds_the_stages():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    top = {p.split("/")[0] for p in tracked if not p.startswith(".")}
    assert top <= {f"{s}.py" for s in STAGES} | {"common.py", "README.md", "requirements.txt",
                                                  "tests", "tools", "data", "docs"}, top
