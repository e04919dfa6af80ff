"""CaloChallenge evaluation of generated showers, datasets 2 and 3 (paper Sec. 4; SPEC 3).

    python evaluate.py -i gen.hdf5 -r data/dataset_2_2.hdf5 --ds 2                  # all modes, official settings
    python evaluate.py -i gen.hdf5 -r data/dataset_3_3.hdf5 data/dataset_3_4.hdf5 --ds 3 -m hist fpd prdc
    python evaluate.py -i gen.hdf5 -r data/dataset_2_2.hdf5 --ds 2 -m cls-resnet     # the CaloChallenge "CNN" AUC
    python evaluate.py -i u_samples.hdf5 -r data/dataset_2_2.hdf5 --ds 2 --cls-repeats 3   # energy network: cls-u
    python evaluate.py -i data/toy_ds2_train.hdf5 --toy -m all --cls-epochs 5 --cls-width 256   # CPU quick run

Modes (-m, several allowed; default all = every mode but cls-resnet, like the official 'all'):
  hist        high-level features (E_tot/E_inc; per layer E_layer, EC_x, EC_y, width_x, width_y, EC_r, width_r,
              sparsity; voxel energies), separation powers, one PNG per feature family
  cls-low     official DNN classifier on [log10 E_inc, voxels / E_inc]: calibrated AUC and JSD
  cls-high    the same DNN on the 362 high-level features
  cls-resnet  official 3-D ResNet-18 ("CNN" column, 2.5M parameters) on the cls-low input: GPU minutes, CPU hours
  cls-u       the DNN on [ln E_inc, logit u] (46 numbers, standardised by the reference): scores the energy network;
              the input may be a condition file (energy.py --sample), for which all = cls-u and nothing else applies
  weights     classifier weights w = p/(1-p) (paper Eq. 21, Fig. 10), for every classifier run (alone: cls-low)
  fpd         FPD and KPD (x1e3, with errors) on the 362 high-level features
  prdc        precision, recall, density, coverage (k = 5) of log10 voxel energies (zeros as 0.1 MeV), reference = real
  timing      sampling time found in the generated file's attributes or a sidecar GEN.json
--cls-repeats K: each classifier reports the mean AUC / JSD of K seeds (seed, seed+1, ...), auc_std and aucs.
--out (default eval/<input stem>-ds<N>/; an existing one only with --overwrite) is built in a hidden folder beside it
and renamed at the end, so a killed run leaves no partial folder: summary.json (every number, written last),
separation_powers.txt, *.png, cls_<kind>_weights.npz.

Both samples get the 15.15 keV cut; features are computed in the files' own dtype, as the official evaluator does
(float64 files: float64). Classifier rows (float32) and PRDC rows are streamed batch by batch (disk-backed float32
above --ram-gb). Label reference = 1. Geant4 vs Geant4: AUCs 0.50, FPD x1e3 ~ 10 (DS2), KPD x1e3 ~ 0; CaloDREAM DS2
0.53 / 0.52 (SPEC 4). The official classifiers take minutes on one GPU, hours on a CPU: see --cls-epochs/--cls-width.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import MIN_ENERGY, N_LAYERS

MODES = ("hist", "cls-low", "cls-high", "cls-resnet", "cls-u", "weights", "fpd", "prdc", "timing")
CLASSIFIERS = ("cls-low", "cls-high", "cls-resnet", "cls-u")
MIN_CLASSIFIER, MIN_FPD, PRDC_K = 5, 2, 5  # least showers per sample: a 3/1/1 split, a covariance; PRDC's k
LAYER_KEYS = ("e_layer", "ec_x", "ec_y", "width_x", "width_y", "ec_r", "width_r", "sparsity")
LINEAR_BINS = {"etot_einc": (0.5, 1.5, 101), "ec_x": (-30, 30, 101), "ec_y": (-30, 30, 101),  # SPEC 3
               "width_x": (0, 30, 101), "width_y": (0, 30, 101), "ec_r": (0, 42, 101),
               "width_r": (0, 20, 101), "sparsity": (0, 1, 21)}
LOG_BINS = {"e_layer": 40, "voxel": 50}  # logspace(log10 threshold, log10 max of the reference, n)
LABELS = {"etot_einc": "E_tot / E_inc", "e_layer": "E_layer [MeV]", "ec_x": "EC_x [mm]", "ec_y": "EC_y [mm]",
          "width_x": "width_x [mm]", "width_y": "width_y [mm]", "ec_r": "EC_r [mm]", "width_r": "width_r [mm]",
          "sparsity": "sparsity", "voxel": "voxel energy [MeV]"}


# ----------------------------------------------------------------------------- high-level features
def _floating(a):
    a = np.asarray(a)
    return a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)


def high_level_features(e_inc, showers, ds, threshold=MIN_ENERGY):
    """SPEC 3 features of showers (N, n_vox) MeV with the official arithmetic, in the input's dtype as there (float32:
    float32 E_tot and E_layer; EC and widths float64). Voxels below `threshold` are zeroed on a copy (None: already
    cut). Returns e_inc, e_tot (N,) and e_layer, ec_x, ec_y, width_x, width_y, ec_r, width_r, sparsity (N, 45)."""
    x = _floating(showers) if threshold is None else _floating(showers).copy()
    if threshold is not None:
        x[x < threshold] = 0.0
    pos_x, pos_y, pos_r = common.geometry(ds).voxel_xyr()
    e = x.reshape(len(x), N_LAYERS, -1)
    e_layer = e.sum(-1)
    out = {"e_inc": _floating(e_inc).reshape(-1), "e_tot": x.sum(-1), "e_layer": e_layer}
    for name, pos in (("x", pos_x), ("y", pos_y), ("r", pos_r)):
        centre = (pos * e).sum(-1) / (e_layer + 1e-16)
        second = (pos * pos * e).sum(-1) / (e_layer + 1e-16)
        out[f"ec_{name}"], out[f"width_{name}"] = centre, np.sqrt((second - centre ** 2).clip(min=0.0))
    out["sparsity"] = 1.0 - (e > 0).mean(-1)  # fraction of voxels at zero after the cut
    return out


def feature_matrix(f):
    """The 362 inputs of the high-level classifier and of FPD/KPD, in the order of SPEC 3."""
    return np.concatenate([np.log10(f["e_inc"])[:, None], np.log10(f["e_layer"] + 1e-8),
                           f["ec_x"] / 1e2, f["ec_y"] / 1e2, f["width_x"] / 1e2, f["width_y"] / 1e2,
                           np.log10(f["e_tot"] + 1e-8)[:, None], f["sparsity"],
                           f["ec_r"] / 1e2, f["width_r"] / 1e2], axis=1)


def file_dtypes(paths, ds):
    """dtypes of incident_energies and showers in CaloChallenge files: the official evaluator computes in them."""
    found = []
    for path in paths:
        f, _ = common.open_showers(path, ds)
        found.append((f["incident_energies"].dtype, f["showers"].dtype))
        f.close()
    return tuple(_floating(np.zeros(0, np.result_type(*col))).dtype for col in zip(*found))


def scan(paths, ds, max_showers=None, features=True, low=None, vox_edges=None, progress=True, prdc=None):
    """One pass over CaloChallenge files (common.iter_showers' chunks, back in the files' own dtype, which is exact;
    negative voxels allowed: the cut removes them): the 15.15 keV cut, then optionally the high-level features, the
    rows [log10 E_inc, voxels / E_inc] into `low` and log10(voxels, 0 -> 0.1 MeV) into `prdc` (their first len()
    showers), and voxel-energy counts on `vox_edges`."""
    paths = list(paths)
    dt_e, dt_x = file_dtypes(paths, ds)
    chunk = max(1, 2 ** 28 // (8 * common.geometry(ds).n_vox))  # ~256 MB of float64 per chunk
    parts, vmax, done = [], None, 0
    counts = None if vox_edges is None else np.zeros(len(vox_edges) - 1, np.int64)
    for e, x in common.iter_showers(paths, ds, max_showers, chunk, progress, nonnegative=False):
        e, x = e.astype(dt_e, copy=False), x.astype(dt_x, copy=False)
        x[x < MIN_ENERGY] = 0.0
        vmax = x.max() if vmax is None else max(vmax, x.max())  # a numpy scalar of the file dtype
        if features:
            parts.append(high_level_features(e, x, ds, threshold=None))
        k = min(len(e), len(low) - done) if low is not None else 0
        if k > 0:
            low[done:done + k, 0], low[done:done + k, 1:] = np.log10(e[:k]), x[:k] / e[:k, None]
        k = min(len(e), len(prdc) - done) if prdc is not None else 0
        if k > 0:
            prdc[done:done + k] = np.log10(np.where(x[:k] == 0, x.dtype.type(0.1), x[:k]))
        if counts is not None:
            counts += np.histogram(x, vox_edges)[0]
        done += len(e)
    feats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
    return {"n": done, "features": feats, "vmax": vmax, "vox_counts": counts}


# ----------------------------------------------------------------------------- separation power
def separation_power(p_hist, q_hist, edges=None):
    """S = 1/2 sum (p - q)^2 / (p + q + 1e-16) of two histograms on common edges, each normalised to unit sum;
    with `edges`, as the official code does it (density = counts / width / total, times width: the same to 1e-16,
    and digit for digit). 0 = identical, 1 = disjoint, nan if one is empty."""
    p, q = np.asarray(p_hist, np.float64), np.asarray(q_hist, np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    w = np.ones_like(p) if edges is None else np.diff(edges).astype(np.float64)
    p, q = p / w / p.sum() * w, q / w / q.sum() * w
    return float(0.5 * ((p - q) ** 2 / (p + q + 1e-16)).sum())


def hist_edges(key, ref_max=None):
    """SPEC 3 edges; the log ones end at 10**log10(reference max) in the dtype of the maximum, as the official code
    does. That edge is within rounding of the maximum, so whether the largest value counts follows the last bit of
    numpy's log10 and power, which differ between numpy builds (1.26 vs 2.4 on AVX-512: 7 of 45 DS2 E_layer
    separation powers differ by up to 3e-4, in the official evaluator as here)."""
    if key in LOG_BINS:
        return np.logspace(np.log10(MIN_ENERGY), np.log10(ref_max), LOG_BINS[key]) if ref_max > MIN_ENERGY else None
    return np.linspace(*LINEAR_BINS[key])


def histograms(f_gen, f_ref):
    """{key: [(edges, ref counts, gen counts, separation power)]}; per-layer keys hold 45 entries."""
    out = {}
    for key in ("etot_einc",) + LAYER_KEYS:
        g = f_gen["e_tot"] / f_gen["e_inc"] if key == "etot_einc" else f_gen[key]
        r = f_ref["e_tot"] / f_ref["e_inc"] if key == "etot_einc" else f_ref[key]
        g, r = (g[:, None], r[:, None]) if g.ndim == 1 else (g, r)
        out[key] = []
        for l in range(g.shape[1]):
            edges = hist_edges(key, r[:, l].max())
            if edges is None:  # empty layer in every reference shower: no logspace edges
                out[key].append((None, None, None, float("nan")))
                continue
            n_ref, n_gen = np.histogram(r[:, l], edges)[0], np.histogram(g[:, l], edges)[0]
            out[key].append((edges, n_ref, n_gen, separation_power(n_ref, n_gen, edges)))
    return out


# ----------------------------------------------------------------------------- classifiers (SPEC 3)
def roc_auc(y, score):
    """ROC AUC = P(score | y=1 > score | y=0) + P(tie)/2, from average ranks."""
    y, s = np.asarray(y).astype(bool), np.asarray(score, np.float64)
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]
    n1, n0 = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def isotonic_fit(x, y, y_min=1e-6, y_max=1 - 1e-6):
    """Increasing isotonic regression of y on x (pool adjacent violators; equal x pooled first), clipped
    to [y_min, y_max]. Returns (x knots, y knots); predict with np.interp, which clips outside."""
    xs, inv = np.unique(np.asarray(x, np.float64), return_inverse=True)
    w = np.bincount(inv).astype(np.float64)
    m = np.bincount(inv, weights=np.asarray(y, np.float64)) / w
    vals, wts, lens = [], [], []
    for v, ww in zip(m.tolist(), w.tolist()):
        vals.append(v), wts.append(ww), lens.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v2, w2, l2 = vals.pop(), wts.pop(), lens.pop()
            vals[-1] = (vals[-1] * wts[-1] + v2 * w2) / (wts[-1] + w2)
            wts[-1] += w2
            lens[-1] += l2
    return xs, np.clip(np.repeat(vals, lens), y_min, y_max)


class DNN(nn.Sequential):
    """Official CaloChallenge classifier: `hidden` x [Linear(., width), LeakyReLU(0.01)], Linear(width, 1)."""

    def __init__(self, d, width=2048, hidden=3):
        layers = []
        for i in range(hidden):
            layers += [nn.Linear(d if i == 0 else width, width), nn.LeakyReLU()]
        super().__init__(*layers, nn.Linear(width, 1))


class ResNet(nn.Module):
    """The CaloChallenge "CNN" (official code/resnet.py, generate_model(18)); 2,516,644 parameters on either dataset.
    A 3-D ResNet-18 of widths 32/64/64/128 on voxels / E_inc as one channel (layers, alpha, r): conv 7^3 stride 2 + BN
    + ReLU + max-pool 3/2; 4 stages of 2 residual blocks [conv 3^3 (stride 2 in the first block from stage 2), BN,
    ReLU, conv 3^3, BN; shortcut: 1^3 conv + BN where the shape changes; ReLU]; global average pool; log10 E_inc
    through BatchNorm1d joins the 128 channels in Linear(129, 1). Kaiming-normal (fan_out) convolutions, no biases.
    Input rows [log10 E_inc, voxels / E_inc]."""

    def __init__(self, image, widths=(32, 64, 64, 128)):
        super().__init__()
        conv = lambda i, o, k, s: nn.Sequential(nn.Conv3d(i, o, k, s, k // 2, bias=False), nn.BatchNorm3d(o))
        self.image, c, self.blocks = tuple(image), widths[0], nn.ModuleList()
        self.stem = nn.Sequential(conv(1, c, 7, 2), nn.ReLU(inplace=True), nn.MaxPool3d(3, 2, 1))
        for i, w in enumerate(widths):
            for stride in (2 if i else 1, 1):
                body = nn.Sequential(conv(c, w, 3, stride), nn.ReLU(inplace=True), conv(w, w, 3, 1))
                shortcut = nn.Identity() if (stride, c) == (1, w) else conv(c, w, 1, stride)
                self.blocks.append(nn.ModuleList([body, shortcut]))
                c = w
        self.e_norm, self.fc = nn.BatchNorm1d(1), nn.Linear(c + 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        h = self.stem(x[:, 1:].reshape(-1, 1, *self.image))
        for body, shortcut in self.blocks:
            h = F.relu(body(h) + shortcut(h))
        return self.fc(torch.cat([h.mean((2, 3, 4)), self.e_norm(x[:, :1])], 1))


def split_sizes(n):
    """Showers per class for train and test: 60k/20k for full-size files, else 0.6/0.2; the rest validates."""
    return (60_000, 20_000) if n >= 100_000 else (int(n * 0.6), int(n * 0.2))


def classify(x_gen, x_ref, seed=0, epochs=50, width=2048, batch_size=1000, lr=2e-4, device=None,
             hidden=3, progress=True, name="classifier", image=None):
    """Two-sample test of SPEC 3 on (N, d) arrays (numpy or memmap, read per batch as float32) with the DNN, or the
    ResNet for `image` = (layers, alpha, r). Label reference = 1. BCE, Adam, the epoch of best test accuracy, isotonic
    calibration on test; AUC and JSD = (ln 2 - BCE)/ln 2 on validation, and the weights w = p/(1-p) there."""
    t0, device = time.time(), common.pick_device(device)
    arrays = [x.detach().cpu().numpy() if torch.is_tensor(x) else x for x in (x_gen, x_ref)]
    n, d = min(len(arrays[0]), len(arrays[1])), arrays[0].shape[1]
    n_train, n_test = split_sizes(n)
    if min(n_train, n_test, n - n_train - n_test) < 1:
        raise ValueError(f"{n} showers per class are too few for a train/test/validation split "
                         f"(at least {MIN_CLASSIFIER})")
    rng = np.random.default_rng(seed)
    parts = [np.split(rng.permutation(len(x))[:n], [n_train, n_train + n_test]) for x in arrays]
    train, test, val = ([np.stack([np.full(len(parts[c][k]), c), parts[c][k]], 1) for c in (0, 1)] for k in range(3))
    train, test, val = (np.concatenate(s) for s in (train, test, val))  # rows of (label, index)

    def batch(rows):
        xb = np.empty((len(rows), d), np.float32)
        for c in (0, 1):
            at = np.flatnonzero(rows[:, 0] == c)
            at = at[np.argsort(rows[at, 1])]  # ascending reads: kind to a disk-backed array
            xb[at] = arrays[c][rows[at, 1]]
        return torch.from_numpy(xb).to(device), torch.from_numpy(rows[:, 0].astype(np.float32)).to(device)

    @torch.no_grad()
    def logits(rows):
        model.eval()
        return np.concatenate([model(batch(rows[i:i + batch_size])[0]).squeeze(1).double().cpu().numpy()
                               for i in range(0, len(rows), batch_size)])

    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):  # leave the caller's RNGs alone
        torch.manual_seed(seed)  # initialised on the CPU: the same weights on any device
        model = (ResNet(image) if image else DNN(d, width, hidden)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_epoch, best_state, history = -1.0, 0, None, []
    bar = tqdm(range(epochs), desc=name, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        order, losses = rng.permutation(len(train)), []
        for i in range(0, len(train) - (image is not None), batch_size):  # BatchNorm: no 1-row last batch
            xb, yb = batch(train[order[i:i + batch_size]])
            loss = F.binary_cross_entropy_with_logits(model(xb).squeeze(1), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        acc = float(np.mean((logits(test) > 0) == (test[:, 0] == 1)))
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "test_acc": acc})
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", test_acc=f"{acc:.4f}")
        if acc > best:
            best, best_epoch = acc, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if acc == 1.0:
            break
    model.load_state_dict(best_state)
    sig = lambda z: torch.sigmoid(torch.from_numpy(z)).numpy()  # float64
    knots = isotonic_fit(sig(logits(test)), test[:, 0])
    p_raw = sig(logits(val))
    p, y = np.interp(p_raw, *knots), val[:, 0]
    bce = -np.mean(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log(1 - p), -100))
    w = p / (1 - p)
    return {"auc": roc_auc(y, p), "jsd": float((math.log(2) - bce) / math.log(2)),
            "auc_uncalibrated": roc_auc(y, p_raw), "best_epoch": best_epoch, "best_test_acc": best,
            "history": history, "n_train": len(train), "n_test": len(test), "n_val": len(val),
            "parameters": common.count_parameters(model), "seconds": time.time() - t0,
            "weights_gen": w[y == 0], "weights_ref": w[y == 1]}


def classify_repeats(x_gen, x_ref, repeats=1, seed=0, **kw):
    """classify() with seeds seed, seed+1, ...: the first run's details; auc, jsd = means, auc_std, aucs, jsds."""
    runs = [classify(x_gen, x_ref, seed=seed + k, **kw) for k in range(repeats)]
    aucs, jsds = [r["auc"] for r in runs], [r["jsd"] for r in runs]
    return {**runs[0], "auc": float(np.mean(aucs)), "auc_std": float(np.std(aucs)), "aucs": aucs,
            "jsd": float(np.mean(jsds)), "jsds": jsds, "seconds": sum(r["seconds"] for r in runs)}


def u_rows(e_gen, u_gen, e_ref, u_ref):
    """cls-u rows [ln E_inc, logit u] (float32) of two samples, standardised by the reference's mean and std."""
    feats = [torch.cat([e.log()[:, None], common.logit(u)], 1) for e, u in ((e_gen, u_gen), (e_ref, u_ref))]
    mu, sd = feats[1].mean(0), feats[1].std(0).clamp_min(1e-6)
    return tuple(((f - mu) / sd).float().numpy() for f in feats)


# ----------------------------------------------------------------------------- FPD / KPD (SPEC 3)
def frechet_distance(mu1, s1, mu2, s2):
    """|mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), the last via the eigenvalues of the symmetric
    sqrt(S1) S2 sqrt(S1) (same spectrum as S1 S2), in float64. One thread: multi-threaded LAPACK on
    362 x 362 matrices is ~50x slower on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s1, s2 = (torch.as_tensor(s, dtype=torch.float64, device="cpu") for s in (s1, s2))
        w, v = torch.linalg.eigh(s1)
        root = (v * w.clamp(min=0).sqrt()) @ v.T
        m = root @ s2 @ root
        ev = torch.linalg.eigvalsh((m + m.T) / 2)
        trace_sqrt = float(ev.clamp(min=0).sqrt().sum())
    finally:
        torch.set_num_threads(threads)
    return float(((np.asarray(mu1) - np.asarray(mu2)) ** 2).sum() + s1.trace() + s2.trace() - 2 * trace_sqrt)


def _fit_intercept(x, y):
    """Least squares y = a + b x with a, b >= 0; a and its curve_fit-style error sqrt(cov_aa)."""
    J = np.stack([np.ones_like(x), x], 1)
    cands = [np.linalg.lstsq(J, y, rcond=None)[0], np.array([0.0, max(0.0, x @ y / (x @ x))]),
             np.array([max(0.0, y.mean()), 0.0]), np.zeros(2)]
    a_b = min((c for c in cands if (c >= 0).all()), key=lambda c: ((J @ c - y) ** 2).sum())
    s2 = ((J @ a_b - y) ** 2).sum() / max(len(x) - 2, 1)
    return a_b[0], math.sqrt(np.linalg.inv(J.T @ J)[0, 0] * s2)


def _mmd_poly(a, b, block=2000):
    """Unbiased MMD^2 with the kernel (x.y/d + 1)^4, summed block by block."""
    d = a.shape[1]

    def ksum(p, q, same):  # sum of k(p_i, q_j), i != j if same (then only blocks right of the diagonal)
        total = 0.0
        for i in range(0, len(p), block):
            k = (p[i:i + block] @ q[i if same else 0:].T).div_(d).add_(1).square_().square_()
            total += float(2 * k.sum() - k[:, :block].sum() - torch.diagonal(k).sum() if same else k.sum())
        return total
    m, n = len(a), len(b)
    return ksum(a, a, True) / (m * (m - 1)) + ksum(b, b, True) / (n * (n - 1)) - 2 * ksum(a, b, False) / (m * n)


def fpd_kpd(feat_gen, feat_ref, seed=0, device=None, n_min=10000, n_max=50000, n_points=10, n_draws=20,
            kpd_batches=10, kpd_batch=10000):
    """FPD and KPD (x1e3, with errors) of SPEC 3. Features are divided by max |value| of the reference
    (a feature that is 0 throughout stays unscaled). FPD: mean Frechet distance of n_draws draws with
    replacement at each N in 1/linspace(1/n_min, 1/n_max, n_points), extrapolated to N -> inf by
    FD = a + b/N (a, b >= 0). KPD: median (and half the 16.275-83.725 percentile spread) of the
    unbiased polynomial MMD^2 over kpd_batches draws of kpd_batch. Small samples are drawn with
    replacement too, which keeps the definition but adds their own finite-sample floor. float64
    throughout, on `device` (CPU: a few minutes for 100k showers)."""
    dev = common.pick_device(device)
    scale = np.abs(feat_ref).max(0)
    scale[scale == 0] = 1.0
    ref, gen = (torch.as_tensor(np.asarray(x) / scale, dtype=torch.float64, device=dev) for x in (feat_ref, feat_gen))
    rng = np.random.default_rng(seed)
    draw = lambda x, n: torch.as_tensor(rng.integers(0, len(x), n), device=dev)

    def moments(x, n):  # mean and unbiased covariance of n rows drawn with replacement (as multiplicities)
        rows, mult = np.unique(rng.integers(0, len(x), n), return_counts=True)
        xs, w = x[torch.as_tensor(rows, device=dev)], torch.as_tensor(mult, dtype=torch.float64, device=dev)[:, None]
        mu = (w * xs).sum(0) / n
        xc = xs - mu
        return mu.cpu().numpy(), (xc.T @ (w * xc) / (n - 1)).cpu().numpy()

    ns = (1 / np.linspace(1 / n_min, 1 / n_max, n_points)).astype(np.int32)
    fds = [np.mean([frechet_distance(*moments(ref, n), *moments(gen, n)) for _ in range(n_draws)]) for n in ns]
    fpd, fpd_err = _fit_intercept(1.0 / ns, np.array(fds))
    mmd = np.array([_mmd_poly(ref[draw(ref, kpd_batch)], gen[draw(gen, kpd_batch)]) for _ in range(kpd_batches)])
    kpd_err = (np.percentile(mmd, 83.725) - np.percentile(mmd, 16.275)) / 2
    return {"fpd": 1e3 * fpd, "fpd_err": 1e3 * fpd_err, "kpd": 1e3 * float(np.median(mmd)),
            "kpd_err": 1e3 * float(kpd_err), "fpd_n": ns.tolist(), "fpd_curve": (1e3 * np.array(fds)).tolist()}


# ----------------------------------------------------------------------------- PRDC (official: the prdc package)
def prdc(real, fake, k=PRDC_K, device=None, rows=None, cols=4096, progress=False):
    """Precision, recall, density, coverage (Naeem et al. 2020) of fake vs real (N, d) arrays (numpy or memmap), with
    the arithmetic of the `prdc` package the official evaluator calls: distances sqrt(max(0, -2 a.b + |a|^2 + |b|^2))
    in float64 (rounded to float32 first for float32 rows, as sklearn does), 0 to itself; radius = the (k+1)-th
    smallest distance within the own set; strict comparisons. Blocks of rows x cols points on `device` (rows: 2 GB
    of float64), so memory is bounded for any N."""
    dev = common.pick_device(device)
    dt = torch.float64 if np.result_type(real.dtype, fake.dtype) == np.float64 else torch.float32
    rows = rows or max(1, min(len(real), len(fake), 2 ** 28 // real.shape[1]))
    n_blocks = sum(-(-len(a) // rows) * -(-len(b) // cols) for a, b in ((real, real), (fake, fake), (real, fake)))
    bar = tqdm(total=n_blocks, desc="prdc", disable=not progress, leave=False)

    def blocks(x, size):
        for s in range(0, len(x), size):
            b = torch.as_tensor(np.asarray(x[s:s + size]), device=dev).double()
            yield s, b, (b * b).sum(1)

    def pairs(a, b):  # (i, j, distances of rows i.. of a to rows j.. of b)
        for i, xa, na in blocks(a, rows):
            for j, xb, nb in blocks(b, cols):
                d = (xa @ xb.T).mul_(-2).add_(na[:, None]).add_(nb[None, :]).to(dt).clamp_(min=0)
                lo, hi = max(i, j), min(i + len(xa), j + len(xb))
                if a is b and lo < hi:
                    at = torch.arange(lo, hi, device=dev)
                    d[at - i, at - j] = 0
                bar.update()
                yield i, j, d.sqrt_()

    def radii(x):
        r, best = torch.empty(len(x), dtype=dt, device=dev), None
        for i, j, d in pairs(x, x):  # column blocks of one row block come in order: keep the k+1 smallest
            best = d if j == 0 else torch.cat([best, d], 1)
            best = best.topk(min(k + 1, best.shape[1]), 1, largest=False).values
            if j + d.shape[1] == len(x):
                r[i:i + len(d)] = best.max(1).values
        return r

    r_real, r_fake = radii(real), radii(fake)
    count = torch.zeros(len(fake), dtype=torch.int64, device=dev)  # real k-NN balls holding each fake point
    recalled = torch.zeros(len(real), dtype=torch.bool, device=dev)  # real points inside some fake ball
    nearest = torch.full((len(real),), math.inf, dtype=dt, device=dev)  # nearest fake point of each real one
    for i, j, d in pairs(real, fake):
        ri, fj = slice(i, i + d.shape[0]), slice(j, j + d.shape[1])
        count[fj] += (d < r_real[ri, None]).sum(0)
        recalled[ri] |= (d < r_fake[None, fj]).any(1)
        nearest[ri] = torch.minimum(nearest[ri], d.min(1).values)
    bar.close()
    mean = lambda t: t.double().mean().item()
    return {"precision": mean(count > 0), "recall": mean(recalled), "density": (1.0 / k) * mean(count),
            "coverage": mean(nearest < r_real), "k": k, "n_real": len(real), "n_fake": len(fake)}


# ----------------------------------------------------------------------------- plots (lazy matplotlib)
def plot_family(path, title, panels, logx=False, logy=False):
    """CaloChallenge-style panels: reference filled, generated as a line, generated/reference below.
    panels: list of (label, edges, ref counts, gen counts); edges None leaves a panel empty."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(len(panels), 5)
    rows = -(-len(panels) // cols)
    fig = plt.figure(figsize=(3.0 * cols, 2.8 * rows + 0.6), dpi=72)
    gs = fig.add_gridspec(3 * rows, cols, height_ratios=[3, 1, 0.9] * rows, hspace=0, wspace=0.3,
                          left=0.05, right=0.98, top=1 - 0.9 / (2.8 * rows + 0.6), bottom=0.01)
    for i, (label, edges, n_ref, n_gen) in enumerate(panels):
        r, c = divmod(i, cols)
        ax, axr = fig.add_subplot(gs[3 * r, c]), fig.add_subplot(gs[3 * r + 1, c])
        ax.set_title(label, fontsize=8, pad=2)
        if edges is None:
            ax.axis("off"), axr.axis("off")
            continue
        p_ref, p_gen = n_ref / max(n_ref.sum(), 1), n_gen / max(n_gen.sum(), 1)
        ax.stairs(p_ref, edges, fill=True, color="0.6", alpha=0.6, label="reference")
        ax.stairs(p_gen, edges, color="C3", lw=1.2, label="generated")
        axr.stairs(np.divide(p_gen, p_ref, out=np.full_like(p_gen, np.nan), where=p_ref > 0), edges,
                   color="C3", baseline=None)
        axr.axhline(1.0, color="0.3", lw=0.6)
        axr.set_ylim(0.5, 1.5)
        for a in (ax, axr):
            a.tick_params(labelsize=6)
            if logx:  # (minor log ticks cost most of the drawing time)
                a.set_xscale("log")
                a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            a.set_xlim(edges[0], edges[-1])
        ax.set_xticklabels([])
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if i == 0:
            ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.savefig(path)
    plt.close(fig)


def plot_histograms(out, hists):
    for key, entries in hists.items():
        per_layer = key in LAYER_KEYS
        panels = [(f"layer {l}  S={s:.1e}" if per_layer else f"{LABELS[key]}  S={s:.2e}", e, nr, ng)
                  for l, (e, nr, ng, s) in enumerate(entries)]
        plot_family(out / f"{key}.png", LABELS[key], panels, key in LOG_BINS, key not in ("etot_einc", "sparsity"))


# ----------------------------------------------------------------------------- output folder, checks
def claim_out(out):
    """Create the hidden work folder .<out>.<pid>.tmp beside out, after removing those of dead runs (pid gone)."""
    prefix = f".{out.name}."
    for old in out.parent.glob(f"{prefix}*") if out.parent.is_dir() else ():
        pid = old.name[len(prefix):].split(".")[0]
        if old.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not common.pid_alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    (work := out.parent / f"{prefix}{os.getpid()}.tmp").mkdir(parents=True)
    return work


def publish(work, out):
    """Rename the finished work folder to out (disk-backed rows deleted); an old out (--overwrite) goes only now."""
    for rows in work.glob(".*.npy"):  # unlinking a mapped file is fine on POSIX: the pages go with the last reference
        rows.unlink()
    old = out.parent / f".{out.name}.{os.getpid()}.old"
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)


def plan(modes, conditions, gen_path):
    """The set of modes to run; a condition file as input allows cls-u only."""
    modes = set(modes)
    if modes - set(MODES) - {"all"}:
        raise ValueError(f"unknown mode(s) {sorted(modes - set(MODES) - {'all'})}; choose from {MODES + ('all',)}")
    if conditions and modes - {"all", "cls-u"}:
        raise ValueError(f"{gen_path} is a condition file (E_inc and u's): only -m cls-u (or all) applies, not "
                         f"{' '.join(sorted(modes - {'all', 'cls-u'}))}")
    if conditions:
        return {"cls-u"}
    if "all" in modes:
        modes = (modes - {"all"}) | (set(MODES) - {"cls-resnet"})
    if "weights" in modes and not modes & set(CLASSIFIERS):
        modes.add("cls-low")
    return modes


def check_counts(modes, n):
    for wanted, least, what in (("hist" in modes, 1, "histograms"),
                                (modes & set(CLASSIFIERS), MIN_CLASSIFIER, "a classifier's 0.6/0.2/0.2 split"),
                                ("fpd" in modes, MIN_FPD, "FPD/KPD (a covariance, the unbiased MMD)"),
                                ("prdc" in modes, PRDC_K + 1, f"PRDC with k = {PRDC_K} (k neighbours besides itself)")):
        if wanted and n < least:
            raise ValueError(f"{n} showers per sample are too few for {what}: it needs at least {least}")


def condition_rows(path):
    """Rows of a condition file (E_inc and u's); None for anything else (the shower reader judges it)."""
    try:
        with h5py.File(path, "r") as f:
            return len(f["u"]) if "u" in f and "showers" not in f else None
    except (OSError, ValueError):
        return None


def row_arrays(work, name, shapes, dtype, ram_gb):
    """(gen, ref) arrays of rows: in RAM, or disk-backed float32 in the work folder above --ram-gb."""
    disk = sum(math.prod(s) for s in shapes) * np.dtype(dtype).itemsize > ram_gb * 2 ** 30
    print(f"{name} rows: {shapes} {'float32 on disk' if disk else np.dtype(dtype).name + ' in RAM'}")
    return [np.lib.format.open_memmap(work / f".{name}_{k}.npy", "w+", np.float32, s) if disk else np.empty(s, dtype)
            for k, s in zip(("gen", "ref"), shapes)]


# ----------------------------------------------------------------------------- the evaluation
def timing_info(gen_path):
    """Sampling-time numbers from the generated file's root attributes or a sidecar GEN.json / GEN.hdf5.json."""
    info = {}
    with h5py.File(gen_path, "r") as f:
        info.update({k: float(v) for k, v in f.attrs.items() if "time" in k.lower() and np.ndim(v) == 0})
    for side in (Path(gen_path).with_suffix(".json"), Path(str(gen_path) + ".json")):
        if side.is_file():
            info.update({k: v for k, v in json.loads(side.read_text()).items() if isinstance(v, (int, float))})
    return info or {"note": "no sampling time found (HDF5 attribute with 'time' in its name, or GEN.json)"}


def _clean(obj):  # numpy -> JSON (nan -> null)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(obj) else float(obj)
    return obj.item() if isinstance(obj, np.generic) else obj


def run_hist(summary, work, gen, ref, refs, ds, max_showers, vox_edges, plots, progress):
    hists = histograms(gen["features"], ref["features"])
    if vox_edges is not None:  # second pass: the voxel edges need the reference maximum first
        n_ref_vox = scan(refs, ds, max_showers, False, vox_edges=vox_edges, progress=progress)["vox_counts"]
        hists["voxel"] = [(vox_edges, n_ref_vox, gen["vox_counts"], separation_power(n_ref_vox, gen["vox_counts"], vox_edges))]
    sep = {k: [h[3] for h in v] if k in LAYER_KEYS else v[0][3] for k, v in hists.items()}
    summary["separation_power"] = sep
    summary["separation_power_mean"] = {k: float(np.nanmean(v)) if np.isfinite(v).any() else None for k, v in sep.items()}
    with open(work / "separation_powers.txt", "w") as f:
        f.write("# separation power S = 1/2 sum (p-q)^2/(p+q), SPEC 3; per-layer features: one line per layer\n")
        for k, v in sep.items():
            f.writelines(f"{k} {l} {s:.9e}\n" for l, s in enumerate(v)) if k in LAYER_KEYS else f.write(f"{k} {v:.9e}\n")
    if plots:
        t = time.time()
        plot_histograms(work, hists)
        summary["times_s"]["hist_plots"] = time.time() - t


def run_classifiers(summary, work, modes, inputs, ds, seed, repeats, plots, cls_kw):
    panels = []
    for kind in (k for k in CLASSIFIERS if k in modes):
        t, key = time.time(), kind.replace("-", "_")
        r = classify_repeats(*inputs[kind](), repeats, seed=seed, name=kind,
                             image=common.geometry(ds).shape if kind == "cls-resnet" else None, **cls_kw)
        w_gen, w_ref = r.pop("weights_gen"), r.pop("weights_ref")
        np.savez(work / f"{key}_weights.npz", weights_gen=w_gen, weights_ref=w_ref)
        edges = np.linspace(np.log10(min(w_gen.min(), w_ref.min())) - 1e-9, np.log10(max(w_gen.max(), w_ref.max())) + 1e-9, 51)
        panels.append((f"{kind}: log10 w, AUC {r['auc']:.4f}", edges,
                       np.histogram(np.log10(w_ref), edges)[0], np.histogram(np.log10(w_gen), edges)[0]))
        summary[key], summary["times_s"][key] = r, time.time() - t
        print(f"{kind}: AUC {r['auc']:.4f}" + (f" +- {r['auc_std']:.4f} ({repeats} seeds)" if repeats > 1 else "")
              + f"  JSD {r['jsd']:.4f}  (best epoch {r['best_epoch']}, {r['seconds']:.0f} s)")
    if panels and plots:
        plot_family(work / "classifier_weights.png", "classifier weights w = p/(1-p) (validation showers)", panels)


def run_modes(summary, work, gen_path, refs, ds, modes, conditions, kw):
    """Read the samples once, run the modes; results go into summary and files into the work folder."""
    times, n_gen, n_ref = summary["times_s"], summary["config"]["n_gen"], summary["config"]["n_ref"]
    max_showers, progress, n_vox = kw["max_showers"], kw["progress"], common.geometry(ds).n_vox
    low = prdc_rows = [None, None]
    if modes & {"cls-low", "cls-resnet"}:  # float32 rows (DS3: 16 GB per 100k showers), deleted by publish()
        low = row_arrays(work, "cls_low", [(min(n_gen, n_ref), n_vox + 1)] * 2, np.float32, kw["ram_gb"])
    if "prdc" in modes:
        dt = np.result_type(file_dtypes([gen_path], ds)[1], file_dtypes(refs, ds)[1])
        prdc_rows = row_arrays(work, "prdc", [(n_gen, n_vox), (n_ref, n_vox)], dt, kw["ram_gb"])
    if modes - {"cls-u", "timing"}:
        t, feats = time.time(), bool(modes & {"hist", "cls-high", "fpd"})
        ref = scan(refs, ds, max_showers, feats, low[1], progress=progress, prdc=prdc_rows[1])
        vox_edges = hist_edges("voxel", ref["vmax"]) if "hist" in modes else None
        gen = scan([gen_path], ds, max_showers, feats, low[0], vox_edges, progress, prdc_rows[0])
        times["read"] = time.time() - t
    if "hist" in modes:
        t = time.time()
        run_hist(summary, work, gen, ref, refs, ds, max_showers, vox_edges, kw["plots"], progress)
        times["hist"] = time.time() - t - times.get("hist_plots", 0.0)
    inputs = {"cls-low": lambda: low, "cls-resnet": lambda: low,
              "cls-high": lambda: [feature_matrix(s["features"]).astype(np.float32) for s in (gen, ref)],
              "cls-u": lambda: u_rows(*(common.read_conditions(gen_path, ds, n_gen)[:2] if conditions else  # true u's
                                        common.load_u([gen_path], ds, max_showers, progress=progress)),
                                      *common.load_u(refs, ds, max_showers, progress=progress))}
    run_classifiers(summary, work, modes, inputs, ds, kw["seed"], kw["cls_repeats"], kw["plots"], kw["cls"])
    if "fpd" in modes:
        t = time.time()
        summary["fpd_kpd"] = fpd_kpd(feature_matrix(gen["features"]), feature_matrix(ref["features"]),
                                     seed=kw["seed"], device=kw["device"], **(kw["fpd_kw"] or {}))
        times["fpd_kpd"] = time.time() - t
    if "prdc" in modes:
        t = time.time()
        summary["prdc"] = prdc(prdc_rows[1], prdc_rows[0], device=kw["device"], progress=progress)
        times["prdc"] = time.time() - t
    if "timing" in modes:
        summary["timing"] = timing_info(gen_path)


def evaluate(gen_path, ref_path, ds, modes=("all",), out_dir="eval", seed=0, cls_epochs=50, cls_width=2048,
             cls_batch_size=1000, cls_lr=2e-4, max_showers=None, device=None, plots=True, progress=True,
             ram_gb=12.0, fpd_kw=None, cls_repeats=1, overwrite=False):
    """Run the chosen modes on a generated file (or a condition file: cls-u) against reference file(s); build
    out_dir (summary.json last, separation_powers.txt, plots, weights) in a hidden work folder, rename it to
    out_dir at the end, and return the summary dict."""
    common.geometry(ds)  # ValueError for a wrong ds
    for flag, v in (("--cls-epochs", cls_epochs), ("--cls-width", cls_width), ("--cls-batch-size", cls_batch_size),
                    ("--cls-repeats", cls_repeats), ("--max-showers", 1 if max_showers is None else max_showers)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    out, refs = Path(out_dir), [ref_path] if isinstance(ref_path, (str, Path)) else list(ref_path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    n_cond = condition_rows(gen_path)
    conditions, modes = n_cond is not None, plan(modes, n_cond is not None, gen_path)
    n_gen = min(n_cond, max_showers or n_cond) if conditions else common.count_showers([gen_path], ds, max_showers)
    n_ref = common.count_showers(refs, ds, max_showers)
    check_counts(modes, min(n_gen, n_ref))
    cls = dict(epochs=cls_epochs, width=cls_width, batch_size=cls_batch_size, lr=cls_lr)
    summary = {"config": {"gen": str(gen_path), "ref": [str(r) for r in refs], "ds": ds, "modes": sorted(modes),
                          "n_gen": n_gen, "n_ref": n_ref, "seed": seed, **{f"cls_{k}": v for k, v in cls.items()},
                          "cls_repeats": cls_repeats, "device": str(common.pick_device(device))}, "times_s": {}}
    work = claim_out(out)
    try:
        run_modes(summary, work, gen_path, refs, ds, modes, conditions,
                  dict(seed=seed, max_showers=max_showers, device=device, plots=plots, progress=progress, ram_gb=ram_gb,
                       fpd_kw=fpd_kw, cls_repeats=cls_repeats, cls=dict(cls, device=device, progress=progress)))
        text = json.dumps(_clean(summary), indent=1)
        common.atomic_write(work / "summary.json", lambda tmp: tmp.write_text(text))
        if out.exists() and not overwrite:  # made meanwhile by another run
            raise FileExistsError(f"{out} was written by another run meanwhile; pass --overwrite to replace it")
        publish(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # after an error: nothing half-written is left
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description="CaloChallenge evaluation of generated showers (SPEC 3).")
    p.add_argument("-i", "--input", required=True, help="generated CaloChallenge file, or a condition file (cls-u)")
    p.add_argument("-r", "--reference", nargs="+", default=None,
                   help="reference file(s); default the held-out files of --ds in --data-dir (or the toy ref)")
    p.add_argument("--ds", type=int, default=2, help="dataset 2 or 3")
    p.add_argument("-m", "--mode", nargs="+", default=["all"], choices=MODES + ("all",),
                   help="what to evaluate (all: every mode but cls-resnet)")
    p.add_argument("--data-dir", default="data", help="where the default reference files are")
    p.add_argument("--toy", action="store_true", help="default reference: data/toy_ds{ds}_ref.hdf5")
    p.add_argument("--out", default=None, help="output folder (default eval/<input stem>-ds<N>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (at the end of the run)")
    p.add_argument("--seed", type=int, default=0, help="seeds the classifier split, init and shuffling, and FPD/KPD")
    p.add_argument("--cls-epochs", type=int, default=50, help="classifier epochs (official: 50)")
    p.add_argument("--cls-width", type=int, default=2048, help="DNN hidden width (official: 2048)")
    p.add_argument("--cls-batch-size", type=int, default=1000, help="classifier batch size (official: 1000)")
    p.add_argument("--cls-lr", type=float, default=2e-4, help="classifier Adam learning rate (official: 2e-4)")
    p.add_argument("--cls-repeats", type=int, default=1, help="mean AUC of K classifier seeds (seed, seed+1, ...)")
    p.add_argument("--max-showers", type=int, default=None, help="use only the first N showers of each sample")
    p.add_argument("--device", default=None, help="classifier, FPD/KPD and PRDC device (auto: cuda if available)")
    p.add_argument("--ram-gb", type=float, default=12.0, help="above this, classifier/PRDC rows go to disk")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = common.check_args(p.parse_args(argv))
    common.geometry(args.ds)  # ValueError for a wrong --ds
    refs = args.reference or common.data_files(args.ds, args.data_dir, toy=args.toy, split="ref")
    out = Path(args.out or Path("eval") / f"{Path(args.input).stem}-ds{args.ds}")
    print(f"evaluate: {args.input} vs {[str(r) for r in refs]}, ds {args.ds}, modes {args.mode}, out {out}, "
          f"device {common.pick_device(args.device)}")
    s = evaluate(args.input, refs, args.ds, args.mode, out, args.seed, args.cls_epochs, args.cls_width,
                 args.cls_batch_size, args.cls_lr, args.max_showers, args.device, not args.no_plots,
                 not args.no_progress, args.ram_gb, cls_repeats=args.cls_repeats, overwrite=args.overwrite)
    for k, v in s.get("separation_power_mean", {}).items():
        print(f"separation power {k:10s} {'mean over layers ' if k in LAYER_KEYS else ''}{v}")
    if "fpd_kpd" in s:
        f = s["fpd_kpd"]
        print(f"FPD x1e3 {f['fpd']:.3f} +- {f['fpd_err']:.3f}   KPD x1e3 {f['kpd']:.4f} +- {f['kpd_err']:.4f}")
    for key in ("prdc", "timing"):
        if key in s:
            print(f"{key}: {s[key]}")
    print("times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["times_s"].items()) + f"\nwrote {out / 'summary.json'}")


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, OSError, ValueError) as err:
        sys.exit(f"error: {err}")
