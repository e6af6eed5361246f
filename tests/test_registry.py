"""Adding an op, a mixed-op mode or a growth kind touches one registry each: a dummy of each, added through
``ops.register_op``, ``mixed_op.MODES`` and ``growth.GROWTHS`` only (and removed again after the test), runs a
tiny search end to end on synthetic data (sampled, trained, grown, evaluated); the op then widens through its
channel roles."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from asose_jax import cli, growth, mixed_op, ops
from asose_jax.config import (CheckpointConfig, Config, CycleConfig, DataConfig, GrowthConfig, MixedOpConfig,
                              ModelConfig, validate)
from asose_jax.cycle import Run
from asose_jax.data import load_dataset


def _gain_init(rng, c, stride):
    return {"gain": ops.conv_init(rng, 1, 1, 1, c)}, {}


def _gain_apply(p, s, x, stride, train):
    """A per-channel gain on the (subsampled) input."""
    return x[:, ::stride, ::stride, :] * p["gain"][0, 0, 0].astype(x.dtype), s


def _choose_top_two(weights, k, threshold):
    return lax.top_k(weights, 2)[1].astype(jnp.int32)


def _branch_last_block(spec, state, position, key, g):
    return growth.branch(spec, state, len(spec.blocks) - 1, key)


@pytest.fixture
def dummies(monkeypatch):
    """A registered op ``gain``, a mode ``top2`` (topk with k fixed at 2) and a growth kind ``branch_last``."""
    op = ops.register_op(ops.OpDef("gain", _gain_init, _gain_apply, channel_roles={"gain": ops.DEPTHWISE}))
    topk = mixed_op.MODES["topk"]
    monkeypatch.setitem(mixed_op.MODES, "top2", mixed_op.Mode("top2", _choose_top_two, topk.select, topk.apply))
    monkeypatch.setitem(growth.GROWTHS, "branch_last",
                        growth.Growth(_branch_last_block, lambda spec: 1,
                                      lambda spec, state, g: spec.blocks[-1].n_paths < 3))
    yield
    del ops.OP_REGISTRY[op.name]


def test_a_dummy_op_mode_and_growth_kind_run_a_search(dummies, tmp_path):
    cfg = Config(precision="fp32",
                 model=ModelConfig(skeleton="resnet", init_channels=4, num_layers=2,
                                   ops=("none", "skip_connect", "sep_conv_3x3", "gain")),
                 mixed_op=MixedOpConfig(mode="top2", eval_mode="argmax"),
                 data=DataConfig(source="synthetic", synthetic_train=192, synthetic_test=64, arch_val_size=64,
                                 batch_size=32, crop=False, flip=False),
                 cycle=CycleConfig(max_cycles=1, weight_epochs=1, arch_epochs=1, retrain_epochs=1,
                                   early_stop_cycles=0),
                 growth=GrowthConfig(every=1, strategy="cycle", kinds=("branch_last",)),
                 checkpoint=CheckpointConfig(enabled=False))
    cli.check_registered_names(validate(cfg))
    run = Run(cfg, load_dataset(cfg.data, cfg.seed), tmp_path, progress=False)
    run.init_state()
    result = run.execute()
    (grown,) = [r for r in run.metrics if r["event"] == "growth"]
    assert grown["kind"] == "branch_last" and grown["max_abs_logit_diff"] < 1e-4
    assert run.spec.blocks[-1].n_paths == 2
    assert all(math.isfinite(r["loss"]) for r in run.metrics if r["event"] == "epoch")
    assert int(run.state.step) == 4 + 2 + 4  # 128 / 32 weight, 64 / 32 arch, 4 retrain steps
    assert 0.0 <= result["test_acc"] <= 100.0
    wide_spec, wide_state = growth.widen(run.spec, run.state, 0, 1.5, jax.random.key(0))
    assert wide_spec.stem_channels == 6
    assert growth.max_abs_logit_diff(run.spec, run.state, wide_spec, wide_state, run.x_val[:8] / 255.0) < 1e-4
