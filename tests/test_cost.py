"""Tests for asose_jax.cost: the row shapes of a supernet, the flops and latency tables, and the expected-cost
term of the arch loss (its gradient, and that minimising it alone picks every row's cheapest op)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from asose_jax import cost
from asose_jax.errors import ConfigError
from asose_jax.genotype import genotype_spec
from asose_jax.model import build_spec, count_params, init_network

REPO = Path(__file__).resolve().parents[1]
H100_TABLE = REPO / "docs" / "results" / "latency_h100.json"
OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "conv_3x3")
# no two ops cost the same at stride 1, so every row has one cheapest op
DISTINCT_COST_OPS = ("max_pool_3x3", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "conv_3x3")


@pytest.fixture(scope="module")
def resnet_spec():
    return build_spec("resnet", 8, 3, OPS)


def test_row_shapes_of_the_original_network_are_the_bench_shapes():
    spec = build_spec("original", 32, 4, OPS)
    shapes = [(r.channels, r.height, r.stride) for r in cost.row_shapes(spec)]
    assert shapes == [(32, 32, 1), (64, 16, 2), (128, 4, 2), (128, 2, 1)]


def test_row_shapes_of_resnet_follow_the_input_convs(resnet_spec):
    shapes = [(r.channels, r.height, r.stride) for r in cost.row_shapes(resnet_spec)]
    assert shapes == [(8, 32, 1), (16, 16, 1), (32, 8, 1)]


def test_flops_table_counts_each_op_at_its_row_shape(resnet_spec):
    table = cost.flops_table(resnet_spec)
    chex.assert_shape(table, (3, len(OPS)))
    col = {op: table[:, i] for i, op in enumerate(OPS)}
    assert np.all(col["none"] == 0) and np.all(col["skip_connect"] == 0)
    assert np.all(col["sep_conv_5x5"] > col["sep_conv_3x3"])
    for (c, h), conv in zip(((8, 32), (16, 16), (32, 8)), col["conv_3x3"]):
        macs = (3 * h - 2) ** 2 * c * c  # the 3x3 conv's multiply-adds, the zero padding's taps left out
        assert 2 * macs <= conv <= 2 * macs + 5 * c * h * h  # ReLU and BN add a few flops per element


def test_normalised_table_costs_one_at_uniform_alpha(resnet_spec):
    table = cost.normalise(cost.flops_table(resnet_spec))
    uniform = jnp.zeros(table.shape)
    np.testing.assert_allclose(float(cost.expected_cost(uniform, table)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.mean(np.sum(table, axis=0)), 1.0, rtol=1e-6)


def test_expected_cost_gradient_matches_finite_differences(resnet_spec):
    table = jnp.asarray(cost.normalise(cost.flops_table(resnet_spec)))
    alpha = 0.5 * jax.random.normal(jax.random.PRNGKey(0), table.shape)
    check_grads(lambda a: cost.expected_cost(a, table), (alpha,), order=1, modes=("rev",), eps=1e-2, atol=2e-3,
                rtol=2e-3)


def _random_table() -> np.ndarray:
    """A seeded ``[6, 5]`` table whose cheapest op differs from row to row."""
    table = np.random.default_rng(0).uniform(1.0, 2.0, (6, 5))
    table[np.arange(6), [0, 1, 2, 3, 4, 2]] = 0.5
    return cost.normalise(table)


def _flops_table() -> jax.Array:
    return cost.arch_cost_table(build_spec("resnet", 8, 4, DISTINCT_COST_OPS), "flops")


@pytest.mark.parametrize("table_of", [_flops_table, _random_table], ids=["flops", "random"])
def test_minimising_a_heavily_weighted_cost_picks_every_rows_cheapest_op(table_of):
    table = jnp.asarray(table_of())
    alpha = 0.1 * jax.random.normal(jax.random.PRNGKey(1), table.shape)
    tx = optax.adam(2e-2)
    grad = jax.jit(jax.grad(lambda a: 100.0 * cost.expected_cost(a, table)))
    opt = tx.init(alpha)
    for _ in range(300):
        updates, opt = tx.update(grad(alpha), opt)
        alpha = optax.apply_updates(alpha, updates)
    np.testing.assert_array_equal(np.argmax(alpha, -1), np.argmin(table, -1))
    assert np.all(np.max(jax.nn.softmax(alpha), -1) > 0.9)


def test_h100_latency_table_covers_the_original_network():
    measured_ops = sorted({e["op"] for e in json.loads(H100_TABLE.read_text())["entries"]})
    spec = build_spec("original", 32, 4, tuple(measured_ops))
    for precision in ("fp32", "bf16"):
        table = cost.latency_table(spec, H100_TABLE, precision)
        chex.assert_shape(table, (4, len(spec.ops)))
        assert np.all(table > 0)


def test_latency_table_names_the_missing_shape_in_one_line():
    spec = build_spec("resnet", 32, 8, ("sep_conv_3x3",))  # row 2 is C64 16x16 s1: not measured
    with pytest.raises(ConfigError) as e:
        cost.cost_table(spec, f"latency:{H100_TABLE}", "bf16")
    msg = str(e.value)
    assert "\n" not in msg and "sep_conv_3x3 at C64 16x16 s1 (row 2)" in msg and "--shapes 64/16/1" in msg


@pytest.mark.parametrize("source, message", [("params", "allowed flops | latency:PATH"),
                                             ("latency:", "allowed flops | latency:PATH"),
                                             ("latency:/nonexistent.json", "not found")])
def test_bad_cost_source_is_a_config_error(resnet_spec, source, message):
    with pytest.raises(ConfigError, match=message):
        cost.cost_table(resnet_spec, source)


def test_committed_h100_latency_table_is_the_conversion_of_the_bench_run(tmp_path):
    out = tmp_path / "latency.json"
    subprocess.run([sys.executable, "scripts/bench_ops.py", "--convert", "docs/results/bench_ops_h100.json",
                    "--latency-out", str(out)], cwd=REPO, check=True, capture_output=True)
    converted = json.loads(out.read_text())
    assert converted == json.loads(H100_TABLE.read_text())
    assert len(converted["entries"]) == 11 * 4 * 2  # 11 ops x the original network's 4 shapes x fp32, bf16


def test_bench_ops_writes_a_table_that_covers_the_configs_network(tmp_path):
    ops = ("skip_connect", "conv_3x3")
    out = tmp_path / "latency.json"
    subprocess.run([sys.executable, "scripts/bench_ops.py", "--smoke", "--no-torch",
                    "--config", "configs/study_smoke.py", "--ops", ",".join(ops), "--precisions", "fp32",
                    "--latency-out", str(out), "--out", str(tmp_path / "bench.json"),
                    "--md", str(tmp_path / "bench.md")],
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    table = cost.cost_table(build_spec("resnet", 4, 2, ops), f"latency:{out}", "fp32")
    chex.assert_shape(table, (2, 2))
    assert np.all(table > 0)


def _bench_ops():
    spec = importlib.util.spec_from_file_location("bench_ops", REPO / "scripts" / "bench_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_ops_adds_measured_shapes_to_an_existing_table_of_the_same_device(tmp_path):
    bench_ops = _bench_ops()

    def table(source: str, device: str, *entries) -> dict:
        return {"format": cost.LATENCY_FORMAT, "source": source, "measure": "batch 2", "device": device,
                "entries": [{"op": op, "channels": c, "height": 8, "stride": 1, "precision": "fp32", "ms": ms}
                            for op, c, ms in entries]}
    path = tmp_path / "latency.json"
    assert bench_ops.merged_latency(str(path), table("b", "cpu", ("conv_3x3", 8, 1.0))) == table(
        "b", "cpu", ("conv_3x3", 8, 1.0))  # nothing there yet
    path.write_text(json.dumps(table("a", "cpu", ("conv_3x3", 8, 1.0), ("conv_3x3", 16, 2.0))))
    merged = bench_ops.merged_latency(str(path), table("b", "cpu", ("conv_3x3", 16, 3.0), ("conv_3x3", 48, 4.0)))
    assert [(e["channels"], e["ms"]) for e in merged["entries"]] == [(8, 1.0), (16, 3.0), (48, 4.0)]
    assert merged["source"] == "a; then b"
    with pytest.raises(SystemExit, match="device 'cpu', this run's is 'gpu'"):
        bench_ops.merged_latency(str(path), table("b", "gpu", ("conv_3x3", 48, 4.0)))


def test_forward_flops_of_a_dense_layer():
    x = jax.ShapeDtypeStruct((1, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((16, 4), jnp.float32)
    assert cost.forward_flops(jnp.dot, x, w) == pytest.approx(2 * 16 * 4, rel=0.1)


def test_network_cost_counts_the_final_networks_ops_and_weights():
    blocks = [{"c_in": 8, "c_out": 8, "stride": 1}, {"c_in": 8, "c_out": 16, "stride": 2},
              {"c_in": 16, "c_out": 16, "stride": 1}]

    def spec(ops):
        return genotype_spec({"skeleton": "resnet", "stem_channels": 8, "ops": ops, "blocks": blocks})
    net = spec(["sep_conv_3x3", ["conv_3x3", "max_pool_3x3"], "dil_conv_3x3"])
    skips = spec(["skip_connect", ["skip_connect", "skip_connect"], "skip_connect"])
    (flops, params), (skip_flops, _) = cost.network_cost(net), cost.network_cost(skips)
    assert params == count_params(init_network(0, net)[0])
    ops_flops = sum(cost.op_flops(net.ops[i], shape) for i, shape in zip(net.fixed_ops, cost.row_shapes(net)))
    assert flops - skip_flops == pytest.approx(ops_flops, rel=0.05)  # the rest (stem, input convs, head) is shared


# ---------------------------------------------------------------------------------------------- integration

def _untimed_rows(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if k not in ("wall_s", "img_per_s")} for r in rows]


def test_zero_cost_weight_leaves_the_search_byte_identical(tmp_path):
    """With arch.cost_weight=0 the cost source is never read (this latency table lacks the smoke network's
    shapes) and the search is the plain one: same genotype bytes, same metrics."""
    from asose_jax.config import apply_overrides, load_config_file, preset_path, validate
    from asose_jax.search import run_search
    base = load_config_file(preset_path("smoke"))
    short = ["cycle.max_cycles=1", "cycle.warmup_epochs=0", "cycle.retrain_epochs=0"]
    plain = validate(apply_overrides(base, short))
    weighted = validate(apply_overrides(base, [*short, f"arch.cost=latency:{H100_TABLE}", "arch.cost_weight=0"]))
    run_search(plain, tmp_path / "plain", progress=False)
    run_search(weighted, tmp_path / "weighted", progress=False)
    assert (tmp_path / "plain" / "genotype.json").read_bytes() == (tmp_path / "weighted" / "genotype.json").read_bytes()
    assert _untimed_rows(tmp_path / "plain") == _untimed_rows(tmp_path / "weighted")


@pytest.mark.parametrize("mode", ["single", "dense"], ids=["host-engine", "one-program-engine"])
def test_a_heavily_weighted_arch_step_moves_alpha_down_the_cost_gradient(mode):
    """From alpha = 0, Adam's first step moves each entry by -lr * sign(gradient); with a cost weight of 1e4
    the cost term's gradient decides every sign. The logged loss stays the cross-entropy."""
    from asose_jax.config import ArchConfig, Config, DataConfig, MixedOpConfig, ModelConfig
    from asose_jax.single_path import SinglePathSteps
    from asose_jax.steps import make_steps
    from asose_jax.train_state import create_train_state
    cfg = replace(Config(), model=ModelConfig(skeleton="resnet", init_channels=4, num_layers=2, ops=DISTINCT_COST_OPS),
                  mixed_op=MixedOpConfig(mode=mode), data=DataConfig(crop=False, flip=False, batch_size=8),
                  arch=replace(ArchConfig(), cost_weight=1e4))
    spec = build_spec("resnet", 4, 2, DISTINCT_COST_OPS)
    state = create_train_state(0, spec, cfg, 1)
    state = state.replace(alpha=jnp.zeros_like(state.alpha))
    steps = make_steps(spec, cfg, 1)
    assert isinstance(steps, SinglePathSteps) == (mode == "single")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 10, (8,), dtype=np.int32))
    table = cost.arch_cost_table(spec, "flops")
    cost_grad = np.asarray(jax.grad(cost.expected_cost)(jnp.zeros(table.shape), table))
    new = steps.arch_step(state, x, y, jnp.arange(8, dtype=jnp.int32)[None], 0, steps.arch_sample(state))
    np.testing.assert_array_equal(np.sign(np.asarray(new.alpha)), -np.sign(cost_grad))
    assert float(new.sums["loss"]) / int(new.sums["count"]) < 10.0  # a cross-entropy, not 1e4 * cost


def test_large_cost_weight_makes_the_search_pick_each_rows_cheapest_op(tmp_path):
    from asose_jax.config import apply_overrides, load_config_file, preset_path, validate
    from asose_jax.search import run_search
    cfg = validate(apply_overrides(load_config_file(preset_path("smoke")), [
        "model.ops=" + ",".join(DISTINCT_COST_OPS), "growth.enabled=false", "cycle.warmup_epochs=0",
        "cycle.retrain_epochs=0", "cycle.arch_epochs=3", "arch.lr=0.3", "arch.cost=flops", "arch.cost_weight=100"]))
    run_search(cfg, tmp_path, progress=False)
    genotype = json.loads((tmp_path / "genotype.json").read_text())
    spec = build_spec(cfg.model.skeleton, cfg.model.init_channels, cfg.model.num_layers, cfg.model.ops)
    cheapest = [spec.ops[i] for i in np.argmin(cost.flops_table(spec), -1)]
    assert genotype["ops"] == cheapest


def test_search_stops_in_one_line_before_loading_data_when_the_latency_table_lacks_a_shape(tmp_path, capsys,
                                                                                          monkeypatch):
    from asose_jax import cli, data, search
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)
    monkeypatch.setattr(data, "load_dataset", lambda *a: pytest.fail("the data was loaded"))
    workdir = tmp_path / "run"
    rc = search.main(["--preset", "smoke", "--set", f"arch.cost=latency:{H100_TABLE}", "--set", "arch.cost_weight=1",
                      "--workdir", str(workdir), "--no-progress", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: arch.cost: latency table") and "\n" not in err, err
    assert "has no fp32 entry for none at C8 32x32 s1 (row 0)" in err
    assert not workdir.exists()
