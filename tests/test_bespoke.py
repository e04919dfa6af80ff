"""bespoke.py: parameter count, Euler at init, both losses train, checkpoint round trip, sampler hook."""
import json
import math

import pytest
import torch

import bespoke
import common


def nonlinear_velocity(dim=6, seed=0):
    w = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)) / math.sqrt(dim)

    def field(x, t, cond):  # t: float, 0-dim tensor, or one time per row
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return torch.tanh(x @ w + cond) * (1 + t) - 0.5 * t ** 2 * x
    return field


def tiny_vit(seed=0):
    """A small common.ViT with random (not zero) adaLN and output weights: a nonlinear velocity field."""
    torch.manual_seed(seed)
    model = common.ViT(common.ViTConfig(in_shape=(1, 6, 4, 3), patch=(3, 2, 1), dim=24, heads=2, mlp=48,
                                        depth=2, cond_dim=3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def vit_field(model):
    return lambda x, t, cond: model(x, torch.as_tensor(t, dtype=torch.float32), cond)


@pytest.mark.parametrize("n,expected", [(4, 17), (8, 51), (16, 167)])
def test_parameter_count(n, expected):
    solver = bespoke.BespokeSolver(n)
    assert common.count_parameters(solver) == expected == (n * n + 5 * n - 2) // 2
    t = solver.times()
    assert t[0] == 0 and t[-1] == 1 and len(t) == n + 1


@pytest.mark.parametrize("n", [3, 8])
def test_euler_at_init(n):
    field = nonlinear_velocity()
    x0, cond = torch.randn(10, 6), torch.randn(10, 6)
    vel = lambda x, t: field(x, t, cond)
    with torch.no_grad():
        x1 = bespoke.BespokeSolver(n)(vel, x0)
    ref, nfe = common.solve(vel, x0, n, "euler")
    assert torch.allclose(x1, ref, atol=1e-6, rtol=0) and nfe == n
    model = tiny_vit()
    x0, cond = torch.randn(5, 1, 6, 4, 3), torch.randn(5, 3)
    vel = lambda x, t: vit_field(model)(x, t, cond)
    with torch.no_grad():
        assert torch.allclose(bespoke.BespokeSolver(n)(vel, x0), common.solve(vel, x0, n, "euler")[0], atol=1e-6)


def test_interpolate_hits_grid_and_is_linear():
    traj = torch.randn(3, 11, 4)
    t = torch.tensor([0.0, 0.3, 0.35, 1.0])
    out = bespoke.interpolate(traj, t)
    assert torch.allclose(out[0], traj[:, 0]) and torch.allclose(out[1], traj[:, 3], atol=1e-6)
    assert torch.allclose(out[2], 0.5 * (traj[:, 3] + traj[:, 4]), atol=1e-5) and torch.allclose(out[3], traj[:, -1])


@pytest.mark.parametrize("loss_name", ["global", "local"])
@pytest.mark.parametrize("kind", ["analytic", "vit"])
def test_training_lowers_loss(loss_name, kind):
    torch.manual_seed(1)
    if kind == "analytic":
        field, x0, cond = nonlinear_velocity(), torch.randn(120, 6), 0.3 * torch.randn(120, 6)
    else:
        field, x0, cond = vit_field(tiny_vit()), torch.randn(120, 1, 6, 4, 3), torch.randn(120, 3)
    traj = bespoke.reference_trajectory(lambda x, t: field(x, t, cond), x0, steps=100)
    args = bespoke.parse_args(["--preset", "small", "--iters", "30", "--val-every", "5", "--lr", "2e-2"])
    args.n_val, args.batch_size, args.micro_batch = 40, 40, 20
    log = lambda *m: None
    solver, history, best = bespoke.train_solver(4, loss_name, field, (x0, cond, traj), args, log)
    assert best < 0.7 * history["val_loss"][0]  # the validation loss at init is Euler's
    assert not torch.allclose(solver.times(), torch.linspace(0, 1, 5))  # the times moved
    end = bespoke.end_point_mse(lambda v, x: solver(v, x), field, x0[80:], cond[80:], traj[80:], 100)
    euler = bespoke.end_point_mse(lambda v, x: common.solve(v, x, 4, "euler")[0], field, x0[80:], cond[80:],
                                  traj[80:], 100)
    assert end < euler


def test_checkpoint_round_trip_and_hook(tmp_path):
    solver = bespoke.BespokeSolver(5)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(0.1 * torch.randn_like(p))
    common.save_checkpoint(tmp_path / "ckpt.pt", script="bespoke", ds=2, n=5, loss="local",
                           solver=solver.state_dict(), shape_ckpt="x")
    loaded = bespoke.load_bespoke(tmp_path, 2)
    assert torch.equal(loaded.times(), solver.times()) and torch.equal(loaded.coefficients(), solver.coefficients())
    assert loaded.loss == "local"
    with pytest.raises(common.DataError):
        bespoke.load_bespoke(tmp_path, 3)

    field, x0, cond = nonlinear_velocity(), torch.randn(8, 6), torch.randn(8, 6)
    calls = []

    def velocity(x, t):  # the samplers' convention: t a python float
        calls.append(type(t))
        return field(x, t, cond)
    x1, nfe = bespoke.bespoke_solve_fn(loaded)(velocity, x0)
    with torch.no_grad():
        assert torch.equal(x1, solver(lambda x, t: field(x, t, cond), x0))
    assert nfe == 5 and calls == [float] * 5
    with pytest.raises(ValueError):
        bespoke.bespoke_solve_fn(loaded)(velocity, x0, steps=8)


def test_cli_train_and_sampler_hook(toy_ds2, tmp_path):
    """End to end on toy showers: a tiny shape_vit run, two BNS solvers from one pool (truth u's), and
    shape_vit.generate_showers with the hook equals its own Euler for an untrained solver."""
    import shape_vit
    shape_run = shape_vit.main(["--toy", "--data-dir", str(toy_ds2), "--max-showers", "64", "--out", str(tmp_path),
                                "--preset", "small", "--dim", "12", "--heads", "2", "--mlp", "24", "--depth", "1",
                                "--epochs", "1", "--batch-size", "32", "--no-progress", "--device", "cpu"])
    runs = bespoke.main(["--shape-ckpt", str(shape_run), "--energy-ckpt", "truth", "--out", str(tmp_path),
                         "--preset", "small", "--pool", "24", "--n-val", "8", "--iters", "4", "--val-every", "2",
                         "--batch-size", "8", "--steps", "4", "--loss", "local", "global", "--ref-steps", "20",
                         "--device", "cpu"])
    assert len(runs) == 2
    ckpts = [common.load_checkpoint(r, script="bespoke", ds=2) for r in runs]
    assert [c["loss"] for c in ckpts] == ["local", "global"] and all(c["n"] == 4 for c in ckpts)
    assert ckpts[0]["shape_ckpt"] == str(shape_run)

    model, ckpt = shape_vit.load_shape(shape_run, 2, "cpu")
    e_inc = common.sample_e_inc(6, generator=torch.Generator().manual_seed(0))
    e, showers = common.load_showers(toy_ds2 / "toy_ds2_ref.hdf5", 2, 6, progress=False)
    u = common.energies_to_u(torch.from_numpy(e).double(), common.layer_energies(torch.from_numpy(showers), 2))
    gen = lambda **kw: shape_vit.generate_showers(model, ckpt["stats"], e_inc, u, 2, batch_size=4,
                                                  generator=torch.Generator().manual_seed(3), **kw)
    euler = gen(solver="euler", steps=4)
    hooked = gen(solve_fn=bespoke.bespoke_solve_fn(bespoke.BespokeSolver(4)))
    assert torch.allclose(hooked, euler, rtol=1e-4, atol=1e-3)
    trained = gen(solve_fn=bespoke.bespoke_solve_fn(bespoke.load_bespoke(runs[0], 2)))
    assert trained.shape == euler.shape and torch.isfinite(trained).all()
    sweep_dir = bespoke.main(["--sweep", "--shape-ckpt", str(shape_run), "--bespoke", *map(str, runs),
                              "--energy-ckpt", "truth", "--like", str(toy_ds2 / "toy_ds2_ref.hdf5"), "--n", "40",
                              "--nfe", "4", "--rk4-reference", "8", "--cls-epochs", "1", "--cls-width", "16",
                              "--cls-repeats", "2", "--vs-reference", "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    table = json.loads((sweep_dir / "sweep.json").read_text())["rows"]
    assert [(r["solver"], r["nfe"]) for r in table] == [("rk4", 8), ("bns-local", 4), ("bns-global", 4), ("euler", 4),
                                                         ("midpoint", 4), ("rk4", 4)]
    assert all(0 <= r["auc_high"] <= 1 and 0 <= r["auc_low"] <= 1 and r["ms_per_shower"] > 0 for r in table)
    assert "auc_low_vs_rk4" not in table[0] and all(0 <= r["auc_low_vs_rk4"] <= 1 for r in table[1:])
    assert all(r["auc_high_std"] >= 0 and r["auc_low_vs_rk4_std"] >= 0 for r in table[1:])  # 2 classifier seeds
    assert (sweep_dir / "eval_euler_4_seed1").is_dir()
    assert (sweep_dir / "sweep.png").stat().st_size > 0 and "bns-local" in (sweep_dir / "sweep.md").read_text()
    assert not list(sweep_dir.glob("gen_*.hdf5"))  # generated files are removed unless --keep-showers


def test_latent_vit_network(toy_ds2, tmp_path):
    """A laViT run trains a BNS solver too (its latent grid, its own condition statistics); its sampler
    runs through load_network's generate."""
    import latent_vit
    import vae
    files = ["--files", str(toy_ds2 / "toy_ds2_train.hdf5"), "--out", str(tmp_path), "--max-showers", "24",
             "--batch-size", "8", "--epochs", "1", "--no-progress"]
    vae_run = vae.main([*files, "--channels", "2"])
    lavit_run = latent_vit.main([*files, "--vae", str(vae_run), "--preset", "small", "--dim", "12", "--depth", "1",
                                 "--heads", "2", "--mlp", "24", "--val-fraction", "0.25"])
    runs = bespoke.main(["--shape-ckpt", str(lavit_run), "--energy-ckpt", "truth", "--out", str(tmp_path),
                         "--pool", "12", "--n-val", "4", "--iters", "2", "--val-every", "1", "--batch-size", "4",
                         "--steps", "2", "--loss", "global", "--ref-steps", "10", "--device", "cpu"])
    assert common.load_checkpoint(runs[0], script="bespoke", ds=2)["shape_ckpt"] == str(lavit_run)
    model, ckpt, field, generate = bespoke.load_network(lavit_run, 2, "cpu")
    assert model.cfg.in_shape[0] == 2 and ckpt["script"] == "latent_vit"
    e_inc = common.sample_e_inc(3, generator=torch.Generator().manual_seed(0))
    u = torch.full((3, 45), 0.3, dtype=torch.float64)
    showers = generate(e_inc, u, "euler", 2, 3, torch.Generator().manual_seed(0), None)
    assert showers.shape == (3, common.geometry(2).n_vox) and torch.isfinite(showers).all()
