"""Shared contract of the CaloDREAM scripts (arXiv:2405.09629): everything two stages must agree on.

Sections: geometry (SPEC 1) | files: the CaloChallenge format and the hand-over formats between stages |
preprocessing and its exact inverse (paper Sec. 2, SPEC 2.1) | the networks every stage must rebuild from a
checkpoint: the energy transformer (Sec. 3.1, SPEC 2.2) and the 3-D ViT (Sec. 3.2, SPEC 2.3) | ODE solvers,
including the application of a trained bespoke solver (SPEC 2.5-2.6) | run plumbing (seeds, devices, run folders,
checkpoints, the optimizer step every training script shares, torchrun). No training loop lives here.

Files the stages hand over (every one written under a hidden temporary name and renamed when complete):
  CaloChallenge file   incident_energies (N, 1), showers (N, n_vox): MeV, float64, gzip (the official format)
  condition file       incident_energies (N, 1) MeV, u (N, 45) physical u's; attrs format, ds, checkpoint,
                       solver, steps, seed (energy.py --sample -> shape_vit.py / latent_vit.py / bespoke.py)
  latent file          incident_energies, u, and either mu + logvar (vae.py --encode: laViT training data) or z
                       (latent_vit.py --sample: vae.py --decode input), (N, C, L, A, R) float32; attrs format, ds,
                       vae_ckpt, vae_step
  checkpoint ckpt.pt   dict(script, ds, config, model_args, model, optimizer, scheduler, epoch, step, stats,
                       history, nonfinite, ...): model_args rebuild the network, stats hold its preprocessing
"""
import argparse
import contextlib
import glob
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

try:
    import fcntl  # run-folder locks (POSIX)
except ImportError:
    fcntl = None

# ----------------------------------------------------------------------------- geometry (SPEC 1)
N_LAYERS = 45
MIN_ENERGY = 0.5e-3 / 0.033  # MeV: the 15.15 keV readout threshold; every voxel below it is 0
E_MIN, E_MAX = 1e3, 1e6  # MeV: E_inc is log-uniform in [1 GeV, 1 TeV]
U0_SCALE = 0.35  # f in u_0 = f * E_tot / E_inc (keeps u_0 inside [0, 1])
LOGIT_ALPHA = 1e-6  # the rescaled logit log(y / (1 - y)), y = (1 - 2 alpha) x + alpha (SPEC 2.1)
FRACTION_CUT = 1e-7  # voxel fractions at or below this are 0, forward and inverse (the submission's cut)
ZENODO = {2: (6366271, ["dataset_2_1.hdf5"], ["dataset_2_2.hdf5"]),
          3: (6366324, ["dataset_3_1.hdf5", "dataset_3_2.hdf5"], ["dataset_3_3.hdf5", "dataset_3_4.hdf5"])}


@dataclass(frozen=True)
class Geometry:
    """Cylindrical readout of one dataset: 45 layers x n_alpha angular x n_r radial bins."""
    ds: int
    n_alpha: int
    n_r: int
    r_edges: tuple  # mm, the decimal values of the CaloChallenge binning files

    shape = property(lambda self: (N_LAYERS, self.n_alpha, self.n_r))  # (layers, alpha, r)
    n_vox = property(lambda self: N_LAYERS * self.n_alpha * self.n_r)
    alpha_edges = property(lambda self: np.linspace(-np.pi, np.pi, self.n_alpha + 1))
    r_centres = property(lambda self: _centres(self.r_edges))
    alpha_centres = property(lambda self: _centres(self.alpha_edges))

    def voxel_xyr(self):
        """x, y, r (mm, float64) of the n_alpha*n_r voxels of one layer, flat index alpha*n_r + r."""
        alpha, r = (a.reshape(-1) for a in np.meshgrid(self.alpha_centres, self.r_centres, indexing="ij"))
        return r * np.cos(alpha), r * np.sin(alpha), r


def _centres(edges):  # SPEC 1: exactly lo + (hi - lo) / 2 in float64
    lo, hi = np.asarray(edges[:-1], dtype=np.float64), np.asarray(edges[1:], dtype=np.float64)
    return lo + (hi - lo) / 2


def _edges(step, n):  # decimal literals k*step, parsed like the binning files' text
    return tuple(float(f"{k * step:.3f}") for k in range(n + 1))


GEOMETRIES = {2: Geometry(2, 16, 9, _edges(4.65, 9)), 3: Geometry(3, 50, 18, _edges(2.325, 18))}


def geometry(ds):
    if ds not in GEOMETRIES:
        raise ValueError(f"--ds must be 2 or 3, got {ds!r}")
    return GEOMETRIES[ds]


# ----------------------------------------------------------------------------- files
class DataError(Exception):
    """Bad input data; the message is one sentence naming the file and the problem."""


class OutputError(DataError):
    """An output that cannot be written (a full disk, a folder that takes no file, a second writer); nothing of it
    is left behind."""


MIN_SHOWERS = 10  # a training run needs at least this many showers (a std of fewer is noise)
F32_MAX = float(np.finfo(np.float32).max)
_WARNED = set()


def warn(msg):
    """One `warning: ...` line on stderr, once per message in a process."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        tqdm.write(f"warning: {msg}", file=sys.stderr)


def check_data(where, columns, nonnegative=True, error=DataError, path=None):
    """The one data check of every reader, writer and statistics fit. columns {name: array}: every value finite also
    after the cast to float32; incident_energies > 0; u's in [0, 1]; with nonnegative (the networks' input): voxels
    >= 0 and E_tot <= E_inc / U0_SCALE (u_0 <= 1). `where` (file and rows) starts the message. With a path (a
    reader), incident energies outside [1 GeV, 1 TeV], the datasets' range, give one warning naming it."""
    arrays = {k: _numpy(v) if torch.is_tensor(v) else np.asarray(v) for k, v in columns.items()}
    for name, a in arrays.items():
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)  # NaN propagates; no temporary copy of a chunk
        if not (-F32_MAX <= lo and hi <= F32_MAX):
            raise error(f"{where}: NaN/inf {name} (or values beyond float32)")
    e, x, u = (arrays.get(k) for k in ("incident_energies", "showers", "u"))
    if e is not None and e.size and e.min() <= 0:
        raise error(f"{where}: incident energies <= 0")
    if u is not None and u.size and (u.min() < 0 or u.max() > 1):
        raise error(f"{where}: u's outside [0, 1]")
    if nonnegative and x is not None and x.size and x.min() < 0:
        raise error(f"{where}: negative voxel energies")
    if nonnegative and x is not None and e is not None and len(e):
        ratio = x.reshape(len(e), -1).sum(1) / e.reshape(-1)
        if ratio.max() > 1 / U0_SCALE:
            raise error(f"{where}: a shower deposits {ratio.max():.3g} x E_inc, more than the {1 / U0_SCALE:.3g} "
                        f"that u_0 = {U0_SCALE} E_tot / E_inc <= 1 allows (are the energies in MeV?)")
    if path is not None and e is not None and ((e < E_MIN * (1 - 1e-6)) | (e > E_MAX * (1 + 1e-6))).any():
        warn(f"{path} holds incident energies outside [1 GeV, 1 TeV], the datasets' range: the networks never saw "
             f"such showers (the files hold MeV)")


def data_files(ds, data_dir="data", toy=False, split="train"):
    """Default files of a dataset: split 'train' (training) or 'ref' (held-out reference)."""
    if toy:
        return [Path(data_dir) / f"toy_ds{ds}_{split}.hdf5"]
    _, train, ref = ZENODO[ds]
    return [Path(data_dir) / name for name in (train if split == "train" else ref)]


def _missing_message(path):
    name = Path(path).name
    for ds, (record, train, ref) in ZENODO.items():
        if name in train + ref:
            return (f"{path} not found: download it with `python data/prepare.py download --ds {ds}` (or from "
                    f"https://zenodo.org/records/{record}/files/{name}?download=1), or try the synthetic "
                    f"showers with `python data/prepare.py toy --ds {ds}` and --toy")
    if name.startswith("toy_ds"):
        return f"{path} not found: create the synthetic showers with `python data/prepare.py toy --ds {name[6]}`"
    return f"{path} not found"


def open_showers(path, ds):
    """Open one CaloChallenge file for reading and check its layout; returns (h5 file, n showers)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(_missing_message(path))
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file ({err})") from None
    problem = None
    if any(not isinstance(f.get(k), h5py.Dataset) for k in ("incident_energies", "showers")):
        problem = f"{path} is not a CaloChallenge file (it needs the datasets 'incident_energies' and 'showers')"
    else:
        n, n_vox = f["showers"].shape[0], int(np.prod(f["showers"].shape[1:]))
        if n_vox != geometry(ds).n_vox:
            other = [d for d, g in GEOMETRIES.items() if g.n_vox == n_vox]
            hint = f" (that is dataset {other[0]}: use --ds {other[0]})" if other else ""
            problem = f"{path} has {n_vox} voxels per shower but --ds {ds} needs {geometry(ds).n_vox}{hint}"
        elif f["incident_energies"].shape not in ((n, 1), (n,)):
            problem = f"{path} has incident energies of shape {f['incident_energies'].shape} for {n} showers"
    if problem:
        f.close()
        raise DataError(problem)
    return f, n


def count_showers(paths, ds, max_showers=None):
    """Showers in CaloChallenge files (checked by open_showers), at most max_showers."""
    n = 0
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        f, k = open_showers(path, ds)
        f.close()
        n += k
    return n if max_showers is None else min(n, max_showers)


def iter_showers(paths, ds, max_showers=None, chunk=None, progress=True, nonnegative=True):
    """The one reader of CaloChallenge files: yields (e_inc (k,), showers (k, n_vox)) float64 chunks of the
    first max_showers showers, checked by check_data (finite also as float32, E_inc > 0; unless nonnegative=False,
    voxels >= 0 and u_0 <= 1; E_inc outside [1 GeV, 1 TeV] warns). A chunk is at most 64 MB of float64, so
    nothing but the caller's arrays grows with the file."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    total, handles, done = count_showers(paths, ds, max_showers), [], 0
    chunk = chunk or max(1, min(5000, 2 ** 26 // (8 * geometry(ds).n_vox)))  # DS2: 1294 rows, DS3: 207
    bar = tqdm(total=total, desc=f"reading {Path(paths[0]).name}", unit="shower", disable=not progress, leave=False)
    try:
        handles += [open_showers(p, ds) for p in paths]
        for path, (f, n) in zip(paths, handles):
            for start in range(0, min(n, total - done), chunk):
                stop = min(start + chunk, n, start + total - done)
                try:
                    e = f["incident_energies"][start:stop].reshape(-1).astype(np.float64)
                    x = f["showers"][start:stop].reshape(stop - start, -1).astype(np.float64)
                except OSError as err:  # a damaged chunk inside a valid file
                    raise DataError(f"{path}: showers {start}-{stop} cannot be read ({err})") from None
                check_data(f"{path} (showers {start}-{stop})", {"incident_energies": e, "showers": x}, nonnegative,
                           path=path)
                yield e, x
                done += stop - start
                bar.update(stop - start)
    finally:
        bar.close()
        for f, _ in handles:
            f.close()


def load_showers(paths, ds, max_showers=None, chunk=None, progress=True):
    """Read CaloChallenge files as float32 (never a float64 copy of the whole file: the peak RSS is the float32
    array plus a fixed ~0.2 GB). Returns e_inc (N,) and showers (N, n_vox), float32 MeV; files concatenated."""
    total = count_showers(paths, ds, max_showers)
    e_inc, showers, done = np.empty(total, np.float32), np.empty((total, geometry(ds).n_vox), np.float32), 0
    for e, x in iter_showers(paths, ds, max_showers, chunk, progress):
        e_inc[done:done + len(e)], showers[done:done + len(e)] = e, x
        done += len(e)
    return e_inc, showers


def load_u(paths, ds, max_showers=None, chunk=1000, progress=True):
    """E_inc (N,) and the 45 u's (N, 45), float64, read chunk by chunk: the voxels are never kept (the energy
    network's training data, and the true u's of a reference file)."""
    e_all, u_all = [], []
    for e, x in iter_showers(paths, ds, max_showers, chunk, progress):
        e_all.append(torch.from_numpy(e))
        u_all.append(energies_to_u(e_all[-1], layer_energies(torch.from_numpy(x), ds)))
    if not e_all:
        raise DataError(f"no showers in {', '.join(map(str, [paths] if isinstance(paths, (str, Path)) else paths))}")
    return torch.cat(e_all), torch.cat(u_all)


def pid_alive(pid):
    """Whether a process with this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def claim_output(path, overwrite=False):
    """The checks before any work on an output file: an existing one is refused (unless overwrite), and so is a
    second live writer; the temporary files of dead writers (kill -9) are removed; the folder is created and must
    take a file. Returns this process's temporary name .<name>.<pid>.tmp (not created)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    prefix = f".{path.name}."
    for old in path.parent.glob(f"{glob.escape(prefix)}*.tmp") if path.parent.is_dir() else ():
        pid = old.name[len(prefix):-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            raise OutputError(f"another process (pid {pid}) is writing {path} now (its temporary file {old.name}: "
                              f"remove it if no such process runs)")
        if pid.isdigit():
            old.unlink(missing_ok=True)  # left by a killed writer
    tmp = path.with_name(f"{prefix}{os.getpid()}.tmp")
    check_folder(path.parent, tmp, path)
    return tmp


def check_folder(folder, probe=None, what=None):
    """Create folder (and its parents) and check that it takes a file (`probe`, default .probe.<pid>.tmp, made
    and removed): an OutputError before any work, not after it."""
    folder = Path(folder)
    what, probe = what or folder, probe or folder / f".probe.{os.getpid()}.tmp"
    blocker = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(f"cannot write {what}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write {what}: {err.strerror or err}") from None


def _publish(tmp, path, overwrite):
    """Give a finished temporary file its name; without overwrite, never replace a file that appeared meanwhile."""
    if not overwrite:
        try:
            os.link(tmp, path)  # atomic, and fails if path exists
            os.unlink(tmp)
            return
        except FileExistsError:
            raise OutputError(f"{path} was written by another process meanwhile; this output was discarded") from None
        except OSError:  # a file system without hard links
            if path.exists():
                raise OutputError(f"{path} was written by another process meanwhile; this output was discarded") \
                    from None
    os.replace(tmp, path)


class _SinkFile:
    """The unbuffered file under an H5Writer or a checkpoint. A failed write (a full disk) is kept in .error and every
    later write is dropped, but the writer is told it succeeded: HDF5 then stays consistent and closes the file
    (a write error inside HDF5 leaves it in a state that crashes the interpreter), and the caller reports .error."""

    def __init__(self, path):
        self.file, self.error = open(path, "xb+", buffering=0), None

    def write(self, data):
        view, done = memoryview(data).cast("B"), 0
        while self.error is None and done < len(view):
            try:
                done += self.file.write(view[done:])
            except OSError as err:
                self.error = err
        return len(view)

    def truncate(self, size=None):
        if self.error is None:
            try:
                return self.file.truncate(size)
            except OSError as err:
                self.error = err
        return size

    def __getattr__(self, name):  # read, readinto, seek, tell, flush
        return getattr(self.file, name)


class H5Writer:
    """Stream rows into an HDF5 file under a hidden temporary name; it gets its final name only when all n rows
    are written, so an error or a kill never leaves a half-written file under that name.

        with H5Writer("cond.hdf5", n, {"incident_energies": (1,), "u": (45,)}, attrs={"ds": 2}) as w:
            w.write(e_inc_batch, u_batch)        # columns in order, any batch size, checked by check_data

    Columns are gzip-compressed, float64 unless dtypes names another type. The output is claimed when the writer
    is made (claim_output: before the work), a failed write (a full disk) is one OutputError and leaves nothing,
    and without overwrite a file that appeared meanwhile is never replaced."""

    def __init__(self, path, n, columns, attrs=None, overwrite=False, dtypes=None):
        self.path, self.n, self.columns, self.attrs = Path(path), int(n), dict(columns), dict(attrs or {})
        self.dtypes = {k: (dtypes or {}).get(k, "float64") for k in self.columns}
        self.overwrite, self.tmp, self.done = overwrite, claim_output(self.path, overwrite), 0

    def __enter__(self):
        self.sink = _SinkFile(self.tmp)
        try:
            self.f = h5py.File(self.sink, "w")
            self.sets = [self.f.create_dataset(name, (self.n, *tail), dtype=self.dtypes[name], compression="gzip",
                                               chunks=(max(1, min(self.n, 2 ** 17 // max(1, math.prod(tail)))), *tail))
                         for name, tail in self.columns.items()]  # ~1 MB chunks
            self._check()
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, *arrays):
        arrays = [_numpy(a) for a in arrays]
        k = len(arrays[0])
        if self.done + k > self.n:
            raise ValueError(f"writing more than the {self.n} rows announced for {self.path}")
        for (name, tail), a in zip(self.columns.items(), arrays):
            if a.size != k * math.prod(tail):
                raise ValueError(f"{name} has shape {a.shape[1:]} per row, {self.path} expects {tail}")
        check_data(f"refusing to write {self.path}", dict(zip(self.columns, arrays)), False, ValueError)
        try:
            for (name, tail), a, dset in zip(self.columns.items(), arrays, self.sets):
                dset[self.done:self.done + k] = a.reshape(k, *tail)
        except OSError as err:  # HDF5 reading back a chunk the full disk never took
            self._check(err)
            raise
        self._check()
        self.done += k

    def _check(self, err=None):
        """An OutputError if the disk refused a write."""
        cause = self.sink.error or err
        if cause is not None:
            raise OutputError(f"cannot write {self.path}: {getattr(cause, 'strerror', None) or cause}; nothing of "
                              f"it was left") from None

    def _discard(self):
        with contextlib.suppress(Exception):
            self.f.close()
        self.sink.file.close()
        self.tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb):  # attrs may still be added while the writer is open
        if exc_type is not None:
            self._discard()
            return False
        try:
            if self.done != self.n:
                raise ValueError(f"only {self.done} of {self.n} rows were written; {self.path} not created")
            self.f.attrs.update({k: v for k, v in self.attrs.items() if v is not None})
            try:
                self.f.close()
            except (OSError, RuntimeError) as err:
                self._check(err)
                raise
            self._check()
            self.sink.file.close()
            _publish(self.tmp, self.path, self.overwrite)
        except BaseException:
            self._discard()
            raise
        return False


def ShowerWriter(path, n, ds, overwrite=False, attrs=None):
    """A CaloChallenge file: incident_energies (N, 1) and showers (N, n_vox) in MeV, float64 and gzip like the
    official files (the official evaluator's low-level classifier needs float64)."""
    return H5Writer(path, n, {"incident_energies": (1,), "showers": (geometry(ds).n_vox,)}, attrs, overwrite)


def write_showers(path, e_inc, showers, ds, overwrite=False):
    """Write a whole sample at once (small files); see ShowerWriter for streaming."""
    with ShowerWriter(path, len(e_inc), ds, overwrite=overwrite) as w:
        for s in range(0, len(e_inc), 10000):
            w.write(e_inc[s:s + 10000], showers[s:s + 10000])


def _numpy(x):
    return x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)


def write_conditions(path, e_inc, u, ds, overwrite=False, **attrs):
    """The condition file: incident_energies (N, 1) MeV and u (N, 45) physical u's (float64)."""
    with H5Writer(path, len(e_inc), {"incident_energies": (1,), "u": (N_LAYERS,)},
                  dict(format="calodream-conditions", ds=ds, **attrs), overwrite) as w:
        w.write(e_inc, u)


def _attrs(f):
    return {k: getattr(v, "item", lambda v=v: v)() for k, v in f.attrs.items()}


def read_conditions(path, ds, n=None, progress=False, with_u=True):
    """E_inc (N,) and physical u's (N, 45), float64 tensors, of the first n rows of a condition file, or of a
    CaloChallenge file (then the true u's of its showers, read chunk by chunk; with_u=False: E_inc only, u None).
    Returns (e_inc, u, attrs)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(_missing_message(path))
    try:
        with h5py.File(path, "r") as f:
            is_cond, attrs = isinstance(f.get("u"), h5py.Dataset), _attrs(f)
            if is_cond:
                if attrs.get("ds", ds) != ds:
                    raise DataError(f"{path} holds dataset-{attrs['ds']} conditions, but --ds is {ds}")
                if f["u"].shape[1:] != (N_LAYERS,) or f["incident_energies"].shape not in ((len(f["u"]), 1),
                                                                                          (len(f["u"]),)):
                    raise DataError(f"{path}: a condition file holds incident_energies (N, 1) and u (N, 45)")
                take = len(f["u"]) if n is None else n
                if take > len(f["u"]):
                    raise DataError(f"{path} holds {len(f['u'])} conditions, fewer than the {take} asked for")
                e_inc = f["incident_energies"][:take].reshape(-1).astype(np.float64)
                u = f["u"][:take].astype(np.float64)
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file ({err})") from None
    except KeyError as err:
        raise DataError(f"{path} lacks {err}") from None
    if not is_cond:  # a CaloChallenge file: its true u's
        if n is not None and n > count_showers(path, ds):
            raise DataError(f"{path} holds {count_showers(path, ds)} showers, fewer than the {n} asked for")
        if with_u:
            e, uu = load_u(path, ds, n, progress=progress)
            return e, uu, {"source": f"true u's of {path}"}
        f, total = open_showers(path, ds)
        try:
            e_inc = f["incident_energies"][:total if n is None else n].reshape(-1).astype(np.float64)
        except OSError as err:
            raise DataError(f"{path}: its incident energies cannot be read ({err})") from None
        finally:
            f.close()
        check_data(str(path), {"incident_energies": e_inc}, path=path)
        return torch.from_numpy(e_inc), None, {"source": str(path)}
    check_data(str(path), {"incident_energies": e_inc, "u": u}, path=path)
    return torch.from_numpy(e_inc), torch.from_numpy(u), {"source": str(path), **attrs}


def read_latents(path, ds, n=None):
    """Every column of the first n rows of a latent file: incident_energies (N,) and u (N, 45) float64, the
    latents (mu and logvar, or z) float32 numpy arrays; and the file's attributes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: write latents with `python vae.py --encode` (training data) or "
                        f"`python latent_vit.py --sample`")
    try:
        with h5py.File(path, "r") as f:
            attrs = _attrs(f)
            if attrs.get("format") != "calodream-latents" or attrs.get("ds") != ds:
                raise DataError(f"{path} is not a dataset-{ds} latent file (format {attrs.get('format')!r}, "
                                f"ds {attrs.get('ds')!r})")
            sets = {k: v for k, v in f.items() if isinstance(v, h5py.Dataset) and v.ndim}
            if n is not None and "u" in sets and n > len(sets["u"]):
                raise DataError(f"{path} holds {len(sets['u'])} latents, fewer than the {n} asked for")
            take = slice(None) if n is None else slice(0, n)
            out = {k: v[take].astype(np.float64 if k in ("incident_energies", "u") else np.float32)
                   for k, v in sets.items()}
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file ({err})") from None
    missing = {"incident_energies", "u"} - set(out) or ({"mu", "z"} - set(out) if not {"mu", "z"} & set(out) else set())
    if missing:
        raise DataError(f"{path} lacks {', '.join(sorted(missing))}")
    n_rows, lat = len(out["u"]), out.get("z", out.get("mu"))
    if (out["u"].shape[1:] != (N_LAYERS,) or out["incident_energies"].shape not in ((n_rows, 1), (n_rows,))
            or any(len(v) != n_rows for v in out.values()) or lat.ndim != 5
            or any(out[k].shape != lat.shape for k in ("mu", "logvar", "z") if k in out)):
        raise DataError(f"{path}: a latent file holds incident_energies (N, 1), u (N, 45) and mu + logvar or z "
                        f"(N, C, L, A, R), got {({k: v.shape for k, v in out.items()})}")
    out["incident_energies"] = out["incident_energies"].reshape(-1)
    check_data(str(path), out, path=path)
    return out, attrs


def find_newest(pattern, root="runs", what="run", hint=""):
    """The newest path root/pattern (a glob); says which it took."""
    found = sorted(Path(root).glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise DataError(f"no {what} under {root}/ ({pattern}){hint}")
    print(f"using the newest {what}: {found[-1]}")
    return found[-1]


def split_indices(n, val_fraction=0.01, seed=0, min_val=300):
    """Deterministic train/validation split of n showers: a share val_fraction, but (when it is > 0) at least
    min_val showers or a tenth of them, whichever is fewer (the submission trained on all showers: keep it small)."""
    if n < MIN_SHOWERS:
        raise DataError(f"{n} showers are too few to train on: at least {MIN_SHOWERS} are needed")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    n_val = max(n_val, min(min_val, n // 10)) if val_fraction > 0 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def sample_e_inc(n, generator=None):
    """E_inc in MeV from the log-uniform law of the datasets."""
    z = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.exp(math.log(E_MIN) + z * (math.log(E_MAX) - math.log(E_MIN)))


# ----------------------------------------------------------------------------- preprocessing (SPEC 2.1)
def energy_condition(e_inc):
    """c_E = (ln E_inc - ln 1 GeV) / ln 1000, in [0, 1]."""
    return (torch.log(e_inc) - math.log(E_MIN)) / (math.log(E_MAX) - math.log(E_MIN))


def layer_energies(showers, ds):
    """(N, n_vox) -> (N, 45) energy per layer."""
    return showers.reshape(showers.shape[0], N_LAYERS, -1).sum(-1)


def energies_to_u(e_inc, layer_e):
    """Layer energies -> the 45 u's: u_0 = f E_tot / E_inc, u_{l+1} = E_l / sum_{k>=l} E_k."""
    e = layer_e.double()
    remaining = e.flip(-1).cumsum(-1).flip(-1)  # sum_{k>=l} E_k
    u0 = U0_SCALE * remaining[:, :1] / e_inc.double().reshape(-1, 1)
    return torch.cat([u0, e[:, :-1] / (remaining[:, :-1] + 1e-10)], dim=1)


def u_to_energies(e_inc, u):
    """Exact inverse of energies_to_u (float64): u_1..u_44 clipped to [0, 1], E_44 the remainder."""
    u = u.double()
    remaining = e_inc.double().reshape(-1) * u[:, 0].clamp(min=0) / U0_SCALE
    out = []
    for l in range(N_LAYERS - 1):
        e_l = remaining * u[:, l + 1].clamp(0, 1)
        out.append(e_l)
        remaining = (remaining - e_l).clamp(min=0)
    out.append(remaining)
    return torch.stack(out, dim=1)


def logit(x):
    """The rescaled logit of the submission: log(y / (1 - y)) with y = (1 - 2 alpha) x + alpha; exact 0 and 1 map
    to finite values, so no clamping."""
    y = (1 - 2 * LOGIT_ALPHA) * x + LOGIT_ALPHA
    return torch.log(y) - torch.log1p(-y)


def inverse_logit(z):
    """Exact inverse of logit (float64): (sigmoid(z) - alpha) / (1 - 2 alpha), clipped to [0, 1]."""
    return ((torch.sigmoid(z.double()) - LOGIT_ALPHA) / (1 - 2 * LOGIT_ALPHA)).clamp(0, 1)


def fit_standardizer(x, dim=0):
    """Mean and std along dim (float64 accumulation); the std never drops below 1e-6. Checked by check_stats."""
    x = x.double()
    return check_stats({"mean": x.mean(dim).float(), "std": x.std(dim).clamp(min=1e-6).float()}, x.shape[dim])


def check_stats(stats, n):
    """Preprocessing statistics ({mean, std}, or a dict of them) fitted on n rows: n >= 2, every value finite, and
    not every feature of a group constant (identical showers: nothing to learn). Returns stats."""
    if n < 2:
        raise DataError(f"preprocessing statistics need at least 2 showers, got {n}")
    groups = [stats] if "std" in stats else list(stats.values())
    if _nonfinite(groups):
        raise DataError(f"the preprocessing statistics of {n} showers are not finite")
    if any((g["std"] <= 1e-6).all() for g in groups):
        raise DataError(f"the {n} training showers are all alike (every feature is constant): nothing to learn")
    return stats


def standardize(x, stats):
    return (x - stats["mean"].to(x.device)) / stats["std"].to(x.device)


def unstandardize(z, stats):
    return z * stats["std"].to(z.device) + stats["mean"].to(z.device)


def u_to_net(u, stats):
    """Energy network input: the logit of all 45 u's (u_0 included), standardised per feature (float32)."""
    return standardize(logit(u.double()), stats).float()


def net_to_u(z, stats):
    """Exact inverse of u_to_net (float64)."""
    return inverse_logit(unstandardize(z.double(), {k: v.double() for k, v in stats.items()}))


def u_features(u):
    """Shape-model view of the u's: all 45 (u_0 included) through the rescaled logit."""
    return logit(u.double()).float()


def shape_condition(e_inc, u, cond_stats):
    """The 46-number condition of the shape networks: [c_E, standardised u features]."""
    c_e = energy_condition(e_inc.double()).float().reshape(-1, 1)
    return torch.cat([c_e.to(u.device), standardize(u_features(u), cond_stats)], dim=1)


def voxel_fractions(showers, ds):
    """(N, n_vox) MeV -> per-layer fractions (N, 45, n_alpha, n_r) and layer energies (N, 45)."""
    g = geometry(ds)
    x = showers.reshape(-1, N_LAYERS, g.n_alpha * g.n_r).float()
    e = x.sum(-1, keepdim=True)
    return (x / (e + 1e-10)).reshape(-1, *g.shape), e.squeeze(-1)


def fractions_to_logit(frac):
    """The shape networks' voxel input (the submission's, no dequantisation noise): fractions <= 1e-7 set to 0,
    then the rescaled logit."""
    return logit(torch.where(frac <= FRACTION_CUT, 0.0, frac))


def fit_shape_stats(e_inc, showers, ds, idx=None, chunk=None):
    """Preprocessing statistics of the shape networks from the rows idx (the training split; default all).

    vox: per-voxel mean/std of the logit fractions; cond: mean/std of the 45 u features. The rows are read chunk
    by chunk: DS3 (16 GB in float32) needs no second copy of the data."""
    idx = np.arange(len(showers)) if idx is None else np.asarray(idx)
    chunk = chunk or max(1, 2 ** 24 // geometry(ds).n_vox)  # 16M voxels: ~0.5 GB of transients (DS3: 414 rows)
    s1 = s2 = 0.0
    u = []
    for i in range(0, len(idx), chunk):
        x = torch.as_tensor(showers[idx[i:i + chunk]])
        z = fractions_to_logit(voxel_fractions(x, ds)[0]).double()
        s1, s2 = s1 + z.sum(0), s2 + (z * z).sum(0)
        u.append(energies_to_u(torch.as_tensor(e_inc[idx[i:i + chunk]]), layer_energies(x, ds)))
    mean = s1 / len(idx)
    std = (s2 / len(idx) - mean ** 2).clamp(min=0).sqrt().clamp(min=1e-6)
    return check_stats({"vox": {"mean": mean.float(), "std": std.float()},
                        "cond": fit_standardizer(u_features(torch.cat(u)))}, len(idx))


def showers_to_net(showers, ds, stats):
    """Physical showers (N, n_vox) -> network space (N, 1, 45, n_alpha, n_r)."""
    return standardize(fractions_to_logit(voxel_fractions(showers, ds)[0]), stats["vox"]).unsqueeze(1)


def fractions_to_showers(frac, layer_e, cut=FRACTION_CUT):
    """Per-layer fractions (N, 45, ...) -> showers (N, n_vox) MeV: fractions at or below `cut` set to 0, every
    layer renormalised to unit sum and scaled by its energy, then the 15.15 keV threshold."""
    frac = frac.double().reshape(frac.shape[0], N_LAYERS, -1).clamp(min=0)
    frac = torch.where(frac <= cut, 0.0, frac)
    frac = frac / frac.sum(-1, keepdim=True).clamp(min=1e-300)
    x = frac * layer_e.double().to(frac.device).unsqueeze(-1)
    return torch.where(x < MIN_ENERGY, 0.0, x).reshape(frac.shape[0], -1)


def net_to_showers(z, layer_e, stats):
    """Exact inverse of showers_to_net (float64): unstandardise, inverse logit, cut, renormalise, scale."""
    vox = {k: v.double() for k, v in stats["vox"].items()}
    return fractions_to_showers(inverse_logit(unstandardize(z.squeeze(1).double(), vox)), layer_e)


# ----------------------------------------------------------------------------- 3-D ViT (SPEC 2.3)
@dataclass
class ViTConfig:
    in_shape: tuple = (1, 45, 16, 9)  # (channels, layers, alpha, r)
    patch: tuple = (3, 16, 1)
    dim: int = 480
    heads: int = 6
    mlp: int = 1920
    depth: int = 6
    cond_dim: int = 46  # [c_E, 45 u's]

    def __post_init__(self):  # a checkpoint's model_args hold lists
        self.in_shape, self.patch = tuple(self.in_shape), tuple(self.patch)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """x += gate * f(LN(x) (1 + scale) + shift) for f = attention, then MLP; adaLN-Zero."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class ViT(nn.Module):
    """Velocity field v(x_t, t, c) on a (C, L, A, R) grid: patchify, Fourier positions, DiT blocks."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        c, *grid = cfg.in_shape
        if any(g % p for g, p in zip(grid, cfg.patch)):
            raise ValueError(f"patch {cfg.patch} does not tile the grid {tuple(grid)}")
        if cfg.dim % 6:
            raise ValueError(f"embed dim {cfg.dim} must be divisible by 6 (sin/cos for 3 axes)")
        if cfg.dim % cfg.heads:
            raise ValueError(f"embed dim {cfg.dim} must be divisible by --heads {cfg.heads}")
        self.grid = [g // p for g, p in zip(grid, cfg.patch)]
        patch_dim = c * math.prod(cfg.patch)
        self.embed = nn.Linear(patch_dim, cfg.dim)
        self.pos_freq = nn.Parameter(torch.randn(cfg.dim // 2))  # learnable frequencies: thirds for layer, alpha, r
        axes = [torch.arange(n) / n for n in self.grid]  # patch-grid coordinates in [0, 1)
        self.register_buffer("coords", torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3),
                             persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.c_embed = nn.Sequential(nn.Linear(cfg.cond_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg.dim, cfg.heads, cfg.mlp) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))
        self.final = nn.Linear(cfg.dim, patch_dim)
        self.grad_checkpoint = False
        self._init()

    def _init(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.ada[1] for b in self.blocks] + [self.final_ada[1], self.final]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def positions(self):
        """Fourier position code in the authors' channel order: [r sin, r cos, alpha sin, alpha cos, layer sin,
        layer cos], each axis with its own third of the frequencies (layer first)."""
        arg = 2 * math.pi * self.coords.unsqueeze(-1) * self.pos_freq.reshape(3, -1)  # (tokens, 3 axes, dim/6)
        return torch.cat([arg.flip(1).sin(), arg.flip(1).cos()], -1).reshape(len(self.coords), -1)

    @staticmethod
    def time_features(t, n=256):
        """DiT sinusoidal features of t in [0, 1] (unscaled), frequencies 10000^(-k/128)."""
        freqs = torch.exp(-math.log(10000) * torch.arange(n // 2, device=t.device) / (n // 2))
        arg = t.float().reshape(-1, 1) * freqs
        return torch.cat([arg.cos(), arg.sin()], -1)

    def velocity(self, cond, precision="fp32"):
        """The ODE right-hand side (x, t) -> v(x, t, cond) for the solvers: t a float or a tensor, float32 out."""
        def v(x, t):
            with autocast(cond.device, precision):
                return self(x, torch.as_tensor(t, dtype=torch.float32, device=cond.device), cond).float()
        return v

    def forward(self, x, t, cond):
        (p1, p2, p3), (l, a, r) = self.cfg.patch, self.grid
        h = rearrange(x, "b c (l p1) (a p2) (r p3) -> b (l a r) (p1 p2 p3 c)", p1=p1, p2=p2, p3=p3)
        h = self.embed(h) + self.positions()
        t = t.expand(x.shape[0]) if t.dim() == 0 or t.numel() == 1 else t
        c = self.t_embed(self.time_features(t)) + self.c_embed(cond)
        for block in self.blocks:
            if self.grad_checkpoint and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        h = self.final(modulate(self.final_norm(h), shift, scale))
        return rearrange(h, "b (l a r) (p1 p2 p3 c) -> b c (l p1) (a p2) (r p3)",
                         l=l, a=a, r=r, p1=p1, p2=p2, p3=p3)


AUTHORS_VIT_NAMES = {  # the authors' ViT (calodream/Networks/vit.py, learn_pos_embed) -> ours, applied in order
    "final_layer.adaLN_modulation.1.": "final_ada.1.", "final_layer.linear.": "final.", "x_embedder.": "embed.",
    "pos_embed_freqs": "pos_freq", "t_embedder.mlp.": "t_embed.", "c_embedder.": "c_embed.", ".mlp.fc1.": ".mlp.0.",
    ".mlp.fc2.": ".mlp.2.", ".adaLN_modulation.1.": ".ada.1."}


def vit_state_from_authors(state):
    """An authors' ViT state dict renamed to ours (their grid buffers dropped): the position code, the qkv layout
    and every other tensor are the same, so it loads as is."""
    out = {}
    for name, value in state.items():
        if name not in ("lgrid", "agrid", "rgrid"):
            for theirs, ours in AUTHORS_VIT_NAMES.items():
                name = name.replace(theirs, ours)
            out[name] = value
    return out


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cfm_error(model, x1, cond, generator=None):
    """Conditional flow matching (paper Eq. 6): x_t = (1-t) x0 + t x1, target velocity x1 - x0; the squared error
    of every element and the t of every row."""
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
    t = torch.rand(x1.shape[0], generator=generator, device=x1.device)
    tb = t.reshape(-1, *[1] * (x1.dim() - 1))
    return (model((1 - tb) * x0 + tb * x1, t, cond).float() - (x1 - x0)) ** 2, t


def cfm_loss(model, x1, cond, generator=None, weight=None):
    """The CFM loss, plain MSE of cfm_error; with `weight` (broadcast to one row of x1) the weighted mean over the
    weighted elements."""
    err, _ = cfm_error(model, x1, cond, generator)
    if weight is None:
        return err.mean()
    weight = weight.to(err.device).expand_as(err[0])
    return (err * weight).sum() / (weight.sum() * len(x1))


def seen_voxels(stats):
    """1 where a voxel varied in the training split, 0 where it never did (its std sits at fit_shape_stats' 1e-6
    floor): a validation shower that hits such a voxel has a standardised value of ~1e7 there, so validation
    losses leave those voxels out (training and sampling are unaffected: there z = 0 maps back to no energy)."""
    return (stats["vox"]["std"] > 1.5e-6).float().unsqueeze(0)


def build_vit(ckpt, device="cpu"):
    """The frozen ViT (eval mode) of a shape_vit or latent_vit checkpoint."""
    model = ViT(ViTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- energy transformer (SPEC 2.2)
class EnergyNet(nn.Module):
    """Velocity v(x_t, t | u_<i, E_inc) of the 45 u's (paper Sec. 3.1, Table 1). An encoder-decoder transformer
    (torch.nn.Transformer: post-LN, ReLU, dropout 0) reads the condition token [c_E, 1, 0..] and the
    teacher-forced tokens [u_{i-1}, one-hot(i), 0..] under a causal mask; its output z_i conditions a dense CFM
    head shared by all layers. energy.py samples it layer by layer with a key/value cache."""

    def __init__(self, ff=1024, inner=256, layers=4, head_layers=6, dim=64, heads=4, n_freq=32):
        super().__init__()
        self.dim = dim
        self.transformer = nn.Transformer(dim, heads, layers, layers, ff, dropout=0.0, batch_first=True)
        self.register_buffer("freqs", 30.0 * torch.randn(n_freq))  # frozen Gaussian Fourier frequencies
        self.t_embed = nn.Linear(2 * n_freq, dim)
        self.head_in = nn.Linear(1 + dim + dim, inner)  # acts on [x_t, t-emb, z_i]
        hidden = [m for _ in range(head_layers) for m in (nn.Linear(inner, inner), nn.LayerNorm(inner), nn.SiLU())]
        self.head = nn.Sequential(nn.SiLU(), *hidden, nn.Linear(inner, 1))
        positions = torch.zeros(N_LAYERS, dim)
        positions[torch.arange(N_LAYERS), 1 + torch.arange(N_LAYERS)] = 1  # one-hot(i) of length 46
        self.register_buffer("positions", positions, persistent=False)

    def condition_token(self, c_e):
        return F.pad(torch.stack([c_e, torch.ones_like(c_e)], -1), (0, self.dim - 2)).unsqueeze(1)

    def tokens(self, values, start=0):
        """Decoder tokens [value, one-hot(position), 0..] for positions start.. (B, n) -> (B, n, dim)."""
        return F.pad(values.unsqueeze(-1), (0, self.dim - 1)) + self.positions[start:start + values.shape[1]]

    def context(self, z, c_e):
        """Teacher forcing: z_i sees [0, z_0, ..., z_{i-1}] (shifted right) and c_E. (B, n) -> (B, n, dim)."""
        mask = nn.Transformer.generate_square_subsequent_mask(z.shape[1], device=z.device)
        return self.transformer(self.condition_token(c_e), self.tokens(F.pad(z[:, :-1], (1, 0))),
                                tgt_mask=mask, tgt_is_causal=True)

    def time_features(self, t):
        arg = 2 * math.pi * t.unsqueeze(-1) * self.freqs
        return torch.cat([arg.sin(), arg.cos()], -1)

    def velocity(self, x_t, t, context):
        """The CFM head: velocities (B, n) at x_t, t (B, n) given the transformer's output z (B, n, dim)."""
        emb = self.t_embed(self.time_features(t))
        return self.head(self.head_in(torch.cat([x_t.unsqueeze(-1), emb, context], -1))).squeeze(-1)

    def forward(self, z, c_e, x_t, t):
        """Velocities (B, 45) at x_t, t (B, 45) for data z (B, 45) and c_E (B,)."""
        return self.velocity(x_t, t, self.context(z, c_e))


# ----------------------------------------------------------------------------- ODE solvers (SPEC 2.5, 2.6)
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}


@torch.no_grad()
def solve(velocity, x0, steps, method="rk4", t0=0.0, t1=1.0):
    """Integrate dx/dt = velocity(x, t) from t0 to t1 in `steps` fixed steps.

    velocity(x, t) takes a tensor and a python float. Returns (x(t1), number of evaluations).
    'rk4' is the 3/8 rule of the reference code."""
    if method not in NFE_PER_STEP:
        raise ValueError(f"unknown solver {method!r}; choose from {sorted(NFE_PER_STEP)}")
    h, x = (t1 - t0) / steps, x0
    for i in range(steps):
        t = t0 + i * h
        if method == "euler":
            x = x + h * velocity(x, t)
        elif method == "midpoint":
            x = x + h * velocity(x + h / 2 * velocity(x, t), t + h / 2)
        else:
            k1 = velocity(x, t)
            k2 = velocity(x + h * k1 / 3, t + h / 3)
            k3 = velocity(x + h * (k2 - k1 / 3), t + 2 * h / 3)
            k4 = velocity(x + h * (k1 - k2 + k3), t + h)
            x = x + h * (k1 + 3 * k2 + 3 * k3 + k4) / 8
    return x, steps * NFE_PER_STEP[method]


class BespokeSolver(nn.Module):
    """n-step non-stationary solver (paper Sec. 3.4): x_{i+1} = a_i x_0 + sum_{j<=i} b_ij u_j, u_j = v(x_j, t_j).

    Learnable, (n^2 + 5n - 2)/2 in all: theta (n - 1), a (n), b (n(n+1)/2, the lower triangle row by row).
    Times t_i = sum_{k<=i} |theta_k| / sum_{k<=n} |theta_k| with theta_n = 1 held fixed: at init (theta = 1)
    this is SPEC 2.5's (1/n) sum_{k<=i} |theta_k|, t_n = 1 holds exactly, and fixing theta_n removes the scale
    that the normalisation makes redundant. a = 1, b = 1/n is Euler with n uniform steps. Trained by bespoke.py."""

    def __init__(self, n):
        super().__init__()
        self.n = n
        self.theta = nn.Parameter(torch.ones(n - 1))
        self.a = nn.Parameter(torch.ones(n))
        self.b = nn.Parameter(torch.full((n * (n + 1) // 2,), 1.0 / n))
        self.register_buffer("tril", torch.tril_indices(n, n), persistent=False)

    def times(self):
        """t_0 = 0, ..., t_n = 1 (n + 1 values, differentiable in theta)."""
        dt = torch.cat([self.theta.abs(), self.theta.new_ones(1)])
        t = torch.cumsum(dt, 0) / dt.sum()
        return torch.cat([t.new_zeros(1), t[:-1], t.new_ones(1)])

    def coefficients(self):
        """b as an (n, n) lower-triangular matrix."""
        return torch.zeros(self.n, self.n, device=self.b.device).index_put((self.tril[0], self.tril[1]), self.b)

    def forward(self, velocity, x0):
        """velocity(x, t) with t a 0-dim tensor (gradients reach the times through it) -> x(1)."""
        t, b = self.times(), self.coefficients()
        u, x = [], x0
        for i in range(self.n):
            u.append(velocity(x, t[i]))
            x = self.a[i] * x0 + torch.tensordot(b[i, :i + 1], torch.stack(u), dims=1)  # one kernel, not i + 1
        return x


def make_solver(method, steps, bespoke_ckpt=None, ds=None):
    """The sampler's ODE solve: (solve(velocity, x0) -> x1, steps, NFE). method 'bespoke' applies the solver of a
    bespoke.py checkpoint (its own n steps; --steps is ignored); others are common.solve with `steps`."""
    if method != "bespoke":
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        return (lambda velocity, x0: solve(velocity, x0, steps, method)[0]), steps, steps * NFE_PER_STEP[method]
    if not bespoke_ckpt:
        raise ValueError("--solver bespoke needs --bespoke-ckpt RUN_OR_CKPT (a bespoke.py run)")
    ckpt = load_checkpoint(bespoke_ckpt, script="bespoke", ds=ds)
    solver = BespokeSolver(ckpt["n"])
    solver.load_state_dict(ckpt["solver"])
    solver.eval()

    @torch.no_grad()
    def run(velocity, x0):
        return solver.to(x0.device)(lambda x, t: velocity(x, float(t)), x0)
    return run, solver.n, solver.n


# ----------------------------------------------------------------------------- run plumbing
class TrainingError(Exception):
    """A training run that cannot go on; the message names the checkpoint it leaves behind."""


_LOCKS = {}  # run folders this process holds: lock file -> descriptor


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(name=None):
    """'cuda' when present, else 'cpu'; --device forces one (and fails clearly if absent or unknown)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible")
    return device


def autocast(device, precision="fp32"):
    """precision 'bf16': bf16 autocast (on CUDA, flash attention through SDPA); 'fp32': full float32 (the authors'
    training and sampling precision), with TF32 matmuls and convolutions allowed on CUDA."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return contextlib.nullcontext()


POSITIVE = ("epochs", "batch_size", "steps", "n", "max_showers", "val_every", "ckpt_every", "stop_after", "dim",
            "depth", "heads", "mlp", "channels", "pool", "n_val", "iters", "patience", "ref_steps", "micro_batch",
            "cls_epochs", "cls_width", "cls_batch_size", "cls_repeats")


def check_args(args):
    """One check of the numbers on a command line: counts >= 1, rates > 0, fractions in [0, 1) (the warm-up in
    (0, 1)), seeds >= 0, patches >= 1, a known device."""
    for k in POSITIVE:
        v = getattr(args, k, None)
        if v is not None and min(np.atleast_1d(v)) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    for k in ("lr", "beta", "cut", "cls_lr", "ram_gb"):
        if getattr(args, k, None) is not None and not getattr(args, k) > 0:
            raise ValueError(f"--{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    for k in ("val_fraction", "weight_decay", "clip_grad"):
        if getattr(args, k, None) is not None and not 0 <= getattr(args, k) < (1 if k == "val_fraction" else math.inf):
            raise ValueError(f"--{k.replace('_', '-')} must be in [0, {1 if k == 'val_fraction' else 'inf'}), "
                             f"got {getattr(args, k)}")
    if getattr(args, "warmup", None) is not None and not 0 < args.warmup < 1:
        raise ValueError(f"--warmup must be in (0, 1), got {args.warmup}")
    if getattr(args, "seed", None) is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if getattr(args, "patch", None) is not None and min(args.patch) < 1:
        raise ValueError(f"--patch must be >= 1 along each axis, got {args.patch}")
    pick_device(getattr(args, "device", None))
    return args


def to_device(tree, device):
    """Tensors of a (nested) dict onto device; pinned and asynchronous from the CPU to CUDA."""
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if not torch.is_tensor(tree):
        return tree
    if torch.device(device).type == "cuda" and tree.device.type == "cpu":
        return tree.pin_memory().to(device, non_blocking=True)
    return tree.to(device)


def make_run_dir(script, ds, root="runs"):
    """runs/<script>-ds<N>-<YYYYmmdd-HHMMSS>/ (a suffix keeps two runs in one second apart). Under torchrun
    rank 0 creates it and every rank gets its path."""
    path = [None]
    if get_rank() == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in range(100):
            path = [Path(root) / f"{script}-ds{ds}-{stamp}{'' if k == 0 else f'-{k}'}"]
            try:
                path[0].mkdir(parents=True)
                break
            except FileExistsError:
                continue
            except OSError as err:
                raise OutputError(f"cannot create a run folder under {root}: {err.strerror or err}") from None
        else:
            raise OutputError(f"could not create a run folder under {root}")
        lock_folder(path[0])
    if is_distributed():
        torch.distributed.broadcast_object_list(path)
    return path[0]


def lock_folder(folder, what="training"):
    """Hold folder/.lock for the rest of this process (an flock: the system drops it when the process ends, also by
    kill -9), so that no second process works in a live run folder: a folder held by another process is refused.
    Rank 0 only under torchrun; again in the same process, nothing happens (unlock_folder releases it)."""
    key = Path(folder).resolve() / ".lock"
    if fcntl is None or get_rank() > 0 or key in _LOCKS:
        return
    try:
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputError(f"cannot use {folder}: {err.strerror or err}") from None
    for _ in range(10):  # a holder killed a moment ago may still be going
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.05)
    else:
        holder = os.pread(fd, 20, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OutputError(f"{folder} is in use by a running {what} (pid {holder}); wait for it to end or stop it")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def unlock_folder(folder):
    fd = _LOCKS.pop(Path(folder).resolve() / ".lock", None)
    if fd is not None:
        os.close(fd)


class Log:
    """Print a line and append it to <run>/log.txt (under torchrun: on rank 0 only)."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / "log.txt" if run_dir else None

    def __call__(self, *msg):
        if get_rank() > 0:
            return
        line = " ".join(str(m) for m in msg)
        tqdm.write(line)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def atomic_write(path, write):
    """write(tmp) to a hidden name beside path, then rename: a killed run never leaves a truncated file (the next
    write of path removes a killed writer's temporary file), and a failed write (a full disk) is one OutputError."""
    tmp = claim_output(path, overwrite=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def json_config(args):
    """The argparse namespace as a JSON-clean dict (paths as str, tuples as lists): the checkpoint's config."""
    clean = lambda v: str(v) if isinstance(v, Path) else list(map(clean, v)) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return {k: clean(v) for k, v in vars(args).items()}


def _nonfinite(tree, name=""):
    """Names of the floating tensors with NaN or inf in a nested dict / list."""
    if isinstance(tree, dict):
        return [b for k, v in tree.items() for b in _nonfinite(v, f"{name}.{k}" if name else str(k))]
    if isinstance(tree, (list, tuple)):
        return [b for i, v in enumerate(tree) for b in _nonfinite(v, f"{name}.{i}")]
    return [name] if torch.is_tensor(tree) and tree.is_floating_point() and not torch.isfinite(tree).all() else []


def _torch_save(state, tmp):
    sink = _SinkFile(tmp)
    try:
        torch.save(state, sink)
    finally:
        sink.file.close()
    if sink.error:  # a full disk: torch.save was told every write succeeded
        raise sink.error


def save_checkpoint(path, **state):
    """torch.save under a temporary name, then rename. Refuses NaN or inf in the weights, the statistics or the
    optimizer state: a run never replaces its last good checkpoint with a broken one (nor with a truncated one
    when the disk is full)."""
    bad = _nonfinite({k: state.get(k) for k in ("model", "solver", "stats", "optimizer")})
    if bad:
        raise TrainingError(f"the weights became non-finite ({len(bad)} tensors, e.g. {bad[0]}) at epoch "
                            f"{state.get('epoch')}; {checkpoint_note(Path(path).parent)}; try a lower --lr")
    try:
        atomic_write(path, lambda tmp: _torch_save(state, tmp))
    except OutputError as err:  # a full disk: the old checkpoint stays as it was
        raise OutputError(f"{err}; {checkpoint_note(Path(path).parent)}") from None


def checkpoint_note(run_dir):
    path = Path(run_dir) / "ckpt.pt"
    if not path.is_file():
        return f"no checkpoint was written to {run_dir}"
    return f"the last good checkpoint is {path} (epoch {load_checkpoint(path)['epoch']})"


def load_checkpoint(path, script=None, ds=None, map_location="cpu"):
    """Load a checkpoint (a file, or a run folder holding ckpt.pt) with weights_only=True and check
    that it was written by `script` (one name or a tuple) for dataset `ds`."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated or foreign file
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path} is not a readable checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise DataError(f"{path} is not a checkpoint of these scripts")
    if script is not None and ckpt["script"] not in ((script,) if isinstance(script, str) else script):
        raise DataError(f"{path} was written by {ckpt['script']!r}, but a {script!r} checkpoint is needed")
    if ds is not None and ckpt.get("ds") != ds:
        raise DataError(f"{path} is a dataset-{ckpt.get('ds')} checkpoint, but --ds is {ds}")
    return ckpt


def find_latest_run(script, ds, root="runs"):
    """Newest <root>/<script>-ds<N>-*/ckpt.pt."""
    return find_newest(f"{script}-ds{ds}-*/ckpt.pt", root, f"{script} run for dataset {ds}",
                       f": train one with `python {script}.py --ds {ds}` or pass its checkpoint path")


# ----------------------------------------------------------------------------- what every training script shares
RUNTIME_FLAGS = ("device", "no_progress", "compile", "stop_after", "resume", "out")  # as given on --resume


def resume(args, script):
    """--resume [RUN|CKPT] (bare: the newest run of --ds under --out): (args, ckpt, run folder), where args are
    the checkpoint's config with RUNTIME_FLAGS as given now. Without --resume: (args, None, None)."""
    if not args.resume:
        return args, None, None
    path = find_latest_run(script, args.ds, args.out).parent if args.resume == "latest" else Path(args.resume)
    ckpt = load_checkpoint(path, script=script)
    given = {k: getattr(args, k) for k in RUNTIME_FLAGS if hasattr(args, k)}
    merged = {**vars(args), **ckpt["config"], **given}  # flags newer than the checkpoint keep their defaults
    lock_folder(path if path.is_dir() else path.parent)  # no second trainer in a live run folder
    return argparse.Namespace(**merged), ckpt, (path if path.is_dir() else path.parent)


def restore(ckpt, model, opt, sched):
    """Weights, optimizer and schedule of a checkpoint; returns (history, epoch, step, nonfinite)."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    return ckpt["history"], ckpt["epoch"], ckpt["step"], ckpt["nonfinite"]


def epoch_generators(seed, epoch, rank, device):
    """All randomness of one epoch, so that --resume continues bit for bit: (a CPU generator for the order of the
    showers, the same on every rank; a generator on device for noise, t and x0, its own per rank)."""
    base = seed * 100003 + epoch
    return torch.Generator().manual_seed(base), torch.Generator(device).manual_seed(base + 7919 * rank)


def batch_rows(perm, i, batch_size, rank=0, world=1):
    """This rank's rows of global batch i of an epoch's order `perm` (batch_size / world each, as DDP averages)."""
    b = batch_size // world
    return perm[i * batch_size + rank * b:i * batch_size + (rank + 1) * b]


def optimizer_step(model, loss, opt, counts, run_dir, clip=0.0, patience=20):
    """Backward and one update. A non-finite loss or gradient norm skips the update (the caller's schedule still
    advances: the LR follows the batch position) and is counted in counts["nonfinite"]; under DDP every rank
    sees the same averaged gradient, so all skip together. `patience` skips in a row end the run. Returns
    whether the update was made. clip > 0 clips the gradient norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    if torch.isfinite(norm):
        opt.step()
        counts["in_a_row"] = 0
        return True
    counts["nonfinite"], counts["in_a_row"] = counts["nonfinite"] + 1, counts.get("in_a_row", 0) + 1
    if counts["in_a_row"] >= patience:
        raise TrainingError(f"{patience} non-finite losses or gradients in a row; {checkpoint_note(run_dir)}; "
                            f"try a lower --lr")
    return False


def finish_run(log, run_dir, history, last, epochs):
    """The end of a training run: its run folder is released, and a run whose last epoch made no update at all
    (every loss or gradient non-finite) ends with a TrainingError naming its last checkpoint."""
    unlock_folder(run_dir)
    if history["train_loss"] and not math.isfinite(history["train_loss"][-1]):
        raise TrainingError(f"epoch {last} made no update (every loss or gradient was non-finite); "
                            f"{checkpoint_note(run_dir)}; try a lower --lr")
    log(f"done: {Path(run_dir) / 'ckpt.pt'} (epoch {last} of {epochs})")


def wrap_model(model, device, world, compile=False):
    """The module the training step calls: DDP under torchrun, torch.compile on CUDA with --compile."""
    net = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile and device.type == "cuda":
        return torch.compile(net)
    if compile:
        print("--compile is ignored on the CPU")
    return net


# ----------------------------------------------------------------------------- several processes (torchrun)
def init_distributed(device=None):
    """Under `torchrun --nproc_per_node=N` join the process group (NCCL on CUDA, gloo on CPU) and give each
    rank its GPU. Returns (rank, world_size, device); (0, 1, device) in a plain run."""
    device, world = pick_device(device), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank():
    """This process's rank under torchrun; 0 in a plain run."""
    return torch.distributed.get_rank() if is_distributed() else 0


def destroy_distributed():
    if is_distributed():
        torch.distributed.destroy_process_group()
