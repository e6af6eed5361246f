"""When to grow and how: the original's policy, driven by arch-val accuracy (never test) and the run's seeded key,
so a run is reproducible. Strategy ``original`` draws from the original's accuracy-dependent list
(:func:`candidates`), ``cycle`` takes the enabled kinds in turn (tests and demos); either picks only kinds the
network can take now (``growth.feasible_kinds``: e.g. no deepen at or above ``depth_param_cap`` weights).
"""
from __future__ import annotations

import jax

from asose_jax.config import Config
from asose_jax.model import NetSpec


def should_grow(cfg: Config, cycle: int, accs: list[float], last_growth_cycle: int) -> bool:
    """Forced ``growth.every`` cycles since the last growth (the first at cycle ``every``), or on stagnation: the
    last ``stagnation_cycles`` arch-val accuracies span < ``stagnation_range`` points, 2 or more cycles since."""
    g = cfg.growth
    since = cycle - last_growth_cycle if last_growth_cycle else cycle
    if g.every and since >= g.every:
        return True
    w = g.stagnation_cycles
    return bool(w and len(accs) >= w and max(accs[-w:]) - min(accs[-w:]) < g.stagnation_range and since >= 2)


def candidates(cfg: Config, spec: NetSpec, acc: float) -> list[str]:
    """The original strategy's list for arch-val accuracy ``acc`` (%), before the feasibility filter."""
    g, depth = cfg.growth, len(spec.blocks)
    if acc < 50:
        cands = ["deepen"] * 3 * (depth < min(8, g.max_depth)) + ["widen"] * 2
    elif acc < 80:
        cands = ["deepen"] * 2 * (depth < min(12, g.max_depth)) + ["widen"] * 2
    else:
        cands = ["widen"] * 3 + ["deepen"] * (depth < min(15, g.max_depth))
    cands += [k for k in g.kinds if k not in ("deepen", "widen")]  # branch, and any other registered kind
    return [c for c in cands if c in g.kinds]


def decide(cfg: Config, spec: NetSpec, key: jax.Array, cycle: int, accs: list[float],
           growth_kinds_so_far: list[str], last_growth_cycle: int, feasible: tuple[str, ...]) -> str | None:
    """The kind of growth to apply at the end of this cycle's arch phase, or None (also when no kind the
    strategy would pick is in ``feasible``, ``growth.feasible_kinds`` of the current network)."""
    if not cfg.growth.enabled or not should_grow(cfg, cycle, accs, last_growth_cycle):
        return None
    if cfg.growth.strategy == "cycle":
        kinds = [k for k in cfg.growth.kinds if k in feasible]
        return kinds[len(growth_kinds_so_far) % len(kinds)] if kinds else None
    acc = accs[-1] if len(accs) >= 3 else 50.0  # the original used 50 until three results exist
    cands = [c for c in candidates(cfg, spec, acc) if c in feasible]
    if not cands:
        return None
    return cands[int(jax.random.randint(key, (), 0, len(cands)))]
