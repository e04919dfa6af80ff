"""Data for the CaloDREAM scripts: synthetic CaloChallenge showers, and the real files from Zenodo.

    python data/prepare.py toy --ds 2                # data/toy_ds2_train.hdf5 (20000) + data/toy_ds2_ref.hdf5 (20000)
    python data/prepare.py toy --ds 3                # data/toy_ds3_{train,ref}.hdf5 (5000 + 5000; 40500 voxels each)
    python data/prepare.py pcc data/toy_ds2_train.hdf5   # mean |dPCC| of its layer correlations vs Geant4's
    python data/prepare.py download --ds 2           # data/dataset_2_1.hdf5 + dataset_2_2.hdf5 (2.7 GB, MD5-checked)
    python data/prepare.py download --ds 3 --files dataset_3_1.hdf5

The real data (SPEC 1) are electron showers in a W/Si sampling calorimeter: 45 readout layers of
0.8 X0 each, E_inc log-uniform in [1 GeV, 1 TeV]. The toy showers are made in the same format
(float64, gzip, `incident_energies` (N,1) and `showers` (N, n_vox), MeV) from a parametric model, so
that every script, demo and test has data with real structure and runs without the 2.7 GB download.
DS2 and DS3 share the physics; only the lateral binning differs.

  longitudinal  E_vis = E_inc RESPONSE (1 + RES_B N(0,1)) spread as dE/dt = E_vis Gamma(t; a, b) (t in X0
              from the front face), t_max = (a-1)/b with mean ln(E_inc/E_C) + C_TMAX and mean b = B_MEAN;
              ln t_max and ln a fluctuate shower by shower as a correlated 2-D Gaussian (widths and
              correlation of Grindhammer & Peters, hep-ex/0001020). Integrated per layer [0.8 l, 0.8 (l+1)]
              on SUB points; beyond 36 X0 is lost.
  photons     a share PHOTON_FRACTION of each layer's deposit is made by diffuse MeV photons: born there,
              they fly an exponential free path PHOTON_LAMBDA (X0), PHOTON_FORWARD of them forwards, the
              rest backwards; past the front (albedo) or the back they are lost. The backward ones put
              into the first layers an energy that grows with E_inc and follows the whole shower (layer 0:
              20 MeV at 1 GeV, 0.13 GeV at 100 GeV, 0.54 GeV at 1 TeV); the forward ones stretch the tail.
  track       the incident electron crosses layer 0 before the shower develops: one charged-particle
              deposit there (the Gamma form is ~0 at t = 0), so layer 0 is empty only when its few spots
              all leak out laterally (4 in 10^4 showers).
  sampling    what the Si sees: a compound Poisson sum per layer. Charged particles: hits ~
              Poisson(E / E_HIT), E_HIT = 0.8 X0 x E_C = 6.4 MeV (ionisation over one layer), each at
              least HIT_FLOOR E_HIT plus a Gamma tail, relative variance HIT_VAR (Landau in 2 x 0.3 mm Si,
              angles, stopping electrons); photon deposits: E_HIT_PHOTON = 32 MeV (an electron stopping in
              a sensor, ~1 MeV there), relative variance HIT_VAR_PHOTON. Sums of Gamma deposits are drawn
              exactly, one Gamma per (shower, layer). This is the resolution (23%/sqrt(E/GeV) (+) 1.1%); it
              decorrelates the sparse first and last layers from the rest, as in Geant4. A layer without
              hits is empty (u = 0; the last non-empty layer has u = 1 up to the 1e-10 of
              common.energies_to_u).
  lateral     each layer's energy is split over ceil(E_l / e_spot) spots, e_spot = SPOT_E0 (E_inc/GeV)^
              SPOT_GAMMA (2 MeV at 1 GeV, 63 MeV at 1 TeV: ~4400 spots per shower), with log-normal
              shares (SPOT_SIGMA). Core + halo: f(r) ~ p r Rc^2/(r^2+Rc^2)^2 + (1-p) r Rt^2/(r^2+Rt^2)^2,
              Rc = R_M (CORE0 + CORE1 tau), Rt = R_M (TAIL0 + TAIL1 tau), p = clip(P0 - P1 tau, PMIN, P0),
              tau = t / t_max; both widths scaled by one log-normal factor per shower (WIDTH_SIGMA).
              Azimuth uniform around a shower axis x = x0 + theta_x z (x0 ~ N(0, AXIS_SIGMA mm),
              theta ~ N(0, TILT_SIGMA), z = 3.4 mm per layer), so centres of energy fluctuate around 0.
              Spots are histogrammed into the (alpha, r) voxels; r > 41.85 mm is lost (lateral leakage);
              voxels below the 15.15 keV threshold (common.MIN_ENERGY) are set to exactly 0.

Distance to Geant4: the 45x45 Pearson matrix of the layer energies of the 20k default DS2 training
showers differs from Geant4's (data/g4_pcc_ds2.json, CaloChallenge final tables) by a mean |dPCC| of
0.032 over the 990 pairs (rows of layers 0-5: 0.029, block 30-44: 0.055; CaloDREAM's samples: 0.014;
the toy before the photon, track and sampling terms: 0.124). What is left: layers 30-44 are more tightly
tied to each other than in Geant4 (by +0.05) and layers 3-8 less to 43-44 (by -0.1). The parameters of
those three terms were set within physical ranges by that distance, none per layer pair.
Measured (2 shared cores, load ~3-4): 20k DS2 showers 13 s CPU to generate + 13 s to write gzip
(140 MB), 40 s wall; 5k DS3 showers 4.5 s + 15 s (80 MB). Same (ds, n, seed) -> the same file, bit for bit.
Every parameter is in the block below.
"""
import argparse
import hashlib
import http.client
import json
import math
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py lives one folder up
import common  # noqa: E402

# ----------------------------------------------------------------------------- toy model parameters
X0_PER_LAYER = 0.8  # radiation lengths of W per readout layer (2 x 1.4 mm W + 2 x 0.3 mm Si)
MM_PER_LAYER = 3.4  # depth of one readout layer (for the tilt of the shower axis)
SUB = 16  # integration points per layer for the longitudinal profile
E_C = 8.0  # MeV, critical energy of tungsten
C_TMAX = -0.5  # t_max = ln(E_inc / E_C) + C_TMAX (mean)
B_MEAN = 0.5  # mean slope b of the Gamma profile; a = 1 + b t_max
RESPONSE = 0.98  # mean E_vis / E_inc before leakage and threshold
RES_B = 0.01  # constant term of the resolution (one scale per shower); the stochastic term is the sampling below
PHOTON_FRACTION = 0.33  # share of the deposit made by the diffuse MeV photons (Compton / photo-electrons)
PHOTON_LAMBDA = 1.9  # X0, their mean free path (W: 1.3 X0 at 0.5 MeV, 2.2 X0 at 1 MeV, 3.6 X0 at the minimum)
PHOTON_FORWARD = 0.65  # share of them that travels forwards; the rest goes backwards (albedo, backsplash)
E_HIT = X0_PER_LAYER * E_C  # 6.4 MeV: a charged particle crossing one layer (ionisation E_C per X0)
HIT_VAR = 2.3  # variance / mean^2 of one such deposit (Landau tail in 2 x 0.3 mm Si, angles, stopping)
HIT_FLOOR = 0.5  # ... which is at least this fraction of the mean (the sharp lower edge of the Landau)
E_HIT_PHOTON, HIT_VAR_PHOTON = 32.0, 2.5  # MeV: an electron of a photon interaction stopping in a sensor
SPOT_E0, SPOT_GAMMA = 2.0, 0.5  # spot energy scale e_spot = SPOT_E0 (E_inc/GeV)^SPOT_GAMMA, MeV
SPOT_SIGMA = 1.2  # spot energies log-normal (width in ln E) around their layer's share: voxel spectrum spans decades
R_M = 9.3  # mm, Moliere radius of tungsten
CORE0, CORE1 = 0.12, 0.10  # core width Rc / R_M = CORE0 + CORE1 tau
TAIL0, TAIL1 = 0.60, 0.35  # halo width Rt / R_M = TAIL0 + TAIL1 tau
P0, P1, PMIN = 0.90, 0.25, 0.35  # core fraction p = clip(P0 - P1 tau, PMIN, P0)
WIDTH_SIGMA = 0.10  # log-normal shower-to-shower spread of both widths
AXIS_SIGMA, TILT_SIGMA = 0.8, 0.005  # mm offset and rad tilt of the shower axis (per coordinate)
REF_SEED_OFFSET = 1_000_003  # the reference file uses seed + this
TOY_SIZES = {2: (20000, 20000), 3: (5000, 5000)}  # default (train, ref) showers
G4_PCC = Path(__file__).resolve().parent / "g4_pcc_ds2.json"  # Geant4's DS2 layer-energy PCC matrix
FIRST_LAYERS, LAST_LAYERS = range(0, 6), range(30, 45)  # the blocks pcc_distance reports apart

# ----------------------------------------------------------------------------- Zenodo files (SPEC 1)
MD5 = {"dataset_2_1.hdf5": "e590333e9a2da51b258288d74bd8357a",
       "dataset_2_2.hdf5": "7a56fd68aa53ded37c2ac445694d9736",
       "dataset_3_1.hdf5": "d33f03418aa311b0965452fcbef1ff87",
       "dataset_3_2.hdf5": "911dec2c40aafa64a07b7450b80881bf",
       "dataset_3_3.hdf5": "5ea62f6831a1821bb5035fafc9f030e8",
       "dataset_3_4.hdf5": "5e8d82e6a6c28c6914a3b602a1cfa299"}
SIZES = {"dataset_2_1.hdf5": 1_356_475_617, "dataset_2_2.hdf5": 1_366_708_391}  # bytes (DS3: not listed)


# ----------------------------------------------------------------------------- toy generator: longitudinal
def _gamma_profile(e_inc, rng):
    """Per-shower Gamma profile: fraction of E_vis in each of the 45 layers (B, 45) and t_max (B,)."""
    ln_y = np.log(e_inc / E_C)
    t_mean = ln_y + C_TMAX
    sig_t = 1.0 / (-1.4 + 1.26 * ln_y)  # Grindhammer-Peters fluctuations of ln T and ln alpha
    sig_a = 1.0 / (-0.58 + 0.86 * ln_y)
    rho = 0.705 - 0.023 * ln_y
    z1, z2 = rng.standard_normal((2, len(e_inc)))
    t_max = t_mean * np.exp(sig_t * z1 - sig_t ** 2 / 2)
    a = np.maximum((1 + B_MEAN * t_mean) * np.exp(sig_a * (rho * z1 + np.sqrt(1 - rho ** 2) * z2)), 1.05)
    b = (a - 1) / t_max
    dt = X0_PER_LAYER / SUB
    t = (np.arange(common.N_LAYERS * SUB) + 0.5) * dt  # midpoints
    lgam = np.array([math.lgamma(v) for v in a])
    log_pdf = (a[:, None] - 1) * np.log(t) - b[:, None] * t + (a * np.log(b) - lgam)[:, None]
    frac = np.exp(log_pdf).reshape(len(e_inc), common.N_LAYERS, SUB).sum(-1) * dt
    return frac / np.maximum(frac.sum(1, keepdims=True), 1.0), t_max  # beyond 36 X0 is lost


def _photon_transport(source):
    """Where the diffuse photons born in each layer (energy `source`, (B, 45)) deposit it: born mid-layer,
    exponential free path PHOTON_LAMBDA, a share PHOTON_FORWARD forwards, the rest backwards; what crosses
    the front face (albedo) or the back face is lost."""
    keep = math.exp(-X0_PER_LAYER / PHOTON_LAMBDA)  # survival through one whole layer
    half = math.exp(-X0_PER_LAYER / (2 * PHOTON_LAMBDA))  # ... through half of it
    out = source * (1 - half)  # absorbed in the layer of birth
    for layers, share in ((range(common.N_LAYERS), PHOTON_FORWARD),
                          (range(common.N_LAYERS - 1, -1, -1), 1 - PHOTON_FORWARD)):
        flux = np.zeros(len(source))
        for l in layers:
            out[:, l] += flux * (1 - keep)
            flux = flux * keep + source[:, l] * (share * half)
    return out


def _deposits(hits, e_hit, var, floor, rng):
    """Visible energy of `hits` independent deposits per cell, each at least floor * e_hit plus a Gamma
    tail, with mean e_hit and variance var e_hit^2: the sum is exactly hits floor e_hit + Gamma(hits k) theta
    (k theta = (1 - floor) e_hit, k theta^2 = var e_hit^2); 0 where hits = 0."""
    out = np.zeros(hits.shape)
    some = hits > 0
    theta = var * e_hit / (1 - floor)
    out[some] = hits[some] * (floor * e_hit) + rng.gamma(hits[some] * (1 - floor) ** 2 / var) * theta
    return out


def _layer_energies(e_inc, rng):
    """Visible energy per layer (B, 45) and t_max (B,): Gamma profile, diffuse-photon transport, sampling."""
    n = len(e_inc)
    frac, t_max = _gamma_profile(e_inc, rng)
    e_vis = e_inc * RESPONSE * np.clip(1 + RES_B * rng.standard_normal(n), 0.5, None)
    profile = e_vis[:, None] * frac
    core = profile * (1 - PHOTON_FRACTION)
    photons = _photon_transport(profile * PHOTON_FRACTION)
    hits = rng.poisson(core / E_HIT)
    hits[:, 0] += 1  # the incident electron itself crosses layer 0 (the Gamma form starts at 0 there)
    energy = _deposits(hits, E_HIT, HIT_VAR, HIT_FLOOR, rng)
    energy += _deposits(rng.poisson(photons / E_HIT_PHOTON), E_HIT_PHOTON, HIT_VAR_PHOTON, 0.0, rng)
    return energy, t_max


# ----------------------------------------------------------------------------- toy generator: lateral
def _lateral(ds, e_inc, layer_e, t_max, rng):
    """Showers (B, n_vox) float32: each layer's energy split over spots scattered around the shower axis."""
    g = common.geometry(ds)
    n, n_lay = layer_e.shape
    e_spot = SPOT_E0 * (e_inc / 1e3) ** SPOT_GAMMA
    counts = np.ceil(layer_e / e_spot[:, None]).astype(np.int64)  # spots per (shower, layer); 0 if empty
    cell = np.repeat(np.arange(n * n_lay), counts.reshape(-1))  # (shower, layer) of every spot
    f32 = np.float32  # spot positions in float32: twice as fast, 1e-5 mm is far below a voxel
    weight = np.exp(SPOT_SIGMA * rng.standard_normal(len(cell), dtype=f32))
    norm = np.bincount(cell, weights=weight, minlength=n * n_lay)
    energy = weight * (layer_e.reshape(-1) / np.maximum(norm, 1e-300))[cell]  # each layer keeps its energy
    # lateral profile of each (shower, layer): widths grow with depth tau = t / t_max
    tau = (np.arange(n_lay) + 0.5) * X0_PER_LAYER / t_max[:, None]
    width = np.exp(WIDTH_SIGMA * rng.standard_normal(n))[:, None] * R_M
    r_core = (width * (CORE0 + CORE1 * tau)).astype(f32).reshape(-1)
    r_tail = (width * (TAIL0 + TAIL1 * tau)).astype(f32).reshape(-1)
    p_core = np.clip(P0 - P1 * tau, PMIN, P0).astype(f32).reshape(-1)
    radius = np.where(rng.random(len(cell), dtype=f32) < p_core[cell], r_core[cell], r_tail[cell])
    v = rng.random(len(cell), dtype=f32)
    r = radius * np.sqrt(v / (1 - v))  # inverse CDF of r R^2/(r^2+R^2)^2: F = r^2/(r^2+R^2)
    phi = rng.random(len(cell), dtype=f32) * f32(2 * np.pi) - f32(np.pi)
    x0, y0 = AXIS_SIGMA * rng.standard_normal((2, n))
    tx, ty = TILT_SIGMA * rng.standard_normal((2, n))
    z = (np.arange(n_lay) + 0.5) * MM_PER_LAYER
    x = r * np.cos(phi) + (x0[:, None] + tx[:, None] * z).astype(f32).reshape(-1)[cell]
    y = r * np.sin(phi) + (y0[:, None] + ty[:, None] * z).astype(f32).reshape(-1)[cell]
    r_bin = np.searchsorted(np.asarray(g.r_edges, dtype=f32), np.hypot(x, y), side="right") - 1
    a_bin = np.minimum(((np.arctan2(y, x) + f32(np.pi)) * f32(g.n_alpha / (2 * np.pi))).astype(np.int64),
                       g.n_alpha - 1)
    inside = r_bin < g.n_r  # beyond the last edge: lateral leakage
    flat = (cell[inside] // n_lay * g.n_vox + cell[inside] % n_lay * (g.n_alpha * g.n_r)
            + a_bin[inside] * g.n_r + r_bin[inside])
    showers = np.bincount(flat, weights=energy[inside], minlength=n * g.n_vox).reshape(n, g.n_vox)
    showers = showers.astype(np.float32)
    showers[showers.astype(np.float64) < common.MIN_ENERGY] = 0.0  # after rounding to float32
    return showers


def _batch_size(ds):
    return max(16, 3_000_000 // common.geometry(ds).n_vox)  # ~24 MB of float64 voxels per batch


def _check(ds, n, seed):
    common.geometry(ds)
    if n < 1:
        raise ValueError(f"the number of showers must be positive, got {n}")
    if seed < 0:
        raise ValueError(f"the seed must be >= 0, got {seed}")


def _batches(ds, n, seed):
    """(e_inc (B,), rng) per batch: batch k draws from default_rng([seed, k])."""
    _check(ds, n, seed)
    size = _batch_size(ds)
    for k, start in enumerate(range(0, n, size)):
        rng = np.random.default_rng([seed, k])
        yield np.exp(rng.uniform(math.log(common.E_MIN), math.log(common.E_MAX), min(size, n - start))), rng


def toy_batches(ds, n, seed=0):
    """Yield (e_inc float64 (B,), showers float32 (B, n_vox)) batches of the n toy showers of a seed.

    Batch k draws from default_rng([seed, k]), so the same (ds, n, seed) always gives the same file."""
    for e_inc, rng in _batches(ds, n, seed):
        layer_e, t_max = _layer_energies(e_inc, rng)
        yield e_inc, _lateral(ds, e_inc, layer_e, t_max, rng)


def toy_layer_energies(ds, n, seed=0):
    """e_inc (n,) and the layer energies (n, 45) that the toy showers of (ds, n, seed) are made from,
    before lateral leakage (2.4% of the energy on average) and the readout threshold, without the voxels:
    the fast path (1 s for 20k) for studies of the longitudinal physics."""
    parts = [(e_inc, _layer_energies(e_inc, rng)[0]) for e_inc, rng in _batches(ds, n, seed)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def generate_toy(ds, n, seed=0):
    """n toy showers in memory: e_inc float64 (n,) MeV and showers float32 (n, n_vox) MeV."""
    parts = list(toy_batches(ds, n, seed))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_toy(ds, n, path, seed=0, overwrite=False, progress=False):
    """Write n toy showers to one CaloChallenge file (float64, gzip; temp name, then renamed)."""
    _check(ds, n, seed)
    with common.ShowerWriter(path, n, ds, overwrite=overwrite) as w, \
            tqdm(total=n, desc=Path(path).name, unit="shower", disable=not progress, leave=False) as bar:
        for e_inc, showers in toy_batches(ds, n, seed):
            w.write(e_inc, showers)
            bar.update(len(e_inc))
    return Path(path)


# ----------------------------------------------------------------------------- layer correlations vs Geant4
def layer_pcc(layer_e):
    """45 x 45 Pearson correlation matrix of the layer energies (N, 45) over the showers (the CaloChallenge
    'PCC Layer Energies'); a layer that is constant over the showers correlates 0 with every other."""
    with np.errstate(invalid="ignore", divide="ignore"):
        pcc = np.corrcoef(np.asarray(layer_e, dtype=np.float64), rowvar=False)
    return np.nan_to_num(pcc, nan=0.0)


def pcc_distance(layer_e, reference=G4_PCC):
    """Mean |PCC - PCC_Geant4| over the pairs i < j of the 45 layers: 'all' (990 pairs), 'first' (the rows
    of layers 0-5: pairs with i <= 5) and 'last' (both in layers 30-44). reference: a json with 'pcc'."""
    try:
        ref = np.asarray(json.loads(Path(reference).read_text())["pcc"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise common.DataError(f"cannot read a 'pcc' matrix from {reference}: {err}") from None
    if ref.shape != (common.N_LAYERS, common.N_LAYERS):
        raise common.DataError(f"{reference}: 'pcc' has shape {ref.shape}, not (45, 45)")
    i, j = np.triu_indices(common.N_LAYERS, 1)
    d = np.abs(layer_pcc(layer_e) - ref)[i, j]
    return {"all": float(d.mean()), "first": float(d[i <= FIRST_LAYERS[-1]].mean()),
            "last": float(d[i >= LAST_LAYERS[0]].mean())}


def file_layer_energies(path, ds, max_showers=None, progress=True):
    """The layer energies (N, 45) of a CaloChallenge file, read in chunks."""
    parts = [x.reshape(len(x), common.N_LAYERS, -1).sum(-1)
             for _, x in common.iter_showers(path, ds, max_showers, progress=progress)]
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- download (Zenodo)
def file_md5(path, chunk=1 << 22):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_file(url, dest, md5, progress=True, chunk=1 << 20, timeout=60):
    """Download url to dest through dest.part (resumed with an HTTP Range request when present);
    the file gets its final name only after its MD5 matched. Returns dest."""
    dest = Path(dest)
    if dest.exists():
        got = file_md5(dest)
        if got == md5:
            print(f"{dest} is already present (MD5 ok)")
            return dest
        raise common.DataError(f"{dest} exists but its MD5 is {got}, not {md5}: delete it and run again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "calodream-prepare.py"} | ({"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise common.DataError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from None
        resp = None  # 416: nothing left to fetch, the .part is complete (the MD5 decides)
    except (urllib.error.URLError, OSError) as err:
        raise common.DataError(f"cannot reach {url}: {getattr(err, 'reason', err)}") from None
    if resp is not None:
        with resp:
            if offset and (resp.status != 206 or not resp.headers.get("Content-Range", "").startswith(
                    f"bytes {offset}-")):
                offset = 0  # the server ignored the Range request: start again from byte 0
            rest = int(resp.headers.get("Content-Length") or 0)
            total = offset + rest if rest else SIZES.get(dest.name)
            _check_space(dest, (total or 0) - offset)
            with open(part, "ab" if offset else "wb") as f, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, disable=not progress) as bar:
                got, problem = 0, None
                try:
                    while block := resp.read(chunk):
                        f.write(block)
                        got += len(block)
                        bar.update(len(block))
                except (OSError, http.client.HTTPException) as err:
                    problem = f"{type(err).__name__}: {err}"
                if problem or got < rest:  # keep the .part for the next run
                    raise common.DataError(f"download of {dest.name} interrupted after {offset + got} bytes "
                                           f"({problem or 'connection closed early'}); run the same command "
                                           f"again to resume from {part}")
    got = file_md5(part)
    if got != md5:
        part.unlink()
        raise common.DataError(f"{dest.name}: MD5 {got} does not match {md5}; deleted {part}, run again")
    os.replace(part, dest)
    print(f"{dest}: {dest.stat().st_size / 1e6:.1f} MB, MD5 ok")
    return dest


def _check_space(dest, need):
    free = shutil.disk_usage(dest.parent).free
    if need > free:
        raise common.DataError(f"{dest.name} needs {need / 1e9:.2f} GB more but {dest.parent} has "
                               f"{free / 1e9:.2f} GB free")


def download(ds, out="data", files=None, base_url=None, md5=None, progress=True):
    """Fetch the Zenodo files of a dataset (all, or `files`) into `out`. base_url and md5 (a dict
    name -> hex digest that overrides MD5) let a test serve the files from a local server."""
    record, train, ref = common.ZENODO[common.geometry(ds).ds]
    digests = MD5 | (md5 or {})
    names = files or train + ref
    for name in names:
        if name not in train + ref and name not in (md5 or {}):
            raise ValueError(f"unknown file {name!r} for dataset {ds} (it has {', '.join(train + ref)})")
    base = (base_url or f"https://zenodo.org/records/{record}/files").rstrip("/")
    return [download_file(f"{base}/{name}?download=1", Path(out) / name, digests[name], progress)
            for name in names]


# ----------------------------------------------------------------------------- command line
def toy_command(args):
    sizes = TOY_SIZES[args.ds]
    n = sizes[0] if args.n is None else args.n
    n_ref = args.n_ref if args.n_ref is not None else sizes[1] if args.n is None else args.n
    jobs = [("train", n, args.seed), ("ref", n_ref, args.seed + REF_SEED_OFFSET)]
    paths = [Path(args.out) / f"toy_ds{args.ds}_{split}.hdf5" for split, _, _ in jobs]
    for path in paths:  # refuse before spending any time
        if path.exists() and not args.overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    for path, (split, n, seed) in zip(paths, jobs):
        start = time.time()
        write_toy(args.ds, n, path, seed=seed, overwrite=args.overwrite, progress=not args.no_progress)
        print(f"wrote {path}: {n} showers (seed {seed}), {path.stat().st_size / 1e6:.1f} MB, "
              f"{time.time() - start:.1f} s")


def pcc_command(args):
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be positive, got {args.n}")
    layer_e = file_layer_energies(args.file, args.ds, args.n, progress=not args.no_progress)
    d = pcc_distance(layer_e, args.reference)
    print(f"{args.file}: {len(layer_e)} showers, mean |dPCC| vs {Path(args.reference).name}: all {d['all']:.4f}, "
          f"layers 0-5 rows {d['first']:.4f}, layers 30-44 block {d['last']:.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy", help="write synthetic showers data/toy_ds{ds}_{train,ref}.hdf5")
    toy.add_argument("--ds", type=int, default=2, choices=(2, 3))
    toy.add_argument("--n", type=int, default=None, help="training showers (default 20000 DS2, 5000 DS3)")
    toy.add_argument("--n-ref", type=int, default=None, help="reference showers (default as --n)")
    toy.add_argument("--out", default="data", help="output folder")
    toy.add_argument("--seed", type=int, default=0, help="train seed; the reference uses seed + 1000003")
    toy.add_argument("--overwrite", action="store_true")
    toy.add_argument("--no-progress", action="store_true")
    dl = sub.add_parser("download", help="fetch the CaloChallenge files from Zenodo (resumable, MD5-checked)")
    dl.add_argument("--ds", type=int, default=2, choices=(2, 3))
    dl.add_argument("--out", default="data", help="output folder")
    dl.add_argument("--files", nargs="+", default=None, help="only these names (default: train + reference)")
    dl.add_argument("--base-url", default=None, help="instead of https://zenodo.org/records/<record>/files")
    dl.add_argument("--no-progress", action="store_true")
    pc = sub.add_parser("pcc", help="mean |dPCC| of a file's layer-energy correlations against Geant4's")
    pc.add_argument("file", help="CaloChallenge file (real, toy or generated)")
    pc.add_argument("--ds", type=int, default=2, choices=(2, 3))
    pc.add_argument("--n", type=int, default=None, help="only the first N showers")
    pc.add_argument("--reference", default=str(G4_PCC), help="json with the 45x45 'pcc' matrix")
    pc.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "toy":
        toy_command(args)
    elif args.command == "pcc":
        pcc_command(args)
    else:
        download(args.ds, args.out, args.files, args.base_url, progress=not args.no_progress)


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
