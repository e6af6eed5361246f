"""Tests for asose_jax.model: the faithful `original` preset's weight count, activation sizes of both
skeletons, the resnet skeleton's structure (residual, one downsampling per stage), NetSpec round trip,
and a small forward pass. Shapes come from ``jax.eval_shape`` (no compile) where values are not needed."""
from __future__ import annotations

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asose_jax import config as config_lib
from asose_jax import mixed_op, model, train_state
from asose_jax.model import BlockSpec, NetSpec
from asose_jax.ops import PRIMITIVES

SMALL_OPS = ("none", "skip_connect", "max_pool_3x3", "sep_conv_3x3")


def preset_spec(name: str):
    cfg = config_lib.validate(config_lib.load_config_file(config_lib.preset_path(name)))
    m = cfg.model
    return cfg, model.build_spec(m.skeleton, m.init_channels, m.num_layers, m.ops, m.num_classes, m.stage_width_mult)


def abstract_net(spec: NetSpec):
    return jax.eval_shape(lambda: model.init_network(0, spec))


def activation_shapes(spec: NetSpec, batch: int = 2) -> list[tuple[int, ...]]:
    """Shape after the stem and after every block (eval_shape: nothing is computed)."""
    params, stats = abstract_net(spec)
    alpha = jnp.zeros((spec.num_rows, len(spec.ops)))
    sel = mixed_op.select_rows(alpha, "argmax")
    h = jax.ShapeDtypeStruct((batch, 32, 32, spec.in_channels), jnp.float32)
    h = jax.eval_shape(lambda p, s, x: model.conv_bn_relu(p, s, x, 1, False)[0], params["stem"], stats["stem"], h)
    shapes = [h.shape]
    for b, (block, off) in enumerate(zip(spec.blocks, spec.row_offsets())):
        sels = [jax.tree.map(lambda a, r=off + p: a[r], sel) for p in range(block.n_paths)]
        h = jax.eval_shape(lambda p, s, x, block=block, sels=sels:
                           model.apply_block(spec, block, p, s, x, sels, "argmax", False)[0],
                           params["blocks"][b], stats["blocks"][b], h)
        shapes.append(h.shape)
    return shapes


# ---------------------------------------------------------------------------------------------- original preset

def test_original_preset_weight_count():
    cfg, spec = preset_spec("original")
    assert spec.skeleton == "original" and spec.stem_channels == 32 and len(spec.blocks) == 4
    assert spec.ops == PRIMITIVES
    params, stats = abstract_net(spec)
    assert model.count_params(params) == 937_258
    state = jax.eval_shape(lambda: train_state.create_train_state(0, spec, cfg, 10))
    chex.assert_shape(state.alpha, (4, 10))
    assert state.alpha.size == 40
    assert model.count_params(state.params) + state.alpha.size == 937_298
    # BN running statistics are not weights: they live in batch_stats, not params
    assert "mean" not in {getattr(p[-1], "key", None) for p, _ in jax.tree_util.tree_leaves_with_path(params)}


def test_original_structure_and_activation_sizes():
    _, spec = preset_spec("original")
    down = [i for i, b in enumerate(spec.blocks) if b.stride == 2]
    assert down == [1, 2]  # i in {L//3, 2L//3} for L = 4
    for b in spec.blocks:
        assert not b.residual
        if b.stride == 2:  # the stride is applied twice: the 1x1 input conv and the op
            assert b.input_conv == 1 and b.op_stride == 2 and b.c_out == 2 * b.c_in
        else:
            assert b.input_conv == 0 and b.op_stride == 1 and b.c_out == b.c_in
    assert [b.c_out for b in spec.blocks] == [32, 64, 128, 128]
    shapes = activation_shapes(spec)
    assert shapes == [(2, 32, 32, 32), (2, 32, 32, 32), (2, 8, 8, 64), (2, 2, 2, 128), (2, 2, 2, 128)]


# ---------------------------------------------------------------------------------------------- resnet skeleton

@pytest.mark.parametrize("layers", [3, 6, 8])
def test_resnet_skeleton_structure(layers):
    spec = model.build_spec("resnet", 16, layers, PRIMITIVES)
    assert [i for i, b in enumerate(spec.blocks) if b.stride == 2] == sorted(model.downsample_positions(layers))
    for b in spec.blocks:
        assert b.residual and b.op_stride == 1  # one downsampling per stage: the input conv only
        assert (b.input_conv == 3) == (b.stride == 2)
        assert b.c_out == (2 * b.c_in if b.stride == 2 else b.c_in)
        assert model.uses_path_scale(b)
    for prev, nxt in zip(spec.blocks, spec.blocks[1:]):
        assert nxt.c_in == prev.c_out


def test_default_preset_resnet_ends_8x8():
    _, spec = preset_spec("default")
    assert spec.skeleton == "resnet"
    shapes = activation_shapes(spec)
    assert shapes[0][1:3] == (32, 32)
    assert shapes[-1][1:3] == (8, 8)
    assert shapes[-1][-1] == spec.blocks[-1].c_out
    # each stage halves the resolution exactly once
    sizes = [s[1] for s in shapes]
    assert sorted(set(sizes), reverse=True) == [32, 16, 8]
    assert sum(a != b for a, b in zip(sizes, sizes[1:])) == 2


def _np_init(spec: NetSpec, seed: int = 0):
    rng = np.random.default_rng(seed)
    params, stats = abstract_net(spec)
    params = jax.tree.map(lambda a: jnp.asarray(rng.uniform(-0.5, 0.5, a.shape), jnp.float32), params)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape) if p[-1].key == "var" else
                                 rng.uniform(-0.2, 0.2, a.shape), jnp.float32), stats)
    return params, stats


@functools.partial(jax.jit, static_argnums=(0, 3))
def _block_out(spec, params, stats, op_index, x):
    """Output of every block for input ``x`` fed to each block separately (argmax = ``op_index``)."""
    outs = []
    for b, (block, off) in enumerate(zip(spec.blocks, spec.row_offsets())):
        sel = {"idx": jnp.array([op_index], jnp.int32), "coeff": jnp.ones((1,))}
        xin = x if block.c_in == x.shape[-1] else jnp.zeros(x.shape[:-1] + (block.c_in,))
        y, _ = model.apply_block(spec, block, params["blocks"][b], stats["blocks"][b], xin, [sel] * block.n_paths,
                                 "argmax", False)
        outs.append(y)
    return outs


def test_resnet_blocks_are_residual():
    """With the `none` op chosen, a stride-1 resnet block is the identity (y = x + 0); the original's is 0."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
    for skeleton, expect_identity in (("resnet", True), ("original", False)):
        spec = model.build_spec(skeleton, 4, 3, SMALL_OPS)
        params, stats = _np_init(spec)
        outs = _block_out(spec, params, stats, SMALL_OPS.index("none"), x)
        b0 = spec.blocks[0]
        assert b0.stride == 1
        if expect_identity:
            chex.assert_trees_all_close(outs[0], x)
        else:
            assert not np.any(np.asarray(outs[0]))
        # with a real op, the resnet output is x + path_scale * op(x)
        outs_sep = _block_out(spec, params, stats, SMALL_OPS.index("sep_conv_3x3"), x)
        assert float(jnp.max(jnp.abs(outs_sep[0] - outs[0]))) > 1e-3


# ---------------------------------------------------------------------------------------------- spec and forward

def test_netspec_roundtrip():
    spec = model.build_spec("resnet", 8, 5, SMALL_OPS, num_classes=7)
    grown = NetSpec(spec.skeleton, spec.stem_channels,
                    spec.blocks + (BlockSpec(32, 32, 1, 0, 1, True, n_paths=2),), spec.ops, 7)
    for s in (spec, grown, model.build_spec("original", 32, 4, PRIMITIVES)):
        d = json.loads(json.dumps(s.to_dict()))  # through JSON, as checkpoints store it
        back = NetSpec.from_dict(d)
        assert back == s and hash(back) == hash(s)
        assert isinstance(back.ops, tuple) and isinstance(back.blocks, tuple)
    assert grown.num_rows == 7 and grown.row_offsets() == (0, 1, 2, 3, 4, 5)


def test_build_spec_rejects_unknown_skeleton():
    with pytest.raises(ValueError, match="skeleton"):
        model.build_spec("vgg", 8, 3, SMALL_OPS)


@pytest.mark.parametrize("skeleton", ["original", "resnet"])
def test_forward_logits_and_bn_update(skeleton):
    spec = model.build_spec(skeleton, 4, 3, SMALL_OPS)
    params, stats = _np_init(spec)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
    alpha = jnp.asarray(np.random.default_rng(2).standard_normal((spec.num_rows, len(SMALL_OPS))), jnp.float32)

    @jax.jit
    def fwd(p, s, a, x):
        sel = mixed_op.select_rows(jax.nn.softmax(a, -1), "topk", 2)
        train = model.apply_network(spec, p, s, x, sel, "topk", True)
        ev = model.apply_network(spec, p, s, x, sel, "topk", False)
        bf16 = model.apply_network(spec, p, s, x, sel, "topk", True, dtype=jnp.bfloat16)
        return train, ev, bf16
    (logits, new_stats), (logits_eval, same_stats), (logits_bf16, _) = fwd(params, stats, alpha, x)
    for lg in (logits, logits_eval, logits_bf16):
        chex.assert_shape(lg, (4, 10))
        chex.assert_type(lg, jnp.float32)
        chex.assert_tree_all_finite(lg)
    chex.assert_trees_all_equal_structs(new_stats, stats)
    chex.assert_trees_all_close(same_stats, stats)  # eval leaves the statistics alone
    assert not np.allclose(np.asarray(new_stats["stem"]["mean"]), np.asarray(stats["stem"]["mean"]))
    np.testing.assert_allclose(np.asarray(logits_bf16), np.asarray(logits), atol=0.3, rtol=0.1)


# ---------------------------------------------------------------------------------------------- init

def test_init_network_compiles_nothing_and_is_seeded():
    """Weights come from numpy on the host: no XLA compilation (a threefry draw per weight compiled for 9 s on a
    CPU), float32 within PyTorch's U(-1/sqrt(fan_in), +), the same for one seed (int or JAX key), else not."""
    _, spec = preset_spec("smoke")
    compiles = []

    def listener(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        params, stats = model.init_network(3, spec)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    for leaf in jax.tree.leaves((params, stats)):
        assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32
    w = params["blocks"][0]["paths"][0]["sep_conv_3x3"]["pw1"]  # [1, 1, C, C]: fan_in C
    assert 0 < np.abs(w).max() <= 1 / np.sqrt(w.shape[2])
    chex.assert_trees_all_equal(params, model.init_network(3, spec)[0])
    chex.assert_trees_all_equal(params, model.init_network(np.random.default_rng(3), spec)[0])
    other = model.init_network(4, spec)[0]
    assert not np.array_equal(w, other["blocks"][0]["paths"][0]["sep_conv_3x3"]["pw1"])
    key_a, key_b = model.init_network(jax.random.PRNGKey(1), spec)[0], model.init_network(jax.random.key(1), spec)[0]
    chex.assert_trees_all_equal(key_a, key_b)  # a raw and a typed key with the same data


def test_init_path_ops_draw_from_their_own_streams():
    """Each op of a path draws from the child generator of its position in the op set: its weights depend on that
    position, not on what the ops before it draw."""
    full, _ = model.init_path(0, SMALL_OPS, 8, 1)
    alone, _ = model.init_path(0, ("none", "skip_connect", "max_pool_3x3", "sep_conv_3x3")[::-1], 8, 1)
    assert not np.array_equal(full["sep_conv_3x3"]["pw1"], alone["sep_conv_3x3"]["pw1"])  # child 3 vs child 0
    first, _ = model.init_path(0, ("sep_conv_3x3",), 8, 1)
    chex.assert_trees_all_equal(first["sep_conv_3x3"], alone["sep_conv_3x3"])
