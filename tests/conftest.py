"""Session fixtures: small synthetic CaloChallenge files (the toy generator of data/prepare.py), made once per run."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
# Tiny tensors: one intra-op thread is faster than two (two spin on each other on a busy 2-core CPU).
torch.set_num_threads(1)


def _toy(tmp_path_factory, ds, n_train, n_ref):
    from data import prepare as data
    folder = tmp_path_factory.mktemp(f"toy_ds{ds}")
    data.write_toy(ds, n_train, folder / f"toy_ds{ds}_train.hdf5", seed=1)
    data.write_toy(ds, n_ref, folder / f"toy_ds{ds}_ref.hdf5", seed=2)
    return folder


@pytest.fixture(scope="session")
def toy_ds2(tmp_path_factory):
    """Folder with toy_ds2_train.hdf5 (800 showers) and toy_ds2_ref.hdf5 (400)."""
    return _toy(tmp_path_factory, 2, 800, 400)


@pytest.fixture(scope="session")
def toy_ds3(tmp_path_factory):
    """Folder with toy_ds3_train.hdf5 (200 showers) and toy_ds3_ref.hdf5 (100)."""
    return _toy(tmp_path_factory, 3, 200, 100)
