"""bespoke.py: both losses train a solver, the CLI trains for a ViT or a laViT, and the samplers apply it."""
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


def test_interpolate_hits_grid_and_is_linear():
    traj = torch.randn(3, 11, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.3, 0.35, 1.0])
    out = bespoke.interpolate(traj, t)
    assert torch.allclose(out[0], traj[:, 0]) and torch.allclose(out[1], traj[:, 3], atol=1e-6)
    assert torch.allclose(out[2], 0.5 * (traj[:, 3] + traj[:, 4]), atol=1e-5)
    assert torch.allclose(out[3], traj[:, -1], atol=1e-6)  # t = 1 through float32 arithmetic


@pytest.mark.parametrize("loss_name", ["global", "local", "local-mse"])
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


def test_cli_trains_for_a_vit_and_a_lavit(chain, tmp_path):
    """Two BNS solvers from one pool for the toy ViT; the untrained solver (Euler) applied by the sampler equals its
    Euler; a solver for the laViT (its latent grid and condition statistics) from the same CLI."""
    import shape_vit
    flags = ["--cond", str(chain["cond"]), "--out", str(tmp_path), "--preset", "small", "--pool", "24", "--n-val",
             "8", "--iters", "4", "--val-every", "2", "--batch-size", "8", "--ref-steps", "20", "--device", "cpu"]
    runs = bespoke.train(bespoke.parse_args(["--ckpt", str(chain["shape_vit"]), "--steps", "4", "--loss", "local",
                                             "global", *flags]))
    ckpts = [common.load_checkpoint(r, script="bespoke", ds=2) for r in runs]
    assert [c["loss"] for c in ckpts] == ["local", "global"] and all(c["n"] == 4 for c in ckpts)
    assert ckpts[0]["shape_ckpt"] == str(chain["shape_vit"]) and (runs[0] / "log.txt").is_file()
    vit = common.load_checkpoint(chain["shape_vit"])
    model, stats = common.build_vit(vit), vit["stats"]
    e_inc, u, _ = common.read_conditions(chain["cond"], 2, 6)
    gen = lambda solve: shape_vit.generate(model, stats, e_inc, u, 2, solve, torch.Generator().manual_seed(3))  # noqa
    common.save_checkpoint(tmp_path / "euler.pt", script="bespoke", ds=2, n=4, loss="local",
                           solver=common.BespokeSolver(4).state_dict())
    euler = gen(common.make_solver("euler", 4)[0])
    assert torch.allclose(gen(common.make_solver("bespoke", 0, tmp_path / "euler.pt", 2)[0]), euler, rtol=1e-4,
                          atol=1e-3)
    assert torch.isfinite(gen(common.make_solver("bespoke", 0, runs[0], 2)[0])).all()
    lavit = bespoke.train(bespoke.parse_args(["--ckpt", str(chain["latent_vit"]), "--steps", "2", "--loss",
                                              "global", *flags]))
    assert common.load_checkpoint(lavit[0])["shape_ckpt"] == str(chain["latent_vit"])


def test_local_loss_is_the_sum_of_per_step_rmse():
    """SPEC 2.5: per shower the sum over steps of the RMSE over its elements, then the mean over the batch."""
    torch.manual_seed(0)
    field, x0, cond = nonlinear_velocity(), torch.randn(5, 6), torch.randn(5, 6)
    traj = bespoke.reference_trajectory(lambda x, t: field(x, t, cond), x0, steps=20)
    solver = common.BespokeSolver(3)
    with torch.no_grad():
        t, b = solver.times(), solver.coefficients()
        steps = []
        for i in range(3):  # step i from the reference points: x_ref(t_{i+1}) - (a_i x0 + sum_j b_ij v(x_ref(t_j)))
            x_ref = bespoke.interpolate(traj, t)
            pred = solver.a[i] * x0 + sum(b[i, j] * field(x_ref[j], t[j], cond) for j in range(i + 1))
            steps.append(((pred - x_ref[i + 1]) ** 2).mean(1).sqrt())
        expected = torch.stack(steps).sum(0).mean()
        torch.testing.assert_close(bespoke.local_loss(solver, field, x0, cond, traj), expected)
        mse = torch.stack([s ** 2 for s in steps]).mean()
        torch.testing.assert_close(bespoke.local_mse_loss(solver, field, x0, cond, traj), mse)
