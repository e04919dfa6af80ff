"""tools/bench.py: FLOP counts against a hand count, and tiny runs of its sections on CPU (networks from
random-weight checkpoints read back with the stages' loaders)."""
import json

import torch

import bench
import common
import timing

DECODER_DS2 = 510_227  # parameters of the VAE's cond_net, up blocks and output conv (DS2, 64 channels)
TINY = ["--device", "cpu", "--quick", "--repeats", "1", "--budget", "0", "--ds", "2", "--threads", "1"]


def test_vit_flops_match_a_hand_count():
    # grid (6, 4, 3) in patches (3, 2, 1): N = 2*2*3 = 12 tokens of patch_dim 6, D = 12, 2 heads, MLP 24, 1 block
    cfg = common.ViTConfig(in_shape=(1, 6, 4, 3), patch=(3, 2, 1), dim=12, heads=2, mlp=24, depth=1)
    b, n, d = 2, 12, 12
    linear_macs = (n * 6 * d  # patch embedding
                   + 256 * d + d * d + 46 * d + d * d  # time and condition MLPs (per sample)
                   + d * 6 * d + n * (d * 3 * d + d * d + d * 24 + 24 * d)  # block: adaLN, qkv, proj, MLP
                   + d * 2 * d + n * d * 6)  # final adaLN and projection
    attention = 2 * 2 * b * n * n * d  # QK^T and AV, 2 FLOPs per MAC, summed over heads
    hand = 2 * b * linear_macs + attention
    assert hand == 96288
    assert bench.vit_flops(cfg, b) == hand
    assert bench.counted_flops(common.ViT(cfg), batch=b) == hand


def test_paper_vit_flops_are_counted_by_torch():
    for kind, ds in (("vit", 2), ("lavit", 3)):
        model = common.ViT(common.ViTConfig(**timing.vit_model_args(kind, ds)))
        assert bench.counted_flops(model) == bench.vit_flops(model.cfg, 1)


def test_timed_loops_short_calls_and_reports_memory():
    args = bench.parse_args(["--repeats", "3", "--budget", "1"])
    calls = []
    ms, mem = bench.timed(lambda: calls.append(1), torch.device("cpu"), args)
    assert ms < 1 and mem > 0 and len(calls) > 10  # looped: a no-op is far shorter than 50 ms


def test_cli_forward_and_energy_write_json(tmp_path, capsys):
    out = tmp_path / "bench.json"  # main() in this process: the same path as `python bench.py ...` minus an import
    bench.main([*TINY, "--sections", "forward", "energy", "--forward-batch", "1", "--kv-batch", "8", "--kv-steps", "1",
                "--out", str(out)])
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["meta"]["device"] == "cpu" and set(res["meta"]["seconds"]) == {"forward", "energy"}
    forward = {r["name"]: r for r in res["forward"]}
    assert set(forward) == {"energy_head", "energy_net", "vit_ds2", "lavit_ds2", "vae_ds2", "vae_decoder_ds2"}
    assert forward["vit_ds2"]["params"] == 26_042_688 and forward["lavit_ds2"]["params"] == 10_711_566
    assert forward["vae_ds2"]["params"] == 901_093 and forward["energy_net"]["params"] == 1_695_297
    assert forward["vae_decoder_ds2"]["params"] == DECODER_DS2 and forward["energy_head"]["params"] == 431_361
    assert all(r["ms"] > 0 and r["batch"] == 1 for r in forward.values())
    energy = {r["name"]: r for r in res["energy"]}
    assert energy["sampler, no cache"]["max_abs_diff"] < 1e-5  # the KV cache changes nothing but the time
    assert energy["sampler, no cache"]["speedup"] > 0 and energy["head evaluations only"]["sampler_over_heads"] > 0
    assert "ode_over_heads" in energy["head evaluations only"]
    assert energy["head evaluations only"]["head_evals"] == 45 * 4
    assert "vit_ds2" in stdout and "sampler, KV cache" in stdout


def test_flops_section_reuses_the_forward_times():
    args = bench.resolve(bench.parse_args([*TINY, "--forward-batch", "1"]), torch.device("cpu"))
    rows = bench.bench_flops(args, torch.device("cpu"), {"forward": [dict(name="vit_ds2", batch=1, ms=100.0)]})
    assert [r["name"] for r in rows] == ["matmul 2048^3 float32", "vit_ds2", "lavit_ds2"]
    assert rows[1]["ms"] == 100.0 and rows[1]["gflop"] == rows[1]["gflop_counted"]
    assert 0 < rows[2]["fraction_of_peak"] and rows[0]["fraction_of_peak"] == 1.0
