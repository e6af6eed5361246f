"""Tests for asose_jax.policy: when to grow (forced, stagnation), what to grow (original strategy by
accuracy and depth, cycle strategy in turn), only feasible kinds, and reproducible from the key."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import numpy as np

from asose_jax import growth, model, policy
from asose_jax.config import Config, GrowthConfig, ModelConfig

OPS = ("none", "skip_connect", "sep_conv_3x3")
ALL = ("deepen", "widen", "branch")


def make(skeleton="original", layers=4, **growth) -> tuple[Config, model.NetSpec]:
    cfg = Config(model=ModelConfig(skeleton=skeleton, init_channels=8, num_layers=layers, ops=OPS),
                 growth=GrowthConfig(**{"every": 4, "stagnation_cycles": 3, "stagnation_range": 0.5, **growth}))
    return cfg, model.build_spec(skeleton, 8, layers, OPS)


def params_of_size(n: int) -> dict:
    return {"w": np.zeros((n,), np.float32)}


def test_should_grow_forced_and_stagnation():
    cfg, _ = make()
    assert not policy.should_grow(cfg, 3, [10.0, 20.0, 30.0], 0)
    assert policy.should_grow(cfg, 4, [10.0, 20.0, 30.0, 40.0], 0)  # forced: every 4 cycles
    assert not policy.should_grow(cfg, 6, [10.0, 20.0, 30.0, 40.0, 50.0, 60.0], 4)
    assert policy.should_grow(cfg, 7, [10.0, 20.0, 30.0, 40.0, 41.0, 41.2, 41.4], 4)  # range 0.4 < 0.5
    assert not policy.should_grow(cfg, 5, [10.0, 20.0, 41.0, 41.2, 41.4], 4)  # stagnant, but 1 cycle since
    off = dataclasses.replace(cfg, growth=dataclasses.replace(cfg.growth, every=0, stagnation_cycles=0))
    assert not policy.should_grow(off, 8, [41.0] * 8, 0)


def test_candidates_follow_accuracy_depth_and_cap():
    cfg, spec = make(kinds=ALL)
    assert policy.candidates(cfg, spec, 30.0) == ["deepen"] * 3 + ["widen"] * 2 + ["branch"]
    assert policy.candidates(cfg, spec, 60.0) == ["deepen"] * 2 + ["widen"] * 2 + ["branch"]
    assert policy.candidates(cfg, spec, 90.0) == ["widen"] * 3 + ["deepen", "branch"]
    other, _ = make(kinds=("branch", "grow_more", "widen"))  # a kind outside the lists: one entry, like branch
    assert policy.candidates(other, spec, 30.0) == ["widen"] * 2 + ["branch", "grow_more"]
    _, deep = make(layers=8, kinds=ALL)
    assert "deepen" not in policy.candidates(cfg, deep, 30.0)  # depth 8: no deepen under 50 %
    capped = dataclasses.replace(cfg, growth=dataclasses.replace(cfg.growth, depth_param_cap=5))
    feasible = growth.feasible_kinds(spec, SimpleNamespace(params=params_of_size(10)), capped.growth)
    assert feasible == ("widen", "branch")  # 10 weights >= the cap of 5: no deepen
    draws = {policy.decide(capped, spec, jax.random.PRNGKey(s), 4, [10.0, 20.0, 30.0, 40.0], [], 0, feasible)
             for s in range(20)}
    assert draws == {"widen", "branch"}


def test_decide_picks_only_feasible_kinds():
    """A kind the network cannot take now (e.g. deepen over the weight cap) is never returned; with none
    left there is no growth instead of an error."""
    key = jax.random.PRNGKey(0)
    for strategy in ("cycle", "original"):
        cfg, spec = make(kinds=("deepen",), strategy=strategy)
        args = (cfg, spec, key, 4, [10.0, 20.0, 30.0, 40.0], [], 0)
        assert policy.decide(*args, feasible=("deepen",)) == "deepen"
        assert policy.decide(*args, feasible=()) is None
        cfg2, _ = make(kinds=("deepen", "widen"), strategy=strategy)
        args2 = (cfg2, spec, key, 4, [10.0, 20.0, 30.0, 40.0], [], 0)
        assert policy.decide(*args2, feasible=("widen",)) == "widen"


def test_decide_cycle_strategy_turns_and_original_is_reproducible():
    cfg, spec = make(kinds=ALL, strategy="cycle", every=1)
    picks = [policy.decide(cfg, spec, jax.random.PRNGKey(0), c + 1, [], list(ALL[:c]), c, ALL)
             for c in range(3)]
    assert picks == list(ALL)
    cfg, spec = make(kinds=ALL)
    accs = [10.0, 20.0, 30.0, 40.0]
    draws = [policy.decide(cfg, spec, jax.random.PRNGKey(s), 4, accs, [], 0, ALL)
             for s in range(40)]
    again = [policy.decide(cfg, spec, jax.random.PRNGKey(s), 4, accs, [], 0, ALL)
             for s in range(40)]
    assert draws == again and set(draws) == set(ALL)  # every candidate is drawn, the same way twice
    assert policy.decide(cfg, spec, jax.random.PRNGKey(0), 3, accs[:3], [], 0, ALL) is None
