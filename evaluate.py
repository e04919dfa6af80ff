"""CaloChallenge evaluation of generated showers, datasets 2 and 3 (paper Sec. 4; SPEC 3).

    python evaluate.py -i gen.hdf5 -r data/dataset_2_2.hdf5 --ds 2                  # everything, official settings
    python evaluate.py -i gen.hdf5 -r data/dataset_3_3.hdf5 data/dataset_3_4.hdf5 --ds 3 -m hist fpd
    python evaluate.py -i data/toy_ds2_train.hdf5 --toy -m all --cls-epochs 5 --cls-width 256   # CPU quick run

Modes (-m, several allowed; default all):
  hist      high-level features (E_tot/E_inc; per layer E_layer, EC_x, EC_y, width_x, width_y, EC_r,
            width_r, sparsity; voxel energies), separation powers, one PNG per feature family
  cls-low   official DNN classifier on [log10 E_inc, voxels / E_inc]: calibrated AUC and JSD
  cls-high  the same DNN on the 362 high-level features
  weights   classifier weights w = p/(1-p) of reference and generated showers (paper Eq. 21, Fig. 10);
            written for every classifier that runs (weights alone runs cls-low)
  fpd       FPD and KPD (x1e3, with errors) on the 362 high-level features
  timing    sampling time found in the generated file's attributes or a sidecar GEN.json
Everything lands in --out (default eval/<input stem>-ds<N>/): summary.json (every number),
separation_powers.txt, *.png, cls_<kind>_weights.npz.

Both samples get the 15.15 keV cut; features are computed in float64 from float64 chunks of the files
(like the official evaluator); classifier inputs are stored in float32 and streamed batch by batch (a
disk-backed array when they exceed --ram-gb, e.g. DS3 low-level). Label reference = 1. What to expect:
Geant4 vs Geant4 gives AUCs of 0.50, FPD x1e3 ~ 10 (DS2), KPD x1e3 ~ 0; CaloDREAM DS2 0.53 / 0.52
(SPEC 4). The official classifier (2048 wide, 50 epochs) takes minutes per classifier on one GPU and
hours on a CPU: use --cls-epochs/--cls-width/--max-showers for quick runs.
"""
import argparse
import json
import math
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

MODES = ("hist", "cls-low", "cls-high", "weights", "fpd", "timing")
LAYER_KEYS = ("e_layer", "ec_x", "ec_y", "width_x", "width_y", "ec_r", "width_r", "sparsity")
LINEAR_BINS = {"etot_einc": (0.5, 1.5, 101), "ec_x": (-30, 30, 101), "ec_y": (-30, 30, 101),  # SPEC 3
               "width_x": (0, 30, 101), "width_y": (0, 30, 101), "ec_r": (0, 42, 101),
               "width_r": (0, 20, 101), "sparsity": (0, 1, 21)}
LOG_BINS = {"e_layer": 40, "voxel": 50}  # logspace(log10 threshold, log10 max of the reference, n)
LABELS = {"etot_einc": "E_tot / E_inc", "e_layer": "E_layer [MeV]", "ec_x": "EC_x [mm]", "ec_y": "EC_y [mm]",
          "width_x": "width_x [mm]", "width_y": "width_y [mm]", "ec_r": "EC_r [mm]", "width_r": "width_r [mm]",
          "sparsity": "sparsity", "voxel": "voxel energy [MeV]"}


# ----------------------------------------------------------------------------- high-level features
def high_level_features(e_inc, showers, ds, threshold=MIN_ENERGY):
    """SPEC 3 features of showers (N, n_vox) MeV, in float64 and with the official arithmetic.

    Voxels below `threshold` are set to 0 first (None: already cut). Returns a dict of e_inc, e_tot (N,)
    and e_layer, ec_x, ec_y, width_x, width_y, ec_r, width_r, sparsity (N, 45)."""
    x = np.asarray(showers, dtype=np.float64) if threshold is None else np.array(showers, dtype=np.float64)
    if threshold is not None:  # (on a copy)
        x[x < threshold] = 0.0
    pos_x, pos_y, pos_r = common.geometry(ds).voxel_xyr()
    e = x.reshape(len(x), N_LAYERS, -1)
    e_layer = e.sum(-1)
    out = {"e_inc": np.asarray(e_inc, np.float64).reshape(-1), "e_tot": x.sum(-1), "e_layer": e_layer}
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


def scan(paths, ds, max_showers=None, features=True, low=None, vox_edges=None, progress=True):
    """One pass over CaloChallenge files in float64 chunks (common.iter_showers; negative voxels allowed, the
    cut removes them): the 15.15 keV cut, then (optionally) the high-level features, the low-level classifier
    rows [log10 E_inc, voxels / E_inc] written into the float32 array `low` (its first len(low) showers), and
    voxel-energy counts on `vox_edges`."""
    chunk = max(1, 2 ** 28 // (8 * common.geometry(ds).n_vox))  # ~256 MB of float64 per chunk
    parts, vmax, done = [], 0.0, 0
    counts = None if vox_edges is None else np.zeros(len(vox_edges) - 1, np.int64)
    for e, x in common.iter_showers(paths, ds, max_showers, chunk, progress, nonnegative=False):
        x[x < MIN_ENERGY] = 0.0
        vmax = max(vmax, float(x.max()))
        if features:
            parts.append(high_level_features(e, x, ds, threshold=None))
        if low is not None and done < len(low):
            k = min(len(e), len(low) - done)
            low[done:done + k, 0] = np.log10(e[:k])
            low[done:done + k, 1:] = x[:k] / e[:k, None]
        if counts is not None:
            counts += np.histogram(x, vox_edges)[0]
        done += len(e)
    feats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
    return {"n": done, "features": feats, "vmax": vmax, "vox_counts": counts}


# ----------------------------------------------------------------------------- separation power
def separation_power(p_hist, q_hist):
    """S = 1/2 sum (p - q)^2 / (p + q + 1e-16) of two histograms on common edges, each normalised to
    unit sum (counts or densities x widths); 0 = identical, 1 = disjoint, nan if one is empty."""
    p, q = np.asarray(p_hist, np.float64), np.asarray(q_hist, np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    return float(0.5 * ((p - q) ** 2 / (p + q + 1e-16)).sum())


def hist_edges(key, ref_max=None):
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
            out[key].append((edges, n_ref, n_gen, separation_power(n_ref, n_gen)))
    return out


# ----------------------------------------------------------------------------- classifier (SPEC 3)
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


def split_sizes(n):
    """Showers per class for train and test: 60k/20k for full-size files, else 0.6/0.2; the rest validates."""
    return (60_000, 20_000) if n >= 100_000 else (int(n * 0.6), int(n * 0.2))


def classify(x_gen, x_ref, seed=0, epochs=50, width=2048, batch_size=1000, lr=2e-4, device=None,
             hidden=3, progress=True, name="classifier"):
    """Two-sample DNN test of SPEC 3 on any (N, d) feature arrays (numpy or memmap, read per batch as
    float32). Label reference = 1. Trains with BCE, Adam, keeps the epoch of best test accuracy,
    calibrates with isotonic regression on test, reports AUC and JSD = (ln 2 - BCE)/ln 2 on validation,
    and the weights w = p/(1-p) of the validation showers of both classes."""
    t0, device = time.time(), common.pick_device(device)
    arrays = [x.detach().cpu().numpy() if torch.is_tensor(x) else x for x in (x_gen, x_ref)]
    n, d = min(len(arrays[0]), len(arrays[1])), arrays[0].shape[1]
    n_train, n_test = split_sizes(n)
    if min(n_train, n_test, n - n_train - n_test) < 1:
        raise ValueError(f"{n} showers per class are too few for a train/test/validation split")
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
        torch.manual_seed(seed)
        model = DNN(d, width, hidden).to(device)  # initialised on the CPU: the same weights on any device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_epoch, best_state, history = -1.0, 0, None, []
    bar = tqdm(range(epochs), desc=name, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        order, losses = rng.permutation(len(train)), []
        for i in range(0, len(train), batch_size):
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


def evaluate(gen_path, ref_path, ds, modes=("all",), out_dir="eval", seed=0, cls_epochs=50, cls_width=2048,
             cls_batch_size=1000, cls_lr=2e-4, max_showers=None, device=None, plots=True, progress=True,
             ram_gb=12.0, fpd_kw=None):
    """Run the chosen modes on a generated file against reference file(s); write out_dir/summary.json
    (and separation_powers.txt, plots, weights) and return the summary dict."""
    geo = common.geometry(ds)
    modes = set(MODES) if "all" in modes else set(modes)
    if modes - set(MODES):
        raise ValueError(f"unknown mode(s) {sorted(modes - set(MODES))}; choose from {MODES + ('all',)}")
    if "weights" in modes and not modes & {"cls-low", "cls-high"}:
        modes.add("cls-low")
    refs = [ref_path] if isinstance(ref_path, (str, Path)) else list(ref_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_gen, n_ref = common.count_showers([gen_path], ds, max_showers), common.count_showers(refs, ds, max_showers)
    summary = {"config": {"gen": str(gen_path), "ref": [str(r) for r in refs], "ds": ds, "modes": sorted(modes),
                          "n_gen": n_gen, "n_ref": n_ref, "seed": seed, "cls_epochs": cls_epochs,
                          "cls_width": cls_width, "cls_batch_size": cls_batch_size, "cls_lr": cls_lr,
                          "device": str(common.pick_device(device))}, "times_s": {}}
    times = summary["times_s"]
    need_feats = bool(modes & {"hist", "cls-high", "fpd"})
    low = [None, None]
    if "cls-low" in modes:  # float32 rows, in RAM or disk-backed when too large (DS3: 16 GB per 100k)
        shape = (min(n_gen, n_ref), geo.n_vox + 1)
        disk = 2 * 4 * shape[0] * shape[1] > ram_gb * 2 ** 30
        low = [np.lib.format.open_memmap(out / f".cls_low_{k}.npy", "w+", np.float32, shape) if disk
               else np.empty(shape, np.float32) for k in ("gen", "ref")]
        print(f"low-level classifier input: 2 x {shape} float32 {'on disk in ' + str(out) if disk else 'in RAM'}")
    try:
        t = time.time()
        ref = scan(refs, ds, max_showers, need_feats, low[1], progress=progress)
        vox_edges = hist_edges("voxel", ref["vmax"]) if "hist" in modes else None
        gen = scan([gen_path], ds, max_showers, need_feats, low[0], vox_edges, progress)
        times["read"] = time.time() - t
        if "hist" in modes:
            t = time.time()
            hists = histograms(gen["features"], ref["features"])
            if vox_edges is not None:  # second pass: the voxel edges need the reference maximum first
                n_ref_vox = scan(refs, ds, max_showers, False, vox_edges=vox_edges, progress=progress)["vox_counts"]
                hists["voxel"] = [(vox_edges, n_ref_vox, gen["vox_counts"], separation_power(n_ref_vox, gen["vox_counts"]))]
            sep = {k: [h[3] for h in v] if k in LAYER_KEYS else v[0][3] for k, v in hists.items()}
            summary["separation_power"] = sep
            summary["separation_power_mean"] = {k: float(np.nanmean(v)) if np.isfinite(v).any() else None
                                                for k, v in sep.items()}
            with open(out / "separation_powers.txt", "w") as f:
                f.write("# separation power S = 1/2 sum (p-q)^2/(p+q), SPEC 3; per-layer features: one line per layer\n")
                for k, v in sep.items():
                    f.writelines(f"{k} {l} {s:.9e}\n" for l, s in enumerate(v)) if k in LAYER_KEYS else f.write(f"{k} {v:.9e}\n")
            times["hist"] = time.time() - t
            if plots:
                t = time.time()
                plot_histograms(out, hists)
                times["hist_plots"] = time.time() - t
        inputs = {"cls-low": lambda: (low[0], low[1]),
                  "cls-high": lambda: tuple(feature_matrix(s["features"]).astype(np.float32) for s in (gen, ref))}
        weight_panels = []
        for kind in ("cls-low", "cls-high"):
            if kind not in modes:
                continue
            t = time.time()
            r = classify(*inputs[kind](), seed=seed, epochs=cls_epochs, width=cls_width, batch_size=cls_batch_size,
                         lr=cls_lr, device=device, progress=progress, name=kind)
            w_gen, w_ref = r.pop("weights_gen"), r.pop("weights_ref")
            np.savez(out / f"{kind.replace('-', '_')}_weights.npz", weights_gen=w_gen, weights_ref=w_ref)
            edges = np.linspace(np.log10(min(w_gen.min(), w_ref.min())) - 1e-9, np.log10(max(w_gen.max(), w_ref.max())) + 1e-9, 51)
            weight_panels.append((f"{kind}: log10 w, AUC {r['auc']:.4f}", edges,
                                  np.histogram(np.log10(w_ref), edges)[0], np.histogram(np.log10(w_gen), edges)[0]))
            summary[kind.replace("-", "_")] = r
            times[kind.replace("-", "_")] = time.time() - t
            print(f"{kind}: AUC {r['auc']:.4f}  JSD {r['jsd']:.4f}  (best epoch {r['best_epoch']}, {r['seconds']:.0f} s)")
        if weight_panels and plots:
            plot_family(out / "classifier_weights.png", "classifier weights w = p/(1-p) (validation showers)", weight_panels)
        if "fpd" in modes:
            t = time.time()
            summary["fpd_kpd"] = fpd_kpd(feature_matrix(gen["features"]), feature_matrix(ref["features"]), seed=seed,
                                         device=device, **(fpd_kw or {}))
            times["fpd_kpd"] = time.time() - t
        if "timing" in modes:
            summary["timing"] = timing_info(gen_path)
    finally:
        for a in low:  # unlinking a mapped file is fine on POSIX: the pages go with the last reference
            if isinstance(a, np.memmap):
                Path(a.filename).unlink(missing_ok=True)
    (out / "summary.json").write_text(json.dumps(_clean(summary), indent=1))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description="CaloChallenge evaluation of generated showers (SPEC 3).")
    p.add_argument("-i", "--input", required=True, help="generated CaloChallenge HDF5 file")
    p.add_argument("-r", "--reference", nargs="+", default=None,
                   help="reference file(s); default the held-out files of --ds in --data-dir (or the toy ref)")
    p.add_argument("--ds", type=int, default=2, help="dataset 2 or 3")
    p.add_argument("-m", "--mode", nargs="+", default=["all"], choices=MODES + ("all",), help="what to evaluate")
    p.add_argument("--data-dir", default="data", help="where the default reference files are")
    p.add_argument("--toy", action="store_true", help="default reference: data/toy_ds{ds}_ref.hdf5")
    p.add_argument("--out", default=None, help="output folder (default eval/<input stem>-ds<N>)")
    p.add_argument("--seed", type=int, default=0, help="seeds the classifier split, init and shuffling, and FPD/KPD")
    p.add_argument("--cls-epochs", type=int, default=50, help="classifier epochs (official: 50)")
    p.add_argument("--cls-width", type=int, default=2048, help="classifier hidden width (official: 2048)")
    p.add_argument("--cls-batch-size", type=int, default=1000, help="classifier batch size (official: 1000)")
    p.add_argument("--cls-lr", type=float, default=2e-4, help="classifier Adam learning rate (official: 2e-4)")
    p.add_argument("--max-showers", type=int, default=None, help="use only the first N showers of each sample")
    p.add_argument("--device", default=None, help="classifier device (auto: cuda if available)")
    p.add_argument("--ram-gb", type=float, default=12.0, help="above this, low-level inputs go to a disk-backed array")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    common.geometry(args.ds)  # ValueError for a wrong --ds
    refs = args.reference or common.data_files(args.ds, args.data_dir, toy=args.toy, split="ref")
    out = args.out or Path("eval") / f"{Path(args.input).stem}-ds{args.ds}"
    print(f"evaluate: {args.input} vs {[str(r) for r in refs]}, ds {args.ds}, modes {args.mode}, out {out}, "
          f"device {common.pick_device(args.device)}")
    s = evaluate(args.input, refs, args.ds, args.mode, out, args.seed, args.cls_epochs, args.cls_width,
                 args.cls_batch_size, args.cls_lr, args.max_showers, args.device, not args.no_plots,
                 not args.no_progress, args.ram_gb)
    for k, v in s.get("separation_power_mean", {}).items():
        print(f"separation power {k:10s} {'mean over layers ' if k in LAYER_KEYS else ''}{v}")
    if "fpd_kpd" in s:
        f = s["fpd_kpd"]
        print(f"FPD x1e3 {f['fpd']:.3f} +- {f['fpd_err']:.3f}   KPD x1e3 {f['kpd']:.4f} +- {f['kpd_err']:.4f}")
    if "timing" in s:
        print(f"timing: {s['timing']}")
    print("times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["times_s"].items()) + f"\nwrote {Path(out) / 'summary.json'}")


if __name__ == "__main__":
    try:
        main()
    except (common.DataError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
