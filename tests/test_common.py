"""The shared contract: geometry, the file formats and their errors, preprocessing round trips, the two networks,
solvers (bespoke included), argument checks, checkpoints and the shared optimizer step."""
import math

import h5py
import numpy as np
import pytest
import torch

import common as C


# ----------------------------------------------------------------------------- geometry
def test_geometry_shapes_and_edges():
    g2, g3 = C.geometry(2), C.geometry(3)
    assert g2.shape == (45, 16, 9) and g2.n_vox == 6480
    assert g3.shape == (45, 50, 18) and g3.n_vox == 40500
    assert g2.r_edges[1] == 4.65 and g2.r_edges[-1] == 41.85 and len(g2.r_edges) == 10
    assert g3.r_edges[1] == 2.325 and g3.r_edges[3] == 6.975 and g3.r_edges[-1] == 41.85
    x, y, r = g2.voxel_xyr()
    assert x.shape == (16 * 9,) and np.allclose(np.hypot(x, y), r)
    assert r[0] == 4.65 / 2 and r[9] == r[0]  # flat index alpha * n_r + r
    assert abs(C.MIN_ENERGY - 0.01515151) < 1e-7
    with pytest.raises(ValueError):
        C.geometry(1)


def test_ds3_alpha_centre_sign_convention():
    # SPEC 1: alpha = +-pi/2 are bin centres in DS3, so x = r cos(alpha) is +-1e-16, not 0
    x, _, _ = C.geometry(3).voxel_xyr()
    tiny = x[np.abs(x) < 1e-12]
    assert len(tiny) == 2 * 18 and (tiny != 0).all()


# ----------------------------------------------------------------------------- I/O
def _showers(n, ds=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.exponential(1.0, (n, C.geometry(ds).n_vox)) * (rng.random((n, C.geometry(ds).n_vox)) < 0.3)
    return 10 ** rng.uniform(3, 6, n), x


def test_write_and_load_round_trip(tmp_path):
    e, x = _showers(50)
    path = tmp_path / "a.hdf5"
    C.write_showers(path, e, x, ds=2)
    with h5py.File(path) as f:
        assert f["showers"].dtype == np.float64 and f["incident_energies"].shape == (50, 1)
        assert f["showers"].compression == "gzip"
    e2, x2 = C.load_showers([path, path], ds=2, max_showers=70, chunk=16, progress=False)
    assert e2.dtype == np.float32 and x2.shape == (70, 6480)
    assert np.allclose(x2[:50], x, rtol=1e-6) and np.allclose(x2[50:], x[:20], rtol=1e-6)
    with pytest.raises(FileExistsError):
        C.write_showers(path, e, x, ds=2)


def test_writer_leaves_nothing_on_failure(tmp_path):
    e, x = _showers(10)
    path = tmp_path / "b.hdf5"
    with pytest.raises(RuntimeError):
        with C.ShowerWriter(path, 10, ds=2) as w:
            w.write(e[:5], x[:5])
            raise RuntimeError("killed")
    with pytest.raises(ValueError, match="only 5 of 10"):
        with C.ShowerWriter(path, 10, ds=2) as w:
            w.write(e[:5], x[:5])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("problem, match", [
    ("missing", "not found.*data/prepare.py download"), ("nokey", "not a CaloChallenge file"), ("ds", "use --ds 3"),
    ("nan", "NaN"), ("negative", "negative"), ("count", "incident energies"), ("corrupt", "not a readable")])
def test_loader_errors(tmp_path, problem, match):
    path = tmp_path / "dataset_2_1.hdf5"
    e, x = _showers(20)
    if problem == "ds":
        e, x = _showers(5, ds=3)
    if problem == "nan":
        x[3, 7] = np.nan
    if problem == "negative":
        x[2, 1] = -1.0
    if problem == "corrupt":
        path.write_bytes(b"not hdf5 at all")
    elif problem != "missing":
        with h5py.File(path, "w") as f:
            f["incident_energies"] = e.reshape(-1, 1)[: 19 if problem == "count" else None]
            if problem != "nokey":
                f["showers"] = x
    with pytest.raises(C.DataError, match=match):
        C.load_showers(path, ds=2, progress=False)


# ----------------------------------------------------------------------------- preprocessing
def test_rescaled_logit_is_finite_at_the_edges_and_exactly_inverted():
    x = torch.tensor([0.0, 1e-12, 1e-7, 0.3, 1 - 1e-9, 1.0], dtype=torch.float64)
    z = C.logit(x)
    assert torch.isfinite(z).all() and abs(z[0] + math.log(1 / C.LOGIT_ALPHA - 1)) < 1e-9  # logit(alpha), no clamp
    assert torch.allclose(C.inverse_logit(z), x, rtol=1e-9, atol=1e-15)
    assert C.inverse_logit(torch.tensor([-1e3, 1e3])).tolist() == [0.0, 1.0]  # clipped to [0, 1]


def test_u_round_trip_with_point_masses():
    _, x = _showers(64)
    x = torch.as_tensor(x)
    x[:5, 30 * 144:] = 0  # empty late layers: u = 0, and the last non-empty layer has u = 1
    e_inc = torch.as_tensor(10 ** np.random.default_rng(1).uniform(3, 6, 64))
    le = C.layer_energies(x, 2)
    u = C.energies_to_u(e_inc, le)
    assert (u[:5, 31:] == 0).all() and torch.allclose(u[:5, 30], torch.ones(5, dtype=u.dtype))
    assert torch.allclose(C.u_to_energies(e_inc, u), le, rtol=1e-8, atol=1e-8)
    stats = C.fit_standardizer(C.logit(u))  # through the energy-network space (float32) and back
    u_back = C.net_to_u(C.u_to_net(u, stats), stats)
    assert (u_back[:5, 31:] < 1e-9).all() and (u_back[:5, 30] > 1 - 1e-9).all()
    assert torch.allclose(C.u_to_energies(e_inc, u_back), le, rtol=1e-5, atol=1e-4)


def test_shape_round_trip_keeps_voxels_down_to_the_cut():
    """Fractions above 1e-7 of their layer survive forward and inverse (a 5e-6 cut would zero every voxel below
    500 keV of a 100 GeV layer); fractions at or below 1e-7 are exactly 0 on the way back."""
    e_inc, x = _showers(40)
    e_inc = np.full(40, 1e6)  # E_tot ~ 200 GeV below: u_0 <= 1 (finite statistics) needs E_inc >= 0.57 TeV
    x = torch.as_tensor(np.where(x > C.MIN_ENERGY * 10, x, 0.0) * 50)  # well above the threshold
    x[:, 20 * 144:21 * 144] *= 1e5 / x[:, 20 * 144:21 * 144].sum(1, keepdim=True)  # a 100 GeV layer
    layer = x[:, 20 * 144:21 * 144]
    x[:, 20 * 144 + 7] = layer.sum(1) * 2e-6  # 2e-6 and 3e-7 of layer 20, far above 15.15 keV for these showers
    x[:, 20 * 144 + 8] = layer.sum(1) * 3e-7
    x[:, 20 * 144 + 9] = layer.sum(1) * 5e-8  # below the cut
    le = C.layer_energies(x, 2)
    frac, _ = C.voxel_fractions(x, 2)
    big = le[:, 20] * 3e-7 > C.MIN_ENERGY
    assert big.all() and (frac[:, 20].reshape(40, -1)[:, 7] > 1.5e-6).all()
    stats = C.fit_shape_stats(e_inc, x.float().numpy(), ds=2)
    z = C.showers_to_net(x, 2, stats)
    assert z.shape == (40, 1, 45, 16, 9) and torch.isfinite(z).all()
    back = C.net_to_showers(z, le, stats)
    keep = x.clone()
    keep[:, 20 * 144 + 9] = 0  # the fraction at 5e-8 is cut ...
    want = C.fractions_to_showers(C.voxel_fractions(keep, 2)[0], le)  # ... and the layer renormalised
    assert torch.allclose(back, want, rtol=1e-5, atol=1e-9)
    assert (back[big, 20 * 144 + 7] > 0).all() and (back[big, 20 * 144 + 8] > 0).all()
    assert (back[:, 20 * 144 + 9] == 0).all() and torch.allclose(C.layer_energies(back, 2), le, rtol=1e-5)


def test_shape_condition():
    e_inc = torch.tensor([1e3, 1e6], dtype=torch.float64)
    u = torch.rand(2, 45, dtype=torch.float64)
    stats = C.fit_standardizer(C.u_features(torch.rand(100, 45, dtype=torch.float64)))
    c = C.shape_condition(e_inc, u, stats)
    assert c.shape == (2, 46) and c[0, 0] == 0 and abs(c[1, 0] - 1) < 1e-6


# ----------------------------------------------------------------------------- ViT
@pytest.mark.parametrize("cfg, count, tokens", [
    (C.ViTConfig(), 26_042_688, 135),
    (C.ViTConfig((1, 45, 50, 18), (3, 5, 2), 240, 6, 720, 6), 5_868_870, 1350),
    (C.ViTConfig((2, 15, 9, 9), (3, 1, 1), 240, 6, 960, 10), 10_711_566, 405),
    (C.ViTConfig((2, 9, 26, 16), (3, 2, 2), 240, 6, 960, 10), 10_720_224, 312)])
def test_vit_parameter_counts(cfg, count, tokens):
    model = C.ViT(cfg)
    assert C.count_parameters(model) == count and len(model.coords) == tokens


def test_vit_zero_at_init_and_learns():
    torch.manual_seed(0)
    cfg = C.ViTConfig((1, 6, 4, 3), (3, 2, 1), 24, 2, 48, 2)
    model = C.ViT(cfg)
    x, c = torch.randn(16, *cfg.in_shape), torch.randn(16, 46)
    assert model(x, torch.rand(16), c).abs().max() == 0
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    losses = []
    for step in range(80):
        loss = C.cfm_loss(model, x, c, torch.Generator().manual_seed(step % 4))  # a few fixed draws
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])


def test_vit_position_code_is_the_authors_layout_and_their_names_map():
    """SPEC 2.3: D/2 frequencies w, thirds for layer, alpha, r; channels [r sin, r cos, alpha sin, alpha cos,
    layer sin, layer cos] with 2 pi w x, x = index / count on the patch grid."""
    model = C.ViT(C.ViTConfig((1, 6, 4, 3), (3, 2, 1), 24, 2, 48, 2))
    l, a, r = torch.meshgrid(torch.arange(2) / 2, torch.arange(2) / 2, torch.arange(3) / 3, indexing="ij")
    wl, wa, wr = (2 * math.pi * model.pos_freq.detach()).chunk(3)
    pe = [(x.flatten()[:, None] * w) for x, w in ((r, wr), (a, wa), (l, wl))]
    expected = torch.cat([f(p) for p in pe for f in (torch.sin, torch.cos)], 1)
    torch.testing.assert_close(model.positions().detach(), expected)
    theirs = {}  # our state dict under the authors' names, then mapped back
    back = {v: k for k, v in C.AUTHORS_VIT_NAMES.items()}
    for name, value in model.state_dict().items():
        for ours in reversed(list(back)):
            name = name.replace(ours, back[ours])
        theirs[name] = value
    assert "pos_embed_freqs" in theirs and "blocks.1.mlp.fc2.weight" in theirs and "final_layer.linear.bias" in theirs
    assert "blocks.0.adaLN_modulation.1.weight" in theirs and "final_layer.adaLN_modulation.1.weight" in theirs
    theirs.update(lgrid=torch.zeros(2), agrid=torch.zeros(2), rgrid=torch.zeros(3))
    model.load_state_dict(C.vit_state_from_authors(theirs), strict=True)


# ----------------------------------------------------------------------------- energy transformer
PAPER, CHALLENGE = dict(ff=1024, inner=256, layers=4, head_layers=6), dict(ff=512, inner=512, layers=4, head_layers=6)


def test_energy_parameter_counts():
    paper, challenge = C.EnergyNet(**PAPER), C.EnergyNet(**CHALLENGE)
    assert C.count_parameters(paper) == 1_695_297  # paper Table 1
    assert C.count_parameters(challenge) == 2_384_705  # CaloChallenge submission
    assert paper.freqs.shape == (32,) and not paper.freqs.requires_grad  # frozen, not counted
    assert "freqs" in paper.state_dict()  # but saved: the sampler needs the same frequencies


def test_energy_net_is_the_torch_transformer_and_causal():
    model = C.EnergyNet(ff=64, inner=32, layers=2, head_layers=1).eval()
    ref = torch.nn.Transformer(64, 4, 2, 2, 64, dropout=0.0, batch_first=True).eval()
    ref.load_state_dict(model.transformer.state_dict())
    c_e, z = torch.rand(5), torch.randn(5, 45)
    tgt = torch.nn.functional.pad(torch.nn.functional.pad(z[:, :-1], (1, 0)).unsqueeze(-1), (0, 63)) + model.positions
    src = torch.nn.functional.pad(torch.stack([c_e, torch.ones(5)], -1), (0, 62)).unsqueeze(1)
    with torch.no_grad():
        expected = ref(src, tgt, tgt_mask=ref.generate_square_subsequent_mask(45), tgt_is_causal=True)
        torch.testing.assert_close(model.context(z, c_e), expected, atol=1e-5, rtol=1e-5)
        assert model(z, c_e, torch.randn(5, 45), torch.rand(5, 45)).shape == (5, 45)
        z2 = z.clone()
        z2[:, 10] += 1.0
        diff = (model.context(z2, c_e) - model.context(z, c_e)).abs().amax((0, 2))
    assert (diff[:11] == 0).all() and (diff[11:] > 0).all()  # z_i depends on u_0..u_{i-1} only
    assert model.positions.sum(0)[1:46].tolist() == [1.0] * 45  # one-hot(i) in columns 1..45 of 46


# ----------------------------------------------------------------------------- solvers
@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_solver_order(method, order):
    # dx/dt = -2 x + t: errors fall like h^order
    exact = lambda x0: (x0 + 0.25) * np.exp(-2.0) + 0.5 - 0.25
    f = lambda x, t: -2 * x + t
    x0 = torch.tensor([1.0], dtype=torch.float64)
    errs = [abs(C.solve(f, x0, n, method)[0].item() - exact(1.0)) for n in (8, 16)]
    assert abs(np.log2(errs[0] / errs[1]) - order) < 0.3
    assert C.solve(f, x0, 8, method)[1] == 8 * C.NFE_PER_STEP[method]


@pytest.mark.parametrize("n, expected", [(4, 17), (8, 51), (16, 167)])
def test_bespoke_parameter_count_and_euler_at_init(n, expected):
    solver = C.BespokeSolver(n)
    assert C.count_parameters(solver) == expected == (n * n + 5 * n - 2) // 2
    times = solver.times()
    assert torch.allclose(times, torch.linspace(0, 1, n + 1)) and times[-1] == 1
    f = lambda x, t: -2 * x + t  # noqa: E731
    x0 = torch.randn(3, 2)
    with torch.no_grad():
        torch.testing.assert_close(solver(f, x0), C.solve(f, x0, n, "euler")[0])


def test_make_solver(tmp_path):
    f = lambda x, t: -2 * x + t  # noqa: E731
    x0 = torch.randn(4)
    solve, steps, nfe = C.make_solver("rk4", 5)
    assert (steps, nfe) == (5, 20) and torch.equal(solve(f, x0), C.solve(f, x0, 5, "rk4")[0])
    solver = C.BespokeSolver(3)
    with torch.no_grad():
        solver.a.mul_(0.9)
    C.save_checkpoint(tmp_path / "bns.pt", script="bespoke", ds=2, n=3, loss="local", solver=solver.state_dict())
    solve, steps, nfe = C.make_solver("bespoke", 20, tmp_path / "bns.pt", ds=2)
    assert (steps, nfe) == (3, 3)
    with torch.no_grad():
        torch.testing.assert_close(solve(f, x0), solver(f, x0))
    with pytest.raises(ValueError, match="--bespoke-ckpt"):
        C.make_solver("bespoke", 3)
    with pytest.raises(C.DataError, match="dataset-2"):
        C.make_solver("bespoke", 3, tmp_path / "bns.pt", ds=3)


# ----------------------------------------------------------------------------- plumbing
def test_checkpoint_and_runs(tmp_path):
    run = C.make_run_dir("energy", 2, tmp_path)
    C.save_checkpoint(run / "ckpt.pt", script="energy", ds=2, model={"w": torch.ones(2)}, config={"a": 1})
    assert C.load_checkpoint(run, script="energy", ds=2)["config"] == {"a": 1}
    with pytest.raises(C.DataError, match="written by 'energy'"):
        C.load_checkpoint(run, script="shape_vit")
    with pytest.raises(C.DataError, match="dataset-2"):
        C.load_checkpoint(run, ds=3)
    assert C.find_latest_run("energy", 2, tmp_path) == run / "ckpt.pt"
    with pytest.raises(C.DataError, match="no energy run for dataset 3"):
        C.find_latest_run("energy", 3, tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(C.DataError, match="not a readable checkpoint"):
        C.load_checkpoint(tmp_path / "bad.pt")


def test_batch_rows_share_each_batch_between_ranks():
    perm = np.random.default_rng(0).permutation(100)
    for world in (1, 2, 4):
        rows = [C.batch_rows(perm, 3, 20, r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(rows), perm[60:80])  # every row of batch 3 once
    assert C.init_distributed("cpu") == (0, 1, torch.device("cpu"))


@pytest.mark.parametrize("flags, words", [
    (dict(epochs=0), "--epochs must be >= 1"), (dict(steps=[4, 0]), "--steps must be >= 1"),
    (dict(batch_size=-5), "--batch-size"), (dict(val_fraction=-0.5), "--val-fraction"),
    (dict(val_fraction=1.0), "--val-fraction"), (dict(lr=0.0), "--lr must be > 0"),
    (dict(device="gpu"), "not a device"), (dict(device="meta"), "only cpu and cuda"),
    (dict(patch=[3, 0, 1]), "--patch"), (dict(clip_grad=-1.0), "--clip-grad")])
def test_check_args_refuses_bad_numbers(flags, words):
    import argparse
    with pytest.raises(ValueError, match=words):
        C.check_args(argparse.Namespace(**flags))
    assert C.check_args(argparse.Namespace(epochs=1, val_fraction=0.0, lr=1e-3, steps=[1]))


def test_optimizer_step_skips_nonfinite_and_gives_up(tmp_path):
    model = torch.nn.Linear(3, 1)
    opt, counts = torch.optim.SGD(model.parameters(), lr=0.1), {"nonfinite": 0}
    before = model.weight.detach().clone()
    assert not C.optimizer_step(model, model(torch.ones(2, 3)).sum() * float("nan"), opt, counts, tmp_path)
    assert torch.equal(model.weight, before) and counts["nonfinite"] == 1  # no update
    assert C.optimizer_step(model, model(torch.ones(2, 3)).sum(), opt, counts, tmp_path)
    assert not torch.equal(model.weight, before) and counts["in_a_row"] == 0
    with pytest.raises(C.TrainingError, match="3 non-finite .* no checkpoint was written"):
        for _ in range(3):
            C.optimizer_step(model, model(torch.ones(1, 3)).sum() * float("inf"), opt, counts, tmp_path, patience=3)


def test_save_checkpoint_refuses_nonfinite_weights(tmp_path):
    C.save_checkpoint(tmp_path / "ckpt.pt", script="energy", ds=2, epoch=1, model={"w": torch.ones(2)})
    with pytest.raises(C.TrainingError, match="non-finite.*epoch 2.*last good checkpoint .* \\(epoch 1\\)"):
        C.save_checkpoint(tmp_path / "ckpt.pt", script="energy", ds=2, epoch=2, model={"w": torch.tensor([1, np.nan])})
    assert C.load_checkpoint(tmp_path)["epoch"] == 1 and list(tmp_path.iterdir()) == [tmp_path / "ckpt.pt"]


def test_condition_and_latent_files(tmp_path, toy_ds2):
    e, u = torch.rand(5) * 1e4 + 1e3, torch.rand(5, 45, dtype=torch.float64)
    C.write_conditions(tmp_path / "c.hdf5", e, u, 2, checkpoint="x", steps=3)
    e2, u2, attrs = C.read_conditions(tmp_path / "c.hdf5", 2, n=4)
    assert torch.equal(u2, u[:4]) and attrs["steps"] == 3 and attrs["format"] == "calodream-conditions"
    with pytest.raises(C.DataError, match="dataset-2 conditions"):
        C.read_conditions(tmp_path / "c.hdf5", 3)
    with pytest.raises(C.DataError, match="fewer than the 9"):
        C.read_conditions(tmp_path / "c.hdf5", 2, n=9)
    e3, u3, _ = C.read_conditions(toy_ds2 / "toy_ds2_ref.hdf5", 2, n=6)  # a CaloChallenge file: its true u's
    torch.testing.assert_close(u3, C.load_u(toy_ds2 / "toy_ds2_ref.hdf5", 2, 6, progress=False)[1])
    assert C.read_conditions(toy_ds2 / "toy_ds2_ref.hdf5", 2, n=6, with_u=False)[1] is None
    cols = {"incident_energies": (1,), "u": (45,), "z": (2, 3, 1, 1)}
    with C.H5Writer(tmp_path / "z.hdf5", 5, cols, dict(format="calodream-latents", ds=2), dtypes={"z": "float32"}) as w:
        w.write(e, u, torch.randn(5, 2, 3, 1, 1))
        w.attrs["seconds"] = 1.5  # attributes may be added until the file is closed
    data, attrs = C.read_latents(tmp_path / "z.hdf5", 2)
    assert data["z"].shape == (5, 2, 3, 1, 1) and data["incident_energies"].shape == (5,) and attrs["seconds"] == 1.5
    with pytest.raises(C.DataError, match="not a dataset-3 latent file"):
        C.read_latents(tmp_path / "z.hdf5", 3)
    with pytest.raises(C.DataError, match="not a dataset-2 latent file"):
        C.read_latents(tmp_path / "c.hdf5", 2)
    with pytest.raises(ValueError, match="NaN/inf u"):
        C.write_conditions(tmp_path / "bad.hdf5", e, u * float("nan"), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.hdf5", "z.hdf5"]  # nothing half-written


def test_training_defaults_are_the_submission_configs():
    """SPEC 2.2-2.4: weight decay 0 (energy, laViT), 1e-5 (ViT), 1e-4 (VAE); ViT gradient clipping 100 / 50;
    a validation slice of at most 1 % (at least 300 showers or a tenth); DS3 energy warm-up 0.1."""
    import energy
    import latent_vit
    import shape_vit
    import vae
    assert energy.parse_args([]).weight_decay == 0 and latent_vit.parse_args([]).weight_decay == 0
    assert [energy.parse_args(["--ds", d]).warmup for d in ("2", "3")] == [0.3, 0.1]
    assert shape_vit.parse_args([]).weight_decay == 1e-5 and vae.parse_args([]).weight_decay == 1e-4
    assert [shape_vit.resolve(shape_vit.parse_args(["--ds", d])).clip_grad for d in ("2", "3")] == [100, 50]
    assert all(m.parse_args([]).val_fraction == 0.01 for m in (energy, shape_vit, vae, latent_vit))
    assert all(m.parse_args([]).precision == "fp32" for m in (energy, shape_vit, latent_vit))
    assert [len(C.split_indices(n)[1]) for n in (100_000, 6000, 200)] == [1000, 300, 20]
    assert len(C.split_indices(6000, 0.0)[1]) == 0


def test_precision_switch():
    model = C.ViT(C.ViTConfig((1, 6, 4, 3), (3, 2, 1), 24, 2, 48, 1))
    x, t, c = torch.randn(2, 1, 6, 4, 3), torch.rand(2), torch.randn(2, 46)
    with C.autocast("cpu", "bf16"):
        assert model.embed(model.embed.weight.new_ones(1, 6)).dtype == torch.bfloat16
    with C.autocast("cpu", "fp32"):
        assert model.embed(model.embed.weight.new_ones(1, 6)).dtype == torch.float32
    assert model.velocity(c, "bf16")(x, 0.5).dtype == torch.float32  # the solvers always get float32


def test_validation_loss_leaves_out_voxels_never_hit_in_training():
    """A voxel with no variance in the training split (std at the 1e-6 floor) is left out of the weighted loss, which
    is then the plain MSE over the other voxels."""
    std = torch.ones(45, 16, 9)
    std[3, 2, 1] = 1e-6
    weight = C.seen_voxels({"vox": {"std": std.float()}})
    assert weight.shape == (1, 45, 16, 9) and weight.sum() == 45 * 16 * 9 - 1
    x1 = torch.randn(4, 1, 45, 16, 9)
    x1[1, 0, 3, 2, 1] = 1e7  # a validation shower hits it
    model = lambda x, t, c: torch.zeros_like(x)
    gen = lambda: torch.Generator().manual_seed(0)
    full, masked = C.cfm_loss(model, x1, None, gen()), C.cfm_loss(model, x1, None, gen(), weight)
    x0 = torch.randn(x1.shape, generator=gen())
    keep = weight.expand_as(x1[0]).bool().expand_as(x1)
    assert full > 1e7 and torch.isclose(masked, ((x1 - x0)[keep] ** 2).mean())
