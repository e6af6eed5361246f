"""The host-dispatched single-path engine computes what the lax.switch implementation computes."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asose_jax import model, steps, train_state
from asose_jax.config import Config, DataConfig, MixedOpConfig, ModelConfig
from asose_jax.single_path import SinglePathSteps, gumbel_noise

OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")


def _setup(dispatch: str, skeleton: str, channels: int = 4):
    cfg = dataclasses.replace(Config(), model=ModelConfig(skeleton=skeleton, init_channels=channels, num_layers=3, ops=OPS),
                              mixed_op=MixedOpConfig(mode="single", dispatch=dispatch),
                              data=DataConfig(crop=False, flip=False, batch_size=8))
    spec = model.build_spec(skeleton, channels, 3, OPS)
    state = train_state.create_train_state(0, spec, cfg, 4)
    alpha = np.full((spec.num_rows, len(OPS)), -30.0, np.float32)
    alpha[:, 3] = 30.0  # peaked: every row picks sep_conv_3x3 ...
    alpha[1] = -30.0
    alpha[1, 1] = 30.0  # ... except row 1 (max pool); gaps of 60 logits, so both engines choose the same ops
    return cfg, spec, state.replace(alpha=jnp.asarray(alpha)), steps.make_steps(spec, cfg, 4)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 10, (32,), dtype=np.int32))
    return x, y, jnp.arange(32, dtype=jnp.int32).reshape(4, 8)


@pytest.mark.parametrize("skeleton", ["original", "resnet"])
def test_host_dispatch_matches_switch(batch, skeleton):
    x, y, perm = batch
    out = {}
    for dispatch in ("host", "switch"):
        _, _, state, S = _setup(dispatch, skeleton)
        assert isinstance(S, SinglePathSteps) == (dispatch == "host")
        for i in range(2):
            state = S.weight_step(state, x, y, perm, i, S.sample(state))
        state = S.arch_step(state, x, y, perm, 2, S.sample(state))
        out[dispatch] = jax.device_get(state)
    h, s = out["host"], out["switch"]
    chex.assert_trees_all_close(h.params, s.params, atol=1e-5)
    chex.assert_trees_all_close(h.batch_stats, s.batch_stats, atol=1e-5)
    chex.assert_trees_all_close(h.sums["loss"], s.sums["loss"], rtol=1e-5)
    chex.assert_trees_all_close((h.sums["grad_norm"], h.sums["grad_norm_max"]),
                                (s.sums["grad_norm"], s.sums["grad_norm_max"]), rtol=1e-4)
    assert 0 < h.sums["grad_norm"] / 16 <= h.sums["grad_norm_max"] < np.inf  # mean <= max over 2 weight steps of 8
    assert int(h.step) == int(s.step) == 3
    assert np.abs(h.alpha - s.alpha).max() < 1e-6
    assert np.abs(h.alpha - np.asarray(_setup("host", skeleton)[2].alpha)).max() > 1e-5  # alpha moved


def test_host_arch_step_gives_nonzero_alpha_gradient(batch):
    x, y, perm = batch
    _, spec, state, S = _setup("host", "resnet")
    state = state.replace(alpha=jnp.zeros_like(state.alpha).at[:, 0].set(-50.0))  # never `none`
    before = np.asarray(state.alpha)
    state = S.arch_step(state, x, y, perm, 0, S.sample(state))
    moved = np.abs(np.asarray(state.alpha) - before)[:, 1:]
    assert np.isfinite(moved).all() and (moved > 0).all()  # Adam moves every entry with a non-zero gradient


def test_noise_is_deterministic_and_step_dependent():
    a, b, c = gumbel_noise(0, 5, (4, 10)), gumbel_noise(0, 5, (4, 10)), gumbel_noise(0, 6, (4, 10))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0
    assert np.isfinite(a).all()


@pytest.mark.parametrize("skeleton", ["original", "resnet"])
def test_host_argmax_eval_matches_one_program_eval(batch, skeleton):
    x, y, _ = batch
    cfg, spec, state, S = _setup("host", skeleton)
    state = state.replace(alpha=jax.random.normal(jax.random.PRNGKey(3), state.alpha.shape))  # mixed argmaxes
    one_program = steps.make_steps(spec, dataclasses.replace(cfg, mixed_op=MixedOpConfig(mode="single",
                                                                                          dispatch="switch")), 4)
    mask = jnp.arange(32) < 27
    host_loss, host_correct = S.eval_batch(state, x, y, mask)
    ref_loss, ref_correct = one_program.eval_batch(state, x, y, mask)
    np.testing.assert_allclose(float(host_loss), float(ref_loss), rtol=1e-5)
    assert int(host_correct) == int(ref_correct)


def test_dense_arch_mode_steps_alpha_with_every_op_and_resyncs_the_host_sampler(batch):
    """``arch_mode=dense``: single-path weight steps, arch steps through the dense mixture (one program);
    every alpha entry gets a gradient, and the host sampler picks up the new alpha and step counter."""
    x, y, perm = batch
    cfg, spec, state, _ = _setup("host", "resnet")
    cfg = dataclasses.replace(cfg, mixed_op=dataclasses.replace(cfg.mixed_op, arch_mode="dense"))
    S = steps.make_steps(spec, cfg, 4)
    assert isinstance(S, steps.SplitModeSteps)
    state = state.replace(alpha=jnp.zeros_like(state.alpha))
    state = S.weight_step(state, x, y, perm, 0, S.sample(state))
    before = np.asarray(state.alpha)
    state = S.arch_step(state, x, y, perm, 1, S.arch_sample(state))
    moved = np.abs(np.asarray(state.alpha) - before)
    assert np.isfinite(moved).all() and (moved[:, 1:] > 0).all()  # every op but `none` (zero output) moved
    assert int(state.step) == 2
    fresh = steps.make_steps(spec, cfg, 4)  # no host mirror yet: reads alpha and step from the state
    got, want = S.sample(state), fresh.sample(state)
    np.testing.assert_array_equal(got["idx"], want["idx"])
    np.testing.assert_array_equal(got["noise"], want["noise"])
    state = S.weight_step(state, x, y, perm, 2, got)
    assert np.isfinite(float(state.sums["loss"])) and int(state.step) == 3
