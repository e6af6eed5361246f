"""Tests for asose_jax.growth: function preservation (inference, argmax and dense), optimizer-state and
alpha carry-over, and that the grown network trains. Small nets (C0=8, L=4, 32x32, batch 4), CPU."""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asose_jax import growth, model, steps, train_state
from asose_jax.config import Config, DataConfig, GrowthConfig, ModelConfig
from asose_jax.ops import OP_REGISTRY, PRIMITIVES

OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "conv_7x1_1x7")
C0, L, HW, B, SPE = 8, 4, 32, 4, 2
TOL = 1e-4
# row r's argmax (original: block 1 has stride 2, so skip_connect there is the FactorizedReduce)
ARGMAX_OPS = ("sep_conv_3x3", "skip_connect", "conv_7x1_1x7", "max_pool_3x3")


def make_cfg(skeleton: str, ops=OPS) -> Config:
    return Config(model=ModelConfig(skeleton=skeleton, init_channels=C0, num_layers=L, ops=ops),
                  data=DataConfig(batch_size=B, source="synthetic"))


def synthetic_batch():
    rng = np.random.RandomState(0)
    xs = rng.randint(0, 256, (B * SPE, HW, HW, 3)).astype(np.uint8)
    ys = (np.arange(B * SPE) % 10).astype(np.int32)
    perm = np.arange(B * SPE, dtype=np.int32).reshape(SPE, B)
    return xs, ys, perm


def _randn(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def randomize_stats(stats, rng):
    """Non-trivial BN running statistics (else eval-mode BN is nearly the identity); numpy, no compiles."""
    def fill(path, v):
        if path[-1].key == "mean":
            return _randn(rng, v.shape, 0.5)
        return rng.uniform(0.3, 2.0, v.shape).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, stats)


def _param_value(path, s, rng):
    name = path[-1].key
    if name == "path_scale":
        return np.ones(s.shape, np.float32)
    if name == "scale":
        return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if name in ("bias", "b"):
        return _randn(rng, s.shape, 0.1)
    bound = 1.0 / np.sqrt(np.prod(s.shape[:-1]))
    return rng.uniform(-bound, bound, s.shape).astype(np.float32)


def make_state(spec, cfg, seed=0):
    """A TrainState with exactly the structure ``train_state.create_train_state`` builds (its ``eval_shape``:
    traced, nothing compiled), filled with random host (numpy) values; optimizer states zero, as
    ``tx.init`` makes them. Eager init would compile one kernel per weight shape (~10 s here)."""
    shapes = jax.eval_shape(lambda: train_state.create_train_state(0, spec, cfg, SPE))
    rng = np.random.RandomState(seed)
    zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)  # noqa: E731
    state = train_state.TrainState(
        params=jax.tree_util.tree_map_with_path(lambda p, s: _param_value(p, s, rng), shapes.params),
        batch_stats=randomize_stats(shapes.batch_stats, rng), alpha=_randn(rng, shapes.alpha.shape, 0.1),
        w_opt=zeros(shapes.w_opt), a_opt=zeros(shapes.a_opt), key=jax.random.key(seed),
        step=np.zeros((), np.int32), arch_epochs=np.zeros((), np.int32), cycle=np.zeros((), np.int32),
        phase=np.zeros((), np.int32), sums=zeros(shapes.sums))
    assert jax.tree.structure(state) == jax.tree.structure(shapes)
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.tree.map(np.asarray, state.params), shapes.params)
    return state


def test_input():
    return jax.random.normal(jax.random.key(7), (B, HW, HW, 3), jnp.float32)


test_input.__test__ = False  # a helper, not a test


def _trained(skeleton: str, ops=OPS, train: bool = True):
    cfg = make_cfg(skeleton, ops)
    spec = model.build_spec(skeleton, C0, L, ops)
    state = make_state(spec, cfg)
    if train:  # one real weight step: non-zero SGD momentum, LR schedule count 1
        xs, ys, perm = synthetic_batch()
        S = steps.make_steps(spec, cfg, SPE)
        state = S.weight_step(state, xs, ys, perm, 0, S.sample(state))
        state = jax.device_get(state)
    else:  # fake momentum and schedule position
        state = state.replace(w_opt=jax.tree.map(lambda v: v + 0.01 if v.ndim else v + 1, state.w_opt))
    # fake Adam moments (an arch step would cost another compile) and a fixed argmax pattern per row
    rng = np.random.RandomState(1)
    a_opt = state.a_opt
    adam = a_opt[2]
    adam = adam._replace(count=np.asarray(3, adam.count.dtype), mu=_randn(rng, adam.mu.shape, 0.01),
                         nu=rng.uniform(0, 1e-4, adam.nu.shape).astype(np.float32))
    a_opt = a_opt[:2] + (adam,) + a_opt[3:]
    alpha = _randn(rng, state.alpha.shape, 0.1)
    for r in range(spec.num_rows):
        alpha[r, ops.index(ARGMAX_OPS[r % len(ARGMAX_OPS)])] += 2.0
    state = state.replace(alpha=alpha, a_opt=a_opt, batch_stats=randomize_stats(state.batch_stats, rng),
                          arch_epochs=np.asarray(5, np.int32), cycle=np.asarray(2, np.int32),
                          phase=np.asarray(1, np.int32))
    return cfg, spec, state


_CACHE: dict = {}


def trained(skeleton: str):
    if skeleton not in _CACHE:
        _CACHE[skeleton] = _trained(skeleton)
    return _CACHE[skeleton]


def assert_trees_equal(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal(a, b)


def trace_of(w_opt):
    return w_opt[2].trace


def counts(opt):
    return [np.asarray(x) for x in jax.tree.leaves(opt) if np.ndim(x) == 0]


def check_common(cfg, spec, state, new_spec, new_state):
    """Counters, key, counts kept; opt states have the layout tx.init gives for the new params."""
    for name in ("key", "step", "arch_epochs", "cycle", "phase"):
        a, b = getattr(state, name), getattr(new_state, name)
        if name == "key":
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert_trees_equal(state.sums, new_state.sums)
    w_tx, a_tx = train_state.weight_optimizer(cfg, SPE), train_state.arch_optimizer(cfg)
    for opt, tx, params in ((new_state.w_opt, w_tx, new_state.params), (new_state.a_opt, a_tx, new_state.alpha)):
        template = jax.eval_shape(tx.init, params)
        assert jax.tree.structure(opt) == jax.tree.structure(template)
        chex.assert_trees_all_equal_shapes_and_dtypes(opt, template)
    np.testing.assert_array_equal(counts(state.w_opt), counts(new_state.w_opt))
    np.testing.assert_array_equal(counts(state.a_opt), counts(new_state.a_opt))
    assert int(counts(new_state.w_opt)[0]) == 1  # the weight step's schedule position survived
    chex.assert_tree_all_finite(new_state.params)
    for leaf in jax.tree.leaves((new_state.params, new_state.batch_stats, new_state.alpha, new_state.w_opt)):
        if np.ndim(leaf):
            assert leaf.dtype == jnp.float32
    assert new_state.alpha.shape == (new_spec.num_rows, len(new_spec.ops))
    model_params, model_stats = jax.eval_shape(lambda: model.init_network(9, new_spec))
    chex.assert_trees_all_equal_shapes(model_stats, new_state.batch_stats)
    # same shapes as a fresh network of the new spec, except path_scale which init makes all-ones
    chex.assert_trees_all_equal_shapes(model_params, new_state.params)


def check_rows(state, new_state, row_map):
    """alpha, Adam mu and nu: new row r = old row row_map[r], or (mu/nu) zeros for new rows."""
    adam_old, adam_new = state.a_opt[2], new_state.a_opt[2]
    for r, i in enumerate(row_map):
        if i is None:
            np.testing.assert_array_equal(adam_new.mu[r], 0.0)
            np.testing.assert_array_equal(adam_new.nu[r], 0.0)
        else:
            np.testing.assert_array_equal(new_state.alpha[r], state.alpha[i])
            np.testing.assert_array_equal(adam_new.mu[r], adam_old.mu[i])
            np.testing.assert_array_equal(adam_new.nu[r], adam_old.nu[i])


def assert_preserved(spec, state, new_spec, new_state, modes):
    x = test_input()
    for mode in modes:
        d = growth.max_abs_logit_diff(spec, state, new_spec, new_state, x, mode)
        assert d <= TOL, (mode, d)


# ---------------------------------------------------------------------------------------------- the matrix

SKELETONS = ("original", "resnet")
WHERE = {"s1": dict(deepen=0, widen=(0, 1.625), branch=0),  # stride-1 region; widen 8 -> 13
         "s2": dict(deepen=2, widen=(1, 1.3), branch=1)}  # at / after the stride-2 block 1; widen 16 -> 21


@pytest.mark.parametrize("skeleton", SKELETONS)
@pytest.mark.parametrize("where", ("s1", "s2"))
def test_deepen(skeleton, where):
    cfg, spec, state = trained(skeleton)
    pos = WHERE[where]["deepen"]
    new_spec, new_state = growth.deepen(spec, state, pos, jax.random.key(11))
    assert len(new_spec.blocks) == L + 1
    nb = new_spec.blocks[pos]
    c = growth.channels_at(spec, pos)
    assert (nb.c_in, nb.c_out, nb.stride, nb.input_conv, nb.op_stride, nb.n_paths) == (c, c, 1, 0, 1, 1)
    assert new_spec.blocks[:pos] + new_spec.blocks[pos + 1:] == spec.blocks
    check_common(cfg, spec, state, new_spec, new_state)
    assert_preserved(spec, state, new_spec, new_state, ("argmax", "dense") if skeleton == "resnet" else ("argmax",))
    # weights and momentum: old blocks carried (shifted), new block's momentum zero
    old_blocks = state.params["blocks"]
    new_blocks = new_state.params["blocks"]
    assert_trees_equal(new_blocks[:pos] + new_blocks[pos + 1:], old_blocks)
    assert_trees_equal(new_state.batch_stats["blocks"][:pos] + new_state.batch_stats["blocks"][pos + 1:],
                       state.batch_stats["blocks"])
    for key in ("stem", "head"):
        assert_trees_equal(new_state.params[key], state.params[key])
    t_old, t_new = trace_of(state.w_opt), trace_of(new_state.w_opt)
    assert_trees_equal(t_new["blocks"][:pos] + t_new["blocks"][pos + 1:], t_old["blocks"])
    assert_trees_equal(t_new["stem"], t_old["stem"])
    assert_trees_equal(t_new["head"], t_old["head"])
    assert any(np.any(np.asarray(v) != 0) for v in jax.tree.leaves(t_old["blocks"]))
    for v in jax.tree.leaves(t_new["blocks"][pos]):
        np.testing.assert_array_equal(v, 0.0)
    r = spec.row_offsets()[pos] if pos < L else spec.num_rows
    row_map = list(range(r)) + [None] + list(range(r, spec.num_rows))
    check_rows(state, new_state, row_map)
    row = np.asarray(new_state.alpha[r])
    if skeleton == "resnet":
        np.testing.assert_array_equal(new_blocks[pos]["path_scale"], [0.0])
        assert np.max(np.abs(row)) < 1.0
    else:
        skip = OPS.index("skip_connect")
        assert int(np.argmax(row)) == skip
        assert row[skip] - np.max(np.delete(row, skip)) >= 1.0
        assert float(jax.nn.softmax(row)[skip]) >= GrowthConfig().deepen_skip_prob - 1e-6
        assert "path_scale" not in new_blocks[pos]


@pytest.mark.parametrize("skeleton", SKELETONS)
@pytest.mark.parametrize("where", ("s1", "s2"))
def test_widen(skeleton, where):
    cfg, spec, state = trained(skeleton)
    stage_idx, factor = WHERE[where]["widen"]
    key = jax.random.key(12)
    st = growth.stages(spec)[stage_idx]
    new_spec, new_state = growth.widen(spec, state, stage_idx, factor, key)
    c = st.channels
    c_new = growth.widened_channels(c, factor)
    assert c_new % 2 == 1  # 13 or 21: odd widths
    new_st = growth.stages(new_spec)[stage_idx]
    assert new_st.channels == c_new and new_st.blocks == st.blocks and new_st.consumer == st.consumer
    if where == "s2" and skeleton == "original":  # the stage holds the FactorizedReduce of block 1
        assert spec.blocks[1].op_stride == 2 and 1 in st.blocks
    check_common(cfg, spec, state, new_spec, new_state)
    assert_preserved(spec, state, new_spec, new_state, ("argmax", "dense"))
    # momentum: outside the stage unchanged, inside mapped exactly like the weights
    g = growth.widen_mapping(c, c_new, key)
    cnt = np.bincount(g, minlength=c)[g].astype(np.float32)
    t_old, t_new = trace_of(state.w_opt), trace_of(new_state.w_opt)
    touched = set(st.blocks) | {st.producer} | ({st.consumer} if st.consumer is not None else set())
    for i in range(L):
        if i not in touched:
            assert_trees_equal(t_new["blocks"][i], t_old["blocks"][i])
            assert_trees_equal(new_state.params["blocks"][i], state.params["blocks"][i])
    if st.producer < 0:
        w_old, w_new = t_old["stem"]["w"], t_new["stem"]["w"]
        np.testing.assert_array_equal(new_state.params["stem"]["scale"], np.asarray(state.params["stem"]["scale"])[g])
        np.testing.assert_array_equal(new_state.batch_stats["stem"]["var"], np.asarray(state.batch_stats["stem"]["var"])[g])
    else:
        w_old = t_old["blocks"][st.producer]["input_conv"]["w"]
        w_new = t_new["blocks"][st.producer]["input_conv"]["w"]
        assert_trees_equal(t_new["stem"], t_old["stem"])
    np.testing.assert_array_equal(w_new, np.asarray(w_old)[..., g])
    if st.consumer is None:
        cw_old, cw_new = t_old["head"]["w"], t_new["head"]["w"]
        np.testing.assert_allclose(cw_new, np.asarray(cw_old)[g] / cnt[:, None], rtol=1e-6)
    else:
        cw_old = t_old["blocks"][st.consumer]["input_conv"]["w"]
        cw_new = t_new["blocks"][st.consumer]["input_conv"]["w"]
        np.testing.assert_allclose(cw_new, np.asarray(cw_old)[:, :, g, :] / cnt[:, None], rtol=1e-6)
    pw_old = t_old["blocks"][st.blocks[-1]]["paths"][0]["sep_conv_3x3"]["pw1"]
    pw_new = t_new["blocks"][st.blocks[-1]]["paths"][0]["sep_conv_3x3"]["pw1"]
    np.testing.assert_allclose(pw_new, np.asarray(pw_old)[:, :, g][..., g] / cnt[:, None], rtol=1e-6)
    assert np.any(np.asarray(pw_old) != 0)
    # FactorizedReduce grouping: conv1's outputs come from old [0, c//2), conv2's from old [c//2, c)
    assert np.all(g[:c_new // 2] < c // 2) and np.all(g[c_new // 2:] >= c // 2)
    assert sorted(set(g.tolist())) == list(range(c)) and list(g[:c // 2]) == list(range(c // 2))
    # alpha and its Adam state untouched
    check_rows(state, new_state, list(range(spec.num_rows)))


@pytest.mark.parametrize("skeleton", SKELETONS)
@pytest.mark.parametrize("where", ("s1", "s2"))
def test_branch(skeleton, where):
    cfg, spec, state = trained(skeleton)
    b = WHERE[where]["branch"]
    new_spec, new_state = growth.branch(spec, state, b, jax.random.key(13))
    assert new_spec.blocks[b].n_paths == spec.blocks[b].n_paths + 1
    check_common(cfg, spec, state, new_spec, new_state)
    assert_preserved(spec, state, new_spec, new_state, ("argmax", "dense"))
    old_blk, new_blk = state.params["blocks"][b], new_state.params["blocks"][b]
    n = spec.blocks[b].n_paths
    assert_trees_equal(new_blk["paths"][:n], old_blk["paths"][:n])
    if skeleton == "original":
        assert "path_scale" not in old_blk
        np.testing.assert_array_equal(new_blk["path_scale"], [1.0, 0.0])
    else:
        np.testing.assert_array_equal(new_blk["path_scale"], np.concatenate([old_blk["path_scale"], [0.0]]))
    t_old, t_new = trace_of(state.w_opt), trace_of(new_state.w_opt)
    for i in range(L):
        if i != b:
            assert_trees_equal(t_new["blocks"][i], t_old["blocks"][i])
    assert_trees_equal(t_new["blocks"][b]["paths"][:n], t_old["blocks"][b]["paths"][:n])
    for v in jax.tree.leaves(t_new["blocks"][b]["paths"][n]):
        np.testing.assert_array_equal(v, 0.0)
    ps_old = t_old["blocks"][b].get("path_scale")
    expect = np.zeros(n + 1) if ps_old is None else np.concatenate([ps_old, [0.0]])
    np.testing.assert_array_equal(t_new["blocks"][b]["path_scale"], expect)
    r = spec.row_offsets()[b] + n
    check_rows(state, new_state, list(range(r)) + [None] + list(range(r, spec.num_rows)))


def assert_skip_row(row, alpha, ops, p):
    """A deepened ``original`` row: skip the argmax by >= 1 logit, sampled with probability >= p (hard
    Gumbel: softmax(row)), every other entry mean(alpha)."""
    skip = ops.index("skip_connect")
    chex.assert_shape(row, (len(ops),))
    assert int(np.argmax(row)) == skip
    assert row[skip] - np.max(np.delete(row, skip)) >= 1.0
    assert float(jax.nn.softmax(row)[skip]) >= p - 1e-6, (p, jax.nn.softmax(row))
    chex.assert_trees_all_close(np.delete(row, skip), np.full(len(ops) - 1, np.mean(alpha), np.float32), rtol=1e-6)


@pytest.mark.parametrize("p", (0.5, 0.9, 0.99))
def test_deepen_original_skip_prob(p):
    """The new row's training-time skip probability follows ``skip_prob`` (p=0.5: the +1 margin over
    max(alpha) already gives more, so that bound decides); still exact in argmax mode; threaded from
    ``growth.deepen_skip_prob`` by ``grow``."""
    cfg, spec, state = trained("original")
    new_spec, new_state = growth.deepen(spec, state, 0, jax.random.key(11), skip_prob=p)
    row = np.asarray(new_state.alpha[0])
    assert_skip_row(row, state.alpha, OPS, p)
    assert_preserved(spec, state, new_spec, new_state, ("argmax",))
    margin = row[OPS.index("skip_connect")] - np.mean(state.alpha)
    if p == 0.5:
        assert np.isclose(margin, np.max(state.alpha) + 1 - np.mean(state.alpha), rtol=1e-6)
    else:
        assert np.isclose(margin, np.log(p / (1 - p) * (len(OPS) - 1)), rtol=1e-6)
    gcfg = dataclasses.replace(cfg, growth=GrowthConfig(deepen_skip_prob=p))
    g_spec, g_state, info = growth.grow("deepen", spec, state, jax.random.key(5), gcfg.growth)
    assert_skip_row(np.asarray(g_state.alpha[g_spec.row_offsets()[info["position"]]]), state.alpha, OPS, p)


@pytest.mark.parametrize("p", (0.6, 0.9, 0.999))
def test_skip_row_ten_ops(p):
    """The full op set (10 ops): the old ``max + 1`` row gave skip only e / (e + 9) = 0.23 in training."""
    alpha = np.random.RandomState(0).standard_normal((6, len(PRIMITIVES))).astype(np.float32)
    assert_skip_row(np.asarray(growth._skip_row(alpha, PRIMITIVES, p)), alpha, PRIMITIVES, p)


# ---------------------------------------------------------------------------------------------- more

def test_widen_all_ops_dense_with_factorized_reduce():
    """Every registered op in dense mode through a widened stride-2 stage of ``original``."""
    ops = tuple(OP_REGISTRY)
    cfg, spec, state = _trained("original", ops, train=False)
    new_spec, new_state = growth.widen(spec, state, 1, 1.3, jax.random.key(3))
    assert new_spec.blocks[1].c_out == 21
    assert_preserved(spec, state, new_spec, new_state, ("dense",))


@pytest.mark.parametrize("skeleton", SKELETONS)
def test_growth_chain_then_train(skeleton):
    """Several growths in a row (odd widths into FactorizedReduce, head consumer, deepen at the end,
    branch of a grown block), preserved end to end; then a weight step of the grown net is finite."""
    cfg, spec, state = trained(skeleton)
    s, st = growth.widen(spec, state, 1, 1.3, jax.random.key(20))  # 16 -> 21
    s, st = growth.widen(s, st, 1, 1.5, jax.random.key(21))  # 21 -> 32: odd old width through FR
    assert s.blocks[1].c_out == 32
    last = len(growth.stages(s)) - 1
    s, st = growth.widen(s, st, last, 1.25, jax.random.key(22))  # 32 -> 40, consumer = head
    s, st = growth.deepen(s, st, len(s.blocks), jax.random.key(23))
    s, st = growth.branch(s, st, len(s.blocks) - 1, jax.random.key(24))
    s, st = growth.branch(s, st, 1, jax.random.key(25))
    host = jax.device_get(st)  # transforms also take host (numpy) arrays
    s, st = growth.deepen(s, host, 0, jax.random.key(26))
    assert s.blocks[-2].c_out == 40 and s.blocks[-1].n_paths == 2 and len(s.blocks) == L + 2
    assert_preserved(spec, state, s, st, ("argmax", "dense") if skeleton == "resnet" else ("argmax",))
    check_common(cfg, spec, state, s, st)
    xs, ys, perm = synthetic_batch()
    S2 = steps.make_steps(s, cfg, SPE)
    st2 = S2.weight_step(st, xs, ys, perm, 1, S2.sample(st))
    assert np.isfinite(float(st2.sums["loss"])) and int(st2.sums["count"]) == int(state.sums["count"]) + B
    chex.assert_tree_all_finite(st2.params)
    assert int(st2.step) == int(state.step) + 1
    assert np.asarray(st2.params["blocks"][-1]["path_scale"]).shape == (2,)


def test_grow_dispatch_reproducible():
    cfg, spec, state = trained("resnet")
    x = test_input()
    for i, kind in enumerate(growth.GROWTHS):
        key = jax.random.key(100 + i)
        s1, st1, info1 = growth.grow(kind, spec, state, key, cfg.growth)
        s2, st2, info2 = growth.grow(kind, spec, state, key, cfg.growth)
        assert info1 == info2 and s1 == s2
        assert_trees_equal(st1.params, st2.params)
        assert set(info1) == {"kind", "position", "params_before", "params_after"}
        assert info1["kind"] == kind and info1["params_after"] > info1["params_before"]
        assert info1["params_before"] == model.count_params(state.params)
        assert growth.max_abs_logit_diff(spec, state, s1, st1, x) <= TOL
    with pytest.raises(ValueError):
        growth.grow("shrink", spec, state, jax.random.key(0), cfg.growth)


def test_errors_and_feasibility():
    ops = ("none", "sep_conv_3x3")
    spec = model.build_spec("original", C0, L, ops)
    cfg = make_cfg("original", ops)
    state = make_state(spec, cfg)
    with pytest.raises(ValueError, match="skip_connect"):
        growth.deepen(spec, state, 1, jax.random.key(0))
    _, ospec, ostate = trained("original")
    for p in (0.0, 1.0):
        with pytest.raises(ValueError, match="skip_prob"):
            growth.deepen(ospec, ostate, 0, jax.random.key(0), skip_prob=p)
    with pytest.raises(ValueError):
        growth.grow("deepen", spec, state, jax.random.key(0), cfg.growth)
    assert "deepen" not in growth.feasible_kinds(spec, state, cfg.growth)
    with pytest.raises(ValueError):
        growth.widened_channels(8, 1.0)
    assert growth.widened_channels(10, 1.1) == 11 and growth.widened_channels(8, 1.625) == 13
    with pytest.raises(ValueError):
        growth.widen(spec, state, len(growth.stages(spec)), 1.5, jax.random.key(0))
    with pytest.raises(ValueError):
        growth.branch(spec, state, L, jax.random.key(0))
    rspec = model.build_spec("resnet", C0, L, OPS)
    rcfg = dataclasses.replace(make_cfg("resnet"), growth=GrowthConfig(max_depth=L))
    rstate = make_state(rspec, rcfg)
    assert growth.feasible_kinds(rspec, rstate, rcfg.growth) == ("widen", "branch")
    with pytest.raises(ValueError, match="max_depth"):
        growth.grow("deepen", rspec, rstate, jax.random.key(0), rcfg.growth)
    capped = dataclasses.replace(rcfg, growth=GrowthConfig(depth_param_cap=model.count_params(rstate.params)))
    assert "deepen" not in growth.feasible_kinds(rspec, rstate, capped.growth)
    assert "deepen" in growth.feasible_kinds(rspec, rstate, make_cfg("resnet").growth)
    # the stage structure of the skeletons
    assert [(x.producer, x.blocks, x.channels, x.consumer) for x in growth.stages(spec)] == [
        (-1, (0,), 8, 1), (1, (1,), 16, 2), (2, (2, 3), 32, None)]
    # an optimizer-state leaf that is neither parameter-shaped nor a scalar is refused, not reset
    with pytest.raises(ValueError):
        growth.transfer_opt_state((jnp.zeros((3,)),), {"w": jnp.zeros((2,))}, lambda t, n: t)
    # the carried state is shaped like tx.init(new params), zeros for the new leaves
    tx = train_state.weight_optimizer(cfg, SPE)
    params = {"w": jnp.ones((2,))}
    opt = tx.init(params)
    new = growth.transfer_opt_state(opt, params, lambda t, n: {"w": jnp.concatenate([t["w"], n])}, jnp.ones((1,)))
    assert growth._is_params_like(new, tx.init({"w": jnp.ones((3,))}))
    np.testing.assert_array_equal(new[2].trace["w"], [0.0, 0.0, 0.0])
