"""Toy DS2 test sets for likelihood.py's energy calibration and anomaly score, from data/prepare.py's generator.

    python tools/likelihood_sets.py --out data/lik        # calib, resol, singles, overlays (about a minute)
    python likelihood.py -i data/lik/calib.hdf5 --calibrate --calibrate-on energy
    python likelihood.py -i data/lik/singles.hdf5 --anomalous data/lik/overlays.hdf5 --steps 8

calib.hdf5     --n-calib showers at each fixed E_true (GeV, --energies), interleaved: the first k cover every energy
resol.hdf5     --n-resol showers per energy: the toy's own E_tot resolution
singles.hdf5   single showers, E log-uniform in [2, 500] GeV
overlays.hdf5  two showers of r E and (1 - r) E (r ~ U(0.2, 0.8)) summed voxel by voxel, the singles' E list
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from data import prepare  # noqa: E402


def showers_at(e_inc, seed, ds=2):
    """Toy showers (N, n_vox) MeV at the given incident energies (MeV), seeded."""
    out, size = [], prepare._batch_size(ds)
    for k, start in enumerate(range(0, len(e_inc), size)):
        rng = np.random.default_rng([seed, 7, k])
        e = np.asarray(e_inc[start:start + size], dtype=np.float64)
        layer_e, t_max = prepare._layer_energies(e, rng)
        out.append(prepare._lateral(ds, e, layer_e, t_max, rng))
    return np.concatenate(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/lik")
    p.add_argument("--energies", type=float, nargs="+", default=[2, 5, 10, 20, 50, 100, 200, 500], help="GeV")
    p.add_argument("--n-calib", type=int, default=50)
    p.add_argument("--n-resol", type=int, default=2000)
    p.add_argument("--n-anomaly", type=int, default=1000)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if min(a.n_calib, a.n_resol, a.n_anomaly) < 1 or min(a.energies) <= 0:
        sys.exit("error: counts must be >= 1 and energies > 0")
    out = Path(a.out)
    try:
        e = np.tile(np.asarray(a.energies) * 1e3, a.n_calib)
        common.write_showers(out / "calib.hdf5", e, showers_at(e, 11), 2, overwrite=a.overwrite)
        e = np.repeat(np.asarray(a.energies) * 1e3, a.n_resol)
        common.write_showers(out / "resol.hdf5", e, showers_at(e, 12), 2, overwrite=a.overwrite)
        rng = np.random.default_rng(13)
        e = np.exp(rng.uniform(np.log(2e3), np.log(5e5), a.n_anomaly))
        r = rng.uniform(0.2, 0.8, a.n_anomaly)
        common.write_showers(out / "singles.hdf5", e, showers_at(e, 14), 2, overwrite=a.overwrite)
        common.write_showers(out / "overlays.hdf5", e, showers_at(r * e, 15) + showers_at((1 - r) * e, 16), 2,
                             overwrite=a.overwrite)
    except (common.DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
    print("wrote", ", ".join(str(out / n) for n in ("calib.hdf5", "resol.hdf5", "singles.hdf5", "overlays.hdf5")))


if __name__ == "__main__":
    main()
