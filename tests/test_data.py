"""data/prepare.py: the toy generator (determinism, format, physics-shaped statistics, layer correlations
against Geant4) and the resumable download."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from data import prepare as data  # noqa: E402


@pytest.fixture(scope="module")
def toy2000():
    return data.generate_toy(2, 2000, seed=3)


def test_toy_deterministic_and_seeded():
    e1, x1 = data.generate_toy(2, 50, seed=7)
    e2, x2 = data.generate_toy(2, 50, seed=7)
    e3, x3 = data.generate_toy(2, 50, seed=8)
    assert np.array_equal(e1, e2) and np.array_equal(x1, x2)
    assert not np.array_equal(e1, e3)
    assert e1.dtype == np.float64 and x1.dtype == np.float32 and x1.shape == (50, 6480)


@pytest.mark.parametrize("ds,n", [(2, 30), (3, 20)])
def test_toy_file_format(tmp_path, ds, n):
    path = data.write_toy(ds, n, tmp_path / f"toy_ds{ds}_train.hdf5", seed=1)
    e_inc, showers = common.load_showers(path, ds, progress=False)
    e_ref, x_ref = data.generate_toy(ds, n, seed=1)
    assert showers.shape == (n, common.geometry(ds).n_vox)
    assert np.array_equal(showers, x_ref)
    import h5py
    with h5py.File(path) as f:
        assert f["showers"].dtype == np.float64 and f["incident_energies"].shape == (n, 1)
        assert f["showers"].compression == "gzip" and f["incident_energies"].dtype == np.float64
        assert np.array_equal(f["incident_energies"][:, 0], e_ref)
    with pytest.raises(FileExistsError):
        data.write_toy(ds, n, path)
    assert (e_inc >= 1e3).all() and (e_inc <= 1e6).all()


def test_toy_statistics(toy2000):
    e_inc, showers = toy2000
    g = common.geometry(2)
    sparsity = (showers == 0).mean()
    assert 0.3 < sparsity < 0.99
    x64 = showers.astype(np.float64)  # as written to the file
    assert not ((x64 > 0) & (x64 < common.MIN_ENERGY)).any() and (x64 > 0).any()
    response = showers.sum(1) / e_inc
    assert 0.85 < response.mean() < 1.05 and response.std() > 0.01
    layer_e = common.layer_energies(torch.as_tensor(showers, dtype=torch.float64), 2)
    u = common.energies_to_u(torch.as_tensor(e_inc), layer_e).numpy()
    assert (u[:, 1] > 0).mean() > 0.99  # the incident electron deposits in layer 0 (only leakage empties it)
    assert (u[:, -1] == 0).any() and (u[:, 1:] == 0).mean() > 0.05  # empty late layers: u = 0 exactly
    # the last non-empty layer holds all that remains: u = E/(E + 1e-10) > 1 - 1e-8 (E > 15 keV)
    last = 44 - np.argmax(layer_e.numpy()[:, ::-1] > 0, axis=1)
    rows = np.flatnonzero(last < 44)  # layer 44 has no u of its own (it is the remainder)
    assert len(rows) > 100 and (u[rows, last[rows] + 1] > 1 - 1e-8).all() and (u[:, 1:] <= 1).all()
    assert 0 < u[:, 0].min() and u[:, 0].max() < 1
    l_max = layer_e.numpy().argmax(1)
    assert np.corrcoef(l_max, np.log(e_inc))[0, 1] > 0.5
    x, _, _ = g.voxel_xyr()
    per_layer = showers.reshape(-1, 45, g.n_alpha * g.n_r).astype(np.float64)
    e_layer = per_layer.sum(-1)
    ec_x = (per_layer * x).sum(-1)[e_layer > 0] / e_layer[e_layer > 0]
    assert abs(ec_x.mean()) < 1.0 and ec_x.std() > 0.1
    # sparse late layers at low energy, denser near the maximum at high energy
    low, high = e_inc < 3e3, e_inc > 3e5
    assert (showers[low] == 0).mean() > (showers[high] == 0).mean()


def test_toy_physics_first_layers_and_resolution(toy2000):
    e_inc, showers = toy2000
    layer_e = showers.reshape(len(showers), 45, -1).astype(np.float64).sum(-1)
    low, high = e_inc < 3e3, e_inc > 3e5
    # layer 0: the electron's own track at 1 GeV, backsplash of the shower growing with E_inc above
    assert 5 < layer_e[low, 0].mean() < 50 and layer_e[high, 0].mean() > 10 * layer_e[low, 0].mean()
    response = layer_e.sum(1) / e_inc  # stochastic term from the sampling: ~18% at 1-3 GeV, ~1.5% above 300 GeV
    assert 0.1 < response[low].std() < 0.3 and response[high].std() < 0.03
    # the voxels hold what toy_layer_energies made, less lateral leakage and the threshold
    e_ref, layer_ref = data.toy_layer_energies(2, len(e_inc), seed=3)
    assert np.array_equal(e_ref, e_inc) and (layer_e <= layer_ref * (1 + 1e-6)).all()
    assert 0.95 < layer_e.sum() / layer_ref.sum() < 1.0


def test_layer_pcc_known_answers(tmp_path):
    a = np.random.default_rng(0).standard_normal(50)
    layer_e = np.zeros((50, 45))
    layer_e[:, 0], layer_e[:, 1], layer_e[:, 2] = a, 2 * a + 1, -a  # layer 44 and others constant: 0
    pcc = data.layer_pcc(layer_e)
    assert pcc.shape == (45, 45) and np.allclose(pcc[0, :3], [1, 1, -1]) and pcc[0, 44] == 0 and pcc[5, 6] == 0
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"pcc": pcc.tolist()}))
    assert data.pcc_distance(layer_e, ref) == {"all": 0.0, "first": 0.0, "last": 0.0}
    ref.write_text(json.dumps({"pcc": (pcc + 0.5 * (np.arange(45)[:, None] >= 30)).tolist()}))
    d = data.pcc_distance(layer_e, ref)  # rows 30-44 off by 0.5: 105 of the 990 pairs i < j
    assert d["last"] == 0.5 and d["first"] == 0.0 and abs(d["all"] - 0.5 * 105 / 990) < 1e-12


def test_toy_layer_correlations_match_geant4():
    """Geant4's DS2 layer-energy PCC matrix (data/g4_pcc_ds2.json) against 20k toy showers of the default
    training file (seed 0): 0.124 before the physics of the first layers and the tail, 0.033 now."""
    e_inc, layer_e = data.toy_layer_energies(2, 20000, seed=0)
    d = data.pcc_distance(layer_e)
    assert d["all"] <= 0.04 and d["first"] <= 0.05 and d["last"] <= 0.08
    pcc = data.layer_pcc(layer_e)
    assert (pcc[0, 1:6] > 0.6).all() and pcc[40, 20] > 0.72  # Geant4: 0.74-0.76 and 0.79; before: ~-0.05 and 0.67


# ----------------------------------------------------------------------------- download against a local server
class Server:
    """http.server on 127.0.0.1 serving one folder, with Range support (or not: ignore_range)."""

    def __init__(self, folder):
        import http.server
        import threading
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = folder / self.path.split("?")[0].lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                blob = path.read_bytes()
                start, rng = 0, self.headers.get("Range")
                server.requests.append(rng)
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(blob):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(blob) - start))
                self.end_headers()
                stop = len(blob) if server.cut is None else server.cut  # cut: the connection drops
                server.sent += stop - start  # counted first: the client may finish before this thread
                self.wfile.write(blob[start:stop])

            def log_message(self, *args):
                pass

        self.requests, self.sent, self.ignore_range, self.cut = [], 0, False, None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def served(tmp_path):
    import hashlib
    src = tmp_path / "srv"
    src.mkdir()
    blob = np.random.default_rng(0).bytes(300_000)
    (src / "dataset_2_1.hdf5").write_bytes(blob)
    server = Server(src)
    yield server, blob, {"dataset_2_1.hdf5": hashlib.md5(blob).hexdigest()}, tmp_path / "out"
    server.httpd.shutdown()
    server.httpd.server_close()


def fetch(server, md5, out):
    return data.download(2, out, ["dataset_2_1.hdf5"], base_url=server.url, md5=md5, progress=False)


def test_download_full_then_skip(served):
    server, blob, md5, out = served
    (path,) = fetch(server, md5, out)
    assert path.read_bytes() == blob and not (out / "dataset_2_1.hdf5.part").exists()
    assert server.requests == [None] and server.sent == len(blob)
    fetch(server, md5, out)  # already present with the right MD5: no request
    assert len(server.requests) == 1


def test_download_resumes_part(served):
    server, blob, md5, out = served
    out.mkdir()
    (out / "dataset_2_1.hdf5.part").write_bytes(blob[:123_456])
    (path,) = fetch(server, md5, out)
    assert path.read_bytes() == blob
    assert server.requests == ["bytes=123456-"] and server.sent == len(blob) - 123_456


def test_download_interrupted_then_resumed(served):
    server, blob, md5, out = served
    server.cut = 200_000
    with pytest.raises(common.DataError, match="interrupted after 200000 bytes"):
        fetch(server, md5, out)
    assert (out / "dataset_2_1.hdf5.part").stat().st_size == 200_000 and not (out / "dataset_2_1.hdf5").exists()
    server.cut = None
    assert fetch(server, md5, out)[0].read_bytes() == blob
    assert server.requests == [None, "bytes=200000-"] and server.sent == len(blob)


def test_download_server_ignoring_range_and_complete_part(served):
    server, blob, md5, out = served
    out.mkdir()
    (out / "dataset_2_1.hdf5.part").write_bytes(blob[:1000])
    server.ignore_range = True
    assert fetch(server, md5, out)[0].read_bytes() == blob and server.sent == len(blob)
    (out / "dataset_2_1.hdf5").rename(out / "dataset_2_1.hdf5.part")  # a complete .part: HTTP 416
    server.ignore_range, server.sent = False, 0
    assert fetch(server, md5, out)[0].read_bytes() == blob and server.sent == 0


def test_download_md5_mismatch(served):
    server, blob, md5, out = served
    with pytest.raises(common.DataError, match="MD5 .* does not match"):
        fetch(server, {"dataset_2_1.hdf5": "0" * 32}, out)
    assert not (out / "dataset_2_1.hdf5").exists() and not (out / "dataset_2_1.hdf5.part").exists()


def test_cli_errors(tmp_path):
    import subprocess
    cmd = [sys.executable, str(Path(data.__file__)), "download", "--ds", "2", "--files", "nope.hdf5"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.startswith("error: unknown file") and res.stderr.count("\n") == 1
    (tmp_path / "toy_ds2_train.hdf5").write_bytes(b"")
    with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
        data.main(["toy", "--n", "5", "--out", str(tmp_path)])
    with pytest.raises(common.DataError, match="cannot reach"):
        data.main(["download", "--out", str(tmp_path), "--files", "dataset_2_1.hdf5",
                   "--base-url", "http://127.0.0.1:9", "--no-progress"])
    data.main(["toy", "--ds", "3", "--n", "4", "--n-ref", "2", "--out", str(tmp_path), "--no-progress"])
    assert common.load_showers(tmp_path / "toy_ds3_ref.hdf5", 3, progress=False)[1].shape == (2, 40500)


def test_cli_pcc(tmp_path, capsys):
    path = data.write_toy(2, 300, tmp_path / "toy.hdf5", seed=4)
    data.main(["pcc", str(path), "--no-progress"])
    out = capsys.readouterr().out
    d = data.pcc_distance(data.toy_layer_energies(2, 300, seed=4)[1])  # before leakage: close, not equal
    assert out.startswith(f"{path}: 300 showers, mean |dPCC| vs g4_pcc_ds2.json: all 0.0") and "layers 0-5 rows" in out
    assert abs(float(out.split("all ")[1].split(",")[0]) - d["all"]) < 0.01
    with pytest.raises(common.DataError):
        data.main(["pcc", str(tmp_path / "missing.hdf5"), "--no-progress"])
    (tmp_path / "bad.json").write_text('{"pcc": [[1.0]]}')
    with pytest.raises(common.DataError, match="not \\(45, 45\\)"):
        data.main(["pcc", str(path), "--reference", str(tmp_path / "bad.json"), "--no-progress"])
