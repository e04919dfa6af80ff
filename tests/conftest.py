"""Session fixtures: small synthetic CaloChallenge files (the toy generator of data/prepare.py) and one tiny trained
run of every stage, made once per test session; `cli` runs a script as a user would."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
# Tiny tensors: one intra-op thread is faster than two (two spin on each other on a busy 2-core CPU).
torch.set_num_threads(1)
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TINY_VIT = ["--preset", "small", "--dim", "12", "--heads", "2", "--mlp", "24", "--depth", "1", "--batch-size", "32"]
QUIET = ["--no-progress", "--device", "cpu"]


def cli(*args, cwd=ROOT, timeout=300):
    """Run `python ARGS` (paths allowed) with one OpenMP thread; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error_line(res, *words):
    """A failed command that printed exactly one `error: ...` line (no traceback) naming `words`."""
    assert res.returncode == 1, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def _toy(tmp_path_factory, ds, n_train, n_ref):
    from data import prepare
    folder = tmp_path_factory.mktemp(f"toy_ds{ds}")
    prepare.write_toy(ds, n_train, folder / f"toy_ds{ds}_train.hdf5", seed=1)
    prepare.write_toy(ds, n_ref, folder / f"toy_ds{ds}_ref.hdf5", seed=2)
    return folder


@pytest.fixture(scope="session")
def toy_ds2(tmp_path_factory):
    """Folder with toy_ds2_train.hdf5 (800 showers) and toy_ds2_ref.hdf5 (400)."""
    return _toy(tmp_path_factory, 2, 800, 400)


@pytest.fixture(scope="session")
def toy_ds3(tmp_path_factory):
    """Folder with toy_ds3_train.hdf5 (200 showers) and toy_ds3_ref.hdf5 (100)."""
    return _toy(tmp_path_factory, 3, 200, 100)


@pytest.fixture(scope="session")
def chain(toy_ds2, tmp_path_factory):
    """One tiny run of every stage on the DS2 toy files, in-process: a dict of run folders and files
    (energy, cond, shape_vit, gen, vae, latents, latent_vit)."""
    import energy
    import latent_vit
    import shape_vit
    import vae
    out, train = tmp_path_factory.mktemp("chain"), str(toy_ds2 / "toy_ds2_train.hdf5")
    base = ["--out", str(out), *QUIET]
    c = {"energy": energy.main(["--files", train, "--preset", "tiny", "--max-showers", "300", "--epochs", "3",
                                "--batch-size", "32", "--val-every", "1", "--ckpt-every", "1", *base])}
    c["cond"] = energy.main(["--sample", "--ckpt", str(c["energy"]), "--like", str(toy_ds2 / "toy_ds2_ref.hdf5"),
                             "--n", "40", "--steps", "2", *base])
    c["shape_vit"] = shape_vit.main(["--files", train, "--max-showers", "200", "--epochs", "3", *TINY_VIT, *base])
    c["gen"] = shape_vit.main(["--sample", "--ckpt", str(c["shape_vit"]), "--cond", str(c["cond"]), "--steps", "2",
                               *base])
    c["vae"] = vae.main(["--files", train, "--max-showers", "64", "--channels", "2", "--batch-size", "16",
                         "--epochs", "2", *base])
    c["latents"] = vae.main(["--encode", "--ckpt", str(c["vae"]), *base])
    c["latent_vit"] = latent_vit.main(["--latents", str(c["latents"]), "--epochs", "2", *TINY_VIT[:-2],
                                       "--batch-size", "16", *base])
    return c
